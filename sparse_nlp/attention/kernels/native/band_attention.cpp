// Banded attention forward for CPUs (fp32): AVX-512, AVX2+FMA and portable C++, chosen at run time.
//
// Each query row attends to the keys of its window that its mask allows, plus up to a few global key columns;
// the kernel returns the output and each row's log-sum-exp, so autograd can use the flash op's backward.
// Work per tile of 8 query rows: scores into a small buffer that stays in L1/L2, softmax in place, then P x V.
//
// One kernel body, three vector back ends. The body (the second half of this file, between BAND_BODY guards) is
// written against a 16-float vector `F` (one chunk of 16 keys) and 16-bit lane masks; this file includes itself
// once per back end, inside a namespace compiled for that ISA (`#pragma GCC target`, or clang's `attribute push`):
//   avx512    - F is one zmm; register tiles of 8 rows x 3 key chunks for scores (11 loads per 24 FMAs) and
//               16 accumulators for P x V;
//   avx2      - F is two ymm (16 registers in all): 4 rows x 1 chunk for scores, 4 F accumulators for P x V;
//   portable  - F is 16 floats in an array; the compiler vectorizes it for its baseline ISA (any CPU, ARM too).
// `__builtin_cpu_supports` picks the best path the CPU runs; `band_set_isa` caps it (tests, benchmarks).
#ifndef SPARSE_NLP_BAND_BODY
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSE_NLP_X86 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

constexpr int kRows = 8;    // query rows per tile
constexpr int kChunk = 16;  // keys per chunk (one F of scores)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
using Mask = uint32_t;  // 16 lane bits

// 16 mask bits for columns [col, col + 16) of a bool row of length `width` (columns outside are masked), one
// column at a time (the vector paths call it for chunks that reach past the row).
inline Mask mask_bits_scalar(const bool* row, int64_t col, int64_t width) {
  Mask m = 0;
  for (int l = 0; l < kChunk; ++l) {
    const int64_t x = col + l;
    if (x >= 0 && x < width && row[x]) m |= Mask{1} << l;
  }
  return m;
}

// (H, N, D) keys, any strides with unit stride in D -> kt (H, chunks, D, 16) chunk-major, zero past N.
void chunk_keys_scalar(const at::Tensor& k, at::Tensor& kt) {
  const int64_t heads = k.size(0), n = k.size(1), dim = k.size(2), chunks = kt.size(1);
  const float* kp = k.data_ptr<float>();
  float* out = kt.data_ptr<float>();
  const int64_t sH = k.stride(0), sN = k.stride(1);
  at::parallel_for(0, heads * chunks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / chunks, ch = t % chunks;
      float* dst = out + t * dim * kChunk;
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(kChunk, n - ch * kChunk));
      const float* src = kp + h * sH + ch * kChunk * sN;
      for (int64_t l = 0; l < kChunk; ++l)
        for (int64_t d = 0; d < dim; ++d) dst[d * kChunk + l] = l < valid ? src[l * sN + d] : 0.f;
    }
  });
}

// ---- portable back end: 16 floats in an array --------------------------------------------------------------------
namespace portable {
constexpr int kScoreRows = 4, kScoreChunks = 1, kMixAcc = 4, kMixCols = 0;
struct F {
  float x[kChunk];
};
#define SPARSE_NLP_LANES(expr) \
  F r;                         \
  for (int l = 0; l < kChunk; ++l) r.x[l] = (expr);  \
  return r
inline F zero() { SPARSE_NLP_LANES(0.f); }
inline F set1(float a) { SPARSE_NLP_LANES(a); }
inline F load(const float* p) { SPARSE_NLP_LANES(p[l]); }
inline void store(float* p, const F& a) { std::memcpy(p, a.x, sizeof(a.x)); }
inline F fmadd(const F& a, const F& b, const F& c) { SPARSE_NLP_LANES(a.x[l] * b.x[l] + c.x[l]); }
inline F fnmadd(const F& a, const F& b, const F& c) { SPARSE_NLP_LANES(c.x[l] - a.x[l] * b.x[l]); }
inline F mul(const F& a, const F& b) { SPARSE_NLP_LANES(a.x[l] * b.x[l]); }
inline F add(const F& a, const F& b) { SPARSE_NLP_LANES(a.x[l] + b.x[l]); }
inline F sub(const F& a, const F& b) { SPARSE_NLP_LANES(a.x[l] - b.x[l]); }
inline F vmax(const F& a, const F& b) { SPARSE_NLP_LANES(a.x[l] > b.x[l] ? a.x[l] : b.x[l]); }  // b when NaN
inline F select(Mask m, const F& yes, const F& no) { SPARSE_NLP_LANES((m >> l) & 1u ? yes.x[l] : no.x[l]); }
inline F maskz(Mask m, const F& a) { SPARSE_NLP_LANES((m >> l) & 1u ? a.x[l] : 0.f); }
// round to nearest (|x| < 2^22; NaN stays NaN)
inline F vround(const F& a) { SPARSE_NLP_LANES((a.x[l] + 12582912.f) - 12582912.f); }
// y * 2^n for integral n in [-126, 127] (NaN n: NaN y)
inline F vscale2(const F& y, const F& n) {
  F r;
  for (int l = 0; l < kChunk; ++l) {
    const int32_t e = n.x[l] == n.x[l] ? static_cast<int32_t>(n.x[l]) : 0;
    const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
    float p;
    std::memcpy(&p, &bits, sizeof(p));
    r.x[l] = y.x[l] * p;
  }
  return r;
}
#undef SPARSE_NLP_LANES
inline Mask nan_bits(const F& a) {
  Mask m = 0;
  for (int l = 0; l < kChunk; ++l) m |= Mask{a.x[l] != a.x[l]} << l;
  return m;
}
inline Mask live_bits(const F& a) {  // lanes that are not -inf (NaN included)
  Mask m = 0;
  for (int l = 0; l < kChunk; ++l) m |= Mask{!(a.x[l] == kNegInf)} << l;
  return m;
}
inline float hmax(const F& a) {
  float m = a.x[0];
  for (int l = 1; l < kChunk; ++l) m = a.x[l] > m ? a.x[l] : m;
  return m;
}
inline float hsum(const F& a) {
  float s = 0.f;
  for (int l = 0; l < kChunk; ++l) s += a.x[l];
  return s;
}
inline Mask mask_bits(const bool* row, int64_t col, int64_t width) { return mask_bits_scalar(row, col, width); }
inline void chunk_keys(const at::Tensor& k, at::Tensor& kt) { chunk_keys_scalar(k, kt); }
#define SPARSE_NLP_BAND_BODY
#include "band_attention.cpp"
#undef SPARSE_NLP_BAND_BODY
}  // namespace portable

#ifdef SPARSE_NLP_X86
// ---- AVX2 + FMA back end: F is two ymm -------------------------------------------------------------------------
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
constexpr int kScoreRows = 4, kScoreChunks = 1, kMixAcc = 4, kMixCols = 1;
struct F {
  __m256 lo, hi;
};
inline F zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline F load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, const F& a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline F fmadd(const F& a, const F& b, const F& c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F fnmadd(const F& a, const F& b, const F& c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline F mul(const F& a, const F& b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F add(const F& a, const F& b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F sub(const F& a, const F& b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline F vmax(const F& a, const F& b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline __m256 lanes8(Mask m) {  // bits 0-7 of m as all-ones / zero lanes
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bit);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, bit));
}
inline F select(Mask m, const F& yes, const F& no) {
  return {_mm256_blendv_ps(no.lo, yes.lo, lanes8(m)), _mm256_blendv_ps(no.hi, yes.hi, lanes8(m >> 8))};
}
inline F maskz(Mask m, const F& a) { return {_mm256_and_ps(lanes8(m), a.lo), _mm256_and_ps(lanes8(m >> 8), a.hi)}; }
inline F vround(const F& a) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, kNearest), _mm256_round_ps(a.hi, kNearest)};
}
inline __m256 pow2(__m256 n) {  // 2^n for integral n in [-126, 127] (from the exponent bits)
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline F vscale2(const F& y, const F& n) { return {_mm256_mul_ps(y.lo, pow2(n.lo)), _mm256_mul_ps(y.hi, pow2(n.hi))}; }
inline Mask nan_bits(const F& a) {
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(a.lo, a.lo, _CMP_UNORD_Q));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(a.hi, a.hi, _CMP_UNORD_Q));
  return static_cast<Mask>(lo | (hi << 8));
}
inline Mask live_bits(const F& a) {
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(a.lo, neg_inf, _CMP_NEQ_UQ));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(a.hi, neg_inf, _CMP_NEQ_UQ));
  return static_cast<Mask>(lo | (hi << 8));
}
inline float hmax(const F& a) {
  __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
inline float hsum(const F& a) {
  __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
inline Mask mask_bits(const bool* row, int64_t col, int64_t width) {
  if (col >= width || col + kChunk <= 0) return 0;
  if (col < 0 || col + kChunk > width) return mask_bits_scalar(row, col, width);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + col));
  return ~static_cast<Mask>(_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, _mm_setzero_si128()))) & 0xFFFFu;
}
// 8 x 8 block transpose in registers: r[i] lane j -> r[j] lane i.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
// Full chunks by 8 x 8 register transposes (head sizes are multiples of 8); a last partial chunk one key at a time.
void chunk_keys(const at::Tensor& k, at::Tensor& kt) {
  const int64_t heads = k.size(0), n = k.size(1), dim = k.size(2), chunks = kt.size(1);
  const float* kp = k.data_ptr<float>();
  float* out = kt.data_ptr<float>();
  const int64_t sH = k.stride(0), sN = k.stride(1);
  at::parallel_for(0, heads * chunks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / chunks, ch = t % chunks;
      float* dst = out + t * dim * kChunk;
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(kChunk, n - ch * kChunk));
      const float* src = kp + h * sH + ch * kChunk * sN;
      if (valid < kChunk) {
        for (int64_t l = 0; l < kChunk; ++l)
          for (int64_t d = 0; d < dim; ++d) dst[d * kChunk + l] = l < valid ? src[l * sN + d] : 0.f;
        continue;
      }
      for (int64_t l0 = 0; l0 < kChunk; l0 += 8)
        for (int64_t d0 = 0; d0 < dim; d0 += 8) {
          __m256 r[8];
          for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (l0 + i) * sN + d0);
          transpose8(r);
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (d0 + i) * kChunk + l0, r[i]);
        }
    }
  });
}
#define SPARSE_NLP_BAND_BODY
#include "band_attention.cpp"
#undef SPARSE_NLP_BAND_BODY
}  // namespace avx2
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---- AVX-512 back end: F is one zmm ------------------------------------------------------------------------------
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#endif
namespace avx512 {
constexpr int kScoreRows = 8, kScoreChunks = 3, kMixAcc = 16, kMixCols = 0;
struct F {
  __m512 v;
};
inline F zero() { return {_mm512_setzero_ps()}; }
inline F set1(float a) { return {_mm512_set1_ps(a)}; }
inline F load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, const F& a) { _mm512_storeu_ps(p, a.v); }
inline F fmadd(const F& a, const F& b, const F& c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F fnmadd(const F& a, const F& b, const F& c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
inline F mul(const F& a, const F& b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F add(const F& a, const F& b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F sub(const F& a, const F& b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F vmax(const F& a, const F& b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F select(Mask m, const F& yes, const F& no) {
  return {_mm512_mask_mov_ps(no.v, static_cast<__mmask16>(m), yes.v)};
}
inline F maskz(Mask m, const F& a) { return {_mm512_maskz_mov_ps(static_cast<__mmask16>(m), a.v)}; }
inline F vround(const F& a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline F vscale2(const F& y, const F& n) { return {_mm512_scalef_ps(y.v, n.v)}; }
inline Mask nan_bits(const F& a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q); }
inline Mask live_bits(const F& a) { return _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(kNegInf), _CMP_NEQ_UQ); }
inline float hmax(const F& a) { return _mm512_reduce_max_ps(a.v); }
inline float hsum(const F& a) { return _mm512_reduce_add_ps(a.v); }
inline Mask mask_bits(const bool* row, int64_t col, int64_t width) {
  if (col >= width || col + kChunk <= 0) return 0;
  __mmask16 inside = 0xFFFF;
  if (col < 0) inside &= static_cast<__mmask16>(0xFFFFu << (-col));
  if (col + kChunk > width) inside &= static_cast<__mmask16>((1u << (width - col)) - 1u);
  const __m128i bytes = _mm_maskz_loadu_epi8(inside, row + col);
  return _mm_cmpneq_epi8_mask(bytes, _mm_setzero_si128()) & inside;
}
// One 16-lane gather per (chunk, d): lane l reads key chunk * 16 + l.
void chunk_keys(const at::Tensor& k, at::Tensor& kt) {
  const int64_t heads = k.size(0), n = k.size(1), dim = k.size(2), chunks = kt.size(1);
  const float* kp = k.data_ptr<float>();
  float* out = kt.data_ptr<float>();
  const int64_t sH = k.stride(0), sN = k.stride(1);
  TORCH_CHECK(sN * kChunk < (int64_t{1} << 31), "band_forward: key row stride too large");
  const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(sN)));
  at::parallel_for(0, heads * chunks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / chunks, ch = t % chunks;
      float* dst = out + t * dim * kChunk;
      const int64_t valid = std::min<int64_t>(kChunk, n - ch * kChunk);
      const __mmask16 live = valid >= kChunk ? static_cast<__mmask16>(0xFFFF)
                                             : static_cast<__mmask16>((1u << std::max<int64_t>(valid, 0)) - 1u);
      const float* src = kp + h * sH + ch * kChunk * sN;
      for (int64_t d = 0; d < dim; ++d)
        _mm512_storeu_ps(dst + d * kChunk, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, lanes, src + d, 4));
    }
  });
}
#define SPARSE_NLP_BAND_BODY
#include "band_attention.cpp"
#undef SPARSE_NLP_BAND_BODY
}  // namespace avx512
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // SPARSE_NLP_X86

// ---- dispatch ----------------------------------------------------------------------------------------------------

int64_t cpu_isa() {
#ifdef SPARSE_NLP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kPortable;
}

const int64_t kCpuIsa = cpu_isa();
std::atomic<int64_t> g_isa{kCpuIsa};  // the path band_forward and global_rows run

}  // namespace

// The CPU's best path: 0 portable, 1 AVX2+FMA, 2 AVX-512 (F, BW, VL, DQ).
int64_t band_cpu_isa() { return kCpuIsa; }

// Run at most path `cap` (the CPU's best when cap is larger); returns the path now used.
int64_t band_set_isa(int64_t cap) {
  const int64_t isa = std::max<int64_t>(kPortable, std::min(cap, kCpuIsa));
  g_isa.store(isa);
  return isa;
}

// Band attention forward. q (H, N_pad, D); k, v (H, N, D); mask (N_pad, W) bool, column j of row i is key
// (i / c) * c + j - left; ranges (N_pad, 3) int64: each row's first and last + 1 allowed column (none: first >=
// last) and 1 when every column between them is allowed;
// kg, vg (H, g, D) global keys and values with gmask (N_pad, g) bool (g may be 0); kt, ktg scratch buffers
// (H, ceil(N / 16), D, 16) and (H, ceil(g / 16), D, 16). Writes out (H, N_pad, D) and lse (H, N_pad): -inf and 0
// on rows without an allowed key.
void band_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                  const at::Tensor& ranges, const at::Tensor& kg, const at::Tensor& vg, const at::Tensor& gmask,
                  at::Tensor& kt, at::Tensor& ktg, at::Tensor& out, at::Tensor& lse, int64_t c, int64_t left,
                  double scale) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &kg, &vg, &out, &kt, &ktg})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() >= 3 && t->stride(-1) == 1,
                "band_forward: fp32 tensors with unit stride in the last dimension expected");
  TORCH_CHECK(mask.scalar_type() == at::kBool && gmask.scalar_type() == at::kBool && mask.is_contiguous() &&
                  gmask.is_contiguous(),
              "band_forward: contiguous bool masks expected");
  TORCH_CHECK(ranges.scalar_type() == at::kLong && ranges.is_contiguous(), "band_forward: int64 ranges expected");
  const int64_t heads = q.size(0), n_pad = q.size(1), n = k.size(1), dim = q.size(2), g = kg.size(1);
  auto same = [](const at::Tensor& t, std::initializer_list<int64_t> shape) {
    return t.sizes().vec() == std::vector<int64_t>(shape);
  };
  TORCH_CHECK(same(k, {heads, n, dim}) && same(v, {heads, n, dim}) && same(out, {heads, n_pad, dim}) &&
                  same(lse, {heads, n_pad}) && same(vg, {heads, g, dim}) && kg.size(0) == heads && kg.size(2) == dim,
              "band_forward: q (H, N_pad, D), k and v (H, N, D), kg and vg (H, g, D), out (H, N_pad, D), lse (H, N_pad)");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == n_pad && same(ranges, {n_pad, 3}) && same(gmask, {n_pad, g}),
              "band_forward: mask (N_pad, W), ranges (N_pad, 3), gmask (N_pad, g) expected");
  TORCH_CHECK(same(kt, {heads, (n + kChunk - 1) / kChunk, dim, kChunk}) && ktg.size(0) == heads &&
                  ktg.size(1) * kChunk >= g && ktg.size(2) == dim && ktg.size(3) == kChunk,
              "band_forward: kt (H, ceil(N / 16), D, 16) and ktg (H, >= ceil(g / 16), D, 16) expected");
  TORCH_CHECK(c > 0 && left >= 0, "band_forward: block size > 0 and left >= 0 expected");
  TORCH_CHECK(dim == 16 || dim == 32 || dim == 64 || dim == 128, "band_forward: head size ", dim,
              " (16, 32, 64 or 128 expected)");
  const float s = static_cast<float>(scale);
  switch (g_isa.load()) {
#ifdef SPARSE_NLP_X86
    case kAvx512: avx512::forward(q, k, v, mask, ranges, kg, vg, gmask, kt, ktg, out, lse, c, left, s); break;
    case kAvx2: avx2::forward(q, k, v, mask, ranges, kg, vg, gmask, kt, ktg, out, lse, c, left, s); break;
#endif
    default: portable::forward(q, k, v, mask, ranges, kg, vg, gmask, kt, ktg, out, lse, c, left, s);
  }
}

// Global query rows after band_forward: qg (H, g, D) attend to every key of k (laid out in kt by band_forward) that
// mask (g, N) bool allows; writes out (H, g, D) and lse (H, g), 0 and -inf on rows without an allowed key.
void global_rows(const at::Tensor& qg, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& mask,
                 at::Tensor& out, at::Tensor& lse, double scale) {
  TORCH_CHECK(qg.scalar_type() == at::kFloat && qg.stride(-1) == 1 && v.stride(-1) == 1 && out.stride(-1) == 1,
              "global_rows: fp32 tensors with unit stride in the last dimension expected");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.size(1) == v.size(1),
              "global_rows: a contiguous (g, N) bool mask expected");
  const int64_t heads = qg.size(0), g = qg.size(1), dim = qg.size(2), n = v.size(1);
  TORCH_CHECK(v.dim() == 3 && v.size(0) == heads && v.size(2) == dim && mask.size(0) == g &&
                  kt.dim() == 4 && kt.size(0) == heads && kt.size(1) * kChunk >= n && kt.size(2) == dim &&
                  out.sizes() == qg.sizes() && lse.dim() == 2 && lse.size(0) == heads && lse.size(1) == g,
              "global_rows: qg (H, g, D), kt (H, ceil(N / 16), D, 16), v (H, N, D), mask (g, N), out (H, g, D), "
              "lse (H, g) expected");
  TORCH_CHECK(dim == 16 || dim == 32 || dim == 64 || dim == 128, "global_rows: head size ", dim,
              " (16, 32, 64 or 128 expected)");
  const float s = static_cast<float>(scale);
  switch (g_isa.load()) {
#ifdef SPARSE_NLP_X86
    case kAvx512: avx512::rows(qg, kt, v, mask, out, lse, n, s); break;
    case kAvx2: avx2::rows(qg, kt, v, mask, out, lse, n, s); break;
#endif
    default: portable::rows(qg, kt, v, mask, out, lse, n, s);
  }
}

TORCH_LIBRARY(sparse_nlp, m) {
  m.def("global_rows(Tensor qg, Tensor kt, Tensor v, Tensor mask, Tensor(a!) out, Tensor(b!) lse, float scale) -> ()");
  m.def(
      "band_forward(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor ranges, Tensor kg, Tensor vg, Tensor gmask, "
      "Tensor(a!) kt, Tensor(b!) ktg, Tensor(c!) out, Tensor(d!) lse, int c, int left, float scale) -> ()");
  m.def("band_cpu_isa() -> int", &band_cpu_isa);
  m.def("band_set_isa(int cap) -> int", &band_set_isa);
}

TORCH_LIBRARY_IMPL(sparse_nlp, CPU, m) {
  m.impl("band_forward", &band_forward);
  m.impl("global_rows", &global_rows);
}

#else  // SPARSE_NLP_BAND_BODY: the kernel, once per back end (F, Mask and the vector functions come from it)

// exp(x) for x <= 0 (a softmax numerator); Cody-Waite range reduction and a degree-6 polynomial (Cephes expf),
// relative error about 2e-7; NaN in, NaN out.
inline F vexp(F x) {
  x = vmax(set1(-87.3f), x);  // returns x when x is NaN: NaN scores stay NaN
  const F n = vround(mul(x, set1(1.44269504088896341f)));
  F r = fnmadd(n, set1(0.693359375f), x);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  F y = set1(1.9875691500E-4f);
  y = fmadd(y, r, set1(1.3981999507E-3f));
  y = fmadd(y, r, set1(8.3334519073E-3f));
  y = fmadd(y, r, set1(4.1665795894E-2f));
  y = fmadd(y, r, set1(1.6666665459E-1f));
  y = fmadd(y, r, set1(5.0000001201E-1f));
  y = fmadd(y, mul(r, r), add(r, set1(1.0f)));
  return vscale2(y, n);
}

struct Source {  // one set of key chunks and value rows that a tile's rows score against
  const float* kt;  // (chunks, D, 16) chunk-major keys of this head
  const float* v;   // value row 0 of this head
  int64_t v_stride;
  int64_t first, last;  // chunk range [first, last)
  int64_t keys;         // value rows that exist (keys past it are padding in the last chunk)
};

// Scores of RS query rows from row r0 (qs: kRows x D, pre-scaled) against NC key chunks starting at chunk `chunk`
// of `kt` (chunk-major, D x 16 each), stored to S: -inf where masked. full(row, chunk) says a chunk is allowed
// throughout for that row (no mask to read); else bits(row, chunk) gives its 16 mask bits. The accumulators live
// in registers for the whole call (no references to them escape).
template <int D, int RS, int NC, typename Full, typename Bits>
inline void score_tile(const float* qs, int r0, const float* kt, int64_t chunk, float* S, int64_t ss,
                       const Full& full, const Bits& bits) {
  F acc[RS][NC];
  _Pragma("GCC unroll 16") for (int r = 0; r < RS; ++r)
    _Pragma("GCC unroll 16") for (int t = 0; t < NC; ++t) acc[r][t] = zero();
  const float* kc = kt + chunk * D * kChunk;
  for (int d = 0; d < D; ++d) {
    F kv[NC];
    _Pragma("GCC unroll 16") for (int t = 0; t < NC; ++t) kv[t] = load(kc + (t * D + d) * kChunk);
    _Pragma("GCC unroll 16") for (int r = 0; r < RS; ++r) {
      const F qb = set1(qs[(r0 + r) * D + d]);
      _Pragma("GCC unroll 16") for (int t = 0; t < NC; ++t) acc[r][t] = fmadd(qb, kv[t], acc[r][t]);
    }
  }
  const F neg_inf = set1(kNegInf);
  _Pragma("GCC unroll 16") for (int r = 0; r < RS; ++r) {
    _Pragma("GCC unroll 16") for (int t = 0; t < NC; ++t) {
      const int row = r0 + r;
      const F x = full(row, chunk + t) ? acc[r][t] : select(bits(row, chunk + t), acc[r][t], neg_inf);
      store(S + row * ss + t * kChunk, x);
    }
  }
}

// Scores of one 8-row tile against `src`'s chunks into S (row stride `ss`, column 0 = chunk `src.first`): row
// groups of kScoreRows, runs of kScoreChunks chunks.
template <int D, typename Full, typename Bits>
__attribute__((noinline)) void scores(const float* qs, const Source& src, float* S, int64_t ss, const Full& full,
                                      const Bits& bits) {
  constexpr int RS = kScoreRows, NC = kScoreChunks;
  static_assert(kRows % RS == 0, "row groups must split a tile");
  // chunk runs outside, row groups inside: a run's keys (NC x D x 16 floats) stay in L1 for the tile's other rows
  int64_t chunk = src.first;
  for (; chunk + NC <= src.last; chunk += NC)
    for (int r0 = 0; r0 < kRows; r0 += RS)
      score_tile<D, RS, NC>(qs, r0, src.kt, chunk, S + (chunk - src.first) * kChunk, ss, full, bits);
  if (NC > 2 && src.last - chunk == 2)
    for (int r0 = 0; r0 < kRows; r0 += RS)
      score_tile<D, RS, 2>(qs, r0, src.kt, chunk, S + (chunk - src.first) * kChunk, ss, full, bits);
  else if (NC > 1 && src.last - chunk == 1)
    for (int r0 = 0; r0 < kRows; r0 += RS)
      score_tile<D, RS, 1>(qs, r0, src.kt, chunk, S + (chunk - src.first) * kChunk, ss, full, bits);
}

// One row's softmax numerators over `count` chunks of s: its max into *row_max (NaN when a score is NaN, which
// max would drop), then s <- exp(s - max) (0 where masked) and their sum into *row_sum. A row with no allowed
// key (max -inf) becomes zeros with sum 0.
inline void row_softmax(float* s, int64_t count, float* row_max, float* row_sum) {
  F m = set1(kNegInf);
  Mask nan = 0;
  for (int64_t x = 0; x < count * kChunk; x += kChunk) {
    const F v = load(s + x);
    m = vmax(m, v);
    nan |= nan_bits(v);
  }
  *row_max = nan ? std::numeric_limits<float>::quiet_NaN() : hmax(m);
  *row_sum = 0.f;
  if (*row_max == kNegInf) {
    for (int64_t x = 0; x < count * kChunk; ++x) s[x] = 0.f;
    return;
  }
  const F mv = set1(*row_max);
  F sum = zero();
  for (int64_t x = 0; x < count * kChunk; x += kChunk) {
    const F v = load(s + x);
    const F p = maskz(live_bits(v), vexp(sub(v, mv)));
    sum = add(sum, p);
    store(s + x, p);
  }
  *row_sum = hsum(sum);
}

// acc[r * V + j] += sum over the source's keys of P[r][key] * V[key][16 j, 16 j + 16), for the tile's kRows rows
// (P: S with row stride ss, column 0 = chunk first). Register tiles of R rows x VB vectors of value columns; column
// blocks outside, row groups inside, so a block's slice of the value rows stays in L1 for the tile's other rows.
template <int D, int R, int VB>
__attribute__((noinline)) void mix(const float* S, int64_t ss, const Source& src, F* acc) {
  constexpr int V = D / 16;
  static_assert(kRows % R == 0 && V % VB == 0, "P x V register tiles must split a tile");
  const int64_t k0 = src.first * kChunk, k1 = std::min(src.last * kChunk, src.keys);
  const int64_t stride = src.v_stride;
  for (int j0 = 0; j0 < V; j0 += VB) {
    for (int r0 = 0; r0 < kRows; r0 += R) {
      F a[R][VB];
      _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
        _Pragma("GCC unroll 16") for (int j = 0; j < VB; ++j) a[r][j] = acc[(r0 + r) * V + j0 + j];
      const float* vrow = src.v + k0 * stride + 16 * j0;
      const float* p = S + r0 * ss;
      for (int64_t col = 0; col < k1 - k0; ++col, vrow += stride) {
        F vv[VB];
        _Pragma("GCC unroll 16") for (int j = 0; j < VB; ++j) vv[j] = load(vrow + 16 * j);
        _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
          const F pb = set1(p[r * ss + col]);
          _Pragma("GCC unroll 16") for (int j = 0; j < VB; ++j) a[r][j] = fmadd(pb, vv[j], a[r][j]);
        }
      }
      _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
        _Pragma("GCC unroll 16") for (int j = 0; j < VB; ++j) acc[(r0 + r) * V + j0 + j] = a[r][j];
    }
  }
}

template <int D>
void run(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& mask,
         const at::Tensor& ranges, const at::Tensor& ktg, const at::Tensor& vg, const at::Tensor& gmask,
         at::Tensor& out, at::Tensor& lse, int64_t n, int64_t c, int64_t left, float scale) {
  constexpr int V = D / 16;
  // P x V register tiles: VB vectors of value columns (kMixCols, or the whole row when 0) x R rows (kMixAcc
  // accumulators, 1 to 8 rows)
  constexpr int VB = kMixCols > 0 && kMixCols < V ? kMixCols : V;
  constexpr int R = kMixAcc / VB >= kRows ? kRows : (kMixAcc / VB >= 1 ? kMixAcc / VB : 1);
  const int64_t heads = q.size(0), n_pad = q.size(1), width = mask.size(1), g = vg.size(1);
  const int64_t g_chunks = (g + kChunk - 1) / kChunk, k_chunks = kt.size(1);
  const float* qp = q.data_ptr<float>();
  const float* ktp = kt.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* ktgp = g ? ktg.data_ptr<float>() : nullptr;
  const float* vgp = g ? vg.data_ptr<float>() : nullptr;
  const bool* mp = mask.data_ptr<bool>();
  const bool* gmp = g ? gmask.data_ptr<bool>() : nullptr;
  const int64_t* rp = ranges.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t qsH = q.stride(0), qsN = q.stride(1), vsH = v.stride(0), vsN = v.stride(1);
  const int64_t osH = out.stride(0), osN = out.stride(1), lsH = lse.stride(0), lsN = lse.stride(1);
  const int64_t vgsH = g ? vg.stride(0) : 0, vgsN = g ? vg.stride(1) : 0;
  const int64_t tiles = (n_pad + kRows - 1) / kRows;
  // widest band span of a tile, in chunks: its rows' windows (up to c + 7 apart when a tile spans two
  // query blocks), chunk-aligned
  const int64_t band_chunks = (width + c + kRows + 2 * kChunk) / kChunk + 1;
  const int64_t ss = (band_chunks + g_chunks) * kChunk;
  at::parallel_for(0, heads * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> Sbuf(kRows * ss);
    float* S = Sbuf.data();
    alignas(64) float qs[kRows * D];
    F acc[kRows * V];  // the tile's P x V sums
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / tiles, i0 = (task % tiles) * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, n_pad - i0));
      // the tile's allowed key range (raw positions), from each row's column range in its window
      int64_t lo = n, hi = 0;
      int64_t base[kRows], full_lo[kRows], full_hi[kRows];  // chunks in [full_lo, full_hi) need no mask
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = i0 + std::min(r, rows - 1);
        const int64_t* range = rp + 3 * i;
        base[r] = (i / c) * c - left;  // raw key of window column 0
        full_lo[r] = full_hi[r] = 0;
        if (r < rows && range[0] < range[1]) {
          lo = std::min(lo, base[r] + range[0]);
          hi = std::max(hi, base[r] + range[1]);
          if (range[2]) {  // every column of the range allowed: the chunks inside it need no mask
            full_lo[r] = (base[r] + range[0] + kChunk - 1) / kChunk;
            full_hi[r] = (base[r] + range[1]) / kChunk;
          }
        }
      }
      const F scale_v = set1(scale);
      for (int r = 0; r < kRows; ++r) {
        const float* qrow = qp + h * qsH + (i0 + std::min(r, rows - 1)) * qsN;
        for (int d = 0; d < D; d += 16) store(qs + r * D + d, mul(load(qrow + d), scale_v));
      }
      float row_max[kRows], row_sum[kRows];
      Source band{ktp + h * k_chunks * D * kChunk, vp + h * vsH, vsN, 0, 0, n};
      if (hi > lo) band.first = lo / kChunk, band.last = std::min(k_chunks, (hi + kChunk - 1) / kChunk);
      const int64_t nb_chunks = band.last - band.first;
      const int64_t g_col = nb_chunks * kChunk;  // S column of the first global key
      scores<D>(
          qs, band, S, ss, [&](int r, int64_t chunk) { return chunk >= full_lo[r] && chunk < full_hi[r]; },
          [&](int r, int64_t chunk) -> Mask {
            if (r >= rows) return 0;
            return mask_bits(mp + (i0 + r) * width, chunk * kChunk - base[r], width);
          });
      Source glob{ktgp ? ktgp + h * g_chunks * D * kChunk : nullptr, vgp ? vgp + h * vgsH : nullptr, vgsN, 0,
                  g_chunks, g};
      if (g)
        scores<D>(
            qs, glob, S + g_col, ss, [](int, int64_t) { return false; },
            [&](int r, int64_t chunk) -> Mask {
              if (r >= rows) return 0;
              return mask_bits(gmp + (i0 + r) * g, chunk * kChunk, g);
            });
      for (int r = 0; r < kRows; ++r)
        row_softmax(S + r * ss, nb_chunks + (g ? g_chunks : 0), &row_max[r], &row_sum[r]);
      for (int x = 0; x < kRows * V; ++x) acc[x] = zero();
      mix<D, R, VB>(S, ss, band, acc);
      if (g) mix<D, R, VB>(S + g_col, ss, glob, acc);
      for (int row = 0; row < rows; ++row) {
        const int64_t i = i0 + row;
        const float sum = row_sum[row];
        const F inv = set1(sum > 0.f ? 1.f / sum : 0.f);
        float* orow = op + h * osH + i * osN;
        for (int j = 0; j < V; ++j) store(orow + 16 * j, mul(acc[row * V + j], inv));
        lp[h * lsH + i * lsN] = sum > 0.f ? row_max[row] + std::log(sum) : kNegInf;
      }
    }
  });
}

// Global query rows: query j of head h attends to every key its mask row allows (all N keys, chunk by chunk from
// the chunk-major keys that band_forward laid out).
template <int D>
void run_rows(const at::Tensor& qg, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& mask,
              at::Tensor& out, at::Tensor& lse, int64_t n, float scale) {
  constexpr int V = D / 16;
  const int64_t heads = qg.size(0), g = qg.size(1), chunks = kt.size(1);
  const float* qp = qg.data_ptr<float>();
  const float* ktp = kt.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t qsH = qg.stride(0), qsG = qg.stride(1), vsH = v.stride(0), vsN = v.stride(1);
  const int64_t osH = out.stride(0), osG = out.stride(1), lsH = lse.stride(0), lsG = lse.stride(1);
  at::parallel_for(0, heads * g, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(chunks * kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / g, j = task % g;
      const float* q = qp + h * qsH + j * qsG;
      const float* kh = ktp + h * chunks * D * kChunk;
      const bool* row = mp + j * n;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        F acc = zero();
        for (int d = 0; d < D; ++d) acc = fmadd(set1(q[d] * scale), load(kh + (ch * D + d) * kChunk), acc);
        store(s.data() + ch * kChunk, select(mask_bits(row, ch * kChunk, n), acc, set1(kNegInf)));
      }
      float m, total;
      row_softmax(s.data(), chunks, &m, &total);
      float* o = op + h * osH + j * osG;
      if (m == kNegInf) {
        for (int d = 0; d < D; ++d) o[d] = 0.f;
        lp[h * lsH + j * lsG] = kNegInf;
        continue;
      }
      F acc[V];
      for (int t = 0; t < V; ++t) acc[t] = zero();
      const float* vh = vp + h * vsH;
      for (int64_t key = 0; key < n; ++key) {
        const F p = set1(s[key]);
        for (int t = 0; t < V; ++t) acc[t] = fmadd(p, load(vh + key * vsN + 16 * t), acc[t]);
      }
      const F inv = set1(1.f / total);
      for (int t = 0; t < V; ++t) store(o + 16 * t, mul(acc[t], inv));
      lp[h * lsH + j * lsG] = m + std::log(total);
    }
  });
}

// The band pass on this back end: lays the keys out chunk-major, then runs the tiles (head size checked by the
// caller).
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
             const at::Tensor& ranges, const at::Tensor& kg, const at::Tensor& vg, const at::Tensor& gmask,
             at::Tensor& kt, at::Tensor& ktg, at::Tensor& out, at::Tensor& lse, int64_t c, int64_t left, float s) {
  const int64_t n = k.size(1);
  chunk_keys(k, kt);
  if (vg.size(1)) chunk_keys(kg, ktg);
  switch (q.size(2)) {
    case 16: run<16>(q, kt, v, mask, ranges, ktg, vg, gmask, out, lse, n, c, left, s); break;
    case 32: run<32>(q, kt, v, mask, ranges, ktg, vg, gmask, out, lse, n, c, left, s); break;
    case 64: run<64>(q, kt, v, mask, ranges, ktg, vg, gmask, out, lse, n, c, left, s); break;
    default: run<128>(q, kt, v, mask, ranges, ktg, vg, gmask, out, lse, n, c, left, s);
  }
}

// The global query rows on this back end (head size checked by the caller).
void rows(const at::Tensor& qg, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& mask, at::Tensor& out,
          at::Tensor& lse, int64_t n, float s) {
  switch (qg.size(2)) {
    case 16: run_rows<16>(qg, kt, v, mask, out, lse, n, s); break;
    case 32: run_rows<32>(qg, kt, v, mask, out, lse, n, s); break;
    case 64: run_rows<64>(qg, kt, v, mask, out, lse, n, s); break;
    default: run_rows<128>(qg, kt, v, mask, out, lse, n, s);
  }
}

#endif  // SPARSE_NLP_BAND_BODY
