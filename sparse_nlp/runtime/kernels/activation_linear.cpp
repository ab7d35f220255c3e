// Linear layers with dynamically sparse inputs, for CPUs: y = x_s W^T + b, fp32, where x_s keeps the entries of x
// with |x| > threshold and zeroes the others (TEAL / CATS activation sparsity).
//
// The weight is stored transposed, Wt (in, out) with contiguous rows, so each kept input i adds x_i * Wt[i, :] to
// the output: the weight rows of zeroed inputs are never read, and at batch 1 (decoding, memory bound) the bytes
// read fall with the activation sparsity. Per token: the kept (index, value) pairs are gathered first; then each
// thread takes a range of output columns and streams the kept rows over it four at a time (one load and store of
// the output chunk per four rows).
//
// With weight sparsity as well (`masked_activation_linear`), the transposed weight is stored compressed: the
// outputs of each input row in chunks of 64, one 64-bit mask per (row, chunk) saying which weights are kept, the
// kept weights of the row in order (`vals`), and the offset of each (row, chunk)'s first kept weight. Each thread
// takes a range of chunks and reads each kept input's part of the row front to back, adding it to the range's
// outputs (in L1); a kept weight is read once and a pruned one never (AVX-512: expanding loads; AVX2: a permute
// from a 256-entry table per byte of the mask). At 50% weight sparsity that is 2.2 bytes per weight of a kept
// input instead of 4.
//
// One source, three code paths chosen at run time: AVX-512F, AVX2+FMA (x86-64, target attributes and
// __builtin_cpu_supports) and portable C++ (any CPU; the compiler vectorizes it for its baseline ISA).
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

// y[c0:c1] += sum_j v[j] * wt[idx[j] * out + c0 : ... + c1]   over the n kept inputs
void accumulate_portable(const int64_t* idx, const float* v, int64_t n, const float* wt, int64_t out, int64_t c0,
                         int64_t c1, float* y) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* r0 = wt + idx[j] * out;
    const float* r1 = wt + idx[j + 1] * out;
    const float* r2 = wt + idx[j + 2] * out;
    const float* r3 = wt + idx[j + 3] * out;
    const float a0 = v[j], a1 = v[j + 1], a2 = v[j + 2], a3 = v[j + 3];
    for (int64_t c = c0; c < c1; ++c) y[c] += a0 * r0[c] + a1 * r1[c] + a2 * r2[c] + a3 * r3[c];
  }
  for (; j < n; ++j) {
    const float* r = wt + idx[j] * out;
    const float a = v[j];
    for (int64_t c = c0; c < c1; ++c) y[c] += a * r[c];
  }
}

#ifdef SPARSE_NLP_X86
__attribute__((target("avx2,fma"))) void accumulate_avx2(const int64_t* idx, const float* v, int64_t n,
                                                          const float* wt, int64_t out, int64_t c0, int64_t c1,
                                                          float* y) {
  const int64_t vend = c0 + ((c1 - c0) / 8) * 8;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* r0 = wt + idx[j] * out;
    const float* r1 = wt + idx[j + 1] * out;
    const float* r2 = wt + idx[j + 2] * out;
    const float* r3 = wt + idx[j + 3] * out;
    const __m256 a0 = _mm256_set1_ps(v[j]), a1 = _mm256_set1_ps(v[j + 1]);
    const __m256 a2 = _mm256_set1_ps(v[j + 2]), a3 = _mm256_set1_ps(v[j + 3]);
    int64_t c = c0;
    for (; c < vend; c += 8) {
      __m256 s0 = _mm256_loadu_ps(y + c);
      __m256 s1 = _mm256_mul_ps(a1, _mm256_loadu_ps(r1 + c));
      s0 = _mm256_fmadd_ps(a0, _mm256_loadu_ps(r0 + c), s0);
      s1 = _mm256_fmadd_ps(a3, _mm256_loadu_ps(r3 + c), s1);
      s0 = _mm256_fmadd_ps(a2, _mm256_loadu_ps(r2 + c), s0);
      _mm256_storeu_ps(y + c, _mm256_add_ps(s0, s1));
    }
    for (; c < c1; ++c) y[c] += v[j] * r0[c] + v[j + 1] * r1[c] + v[j + 2] * r2[c] + v[j + 3] * r3[c];
  }
  for (; j < n; ++j) {
    const float* r = wt + idx[j] * out;
    const __m256 a = _mm256_set1_ps(v[j]);
    int64_t c = c0;
    for (; c < vend; c += 8) _mm256_storeu_ps(y + c, _mm256_fmadd_ps(a, _mm256_loadu_ps(r + c), _mm256_loadu_ps(y + c)));
    for (; c < c1; ++c) y[c] += v[j] * r[c];
  }
}

__attribute__((target("avx512f"))) void accumulate_avx512(const int64_t* idx, const float* v, int64_t n,
                                                           const float* wt, int64_t out, int64_t c0, int64_t c1,
                                                           float* y) {
  const int64_t vend = c0 + ((c1 - c0) / 16) * 16;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* r0 = wt + idx[j] * out;
    const float* r1 = wt + idx[j + 1] * out;
    const float* r2 = wt + idx[j + 2] * out;
    const float* r3 = wt + idx[j + 3] * out;
    const __m512 a0 = _mm512_set1_ps(v[j]), a1 = _mm512_set1_ps(v[j + 1]);
    const __m512 a2 = _mm512_set1_ps(v[j + 2]), a3 = _mm512_set1_ps(v[j + 3]);
    int64_t c = c0;
    for (; c < vend; c += 16) {
      __m512 s0 = _mm512_loadu_ps(y + c);
      __m512 s1 = _mm512_mul_ps(a1, _mm512_loadu_ps(r1 + c));
      s0 = _mm512_fmadd_ps(a0, _mm512_loadu_ps(r0 + c), s0);
      s1 = _mm512_fmadd_ps(a3, _mm512_loadu_ps(r3 + c), s1);
      s0 = _mm512_fmadd_ps(a2, _mm512_loadu_ps(r2 + c), s0);
      _mm512_storeu_ps(y + c, _mm512_add_ps(s0, s1));
    }
    for (; c < c1; ++c) y[c] += v[j] * r0[c] + v[j + 1] * r1[c] + v[j + 2] * r2[c] + v[j + 3] * r3[c];
  }
  for (; j < n; ++j) {
    const float* r = wt + idx[j] * out;
    const __m512 a = _mm512_set1_ps(v[j]);
    int64_t c = c0;
    for (; c < vend; c += 16)
      _mm512_storeu_ps(y + c, _mm512_fmadd_ps(a, _mm512_loadu_ps(r + c), _mm512_loadu_ps(y + c)));
    for (; c < c1; ++c) y[c] += v[j] * r[c];
  }
}
#endif

void accumulate(const int64_t* idx, const float* v, int64_t n, const float* wt, int64_t out, int64_t c0, int64_t c1,
                float* y, int64_t isa) {
#ifdef SPARSE_NLP_X86
  if (isa == kAvx512) return accumulate_avx512(idx, v, n, wt, out, c0, c1, y);
  if (isa == kAvx2) return accumulate_avx2(idx, v, n, wt, out, c0, c1, y);
#endif
  accumulate_portable(idx, v, n, wt, out, c0, c1, y);
}

// The bias as a float pointer (null when there is none), checked against `out` outputs; `holder` keeps it alive.
const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t out, const char* op, at::Tensor& holder) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  holder = bias->contiguous();
  TORCH_CHECK(holder.numel() == out && holder.scalar_type() == at::kFloat, op, ": bad bias");
  return holder.data_ptr<float>();
}

// For each token r of x (tokens, in): fn(r, n, idx, val) with the n inputs of |x| > t, their indices and values.
template <typename Fn>
void each_token(const float* x, int64_t tokens, int64_t in, float t, Fn fn) {
  std::vector<int64_t> idx(in);
  std::vector<float> val(in);
  for (int64_t r = 0; r < tokens; ++r) {
    const float* xr = x + r * in;
    int64_t n = 0;
    for (int64_t i = 0; i < in; ++i) {
      if (std::fabs(xr[i]) > t) {
        idx[n] = i;
        val[n] = xr[i];
        ++n;
      }
    }
    fn(r, n, idx.data(), val.data());
  }
}

constexpr int64_t kColumnGrain = 256;  // output columns per parallel task at least (1 KiB of each weight row)

at::Tensor activation_linear(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                             double threshold, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "activation_linear: x must be a 2-D fp32 CPU tensor");
  TORCH_CHECK(wt.dim() == 2 && wt.scalar_type() == at::kFloat && wt.is_contiguous() && wt.device().is_cpu(),
              "activation_linear: the transposed weight must be a contiguous 2-D fp32 CPU tensor");
  TORCH_CHECK(x.size(1) == wt.size(0), "activation_linear: x has ", x.size(1), " features, the weight ", wt.size(0));
  if (isa < 0 || isa > best_isa()) isa = best_isa();
  const int64_t tokens = x.size(0), in = wt.size(0), out = wt.size(1);
  at::Tensor bias_c;
  const float* b = bias_data(bias, out, "activation_linear", bias_c);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({tokens, out}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* w = wt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float t = static_cast<float>(threshold);
  each_token(xp, tokens, in, t, [&](int64_t r, int64_t n, const int64_t* idx, const float* val) {
    float* yr = yp + r * out;
    at::parallel_for(0, out, kColumnGrain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) yr[c] = b ? b[c] : 0.0f;
      accumulate(idx, val, n, w, out, c0, c1, yr, isa);
    });
  });
  return y;
}

// ---- compressed weights: 64-output chunks with a bitmask each ------------------------------------------------

constexpr int64_t kChunk = 64;

// y[64 * c0 : 64 * c1] += sum_j v[j] * (row idx[j] of the compressed weight, chunks c0..c1): each kept input's
// row is read front to back over the range (the part of the row a thread owns is one contiguous run of `vals`)
void chunks_portable(const int64_t* idx, const float* v, int64_t n, const uint64_t* bits, const int32_t* offs,
                     const float* vals, int64_t chunks, int64_t c0, int64_t c1, float* y) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t row = idx[j] * chunks;
    const float* p = vals + offs[row + c0];
    const float a = v[j];
    for (int64_t c = c0; c < c1; ++c) {
      uint64_t m = bits[row + c];
      float* yc = y + (c - c0) * kChunk;
      while (m) {
        yc[__builtin_ctzll(m)] += a * *p++;
        m &= m - 1;
      }
    }
  }
}

#ifdef SPARSE_NLP_X86
struct ExpandTable {  // for each byte of a mask: where each of the 8 lanes takes its kept weight, and which are kept
  alignas(32) int32_t perm[256][8];
  alignas(32) int32_t keep[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool on = (m >> lane) & 1;
        perm[m][lane] = on ? k : 0;
        keep[m][lane] = on ? -1 : 0;
        k += on;
      }
    }
  }
};

const ExpandTable& expand_table() {
  static const ExpandTable table;
  return table;
}

__attribute__((target("avx2,fma,popcnt"))) void chunks_avx2(const int64_t* idx, const float* v, int64_t n,
                                                             const uint64_t* bits, const int32_t* offs,
                                                             const float* vals, int64_t chunks, int64_t c0,
                                                             int64_t c1, float* y) {
  const ExpandTable& t = expand_table();
  for (int64_t j = 0; j < n; ++j) {
    const int64_t row = idx[j] * chunks;
    const float* p = vals + offs[row + c0];
    const __m256 a = _mm256_set1_ps(v[j]);
    for (int64_t c = c0; c < c1; ++c) {
      const uint64_t m = bits[row + c];
      float* yc = y + (c - c0) * kChunk;
      for (int b = 0; b < 8; ++b) {  // each byte's first weight from the bits below it: no chain through p
        const unsigned byte = (m >> (8 * b)) & 0xff;
        const float* pb = p + __builtin_popcountll(m & ((uint64_t{1} << (8 * b)) - 1));
        const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.perm[byte]));
        const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.keep[byte])));
        const __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(pb), perm), keep);
        _mm256_storeu_ps(yc + 8 * b, _mm256_fmadd_ps(a, w, _mm256_loadu_ps(yc + 8 * b)));
      }
      p += __builtin_popcountll(m);
    }
  }
}

__attribute__((target("avx512f,popcnt"))) void chunks_avx512(const int64_t* idx, const float* v, int64_t n,
                                                              const uint64_t* bits, const int32_t* offs,
                                                              const float* vals, int64_t chunks, int64_t c0,
                                                              int64_t c1, float* y) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t row = idx[j] * chunks;
    const float* p = vals + offs[row + c0];
    const __m512 a = _mm512_set1_ps(v[j]);
    for (int64_t c = c0; c < c1; ++c) {
      const uint64_t m = bits[row + c];
      float* yc = y + (c - c0) * kChunk;
      if (!m) continue;
      for (int b = 0; b < 4; ++b) {
        const __mmask16 k = static_cast<__mmask16>((m >> (16 * b)) & 0xffff);
        const __m512 w = _mm512_maskz_expandloadu_ps(k, p);
        _mm512_storeu_ps(yc + 16 * b, _mm512_fmadd_ps(a, w, _mm512_loadu_ps(yc + 16 * b)));
        p += __builtin_popcount(static_cast<unsigned>(k));
      }
    }
  }
}
#endif

void accumulate_chunks(const int64_t* idx, const float* v, int64_t n, const uint64_t* bits, const int32_t* offs,
                       const float* vals, int64_t chunks, int64_t c0, int64_t c1, float* y, int64_t isa) {
#ifdef SPARSE_NLP_X86
  if (isa == kAvx512) return chunks_avx512(idx, v, n, bits, offs, vals, chunks, c0, c1, y);
  if (isa == kAvx2) return chunks_avx2(idx, v, n, bits, offs, vals, chunks, c0, c1, y);
#endif
  chunks_portable(idx, v, n, bits, offs, vals, chunks, c0, c1, y);
}

at::Tensor masked_activation_linear(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& offsets,
                                    const at::Tensor& vals, const c10::optional<at::Tensor>& bias, int64_t out,
                                    double threshold, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "masked_activation_linear: x must be a 2-D fp32 CPU tensor");
  TORCH_CHECK(bits.dim() == 2 && bits.scalar_type() == at::kLong && bits.is_contiguous(),
              "masked_activation_linear: bits must be a contiguous (in, chunks) int64 tensor");
  TORCH_CHECK(offsets.sizes() == bits.sizes() && offsets.scalar_type() == at::kInt && offsets.is_contiguous(),
              "masked_activation_linear: offsets must be a contiguous int32 tensor shaped like bits");
  TORCH_CHECK(vals.dim() == 1 && vals.scalar_type() == at::kFloat && vals.is_contiguous(),
              "masked_activation_linear: vals must be a contiguous 1-D fp32 tensor");
  const int64_t tokens = x.size(0), in = bits.size(0), chunks = bits.size(1);
  TORCH_CHECK(x.size(1) == in, "masked_activation_linear: x has ", x.size(1), " features, the weight ", in);
  TORCH_CHECK(out > 0 && out <= chunks * kChunk && out > (chunks - 1) * kChunk,
              "masked_activation_linear: ", chunks, " chunks of 64 cannot hold ", out, " outputs");
  if (isa < 0 || isa > best_isa()) isa = best_isa();
  at::Tensor bias_c;
  const float* b = bias_data(bias, out, "masked_activation_linear", bias_c);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({tokens, out}, x.options());
  const float* xp = xc.data_ptr<float>();
  const uint64_t* bp = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  const int32_t* op = offsets.data_ptr<int32_t>();
  const float* vp = vals.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float t = static_cast<float>(threshold);
  each_token(xp, tokens, in, t, [&](int64_t r, int64_t n, const int64_t* idx, const float* val) {
    float* yr = yp + r * out;
    at::parallel_for(0, chunks, kColumnGrain / kChunk, [&](int64_t c0, int64_t c1) {
      std::vector<float> acc((c1 - c0) * kChunk);  // the range's outputs, padded to whole chunks
      const int64_t first = c0 * kChunk, width = std::min(c1 * kChunk, out) - first;
      for (int64_t k = 0; k < static_cast<int64_t>(acc.size()); ++k) acc[k] = (b && k < width) ? b[first + k] : 0.0f;
      accumulate_chunks(idx, val, n, bp, op, vp, chunks, c0, c1, acc.data(), isa);
      std::copy(acc.begin(), acc.begin() + width, yr + first);
    });
  });
  return y;
}

// ---- MoEfication: the rows of the kept experts ------------------------------------------------------------
// y[rows[e, s]] = w[e, s, :] . x (+ bias[e, s]) for the rows s of each kept expert e (w: (E, S, H), grouped by
// expert); every other output is zero. AVX2 (also on AVX-512 machines) or portable.

float dot_portable(const float* w, const float* x, int64_t h) {
  float s = 0.0f;
  for (int64_t i = 0; i < h; ++i) s += w[i] * x[i];
  return s;
}

// y[r] = sums[r] + row r (of 4 consecutive rows of length h at w) from column i on, times x
void finish4(const float* w, int64_t h, const float* x, int64_t i, const float* sums, float* y) {
  for (int r = 0; r < 4; ++r) {
    float sum = sums[r];
    for (int64_t j = i; j < h; ++j) sum += w[r * h + j] * x[j];
    y[r] = sum;
  }
}

#ifdef SPARSE_NLP_X86
__attribute__((target("avx2,fma"))) void dots4_avx2(const float* w, int64_t h, const float* x, float* y) {
  // four consecutive rows of length h at w: each load of x serves four rows
  const float* w1 = w + h;
  const float* w2 = w + 2 * h;
  const float* w3 = w + 3 * h;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), xv, s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, s3);
  }
  alignas(32) float t[4][8];
  _mm256_store_ps(t[0], s0);
  _mm256_store_ps(t[1], s1);
  _mm256_store_ps(t[2], s2);
  _mm256_store_ps(t[3], s3);
  float sums[4];
  for (int r = 0; r < 4; ++r)
    sums[r] = ((t[r][0] + t[r][1]) + (t[r][2] + t[r][3])) + ((t[r][4] + t[r][5]) + (t[r][6] + t[r][7]));
  finish4(w, h, x, i, sums, y);
}

#endif

void expert_dots(const float* w, int64_t rows, int64_t h, const float* x, float* y, int64_t isa) {
  int64_t r = 0;
#ifdef SPARSE_NLP_X86
  if (isa >= kAvx2)  // AVX-512 machines too: the op streams its weights once, so it is bound by reading them
    for (; r + 4 <= rows; r += 4) dots4_avx2(w + r * h, h, x, y + r);
#endif
  for (; r < rows; ++r) y[r] = dot_portable(w + r * h, x, h);
}

at::Tensor expert_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& chosen,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& rows, int64_t out, int64_t isa) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.device().is_cpu(),
              "expert_rows: the grouped weight must be a contiguous (experts, rows, in) fp32 CPU tensor");
  TORCH_CHECK(x.numel() == w.size(2) && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "expert_rows: x must hold one fp32 token of ", w.size(2), " features");
  TORCH_CHECK(chosen.dim() == 1 && chosen.scalar_type() == at::kLong, "expert_rows: chosen must be 1-D int64");
  const int64_t experts = w.size(0), size = w.size(1), h = w.size(2), k = chosen.size(0);
  const at::Tensor cc = chosen.contiguous();
  const int64_t* cp = cc.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j)
    TORCH_CHECK(cp[j] >= 0 && cp[j] < experts, "expert_rows: expert ", cp[j], " is not in [0, ", experts, ")");
  at::Tensor bias_c;
  const float* b = bias_data(bias, experts * size, "expert_rows", bias_c);
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == experts && rows.size(1) == size && rows.scalar_type() == at::kLong &&
                  rows.is_contiguous(),
              "expert_rows: rows must be a contiguous (experts, rows) int64 tensor");
  const int64_t* rp = rows.data_ptr<int64_t>();
  if (isa < 0 || isa > best_isa()) isa = best_isa();
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  at::Tensor dots = at::empty({k * size}, x.options());
  float* dp = dots.data_ptr<float>();
  at::Tensor y = at::zeros({out}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, k, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t e = cp[j];
      float* d = dp + j * size;
      expert_dots(wp + e * size * h, size, h, xp, d, isa);
      for (int64_t s = 0; s < size; ++s) {
        const int64_t r = rp[e * size + s];  // the output this row feeds; out or more: a padding row
        if (r >= 0 && r < out) yp[r] = d[s] + (b ? b[e * size + s] : 0.0f);
      }
    }
  });
  return y;
}

int64_t cpu_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY(sparse_nlp_activation, m) {
  m.def("activation_linear(Tensor x, Tensor wt, Tensor? bias, float threshold, int isa) -> Tensor");
  m.def(
      "masked_activation_linear(Tensor x, Tensor bits, Tensor offsets, Tensor vals, Tensor? bias, int out, "
      "float threshold, int isa) -> Tensor");
  m.def("expert_rows(Tensor x, Tensor w, Tensor chosen, Tensor? bias, Tensor rows, int out, int isa) -> Tensor");
  m.def("cpu_isa() -> int", &cpu_isa);
}

TORCH_LIBRARY_IMPL(sparse_nlp_activation, CPU, m) {
  m.impl("activation_linear", &activation_linear);
  m.impl("masked_activation_linear", &masked_activation_linear);
  m.impl("expert_rows", &expert_rows);
}
