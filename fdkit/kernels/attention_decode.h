// Attention of a few query vectors (a decode: one query times the query heads of one KV head) over keys
// read in place from the paged cache, for paged_attention.cc. Each key is read once for all the vectors:
// scores come in register blocks of (16 / VB keys) x (VB vectors) whose 16 dot products are summed across
// lanes together (Reduce16) rather than one by one, and values accumulate in registers, VB vectors x DC
// chunks of 16 head dims, across a whole tile of keys. Float32 throughout (the cache is float32).
#pragma once

#include <cmath>
#include <type_traits>

#include "attention_tiles.h"

#if defined(FDKIT_TILED_ATTENTION)

namespace decode {

using tiles::kLanes;
using tiles::kNegative;
constexpr int64_t kKeys = 64;       // keys of one tile
constexpr int64_t kMaxGroup = 8;    // vectors of one group (VB)
constexpr int64_t kDimAlign = 128;  // head_dim must be a multiple (every group's DC chunks of 16 fit)

// Lane i: the sum of a[i]'s 16 lanes.
inline __m512 Reduce16(const __m512* a) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3] of a = a[2i], b = a[2i+1]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit block: the block's sums of a[4i .. 4i + 3]
    const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // blocks: [u 0+1, u 2+3] of u[2i], then of u[2i+1]
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// scores[v][j0 + r] = scale * q_v . key_r for the KB = 16 / VB keys of one register block.
template <int VB>
void ScoreBlock(const float* const* q, const float* const* keys, int64_t d, float scale, int64_t j0,
                float* scores) {
  constexpr int KB = 16 / VB;
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += kLanes) {
    if constexpr (VB == 1) {  // 16 keys: read from memory by the FMAs, no key registers
      const __m512 qc = _mm512_loadu_ps(q[0] + c);
      for (int r = 0; r < KB; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(keys[r] + c), qc, acc[r]);
    } else {
      __m512 k[KB];
      for (int r = 0; r < KB; ++r) k[r] = _mm512_loadu_ps(keys[r] + c);
      for (int v = 0; v < VB; ++v) {
        const __m512 qc = _mm512_loadu_ps(q[v] + c);
        for (int r = 0; r < KB; ++r) acc[v * KB + r] = _mm512_fmadd_ps(k[r], qc, acc[v * KB + r]);
      }
    }
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, _mm512_mul_ps(Reduce16(acc), _mm512_set1_ps(scale)));
  for (int v = 0; v < VB; ++v)
    for (int r = 0; r < KB; ++r) scores[v * kKeys + j0 + r] = sums[v * KB + r];
}

// One vector's scores of a tile become probabilities (0 past its num_seen keys, up to num_keys); its
// running max and sum are updated. Returns the factor that rescales its output to the new max.
inline float SoftmaxRow(float* s, int64_t num_seen, int64_t num_keys, float* max, float* sum) {
  __m512 m = _mm512_set1_ps(kNegative);
  for (int64_t j = 0; j < num_seen; j += kLanes) {
    const __mmask16 mask = num_seen - j >= kLanes ? 0xFFFF : (1u << (num_seen - j)) - 1;
    m = _mm512_mask_max_ps(m, mask, m, _mm512_maskz_loadu_ps(mask, s + j));
  }
  const float new_max = std::max(*max, _mm512_reduce_max_ps(m));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < num_keys; j += kLanes) {
    const int64_t seen = std::clamp<int64_t>(num_seen - j, 0, kLanes);
    const __mmask16 mask = seen == kLanes ? 0xFFFF : (1u << seen) - 1;
    const __m512 p = _mm512_maskz_mov_ps(mask, tiles::Exp(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(new_max))));
    _mm512_storeu_ps(s + j, p);
    total = _mm512_add_ps(total, p);
  }
  const float rescale = std::exp(*max - new_max);
  *sum = *sum * rescale + _mm512_reduce_add_ps(total);
  *max = new_max;
  return rescale;
}

// out[v][c0 : c0 + 16 DC] += sum_j probs[v][j] values[j][...] over a tile's keys.
template <int VB, int DC>
void ValueBlock(const float* probs, const float* const* values, int64_t num_keys, int64_t c0, float* out,
                int64_t d) {
  __m512 acc[VB][DC];
  for (int v = 0; v < VB; ++v)
    for (int i = 0; i < DC; ++i) acc[v][i] = _mm512_loadu_ps(out + v * d + c0 + i * kLanes);
  for (int64_t j = 0; j < num_keys; ++j) {
    __m512 value[DC];
    for (int i = 0; i < DC; ++i) value[i] = _mm512_loadu_ps(values[j] + c0 + i * kLanes);
    for (int v = 0; v < VB; ++v) {
      const __m512 p = _mm512_set1_ps(probs[v * kKeys + j]);
      for (int i = 0; i < DC; ++i) acc[v][i] = _mm512_fmadd_ps(p, value[i], acc[v][i]);
    }
  }
  for (int v = 0; v < VB; ++v)
    for (int i = 0; i < DC; ++i) _mm512_storeu_ps(out + v * d + c0 + i * kLanes, acc[v][i]);
}

// Up to VB vectors q[v] (padded to VB by repeats; `num_real` count) over keys [key_begin, limits[v]) at cache
// rows kv_row0 + slots[j]: leaves each real vector's max, sum and unnormalized output out[v] ([d]).
template <int VB>
void RunGroup(const float* const* q, const int64_t* limits, int64_t num_real, int64_t key_begin,
              const float* k_cache, const float* v_cache, const int64_t* slots, int64_t kv_row0, int64_t d,
              float scale, float* max, float* sum, float* out) {
  constexpr int KB = 16 / VB, DC = std::min(16 / VB, 8);
  alignas(64) float scores[VB * kKeys];
  const float* keys[kKeys + KB];
  const float* values[kKeys];
  const int64_t last = *std::max_element(limits, limits + num_real);
  for (int64_t start = key_begin; start < last; start += kKeys) {
    const int64_t num_keys = std::min(kKeys, last - start);
    for (int64_t j = 0; j < num_keys + KB; ++j) {  // padding repeats the last key
      const int64_t row = kv_row0 + slots[start + std::min(j, num_keys - 1)];
      keys[j] = k_cache + row * d;
      if (j < num_keys) values[j] = v_cache + row * d;
    }
    PrefetchRows(k_cache, v_cache, slots + start + num_keys, kv_row0, std::min(kKeys, last - start - num_keys), d);
    for (int64_t j = 0; j < num_keys; j += KB) ScoreBlock<VB>(q, keys + j, d, scale, j, scores);
    for (int64_t v = 0; v < num_real; ++v) {
      const int64_t num_seen = std::min(limits[v] - start, num_keys);
      const float rescale = SoftmaxRow(scores + v * kKeys, num_seen, num_keys, max + v, sum + v);
      if (rescale != 1.f)
        for (int64_t c = 0; c < d; ++c) out[v * d + c] *= rescale;
    }
    for (int64_t v = num_real; v < VB; ++v) std::fill(scores + v * kKeys, scores + v * kKeys + num_keys, 0.f);
    for (int64_t c = 0; c < d; c += DC * kLanes) ValueBlock<VB, DC>(scores, values, num_keys, c, out, d);
  }
}

// Vectors qv[0 .. nq) (vector v sees keys [key_begin, limits[v])), in groups of up to kMaxGroup: fills max,
// sum ([nq]) and the unnormalized out ([nq][d]), which must start at kNegative, 0 and 0.
inline void Run(const float* const* qv, const int64_t* limits, int64_t nq, int64_t key_begin,
                const float* k_cache, const float* v_cache, const int64_t* slots, int64_t kv_row0, int64_t d,
                float scale, float* max, float* sum, float* out) {
  thread_local std::vector<float> padded_out;
  padded_out.resize(kMaxGroup * d);
  for (int64_t first = 0; first < nq; first += kMaxGroup) {
    const int64_t n = std::min(kMaxGroup, nq - first);
    const float* q[kMaxGroup];
    int64_t lim[kMaxGroup];
    for (int64_t v = 0; v < kMaxGroup; ++v) {
      q[v] = qv[first + std::min(v, n - 1)];
      lim[v] = limits[first + std::min(v, n - 1)];
    }
    float* o = padded_out.data();
    std::fill(o, o + kMaxGroup * d, 0.f);
    const auto run = [&](auto group_size) {
      RunGroup<decltype(group_size)::value>(q, lim, n, key_begin, k_cache, v_cache, slots, kv_row0, d, scale,
                                            max + first, sum + first, o);
    };
    if (n == 1) run(std::integral_constant<int, 1>{});
    else if (n == 2) run(std::integral_constant<int, 2>{});
    else if (n <= 4) run(std::integral_constant<int, 4>{});
    else run(std::integral_constant<int, 8>{});
    std::copy(o, o + n * d, out + first * d);
  }
}

}  // namespace decode

#endif  // FDKIT_TILED_ATTENTION
