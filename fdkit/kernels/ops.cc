// The small ops around the linear layers and attention, one call each instead of paddle's 3-16: a decode
// step of the 0.3b preset ran ~900 dygraph ops between its matmuls (~5 ms of a 39 ms step at 1 row).
// float32, contiguous, rows independent: large inputs are split by rows among the threads.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "paddle/extension.h"

namespace {

constexpr int64_t kMinParallelElements = 1 << 16;  // fewer: one thread (a decode step's rows)

void CheckFloat32(const paddle::Tensor& x, const char* name) {
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32, name, ": float32 only");
}

}  // namespace

// x [rows, n] / sqrt(mean(x^2) + eps) * weight [n]
std::vector<paddle::Tensor> RmsNorm(const paddle::Tensor& x, const paddle::Tensor& weight, float eps,
                                    int64_t num_threads) {
  CheckFloat32(x, "rms_norm");
  const int64_t n = x.shape().back(), rows = x.numel() / n;
  auto out = paddle::empty(x.shape(), x.dtype(), x.place());
  const float *xp = x.data<float>(), *w = weight.data<float>();
  float* op = out.data<float>();
#pragma omp parallel for num_threads(num_threads) if (rows * n >= kMinParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * n;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += row[i] * row[i];
    const float scale = 1.f / std::sqrt(sum / n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) op[r * n + i] = row[i] * scale * w[i];
  }
  return {out};
}

// qkv [tokens, (heads + 2 kv_heads) d] -> q [tokens, heads, d], k, v [tokens, kv_heads, d], q and k rotated
// over adjacent pairs: (a, b) at 2i, 2i+1 -> (a cos - b sin, b cos + a sin), cos and sin [tokens, d] (each
// pair's angle twice, as fdkit.models.layers.InterleavedRotaryEmbedding.lookup gives them).
std::vector<paddle::Tensor> SplitRotate(const paddle::Tensor& qkv, const paddle::Tensor& cos,
                                        const paddle::Tensor& sin, int64_t num_heads, int64_t num_kv_heads,
                                        int64_t num_threads) {
  CheckFloat32(qkv, "split_rotate");
  const int64_t width = qkv.shape().back(), tokens = qkv.numel() / width;
  const int64_t d = width / (num_heads + 2 * num_kv_heads);
  PD_CHECK(d * (num_heads + 2 * num_kv_heads) == width && cos.numel() == tokens * d, "split_rotate: shapes");
  auto q = paddle::empty({tokens, num_heads, d}, qkv.dtype(), qkv.place());
  auto k = paddle::empty({tokens, num_kv_heads, d}, qkv.dtype(), qkv.place());
  auto v = paddle::empty({tokens, num_kv_heads, d}, qkv.dtype(), qkv.place());
  const float *src = qkv.data<float>(), *cp = cos.data<float>(), *sp = sin.data<float>();
  float *qp = q.data<float>(), *kp = k.data<float>(), *vp = v.data<float>();
#pragma omp parallel for num_threads(num_threads) if (tokens * width >= kMinParallelElements)
  for (int64_t t = 0; t < tokens; ++t) {
    const float *row = src + t * width, *c = cp + t * d, *s = sp + t * d;
    for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
      const float* x = row + h * d;
      float* dst = h < num_heads ? qp + (t * num_heads + h) * d : kp + (t * num_kv_heads + h - num_heads) * d;
      for (int64_t i = 0; i < d; i += 2) {
        dst[i] = x[i] * c[i] - x[i + 1] * s[i];
        dst[i + 1] = x[i + 1] * c[i + 1] + x[i] * s[i + 1];
      }
    }
    std::copy(row + (num_heads + num_kv_heads) * d, row + width, vp + t * num_kv_heads * d);
  }
  return {q, k, v};
}

// silu(gate) * up of gate_up [rows, 2n] (gate first): [rows, n]
std::vector<paddle::Tensor> SiluMul(const paddle::Tensor& gate_up, int64_t num_threads) {
  CheckFloat32(gate_up, "silu_mul");
  const int64_t n = gate_up.shape().back() / 2, rows = gate_up.numel() / (2 * n);
  std::vector<int64_t> shape = gate_up.shape();
  shape.back() = n;
  auto out = paddle::empty(shape, gate_up.dtype(), gate_up.place());
  const float* src = gate_up.data<float>();
  float* op = out.data<float>();
#pragma omp parallel for num_threads(num_threads) if (rows * n >= kMinParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const float *gate = src + r * 2 * n, *up = gate + n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) op[r * n + i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  }
  return {out};
}

// k, v [tokens, kv_heads, d] into the head-major caches [kv_heads * slots, d]: head h of token t at row
// h * slots + slot_mapping[t] (fdkit.models.layers.PagedAttention).
void WriteCache(paddle::Tensor& k_cache, paddle::Tensor& v_cache, const paddle::Tensor& k, const paddle::Tensor& v,
                const paddle::Tensor& slot_mapping) {
  CheckFloat32(k_cache, "write_cache");
  CheckFloat32(k, "write_cache");
  const int64_t tokens = k.shape()[0], kv_heads = k.shape()[1], d = k.shape()[2];
  const int64_t num_slots = k_cache.shape()[0] / kv_heads;
  PD_CHECK(slot_mapping.numel() == tokens && k_cache.shape()[1] == d, "write_cache: shapes");
  const int64_t* slots = slot_mapping.data<int64_t>();
  const float *kp = k.data<float>(), *vp = v.data<float>();
  float *kc = k_cache.data<float>(), *vc = v_cache.data<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    PD_CHECK(slots[t] >= 0 && slots[t] < num_slots, "write_cache: slot out of range");
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t row = h * num_slots + slots[t];
      std::copy(kp + (t * kv_heads + h) * d, kp + (t * kv_heads + h + 1) * d, kc + row * d);
      std::copy(vp + (t * kv_heads + h) * d, vp + (t * kv_heads + h + 1) * d, vc + row * d);
    }
  }
}

int64_t FirstIndexOf(const float* row, int64_t n, float value) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (const __m512 target = _mm512_set1_ps(value); i + 16 <= n; i += 16) {
    const __mmask16 is_equal = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), target, _CMP_EQ_OQ);
    if (is_equal) return i + __builtin_ctz(is_equal);
  }
#endif
  for (; i < n; ++i)
    if (row[i] == value) return i;
  return 0;
}

// The index of each row's largest value, the first where several are equal (as paddle's argmax): the max
// in SIMD, then the first index holding it. A row without one (NaNs) gives 0.
std::vector<paddle::Tensor> Argmax(const paddle::Tensor& x, int64_t num_threads) {
  CheckFloat32(x, "argmax");
  const int64_t n = x.shape().back(), rows = x.numel() / n;
  auto out = paddle::empty({rows}, paddle::DataType::INT64, x.place());
  const float* xp = x.data<float>();
  int64_t* op = out.data<int64_t>();
#pragma omp parallel for num_threads(num_threads) if (rows * n >= kMinParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * n;
    float best = row[0];
#pragma omp simd reduction(max : best)
    for (int64_t i = 0; i < n; ++i) best = std::max(best, row[i]);
    op[r] = FirstIndexOf(row, n, best);
  }
  return {out};
}

PD_BUILD_OP(fdkit_rms_norm)
    .Inputs({"X", "Weight"})
    .Outputs({"Out"})
    .Attrs({"eps: float", "num_threads: int64_t"})
    .SetKernelFn(PD_KERNEL(RmsNorm));

PD_BUILD_OP(fdkit_split_rotate)
    .Inputs({"QKV", "Cos", "Sin"})
    .Outputs({"Q", "K", "V"})
    .Attrs({"num_heads: int64_t", "num_kv_heads: int64_t", "num_threads: int64_t"})
    .SetKernelFn(PD_KERNEL(SplitRotate));

PD_BUILD_OP(fdkit_silu_mul)
    .Inputs({"GateUp"})
    .Outputs({"Out"})
    .Attrs({"num_threads: int64_t"})
    .SetKernelFn(PD_KERNEL(SiluMul));

PD_BUILD_OP(fdkit_argmax)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"num_threads: int64_t"})
    .SetKernelFn(PD_KERNEL(Argmax));

PD_BUILD_OP(fdkit_write_cache)
    .Inputs({"KCache", "VCache", "K", "V", "SlotMapping"})
    .Outputs({"KCacheOut", "VCacheOut"})
    .SetInplaceMap({{"KCache", "KCacheOut"}, {"VCache", "VCacheOut"}})
    .SetKernelFn(PD_KERNEL(WriteCache));
