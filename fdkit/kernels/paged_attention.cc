// Attention of each query over its sequence's keys in the paged KV cache, read in place: no gather, no
// [queries, keys] scores tensor, memory bounded by the work items, not the context length. Every CPU step
// runs here: decodes and prompt chunks alike.
//
// The cache is head-major, [kv_heads * slots, head_dim] (fdkit.models.layers.PagedAttention): head h's
// slot s is row h * slots + s. Each query token t belongs to row query_rows[t] and sees keys
// key_slots[row, 0 : num_keys[t]]; a row's queries are consecutive. Work items are (block of one row's
// queries, KV head, key split): each reads its keys once for all the query heads that share the KV head,
// with an online softmax over tiles of keys; the splits of a long row are merged at the end. A block with
// at least 16 query vectors (queries x heads of the KV head) runs in SIMD tiles (attention_tiles.h), in
// bf16 when asked and the CPU has avx512_bf16; fewer (a decode) run in register blocks (attention_decode.h),
// or, for head dims that are not a multiple of 128, the scalar loop below.

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <limits>
#include <vector>

#include "attention_decode.h"
#include "attention_tiles.h"
#include "paddle/extension.h"

namespace {

constexpr int64_t kTile = 64;           // keys scored at once
constexpr int64_t kMinSplitKeys = 512;  // a row's keys are split among threads in parts of at least this
constexpr float kMasked = -1e30f;       // a finite -inf: built with -ffast-math, which assumes no infinities

struct Item {
  int64_t row, first_query, num_queries, group, key_begin, key_end;
  bool is_tiled;
};

struct Partial {  // one item's unnormalized output for each of its query vectors
  std::vector<float> max, sum, acc;
};

inline float Dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Online softmax of one item: query vectors qv = (query, head in group), keys [key_begin, key_end).
void RunItem(const Item& it, const float* q, const float* k_cache, const float* v_cache, const int64_t* slots,
             const int64_t* num_keys, int64_t kv_row0, int64_t heads_per_group, int64_t num_heads,
             int64_t head_dim, float scale, Partial* out) {
  const int64_t nq = it.num_queries * heads_per_group;
  out->max.assign(nq, kMasked);
  out->sum.assign(nq, 0.f);
  out->acc.assign(nq * head_dim, 0.f);
  std::vector<const float*> qv(nq);
  std::vector<int64_t> limit(nq);
  for (int64_t i = 0; i < it.num_queries; ++i) {
    const int64_t t = it.first_query + i;
    for (int64_t h = 0; h < heads_per_group; ++h) {
      qv[i * heads_per_group + h] = q + (t * num_heads + it.group * heads_per_group + h) * head_dim;
      limit[i * heads_per_group + h] = std::min(num_keys[t], it.key_end);
    }
  }
  std::vector<float> scores(nq * kTile);
  for (int64_t start = it.key_begin; start < it.key_end; start += kTile) {
    const int64_t end = std::min(start + kTile, it.key_end);
    PrefetchRows(k_cache, v_cache, slots + end, kv_row0, std::min(kTile, it.key_end - end), head_dim);
    for (int64_t j = start; j < end; ++j) {
      const float* key = k_cache + (kv_row0 + slots[j]) * head_dim;
      for (int64_t v = 0; v < nq; ++v)
        scores[v * kTile + j - start] = j < limit[v] ? Dot(qv[v], key, head_dim) * scale : kMasked;
    }
    for (int64_t v = 0; v < nq; ++v) {
      if (start >= limit[v]) continue;
      float* s = &scores[v * kTile];
      float tile_max = kMasked;
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = 0; j < end - start; ++j) tile_max = std::max(tile_max, s[j]);
      const float new_max = std::max(out->max[v], tile_max);
      const float rescale = std::exp(out->max[v] - new_max);
      float tile_sum = 0.f;
#pragma omp simd reduction(+ : tile_sum)
      for (int64_t j = 0; j < end - start; ++j) {
        s[j] = std::exp(s[j] - new_max);
        tile_sum += s[j];
      }
      out->sum[v] = out->sum[v] * rescale + tile_sum;
      out->max[v] = new_max;
      float* acc = &out->acc[v * head_dim];
      if (rescale != 1.f) {
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[d] *= rescale;
      }
    }
    for (int64_t j = start; j < end; ++j) {
      const float* value = v_cache + (kv_row0 + slots[j]) * head_dim;
      for (int64_t v = 0; v < nq; ++v) {
        if (j >= limit[v]) continue;
        const float p = scores[v * kTile + j - start];
        float* acc = &out->acc[v * head_dim];
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[d] += p * value[d];
      }
    }
  }
}

// (row, first query, number of queries) of each run of consecutive queries of one row; a run with enough
// query vectors to fill the SIMD lanes is cut into blocks of at most tiles::kMaxVectors vectors, tiled.
struct Run {
  int64_t row, first_query, num_queries;
  bool is_tiled;
};

std::vector<Run> QueryRuns(const int64_t* query_rows, int64_t num_queries, int64_t heads_per_group,
                           int64_t head_dim) {
  std::vector<Run> rows;
  for (int64_t t = 0; t < num_queries; ++t) {
    if (!rows.empty() && rows.back().row == query_rows[t])
      ++rows.back().num_queries;
    else
      rows.push_back({query_rows[t], t, 1, false});
  }
#if defined(FDKIT_TILED_ATTENTION)
  if (head_dim % tiles::kLanes || heads_per_group > tiles::kMaxVectors) return rows;
  std::vector<Run> runs;
  const int64_t block = tiles::kMaxVectors / heads_per_group;
  for (const Run& r : rows) {
    if (r.num_queries * heads_per_group < tiles::kLanes) {
      runs.push_back(r);
      continue;
    }
    for (int64_t first = 0; first < r.num_queries; first += block)
      runs.push_back({r.row, r.first_query + first, std::min(block, r.num_queries - first), true});
  }
  return runs;
#else
  return rows;
#endif
}

struct Args {
  const float *q, *k_cache, *v_cache;
  const int64_t *slots, *num_keys, *kv_heads;
  int64_t row_len, num_slots, num_heads, heads_per_group, head_dim;
  float scale;
};

#if defined(FDKIT_TILED_ATTENTION)
// A tiled item: its outputs normalized into `out`, or (a part of a split row) its unnormalized `part`.
template <bool kBf16>
void RunTiledItem(const Item& it, const Args& a, Partial* part, float* out) {
  thread_local tiles::Block block;
  const int64_t nq = it.num_queries * a.heads_per_group, d = a.head_dim;
  const float* qv[tiles::kMaxVectors];
  int64_t limits[tiles::kMaxVectors];
  for (int64_t v = 0; v < nq; ++v) {
    const int64_t t = it.first_query + v / a.heads_per_group;
    qv[v] = a.q + (t * a.num_heads + it.group * a.heads_per_group + v % a.heads_per_group) * d;
    limits[v] = a.num_keys[t];
  }
  block.head_dim = d;
  const float *k = a.k_cache, *vc = a.v_cache;
  const int64_t *slots = a.slots + it.row * a.row_len, row0 = a.kv_heads[it.group] * a.num_slots;
  const auto run = [&](auto num_registers) {
    tiles::RunTiles<kBf16, decltype(num_registers)::value>(qv, limits, nq, it.key_begin, it.key_end, k, vc, slots,
                                                           row0, a.scale, &block);
  };
  switch ((nq + tiles::kLanes - 1) / tiles::kLanes) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    default: run(std::integral_constant<int, 4>{});
  }
  const int64_t nv = block.num_vectors;
  if (part != nullptr) {
    part->max.assign(block.max.begin(), block.max.begin() + nq);
    part->sum.assign(block.sum.begin(), block.sum.begin() + nq);
    part->acc.resize(nq * d);
  }
  for (int64_t v = 0; v < nq; ++v) {
    const int64_t t = it.first_query + v / a.heads_per_group, h = it.group * a.heads_per_group + v % a.heads_per_group;
    float* dst = part != nullptr ? &part->acc[v * d] : out + (t * a.num_heads + h) * d;
    const float weight = part != nullptr ? 1.f : 1.f / block.sum[v];
    for (int64_t c = 0; c < d; ++c) dst[c] = block.out[c * nv + v] * weight;
  }
}
#endif

#if defined(FDKIT_TILED_ATTENTION)
// A few query vectors (a decode) in SIMD register blocks (attention_decode.h), float32: its unnormalized
// outputs in `part`, merged as the scalar loop's are.
void RunDecodeItem(const Item& it, const Args& a, Partial* part) {
  const int64_t nq = it.num_queries * a.heads_per_group, d = a.head_dim;
  std::vector<const float*> qv(nq);
  std::vector<int64_t> limits(nq);
  for (int64_t v = 0; v < nq; ++v) {
    const int64_t t = it.first_query + v / a.heads_per_group;
    qv[v] = a.q + (t * a.num_heads + it.group * a.heads_per_group + v % a.heads_per_group) * d;
    limits[v] = std::min(a.num_keys[t], it.key_end);
  }
  part->max.assign(nq, kMasked);
  part->sum.assign(nq, 0.f);
  part->acc.assign(nq * d, 0.f);
  decode::Run(qv.data(), limits.data(), nq, it.key_begin, a.k_cache, a.v_cache, a.slots + it.row * a.row_len,
              a.kv_heads[it.group] * a.num_slots, d, a.scale, part->max.data(), part->sum.data(), part->acc.data());
}
#endif

void RunAnyItem(const Item& it, const Args& a, bool bf16, bool is_whole, Partial* part, float* out) {
#if defined(FDKIT_TILED_ATTENTION)
  if (it.is_tiled) {
#if defined(__AVX512BF16__)
    if (bf16) return RunTiledItem<true>(it, a, is_whole ? nullptr : part, out);
#endif
    return RunTiledItem<false>(it, a, is_whole ? nullptr : part, out);
  }
  if (a.head_dim % decode::kDimAlign == 0) return RunDecodeItem(it, a, part);
#endif
  RunItem(it, a.q, a.k_cache, a.v_cache, a.slots + it.row * a.row_len, a.num_keys,
          a.kv_heads[it.group] * a.num_slots, a.heads_per_group, a.num_heads, a.head_dim, a.scale, part);
}

// Adds the parts [i, j) of one (run, group), each rescaled to their common max, into out, normalized.
void Merge(const std::vector<Item>& items, const std::vector<Partial>& partials, size_t i, size_t j,
           const Args& a, float* out) {
  const Item& it = items[i];
  const int64_t nq = it.num_queries * a.heads_per_group, d = a.head_dim;
  for (int64_t v = 0; v < nq; ++v) {
    float m = kMasked;
    for (size_t p = i; p < j; ++p) m = std::max(m, partials[p].max[v]);
    float total = 0.f;
    const int64_t t = it.first_query + v / a.heads_per_group, h = it.group * a.heads_per_group + v % a.heads_per_group;
    float* dst = out + (t * a.num_heads + h) * d;
    for (size_t p = i; p < j; ++p) {
      if (partials[p].sum[v] == 0.f) continue;  // a part past this query's keys
      const float w = std::exp(partials[p].max[v] - m);
      total += partials[p].sum[v] * w;
      const float* acc = &partials[p].acc[v * d];
      for (int64_t c = 0; c < d; ++c) dst[c] += w * acc[c];
    }
    for (int64_t c = 0; c < d; ++c) dst[c] /= total;
  }
}

}  // namespace

std::vector<paddle::Tensor> PagedAttentionForward(const paddle::Tensor& q, const paddle::Tensor& k_cache,
                                                  const paddle::Tensor& v_cache, const paddle::Tensor& key_slots,
                                                  const paddle::Tensor& query_rows, const paddle::Tensor& num_keys,
                                                  const paddle::Tensor& kv_heads, int64_t num_kv_heads, float scale,
                                                  bool bf16, int64_t num_threads) {
  PD_CHECK(q.dtype() == paddle::DataType::FLOAT32 && k_cache.dtype() == paddle::DataType::FLOAT32,
           "paged_attention: float32 only");
  const int64_t num_queries = q.shape()[0], num_heads = q.shape()[1], head_dim = q.shape()[2];
  const int64_t num_groups = kv_heads.shape()[0], heads_per_group = num_heads / num_groups;
  const Args a{q.data<float>(), k_cache.data<float>(), v_cache.data<float>(), key_slots.data<int64_t>(),
               num_keys.data<int64_t>(), kv_heads.data<int64_t>(), key_slots.shape()[1],
               k_cache.shape()[0] / num_kv_heads, num_heads, heads_per_group, head_dim, scale};

  std::vector<Item> items;
  std::vector<int64_t> run_of_item;
  const auto runs = QueryRuns(query_rows.data<int64_t>(), num_queries, heads_per_group, head_dim);
  const int64_t work_items = static_cast<int64_t>(runs.size()) * num_groups;
  for (size_t r = 0; r < runs.size(); ++r) {
    const Run& run = runs[r];
    const int64_t* run_keys = a.num_keys + run.first_query;
    const int64_t keys = *std::max_element(run_keys, run_keys + run.num_queries);
    // split a long row's keys when there are fewer items than threads
    int64_t splits = std::max<int64_t>(1, std::min(num_threads / std::max<int64_t>(1, work_items),
                                                   keys / kMinSplitKeys));
    const int64_t part = (keys + splits - 1) / splits;
    for (int64_t g = 0; g < num_groups; ++g)
      for (int64_t b = 0; b < keys; b += part) {
        items.push_back({run.row, run.first_query, run.num_queries, g, b, std::min(keys, b + part), run.is_tiled});
        run_of_item.push_back(static_cast<int64_t>(r));
      }
  }
  // a tiled item that is its (run, group)'s only part writes its outputs itself
  std::vector<char> is_whole(items.size());
  for (size_t i = 0; i < items.size(); ++i)
    is_whole[i] = items[i].is_tiled && items[i].key_begin == 0 &&
                  (i + 1 == items.size() || items[i + 1].key_begin == 0);

  auto out = paddle::empty({num_queries, num_heads * head_dim}, paddle::DataType::FLOAT32, q.place());
  float* op = out.data<float>();
  std::fill(op, op + num_queries * num_heads * head_dim, 0.f);
  std::vector<Partial> partials(items.size());
  // items differ in length (a causal prompt's blocks): each thread takes the next. Not schedule(dynamic):
  // GCC's dynamic loop under paddle's Intel OpenMP runtime gave wrong outputs and corrupted the heap.
  std::atomic<int64_t> next_item{0};
#pragma omp parallel num_threads(num_threads)
  for (int64_t i; (i = next_item.fetch_add(1)) < static_cast<int64_t>(items.size());)
    RunAnyItem(items[i], a, bf16, is_whole[i], &partials[i], op);

  for (size_t i = 0; i < items.size();) {
    size_t j = i + 1;
    while (j < items.size() && run_of_item[j] == run_of_item[i] && items[j].group == items[i].group) ++j;
    if (!is_whole[i]) Merge(items, partials, i, j, a, op);
    i = j;
  }
  return {out};
}

PD_BUILD_OP(fdkit_paged_attention)
    .Inputs({"Q", "KCache", "VCache", "KeySlots", "QueryRows", "NumKeys", "KvHeads"})
    .Outputs({"Out"})
    .Attrs({"num_kv_heads: int64_t", "scale: float", "bf16: bool", "num_threads: int64_t"})
    .SetKernelFn(PD_KERNEL(PagedAttentionForward));
