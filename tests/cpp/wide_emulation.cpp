// The CPU twin's 64-byte (AVX-512) loops, run on a CPU without AVX-512: the loops compiled for
// AVX2 with FASTSAM_VEC_BYTES 64 (g++'s 64-byte vector extensions split into AVX2 pairs, lane by
// lane the same operations) and the 512-bit intrinsics they call emulated, the streaming store
// aborting where the real one would fault (an address not 64-byte aligned).  Every loop's result
// is compared bit for bit with the base (SSE2) loops' over random sizes, offsets, edge values and
// options.  Built and run by tests/test_cpp_wide_emulation.py; exits 1 on a difference.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#define FASTSAM_X86 1
#include "sam_math.h"

namespace fastsam {
constexpr int kLanes = 16;  // as sam_cpu.cpp
#include "sam_storage.h"

namespace isa_base {
#define FASTSAM_VEC_BYTES 16
#include "sam_cpu_loops.h"
#undef FASTSAM_VEC_BYTES
}  // namespace isa_base

inline void emulated_stream(void* p, __m512i x) {
  if (reinterpret_cast<uintptr_t>(p) % 64 != 0) {
    std::fprintf(stderr, "streaming store to %p: not 64-byte aligned\n", p);
    std::abort();
  }
  std::memcpy(p, &x, sizeof(x));
}
inline __m512i emulated_load(const void* p) {
  __m512i x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline __mmask16 emulated_cmp_ps_mask(__m512 a, __m512 b, int predicate) {
  if (predicate != _CMP_UNORD_Q) {
    std::fprintf(stderr, "_mm512_cmp_ps_mask: predicate %d not emulated\n", predicate);
    std::abort();
  }
  float x[16], y[16];
  std::memcpy(x, &a, sizeof(x));
  std::memcpy(y, &b, sizeof(y));
  __mmask16 m = 0;
  for (int i = 0; i < 16; ++i) m |= __mmask16((std::isnan(x[i]) || std::isnan(y[i])) << i);
  return m;
}
#define _mm512_stream_si512(p, x) emulated_stream(p, x)
#define _mm512_loadu_si512(p) emulated_load(p)
#define _mm512_cmp_ps_mask(a, b, predicate) emulated_cmp_ps_mask(a, b, predicate)

#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_wide {
#define FASTSAM_VEC_BYTES 64
#include "sam_cpu_loops.h"
#undef FASTSAM_VEC_BYTES
}  // namespace isa_wide
#pragma GCC pop_options
}  // namespace fastsam

using namespace fastsam;
namespace {
std::mt19937 rng(20261207);
long checks = 0, differ = 0;

float value() {  // normal values, and now and then an edge
  static std::normal_distribution<float> normal;
  switch (rng() % 64) {
    case 0: return NAN;
    case 1: return -0.0f;
    case 2: return INFINITY;
    case 3: return 1e-40f;  // subnormal
    case 4: return 3e38f;
    default: return normal(rng);
  }
}

template <class S>
std::vector<typename S::raw> list(int64_t n, bool positive = false) {
  std::vector<typename S::raw> v(n + 64);  // room for an offset of up to 63 elements
  for (auto& x : v) {
    const float f = value();
    x = S::store(typename S::acc(positive ? std::fabs(f) + 0.1f : f));
    // now and then a NaN no store gives: negative with a payload, or signaling
    if constexpr (std::is_same_v<S, BF16>) {
      if (!positive && rng() % 97 == 0) x = rng() % 2 ? 0xFFC1 : 0x7F81;
    }
  }
  return v;
}

// A double NaN that becomes the float NaN 0x7FFFFFFF (its payload fills the low half), negated
// when `negative`: a scalar whose NaN an unselected bf16 rounding would turn into a number.
double nan_payload(bool negative) {
  const uint64_t bits = (negative ? 0xFFFFFFFFE0000000ull : 0x7FFFFFFFE0000000ull);
  double d;
  std::memcpy(&d, &bits, sizeof(d));
  return d;
}

// Bit for bit, except that two NaNs of float or double storage match whatever their sign and
// payload: which operand's NaN an operation returns is the compiler's choice of operand order
// (bf16 stores give every NaN as 0x7FC0, so there the bits must match).
template <class T>
bool same_element(T x, T y) {
  if (std::memcmp(&x, &y, sizeof(x)) == 0) return true;
  if constexpr (std::is_floating_point_v<T>) return std::isnan(x) && std::isnan(y);
  return false;
}

template <class T>
void same(const std::vector<T>& a, const std::vector<T>& b, const char* what, int64_t n, bool stream) {
  ++checks;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!same_element(a[i], b[i])) {
      ++differ;
      std::printf("%s differs: %d-byte elements, n=%ld, stream=%d, first at %zu\n", what, int(sizeof(T)), long(n),
                  int(stream), i);
      return;
    }
  }
}

template <class S>
void trial(int64_t n, bool stream) {
  using acc = typename S::acc;
  const int op = rng() % 64, og = rng() % 64, oc = rng() % 64, ob = rng() % 64;
  const auto p0 = list<S>(n), g = list<S>(n), c0 = list<S>(n), b0 = list<S>(n), v0 = list<S>(n, true);
  const Scale<acc> scales[] = {{acc(0.37), acc(1)}, {acc(0x1p100), acc(0x1p-100)}};
  const Scale<acc> sc = scales[rng() % 2];

  // the norm: groups of 1-4 chunks at offsets of their own, ASAM too
  for (int adaptive = 0; adaptive < 2; ++adaptive) {
    const int k = 1 + rng() % 4;
    const typename S::raw* gs[4];
    const typename S::raw* ws[4];
    int64_t ns[4];
    for (int i = 0; i < k; ++i) {
      ns[i] = i == 0 ? n : n - int64_t(rng() % (n + 1));
      gs[i] = g.data() + (op + i) % 64;
      ws[i] = p0.data() + (og + i) % 64;
    }
    std::vector<double> a(k), b(k);
    if (adaptive) {
      isa_base::Loops::sq_norm_group<S, true>(gs, ws, ns, k, a.data());
      isa_wide::Loops::sq_norm_group<S, true>(gs, ws, ns, k, b.data());
    } else {
      isa_base::Loops::sq_norm_group<S, false>(gs, ws, ns, k, a.data());
      isa_wide::Loops::sq_norm_group<S, false>(gs, ws, ns, k, b.data());
    }
    same(a, b, "sq_norm_group", n, stream);
  }

  // the perturbation and its restore copy; now and then a scale that is a NaN with a payload
  for (int adaptive = 0; adaptive < 2; ++adaptive) {
    auto p1 = p0, c1 = c0, p2 = p0, c2 = c0;
    const Scale<acc> ps = rng() % 8 == 0 ? Scale<acc>{acc(nan_payload(rng() % 2)), acc(1)} : sc;
    if (adaptive) {
      isa_base::Loops::perturb<S, true>(p1.data() + op, g.data() + og, c1.data() + oc, n, ps, false);
      isa_wide::Loops::perturb<S, true>(p2.data() + op, g.data() + og, c2.data() + oc, n, ps, stream);
    } else {
      isa_base::Loops::perturb<S, false>(p1.data() + op, g.data() + og, c1.data() + oc, n, ps, false);
      isa_wide::Loops::perturb<S, false>(p2.data() + op, g.data() + og, c2.data() + oc, n, ps, stream);
    }
    same(p1, p2, "perturb (params)", n, stream);
    same(c1, c2, "perturb (copies)", n, stream);
  }

  // a plain copy (the restore)
  {
    auto c1 = c0, c2 = c0;
    isa_base::Loops::copy(c1.data() + oc, p0.data() + op, n * sizeof(p0[0]), false);
    isa_wide::Loops::copy(c2.data() + oc, p0.data() + op, n * sizeof(p0[0]), stream);
    same(c1, c2, "copy", n, stream);
  }

  // restore + SGD: every switch, with and without momentum, dampening 0 and 0.1, restoring or not;
  // now and then a NaN scalar with a payload (momentum, weight decay or the gradient's scale)
  for (int cfg = 0; cfg < 16; ++cfg) {
    const bool first = cfg & 1, nesterov = cfg & 2, decay = cfg & 4, momentum = cfg & 8;
    const double dampening = nesterov || rng() % 2 ? 0.0 : 0.1;
    const int nan_scalar = rng() % 8;  // 1: momentum, 2: weight decay, 3: scale; else none
    const SgdArgs<acc> a = make_sgd_args<acc>(0.1, nan_scalar == 1 ? nan_payload(false) : 0.9, dampening,
                                              nan_scalar == 2 ? nan_payload(false) : decay ? 5e-4 : 0.0, nesterov,
                                              first);
    const Scale<acc> ss = nan_scalar == 3 ? Scale<acc>{acc(nan_payload(rng() % 2)), acc(1)} : sc;
    const bool restore = rng() % 2;
    auto p1 = p0, b1 = b0, p2 = p0, b2 = b0;
    const typename S::raw* src1 = restore ? c0.data() + oc : p1.data() + op;
    const typename S::raw* src2 = restore ? c0.data() + oc : p2.data() + op;
    const bool s = restore && stream;  // nothing to restore: never streamed (sam_cpu_loops.h)
    if (momentum) {
      isa_base::Loops::restore_sgd<S, true>(p1.data() + op, src1, g.data() + og, b1.data() + ob, n, a, ss, false);
      isa_wide::Loops::restore_sgd<S, true>(p2.data() + op, src2, g.data() + og, b2.data() + ob, n, a, ss, s);
    } else {
      isa_base::Loops::restore_sgd<S, false>(p1.data() + op, src1, g.data() + og, b1.data() + ob, n, a, ss, false);
      isa_wide::Loops::restore_sgd<S, false>(p2.data() + op, src2, g.data() + og, b2.data() + ob, n, a, ss, s);
    }
    same(p1, p2, "restore_sgd (params)", n, s);
    same(b1, b2, "restore_sgd (momentum)", n, s);
  }

  // restore + Adam / AdamW
  for (int decoupled = 0; decoupled < 2; ++decoupled) {
    const AdamArgs<acc> a = make_adam_args<acc>(1e-3, 0.9, 0.999, 1e-8, 1e-2, decoupled);
    double step_size, bc2_sqrt;
    adam_bias_terms(3.0, 1e-3, 0.9, 0.999, &step_size, &bc2_sqrt);
    auto p1 = p0, m1 = b0, v1 = v0, p2 = p0, m2 = b0, v2 = v0;
    isa_base::Loops::restore_adam<S>(p1.data() + op, c0.data() + oc, g.data() + og, m1.data() + ob, v1.data() + ob, n,
                                     a, acc(step_size), acc(bc2_sqrt), sc, false);
    isa_wide::Loops::restore_adam<S>(p2.data() + op, c0.data() + oc, g.data() + og, m2.data() + ob, v2.data() + ob, n,
                                     a, acc(step_size), acc(bc2_sqrt), sc, stream);
    same(p1, p2, "restore_adam (params)", n, stream);
    same(m1, m2, "restore_adam (exp_avg)", n, stream);
    same(v1, v2, "restore_adam (exp_avg_sq)", n, stream);
  }
}
}  // namespace

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 150;
  for (int t = 0; t < trials; ++t) {
    const int64_t n = t < 8 ? t : int64_t(rng() % 5000);
    const bool stream = rng() % 2;
    trial<BF16>(n, stream);
    trial<Plain<float>>(n, stream);
    trial<Plain<double>>(n, stream);
  }
  std::printf("%ld comparisons, %ld differ\n", checks, differ);
  return differ != 0;
}
