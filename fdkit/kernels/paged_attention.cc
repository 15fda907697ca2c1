// Attention of a few queries per sequence over its keys in the paged KV cache, read in place: no gather,
// no [queries, keys] scores tensor. For decode steps and small prompt chunks on CPU, where gathering a
// 16k-token row's keys and running paddle's small-M matmuls cost ~9 ms a layer.
//
// The cache is head-major, [kv_heads * slots, head_dim] (fdkit.models.layers.PagedAttention): head h's
// slot s is row h * slots + s. Each query token t belongs to row query_rows[t] and sees keys
// key_slots[row, 0 : num_keys[t]]; a row's queries are consecutive. Work items are (run of one row's
// queries, KV head, key split): each reads its keys once for all the query heads that share the KV head,
// with an online softmax over tiles of keys; the splits of a long row are merged at the end.

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "paddle/extension.h"

namespace {

constexpr int64_t kTile = 64;           // keys scored at once
constexpr int64_t kMinSplitKeys = 512;  // a row's keys are split among threads in parts of at least this
constexpr float kMasked = -1e30f;       // a finite -inf: built with -ffast-math, which assumes no infinities

struct Item {
  int64_t row, first_query, num_queries, group, key_begin, key_end;
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

// (row, first query, number of queries) of each run of consecutive queries of one row.
std::vector<std::array<int64_t, 3>> RowRuns(const int64_t* query_rows, int64_t num_queries) {
  std::vector<std::array<int64_t, 3>> runs;
  for (int64_t t = 0; t < num_queries; ++t) {
    if (!runs.empty() && runs.back()[0] == query_rows[t])
      ++runs.back()[2];
    else
      runs.push_back({query_rows[t], t, 1});
  }
  return runs;
}

}  // namespace

std::vector<paddle::Tensor> PagedAttentionForward(const paddle::Tensor& q, const paddle::Tensor& k_cache,
                                                  const paddle::Tensor& v_cache, const paddle::Tensor& key_slots,
                                                  const paddle::Tensor& query_rows, const paddle::Tensor& num_keys,
                                                  const paddle::Tensor& kv_heads, int64_t num_kv_heads, float scale,
                                                  int64_t num_threads) {
  PD_CHECK(q.dtype() == paddle::DataType::FLOAT32 && k_cache.dtype() == paddle::DataType::FLOAT32,
           "paged_attention: float32 only");
  const int64_t num_queries = q.shape()[0], num_heads = q.shape()[1], head_dim = q.shape()[2];
  const int64_t num_groups = kv_heads.shape()[0], heads_per_group = num_heads / num_groups;
  const int64_t num_slots = k_cache.shape()[0] / num_kv_heads, row_len = key_slots.shape()[1];
  const float *qp = q.data<float>(), *kp = k_cache.data<float>(), *vp = v_cache.data<float>();
  const int64_t *slots = key_slots.data<int64_t>(), *rows = query_rows.data<int64_t>();
  const int64_t *lens = num_keys.data<int64_t>(), *heads = kv_heads.data<int64_t>();

  std::vector<Item> items;
  std::vector<int64_t> run_of_item;
  const auto runs = RowRuns(rows, num_queries);
  const int64_t work_items = static_cast<int64_t>(runs.size()) * num_groups;
  for (size_t r = 0; r < runs.size(); ++r) {
    const auto [row, first, count] = runs[r];
    const int64_t keys = *std::max_element(lens + first, lens + first + count);
    // split a long row's keys when there are fewer items than threads
    int64_t splits = std::max<int64_t>(1, std::min(num_threads / std::max<int64_t>(1, work_items),
                                                   keys / kMinSplitKeys));
    const int64_t part = (keys + splits - 1) / splits;
    for (int64_t g = 0; g < num_groups; ++g)
      for (int64_t b = 0; b < keys; b += part) {
        items.push_back({row, first, count, g, b, std::min(keys, b + part)});
        run_of_item.push_back(static_cast<int64_t>(r));
      }
  }
  std::vector<Partial> partials(items.size());
#pragma omp parallel for schedule(static, 1) num_threads(num_threads)
  for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i) {
    const Item& it = items[i];
    RunItem(it, qp, kp, vp, slots + it.row * row_len, lens, heads[it.group] * num_slots, heads_per_group,
            num_heads, head_dim, scale, &partials[i]);
  }

  auto out = paddle::empty({num_queries, num_heads * head_dim}, paddle::DataType::FLOAT32, q.place());
  float* op = out.data<float>();
  std::fill(op, op + num_queries * num_heads * head_dim, 0.f);
  // merge the splits of each (run, group): rescale each part to the common max
  for (size_t i = 0; i < items.size();) {
    size_t j = i;
    while (j < items.size() && run_of_item[j] == run_of_item[i] && items[j].group == items[i].group) ++j;
    const Item& it = items[i];
    const int64_t nq = it.num_queries * heads_per_group;
    for (int64_t v = 0; v < nq; ++v) {
      float m = kMasked;
      for (size_t p = i; p < j; ++p) m = std::max(m, partials[p].max[v]);
      float total = 0.f;
      const int64_t t = it.first_query + v / heads_per_group, h = it.group * heads_per_group + v % heads_per_group;
      float* dst = op + (t * num_heads + h) * head_dim;
      for (size_t p = i; p < j; ++p) {
        if (partials[p].sum[v] == 0.f) continue;  // a part past this query's keys
        const float w = std::exp(partials[p].max[v] - m);
        total += partials[p].sum[v] * w;
        const float* acc = &partials[p].acc[v * head_dim];
        for (int64_t d = 0; d < head_dim; ++d) dst[d] += w * acc[d];
      }
      for (int64_t d = 0; d < head_dim; ++d) dst[d] /= total;
    }
    i = j;
  }
  return {out};
}

PD_BUILD_OP(fdkit_paged_attention)
    .Inputs({"Q", "KCache", "VCache", "KeySlots", "QueryRows", "NumKeys", "KvHeads"})
    .Outputs({"Out"})
    .Attrs({"num_kv_heads: int64_t", "scale: float", "num_threads: int64_t"})
    .SetKernelFn(PD_KERNEL(PagedAttentionForward));
