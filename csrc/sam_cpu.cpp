// The CPU twin of the CUDA kernels: the same ops over the same tensor lists,
// with the per-element math from sam_math.h.
//
// Work is cut like the CUDA launcher cuts it: every tensor into chunks of
// kChunk elements.  Threads take contiguous runs of chunks holding about
// equal numbers of elements, and a call too small to share runs on the
// calling thread.  Each op makes one pass over memory: a chunk's elements are
// loaded once, updated in registers and stored once.
//
// The element loops (sam_cpu_loops.h) are compiled three times, for SSE2,
// AVX2 and AVX-512, and the code path (those three, or avx512-zen4: the
// AVX-512 loops with float32's step loops on AVX2) is chosen at run time from the
// CPU (capped by ATEN_CPU_CAPABILITY, as torch's own kernels are): the .so
// carries no -march flag and runs on any x86-64.  Every path gives the same
// bits (no contraction into FMA: -ffp-contract=off; the same summation
// order).  Write-only lists of at least g_stream_bytes (the restore copy in
// perturb, the parameters in a restoring step where its loop has a streamed
// path: sam_cpu_loops.h) are written with streaming stores: they are not read
// before the next pass, and a list that large would leave the cache before
// then anyway.
//
// The skip flag, scale and grad_scale are read on the host: on the CPU that
// costs nothing (the contract allows it), and it lets a skipped step do only
// the copy.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

// The per-instruction-set builds need g++'s `#pragma GCC target`; other
// compilers and CPUs get the base loops only (same results, slower).
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define FASTSAM_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define FASTSAM_X86 0
#endif

#include "sam_checks.h"
#include "sam_math.h"

namespace fastsam {
namespace {  // internal linkage: direct calls, and no symbol another build of the extension could shadow

// 32768 elements (128 KiB of fp32 per list) keeps a chunk's 3-5 lists in L2
// and gives the threads of a ResNet-18 step ~350 chunks to share.
constexpr int64_t kChunk = 32768;
// Independent partial sums per chunk in the norms: lets g++ vectorise the
// reduction without -ffast-math, and fixes the summation order.
constexpr int kLanes = 16;
// A call with fewer elements runs on one thread: waking a second costs more
// than the work it would take over.
constexpr int64_t kGrain = 1 << 16;

// ---------------------------------------------------------------- storage policies
#include "sam_storage.h"

// ---------------------------------------------------------------- the loops, per instruction set
namespace isa_base {
#define FASTSAM_VEC_BYTES 16
#include "sam_cpu_loops.h"
#undef FASTSAM_VEC_BYTES
}  // namespace isa_base

#if FASTSAM_X86
#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_avx2 {
#define FASTSAM_VEC_BYTES 32
#include "sam_cpu_loops.h"
#undef FASTSAM_VEC_BYTES
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
namespace isa_avx512 {
#define FASTSAM_VEC_BYTES 64
#include "sam_cpu_loops.h"
#undef FASTSAM_VEC_BYTES
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

// avx512-zen4: the AVX-512 loops, except the float32 norm, perturbation, restore + SGD and restore +
// Adam, which take the AVX2 loops (with_loops_of).  AMD's Zen 4 runs a 512-bit operation as two
// 256-bit halves, and those ran slower on its 512-bit loops (benchmarks/NOTES.md, changes 23, 25
// and 26); Zen 5, with whole 512-bit units, is unmeasured and keeps avx512.  Every path gives the
// same bits.
enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Zen4 = 3 };
constexpr int kIsas = 4;
const char* const kIsaNames[kIsas] = {"base", "avx2", "avx512", "avx512-zen4"};

// The best instruction set this CPU (and its OS) runs.
int cpu_isa() {
  int best = kBase;
#if FASTSAM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) best = kAvx2;
  if (best == kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = kAvx512;
#endif
  return best;
}

// AMD family 19h (Zen 3 and Zen 4; of these only Zen 4 has AVX-512).
bool amd_family_19h() {
#if FASTSAM_X86
  if (!__builtin_cpu_is("amd")) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  return ((a >> 8) & 0xF) + ((a >> 20) & 0xFF) == 0x19;
#else
  return false;
#endif
}

// Whether this CPU runs a code path's loops.
bool runs(int isa) { return isa == kAvx512Zen4 ? cpu_isa() >= kAvx512 : isa <= cpu_isa(); }

// The default: the CPU's best (avx512-zen4 on Zen 4), capped by ATEN_CPU_CAPABILITY as torch's
// own kernels are.
int detect_isa() {
  int best = cpu_isa();
  if (best == kAvx512 && amd_family_19h()) best = kAvx512Zen4;
  if (const char* cap = std::getenv("ATEN_CPU_CAPABILITY")) {
    const std::string c(cap);
    if (c == "default") best = kBase;
    if (c == "avx2") best = std::min(best, int(kAvx2));
  }
  return best;
}

std::atomic<int> g_isa{-1};
// Streaming stores for write-only lists of at least this many bytes.
std::atomic<int64_t> g_stream_bytes{int64_t(16) << 20};

int active_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = detect_isa();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

// f(Loops{}) with the Loops of the active instruction set.
template <typename F>
void with_loops(const F& f) {
  switch (active_isa()) {
#if FASTSAM_X86
    case kAvx512:
    case kAvx512Zen4:
      return f(isa_avx512::Loops{});
    case kAvx2:
      return f(isa_avx2::Loops{});
#endif
    default:
      return f(isa_base::Loops{});
  }
}

// f(Policy{}) for the lists' dtype.
template <typename F>
void with_storage(at::ScalarType dtype, const char* op, const F& f) {
  switch (dtype) {
    case at::kFloat:
      return f(Plain<float>{});
    case at::kDouble:
      return f(Plain<double>{});
    case at::kBFloat16:
      return f(BF16{});
    case at::kHalf:
      return f(F16{});
    default:
      TORCH_CHECK(false, "fastsam::", op, ": dtype ", dtype, " is not supported");
  }
}

// with_loops for the float32 norm, perturbation, restore + SGD and restore + Adam of storage S: the
// AVX2 loops on avx512-zen4.
template <typename S, typename F>
void with_loops_of(const F& f) {
#if FASTSAM_X86
  if constexpr (std::is_same_v<S, Plain<float>>) {
    if (active_isa() == kAvx512Zen4) return f(isa_avx2::Loops{});
  }
#endif
  with_loops(f);
}

// ---------------------------------------------------------------- work division
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct Work {
  std::vector<Chunk> chunks;
  std::vector<int64_t> start;  // flat index of each chunk's first element
  int64_t total = 0;
  int64_t bytes = 0;  // of one list
  int64_t element_size = 0;

  explicit Work(at::TensorList tensors) {
    for (size_t t = 0; t < tensors.size(); ++t) {
      const int64_t n = tensors[t].numel();
      for (int64_t b = 0; b < n; b += kChunk) {
        chunks.push_back({int64_t(t), b, std::min(n, b + kChunk)});
        start.push_back(total + b);
      }
      total += n;
    }
    element_size = tensors.empty() ? 0 : int64_t(tensors[0].element_size());
    bytes = total * element_size;
  }

  bool stream() const { return bytes >= g_stream_bytes.load(std::memory_order_relaxed); }

  // f(lo, hi) once per thread, for the run of chunks [lo, hi) whose first
  // elements fall in its share of the flat index range.
  template <typename F>
  void for_each_run(const F& f, bool fence = false) const {
    at::parallel_for(0, total, kGrain, [&](int64_t b, int64_t e) {
      const int64_t lo = std::lower_bound(start.begin(), start.end(), b) - start.begin();
      const int64_t hi = std::lower_bound(start.begin(), start.end(), e) - start.begin();
      f(lo, hi);
#if FASTSAM_X86
      if (fence) _mm_sfence();  // streaming stores are weakly ordered: visible before the op returns
#endif
    });
  }

  // f(i, chunk) for every chunk.
  template <typename F>
  void for_each(const F& f, bool fence = false) const {
    for_each_run(
        [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) f(i, chunks[i]);
        },
        fence);
  }
};

template <typename T>
T* ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<T*>(t.data_ptr()) + offset;
}

// A 0-d (or one-element) CPU scalar, read without dispatching an op.
double host_value(const at::Tensor& t) {
  if (t.is_cpu() && t.numel() == 1) {
    if (t.scalar_type() == at::kFloat) return *static_cast<const float*>(t.data_ptr());
    if (t.scalar_type() == at::kDouble) return *static_cast<const double*>(t.data_ptr());
  }
  return t.item<double>();
}

bool host_flag(const at::Tensor& skip) { return host_value(skip) != 0; }

// ---------------------------------------------------------------- grad norm
// The squared norm of checked lists, summed on the host.
double sq_norm(at::TensorList grads, at::TensorList params) {
  if (grads.empty()) return 0.0;
  const bool adaptive = !params.empty();
  const Work work(grads);
  double total = 0;
  with_storage(grads[0].scalar_type(), "grad_sq_norm", [&](auto s) {
    using S = decltype(s);
    using raw = typename S::raw;
    // Two stages as on the GPU: one partial per chunk, then a fixed-order sum, all in
    // double whatever the dtype (a finite float32 gradient's squares may overflow float).
    std::vector<double> partial(work.chunks.size());
    with_loops_of<S>([&](auto loops) {
      using L = decltype(loops);
      // consecutive chunks of a thread's run in groups of L::kGroup, read at once
      work.for_each_run([&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; i += L::kGroup) {
          const int k = int(std::min<int64_t>(L::kGroup, hi - i));
          const raw* g[L::kGroup];
          const raw* w[L::kGroup] = {};
          int64_t n[L::kGroup];
          for (int j = 0; j < k; ++j) {
            const Chunk& c = work.chunks[i + j];
            g[j] = ptr<raw>(grads[c.tensor], c.begin);
            if (adaptive) w[j] = ptr<raw>(params[c.tensor], c.begin);
            n[j] = c.end - c.begin;
          }
          if (adaptive) {
            L::template sq_norm_group<S, true>(g, w, n, k, &partial[i]);
          } else {
            L::template sq_norm_group<S, false>(g, w, n, k, &partial[i]);
          }
        }
      });
    });
    for (double p : partial) total += p;
  });
  return total;
}

at::Tensor grad_sq_norm_cpu(at::TensorList grads, at::TensorList params) {
  check_grad_sq_norm(grads, params);
  return at::scalar_tensor(sq_norm(grads, params), at::TensorOptions().dtype(at::kDouble));
}

// ---------------------------------------------------------------- perturb / restore
void copy_lists(at::TensorList dst, at::TensorList src) {
  const Work work(dst);
  const bool stream = work.stream();
  with_loops([&](auto loops) {
    using L = decltype(loops);
    work.for_each(
        [&](int64_t, const Chunk& c) {
          const int64_t item = dst[c.tensor].element_size();
          L::copy(ptr<char>(dst[c.tensor], c.begin * item), ptr<char>(src[c.tensor], c.begin * item),
                  (c.end - c.begin) * item, stream);
        },
        stream);
  });
}

// perturb of checked lists with a host scale and skip flag.
void perturb_lists(at::TensorList params, at::TensorList grads, at::TensorList copies, double scale_value,
                   bool skip, bool adaptive) {
  if (params.empty()) return;
  if (skip) {
    copy_lists(copies, params);
    return;
  }
  const Work work(params);
  const bool stream = work.stream();
  with_storage(params[0].scalar_type(), "perturb", [&](auto s) {
    using S = decltype(s);
    using raw = typename S::raw;
    using acc = typename S::acc;
    const Scale<acc> sc = split_scale<acc>(scale_value);  // a double scale in acc math (sam_math.h)
    with_loops_of<S>([&](auto loops) {
      using L = decltype(loops);
      work.for_each(
          [&](int64_t, const Chunk& c) {
            raw* p = ptr<raw>(params[c.tensor], c.begin);
            const raw* g = ptr<raw>(grads[c.tensor], c.begin);
            raw* cp = ptr<raw>(copies[c.tensor], c.begin);
            const int64_t n = c.end - c.begin;
            if (adaptive) {
              L::template perturb<S, true>(p, g, cp, n, sc, stream);
            } else {
              L::template perturb<S, false>(p, g, cp, n, sc, stream);
            }
          },
          stream);
    });
  });
}

void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList copies, const at::Tensor& scale,
                 const at::Tensor& skip, bool adaptive) {
  check_perturb(params, grads, copies, scale, skip);
  if (params.empty()) return;
  perturb_lists(params, grads, copies, host_value(scale), host_flag(skip), adaptive);
}

void restore_cpu(at::TensorList params, at::TensorList copies) {
  check_restore(params, copies);
  copy_lists(params, copies);
}

// ---------------------------------------------------------------- restore + SGD
// restore + SGD of checked lists with a host gradient scale and skip flag.
void restore_sgd_lists(at::TensorList params, at::TensorList grads, at::TensorList copies,
                       at::TensorList momentum_buffers, double lr, double momentum, double dampening, bool nesterov,
                       double weight_decay, bool maximize, bool first, double grad_scale, bool skip) {
  const bool restore = !copies.empty();
  if (skip) {
    if (restore) copy_lists(params, copies);
    return;
  }
  const bool has_momentum = momentum != 0;
  const Work work(params);
  // Whether a computed list streams also depends on its loop (sam_cpu_loops.h); without a restore
  // p is read first: nothing to save.
  const bool stream = restore && work.stream();
  with_storage(params[0].scalar_type(), "restore_sgd_step", [&](auto s) {
    using S = decltype(s);
    using raw = typename S::raw;
    using acc = typename S::acc;
    const auto a = make_sgd_args<acc>(lr, momentum, dampening, weight_decay, nesterov, first);
    const Scale<acc> gs = signed_grad_scale(split_scale<acc>(grad_scale), maximize);
    with_loops_of<S>([&](auto loops) {
      using L = decltype(loops);
      work.for_each(
          [&](int64_t, const Chunk& c) {
            raw* p = ptr<raw>(params[c.tensor], c.begin);
            const raw* src = restore ? ptr<raw>(copies[c.tensor], c.begin) : p;
            const raw* g = ptr<raw>(grads[c.tensor], c.begin);
            const int64_t n = c.end - c.begin;
            if (has_momentum) {
              L::template restore_sgd<S, true>(p, src, g, ptr<raw>(momentum_buffers[c.tensor], c.begin), n, a,
                                               gs, stream);
            } else {
              L::template restore_sgd<S, false>(p, src, g, nullptr, n, a, gs, stream);
            }
          },
          stream);
    });
  });
}

void restore_sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList copies,
                          at::TensorList momentum_buffers, double lr, double momentum, double dampening,
                          bool nesterov, double weight_decay, bool maximize, bool first,
                          const std::optional<at::Tensor>& grad_scale, const at::Tensor& skip) {
  check_restore_sgd_step(params, grads, copies, momentum_buffers, momentum, grad_scale, skip);
  check_copies_distinct("restore_sgd_step", copies, params);
  if (params.empty()) return;
  restore_sgd_lists(params, grads, copies, momentum_buffers, lr, momentum, dampening, nesterov, weight_decay,
                    maximize, first, grad_scale.has_value() ? host_value(*grad_scale) : 1.0, host_flag(skip));
}

// ---------------------------------------------------------------- a pass with its norm
// The pass's scalars are computed on the host with the float64 operations, in the order, of
// fastsam/backends/_common.py (_host_scalars), so that a pass with its norm gives the bits of the
// norm, the epilogue and the pass called one after the other.
constexpr int kSkip = 0;
constexpr int kFactor = 1;

double host_at(const at::Tensor& t, int64_t i) {
  const int64_t k = i * t.stride(0);
  return t.scalar_type() == at::kDouble ? static_cast<const double*>(t.data_ptr())[k]
                                        : double(static_cast<const float*>(t.data_ptr())[k]);
}

void write_scalars(const at::Tensor& scalars, double skip, double factor) {
  double* o = static_cast<double*>(scalars.data_ptr());
  o[kSkip * scalars.stride(0)] = skip;
  o[kFactor * scalars.stride(0)] = factor;
}

void norm_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList copies, const at::Tensor& scalars,
                      double rho, double eps, bool adaptive) {
  check_norm_perturb(params, grads, copies, scalars);
  const double sq = sq_norm(grads, adaptive ? params : at::TensorList());
  const bool bad = !std::isfinite(sq);
  const double factor = bad ? std::nan("") : 1.0 / (std::sqrt(sq) + eps);
  write_scalars(scalars, bad ? 1.0 : 0.0, factor);
  perturb_lists(params, grads, copies, factor * rho, bad, adaptive);
}

void norm_restore_sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList copies,
                               at::TensorList momentum_buffers, const at::Tensor& scalars,
                               const std::optional<at::Tensor>& prev, double lr, double momentum, double dampening,
                               bool nesterov, double weight_decay, bool maximize, bool first) {
  check_norm_restore_sgd_step(params, grads, copies, momentum_buffers, scalars, prev, momentum);
  check_copies_distinct("norm_restore_sgd_step", copies, params);
  double skip = std::isfinite(sq_norm(grads, at::TensorList())) ? 0.0 : 1.0;
  if (prev.has_value()) {
    const double before = host_at(*prev, kSkip);
    skip = skip > before ? skip : before;  // Python's max(before, skip)
  }
  write_scalars(scalars, skip, 1.0);
  if (params.empty()) return;
  restore_sgd_lists(params, grads, copies, momentum_buffers, lr, momentum, dampening, nesterov, weight_decay,
                    maximize, first, 1.0, skip != 0);
}

// ---------------------------------------------------------------- restore + Adam
double read_step(const at::Tensor& s) {
  return s.scalar_type() == at::kDouble ? *static_cast<const double*>(s.data_ptr())
                                        : double(*static_cast<const float*>(s.data_ptr()));
}

void write_step(const at::Tensor& s, double value) {
  if (s.scalar_type() == at::kDouble) {
    *static_cast<double*>(s.data_ptr()) = value;
  } else {
    *static_cast<float*>(s.data_ptr()) = float(value);
  }
}

void restore_adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList copies,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                           double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                           bool maximize, const std::optional<at::Tensor>& grad_scale, const at::Tensor& skip) {
  check_restore_adam_step(params, grads, copies, exp_avgs, exp_avg_sqs, steps, grad_scale, skip);
  check_copies_distinct("restore_adam_step", copies, params);
  if (params.empty()) return;
  const bool restore = !copies.empty();
  if (host_flag(skip)) {
    if (restore) copy_lists(params, copies);
    return;
  }
  // Per-tensor bias corrections from the incremented step counters, in double
  // on the host as torch's non-capturable Adam computes them.
  const size_t n_tensors = params.size();
  std::vector<double> new_step(n_tensors), step_size(n_tensors), bc2_sqrt(n_tensors);
  for (size_t i = 0; i < n_tensors; ++i) {
    new_step[i] = read_step(steps[i]) + 1;
    adam_bias_terms(new_step[i], lr, beta1, beta2, &step_size[i], &bc2_sqrt[i]);
  }
  const Work work(params);
  const bool stream = restore && work.stream();
  with_storage(params[0].scalar_type(), "restore_adam_step", [&](auto s) {
    using S = decltype(s);
    using raw = typename S::raw;
    using acc = typename S::acc;
    const auto a = make_adam_args<acc>(lr, beta1, beta2, eps, weight_decay, decoupled);
    const Scale<acc> gs =
        signed_grad_scale(split_scale<acc>(grad_scale.has_value() ? host_value(*grad_scale) : 1.0), maximize);
    with_loops_of<S>([&](auto loops) {
      using L = decltype(loops);
      work.for_each(
          [&](int64_t, const Chunk& c) {
            const int64_t t = c.tensor;
            raw* p = ptr<raw>(params[t], c.begin);
            L::template restore_adam<S>(p, restore ? ptr<raw>(copies[t], c.begin) : p, ptr<raw>(grads[t], c.begin),
                                        ptr<raw>(exp_avgs[t], c.begin), ptr<raw>(exp_avg_sqs[t], c.begin),
                                        c.end - c.begin, a, acc(step_size[t]), acc(bc2_sqrt[t]), gs, stream);
          },
          stream);
    });
  });
  for (size_t i = 0; i < n_tensors; ++i) write_step(steps[i], new_step[i]);
}

// ---------------------------------------------------------------- the variants' ops
at::Tensor dot_sq_norms_cpu(at::TensorList xs, at::TensorList ys, const std::optional<at::Tensor>& accumulate) {
  check_dot_sq_norms(xs, ys, accumulate);
  if (xs.empty()) return accumulate.has_value() ? accumulate->clone() : at::zeros({3}, at::kDouble);
  const Work work(xs);
  at::Tensor out;
  with_storage(xs[0].scalar_type(), "dot_sq_norms", [&](auto s) {
    using S = decltype(s);
    using raw = typename S::raw;
    // Two stages as the norm: three double partials per chunk, then fixed-order sums.
    std::vector<double> partial(3 * work.chunks.size());
    with_loops([&](auto loops) {
      using L = decltype(loops);
      work.for_each([&](int64_t i, const Chunk& c) {
        L::template dot_sq_norms<S>(ptr<raw>(xs[c.tensor], c.begin), ptr<raw>(ys[c.tensor], c.begin),
                                    c.end - c.begin, &partial[3 * i]);
      });
    });
    double total[3] = {0, 0, 0};
    for (size_t i = 0; i < work.chunks.size(); ++i)
      for (int k = 0; k < 3; ++k) total[k] += partial[3 * i + k];
    out = at::empty({3}, at::TensorOptions().dtype(at::kDouble));
    double* o = out.data_ptr<double>();
    if (accumulate.has_value()) {
      const at::Tensor prev = accumulate->to(at::kDouble).contiguous();  // the previous total, read on the host
      const double* pv = prev.data_ptr<double>();
      for (int k = 0; k < 3; ++k) total[k] = total[k] + pv[k];
    }
    for (int k = 0; k < 3; ++k) o[k] = total[k];
  });
  return out;
}

void axpby_cpu(at::TensorList xs, at::TensorList ys, const at::Tensor& coefs, at::TensorList out) {
  check_axpby(xs, ys, coefs, out);
  if (xs.empty()) return;
  const at::Tensor c = coefs.to(at::kDouble).contiguous();  // a, b, skip read on the host
  const double* cv = c.data_ptr<double>();
  if (cv[2] != 0) return;
  at::TensorList dst = out.empty() ? xs : out;
  const Work work(xs);
  with_storage(xs[0].scalar_type(), "axpby", [&](auto s) {
    using S = decltype(s);
    using raw = typename S::raw;
    using acc = typename S::acc;
    const acc a = acc(cv[0]), b = acc(cv[1]);
    with_loops([&](auto loops) {
      using L = decltype(loops);
      work.for_each([&](int64_t, const Chunk& ch) {
        L::template axpby<S>(ptr<raw>(xs[ch.tensor], ch.begin), ptr<raw>(ys[ch.tensor], ch.begin),
                             ptr<raw>(dst[ch.tensor], ch.begin), ch.end - ch.begin, a, b);
      });
    });
  });
}

// ---------------------------------------------------------------- the code path
// cpu_kernels(isa, stream_bytes): the instruction set of the loops and the
// streaming threshold, after setting them ("" / -1: leave as is; "auto": the
// best this CPU runs).  Asking for an instruction set the CPU lacks raises.
std::string cpu_kernels(const std::string& isa, int64_t stream_bytes) {
  if (!isa.empty()) {
    int want = isa == "auto" ? detect_isa() : -1;
    for (int i = 0; i < kIsas; ++i)
      if (isa == kIsaNames[i]) want = i;
    TORCH_CHECK_VALUE(want >= 0, "fastsam::cpu_kernels: isa must be 'auto', 'base', 'avx2', 'avx512' or 'avx512-zen4', got '",
                      isa, "'");
    TORCH_CHECK_VALUE(runs(want), "fastsam::cpu_kernels: this CPU (or this build) does not run ",
                      kIsaNames[want]);
    g_isa.store(want);
  }
  if (stream_bytes >= 0) g_stream_bytes.store(stream_bytes);
  const int now = active_isa();
  return std::string(kIsaNames[now]) +
         (now == kAvx512Zen4 ? "; float32's norm, perturbation, restore + SGD and restore + Adam on the avx2 loops" : "") +
         "; streaming stores for write-only lists of >= " +
         std::to_string(g_stream_bytes.load()) + " bytes (copies; updates of 4- and 8-byte elements, and SGD's of bf16 on the avx2 and avx512 loops)";
}

}  // namespace
}  // namespace fastsam

TORCH_LIBRARY_FRAGMENT(fastsam, m) { m.def("cpu_kernels(str isa, int stream_bytes) -> str", &fastsam::cpu_kernels); }

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("dot_sq_norms", &fastsam::dot_sq_norms_cpu);
  m.impl("axpby", &fastsam::axpby_cpu);
  m.impl("grad_sq_norm", &fastsam::grad_sq_norm_cpu);
  m.impl("perturb", &fastsam::perturb_cpu);
  m.impl("restore", &fastsam::restore_cpu);
  m.impl("restore_sgd_step", &fastsam::restore_sgd_step_cpu);
  m.impl("norm_perturb", &fastsam::norm_perturb_cpu);
  m.impl("norm_restore_sgd_step", &fastsam::norm_restore_sgd_step_cpu);
  m.impl("restore_adam_step", &fastsam::restore_adam_step_cpu);
}
