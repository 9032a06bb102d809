// The element loops of the CPU twin, written once and compiled once per
// instruction set.
//
// sam_cpu.cpp includes this file three times, each inside its own namespace
// (isa_base, isa_avx2, isa_avx512) and under its own `#pragma GCC target`, so
// that g++ vectorises the same source for SSE2, AVX2 and AVX-512; the op picks
// one at run time (no -march flag: the .so runs on any x86-64).  Hence no
// include guard and no includes: sam_cpu.cpp provides the storage policies
// (S::raw, S::acc, S::load, S::store, S::Round) and sam_math.h.
//
// Every function handles one chunk: plain indexed loops over restrict
// pointers with the configuration in template parameters, which g++ -O3
// vectorises (the 16-bit policies convert with integer ops that vectorise
// too).  A write-only destination goes through an L1-resident block and
// copy() when the caller asks for streaming stores: a large list is then
// written without first being read into the cache (a third less traffic
// for a copy).

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
#if defined(__AVX512F__)
      constexpr size_t kW = 64;
#elif defined(__AVX2__)
      constexpr size_t kW = 32;
#else
      constexpr size_t kW = 16;
#endif
      i = std::min(bytes, size_t(-reinterpret_cast<uintptr_t>(d) & (kW - 1)));
      std::memcpy(d, s, i);
      for (; i + kW <= bytes; i += kW) {
#if defined(__AVX512F__)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(s + i));
#elif defined(__AVX2__)
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
    using acc = typename S::acc;
    const double fast = sq_norm_lanes<S, acc, kAdaptive, false>(g, w, n);
    if (std::isfinite(fast) || sizeof(acc) == sizeof(double)) return fast;
    const double rescaled = sq_norm_lanes<S, acc, kAdaptive, true>(g, w, n) * 0x1p160;
    if (std::isfinite(rescaled)) return rescaled;
    return sq_norm_lanes<S, double, kAdaptive, false>(g, w, n);
  }

  template <class S, class A, bool kAdaptive, bool kScaled>
  static double sq_norm_lanes(const typename S::raw* __restrict__ g, const typename S::raw* __restrict__ w,
                              int64_t n) {
    const auto term = [](A gv, A wv) { return sq_norm_term<A>(kScaled ? gv * A(0x1p-80) : gv, wv, kAdaptive); };
    A lanes[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += term(A(S::load(g[j + l])), kAdaptive ? A(S::load(w[j + l])) : A(0));
    }
    A tail = 0;
    for (; j < n; ++j) tail += term(A(S::load(g[j])), kAdaptive ? A(S::load(w[j])) : A(0));
    double sum = double(tail);
    for (int l = 0; l < kLanes; ++l) sum += double(lanes[l]);
    return sum;
  }

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
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = n - b < kBlock ? n - b : kBlock;
      copy(c + b, p + b, m * sizeof(*p), stream);
      typename S::raw* __restrict__ pb = p + b;
      const typename S::raw* __restrict__ gb = g + b;
      for (int64_t j = 0; j < m; ++j) pb[j] = S::store(perturb_element<acc>(S::load(pb[j]), S::load(gb[j]), s,
                                                                             kAdaptive));
    }
  }

  // p <- src, then torch.optim.SGD's update of p.  `src` is the restore copy,
  // or p itself (nothing to restore: then never streamed).  The update's
  // switches (first step, nesterov, weight decay) become compile-time
  // constants first: left to g++, it unswitches a few of them and leaves the
  // 16-bit loops scalar.
  template <class S, bool kMomentum>
  static void restore_sgd(typename S::raw* p, const typename S::raw* src, const typename S::raw* __restrict__ g,
                          typename S::raw* __restrict__ buf, int64_t n, const SgdArgs<typename S::acc> a,
                          Scale<typename S::acc> signed_scale, bool stream) {
    const bool decay = a.weight_decay != typename S::acc(0);
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

  template <class S, bool kMomentum, bool kFirst, bool kNesterov, bool kDecay>
  static void restore_sgd_fixed(typename S::raw* p, const typename S::raw* src, const typename S::raw* __restrict__ g,
                                typename S::raw* __restrict__ buf, int64_t n, const SgdArgs<typename S::acc> args,
                                Scale<typename S::acc> signed_scale, bool stream) {
    using acc = typename S::acc;
    SgdArgs<acc> a = args;
    a.first = kFirst;
    a.nesterov = kNesterov;
    if (!kDecay) a.weight_decay = acc(0);
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
