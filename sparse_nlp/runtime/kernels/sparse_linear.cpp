// Sparse-weight linear layers for CPUs: y = x W^T + b with W in compressed rows (CSR), in blocks of 2, 4 or 8
// rows (BSR), or N:M (N kept in every group of M inputs), fp32.
//
// One source, three code paths chosen at run time: AVX-512F, AVX2+FMA (x86-64, via target attributes and
// __builtin_cpu_supports) and portable C++ (any CPU; the compiler vectorizes it for its baseline ISA).
//
// Many tokens (SpMM): the tokens are packed into panels of TB = nv vectors (8 floats for AVX2 and the portable
// path, 16 for AVX-512): panel p holds x[p*TB:(p+1)*TB, :]^T as a (K, TB) block, so each nonzero weight w[n, k]
// updates TB tokens of output row n from one contiguous run of TB floats (`acc += w * panel[k, :]`), the
// accumulators stay in registers for the whole row, and a panel (K * TB * 4 bytes) stays in L2 while every output
// row of the thread passes over it. Threads take output rows in ranges of equal nonzero counts.
// One token (GEMV, batch-1 decoding): each row is a dot product of its values with the gathered inputs; the speed
// is set by the bytes of values and (narrow) column indices read.
// Blocks (`block_linear`): the same token panels; each panel row that a block reads feeds the block's R rows.
// An optional activation (GELU) is applied to each tile of outputs before it is written, in place of a separate
// pass over the output.
// Column indices are uint16 when in_features <= 65535, else int32; row offsets are int32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSE_NLP_X86 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <vector>

namespace {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

int64_t best_isa() {
#ifdef SPARSE_NLP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kPortable;
}

int64_t vector_width(int64_t isa) { return isa == kAvx512 ? 16 : 8; }

// ---- activation epilogue: applied to each tile of outputs while it is in L1, before it is written -------------
// GELU in its erf form, x / 2 * (1 + erf(x / sqrt 2)). The vector path takes erf from Abramowitz & Stegun 7.1.26
// (absolute error below 1.5e-7; the form of torch's own vectorized CPU GELU) and exp from a Cephes-style
// polynomial; the portable path calls std::erf.
enum Activation : int64_t { kNone = 0, kGelu = 1 };

using ActFn = void (*)(float*, int64_t);  // in place over n floats

void gelu_portable(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * 0.70710678118654752f));
}

#ifdef SPARSE_NLP_X86
__attribute__((target("avx2,fma"), always_inline)) inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln 2, ln 2 in two parts
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));  // * 2^n
}

__attribute__((target("avx2,fma"), always_inline)) inline __m256 gelu8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 az = _mm256_andnot_ps(sign, z);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), az, one));
  __m256 r = _mm256_set1_ps(1.061405429f);
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  r = _mm256_mul_ps(r, t);
  const __m256 erf_abs = _mm256_fnmadd_ps(r, exp_avx2(_mm256_mul_ps(_mm256_xor_ps(sign, az), az)), one);
  const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign, z));  // erf is odd
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(one, erf));
}

__attribute__((target("avx2,fma"))) void gelu_avx2(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
  if (i < n) {  // the tail through a full vector, so every element takes the same path
    alignas(32) float tail[8] = {0.f};
    std::memcpy(tail, x + i, (n - i) * sizeof(float));
    _mm256_store_ps(tail, gelu8(_mm256_load_ps(tail)));
    std::memcpy(x + i, tail, (n - i) * sizeof(float));
  }
}
#endif

// The activation's kernel for the ISA, nullptr for none (AVX-512 machines run the AVX2 one).
ActFn act_kernel(int64_t activation, int64_t isa) {
  TORCH_CHECK(activation == kNone || activation == kGelu, "sparse_linear: unknown activation ", activation);
  if (activation == kNone) return nullptr;
#ifdef SPARSE_NLP_X86
  if (isa != kPortable) return &gelu_avx2;
#endif
  (void)isa;
  return &gelu_portable;
}

// The bias as a contiguous fp32 tensor of `rows` values (held alive by `hold`), or nullptr when there is none.
const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t rows, at::Tensor& hold, const char* op) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  hold = bias->contiguous();
  TORCH_CHECK(hold.numel() == rows && hold.scalar_type() == at::kFloat, op, ": bad bias");
  return hold.data_ptr<float>();
}

// ---- one output row over one token panel: out[0:NV*W] = bias + sum_j v[j] * panel[c[j], 0:NV*W] --------------
// The panel and `out` are 64-byte aligned and a panel row is a whole number of vectors, so panel rows are read with
// aligned loads (an unaligned panel makes every 64-byte row span two cache lines).

template <int NV, typename I>
inline void row_portable(int32_t begin, int32_t end, const I* cols, const float* vals, const float* panel, float bias,
                         float* out) {
  constexpr int TB = NV * 8;
  float acc[TB];
  for (int i = 0; i < TB; ++i) acc[i] = bias;
  for (int32_t j = begin; j < end; ++j) {
    const float w = vals[j];
    const float* x = panel + static_cast<int64_t>(cols[j]) * TB;
    for (int i = 0; i < TB; ++i) acc[i] += w * x[i];
  }
  std::memcpy(out, acc, sizeof(acc));
}

#ifdef SPARSE_NLP_X86
template <int NV, typename I>
__attribute__((target("avx2,fma"), always_inline)) inline void row_avx2(int32_t begin, int32_t end, const I* cols,
                                                                         const float* vals, const float* panel,
                                                                         float bias, float* out) {
  constexpr int TB = NV * 8;
  // S accumulator sets over consecutive nonzeros: at least 8 independent FMA chains (FMA latency x 2 ports)
  constexpr int S = NV >= 8 ? 1 : (NV >= 4 ? 2 : 4);
  __m256 acc[S][NV];
  for (int s = 0; s < S; ++s)
    for (int i = 0; i < NV; ++i) acc[s][i] = s == 0 ? _mm256_set1_ps(bias) : _mm256_setzero_ps();
  int32_t j = begin;
  for (; j + S - 1 < end; j += S) {
    for (int s = 0; s < S; ++s) {
      const __m256 w = _mm256_broadcast_ss(vals + j + s);
      const float* x = panel + static_cast<int64_t>(cols[j + s]) * TB;
      for (int i = 0; i < NV; ++i) acc[s][i] = _mm256_fmadd_ps(w, _mm256_load_ps(x + 8 * i), acc[s][i]);
    }
  }
  for (; j < end; ++j) {
    const __m256 w = _mm256_broadcast_ss(vals + j);
    const float* x = panel + static_cast<int64_t>(cols[j]) * TB;
    for (int i = 0; i < NV; ++i) acc[0][i] = _mm256_fmadd_ps(w, _mm256_load_ps(x + 8 * i), acc[0][i]);
  }
  for (int i = 0; i < NV; ++i) {
    __m256 sum = acc[0][i];
    for (int s = 1; s < S; ++s) sum = _mm256_add_ps(sum, acc[s][i]);
    _mm256_store_ps(out + 8 * i, sum);
  }
}

template <int NV, typename I>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void row_avx512(int32_t begin, int32_t end,
                                                                                   const I* cols, const float* vals,
                                                                                   const float* panel, float bias,
                                                                                   float* out) {
  constexpr int TB = NV * 16;
  constexpr int S = NV >= 8 ? 1 : (NV >= 4 ? 2 : (NV >= 2 ? 4 : 8));
  __m512 acc[S][NV];
  for (int s = 0; s < S; ++s)
    for (int i = 0; i < NV; ++i) acc[s][i] = s == 0 ? _mm512_set1_ps(bias) : _mm512_setzero_ps();
  int32_t j = begin;
  for (; j + S - 1 < end; j += S) {
    for (int s = 0; s < S; ++s) {
      const __m512 w = _mm512_set1_ps(vals[j + s]);
      const float* x = panel + static_cast<int64_t>(cols[j + s]) * TB;
      for (int i = 0; i < NV; ++i) acc[s][i] = _mm512_fmadd_ps(w, _mm512_load_ps(x + 16 * i), acc[s][i]);
    }
  }
  for (; j < end; ++j) {
    const __m512 w = _mm512_set1_ps(vals[j]);
    const float* x = panel + static_cast<int64_t>(cols[j]) * TB;
    for (int i = 0; i < NV; ++i) acc[0][i] = _mm512_fmadd_ps(w, _mm512_load_ps(x + 16 * i), acc[0][i]);
  }
  for (int i = 0; i < NV; ++i) {
    __m512 sum = acc[0][i];
    for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][i]);
    _mm512_store_ps(out + 16 * i, sum);
  }
}

// 8 x 8 transpose: out[c * ldo + r] = in[r * ldi + c] for r, c < 8 (unaligned loads and stores).
__attribute__((target("avx2,fma"), always_inline)) inline void transpose8(const float* in, int64_t ldi, float* out,
                                                                           int64_t ldo) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ldi);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    r[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
    r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// A transposed copy of a block: out[c * ldo + r] = in[r * ldi + c] for r < nr, c < nc. The portable version
// copies one float at a time; the AVX2 one moves 8 x 8 blocks through registers (the edges one float at a time).
void transpose_portable(const float* in, int64_t ldi, float* out, int64_t ldo, int64_t nr, int64_t nc) {
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t c = 0; c < nc; ++c) out[c * ldo + r] = in[r * ldi + c];
}

#ifdef SPARSE_NLP_X86
__attribute__((target("avx2,fma"))) void transpose_avx2(const float* in, int64_t ldi, float* out, int64_t ldo,
                                                         int64_t nr, int64_t nc) {
  const int64_t r8 = nr / 8 * 8, c8 = nc / 8 * 8;
  for (int64_t r = 0; r < r8; r += 8)
    for (int64_t c = 0; c < c8; c += 8) transpose8(in + r * ldi + c, ldi, out + c * ldo + r, ldo);
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t c = r < r8 ? c8 : 0; c < nc; ++c) out[c * ldo + r] = in[r * ldi + c];
}
#endif

using TransposeFn = void (*)(const float*, int64_t, float*, int64_t, int64_t, int64_t);

TransposeFn transpose_kernel(int64_t isa) {
#ifdef SPARSE_NLP_X86
  if (isa != kPortable) return &transpose_avx2;
#endif
  (void)isa;
  return &transpose_portable;
}

// A 64-byte aligned float buffer.
struct AlignedFloats {
  explicit AlignedFloats(int64_t n)
      : ptr(static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>((n * 4 + 63) / 64 * 64)))) {
    TORCH_CHECK(ptr != nullptr, "sparse_linear: out of memory for a ", n, "-float buffer");
  }
  ~AlignedFloats() { std::free(ptr); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  float* ptr;
};

// ---- one token: y[n] = bias[n] + sum_j v[j] * x[c[j]] -----------------------------------------------------------

template <typename I>
float dot_portable(int32_t begin, int32_t end, const I* cols, const float* vals, const float* x) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  int32_t j = begin;
  for (; j + 3 < end; j += 4) {
    a0 += vals[j] * x[cols[j]];
    a1 += vals[j + 1] * x[cols[j + 1]];
    a2 += vals[j + 2] * x[cols[j + 2]];
    a3 += vals[j + 3] * x[cols[j + 3]];
  }
  for (; j < end; ++j) a0 += vals[j] * x[cols[j]];
  return (a0 + a1) + (a2 + a3);
}

#ifdef SPARSE_NLP_X86
// AMD's vgatherdps is slow (Zen 2/3): eight scalar loads into one vector, then one FMA, is faster there and no
// slower on Intel.
template <typename I>
__attribute__((target("avx2,fma"))) float dot_avx2(int32_t begin, int32_t end, const I* cols, const float* vals,
                                                   const float* x) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int32_t j = begin;
  for (; j + 15 < end; j += 16) {
    const I* c = cols + j;
    const __m256 x0 = _mm256_set_ps(x[c[7]], x[c[6]], x[c[5]], x[c[4]], x[c[3]], x[c[2]], x[c[1]], x[c[0]]);
    const __m256 x1 = _mm256_set_ps(x[c[15]], x[c[14]], x[c[13]], x[c[12]], x[c[11]], x[c[10]], x[c[9]], x[c[8]]);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + j), x0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + j + 8), x1, a1);
  }
  a0 = _mm256_add_ps(a0, a1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  float tail = _mm_cvtss_f32(s);
  for (; j < end; ++j) tail = std::fma(vals[j], x[cols[j]], tail);
  return tail;
}

__attribute__((target("avx512f"))) inline __m512i load_index16(const uint16_t* c) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)));
}
__attribute__((target("avx512f"))) inline __m512i load_index16(const int32_t* c) {
  return _mm512_loadu_si512(c);
}

template <typename I>
__attribute__((target("avx512f"))) float dot_avx512(int32_t begin, int32_t end, const I* cols, const float* vals,
                                                    const float* x) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int32_t j = begin;
  for (; j + 31 < end; j += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(vals + j), _mm512_i32gather_ps(load_index16(cols + j), x, 4), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(vals + j + 16), _mm512_i32gather_ps(load_index16(cols + j + 16), x, 4),
                         a1);
  }
  for (; j + 15 < end; j += 16)
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(vals + j), _mm512_i32gather_ps(load_index16(cols + j), x, 4), a0);
  float tail = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  for (; j < end; ++j) tail += vals[j] * x[cols[j]];
  return tail;
}
#endif

template <typename I>
using DotFn = float (*)(int32_t, int32_t, const I*, const float*, const float*);

template <typename I>
DotFn<I> dot_kernel(int64_t isa) {
#ifdef SPARSE_NLP_X86
  if (isa == kAvx512) return &dot_avx512<I>;
  if (isa == kAvx2) return &dot_avx2<I>;
#endif
  return &dot_portable<I>;
}

// ---- drivers -----------------------------------------------------------------------------------------------------

// Row ranges of about equal nonzero counts: bounds[c] .. bounds[c + 1] for c < chunks.
std::vector<int64_t> balanced_rows(const int32_t* rowptr, int64_t rows, int64_t chunks) {
  std::vector<int64_t> bounds(chunks + 1, rows);
  bounds[0] = 0;
  const int64_t nnz = rowptr[rows];
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = nnz * c / chunks;
    bounds[c] = std::lower_bound(rowptr, rowptr + rows + 1, target) - rowptr;
    bounds[c] = std::max(bounds[c], bounds[c - 1]);
  }
  return bounds;
}

template <typename I>
void gemv(const float* x, const int32_t* rowptr, const I* cols, const float* vals, const float* bias, float* y,
          int64_t rows, int64_t tokens, int64_t K, int64_t isa, ActFn act) {
  const DotFn<I> dot = dot_kernel<I>(isa);
  const int64_t nnz = rowptr[rows];
  // below ~16k multiply-adds per token the threads cost more than they save
  const int64_t chunks = nnz * tokens < 16384 ? 1 : std::min<int64_t>(at::get_num_threads() * 2, rows);
  const auto bounds = balanced_rows(rowptr, rows, std::max<int64_t>(chunks, 1));
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t t = 0; t < tokens; ++t) {
      const float* xt = x + t * K;
      float* yt = y + t * rows;
      for (int64_t n = bounds[cb]; n < bounds[ce]; ++n)
        yt[n] = dot(rowptr[n], rowptr[n + 1], cols, vals, xt) + (bias ? bias[n] : 0.f);
      if (act) act(yt + bounds[cb], bounds[ce] - bounds[cb]);
    }
  });
}

// The output rows [row_begin, row_end) over one packed panel of NV vectors of tokens (`real` of them real),
// written to y (tokens, rows) at the panel's offset `y_panel`: 8 rows at a time into an aligned (8, width) tile,
// then one transposed copy. One function per ISA (its target attribute lets the row kernel inline into the loop).
#define SPARSE_NLP_PANEL_ROWS(NAME, ROW, W)                                                                         \
  template <int NV, typename I>                                                                                     \
  void NAME(const int32_t* rowptr, const I* cols, const float* vals, const float* bias, const float* panel,         \
            float* tile, float* y_panel, int64_t rows, int64_t row_begin, int64_t row_end, int64_t real,            \
            TransposeFn transpose, ActFn act) {                                                                     \
    constexpr int64_t width = NV * W;                                                                               \
    for (int64_t n0 = row_begin; n0 < row_end; n0 += 8) {                                                           \
      const int64_t count = std::min<int64_t>(8, row_end - n0);                                                     \
      for (int64_t r = 0; r < count; ++r)                                                                           \
        ROW<NV, I>(rowptr[n0 + r], rowptr[n0 + r + 1], cols, vals, panel, bias ? bias[n0 + r] : 0.f,                \
                   tile + r * width);                                                                               \
      if (act) act(tile, count * width);                                                                            \
      transpose(tile, width, y_panel + n0, rows, count, real);                                                      \
    }                                                                                                               \
  }

SPARSE_NLP_PANEL_ROWS(panel_rows_portable, row_portable, 8)
#ifdef SPARSE_NLP_X86
SPARSE_NLP_PANEL_ROWS(__attribute__((target("avx2,fma"))) panel_rows_avx2, row_avx2, 8)
SPARSE_NLP_PANEL_ROWS(__attribute__((target("avx512f,avx2,fma"))) panel_rows_avx512, row_avx512, 16)
#endif
#undef SPARSE_NLP_PANEL_ROWS

template <typename I>
using PanelFn = void (*)(const int32_t*, const I*, const float*, const float*, const float*, float*, float*, int64_t,
                         int64_t, int64_t, int64_t, TransposeFn, ActFn);

#define SPARSE_NLP_PICK_NV(NAME, NV) \
  (NV) == 1 ? &NAME<1, I> : (NV) == 2 ? &NAME<2, I> : (NV) == 3 ? &NAME<3, I> : &NAME<4, I>

template <typename I>
PanelFn<I> panel_kernel(int64_t isa, int64_t nv) {
#ifdef SPARSE_NLP_X86
  if (isa == kAvx512) return SPARSE_NLP_PICK_NV(panel_rows_avx512, nv);
  if (isa == kAvx2) return SPARSE_NLP_PICK_NV(panel_rows_avx2, nv);
#endif
  return SPARSE_NLP_PICK_NV(panel_rows_portable, nv);
}
#undef SPARSE_NLP_PICK_NV

// Packs x[0:real, :] (rows of K floats) as a (K, width) panel, zeros in tokens [real, width).
void pack_panel(const float* src, int64_t real, int64_t K, int64_t width, float* panel, TransposeFn transpose) {
  for (int64_t k0 = 0; k0 < K; k0 += 64) {  // 64 input columns at a time: the source rows stay in L1
    const int64_t k1 = std::min(K, k0 + 64);
    if (real < width)
      for (int64_t k = k0; k < k1; ++k) std::memset(panel + k * width + real, 0, (width - real) * sizeof(float));
    transpose(src + k0, K, panel + k0 * width, width, real, k1 - k0);
  }
}

// Runs `rows_over(p, panel, tile, begin, end)` over every token panel p, after `pack(p, panel)`, for the row ranges
// of `bounds` (all `rows` when the threads split the panels). Panels and tiles hold `panel_floats` / `tile_floats`.
template <typename Pack, typename Rows>
void over_panels(int64_t n_panels, int64_t panel_floats, int64_t tile_floats, bool by_panels,
                 const std::vector<int64_t>& bounds, int64_t rows, Pack pack, Rows rows_over) {
  if (by_panels || bounds.size() == 2) {
    auto work = [&](int64_t pb, int64_t pe) {
      AlignedFloats tile(tile_floats);
      AlignedFloats panel(panel_floats);
      for (int64_t p = pb; p < pe; ++p) {
        pack(p, panel.ptr);
        rows_over(p, panel.ptr, tile.ptr, 0, rows);
      }
    };
    if (by_panels)
      at::parallel_for(0, n_panels, 1, work);
    else
      work(0, n_panels);
    return;
  }
  // threads over the rows of a few panels: the panels are packed once and shared (the threads pack them together),
  // not packed again by every thread
  AlignedFloats panels(n_panels * panel_floats);
  at::parallel_for(0, n_panels, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) pack(p, panels.ptr + p * panel_floats);
  });
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t cb, int64_t ce) {
    AlignedFloats tile(tile_floats);
    for (int64_t p = 0; p < n_panels; ++p) rows_over(p, panels.ptr + p * panel_floats, tile.ptr, bounds[cb], bounds[ce]);
  });
}

// With many panels each thread packs a token panel itself, right before it runs its output rows over it, so the
// panel is in L1/L2 when the rows' random column accesses hit it (packing all panels up front left them in DRAM at
// 4,096 tokens, 4x slower per panel). With fewer panels than 4 per thread the threads split the output rows, and
// the panels (fewer than 4 per thread, in L2/L3) are packed once for all of them.
template <typename I>
void spmm(const float* x, const int32_t* rowptr, const I* cols, const float* vals, const float* bias, float* y,
          int64_t rows, int64_t tokens, int64_t K, int64_t panel_tokens, int64_t W, int64_t isa, ActFn act) {
  const int64_t n_panels = (tokens + panel_tokens - 1) / panel_tokens;
  const int64_t last_tokens = tokens - (n_panels - 1) * panel_tokens;
  const int64_t last_nv = (last_tokens + W - 1) / W;
  const auto full = panel_kernel<I>(isa, panel_tokens / W);
  const auto last = panel_kernel<I>(isa, last_nv);
  // threads split the token panels when there are enough of them (each thread then packs only its own panels),
  // else the output rows, in ranges of equal nonzero counts
  const int64_t threads = at::get_num_threads();
  const bool by_panels = n_panels >= 4 * threads;
  const int64_t chunks = by_panels ? 1 : std::min<int64_t>(threads, (rows + 7) / 8);
  const auto bounds = balanced_rows(rowptr, rows, std::max<int64_t>(chunks, 1));
  const TransposeFn transpose = transpose_kernel(isa);
  auto pack = [&](int64_t p, float* panel) {
    const bool is_last = p == n_panels - 1;
    pack_panel(x + p * panel_tokens * K, is_last ? last_tokens : panel_tokens, K, is_last ? last_nv * W : panel_tokens,
               panel, transpose);
  };
  auto rows_over = [&](int64_t p, const float* panel, float* tile, int64_t row_begin, int64_t row_end) {
    const bool is_last = p == n_panels - 1;
    (is_last ? last : full)(rowptr, cols, vals, bias, panel, tile, y + p * panel_tokens * rows, rows, row_begin,
                            row_end, is_last ? last_tokens : panel_tokens, transpose, act);
  };
  over_panels(n_panels, K * panel_tokens, 8 * panel_tokens, by_panels, bounds, rows, pack, rows_over);
}

// Tokens per panel: 32 (4 AVX2 vectors, 2 AVX-512 vectors); the last panel of a call is narrower. More tokens per
// panel share each index and weight load among more tokens. SPARSE_NLP_RUNTIME_NV overrides the vector count (1-4),
// for tuning (benchmarks/sparse_runtime.py compares widths when run with it set).
int64_t panel_vectors(int64_t tokens, int64_t W) {
  int64_t nv = 32 / W;
  if (const char* e = std::getenv("SPARSE_NLP_RUNTIME_NV")) nv = std::max(1, std::min(4, std::atoi(e)));
  return std::max<int64_t>(1, std::min(nv, (tokens + W - 1) / W));
}

at::Tensor sparse_linear_2d(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& cols,
                            const at::Tensor& vals, const c10::optional<at::Tensor>& bias, int64_t in_features,
                            int64_t isa, int64_t activation) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "sparse_linear: x must be an fp32 CPU tensor");
  TORCH_CHECK(x.size(1) == in_features, "sparse_linear: x has ", x.size(1), " features, the weight ", in_features);
  TORCH_CHECK(rowptr.scalar_type() == at::kInt && vals.scalar_type() == at::kFloat, "sparse_linear: bad CSR dtypes");
  TORCH_CHECK(cols.scalar_type() == at::kUInt16 || cols.scalar_type() == at::kInt, "sparse_linear: bad index dtype");
  TORCH_CHECK(rowptr.is_contiguous() && cols.is_contiguous() && vals.is_contiguous(), "sparse_linear: CSR not contiguous");
  if (isa < 0 || isa > best_isa()) isa = best_isa();
  const ActFn act = act_kernel(activation, isa);
  const int64_t rows = rowptr.size(0) - 1, tokens = x.size(0), K = in_features;
  at::Tensor bias_c;
  const float* b = bias_data(bias, rows, bias_c, "sparse_linear");
  const at::Tensor xc = x.contiguous();
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  const float* v = vals.data_ptr<float>();
  const bool narrow = cols.scalar_type() == at::kUInt16;
  const void* c = cols.data_ptr();
  if (tokens == 0) return at::empty({0, rows}, x.options());
  if (tokens == 1) {
    at::Tensor y = at::empty({1, rows}, x.options());
    if (narrow)
      gemv(xc.data_ptr<float>(), rp, static_cast<const uint16_t*>(c), v, b, y.data_ptr<float>(), rows, 1, K, isa, act);
    else
      gemv(xc.data_ptr<float>(), rp, static_cast<const int32_t*>(c), v, b, y.data_ptr<float>(), rows, 1, K, isa, act);
    return y;
  }
  const int64_t W = vector_width(isa);
  const int64_t nv = panel_vectors(tokens, W);
  const int64_t TB = nv * W;
  at::Tensor y = at::empty({tokens, rows}, x.options());
  if (narrow)
    spmm(xc.data_ptr<float>(), rp, static_cast<const uint16_t*>(c), v, b, y.data_ptr<float>(), rows, tokens, K, TB, W,
         isa, act);
  else
    spmm(xc.data_ptr<float>(), rp, static_cast<const int32_t*>(c), v, b, y.data_ptr<float>(), rows, tokens, K, TB, W,
         isa, act);
  return y;
}

// ---- blocks of R output rows x C input columns (BSR) -------------------------------------------------------------
// browptr (rows / R + 1) int32: each row block's first block; bcols (nblocks): block columns (input column / C);
// vals (nblocks, C, R): each block column by column, the R row values of a column contiguous. Over a token panel,
// one load of a panel row feeds R rows (R x NV accumulators), which is what makes blocks faster than single
// nonzeros. (R, NV) = (2, 4), (4, 2), (8, 1): 8 accumulator vectors. AVX-512 machines run the AVX2 path here.

template <int R, int NV, typename I>
inline void brow_portable(int32_t begin, int32_t end, const I* bcols, const float* vals, int64_t C,
                          const float* panel, const float* bias, float* out) {
  constexpr int TB = NV * 8;
  float acc[R][TB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < TB; ++i) acc[r][i] = bias ? bias[r] : 0.f;
  for (int32_t b = begin; b < end; ++b) {
    const float* x = panel + static_cast<int64_t>(bcols[b]) * C * TB;
    const float* v = vals + static_cast<int64_t>(b) * C * R;
    for (int64_t c = 0; c < C; ++c, x += TB, v += R)
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < TB; ++i) acc[r][i] += v[r] * x[i];
  }
  std::memcpy(out, acc, sizeof(acc));
}

#ifdef SPARSE_NLP_X86
template <int R, int NV, typename I>
__attribute__((target("avx2,fma"), always_inline)) inline void brow_avx2(int32_t begin, int32_t end, const I* bcols,
                                                                          const float* vals, int64_t C,
                                                                          const float* panel, const float* bias,
                                                                          float* out) {
  constexpr int TB = NV * 8;
  __m256 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm256_set1_ps(bias ? bias[r] : 0.f);
  for (int32_t b = begin; b < end; ++b) {
    const float* x = panel + static_cast<int64_t>(bcols[b]) * C * TB;
    const float* v = vals + static_cast<int64_t>(b) * C * R;
    for (int64_t c = 0; c < C; ++c, x += TB, v += R) {
      __m256 xv[NV];
      for (int i = 0; i < NV; ++i) xv[i] = _mm256_load_ps(x + 8 * i);
      for (int r = 0; r < R; ++r) {
        const __m256 w = _mm256_broadcast_ss(v + r);
        for (int i = 0; i < NV; ++i) acc[r][i] = _mm256_fmadd_ps(w, xv[i], acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) _mm256_store_ps(out + r * TB + 8 * i, acc[r][i]);
}
#endif

// The row blocks [rb_begin, rb_end) over one packed panel: 8 / R row blocks (8 rows) into the tile, then one
// transposed copy into y (tokens, rows).
#define SPARSE_NLP_BLOCK_ROWS(NAME, BROW)                                                                          \
  template <int R, int NV, typename I>                                                                             \
  void NAME(const int32_t* browptr, const I* bcols, const float* vals, int64_t C, const float* bias,              \
            const float* panel, float* tile, float* y_panel, int64_t rows, int64_t rb_begin, int64_t rb_end,       \
            int64_t real, TransposeFn transpose, ActFn act) {                                                      \
    constexpr int64_t width = NV * 8, per_tile = 8 / R;                                                           \
    for (int64_t rb0 = rb_begin; rb0 < rb_end; rb0 += per_tile) {                                                  \
      const int64_t count = std::min<int64_t>(per_tile, rb_end - rb0);                                             \
      for (int64_t q = 0; q < count; ++q)                                                                          \
        BROW<R, NV, I>(browptr[rb0 + q], browptr[rb0 + q + 1], bcols, vals, C, panel,                              \
                       bias ? bias + (rb0 + q) * R : nullptr, tile + q * R * width);                               \
      if (act) act(tile, count * R * width);                                                                       \
      transpose(tile, width, y_panel + rb0 * R, rows, count * R, real);                                            \
    }                                                                                                              \
  }

SPARSE_NLP_BLOCK_ROWS(block_rows_portable, brow_portable)
#ifdef SPARSE_NLP_X86
SPARSE_NLP_BLOCK_ROWS(__attribute__((target("avx2,fma"))) block_rows_avx2, brow_avx2)
#endif
#undef SPARSE_NLP_BLOCK_ROWS

template <typename I>
using BlockFn = void (*)(const int32_t*, const I*, const float*, int64_t, const float*, const float*, float*, float*,
                         int64_t, int64_t, int64_t, int64_t, TransposeFn, ActFn);

template <typename I>
BlockFn<I> block_kernel(int64_t isa, int64_t R) {
#ifdef SPARSE_NLP_X86
  if (isa != kPortable)
    return R == 2 ? &block_rows_avx2<2, 4, I> : R == 4 ? &block_rows_avx2<4, 2, I> : &block_rows_avx2<8, 1, I>;
#endif
  return R == 2 ? &block_rows_portable<2, 4, I>
                : R == 4 ? &block_rows_portable<4, 2, I> : &block_rows_portable<8, 1, I>;
}

// One token (batch-1 decoding) over blocks: y[rb*R : rb*R+R] = bias + sum over the row block's blocks and their
// columns c of vals[b, c, 0:R] * x[block column * C + c]: the R values of a column are contiguous, so the weights
// stream in order and each input is read once per block column.
template <int R, typename I>
void bgemv_portable(const float* x, const int32_t* browptr, const I* bcols, const float* vals, int64_t C,
                    const float* bias, float* y, int64_t rb_begin, int64_t rb_end) {
  for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
    float acc[R];
    for (int r = 0; r < R; ++r) acc[r] = bias ? bias[rb * R + r] : 0.f;
    for (int32_t b = browptr[rb]; b < browptr[rb + 1]; ++b) {
      const float* xb = x + static_cast<int64_t>(bcols[b]) * C;
      const float* v = vals + static_cast<int64_t>(b) * C * R;
      for (int64_t c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) acc[r] += v[c * R + r] * xb[c];
    }
    for (int r = 0; r < R; ++r) y[rb * R + r] = acc[r];
  }
}

#ifdef SPARSE_NLP_X86
template <int R, typename I>
__attribute__((target("avx2,fma"))) void bgemv_avx2(const float* x, const int32_t* browptr, const I* bcols,
                                                     const float* vals, int64_t C, const float* bias, float* y,
                                                     int64_t rb_begin, int64_t rb_end) {
  if constexpr (R == 8) {
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      __m256 acc0 = bias ? _mm256_loadu_ps(bias + rb * 8) : _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (int32_t b = browptr[rb]; b < browptr[rb + 1]; ++b) {
        const float* xb = x + static_cast<int64_t>(bcols[b]) * C;
        const float* v = vals + static_cast<int64_t>(b) * C * 8;
        int64_t c = 0;
        for (; c + 1 < C; c += 2) {
          acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + c * 8), _mm256_broadcast_ss(xb + c), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + c * 8 + 8), _mm256_broadcast_ss(xb + c + 1), acc1);
        }
        if (c < C) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + c * 8), _mm256_broadcast_ss(xb + c), acc0);
      }
      _mm256_storeu_ps(y + rb * 8, _mm256_add_ps(acc0, acc1));
    }
  } else if constexpr (R == 4) {
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      __m128 acc0 = bias ? _mm_loadu_ps(bias + rb * 4) : _mm_setzero_ps(), acc1 = _mm_setzero_ps();
      for (int32_t b = browptr[rb]; b < browptr[rb + 1]; ++b) {
        const float* xb = x + static_cast<int64_t>(bcols[b]) * C;
        const float* v = vals + static_cast<int64_t>(b) * C * 4;
        int64_t c = 0;
        for (; c + 1 < C; c += 2) {
          acc0 = _mm_fmadd_ps(_mm_loadu_ps(v + c * 4), _mm_broadcast_ss(xb + c), acc0);
          acc1 = _mm_fmadd_ps(_mm_loadu_ps(v + c * 4 + 4), _mm_broadcast_ss(xb + c + 1), acc1);
        }
        if (c < C) acc0 = _mm_fmadd_ps(_mm_loadu_ps(v + c * 4), _mm_broadcast_ss(xb + c), acc0);
      }
      _mm_storeu_ps(y + rb * 4, _mm_add_ps(acc0, acc1));
    }
  } else {
    bgemv_portable<R, I>(x, browptr, bcols, vals, C, bias, y, rb_begin, rb_end);
  }
}
#endif

template <typename I>
void block_gemv(const float* x, const int32_t* browptr, const I* bcols, const float* vals, const float* bias,
                float* y, int64_t rows, int64_t tokens, int64_t K, int64_t R, int64_t C, int64_t isa, ActFn act) {
  using Fn = void (*)(const float*, const int32_t*, const I*, const float*, int64_t, const float*, float*, int64_t,
                      int64_t);
  Fn fn = R == 2 ? &bgemv_portable<2, I> : R == 4 ? &bgemv_portable<4, I> : &bgemv_portable<8, I>;
#ifdef SPARSE_NLP_X86
  if (isa != kPortable) fn = R == 2 ? &bgemv_avx2<2, I> : R == 4 ? &bgemv_avx2<4, I> : &bgemv_avx2<8, I>;
#endif
  const int64_t row_blocks = rows / R;
  const int64_t work = static_cast<int64_t>(browptr[row_blocks]) * R * C * tokens;
  const int64_t chunks = work < 16384 ? 1 : std::min<int64_t>(at::get_num_threads() * 2, row_blocks);
  const auto bounds = balanced_rows(browptr, row_blocks, std::max<int64_t>(chunks, 1));
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t t = 0; t < tokens; ++t) {
      fn(x + t * K, browptr, bcols, vals, C, bias, y + t * rows, bounds[cb], bounds[ce]);
      if (act) act(y + t * rows + bounds[cb] * R, (bounds[ce] - bounds[cb]) * R);
    }
  });
}

template <typename I>
void block_spmm(const float* x, const int32_t* browptr, const I* bcols, const float* vals, const float* bias,
                float* y, int64_t rows, int64_t tokens, int64_t K, int64_t R, int64_t C, int64_t isa, ActFn act) {
  const int64_t width = 8 * (R == 2 ? 4 : R == 4 ? 2 : 1);  // tokens per panel
  const int64_t n_panels = (tokens + width - 1) / width;
  const BlockFn<I> fn = block_kernel<I>(isa, R);
  const TransposeFn transpose = transpose_kernel(isa);
  const int64_t row_blocks = rows / R;
  const int64_t threads = at::get_num_threads();
  const bool by_panels = n_panels >= 4 * threads;
  const int64_t chunks = by_panels ? 1 : std::min<int64_t>(threads, (row_blocks + 7) / 8);
  const auto bounds = balanced_rows(browptr, row_blocks, std::max<int64_t>(chunks, 1));
  auto pack = [&](int64_t p, float* panel) {
    pack_panel(x + p * width * K, std::min(width, tokens - p * width), K, width, panel, transpose);
  };
  auto rows_over = [&](int64_t p, const float* panel, float* tile, int64_t rb_begin, int64_t rb_end) {
    fn(browptr, bcols, vals, C, bias, panel, tile, y + p * width * rows, rows, rb_begin, rb_end,
       std::min(width, tokens - p * width), transpose, act);
  };
  over_panels(n_panels, K * width, 8 * width, by_panels, bounds, row_blocks, pack, rows_over);
}

at::Tensor block_linear_2d(const at::Tensor& x, const at::Tensor& browptr, const at::Tensor& bcols,
                           const at::Tensor& vals, const c10::optional<at::Tensor>& bias, int64_t in_features,
                           int64_t block_rows, int64_t block_cols, int64_t isa, int64_t activation) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "block_linear: x must be an fp32 CPU tensor");
  TORCH_CHECK(x.size(1) == in_features, "block_linear: x has ", x.size(1), " features, the weight ", in_features);
  TORCH_CHECK(block_rows == 2 || block_rows == 4 || block_rows == 8, "block_linear: block rows must be 2, 4 or 8");
  TORCH_CHECK(block_cols >= 1 && in_features % block_cols == 0, "block_linear: bad block columns");
  TORCH_CHECK(browptr.scalar_type() == at::kInt && vals.scalar_type() == at::kFloat, "block_linear: bad dtypes");
  TORCH_CHECK(bcols.scalar_type() == at::kUInt16 || bcols.scalar_type() == at::kInt, "block_linear: bad index dtype");
  TORCH_CHECK(browptr.is_contiguous() && bcols.is_contiguous() && vals.is_contiguous(),
              "block_linear: blocks not contiguous");
  const int64_t rows = (browptr.size(0) - 1) * block_rows, tokens = x.size(0);
  TORCH_CHECK(vals.numel() == bcols.numel() * block_rows * block_cols, "block_linear: values do not match blocks");
  if (isa < 0 || isa > best_isa()) isa = best_isa();
  const ActFn act = act_kernel(activation, isa);
  at::Tensor bias_c;
  const float* b = bias_data(bias, rows, bias_c, "block_linear");
  at::Tensor y = at::empty({tokens, rows}, x.options());
  if (tokens == 0) return y;
  const at::Tensor xc = x.contiguous();
  if (tokens <= 2) {  // decoding: stream the weights once per token
    if (bcols.scalar_type() == at::kUInt16)
      block_gemv(xc.data_ptr<float>(), browptr.data_ptr<int32_t>(), static_cast<const uint16_t*>(bcols.data_ptr()),
                 vals.data_ptr<float>(), b, y.data_ptr<float>(), rows, tokens, in_features, block_rows, block_cols,
                 isa, act);
    else
      block_gemv(xc.data_ptr<float>(), browptr.data_ptr<int32_t>(), static_cast<const int32_t*>(bcols.data_ptr()),
                 vals.data_ptr<float>(), b, y.data_ptr<float>(), rows, tokens, in_features, block_rows, block_cols,
                 isa, act);
    return y;
  }
  if (bcols.scalar_type() == at::kUInt16)
    block_spmm(xc.data_ptr<float>(), browptr.data_ptr<int32_t>(), static_cast<const uint16_t*>(bcols.data_ptr()),
               vals.data_ptr<float>(), b, y.data_ptr<float>(), rows, tokens, in_features, block_rows, block_cols,
               isa, act);
  else
    block_spmm(xc.data_ptr<float>(), browptr.data_ptr<int32_t>(), static_cast<const int32_t*>(bcols.data_ptr()),
               vals.data_ptr<float>(), b, y.data_ptr<float>(), rows, tokens, in_features, block_rows, block_cols,
               isa, act);
  return y;
}

// ---- N:M weights (`nm_linear`) ----------------------------------------------------------------------------------
// In every group of M consecutive inputs (M = 4 or 8) each output row keeps exactly N weights (N <= M / 2). Rows go
// in blocks of 8: vals (row blocks, G, N, 8) holds the s-th kept weight of group g for each of the block's 8 rows, and
// idx (row blocks, G, N) int32 their positions in the group, 4 bits per row (row r in bits 4r..4r+3); rows past the
// last are padding with zero weights. The AVX2 path vectorizes over the 8 rows: per token and group it loads the
// group's M inputs once (4 floats into both halves, or 8 floats), gives each row its input with one permute (in-lane
// for M = 4, across lanes for M = 8; the permutes read the low 2 or 3 bits of each lane of the shifted positions)
// and multiplies it by the 8 rows' weights. A group's weights and positions are loaded once for up to 8 tokens. x
// and y stay in their own layouts: no token panels, no transposes. AVX-512 machines run the AVX2 path.

void nm_block_portable(const float* x, int64_t M, int64_t N, const float* vals, const int32_t* idx, int64_t G,
                       const float* bias, float* y, int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    float acc = bias ? bias[r] : 0.f;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t s = 0; s < N; ++s) {
        const int64_t pos = (static_cast<uint32_t>(idx[g * N + s]) >> (4 * r)) & 15u;
        acc += vals[(g * N + s) * 8 + r] * x[g * M + pos];
      }
    y[r] = acc;
  }
}

#ifdef SPARSE_NLP_X86
// T tokens (rows of x, K apart) through one block of 8 rows (`count` of them real), into y (rows `ldy` apart).
template <int T, int M, int N>
__attribute__((target("avx2,fma"))) void nm_block_avx2(const float* x, int64_t K, const float* vals, const int32_t* idx,
                                                      int64_t G, const float* bias, float* y, int64_t ldy,
                                                      int64_t count, ActFn act) {
  alignas(32) float start[8] = {0.f};
  if (bias) std::memcpy(start, bias, count * sizeof(float));
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_load_ps(start);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  for (int64_t g = 0; g < G; ++g) {
    __m256 v[N];
    __m256i c[N];
    for (int s = 0; s < N; ++s) {
      v[s] = _mm256_loadu_ps(vals + (g * N + s) * 8);
      c[s] = _mm256_srlv_epi32(_mm256_set1_epi32(idx[g * N + s]), shifts);
    }
    for (int t = 0; t < T; ++t) {
      if constexpr (M == 4) {
        const __m256 in = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + t * K + 4 * g));
        for (int s = 0; s < N; ++s) acc[t] = _mm256_fmadd_ps(v[s], _mm256_permutevar_ps(in, c[s]), acc[t]);
      } else {
        const __m256 in = _mm256_loadu_ps(x + t * K + 8 * g);
        for (int s = 0; s < N; ++s) acc[t] = _mm256_fmadd_ps(v[s], _mm256_permutevar8x32_ps(in, c[s]), acc[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    float* out = y + t * ldy;
    if (count == 8) {
      _mm256_storeu_ps(out, acc[t]);
    } else {
      alignas(32) float tail[8];
      _mm256_store_ps(tail, acc[t]);
      std::memcpy(out, tail, count * sizeof(float));
    }
    if (act) act(out, count);
  }
}

// Tokens per pass over a block's weights: 8 accumulators, or 6 where N = 3, 4 need 8 registers for the group.
constexpr int64_t nm_tokens(int64_t n) { return n <= 2 ? 8 : 6; }

template <int M, int N>
void nm_tokens_avx2(int64_t T, const float* x, int64_t K, const float* vals, const int32_t* idx, int64_t G,
                    const float* bias, float* y, int64_t ldy, int64_t count, ActFn act) {
#define SPARSE_NLP_NM_T(n) \
  case n:                  \
    return nm_block_avx2<n, M, N>(x, K, vals, idx, G, bias, y, ldy, count, act);
  switch (T) {
    SPARSE_NLP_NM_T(1)
    SPARSE_NLP_NM_T(2)
    SPARSE_NLP_NM_T(3)
    SPARSE_NLP_NM_T(4)
    SPARSE_NLP_NM_T(5)
    SPARSE_NLP_NM_T(6)
    SPARSE_NLP_NM_T(7)
    default:
      return nm_block_avx2<8, M, N>(x, K, vals, idx, G, bias, y, ldy, count, act);
  }
#undef SPARSE_NLP_NM_T
}
#endif

using NmFn = void (*)(int64_t, const float*, int64_t, const float*, const int32_t*, int64_t, const float*, float*,
                      int64_t, int64_t, ActFn);

// The AVX2 kernel and its tokens per pass for (N, M), or nullptr (the portable path).
NmFn nm_kernel(int64_t n, int64_t m, int64_t isa, int64_t* per_pass) {
  *per_pass = 1;
#ifdef SPARSE_NLP_X86
  if (isa != kPortable) {
#define SPARSE_NLP_NM(M_, N_)                  \
  if (m == M_ && n == N_) {                    \
    *per_pass = nm_tokens(N_);                 \
    return &nm_tokens_avx2<M_, N_>;            \
  }
    SPARSE_NLP_NM(4, 1)
    SPARSE_NLP_NM(4, 2)
    SPARSE_NLP_NM(8, 1)
    SPARSE_NLP_NM(8, 2)
    SPARSE_NLP_NM(8, 3)
    SPARSE_NLP_NM(8, 4)
#undef SPARSE_NLP_NM
  }
#endif
  (void)n, (void)m, (void)isa;
  return nullptr;
}

at::Tensor nm_linear_2d(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& vals,
                        const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t out_features, int64_t n,
                        int64_t m, int64_t isa, int64_t activation) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "nm_linear: x must be an fp32 CPU tensor");
  TORCH_CHECK(x.size(1) == in_features, "nm_linear: x has ", x.size(1), " features, the weight ", in_features);
  TORCH_CHECK((m == 4 || m == 8) && n >= 1 && n <= m / 2 && in_features % m == 0,
              "nm_linear: unsupported pattern ", n, ":", m, " for ", in_features, " inputs");
  const int64_t G = in_features / m, blocks = (out_features + 7) / 8;
  TORCH_CHECK(idx.scalar_type() == at::kInt && vals.scalar_type() == at::kFloat && idx.is_contiguous() &&
                  vals.is_contiguous(),
              "nm_linear: idx must be contiguous int32 and vals contiguous fp32");
  TORCH_CHECK(idx.numel() == blocks * G * n && vals.numel() == blocks * G * n * 8,
              "nm_linear: idx / vals do not match a ", out_features, " x ", in_features, " weight at ", n, ":", m);
  if (isa < 0 || isa > best_isa()) isa = best_isa();
  const ActFn act = act_kernel(activation, isa);
  at::Tensor bias_c;
  const float* b = bias_data(bias, out_features, bias_c, "nm_linear");
  const int64_t tokens = x.size(0);
  at::Tensor y = at::empty({tokens, out_features}, x.options());
  if (tokens == 0 || out_features == 0) return y;
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  const float* vp = vals.data_ptr<float>();
  const int32_t* ip = idx.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  int64_t per_pass = 1;
  const NmFn fn = nm_kernel(n, m, isa, &per_pass);
  // threads take blocks of rows; a call too small to share (a small layer at batch-1 decoding) stays on one thread
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, G * n * 8 * tokens));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t t0 = 0; t0 < tokens; t0 += per_pass) {
      const int64_t T = std::min(per_pass, tokens - t0);
      for (int64_t rb = b0; rb < b1; ++rb) {
        const int64_t count = std::min<int64_t>(8, out_features - rb * 8);
        const float* v = vp + rb * G * n * 8;
        const int32_t* ix = ip + rb * G * n;
        const float* bb = b ? b + rb * 8 : nullptr;
        if (fn) {
          fn(T, xp + t0 * in_features, in_features, v, ix, G, bb, yp + t0 * out_features + rb * 8, out_features,
             count, act);
        } else {
          for (int64_t t = t0; t < t0 + T; ++t) {
            float* out = yp + t * out_features + rb * 8;
            nm_block_portable(xp + t * in_features, m, n, v, ix, G, bb, out, count);
            if (act) act(out, count);
          }
        }
      }
    }
  });
  return y;
}

// The ops take x of any shape (..., in_features) and return (..., out_features): the reshapes cost far less here
// than in Python, which matters at batch-1 decoding (one call per layer per token).
std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t rows) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = rows;
  return sizes;
}

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& cols,
                         const at::Tensor& vals, const c10::optional<at::Tensor>& bias, int64_t in_features,
                         int64_t isa, int64_t activation) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "sparse_linear: x has ", x.dim() ? x.size(-1) : 0,
              " features, the weight ", in_features);
  if (x.dim() == 2) return sparse_linear_2d(x, rowptr, cols, vals, bias, in_features, isa, activation);
  const at::Tensor y =
      sparse_linear_2d(x.reshape({-1, in_features}), rowptr, cols, vals, bias, in_features, isa, activation);
  return y.view(out_sizes(x, y.size(1)));
}

at::Tensor block_linear(const at::Tensor& x, const at::Tensor& browptr, const at::Tensor& bcols,
                        const at::Tensor& vals, const c10::optional<at::Tensor>& bias, int64_t in_features,
                        int64_t block_rows, int64_t block_cols, int64_t isa, int64_t activation) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "block_linear: x has ", x.dim() ? x.size(-1) : 0,
              " features, the weight ", in_features);
  if (x.dim() == 2)
    return block_linear_2d(x, browptr, bcols, vals, bias, in_features, block_rows, block_cols, isa, activation);
  const at::Tensor y = block_linear_2d(x.reshape({-1, in_features}), browptr, bcols, vals, bias, in_features,
                                       block_rows, block_cols, isa, activation);
  return y.view(out_sizes(x, y.size(1)));
}

at::Tensor nm_linear(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& vals,
                     const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t out_features, int64_t n,
                     int64_t m, int64_t isa, int64_t activation) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "nm_linear: x has ", x.dim() ? x.size(-1) : 0,
              " features, the weight ", in_features);
  if (x.dim() == 2) return nm_linear_2d(x, idx, vals, bias, in_features, out_features, n, m, isa, activation);
  const at::Tensor y =
      nm_linear_2d(x.reshape({-1, in_features}), idx, vals, bias, in_features, out_features, n, m, isa, activation);
  return y.view(out_sizes(x, y.size(1)));
}

int64_t cpu_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY(sparse_nlp_runtime, m) {
  m.def(
      "sparse_linear(Tensor x, Tensor rowptr, Tensor cols, Tensor vals, Tensor? bias, int in_features, int isa, "
      "int activation=0) -> Tensor");
  m.def(
      "block_linear(Tensor x, Tensor browptr, Tensor bcols, Tensor vals, Tensor? bias, int in_features, "
      "int block_rows, int block_cols, int isa, int activation=0) -> Tensor");
  m.def(
      "nm_linear(Tensor x, Tensor idx, Tensor vals, Tensor? bias, int in_features, int out_features, int n, int m, "
      "int isa, int activation=0) -> Tensor");
  m.def("cpu_isa() -> int", &cpu_isa);
}

TORCH_LIBRARY_IMPL(sparse_nlp_runtime, CPU, m) {
  m.impl("sparse_linear", &sparse_linear);
  m.impl("block_linear", &block_linear);
  m.impl("nm_linear", &nm_linear);
}
