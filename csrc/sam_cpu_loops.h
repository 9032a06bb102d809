// The element loops of the CPU twin, written once and compiled once per
// instruction set.
//
// sam_cpu.cpp includes this file three times, each inside its own namespace
// (isa_base, isa_avx2, isa_avx512) and under its own `#pragma GCC target`, so
// that g++ vectorises the same source for SSE2, AVX2 and AVX-512; the op picks
// one at run time (no -march flag: the .so runs on any x86-64).  Hence no
// include guard and no includes: sam_cpu.cpp provides the storage policies
// (sam_storage.h: S::raw, S::acc, S::load, S::store, S::Round) and sam_math.h.
//
// Every function handles one chunk (the grouped norm a few): plain indexed
// loops over restrict pointers with the configuration in template parameters,
// which g++ -O3 vectorises (the 16-bit policies convert with integer ops that
// vectorise too); where g++'s vectorisation falls short, the same math on
// registers of g++'s vector extensions (Lanes), lane by lane, with the same
// bits.  A write-only destination leaves with streaming stores when the caller
// asks for them, from the registers or through an L1-resident block and
// copy(): a large list is then written without first being read into the
// cache (a third less traffic for a copy).

#ifndef FASTSAM_INLINE
// On the lambdas that hold a loop: not inlined, their captures (the loop's index among them)
// live in memory that every store through a raw pointer may alias, and are reloaded each turn.
#define FASTSAM_INLINE __attribute__((always_inline))
#endif

#if FASTSAM_X86
// One register of this instruction set, as a g++ vector of T (Vec<T>::type).  A
// specialisation per type: g++ drops vector_size on a dependent type in an alias template.
// The width comes from sam_cpu.cpp (FASTSAM_VEC_BYTES): g++'s `#pragma GCC target` does
// not define __AVX2__ or __AVX512F__ for C++.
constexpr size_t kVecBytes = FASTSAM_VEC_BYTES;
template <class T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
};
typedef uint32_t U32 __attribute__((vector_size(kVecBytes)));

template <class To, class From>
inline To bitcast(From f) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To t;
  std::memcpy(&t, &f, sizeof(t));
  return t;
}

// A streaming store of one register's worth at d (kVecBytes-aligned).
template <class V>
inline void stream_store(void* d, V v) {
#if FASTSAM_VEC_BYTES == 64
  _mm512_stream_si512(static_cast<__m512i*>(d), bitcast<__m512i>(v));
#elif FASTSAM_VEC_BYTES == 32
  _mm256_stream_si256(static_cast<__m256i*>(d), bitcast<__m256i>(v));
#else
  _mm_stream_si128(static_cast<__m128i*>(d), bitcast<__m128i>(v));
#endif
}

// Registers of acc values (V, kWidth lanes) loaded from and stored to S's storage, two
// registers (2 * kWidth elements) at a time; kOk where this instruction set has such a path
// (sam_cpu.cpp's storage policies give the same bits one element at a time).
template <class S>
struct Lanes {
  static constexpr bool kOk = false;
};

template <class T>
struct Lanes<Plain<T>> {
  static constexpr bool kOk = true;
  using V = typename Vec<T>::type;
  static constexpr int64_t kWidth = int64_t(kVecBytes / sizeof(T));
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  // 2 * kWidth elements at p as two registers (elements in order)
  static void load2(const T* p, V& a, V& b) {
    a = load(p);
    b = load(p + kWidth);
  }
  template <bool kNan = true>  // kNan: as BF16's (nothing is rounded here)
  static void store2(T* p, V a, V b) {
    store(p, a);
    store(p + kWidth, b);
  }
  // store2 of values Round gave (exactly representable): nothing to round
  static void store2_exact(T* p, V a, V b) { store2(p, a, b); }
  // store2 with streaming stores (p kVecBytes-aligned; the caller fences)
  template <bool kNan = true>
  static void stream2(T* p, V a, V b) {
    stream_store(p, a);
    stream_store(p + kWidth, b);
  }
  // a pair of registers' worth of memory as it is (raw, split, put, stream_raw as Lanes<BF16>'s)
  struct Raw {
    V a, b;
  };
  static Raw raw(const T* p) {
    Raw x;
    load2(p, x.a, x.b);
    return x;
  }
  static void split(Raw x, V& a, V& b) {
    a = x.a;
    b = x.b;
  }
  static void put(T* p, Raw x) { store2(p, x.a, x.b); }
  static void stream_raw(T* p, Raw x) { stream2(p, x.a, x.b); }
  static constexpr bool kSelectsNan = false;
  using NanSeen = bool;  // never set: nothing is rounded
  static void note_nan(NanSeen&, V, V) {}
  static bool any(NanSeen) { return false; }
  template <bool kNan>
  using Rounding = typename Plain<T>::Round;
  using Round = Rounding<true>;
};

// bfloat16 as BF16's integer conversions, on registers, two at a time: one register's worth
// of memory holds 2 * kWidth bf16 as kWidth 32-bit words of two (little-endian: the even
// element in the low half), so `x << 16` is the even elements as floats and
// `x & 0xFFFF0000` the odd ones, and the two rounded registers go back
// as `(even >> 16) | odd`: no widening, narrowing or permuting instruction.  The callers' math
// is lane by lane, so running it on the even and odd elements apart gives the same bits.
// Rounding is to nearest even, NaN -> 0x7FC0 (unless kNan is false).  AVX2 and AVX-512 only:
// the SSE2 loops stay g++'s, the reference of the code-path tests.
#if FASTSAM_VEC_BYTES >= 32
template <>
struct Lanes<BF16> {
  static constexpr bool kOk = true;
  using V = Vec<float>::type;
  static constexpr int64_t kWidth = int64_t(kVecBytes / sizeof(float));
  // f's bits rounded to bf16, in the upper half of each word (BF16::rounded, lane by lane)
  template <bool kNan = true>
  static U32 rounded(V f) {
    return round_high<kNan>(f) & 0xFFFF0000u;
  }
  // the same in the upper halves; the lower ones hold what is left of the rounding.  Without
  // kNan a NaN lane is not replaced by 0x7FC00000: one whose low half is zero (every NaN read
  // from bf16, and x86's default NaN 0xFFC00000) keeps its upper half, so stays NaN, but others
  // may round to an infinity or a zero (see note_nan)
  template <bool kNan = true>
  static U32 round_high(V f) {
    const U32 u = bitcast<U32>(f);
    const U32 r = u + 0x7FFFu + ((u >> 16) & 1u);
    if constexpr (kNan) return f != f ? U32{} + 0x7FC00000u : r;
    return r;
  }
  // The loops round their turns without the NaN select and note (note_nan) which lanes of their
  // results were NaN; a run of turns that saw one then has every NaN it stored replaced by 0x7FC0
  // (canonical_nans).  Same bits as the select: every NaN these loops meet has a zero low half
  // (bf16 inputs, x86's default NaN, scalars that are not NaN), so it rounds to a NaN, and a
  // number never rounds to a NaN; a NaN anywhere on the way (the update's rounded momentum
  // buffer included) reaches the results noted.
#if FASTSAM_VEC_BYTES == 64
  using NanSeen = __mmask16;
  static void note_nan(NanSeen& seen, V a, V b) {
    seen |= _mm512_cmp_ps_mask(bitcast<__m512>(a), bitcast<__m512>(b), _CMP_UNORD_Q);
  }
  static bool any(NanSeen seen) { return seen != 0; }
#else
  using NanSeen = __m256;
  static void note_nan(NanSeen& seen, V a, V b) {
    seen = _mm256_or_ps(seen, _mm256_cmp_ps(bitcast<__m256>(a), bitcast<__m256>(b), _CMP_UNORD_Q));
  }
  static bool any(NanSeen seen) { return !_mm256_testz_ps(seen, seen); }
#endif
  // every NaN of p[0, n) as c10 rounds one (0x7FC0); p may have been written with streaming stores
  static void canonical_nans(uint16_t* p, int64_t n) {
    _mm_sfence();
    for (int64_t j = 0; j < n; ++j)
      if ((p[j] & 0x7FFF) > 0x7F80) p[j] = 0x7FC0;
  }
  static constexpr bool kSelectsNan = true;
  // one register's worth of memory at p, as it is
  static U32 raw(const uint16_t* p) {
    U32 x;
    std::memcpy(&x, p, sizeof(x));
    return x;
  }
  static void split(U32 x, V& even, V& odd) {
    even = bitcast<V>(x << 16);
    odd = bitcast<V>(x & 0xFFFF0000u);
  }
  static void load2(const uint16_t* p, V& even, V& odd) { split(raw(p), even, odd); }
  template <bool kNan = true>
  static void store2(uint16_t* p, V even, V odd) {
    put(p, packed<kNan>(even, odd));
  }
  static void store2_exact(uint16_t* p, V even, V odd) { put(p, joined(bitcast<U32>(even), bitcast<U32>(odd))); }
  template <bool kNan = true>
  static void stream2(uint16_t* p, V even, V odd) {
    stream_store(p, packed<kNan>(even, odd));
  }
  // the 2 * kWidth rounded bf16 of even and odd, in memory order
  template <bool kNan = true>
  static U32 packed(V even, V odd) {
#if FASTSAM_VEC_BYTES == 32
    // the odd words from odd's rounding, the even ones from even's shifted down: one word blend
    // where a mask and an or would be two instructions
    const U32 lo = round_high<kNan>(even) >> 16, hi = round_high<kNan>(odd);
    return bitcast<U32>(_mm256_blend_epi16(bitcast<__m256i>(lo), bitcast<__m256i>(hi), 0xAA));
#else
    return joined(round_high<kNan>(even), rounded<kNan>(odd));
#endif
  }
  // bf16 bits in the upper halves of both; odd's lower halves zero
  static U32 joined(U32 even, U32 odd) { return (even >> 16) | odd; }
  static void put(uint16_t* p, U32 x) { std::memcpy(p, &x, sizeof(x)); }
  static void stream_raw(uint16_t* p, U32 x) { stream_store(p, x); }
  template <bool kNan>
  struct Rounding {  // the value store2<kNan> would write, as a float, in the register
    V operator()(V f) const { return bitcast<V>(rounded<kNan>(f)); }
  };
  using Round = Rounding<true>;
};
#endif
#endif

struct Loops {
  // Elements per block of the streamed paths: 2-8 KiB, in L1 next to the inputs.
  static constexpr int64_t kBlock = 1024;

  // dst <- src (bytes); with streaming (non-temporal) stores of this
  // instruction set's width when `stream` (the caller fences).
  static void copy(void* dst, const void* src, size_t bytes, bool stream) {
    auto* d = static_cast<char*>(dst);
    auto* s = static_cast<const char*>(src);
    size_t i = 0;
#if FASTSAM_X86
    if (stream) {
      constexpr size_t kW = kVecBytes;
      i = std::min(bytes, size_t(-reinterpret_cast<uintptr_t>(d) & (kW - 1)));
      std::memcpy(d, s, i);
      for (; i + kW <= bytes; i += kW) {
#if FASTSAM_VEC_BYTES == 64
        _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(s + i));
#elif FASTSAM_VEC_BYTES == 32
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
#else
        _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
#endif
      }
    }
#endif
    std::memcpy(d + i, s + i, bytes - i);
  }

  // ||g||^2 (or ||w g||^2) of one chunk in kLanes independent partial sums:
  // a fixed order (the result does not depend on the thread count or the
  // instruction set) that g++ vectorises without -ffast-math.
  //
  // Scaled accumulation: the sum runs in the storage's accumulation type
  // (float for 16/32-bit values), the loop that keeps up with memory.  Where a
  // finite gradient's squares overflow float, the chunk is summed again with
  // g scaled by 2^-80 and the sum scaled back by 2^160 in double: powers of two
  // are exact, so the result is the float sum's exact rescaling (a run on
  // g * 2^k and a run on g agree to the bit), and what the scaling pushes
  // below float's range could not move a sum beyond it.  ASAM's |w| * g can
  // overflow even then (|w| and g both beyond 2^64): a last pass in double.
  // A non-finite gradient pays the extra passes, on its skipped step only.
  template <class S, bool kAdaptive>
  static double sq_norm(const typename S::raw* __restrict__ g, const typename S::raw* __restrict__ w, int64_t n) {
    return sq_norm_beyond_float<S, kAdaptive>(sq_norm_lanes<S, typename S::acc, kAdaptive, false>(g, w, n), g, w, n);
  }

  // sq_norm given the float pass's result `fast`: the rescaled passes where it overflowed.
  template <class S, bool kAdaptive>
  static double sq_norm_beyond_float(double fast, const typename S::raw* __restrict__ g,
                                     const typename S::raw* __restrict__ w, int64_t n) {
    using acc = typename S::acc;
    if (std::isfinite(fast) || sizeof(acc) == sizeof(double)) return fast;
    const double rescaled = sq_norm_lanes<S, acc, kAdaptive, true>(g, w, n) * 0x1p160;
    if (std::isfinite(rescaled)) return rescaled;
    return sq_norm_lanes<S, double, kAdaptive, false>(g, w, n);
  }

  template <class S, class A, bool kAdaptive, bool kScaled>
  static double sq_norm_lanes(const typename S::raw* __restrict__ g, const typename S::raw* __restrict__ w,
                              int64_t n) {
    A lanes[kLanes] = {};
    const int64_t full = n / kLanes * kLanes;
    add_lanes<S, A, kAdaptive, kScaled>(g, w, full, lanes);
    return finish_lanes<S, A, kAdaptive, kScaled>(g + full, kAdaptive ? w + full : w, n - full, lanes);
  }

  template <class S, class A, bool kAdaptive, bool kScaled>
  static A sq_norm_term_of(typename S::raw gv, typename S::raw wv) {
    const A gs = A(S::load(gv));
    return sq_norm_term<A>(kScaled ? gs * A(0x1p-80) : gs, kAdaptive ? A(S::load(wv)) : A(0), kAdaptive);
  }

  // lanes[l] += the terms of elements l, l + kLanes, ... of g[0, n); n a multiple of kLanes.
  // The lanes live in a local copy: `lanes` may alias g as far as g++ knows, and the
  // loop vectorises only over registers it owns.
  template <class S, class A, bool kAdaptive, bool kScaled>
  static void add_lanes(const typename S::raw* __restrict__ g, const typename S::raw* __restrict__ w, int64_t n,
                        A* lanes) {
    A acc[kLanes];
    for (int l = 0; l < kLanes; ++l) acc[l] = lanes[l];
    for (int64_t j = 0; j < n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l)
        acc[l] += sq_norm_term_of<S, A, kAdaptive, kScaled>(g[j + l], kAdaptive ? w[j + l] : typename S::raw{});
    }
    for (int l = 0; l < kLanes; ++l) lanes[l] = acc[l];
  }

  // The sum of the lanes and of the last n < kLanes elements' terms, in a fixed order.
  template <class S, class A, bool kAdaptive, bool kScaled>
  static double finish_lanes(const typename S::raw* g, const typename S::raw* w, int64_t n, const A* lanes) {
    A tail = 0;
    for (int64_t j = 0; j < n; ++j)
      tail += sq_norm_term_of<S, A, kAdaptive, kScaled>(g[j], kAdaptive ? w[j] : typename S::raw{});
    double sum = double(tail);
    for (int l = 0; l < kLanes; ++l) sum += double(lanes[l]);
    return sum;
  }

  // sq_norm of k <= kGroup chunks (g[i], w[i], n[i]), into out[i], bit for bit what
  // sq_norm gives each: the chunks are read at once (bf16 on AVX2 and AVX-512 in lockstep phases,
  // add_lanes_bf16_phases; else in turns of kTurn elements each).
  // One stream of reads keeps too few cache lines in flight for one core to reach its
  // memory's bandwidth (benchmarks/NOTES.md, AVX2 machine); four streams come close.
  // kTurn is a multiple of kLanes, so every lane still sums its elements in order.
  static constexpr int kGroup = 4;
  static constexpr int64_t kTurn = 256;

  template <class S, bool kAdaptive>
  static void sq_norm_group(const typename S::raw* const* g, const typename S::raw* const* w, const int64_t* n,
                            int k, double* out) {
    using acc = typename S::acc;
    acc lanes[kGroup][kLanes] = {};
    int64_t full[kGroup] = {};
    int64_t longest = 0;
    for (int i = 0; i < k; ++i) {
      full[i] = n[i] / kLanes * kLanes;
      longest = full[i] > longest ? full[i] : longest;
    }
#if FASTSAM_X86 && FASTSAM_VEC_BYTES >= 32
    if constexpr (std::is_same_v<S, BF16>) {
      add_lanes_bf16_phases<kAdaptive>(g, w, full, k, lanes);
    } else
#endif
    {
      for (int64_t j = 0; j < longest; j += kTurn) {
        for (int i = 0; i < k; ++i) {
          const int64_t m = full[i] - j < kTurn ? full[i] - j : kTurn;
          if (m > 0) add_lanes<S, acc, kAdaptive, false>(g[i] + j, kAdaptive ? w[i] + j : nullptr, m, lanes[i]);
        }
      }
    }
    for (int i = 0; i < k; ++i) {
      const double fast = finish_lanes<S, acc, kAdaptive, false>(g[i] + full[i], kAdaptive ? w[i] + full[i] : nullptr,
                                                                  n[i] - full[i], lanes[i]);
      out[i] = sq_norm_beyond_float<S, kAdaptive>(fast, g[i], kAdaptive ? w[i] : nullptr, n[i]);
    }
  }

#if FASTSAM_X86 && FASTSAM_VEC_BYTES >= 32
  // add_lanes of bf16 for the k chunks of a group (elements [0, full[i]) of each) in phases: the
  // chunks with whole turns left run in lockstep for as many turns as all of them have, in one
  // call, so that their lanes stay in registers; then the next phase without the chunks that ran
  // out; what is left of each (less than a turn) in add_lanes.  Every lane adds its terms in
  // order, so the phases give add_lanes' bits.
  template <bool kAdaptive>
  static void add_lanes_bf16_phases(const uint16_t* const* g, const uint16_t* const* w, const int64_t* full, int k,
                                    float (*lanes)[kLanes]) {
    int64_t pos[kGroup] = {};
    for (;;) {
      int idx[kGroup];
      int a = 0;
      int64_t common = 0;
      for (int i = 0; i < k; ++i) {
        const int64_t left = full[i] - pos[i];
        if (left >= kTurn) {
          common = a == 0 || left < common ? left : common;
          idx[a++] = i;
        }
      }
      if (a == 0) break;
      common = common / kTurn * kTurn;
      const uint16_t* gs[kGroup];
      const uint16_t* ws[kGroup] = {};
      float ls[kGroup][kLanes];
      for (int q = 0; q < a; ++q) {
        gs[q] = g[idx[q]] + pos[idx[q]];
        if (kAdaptive) ws[q] = w[idx[q]] + pos[idx[q]];
        std::memcpy(ls[q], lanes[idx[q]], sizeof(ls[q]));
      }
      switch (a) {
        case 1: add_lanes_bf16<1, kAdaptive>(gs, ws, common, ls); break;
        case 2: add_lanes_bf16<2, kAdaptive>(gs, ws, common, ls); break;
        case 3: add_lanes_bf16<3, kAdaptive>(gs, ws, common, ls); break;
        default: add_lanes_bf16<4, kAdaptive>(gs, ws, common, ls); break;
      }
      for (int q = 0; q < a; ++q) {
        std::memcpy(lanes[idx[q]], ls[q], sizeof(ls[q]));
        pos[idx[q]] += common;
      }
    }
    for (int i = 0; i < k; ++i)
      if (pos[i] < full[i])
        add_lanes<BF16, float, kAdaptive, false>(g[i] + pos[i], kAdaptive ? w[i] + pos[i] : nullptr,
                                                 full[i] - pos[i], lanes[i]);
  }

  // add_lanes of bf16 (the float pass) for chunks g[0, K) at once, elements [0, m) of each,
  // m a multiple of kLanes = 16, on registers of 8 floats (AVX-512 too).  A 32-byte load holds one
  // element of each lane as words of two: `x << 16` is lanes 0, 2, .., 14 as floats and
  // `x & 0xFFFF0000` lanes 1, 3, .., 15, and each lane adds its terms in add_lanes' order (the
  // same bits).  g++ widens each element with shuffles that queue on two ports, and the chunks'
  // chains of additions overlap only where they run together.
  template <int K, bool kAdaptive>
  static void add_lanes_bf16(const uint16_t* const* g, const uint16_t* const* w, int64_t m, float (*lanes)[kLanes]) {
    static_assert(kLanes == 16, "one 32-byte load per turn of the lanes");
    typedef float F8 __attribute__((vector_size(32)));
    typedef uint32_t U8 __attribute__((vector_size(32)));
    F8 even[K], odd[K];
    for (int i = 0; i < K; ++i) {
      for (int l = 0; l < 8; ++l) {
        even[i][l] = lanes[i][2 * l];
        odd[i][l] = lanes[i][2 * l + 1];
      }
    }
    for (int64_t t = 0; t < m; t += kLanes) {
      for (int i = 0; i < K; ++i) {
        U8 x;
        std::memcpy(&x, g[i] + t, sizeof(x));
        F8 ge = bitcast<F8>(x << 16), go = bitcast<F8>(x & 0xFFFF0000u);
        if constexpr (kAdaptive) {  // sq_norm_term: (|w| * g)^2
          U8 y;
          std::memcpy(&y, w[i] + t, sizeof(y));
          ge = bitcast<F8>((y << 16) & 0x7FFFFFFFu) * ge;
          go = bitcast<F8>(y & 0x7FFF0000u) * go;
        }
        even[i] += ge * ge;
        odd[i] += go * go;
      }
    }
    for (int i = 0; i < K; ++i) {
      for (int l = 0; l < 8; ++l) {
        lanes[i][2 * l] = even[i][l];
        lanes[i][2 * l + 1] = odd[i][l];
      }
    }
  }
#endif

  // c <- p (the exact bits), then p <- p + e.
  template <class S, bool kAdaptive>
  static void perturb(typename S::raw* __restrict__ p, const typename S::raw* __restrict__ g,
                      typename S::raw* __restrict__ c, int64_t n, Scale<typename S::acc> scale, bool stream) {
    using acc = typename S::acc;
    // Within float's range lo is 1 (sam_math.h: split_scale): a loop where it is the constant 1, so
    // that the multiply by lo folds away and the loop is the one a plain float scale gives.
    if (scale.lo == acc(1)) return perturb_blocks<S, kAdaptive, true>(p, g, c, n, scale, stream);
    perturb_blocks<S, kAdaptive, false>(p, g, c, n, scale, stream);
  }

  template <class S, bool kAdaptive, bool kUnitLo>
  static void perturb_blocks(typename S::raw* __restrict__ p, const typename S::raw* __restrict__ g,
                             typename S::raw* __restrict__ c, int64_t n, Scale<typename S::acc> scale, bool stream) {
    using acc = typename S::acc;
    const Scale<acc> s{scale.hi, kUnitLo ? acc(1) : scale.lo};
#if FASTSAM_X86
    // bf16 on registers (as restore_sgd_vec): g++'s vectorisation of BF16's store is long; a
    // streamed fp32/fp64 copy on registers too, stored from the registers that loaded p (no
    // second pass over an L1 block: benchmarks/NOTES.md, change 25)
    if constexpr (Lanes<S>::kOk) {
      if (stream || !std::is_same_v<typename S::raw, acc>)
        return perturb_pairs<S, kAdaptive, kUnitLo>(p, g, c, n, scale, stream);
    }
#endif
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = n - b < kBlock ? n - b : kBlock;
      copy(c + b, p + b, m * sizeof(*p), stream);
      typename S::raw* __restrict__ pb = p + b;
      const typename S::raw* __restrict__ gb = g + b;
      for (int64_t j = 0; j < m; ++j) pb[j] = S::store(perturb_element<acc>(S::load(pb[j]), S::load(gb[j]), s, kAdaptive));
    }
  }

#if FASTSAM_X86
  // The 16-bit register loops (perturb_pairs, restore_sgd_pairs) of AVX2 ask for the line
  // kPrefetchBytes ahead of each list they read, every turn: on the AVX2 machine (Zen 3) the
  // hardware prefetchers alone kept too few lines in flight for them (benchmarks/NOTES.md, change
  // 22); the 4-byte loops and the norms showed no gain.  The AVX-512 loops do not: on Zen 4 the
  // prefetches slowed the perturbation and did not speed the update (change 24).  The address is
  // formed as an integer: it may lie past the list's end, where a prefetch is ignored.
  static constexpr uintptr_t kPrefetchBytes = FASTSAM_VEC_BYTES >= 64 ? 0 : 2048;
  FASTSAM_INLINE static void prefetch_ahead(const void* x) {
    if constexpr (kPrefetchBytes > 0)
      __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(x) + kPrefetchBytes));
  }

  // A register loop writing to d, then its scalar remainder: turns(kStream) runs the register
  // turns from j on (moving j past them), one loop per store kind, since a switch left in the
  // loop costs every turn; scalar(j) takes the elements they leave.  With `stream` the turns'
  // stores to d are streaming, which needs d + j aligned: the elements before d's first
  // kVecBytes-aligned address go to scalar(j) first, and where d is not even element-aligned the
  // scalar loop takes every element.  Inlined, so that j stays out of memory.
  template <class T, class F, class G>
  FASTSAM_INLINE static void turns_then_tail(const T* d, int64_t n, int64_t& j, bool stream, const F& scalar,
                                             const G& turns) {
    if (!stream) {
      turns(std::false_type{});
    } else {
      const int64_t head =
          std::min<int64_t>(n, int64_t((-reinterpret_cast<uintptr_t>(d) & (kVecBytes - 1)) / sizeof(T)));
      for (; j < head; ++j) scalar(j);
      if (reinterpret_cast<uintptr_t>(d + j) % kVecBytes == 0) turns(std::true_type{});
    }
    for (; j < n; ++j) scalar(j);
  }

  // perturb_blocks on registers, two per turn (Lanes): the restore copy leaves from the register
  // that loaded the parameters, so no pass of its own.  With `stream` its stores are streaming,
  // from c's first aligned address on (turns_then_tail); the elements after the last full pair
  // of registers take the scalar loop.
  template <class S, bool kAdaptive, bool kUnitLo>
  static void perturb_pairs(typename S::raw* __restrict__ p, const typename S::raw* __restrict__ g,
                            typename S::raw* __restrict__ c, int64_t n, Scale<typename S::acc> scale, bool stream) {
    using acc = typename S::acc;
    const Scale<acc> s{scale.hi, kUnitLo ? acc(1) : scale.lo};
    using R = Lanes<S>;
    using V = typename R::V;
    constexpr int64_t kW = R::kWidth;
    const auto scalar = [&](int64_t j) {
      c[j] = p[j];
      p[j] = S::store(perturb_element<acc>(S::load(p[j]), S::load(g[j]), s, kAdaptive));
    };
    int64_t j = 0;
    // The turns round without the NaN select (Lanes<BF16>::note_nan), which needs a scale that is
    // not NaN (its payload might round to a number): else every element takes the scalar loop.
    const bool numbers = !(std::isnan(s.hi) || std::isnan(s.lo));
    const auto turns = [&](auto kStream) FASTSAM_INLINE {
      if (R::kSelectsNan && !numbers) return;
      const int64_t j0 = j;
      typename R::NanSeen seen{};
      for (const int64_t last = n - 2 * kW; j <= last; j += 2 * kW) {
        if constexpr (sizeof(*p) == 2) {
          prefetch_ahead(p + j);
          prefetch_ahead(g + j);
        }
        const auto x = R::raw(p + j);
        V w[2], d[2];
        R::split(x, w[0], w[1]);
        R::load2(g + j, d[0], d[1]);
        for (int h = 0; h < 2; ++h) w[h] = perturb_element<acc, V>(w[h], d[h], s, kAdaptive);
        if constexpr (decltype(kStream)::value) {
          R::stream_raw(c + j, x);
        } else {
          // through an address g++ cannot follow: else it splits the copy out of the loop as a
          // memcpy of the whole chunk, a second pass over p
          typename S::raw* cj = c + j;
          asm("" : "+r"(cj));
          R::put(cj, x);
        }
        R::note_nan(seen, w[0], w[1]);
        R::template store2<!R::kSelectsNan>(p + j, w[0], w[1]);
      }
      if constexpr (R::kSelectsNan)
        if (__builtin_expect(R::any(seen), 0)) R::canonical_nans(p + j0, j - j0);
    };
    turns_then_tail(c, n, j, stream, scalar, turns);
  }
#endif

  // p <- src, then torch.optim.SGD's update of p.  `src` is the restore copy,
  // or p itself (nothing to restore: then never streamed).  The update's
  // switches (first step, nesterov, weight decay) become compile-time
  // constants first: left to g++, it unswitches a few of them and leaves the
  // 16-bit loops scalar.
  template <class S, bool kMomentum>
  static void restore_sgd(typename S::raw* p, const typename S::raw* src, const typename S::raw* __restrict__ g,
                          typename S::raw* __restrict__ buf, int64_t n, const SgdArgs<typename S::acc> a,
                          Scale<typename S::acc> signed_scale, bool stream) {
    const bool decay = a.decay;
    if constexpr (kMomentum) {
      switch ((a.first ? 4 : 0) | (a.nesterov ? 2 : 0) | (decay ? 1 : 0)) {
        case 0: return restore_sgd_fixed<S, true, false, false, false>(p, src, g, buf, n, a, signed_scale, stream);
        case 1: return restore_sgd_fixed<S, true, false, false, true>(p, src, g, buf, n, a, signed_scale, stream);
        case 2: return restore_sgd_fixed<S, true, false, true, false>(p, src, g, buf, n, a, signed_scale, stream);
        case 3: return restore_sgd_fixed<S, true, false, true, true>(p, src, g, buf, n, a, signed_scale, stream);
        case 4: return restore_sgd_fixed<S, true, true, false, false>(p, src, g, buf, n, a, signed_scale, stream);
        case 5: return restore_sgd_fixed<S, true, true, false, true>(p, src, g, buf, n, a, signed_scale, stream);
        case 6: return restore_sgd_fixed<S, true, true, true, false>(p, src, g, buf, n, a, signed_scale, stream);
        default: return restore_sgd_fixed<S, true, true, true, true>(p, src, g, buf, n, a, signed_scale, stream);
      }
    } else if (decay) {
      restore_sgd_fixed<S, false, false, false, true>(p, src, g, buf, n, a, signed_scale, stream);
    } else {
      restore_sgd_fixed<S, false, false, false, false>(p, src, g, buf, n, a, signed_scale, stream);
    }
  }

  // Whether an update loop that computes into an L1 block streams that block out: it pays only
  // where the loop waits on memory, not in the 16-bit loops g++ vectorises, which wait on their
  // conversions (benchmarks/NOTES.md).
  template <class S>
  static bool streams_through_block(bool stream) {
    return stream && sizeof(typename S::raw) >= 4;
  }

  // The update's switches as the constants of this instantiation, so that g++ drops the
  // branches they would take per element.
  template <class A, bool kFirst, bool kNesterov, bool kDecay>
  static SgdArgs<A> fixed_sgd_args(SgdArgs<A> a) {
    a.first = kFirst;
    a.nesterov = kNesterov;
    a.decay = kDecay;
    return a;
  }

  template <class S, bool kMomentum, bool kFirst, bool kNesterov, bool kDecay>
  static void restore_sgd_fixed(typename S::raw* p, const typename S::raw* src, const typename S::raw* __restrict__ g,
                                typename S::raw* __restrict__ buf, int64_t n, const SgdArgs<typename S::acc> args,
                                Scale<typename S::acc> signed_scale, bool stream) {
    using acc = typename S::acc;
    const SgdArgs<acc> a = fixed_sgd_args<acc, kFirst, kNesterov, kDecay>(args);
#if FASTSAM_X86
    // On registers: the streamed fp32/fp64 update (stores straight from them), and every
    // bfloat16 update (Lanes' conversions: g++'s own vectorisation of BF16's is longer,
    // benchmarks/NOTES.md).
    if constexpr (Lanes<S>::kOk) {
      if (stream || !std::is_same_v<typename S::raw, acc>)
        return restore_sgd_vec<S, kMomentum, kFirst, kNesterov, kDecay>(p, src, g, buf, n, args, signed_scale, stream);
    }
#endif
    stream = streams_through_block<S>(stream);
    typename S::raw tmp[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = n - b < kBlock ? n - b : kBlock;
      typename S::raw* dst = stream ? tmp : p + b;  // may be src + b (no restore): read before written
      for (int64_t j = 0; j < m; ++j) {
        acc w = S::load(src[b + j]);
        acc bj = kMomentum ? S::load(buf[b + j]) : acc(0);
        sgd_element<acc, kMomentum>(w, sam_grad<acc>(S::load(g[b + j]), signed_scale), bj, a, typename S::Round{});
        dst[j] = S::store(w);
        if (kMomentum) buf[b + j] = S::store(bj);
      }
      if (stream) copy(p + b, tmp, m * sizeof(*p), true);
    }
  }

#if FASTSAM_X86
  // restore_sgd_fixed's loop on registers of values: sgd_element on g++'s vector extensions
  // (the same operations lane by lane, hence the same bits), two registers per turn (Lanes).
  // With `stream` p is written with streaming stores straight from the registers, which spares
  // an L1 block and its second pass (benchmarks/NOTES.md: change 4); the elements before p's
  // first aligned address then take the scalar loop, as do those after the last full pair of
  // registers.
  template <class S, bool kMomentum, bool kFirst, bool kNesterov, bool kDecay>
  static void restore_sgd_vec(typename S::raw* p, const typename S::raw* src, const typename S::raw* __restrict__ g,
                              typename S::raw* __restrict__ buf, int64_t n, const SgdArgs<typename S::acc> args,
                              Scale<typename S::acc> signed_scale, bool stream) {
    // lo is 1 within float's range (sam_math.h: split_scale), 1 - dampening is 1 unless the user
    // sets a dampening, and hi too without clipping, a GradScaler or maximize: loops where these
    // are the constant 1, which folds their multiplies away (x * 1 is x, bit for bit)
    using acc = typename S::acc;
    if (signed_scale.lo == acc(1) && (!kMomentum || args.one_minus_dampening == acc(1))) {
      if (signed_scale.hi == acc(1))
        return restore_sgd_pairs<S, kMomentum, kFirst, kNesterov, kDecay, kOnesAll>(p, src, g, buf, n, args,
                                                                                    signed_scale, stream);
      return restore_sgd_pairs<S, kMomentum, kFirst, kNesterov, kDecay, kOnesLo>(p, src, g, buf, n, args, signed_scale,
                                                                                stream);
    }
    restore_sgd_pairs<S, kMomentum, kFirst, kNesterov, kDecay, kOnesNone>(p, src, g, buf, n, args, signed_scale,
                                                                         stream);
  }

  // Which of the update's factors restore_sgd_pairs takes as the constant 1.
  static constexpr int kOnesNone = 0;  // none
  static constexpr int kOnesLo = 1;    // the scale's lo and 1 - dampening
  static constexpr int kOnesAll = 2;   // those and the scale's hi: the gradient as it is

  template <class S, bool kMomentum, bool kFirst, bool kNesterov, bool kDecay, int kOnes>
  static void restore_sgd_pairs(typename S::raw* p, const typename S::raw* src, const typename S::raw* __restrict__ g,
                                typename S::raw* __restrict__ buf, int64_t n, const SgdArgs<typename S::acc> args,
                                Scale<typename S::acc> signed_scale, bool stream) {
    using acc = typename S::acc;
    using R = Lanes<S>;
    using V = typename R::V;
    constexpr int64_t kW = R::kWidth;
    SgdArgs<acc> a = fixed_sgd_args<acc, kFirst, kNesterov, kDecay>(args);
    if (kOnes >= kOnesLo) a.one_minus_dampening = acc(1);
    const Scale<acc> gs{kOnes == kOnesAll ? acc(1) : signed_scale.hi, kOnes >= kOnesLo ? acc(1) : signed_scale.lo};
    const auto scalar = [&](int64_t j) {
      acc w = S::load(src[j]);
      acc bj = kMomentum ? S::load(buf[j]) : acc(0);
      sgd_element<acc, kMomentum>(w, sam_grad<acc>(S::load(g[j]), gs), bj, a, typename S::Round{});
      p[j] = S::store(w);
      if (kMomentum) buf[j] = S::store(bj);
    };
    int64_t j = 0;
    // The turns round without the NaN select (Lanes<BF16>::note_nan): a NaN anywhere on the way
    // (gradient, decay term, buffer) reaches the new parameters.  That needs scalars that are not
    // NaN (a NaN scalar's payload might round to a number in the buffer): else every element
    // takes the scalar loop.
    const bool numbers = !(std::isnan(a.lr) || std::isnan(a.momentum) || std::isnan(a.one_minus_dampening) ||
                           std::isnan(a.weight_decay) || std::isnan(gs.hi) || std::isnan(gs.lo));
    constexpr bool kSelect = !R::kSelectsNan;  // the rounding's NaN select, where it costs nothing
    const auto turns = [&](auto kStream) FASTSAM_INLINE {
      if (R::kSelectsNan && !numbers) return;  // every element in the scalar loop
      const int64_t j0 = j;
      typename R::NanSeen seen{};
      for (const int64_t last = n - 2 * kW; j <= last; j += 2 * kW) {
        if constexpr (sizeof(*p) == 2) {
          prefetch_ahead(src + j);
          prefetch_ahead(g + j);
          if (kMomentum) prefetch_ahead(buf + j);
        }
        V w[2], d[2], bj[2] = {};
        R::load2(src + j, w[0], w[1]);
        R::load2(g + j, d[0], d[1]);
        if (kMomentum) R::load2(buf + j, bj[0], bj[1]);
        for (int h = 0; h < 2; ++h)
          sgd_element<acc, kMomentum>(w[h], sam_grad<acc, V>(d[h], gs), bj[h], a,
                                      typename R::template Rounding<kSelect>{});
        R::note_nan(seen, w[0], w[1]);
        if constexpr (decltype(kStream)::value) {
          R::template stream2<kSelect>(p + j, w[0], w[1]);
        } else {
          R::template store2<kSelect>(p + j, w[0], w[1]);
        }
        if (kMomentum) R::store2_exact(buf + j, bj[0], bj[1]);  // sgd_element stored Round's value in it
      }
      if constexpr (R::kSelectsNan) {
        if (__builtin_expect(R::any(seen), 0)) {
          R::canonical_nans(p + j0, j - j0);
          if (kMomentum) R::canonical_nans(buf + j0, j - j0);
        }
      }
    };
    turns_then_tail(p, n, j, stream, scalar, turns);
  }
#endif

  // p <- src, then torch.optim.Adam's (AdamW's) update; its switches become
  // constants as in restore_sgd.
  template <class S>
  static void restore_adam(typename S::raw* p, const typename S::raw* src, const typename S::raw* __restrict__ g,
                           typename S::raw* __restrict__ m1, typename S::raw* __restrict__ m2, int64_t n,
                           const AdamArgs<typename S::acc> a, typename S::acc step_size, typename S::acc bc2_sqrt,
                           Scale<typename S::acc> signed_scale, bool stream) {
    switch ((a.l2 ? 2 : 0) | (a.lerp_low ? 1 : 0)) {
      case 0: return restore_adam_fixed<S, false, false>(p, src, g, m1, m2, n, a, step_size, bc2_sqrt, signed_scale, stream);
      case 1: return restore_adam_fixed<S, false, true>(p, src, g, m1, m2, n, a, step_size, bc2_sqrt, signed_scale, stream);
      case 2: return restore_adam_fixed<S, true, false>(p, src, g, m1, m2, n, a, step_size, bc2_sqrt, signed_scale, stream);
      default: return restore_adam_fixed<S, true, true>(p, src, g, m1, m2, n, a, step_size, bc2_sqrt, signed_scale, stream);
    }
  }

  template <class S, bool kL2, bool kLerpLow>
  static void restore_adam_fixed(typename S::raw* p, const typename S::raw* src, const typename S::raw* __restrict__ g,
                                 typename S::raw* __restrict__ m1, typename S::raw* __restrict__ m2, int64_t n,
                                 const AdamArgs<typename S::acc> args, typename S::acc step_size,
                                 typename S::acc bc2_sqrt, Scale<typename S::acc> signed_scale, bool stream) {
    using acc = typename S::acc;
    AdamArgs<acc> a = args;
    a.l2 = kL2;
    a.lerp_low = kLerpLow;
    stream = streams_through_block<S>(stream);
    typename S::raw tmp[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = n - b < kBlock ? n - b : kBlock;
      typename S::raw* dst = stream ? tmp : p + b;
      for (int64_t j = 0; j < m; ++j) {
        acc w = S::load(src[b + j]);
        acc mj = S::load(m1[b + j]);
        acc vj = S::load(m2[b + j]);
        adam_element<acc>(w, sam_grad<acc>(S::load(g[b + j]), signed_scale), mj, vj, a, step_size, bc2_sqrt,
                          typename S::Round{});
        dst[j] = S::store(w);
        m1[b + j] = S::store(mj);
        m2[b + j] = S::store(vj);
      }
      if (stream) copy(p + b, tmp, m * sizeof(*p), true);
    }
  }

  // [<x, y>, ||x||^2, ||y||^2] of one chunk, in kLanes double partial sums each:
  // the variants' projections take differences of these sums, where a float
  // sum's rounding would show (sq_norm's rescaled float sums would not do here).
  template <class S>
  static void dot_sq_norms(const typename S::raw* __restrict__ x, const typename S::raw* __restrict__ y, int64_t n,
                           double* out3) {
    double xy[kLanes] = {}, xx[kLanes] = {}, yy[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l)
        dot_sq_norms_terms(double(S::load(x[j + l])), double(S::load(y[j + l])), xy[l], xx[l], yy[l]);
    }
    double a = 0, b = 0, c = 0;
    for (; j < n; ++j) dot_sq_norms_terms(double(S::load(x[j])), double(S::load(y[j])), a, b, c);
    for (int l = 0; l < kLanes; ++l) {
      a += xy[l];
      b += xx[l];
      c += yy[l];
    }
    out3[0] = a;
    out3[1] = b;
    out3[2] = c;
  }

  // `out` may be `x` or `y` (no restrict on it): each element is read before it is written.
  template <class S>
  static void axpby(const typename S::raw* x, const typename S::raw* y, typename S::raw* out, int64_t n,
                    typename S::acc a, typename S::acc b) {
    for (int64_t j = 0; j < n; ++j) out[j] = S::store(axpby_element<typename S::acc>(S::load(x[j]), S::load(y[j]), a, b));
  }
};
