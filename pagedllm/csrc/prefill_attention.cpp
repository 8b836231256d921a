// paged_prefill_attention: every prefill chunk of a step in one call, flash-attention style.
//
// A chunk's queries sit at positions [context_len - query_len, context_len) of its sequence and
// attend causally (and within the sliding window, if any) to the sequence's context: the cached
// prefix and the chunk itself, whose K/V the backend has already written into the cache. The
// context is read in place through the chunk's block table:
//
//   key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]
//   token t of a sequence lives at block block_table[t / block_size], row t % block_size
//
// Work item = (chunk, kv head, tile of consecutive query positions). An item takes the G query
// heads of its kv head for all its positions, so every key/value row it loads serves G * tile
// query rows. Its rows are ordered position-major:
//
//   row r = (position - first position) * G + g      (query head kv_head * G + g)
//
// The item walks its visible keys in tiles of kKeyTile tokens with an online softmax, in float32
// whatever the storage dtype. Buffers of one item (D = head_dim, Dp = D rounded up to whole
// vectors, Mp = rows rounded up to whole vectors, kt = tokens in the key tile):
//
//            <-- Mp -->                  <-- D -->             <-- Dp -->
//   q_t    [ Q^T * scale ] D      keys [ K tile  ] kt   values [ V tile | 0 ] kt
//
//            <-- Mp -->                  <-- Dp -->
//   scores [ S^T = keys @ q_t ] kt   acc [ O += P @ values ] Mp    row_max, row_sum, alpha [Mp]
//            then P^T in place
//
// The scores are kept transposed (keys down, query rows across) so that the softmax statistics
// of the query rows are vectors across a score row, the max and sum over keys are elementwise
// max/add of score rows, and only Q, once per item, needs transposing: the keys are packed row
// by row as they lie in the cache.
//
// Both products run on one register-blocked micro-kernel (outer-product form: a broadcast
// element of the left operand times whole vectors of the right one), with zero-padded buffers
// so that it never sees a partial vector.
//
// T is the query/output type, S the cache's: T, or fp8 (attention/kv_quant.py), widened as rows
// are packed; the K scale folds into q_t's scale and the V scale into the final 1 / row_sum.
//
// Masked scores are a large finite negative (the kernels build with -ffast-math, which assumes
// there are no infinities), and the running max starts at a floor above it, so a masked score's
// weight, exp(masked - max), is exactly 0 even for a row that has seen no visible key yet.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace pagedllm {
namespace {

using vec::bf16;
using vec::F;
using vec::kLanes;

constexpr int64_t kKeyTile = 64;     // keys per tile: the tile's buffers stay near L1
constexpr int64_t kTargetRows = 64;  // query rows per item (positions x group), before padding
constexpr int kRows = 4;             // micro-kernel rows
// Micro-kernel vectors per row: 16 accumulators of AVX-512's 32 registers, 8 of AVX2's 16. The
// portable F is two SSE (or NEON) registers wide, so one F per row already fills 8 of 16.
// (The conditions are vec.h's choice of F.)
#if defined(__AVX512F__)
constexpr int kMaxVectors = 4;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kMaxVectors = 2;
#else
constexpr int kMaxVectors = 1;
#endif
constexpr float kMasked = -2e30f;    // a hidden score
constexpr float kMaxFloor = -1e30f;  // the running max's start: exp(kMasked - max) == 0

inline int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// cap * tanh(x / cap), with tanh(y) = 1 - 2 / (exp(2y) + 1): exact limits ±1 for large |y|
// (vec::exp clamps instead of overflowing) and an absolute error of a few float ulps near 0.
inline F soft_cap(F x, float cap) {
  const F e = vec::exp(vec::mul(x, vec::set1(2.f / cap)));
  const F t = vec::sub(vec::set1(1.f), vec::div(vec::set1(2.f), vec::add(e, vec::set1(1.f))));
  return vec::mul(t, vec::set1(cap));
}

// ---- the micro-kernel ---------------------------------------------------------------------------

// A left operand read through strides: element (i, k) at data[i * row_stride + k * depth_stride],
// so the same kernel multiplies by a matrix (keys) or by a transposed one (P = scores^T).
struct Lhs {
  const float* data;
  int64_t row_stride, depth_stride;
};

// C[kRows x NV vectors] (+)= A[kRows x depth] @ B[depth x NV vectors]; B row k at b + k * ldb.
template <int NV, bool kAccumulate>
inline void micro_kernel(Lhs a, const float* b, int64_t ldb, float* c, int64_t ldc,
                         int64_t depth) {
  F acc[kRows][NV];
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < NV; ++v)
      acc[i][v] = kAccumulate ? vec::load(c + i * ldc + v * kLanes) : vec::zero();
  for (int64_t k = 0; k < depth; ++k) {
    const float* a_k = a.data + k * a.depth_stride;
    F b_k[NV];
    for (int v = 0; v < NV; ++v) b_k[v] = vec::load(b + k * ldb + v * kLanes);
    for (int i = 0; i < kRows; ++i) {
      const F a_ik = vec::set1(a_k[i * a.row_stride]);
      for (int v = 0; v < NV; ++v) acc[i][v] = vec::fma(a_ik, b_k[v], acc[i][v]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < NV; ++v) vec::store(c + i * ldc + v * kLanes, acc[i][v]);
}

// The last column block of a row may be narrower than kMaxVectors: pick the kernel of its width.
template <bool kAccumulate, int NV = kMaxVectors>
inline void column_block(int64_t vectors, Lhs a, const float* b, int64_t ldb, float* c,
                         int64_t ldc, int64_t depth) {
  if constexpr (NV > 1) {
    if (vectors < NV) return column_block<kAccumulate, NV - 1>(vectors, a, b, ldb, c, ldc, depth);
  }
  micro_kernel<NV, kAccumulate>(a, b, ldb, c, ldc, depth);
}

// C[rows x vectors] (+)= A[rows x depth] @ B[depth x vectors]; rows is a multiple of kRows.
// Column blocks outside: one block of B (depth x kMaxVectors) stays in L1 while A streams past.
template <bool kAccumulate>
void matmul(int64_t rows, int64_t vectors, int64_t depth, Lhs a, const float* b, int64_t ldb,
            float* c, int64_t ldc) {
  for (int64_t v = 0; v < vectors; v += kMaxVectors) {
    const int64_t width = std::min<int64_t>(kMaxVectors, vectors - v);
    for (int64_t i = 0; i < rows; i += kRows) {
      const Lhs a_i{a.data + i * a.row_stride, a.row_stride, a.depth_stride};
      column_block<kAccumulate>(width, a_i, b + v * kLanes, ldb, c + i * ldc + v * kLanes, ldc,
                                depth);
    }
  }
}

// ---- the problem and one work item --------------------------------------------------------------

template <typename T, typename S>
struct PrefillProblem {
  const T* query;  // [num_tokens, num_heads, head_dim]
  const S* key_cache;  // [num_blocks, block_size, num_kv_heads, head_dim]
  const S* value_cache;
  T* out;  // [num_tokens, num_heads, head_dim]
  const int64_t* chunks;  // [num_chunks, 3]: query_start, query_len, context_len
  const int64_t* block_tables;  // [num_chunks, max_blocks]
  int64_t num_heads, num_kv_heads, group, head_dim, block_size, max_blocks;
  float scale, soft_cap;  // soft_cap 0: none
  float k_scale, v_scale;  // an fp8 cache's scales (1 for a float cache)
  int64_t window;  // 0: none
  int64_t tile_positions;  // query positions per work item
  int64_t rows_padded;  // Mp: tile_positions * group rounded up to whole vectors
  int64_t dim_padded;  // Dp: head_dim rounded up to whole vectors
};

struct WorkItem {
  int64_t chunk, kv_head;
  int64_t first, count;  // query offsets [first, first + count) within the chunk
  int64_t cost;  // keys visible to the tile's last position: the work, for ordering
};

// One thread's buffers (see the layout at the top), allocated once per call and reused by every
// item the thread takes. Zero-initialized: the padding is never written again and stays zero.
struct Workspace {
  std::vector<float> storage;
  std::vector<int64_t> row_offsets;  // each query row's offset in `query`
  float *q_t, *keys, *values, *scores, *acc, *row_max, *row_sum, *alpha;

  template <typename T, typename S>
  explicit Workspace(const PrefillProblem<T, S>& p) {
    const int64_t mp = p.rows_padded, d = p.head_dim, dp = p.dim_padded;
    const int64_t keys_padded = round_up(kKeyTile, kRows);
    const int64_t sizes[] = {d * mp, keys_padded * d, kKeyTile * dp, keys_padded * mp, mp * dp,
                             mp, mp, mp};
    int64_t total = 0;
    for (int64_t size : sizes) total += size;
    storage.assign(total, 0.f);
    row_offsets.resize(mp);
    float** slots[] = {&q_t, &keys, &values, &scores, &acc, &row_max, &row_sum, &alpha};
    float* next = storage.data();
    for (int i = 0; i < 8; ++i) {
      *slots[i] = next;
      next += sizes[i];
    }
  }
};

// Which score columns a key position hides. Column r's query position is first + r / group
// (padding columns repeat the last position), so positions never decrease across a row and
// "columns whose position is below x" is a prefix.
struct TileColumns {
  int64_t first, count, group, padded;

  int64_t below(int64_t position) const {
    if (position <= first) return 0;
    if (position >= first + count) return padded;
    return (position - first) * group;
  }
};

// q_t[d][r] = query row r, element d, times scale; padding columns zero. Filled one q_t row at
// a time, so the stores are contiguous and the strided reads hit the few rows already in L1.
template <typename T, typename S>
void load_queries(const PrefillProblem<T, S>& p, int64_t first_token, int64_t count, int64_t kv_head,
                  int64_t* row_offsets, float* q_t) {
  const int64_t rows = count * p.group, mp = p.rows_padded;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = first_token + r / p.group, head = kv_head * p.group + r % p.group;
    row_offsets[r] = (token * p.num_heads + head) * p.head_dim;
  }
  for (int64_t d = 0; d < p.head_dim; ++d) {
    float* dst = q_t + d * mp;
    for (int64_t r = 0; r < rows; ++r)
      dst[r] = vec::to_float(p.query[row_offsets[r] + d]) * (p.scale * p.k_scale);
    std::fill(dst + rows, dst + mp, 0.f);
  }
}

// Keys and values of tokens [first, first + count) as float32 rows (keys padded with zero rows to
// a whole micro-kernel block; value rows padded to Dp columns, which stay zero).
template <typename T, typename S>
void pack_keys_values(const PrefillProblem<T, S>& p, const int64_t* table, int64_t kv_head,
                      int64_t first, int64_t count, float* keys, float* values) {
  const int64_t d = p.head_dim;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t token = first + j;
    const int64_t slot = table[token / p.block_size] * p.block_size + token % p.block_size;
    const int64_t offset = (slot * p.num_kv_heads + kv_head) * d;
    vec::convert(keys + j * d, p.key_cache + offset, d);
    vec::convert(values + j * p.dim_padded, p.value_cache + offset, d);
  }
  std::fill(keys + count * d, keys + round_up(count, kRows) * d, 0.f);
}

// Soft cap and mask of the tile's scores, key positions [first_key, first_key + count).
template <typename T, typename S>
void cap_and_mask(const PrefillProblem<T, S>& p, const TileColumns& columns, int64_t first_key,
                  int64_t count, float* scores) {
  const int64_t mp = p.rows_padded;
  if (p.soft_cap > 0.f)
    for (int64_t i = 0; i < count * mp; i += kLanes)
      vec::store(scores + i, soft_cap(vec::load(scores + i), p.soft_cap));
  for (int64_t j = 0; j < count; ++j) {
    const int64_t key = first_key + j;
    float* row = scores + j * mp;
    std::fill(row, row + columns.below(key), kMasked);  // queries before the key
    if (p.window > 0)  // queries at or past key + window: the key left their window
      std::fill(row + columns.below(key + p.window), row + mp, kMasked);
  }
}

// Online softmax step: scores (count rows) become the weights exp(s - new max); row_sum and
// row_max are updated; alpha[r] = exp(old max - new max) is what acc row r must be scaled by.
void softmax_step(int64_t mp, int64_t count, float* scores, float* row_max, float* row_sum,
                  float* alpha) {
  for (int64_t c = 0; c < mp; c += kLanes) {
    const F old_max = vec::load(row_max + c);
    F new_max = old_max;
    for (int64_t j = 0; j < count; ++j) new_max = vec::max(new_max, vec::load(scores + j * mp + c));
    F sum = vec::zero();
    for (int64_t j = 0; j < count; ++j) {
      const F weight = vec::exp(vec::sub(vec::load(scores + j * mp + c), new_max));
      vec::store(scores + j * mp + c, weight);
      sum = vec::add(sum, weight);
    }
    const F scale = vec::exp(vec::sub(old_max, new_max));
    vec::store(alpha + c, scale);
    vec::store(row_max + c, new_max);
    vec::store(row_sum + c, vec::fma(vec::load(row_sum + c), scale, sum));
  }
}

void rescale_rows(int64_t mp, int64_t dp, const float* alpha, float* acc) {
  for (int64_t r = 0; r < mp; ++r) {
    if (alpha[r] == 1.f) continue;  // the max did not move: the common case after a few tiles
    const F a = vec::set1(alpha[r]);
    for (int64_t d = 0; d < dp; d += kLanes)
      vec::store(acc + r * dp + d, vec::mul(vec::load(acc + r * dp + d), a));
  }
}

// dst[0, n) = src[0, n) * factor in dst's dtype.
template <typename T>
void store_row(T* dst, const float* src, float factor, int64_t n) {
  const F f = vec::set1(factor);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vec::store(dst + i, vec::mul(vec::load(src + i), f));
  for (; i < n; ++i) vec::store_scalar(dst + i, src[i] * factor);
}

template <typename T, typename S>
void attend_tile(const PrefillProblem<T, S>& p, const WorkItem& item, Workspace& ws) {
  const int64_t* info = p.chunks + 3 * item.chunk;
  const int64_t query_start = info[0], query_len = info[1], context_len = info[2];
  const int64_t* table = p.block_tables + item.chunk * p.max_blocks;
  const int64_t mp = p.rows_padded, dp = p.dim_padded, d = p.head_dim;
  const TileColumns columns{context_len - query_len + item.first, item.count, p.group, mp};

  load_queries(p, query_start + item.first, item.count, item.kv_head, ws.row_offsets.data(),
               ws.q_t);
  std::fill(ws.row_max, ws.row_max + mp, kMaxFloor);
  std::fill(ws.row_sum, ws.row_sum + mp, 0.f);
  std::fill(ws.acc, ws.acc + mp * dp, 0.f);

  // keys some row of the tile sees: from the first row's window start to the last row
  const int64_t end = columns.first + columns.count;
  const int64_t begin = p.window > 0 ? std::max<int64_t>(0, columns.first - p.window + 1) : 0;
  for (int64_t first_key = begin; first_key < end; first_key += kKeyTile) {
    const int64_t count = std::min(kKeyTile, end - first_key);
    pack_keys_values(p, table, item.kv_head, first_key, count, ws.keys, ws.values);
    matmul<false>(round_up(count, kRows), mp / kLanes, d, Lhs{ws.keys, d, 1}, ws.q_t, mp,
                  ws.scores, mp);
    cap_and_mask(p, columns, first_key, count, ws.scores);
    softmax_step(mp, count, ws.scores, ws.row_max, ws.row_sum, ws.alpha);
    rescale_rows(mp, dp, ws.alpha, ws.acc);
    matmul<true>(mp, dp / kLanes, count, Lhs{ws.scores, 1, mp}, ws.values, dp, ws.acc, dp);
  }

  for (int64_t q = 0; q < item.count; ++q) {
    const int64_t token = query_start + item.first + q;
    for (int64_t g = 0; g < p.group; ++g) {
      const int64_t r = q * p.group + g;
      T* dst = p.out + (token * p.num_heads + item.kv_head * p.group + g) * d;
      store_row(dst, ws.acc + r * dp, p.v_scale / ws.row_sum[r], d);
    }
  }
}

// Every (chunk, kv head, query tile), the most expensive first: causal tiles late in a long
// chunk see many more keys than early ones.
template <typename T, typename S>
std::vector<WorkItem> plan_items(const PrefillProblem<T, S>& p, int64_t num_chunks) {
  std::vector<WorkItem> items;
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t query_len = p.chunks[3 * c + 1], context_len = p.chunks[3 * c + 2];
    for (int64_t first = 0; first < query_len; first += p.tile_positions) {
      const int64_t count = std::min(p.tile_positions, query_len - first);
      const int64_t last = context_len - query_len + first + count - 1;  // last position
      const int64_t cost = p.window > 0 ? std::min(last + 1, p.window + count) : last + 1;
      for (int64_t h = 0; h < p.num_kv_heads; ++h) items.push_back({c, h, first, count, cost});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return items;
}

// Threads take items from a shared counter (longest first), which balances causal work better
// than a static split of the item range.
template <typename T, typename S>
void run_prefill(const PrefillProblem<T, S>& p, int64_t num_chunks) {
  const std::vector<WorkItem> items = plan_items(p, num_chunks);
  if (items.empty()) return;
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), items.size());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Workspace ws(p);
    for (size_t i = next++; i < items.size(); i = next++) attend_tile(p, items[i], ws);
  });
}

void check_chunks(const at::Tensor& chunks, const at::Tensor& block_tables, int64_t num_tokens,
                  int64_t num_blocks, int64_t block_size) {
  const int64_t* info = chunks.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1);
  for (int64_t c = 0; c < chunks.size(0); ++c) {
    const int64_t start = info[3 * c], len = info[3 * c + 1], context = info[3 * c + 2];
    TORCH_CHECK(start >= 0 && len >= 0 && start + len <= num_tokens, "chunk ", c,
                ": query rows [", start, ", ", start + len, ") outside the ", num_tokens,
                " tokens");
    TORCH_CHECK(len <= context, "chunk ", c, ": query_len ", len, " > context_len ", context);
    const int64_t blocks = (context + block_size - 1) / block_size;
    TORCH_CHECK(blocks <= max_blocks, "chunk ", c, ": context_len ", context, " needs ", blocks,
                " blocks, the block table has ", max_blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t block = tables[c * max_blocks + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "chunk ", c, ": block id ", block,
                  " outside the cache's ", num_blocks, " blocks");
    }
  }
}

template <typename T, typename S>
void prefill_typed(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                   const at::Tensor& value_cache, const at::Tensor& chunks,
                   const at::Tensor& block_tables, double scale, int64_t window,
                   double soft_cap, double k_scale, double v_scale) {
  constexpr bool kScaled = !std::is_same_v<T, S>;  // only an fp8 cache has scales
  PrefillProblem<T, S> p{};
  p.query = query.data_ptr<T>();
  p.key_cache = static_cast<const S*>(key_cache.data_ptr());
  p.value_cache = static_cast<const S*>(value_cache.data_ptr());
  p.k_scale = kScaled ? static_cast<float>(k_scale) : 1.f;
  p.v_scale = kScaled ? static_cast<float>(v_scale) : 1.f;
  p.out = out.data_ptr<T>();
  p.chunks = chunks.data_ptr<int64_t>();
  p.block_tables = block_tables.data_ptr<int64_t>();
  p.num_heads = query.size(1);
  p.num_kv_heads = key_cache.size(2);
  p.group = p.num_heads / p.num_kv_heads;
  p.head_dim = query.size(2);
  p.block_size = key_cache.size(1);
  p.max_blocks = block_tables.size(1);
  p.scale = static_cast<float>(scale);
  p.soft_cap = static_cast<float>(soft_cap);
  p.window = window;
  p.tile_positions = std::max<int64_t>(1, kTargetRows / p.group);
  p.rows_padded = round_up(p.tile_positions * p.group, kLanes);
  p.dim_padded = round_up(p.head_dim, kLanes);
  run_prefill(p, chunks.size(0));
}

}  // namespace

void paged_prefill_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& chunks,
                             const at::Tensor& block_tables, double scale, int64_t window,
                             double soft_cap, double k_scale, double v_scale) {
  for (const at::Tensor& t : {out, query, key_cache, value_cache, chunks, block_tables})
    TORCH_CHECK(t.device().is_cpu(), "paged_prefill_attention takes CPU tensors");
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(),
              "query and out must both be [num_tokens, num_heads, head_dim]");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "key_cache and value_cache must both be [num_blocks, block_size, kv_heads, dim]");
  TORCH_CHECK(key_cache.size(3) == query.size(2), "query head_dim ", query.size(2),
              " differs from the cache's ", key_cache.size(3));
  TORCH_CHECK(query.is_contiguous() && out.is_contiguous(), "query and out must be contiguous");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "caches must be contiguous");
  TORCH_CHECK(query.scalar_type() == out.scalar_type(), "query and out dtypes differ");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "K and V cache dtypes differ");
  TORCH_CHECK(k_scale > 0 && v_scale > 0, "k_scale and v_scale must be positive");
  TORCH_CHECK(chunks.scalar_type() == at::kLong && block_tables.scalar_type() == at::kLong,
              "chunks and block_tables must be int64");
  TORCH_CHECK(chunks.dim() == 2 && chunks.size(1) == 3, "chunks must be [num_chunks, 3]");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == chunks.size(0),
              "block_tables must be [num_chunks, max_blocks]");
  TORCH_CHECK(chunks.is_contiguous() && block_tables.is_contiguous(),
              "chunks and block_tables must be contiguous");
  TORCH_CHECK(key_cache.size(2) > 0 && query.size(1) % key_cache.size(2) == 0,
              "heads must be a multiple of kv heads");
  TORCH_CHECK(window >= 0 && soft_cap >= 0, "window and soft_cap must be >= 0 (0: none)");
  check_chunks(chunks, block_tables, query.size(0), key_cache.size(0), key_cache.size(1));
  dispatch_attention(query.scalar_type(), key_cache.scalar_type(), "paged_prefill_attention",
                     [&](auto query_type, auto cache_type) {
                       prefill_typed<typename decltype(query_type)::type,
                                     typename decltype(cache_type)::type>(
                           out, query, key_cache, value_cache, chunks, block_tables, scale,
                           window, soft_cap, k_scale, v_scale);
                     });
}

}  // namespace pagedllm
