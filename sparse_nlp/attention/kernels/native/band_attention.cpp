// Banded attention forward for x86-64 CPUs with AVX-512 (fp32).
//
// Each query row attends to the keys of its window that its mask allows, plus up to a few global key columns;
// the kernel returns the output and each row's log-sum-exp, so autograd can use the flash op's backward.
// Work per tile of query rows: scores into a small buffer that stays in L1/L2, softmax in place, then P x V.
// Register tiles are sized for the FMA units rather than the loads: 8 rows x 3 key chunks of 16 for scores
// (11 loads per 24 FMAs), 8 rows x D/16 vectors for P x V.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int kRows = 8;    // query rows per register tile
constexpr int kChunk = 16;  // keys per chunk (one zmm of scores)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (a softmax numerator); Cody-Waite range reduction and a degree-6 polynomial (Cephes expf),
// relative error about 2e-7; NaN in, NaN out.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x);  // returns x when x is NaN: NaN scores stay NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// 16 mask bits for columns [col, col + 16) of a bool row of length `width` (columns outside are masked).
inline __mmask16 mask_bits(const bool* row, int64_t col, int64_t width) {
  if (col >= width || col + kChunk <= 0) return 0;
  __mmask16 inside = 0xFFFF;
  if (col < 0) inside &= static_cast<__mmask16>(0xFFFFu << (-col));
  if (col + kChunk > width) inside &= static_cast<__mmask16>((1u << (width - col)) - 1u);
  const __m128i bytes = _mm_maskz_loadu_epi8(inside, row + col);
  return _mm_cmpneq_epi8_mask(bytes, _mm_setzero_si128()) & inside;
}

struct Source {  // one set of key chunks and value rows that a tile's rows score against
  const float* kt;  // (chunks, D, 16) chunk-major keys of this head
  const float* v;   // value row 0 of this head
  int64_t v_stride;
  int64_t first, last;  // chunk range [first, last)
  int64_t keys;         // value rows that exist (keys past it are padding in the last chunk)
};

// Scores of kRows query rows (qs: kRows x D, pre-scaled) against NC key chunks starting at chunk `chunk` of
// `kt` (chunk-major, D x 16 each), stored to S: -inf where masked. full(row, chunk) says a chunk is allowed
// throughout for that row (no mask to read); else bits(row, chunk) gives its 16 mask bits. The accumulators live
// in registers for the whole call (no references to them escape).
template <int D, int NC, typename Full, typename Bits>
inline void score_tile(const float* qs, const float* kt, int64_t chunk, float* S, int64_t ss, const Full& full,
                       const Bits& bits) {
  __m512 acc[kRows][NC];
  _Pragma("GCC unroll 16") for (int r = 0; r < kRows; ++r)
    _Pragma("GCC unroll 16") for (int t = 0; t < NC; ++t) acc[r][t] = _mm512_setzero_ps();
  const float* kc = kt + chunk * D * kChunk;
  for (int d = 0; d < D; ++d) {
    __m512 kv[NC];
    _Pragma("GCC unroll 16") for (int t = 0; t < NC; ++t) kv[t] = _mm512_loadu_ps(kc + (t * D + d) * kChunk);
    _Pragma("GCC unroll 16") for (int r = 0; r < kRows; ++r) {
      const __m512 qb = _mm512_set1_ps(qs[r * D + d]);
      _Pragma("GCC unroll 16") for (int t = 0; t < NC; ++t) acc[r][t] = _mm512_fmadd_ps(qb, kv[t], acc[r][t]);
    }
  }
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  _Pragma("GCC unroll 16") for (int r = 0; r < kRows; ++r) {
    _Pragma("GCC unroll 16") for (int t = 0; t < NC; ++t) {
      const __m512 x = full(r, chunk + t) ? acc[r][t] : _mm512_mask_mov_ps(neg_inf, bits(r, chunk + t), acc[r][t]);
      _mm512_storeu_ps(S + r * ss + t * kChunk, x);
    }
  }
}

// Scores of one 8-row tile against `src`'s chunks into S (row stride `ss`, column 0 = chunk `src.first`).
template <int D, typename Full, typename Bits>
__attribute__((noinline)) void scores(const float* qs, const Source& src, float* S, int64_t ss, const Full& full,
                                      const Bits& bits) {
  int64_t chunk = src.first;
  for (; chunk + 3 <= src.last; chunk += 3)
    score_tile<D, 3>(qs, src.kt, chunk, S + (chunk - src.first) * kChunk, ss, full, bits);
  if (src.last - chunk == 2)
    score_tile<D, 2>(qs, src.kt, chunk, S + (chunk - src.first) * kChunk, ss, full, bits);
  else if (src.last - chunk == 1)
    score_tile<D, 1>(qs, src.kt, chunk, S + (chunk - src.first) * kChunk, ss, full, bits);
}

// One row's softmax numerators over `count` chunks of s: its max into *row_max (NaN when a score is NaN, which
// max_ps would drop), then s <- exp(s - max) (0 where masked) and their sum into *row_sum. A row with no allowed
// key (max -inf) becomes zeros with sum 0.
inline void row_softmax(float* s, int64_t count, float* row_max, float* row_sum) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  __m512 vmax = neg_inf;
  __mmask16 nan = 0;
  for (int64_t x = 0; x < count * kChunk; x += kChunk) {
    const __m512 v = _mm512_loadu_ps(s + x);
    vmax = _mm512_max_ps(vmax, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  *row_max = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(vmax);
  *row_sum = 0.f;
  if (*row_max == kNegInf) {
    for (int64_t x = 0; x < count * kChunk; ++x) s[x] = 0.f;
    return;
  }
  const __m512 m = _mm512_set1_ps(*row_max);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t x = 0; x < count * kChunk; x += kChunk) {
    const __m512 v = _mm512_loadu_ps(s + x);
    const __mmask16 ok = _mm512_cmp_ps_mask(v, neg_inf, _CMP_NEQ_UQ);
    const __m512 p = _mm512_maskz_mov_ps(ok, exp512(_mm512_sub_ps(v, m)));
    sum = _mm512_add_ps(sum, p);
    _mm512_storeu_ps(s + x, p);
  }
  *row_sum = _mm512_reduce_add_ps(sum);
}

// acc[r] += sum over the source's keys of P[r][key] * V[key] (P: S with row stride ss, column 0 = chunk first).
template <int D, int R>
__attribute__((noinline)) void mix(const float* S, int64_t ss, const Source& src, __m512* acc) {
  constexpr int V = D / 16;
  __m512 a[R][V];
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int j = 0; j < V; ++j) a[r][j] = acc[r * V + j];
  const int64_t k0 = src.first * kChunk, k1 = std::min(src.last * kChunk, src.keys);
  const float* vrow = src.v + k0 * src.v_stride;
  const int64_t stride = src.v_stride;
  for (int64_t col = 0; col < k1 - k0; ++col, vrow += stride) {
    __m512 vv[V];
    _Pragma("GCC unroll 16") for (int j = 0; j < V; ++j) vv[j] = _mm512_loadu_ps(vrow + 16 * j);
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(S[r * ss + col]);
      _Pragma("GCC unroll 16") for (int j = 0; j < V; ++j) a[r][j] = _mm512_fmadd_ps(p, vv[j], a[r][j]);
    }
  }
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int j = 0; j < V; ++j) acc[r * V + j] = a[r][j];
}

template <int D>
void run(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& mask,
         const at::Tensor& ranges, const at::Tensor& ktg, const at::Tensor& vg, const at::Tensor& gmask,
         at::Tensor& out, at::Tensor& lse, int64_t n, int64_t c, int64_t left, float scale) {
  constexpr int V = D / 16;
  constexpr int R = V <= 2 ? kRows : kRows * 2 / V;  // rows per P x V register tile (16-32 accumulators)
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
      const __m512 scale_v = _mm512_set1_ps(scale);
      for (int r = 0; r < kRows; ++r) {
        const float* qrow = qp + h * qsH + (i0 + std::min(r, rows - 1)) * qsN;
        for (int d = 0; d < D; d += 16)
          _mm512_store_ps(qs + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(qrow + d), scale_v));
      }
      float row_max[kRows], row_sum[kRows];
      Source band{ktp + h * k_chunks * D * kChunk, vp + h * vsH, vsN, 0, 0, n};
      if (hi > lo) band.first = lo / kChunk, band.last = std::min(k_chunks, (hi + kChunk - 1) / kChunk);
      const int64_t nb_chunks = band.last - band.first;
      const int64_t g_col = nb_chunks * kChunk;  // S column of the first global key
      scores<D>(
          qs, band, S, ss, [&](int r, int64_t chunk) { return chunk >= full_lo[r] && chunk < full_hi[r]; },
          [&](int r, int64_t chunk) -> __mmask16 {
            if (r >= rows) return 0;
            return mask_bits(mp + (i0 + r) * width, chunk * kChunk - base[r], width);
          });
      Source glob{ktgp ? ktgp + h * g_chunks * D * kChunk : nullptr, vgp ? vgp + h * vgsH : nullptr, vgsN, 0,
                  g_chunks, g};
      if (g)
        scores<D>(
            qs, glob, S + g_col, ss, [](int, int64_t) { return false; },
            [&](int r, int64_t chunk) -> __mmask16 {
              if (r >= rows) return 0;
              return mask_bits(gmp + (i0 + r) * g, chunk * kChunk, g);
            });
      for (int r = 0; r < kRows; ++r)
        row_softmax(S + r * ss, nb_chunks + (g ? g_chunks : 0), &row_max[r], &row_sum[r]);
      for (int r0 = 0; r0 < kRows; r0 += R) {
        __m512 acc[R * V];
        for (int x = 0; x < R * V; ++x) acc[x] = _mm512_setzero_ps();
        mix<D, R>(S + r0 * ss, ss, band, acc);
        if (g) mix<D, R>(S + r0 * ss + g_col, ss, glob, acc);
        for (int r = 0; r < R && r0 + r < rows; ++r) {
          const int row = r0 + r;
          const int64_t i = i0 + row;
          const float sum = row_sum[row];
          const __m512 inv = _mm512_set1_ps(sum > 0.f ? 1.f / sum : 0.f);
          float* orow = op + h * osH + i * osN;
          for (int j = 0; j < V; ++j) _mm512_storeu_ps(orow + 16 * j, _mm512_mul_ps(acc[r * V + j], inv));
          lp[h * lsH + i * lsN] = sum > 0.f ? row_max[row] + std::log(sum) : kNegInf;
        }
      }
    }
  });
}

// (H, N, D) keys, any strides with unit stride in D -> kt (H, chunks, D, 16) chunk-major, zero past N.
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
        __m512 acc = _mm512_setzero_ps();
        for (int d = 0; d < D; ++d)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(q[d] * scale), _mm512_loadu_ps(kh + (ch * D + d) * kChunk), acc);
        const __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), mask_bits(row, ch * kChunk, n), acc);
        _mm512_storeu_ps(s.data() + ch * kChunk, x);
      }
      float m, total;
      row_softmax(s.data(), chunks, &m, &total);
      float* o = op + h * osH + j * osG;
      if (m == kNegInf) {
        for (int d = 0; d < D; ++d) o[d] = 0.f;
        lp[h * lsH + j * lsG] = kNegInf;
        continue;
      }
      __m512 acc[V];
      for (int t = 0; t < V; ++t) acc[t] = _mm512_setzero_ps();
      const float* vh = vp + h * vsH;
      for (int64_t key = 0; key < n; ++key) {
        const __m512 p = _mm512_set1_ps(s[key]);
        for (int t = 0; t < V; ++t) acc[t] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vh + key * vsN + 16 * t), acc[t]);
      }
      const __m512 inv = _mm512_set1_ps(1.f / total);
      for (int t = 0; t < V; ++t) _mm512_storeu_ps(o + 16 * t, _mm512_mul_ps(acc[t], inv));
      lp[h * lsH + j * lsG] = m + std::log(total);
    }
  });
}

}  // namespace

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
  chunk_keys(k, kt);
  if (vg.size(1)) chunk_keys(kg, ktg);
  const float s = static_cast<float>(scale);
  switch (dim) {
    case 16: run<16>(q, kt, v, mask, ranges, ktg, vg, gmask, out, lse, n, c, left, s); break;
    case 32: run<32>(q, kt, v, mask, ranges, ktg, vg, gmask, out, lse, n, c, left, s); break;
    case 64: run<64>(q, kt, v, mask, ranges, ktg, vg, gmask, out, lse, n, c, left, s); break;
    case 128: run<128>(q, kt, v, mask, ranges, ktg, vg, gmask, out, lse, n, c, left, s); break;
    default: TORCH_CHECK(false, "band_forward: head size ", dim, " (16, 32, 64 or 128 expected)");
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
  const float s = static_cast<float>(scale);
  switch (qg.size(2)) {
    case 16: run_rows<16>(qg, kt, v, mask, out, lse, n, s); break;
    case 32: run_rows<32>(qg, kt, v, mask, out, lse, n, s); break;
    case 64: run_rows<64>(qg, kt, v, mask, out, lse, n, s); break;
    case 128: run_rows<128>(qg, kt, v, mask, out, lse, n, s); break;
    default: TORCH_CHECK(false, "global_rows: head size ", qg.size(2), " (16, 32, 64 or 128 expected)");
  }
}

TORCH_LIBRARY(sparse_nlp, m) {
  m.def("global_rows(Tensor qg, Tensor kt, Tensor v, Tensor mask, Tensor(a!) out, Tensor(b!) lse, float scale) -> ()");
  m.def(
      "band_forward(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor ranges, Tensor kg, Tensor vg, Tensor gmask, "
      "Tensor(a!) kt, Tensor(b!) ktg, Tensor(c!) out, Tensor(d!) lse, int c, int left, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(sparse_nlp, CPU, m) {
  m.impl("band_forward", &band_forward);
  m.impl("global_rows", &global_rows);
}
