// The bf16 SAM step's reads and writes without the cpp backend around them (benchmarks/step_skeleton.py):
// the norm (4 streams in lockstep), the perturbation (restore copy streamed), the non-finite
// check (the norm again) and restore + SGD with momentum (parameters streamed), over lists of
// bf16 tensors, one thread.  `math` 0: integer adds (the data movement alone); 1: the step's float
// math, truncating to bf16; 2: rounding to nearest even as c10 does (no NaN select).  AVX2.
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

typedef uint16_t u16;

static inline __m256i ld(const u16* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline __m256 even(__m256i x) { return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)); }
static inline __m256 odd(__m256i x) {
  return _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xFFFF0000u)));
}
// float bits rounded to bf16 in the upper half (math 2) or truncated (math 1)
static inline __m256i to_bf16(__m256 x, int math) {
  __m256i i = _mm256_castps_si256(x);
  if (math < 2) return i;
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(_mm256_add_epi32(i, _mm256_set1_epi32(0x7FFF)), lsb);
}
static inline __m256i join(__m256i e, __m256i o) { return _mm256_blend_epi16(_mm256_srli_epi32(e, 16), o, 0xAA); }
static inline float bf(u16 x) {
  union { uint32_t u; float f; } v = {(uint32_t)x << 16};
  return v.f;
}

// sum of squares of g[0, n): 4 quarters in lockstep (the integer skeleton ors the words)
static float norm1(const u16* g, long n, int math) {
  __m256 a[8];
  __m256i o = _mm256_setzero_si256();
  for (int k = 0; k < 8; ++k) a[k] = _mm256_setzero_ps();
  long q = (n / 4) & ~15L, i = 0;
  for (; i < q; i += 16) {
    for (int k = 0; k < 4; ++k) {
      __m256i x = ld(g + k * q + i);
      if (math) {
        __m256 e = even(x), d = odd(x);
        a[2 * k] = _mm256_add_ps(a[2 * k], _mm256_mul_ps(e, e));
        a[2 * k + 1] = _mm256_add_ps(a[2 * k + 1], _mm256_mul_ps(d, d));
      } else {
        o = _mm256_or_si256(o, x);
      }
    }
  }
  __m256 s = _mm256_castsi256_ps(o);
  for (int k = 0; k < 8; ++k) s = _mm256_add_ps(s, a[k]);
  float r[8], t = 0;
  _mm256_storeu_ps(r, s);
  for (int k = 0; k < 8; ++k) t += r[k];
  for (i = 4 * q; i < n; ++i) t += bf(g[i]) * bf(g[i]);
  return t;
}

// c <- w (streamed), w <- bf16(w + s * g)
static void perturb1(u16* w, const u16* g, u16* c, long n, float s, int math) {
  const __m256 vs = _mm256_set1_ps(s);
  long i = 0;
  for (; i < n && ((uintptr_t)(c + i) & 31); ++i) c[i] = w[i];
  for (; i + 16 <= n; i += 16) {
    __m256i W = ld(w + i), G = ld(g + i), out;
    _mm256_stream_si256((__m256i*)(c + i), W);
    if (math) {
      __m256 we = _mm256_add_ps(even(W), _mm256_mul_ps(vs, even(G)));
      __m256 wo = _mm256_add_ps(odd(W), _mm256_mul_ps(vs, odd(G)));
      out = join(to_bf16(we, math), to_bf16(wo, math));
    } else {
      out = _mm256_add_epi16(W, G);
    }
    _mm256_storeu_si256((__m256i*)(w + i), out);
  }
  for (; i < n; ++i) c[i] = w[i];
}

// b <- bf16(m * b + g), p <- bf16(c - lr * b) (streamed)
static void update1(u16* p, const u16* c, const u16* g, u16* b, long n, float m, float lr, int math) {
  const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
  const __m256 vm = _mm256_set1_ps(m), vl = _mm256_set1_ps(-lr);
  long i = 0;
  for (; i < n && ((uintptr_t)(p + i) & 31); ++i) p[i] = c[i];
  for (; i + 16 <= n; i += 16) {
    __m256i C = ld(c + i), G = ld(g + i), B = ld(b + i), P;
    if (math) {
      __m256 be = _mm256_add_ps(_mm256_mul_ps(vm, even(B)), even(G));
      __m256 bo = _mm256_add_ps(_mm256_mul_ps(vm, odd(B)), odd(G));
      __m256i rbe = _mm256_and_si256(to_bf16(be, math), hi), rbo = _mm256_and_si256(to_bf16(bo, math), hi);
      __m256 we = _mm256_add_ps(_mm256_mul_ps(vl, _mm256_castsi256_ps(rbe)), even(C));
      __m256 wo = _mm256_add_ps(_mm256_mul_ps(vl, _mm256_castsi256_ps(rbo)), odd(C));
      B = _mm256_or_si256(_mm256_srli_epi32(rbe, 16), rbo);
      P = join(to_bf16(we, math), to_bf16(wo, math));
    } else {
      B = _mm256_add_epi16(B, G);
      P = _mm256_sub_epi16(C, B);
    }
    _mm256_storeu_si256((__m256i*)(b + i), B);
    _mm256_stream_si256((__m256i*)(p + i), P);
  }
  for (; i < n; ++i) p[i] = c[i];
}

// one step over k tensors (w, g, c, b: arrays of k pointers; n: their lengths)
float skeleton_step(u16** w, u16** g, u16** c, u16** b, const long* n, int k, int math) {
  float sq = 0;
  for (int t = 0; t < k; ++t) sq += norm1(g[t], n[t], math);
  for (int t = 0; t < k; ++t) perturb1(w[t], g[t], c[t], n[t], 1e-3f, math);
  _mm_sfence();
  for (int t = 0; t < k; ++t) sq += norm1(g[t], n[t], math);
  for (int t = 0; t < k; ++t) update1(w[t], c[t], g[t], b[t], n[t], 0.9f, 0.1f, math);
  _mm_sfence();
  return sq;
}
