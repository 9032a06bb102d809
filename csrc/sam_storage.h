// The storage policies of the CPU twin: what its loops (sam_cpu_loops.h) load and store.
//
// sam_cpu.cpp includes this file once, inside its internal namespace, as it does the loops (hence
// no include guard and no includes: <cstdint> and <cstring> come from the includer); so does the
// wide-register emulation test (tests/cpp/wide_emulation.cpp).

// What the loops load and store: S::raw in memory, S::acc in registers.  The
// 16-bit conversions are integer ops that vectorise (c10's are scalar calls);
// each gives c10's bits: bf16 rounds to nearest even and NaN becomes 0x7FC0,
// as c10::BFloat16(float) does.
template <typename T>
struct Plain {
  using raw = T;
  using acc = T;
  static acc load(raw v) { return v; }
  static raw store(acc v) { return v; }
  struct Round {  // on one value or on a register of them (sam_cpu_loops.h: restore_sgd_pairs)
    template <class V>
    V operator()(V v) const {
      return v;
    }
  };
};

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

struct BF16 {
  using raw = uint16_t;
  using acc = float;
  // f's bits rounded to bf16, still in the upper half of a 32-bit word
  static uint32_t rounded(acc f) {
    const uint32_t u = to_bits(f);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u : r;
  }
  static acc load(raw v) { return from_bits(uint32_t(v) << 16); }
  static raw store(acc f) { return raw(rounded(f) >> 16); }
  // load(store(v)) without the 16-bit round trip, which g++ does not vectorise
  struct Round {
    acc operator()(acc v) const { return from_bits(rounded(v)); }
  };
};

// IEEE half precision with c10::Half's bits (round to nearest even; NaN ->
// sign | 0x7E00 on the way down, quieted on the way up), each case computed
// and one selected, so that the loops vectorise (g++ 12 does not vectorise
// F16C's conversions).  Still ~10 instructions per element each way: FusedSAM
// leaves fp16 buckets on the CPU to foreach (fastsam/backends/cpp.py).
struct F16 {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t e = h & 0x7C00u;
    const uint32_t m = h & 0x03FFu;
    const uint32_t normal = ((e >> 10) + 112u) << 23 | m << 13;
    const uint32_t special = 0x7F800000u | m << 13 | (m != 0 ? 0x00400000u : 0u);  // inf, or a quiet NaN
    const uint32_t subnormal = to_bits(float(int32_t(m)) * 0x1p-24f);                 // exact
    return from_bits(sign | (e == 0x7C00u ? special : e == 0 ? subnormal : normal));
  }
  static raw store(acc f) {
    const uint32_t u = to_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    // normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even
    const uint32_t normal = (a - (112u << 23) + 0x0FFFu + ((a >> 13) & 1u)) >> 13;
    // below 2^-14: adding 0.5 rounds |f| to a multiple of 2^-24 (0.5's ulp), the subnormal's units
    const uint32_t subnormal = to_bits(from_bits(a) + 0.5f) - 0x3F000000u;
    const uint32_t out = a > 0x7F800000u ? 0x7E00u : a >= 0x477FF000u ? 0x7C00u : a >= 0x38800000u ? normal : subnormal;
    return raw(sign | out);
  }
  struct Round {
    acc operator()(acc v) const { return load(store(v)); }
  };
};
