// Tiled attention of many query vectors (a prompt's block of queries times the query heads of one KV head)
// over keys read in place from the paged cache, for paged_attention.cc. The query vectors sit in the SIMD
// lanes: scores are kept transposed, [key][vector], so each key's element is broadcast against 16 vectors
// at once (no horizontal sums), and the online softmax's max, sum and rescale run across lanes. Each step
// of the inner loops is a register block of 6 rows (keys or head dims) by up to 4 vectors of 16 lanes.
// In bf16 the vectors, keys, probabilities and values are rounded to bf16 in pairs for vdpbf16ps (sums in
// float32); the cache stays float32.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// The next tile's keys and values into the cache while this one computes: with few query vectors (a
// decode, a small chunk at a long context) the loads otherwise waited on memory (12.7 GB/s at 16k keys).
inline void PrefetchRows(const float* k_cache, const float* v_cache, const int64_t* slots, int64_t kv_row0,
                         int64_t num_keys, int64_t d) {
  for (int64_t j = 0; j < num_keys; ++j) {
    const int64_t row = (kv_row0 + slots[j]) * d;
    for (int64_t c = 0; c < d; c += 16) {  // a 64-byte line
      __builtin_prefetch(k_cache + row + c);
      __builtin_prefetch(v_cache + row + c);
    }
  }
}

#if defined(__AVX512F__)
#define FDKIT_TILED_ATTENTION 1

namespace tiles {

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxVectors = 64;  // query vectors of one work item: 4 registers
constexpr int64_t kKeys = 64;        // keys of one tile
constexpr int64_t kKeyRows = 6;      // keys of one register block of scores
constexpr int64_t kDimRows = 6;      // head dims of one register block of outputs
constexpr float kNegative = -1e30f;  // a finite -inf (built with -ffast-math)

// e^x for x <= 0 (a score minus its running max); 0 below -87. Cephes' expf polynomial, scaled by 2^n.
inline __m512 Exp(__m512 x) {
  const __mmask16 is_zero = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~is_zero), _mm512_scalef_ps(p, n));
}

// One work item's query vectors and running softmax. `qt` is [d][num_vectors] float32 (scaled), or in
// bf16 [d / 2][num_vectors][2] pairs; `out` (o transposed) is [d][num_vectors].
struct Block {
  int64_t num_vectors, head_dim;
  std::vector<float> qt, out, max, sum, scores;  // scores: [kKeys][num_vectors], then probabilities
  std::vector<int32_t> limit;                    // keys each vector sees: [0, limit)
  std::vector<uint16_t> q_pairs, key_tile, value_pairs, prob_pairs;  // bf16 only
  std::vector<float> zeros;                                          // bf16: an odd tile's last pair
};

// Rounds rows a and b (16 floats each) to bf16 and interleaves them: a0 b0 a1 b1 ... (32 bf16).
inline void StorePairs(const float* a, const float* b, uint16_t* dst) {
#if defined(__AVX512BF16__)
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(b), _mm512_loadu_ps(a));
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                         22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(order, both));
#endif
}

// scores[j][v] = sum_c key_j[c] q_v[c] for keys j of one register block (float32, keys read in place).
template <int NV>
void ScoreBlock(const float* const* keys, const float* qt, int64_t nv, int64_t d, float* scores) {
  __m512 acc[kKeyRows][NV];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; ++c) {
    __m512 q[NV];
    for (int i = 0; i < NV; ++i) q[i] = _mm512_loadu_ps(qt + c * nv + i * kLanes);
    for (int r = 0; r < kKeyRows; ++r) {
      const __m512 k = _mm512_set1_ps(keys[r][c]);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(k, q[i], acc[r][i]);
    }
  }
  for (int r = 0; r < kKeyRows; ++r)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(scores + r * nv + i * kLanes, acc[r][i]);
}

// The same in bf16: keys [kKeyRows][d] and q pairs, pairs of head dims at a time.
template <int NV>
void ScoreBlockBf16(const uint16_t* keys, const uint16_t* q_pairs, int64_t nv, int64_t d, float* scores) {
#if defined(__AVX512BF16__)
  __m512 acc[kKeyRows][NV];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 2) {
    __m512bh q[NV];
    for (int i = 0; i < NV; ++i) q[i] = (__m512bh)_mm512_loadu_si512(q_pairs + (c * nv + i * kLanes * 2));
    for (int r = 0; r < kKeyRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, keys + r * d + c, sizeof pair);
      const __m512bh k = (__m512bh)_mm512_set1_epi32(pair);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], k, q[i]);
    }
  }
  for (int r = 0; r < kKeyRows; ++r)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(scores + r * nv + i * kLanes, acc[r][i]);
#endif
}

// out[c][v] += sum_j value_j[c] p[j][v] for head dims [c0, c0 + R), keys [0, num_keys) (float32).
template <int NV, int R>
void ValueBlock(const float* const* values, const float* probs, int64_t num_keys, int64_t nv, int64_t c0,
                float* out) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_loadu_ps(out + (c0 + r) * nv + i * kLanes);
  for (int64_t j = 0; j < num_keys; ++j) {
    __m512 p[NV];
    for (int i = 0; i < NV; ++i) p[i] = _mm512_loadu_ps(probs + j * nv + i * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_set1_ps(values[j][c0 + r]);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(v, p[i], acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out + (c0 + r) * nv + i * kLanes, acc[r][i]);
}

// The same in bf16: value pairs [num_keys / 2][d][2] and probability pairs [num_keys / 2][nv][2].
template <int NV, int R>
void ValueBlockBf16(const uint16_t* value_pairs, const uint16_t* prob_pairs, int64_t num_pairs, int64_t nv,
                    int64_t d, int64_t c0, float* out) {
#if defined(__AVX512BF16__)
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_loadu_ps(out + (c0 + r) * nv + i * kLanes);
  for (int64_t j = 0; j < num_pairs; ++j) {
    __m512bh p[NV];
    for (int i = 0; i < NV; ++i)
      p[i] = (__m512bh)_mm512_loadu_si512(prob_pairs + (j * nv + i * kLanes) * 2);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, value_pairs + (j * d + c0 + r) * 2, sizeof pair);
      const __m512bh v = (__m512bh)_mm512_set1_epi32(pair);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], v, p[i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out + (c0 + r) * nv + i * kLanes, acc[r][i]);
#endif
}


// One tile's scores [num_keys][nv] become probabilities: masked past each vector's limit, the running max
// and sum updated, and the output rescaled to the new max.
template <int NV>
void Softmax(Block* b, int64_t start, int64_t num_keys) {
  const int64_t nv = b->num_vectors;
  for (int i = 0; i < NV; ++i) {
    const __m512i limit = _mm512_loadu_si512(b->limit.data() + i * kLanes);
    float* scores = b->scores.data() + i * kLanes;
    __m512 old_max = _mm512_loadu_ps(b->max.data() + i * kLanes), new_max = old_max;
    for (int64_t j = 0; j < num_keys; ++j) {
      const __mmask16 is_seen = _mm512_cmp_epi32_mask(_mm512_set1_epi32(start + j), limit, _MM_CMPINT_LT);
      const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(kNegative), is_seen, _mm512_loadu_ps(scores + j * nv));
      _mm512_storeu_ps(scores + j * nv, s);
      new_max = _mm512_max_ps(new_max, s);
    }
    __m512 tile_sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < num_keys; ++j) {
      const __m512 s = _mm512_loadu_ps(scores + j * nv);
      const __mmask16 is_seen = _mm512_cmp_ps_mask(s, _mm512_set1_ps(0.5f * kNegative), _CMP_GT_OQ);
      const __m512 p = _mm512_maskz_mov_ps(is_seen, Exp(_mm512_sub_ps(s, new_max)));
      _mm512_storeu_ps(scores + j * nv, p);
      tile_sum = _mm512_add_ps(tile_sum, p);
    }
    const __m512 rescale = Exp(_mm512_sub_ps(old_max, new_max));
    const __m512 sum = _mm512_loadu_ps(b->sum.data() + i * kLanes);
    _mm512_storeu_ps(b->sum.data() + i * kLanes, _mm512_fmadd_ps(sum, rescale, tile_sum));
    _mm512_storeu_ps(b->max.data() + i * kLanes, new_max);
    float* out = b->out.data() + i * kLanes;
    for (int64_t c = 0; c < b->head_dim; ++c)
      _mm512_storeu_ps(out + c * nv, _mm512_mul_ps(_mm512_loadu_ps(out + c * nv), rescale));
  }
}

// Scores of one tile's keys (pointers into the cache, padded to whole register blocks).
template <bool kBf16, int NV>
void ScoreTile(Block* b, const float* const* keys, int64_t num_keys) {
  const int64_t nv = b->num_vectors, d = b->head_dim;
  for (int64_t j = 0; j < num_keys; j += kKeyRows) {
    if constexpr (kBf16) {
#if defined(__AVX512BF16__)
      uint16_t* tile = b->key_tile.data();
      for (int64_t r = 0; r < kKeyRows; ++r)
        for (int64_t c = 0; c < d; c += kLanes)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * d + c),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(keys[j + r] + c)));
      ScoreBlockBf16<NV>(tile, b->q_pairs.data(), nv, d, b->scores.data() + j * nv);
#endif
    } else {
      ScoreBlock<NV>(keys + j, b->qt.data(), nv, d, b->scores.data() + j * nv);
    }
  }
}

// out += probabilities x values of one tile's keys, in register blocks of kDimRows head dims (d is a
// multiple of 16, so the last block has 0, 2 or 4 of them).
template <bool kBf16, int NV>
void ValueTile(Block* b, const float* const* values, int64_t num_keys) {
  const int64_t nv = b->num_vectors, d = b->head_dim, whole = d - d % kDimRows;
  float* out = b->out.data();
  if constexpr (kBf16) {
    const int64_t num_pairs = (num_keys + 1) / 2;
    float* probs = b->scores.data();
    if (num_keys % 2) std::fill(probs + num_keys * nv, probs + (num_keys + 1) * nv, 0.f);
    for (int64_t p = 0; p < num_pairs; ++p) {
      const float* second = 2 * p + 1 < num_keys ? values[2 * p + 1] : b->zeros.data();
      for (int64_t c = 0; c < d; c += kLanes)
        StorePairs(values[2 * p] + c, second + c, b->value_pairs.data() + (p * d + c) * 2);
      for (int64_t v = 0; v < nv; v += kLanes)
        StorePairs(probs + 2 * p * nv + v, probs + (2 * p + 1) * nv + v, b->prob_pairs.data() + (p * nv + v) * 2);
    }
    const uint16_t *vp = b->value_pairs.data(), *pp = b->prob_pairs.data();
    for (int64_t c = 0; c < whole; c += kDimRows) ValueBlockBf16<NV, kDimRows>(vp, pp, num_pairs, nv, d, c, out);
    if (d - whole == 2) ValueBlockBf16<NV, 2>(vp, pp, num_pairs, nv, d, whole, out);
    if (d - whole == 4) ValueBlockBf16<NV, 4>(vp, pp, num_pairs, nv, d, whole, out);
  } else {
    const float* probs = b->scores.data();
    for (int64_t c = 0; c < whole; c += kDimRows) ValueBlock<NV, kDimRows>(values, probs, num_keys, nv, c, out);
    if (d - whole == 2) ValueBlock<NV, 2>(values, probs, num_keys, nv, whole, out);
    if (d - whole == 4) ValueBlock<NV, 4>(values, probs, num_keys, nv, whole, out);
  }
}

// Query vectors `qv` (float32 [d] each; vector v sees keys [0, limits[v])) over keys [key_begin, key_end)
// at cache rows kv_row0 + slots[j]: leaves b's max, sum and unnormalized out ([d][num_vectors]).
template <bool kBf16, int NV>
void RunTiles(const float* const* qv, const int64_t* limits, int64_t nq, int64_t key_begin, int64_t key_end,
              const float* k_cache, const float* v_cache, const int64_t* slots, int64_t kv_row0, float scale,
              Block* b) {
  const int64_t nv = NV * kLanes, d = b->head_dim;
  b->num_vectors = nv;
  b->qt.assign(d * nv, 0.f);
  b->limit.assign(nv, static_cast<int32_t>(key_end));
  for (int64_t v = 0; v < nq; ++v) {
    for (int64_t c = 0; c < d; ++c) b->qt[c * nv + v] = qv[v][c] * scale;
    b->limit[v] = static_cast<int32_t>(std::min(limits[v], key_end));
  }
  b->max.assign(nv, kNegative);
  b->sum.assign(nv, 0.f);
  b->out.assign(d * nv, 0.f);
  b->scores.resize((kKeys + kKeyRows) * nv);
  if constexpr (kBf16) {
    b->q_pairs.resize(d * nv);
    b->key_tile.resize(kKeyRows * d);
    b->value_pairs.resize((kKeys + 1) * d);
    b->prob_pairs.resize((kKeys + 1) * nv);
    b->zeros.assign(d, 0.f);
    for (int64_t c = 0; c < d; c += 2)
      for (int64_t v = 0; v < nv; v += kLanes)
        StorePairs(&b->qt[c * nv + v], &b->qt[(c + 1) * nv + v], &b->q_pairs[c * nv + v * 2]);
  }
  const int64_t last = *std::max_element(b->limit.begin(), b->limit.end());
  const float* keys[kKeys + kKeyRows];
  const float* values[kKeys + kKeyRows];
  for (int64_t start = key_begin; start < last; start += kKeys) {
    const int64_t num_keys = std::min(kKeys, last - start);
    for (int64_t j = 0; j < num_keys + kKeyRows; ++j) {
      const int64_t row = kv_row0 + slots[start + std::min(j, num_keys - 1)];  // padding repeats the last key
      keys[j] = k_cache + row * d;
      values[j] = v_cache + row * d;
    }
    PrefetchRows(k_cache, v_cache, slots + start + num_keys, kv_row0, std::min(kKeys, last - start - num_keys), d);
    ScoreTile<kBf16, NV>(b, keys, num_keys);
    Softmax<NV>(b, start, num_keys);
    ValueTile<kBf16, NV>(b, values, num_keys);
  }
}

}  // namespace tiles

#endif  // __AVX512F__
