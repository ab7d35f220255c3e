// Linear layers with dynamically sparse inputs, for CPUs: y = x_s W^T + b, fp32, where x_s keeps the entries of x
// with |x| > threshold and zeroes the others (TEAL / CATS activation sparsity).
//
// The weight is stored transposed, Wt (in, out) with contiguous rows, so each kept input i adds x_i * Wt[i, :] to
// the output: the weight rows of zeroed inputs are never read, and at batch 1 (decoding, memory bound) the bytes
// read fall with the activation sparsity. Per token: the kept (index, value) pairs are gathered first; then each
// thread takes a range of output columns and streams the kept rows over it four at a time (one load and store of
// the output chunk per four rows).
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
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->contiguous();
    TORCH_CHECK(bias_c.numel() == out && bias_c.scalar_type() == at::kFloat, "activation_linear: bad bias");
    b = bias_c.data_ptr<float>();
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({tokens, out}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* w = wt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float t = static_cast<float>(threshold);
  std::vector<int64_t> idx(in);
  std::vector<float> val(in);
  for (int64_t r = 0; r < tokens; ++r) {
    const float* xr = xp + r * in;
    int64_t n = 0;
    for (int64_t i = 0; i < in; ++i) {
      if (std::fabs(xr[i]) > t) {
        idx[n] = i;
        val[n] = xr[i];
        ++n;
      }
    }
    float* yr = yp + r * out;
    at::parallel_for(0, out, kColumnGrain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) yr[c] = b ? b[c] : 0.0f;
      accumulate(idx.data(), val.data(), n, w, out, c0, c1, yr, isa);
    });
  }
  return y;
}

int64_t cpu_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY(sparse_nlp_activation, m) {
  m.def("activation_linear(Tensor x, Tensor wt, Tensor? bias, float threshold, int isa) -> Tensor");
  m.def("cpu_isa() -> int", &cpu_isa);
}

TORCH_LIBRARY_IMPL(sparse_nlp_activation, CPU, m) { m.impl("activation_linear", &activation_linear); }
