// paged_decode_attention: one query token per sequence attends to its whole context, read in
// place through the block table. Nothing is gathered into contiguous memory: every key and value
// row is loaded once and used by all the query heads of its GQA group.
//
//   key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]
//   token t of a sequence lives at block block_table[t / block_size], row t % block_size
//
// Each sequence (or, with few sequences, each of its kv heads) is one work item and makes two
// passes over its context: scores = q . k for every token (then softmax), and out = sum p * v.
// With a sliding window the context is only the last `window` tokens, [len - window, len); with
// a soft cap each score becomes cap * tanh(score / cap) before the softmax (Gemma 2).
//
// Written once on vec.h's vocabulary and built per ISA: head_dim a multiple of the vector width
// takes the register-blocked path (the G query rows of a kv head share each loaded key/value
// row); other head dims take the plain loop. AVX512_BF16 builds score bf16 keys with vdpbf16ps.
//
// T is the query/output type, S the cache's: T itself, or fp8 (attention/kv_quant.py), whose
// rows widen to float as they load; its K scale folds into the queries and its V scale into
// the output, so the loops themselves never see a scale.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "kernels.h"
#include "vec.h"

namespace pagedllm {
namespace {

using vec::bf16;
using vec::F;
using vec::kLanes;

template <typename T, typename S>
struct DecodeProblem {
  const T* query;        // [num_seqs, num_heads, head_dim]
  const S* key_cache;    // [num_blocks, block_size, num_kv_heads, head_dim]
  const S* value_cache;
  const int64_t* block_tables;  // [num_seqs, max_blocks]
  const int64_t* seq_lens;      // [num_seqs]
  T* out;                // [num_seqs, num_heads, head_dim]
  int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  float scale;
  int64_t window;  // 0: the whole context
  float soft_cap;  // 0: none
  float k_scale, v_scale;  // an fp8 cache's scales (1 for a float cache)
};

// The tokens a sequence of `len` attends to: [first, len).
template <typename T, typename S>
inline int64_t first_token(const DecodeProblem<T, S>& p, int64_t len) {
  return p.window > 0 && len > p.window ? len - p.window : 0;
}

// Row `token` of head `kv_head` in a sequence's paged cache.
template <typename T, typename S>
inline const S* cache_row(const S* cache, const int64_t* table, int64_t token,
                          const DecodeProblem<T, S>& p, int64_t kv_head) {
  const int64_t block = table[token / p.block_size];
  const int64_t row = block * p.block_size + token % p.block_size;
  return cache + (row * p.num_kv_heads + kv_head) * p.head_dim;
}

// Softmax of each of `group` rows of `len` scores, in place, after the optional soft cap.
inline void softmax_rows(float* scores, int64_t group, int64_t len, float soft_cap) {
  if (soft_cap > 0.f)
    for (int64_t i = 0; i < group * len; ++i) scores[i] = soft_cap * std::tanh(scores[i] / soft_cap);
  for (int64_t g = 0; g < group; ++g) {
    float* row = scores + g * len;
    const float top = *std::max_element(row, row + len);
    float sum = 0.f;
    int64_t t = 0;
    for (; t + kLanes <= len; t += kLanes) {
      const F e = vec::exp(vec::sub(vec::load(row + t), vec::set1(top)));
      vec::store(row + t, e);
      sum += vec::reduce_add(e);
    }
    for (; t < len; ++t) {
      row[t] = std::exp(row[t] - top);
      sum += row[t];
    }
    const float inv = 1.f / sum;
    for (t = 0; t < len; ++t) row[t] *= inv;
  }
}

// One kv head of one sequence with its G query heads, head_dim = C vectors known at compile
// time, so the queries and the output accumulators stay in registers (or L1) for the pass.
// Tokens [first, first + len) of the sequence fill score columns [0, len).
template <typename T, typename S, int C, int G>
void score_keys_head(const DecodeProblem<T, S>& p, const int64_t* table, int64_t h, int64_t first,
                     int64_t len, const float* q, float* scores) {
  F qv[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = vec::load(q + g * p.head_dim + c * kLanes);
  for (int64_t t = 0; t < len; ++t) {
    const S* k = cache_row(p.key_cache, table, first + t, p, h);
    F row[C];
    for (int c = 0; c < C; ++c) row[c] = vec::load(k + c * kLanes);
    for (int g = 0; g < G; ++g) {
      F sum = vec::mul(row[0], qv[g][0]);
      for (int c = 1; c < C; ++c) sum = vec::fma(row[c], qv[g][c], sum);
      scores[g * len + t] = vec::reduce_add(sum);
    }
  }
}

#ifdef __AVX512BF16__
// Sixteen vectors in, one out: lane i holds the sum of v[i]'s lanes (a transpose-and-add tree,
// about three instructions per vector instead of a full horizontal sum for each).
inline __m512 fold16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                                  _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88),
                                  _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// bf16 caches: q . k straight from bf16 pairs with vdpbf16ps (products exact, sums in float, as
// in a bf16 matmul), sixteen tokens at a time, then scaled.
template <int C, int G>
void score_keys_head_bf16(const DecodeProblem<bf16, bf16>& p, const int64_t* table, int64_t h,
                          int64_t first, int64_t len, const bf16* q_raw, float* scores) {
  constexpr int kPairs = C / 2;  // 32 bf16 per load
  __m512bh qv[G][kPairs];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < kPairs; ++j)
      qv[g][j] = (__m512bh)_mm512_loadu_si512(q_raw + g * p.head_dim + j * 32);
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - t0));
    const bf16* rows[16];
    for (int i = 0; i < n; ++i) rows[i] = cache_row(p.key_cache, table, first + t0 + i, p, h);
    for (int g = 0; g < G; ++g) {
      __m512 parts[16];
      for (int i = 0; i < 16; ++i) {
        __m512 sum = _mm512_setzero_ps();
        if (i < n)
          for (int j = 0; j < kPairs; ++j)
            sum = _mm512_dpbf16_ps(sum, qv[g][j], (__m512bh)_mm512_loadu_si512(rows[i] + j * 32));
        parts[i] = sum;
      }
      const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
      _mm512_mask_storeu_ps(scores + g * len + t0, valid, _mm512_mul_ps(fold16(parts), scale));
    }
  }
}
#endif

// Accumulators the value pass keeps live: AVX-512 has 32 vector registers, AVX2 16 (the rows
// loaded and the broadcast weight need the rest). Past this the accumulators spill and every FMA
// goes through the stack: 2.5x slower on AVX2 for SmolLM2's 3 heads x 8 vectors.
constexpr int kAccumulators = kLanes == 16 ? 24 : 12;

// The widest block of a head's C vectors whose G x block accumulators stay in registers.
template <int C, int G>
constexpr int value_columns() {
  int block = C;
  while (block > 1 && block * G > kAccumulators) block /= 2;
  return block;
}

// acc (G rows of head_dim) = sum over tokens of weight * v, one block of B vectors at a time:
// each pass reads its slice of every value row (the rows stay in L2 between passes).
template <typename T, typename S, int C, int G>
void weigh_values_head(const DecodeProblem<T, S>& p, const int64_t* table, int64_t h, int64_t first,
                       int64_t len, const float* weights, float* acc) {
  constexpr int B = value_columns<C, G>();
  for (int c0 = 0; c0 < C; c0 += B) {
    F sums[G][B];
    for (int g = 0; g < G; ++g)
      for (int b = 0; b < B; ++b) sums[g][b] = vec::zero();
    for (int64_t t = 0; t < len; ++t) {
      const S* v = cache_row(p.value_cache, table, first + t, p, h) + c0 * kLanes;
      F row[B];
      for (int b = 0; b < B; ++b) row[b] = vec::load(v + b * kLanes);
      for (int g = 0; g < G; ++g) {
        const F w = vec::set1(weights[g * len + t]);
        for (int b = 0; b < B; ++b) sums[g][b] = vec::fma(w, row[b], sums[g][b]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int b = 0; b < B; ++b)
        vec::store(acc + g * p.head_dim + (c0 + b) * kLanes, sums[g][b]);
  }
}

// Both passes for kv heads [h0, h1) of one sequence, softmax between them.
template <typename T, typename S, int C, int G>
void attend_heads(const DecodeProblem<T, S>& p, const int64_t* table, int64_t h0, int64_t h1,
                  int64_t first, int64_t len, const T* q_raw, const float* q, float* scores,
                  float* acc) {
  for (int64_t h = h0; h < h1; ++h) {
    const int64_t row = (h - h0) * G;
#ifdef __AVX512BF16__
    if constexpr (std::is_same_v<T, bf16> && std::is_same_v<S, bf16> && C % 2 == 0) {
      score_keys_head_bf16<C, G>(p, table, h, first, len, q_raw + row * p.head_dim,
                                 scores + row * len);
    } else
#endif
    {
      score_keys_head<T, S, C, G>(p, table, h, first, len, q + row * p.head_dim, scores + row * len);
    }
    softmax_rows(scores + row * len, G, len, p.soft_cap);
    weigh_values_head<T, S, C, G>(p, table, h, first, len, scores + row * len,
                               acc + row * p.head_dim);
  }
}

// The (head_dim, group) shapes with a register-blocked kernel; others take the plain loop.
template <typename T, typename S>
using HeadsKernel = void (*)(const DecodeProblem<T, S>&, const int64_t*, int64_t, int64_t, int64_t,
                             int64_t, const T*, const float*, float*, float*);

template <typename T, typename S, int C>
HeadsKernel<T, S> kernel_for_group(int64_t group) {
  switch (group) {
    case 1: return attend_heads<T, S, C, 1>;
    case 2: return attend_heads<T, S, C, 2>;
    case 3: return attend_heads<T, S, C, 3>;
    case 4: return attend_heads<T, S, C, 4>;
    case 5: return attend_heads<T, S, C, 5>;
    case 6: return attend_heads<T, S, C, 6>;
    case 7: return attend_heads<T, S, C, 7>;
    case 8: return attend_heads<T, S, C, 8>;
    default: return nullptr;
  }
}

// Vectors per head for the common head dims (at most 1024 floats of queries and accumulators
// per work item, so wide heads take fewer query rows).
template <typename T, typename S>
HeadsKernel<T, S> vectorized_kernel(const DecodeProblem<T, S>& p) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  if (p.head_dim * group > 1024) return nullptr;
  switch (p.head_dim) {
    case 32: return kernel_for_group<T, S, 32 / kLanes>(group);
    case 64: return kernel_for_group<T, S, 64 / kLanes>(group);
    case 128: return kernel_for_group<T, S, 128 / kLanes>(group);
    default: return nullptr;
  }
}

template <typename T, typename S>
void score_keys_plain(const DecodeProblem<T, S>& p, const int64_t* table, int64_t h0, int64_t h1,
                      int64_t first, int64_t len, const float* q, float* scores) {
  const int64_t group = p.num_heads / p.num_kv_heads, dim = p.head_dim;
  for (int64_t t = 0; t < len; ++t)
    for (int64_t g = 0; g < (h1 - h0) * group; ++g) {
      const S* k = cache_row(p.key_cache, table, first + t, p, h0 + g / group);
      scores[g * len + t] = vec::dot(q + g * dim, k, dim);
    }
}

template <typename T, typename S>
void weigh_values_plain(const DecodeProblem<T, S>& p, const int64_t* table, int64_t h0, int64_t h1,
                        int64_t first, int64_t len, const float* weights, float* acc) {
  const int64_t group = p.num_heads / p.num_kv_heads, dim = p.head_dim;
  std::fill(acc, acc + (h1 - h0) * group * dim, 0.f);
  for (int64_t t = 0; t < len; ++t)
    for (int64_t g = 0; g < (h1 - h0) * group; ++g) {
      const S* v = cache_row(p.value_cache, table, first + t, p, h0 + g / group);
      vec::axpy(acc + g * dim, weights[g * len + t], v, dim);
    }
}

// One sequence, kv heads [h0, h1): its query heads are rows [h0 * group, h1 * group).
template <typename T, typename S>
void attend(const DecodeProblem<T, S>& p, int64_t seq, int64_t h0, int64_t h1,
            std::vector<float>& scores, std::vector<float>& q, std::vector<float>& acc) {
  const int64_t dim = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int64_t rows = (h1 - h0) * group, first = first_token(p, p.seq_lens[seq]);
  const int64_t len = p.seq_lens[seq] - first;  // tokens attended to
  const int64_t* table = p.block_tables + seq * p.max_blocks;
  const T* q_src = p.query + (seq * p.num_heads + h0 * group) * dim;
  const float q_scale = p.scale * p.k_scale;
  for (int64_t i = 0; i < rows * dim; ++i) q[i] = vec::to_float(q_src[i]) * q_scale;
  scores.resize(rows * len);
  if (const HeadsKernel<T, S> kernel = vectorized_kernel(p)) {
    kernel(p, table, h0, h1, first, len, q_src, q.data(), scores.data(), acc.data());
  } else {
    score_keys_plain(p, table, h0, h1, first, len, q.data(), scores.data());
    softmax_rows(scores.data(), rows, len, p.soft_cap);
    weigh_values_plain(p, table, h0, h1, first, len, scores.data(), acc.data());
  }
  T* out = p.out + (seq * p.num_heads + h0 * group) * dim;
  if (p.v_scale != 1.f)
    for (int64_t i = 0; i < rows * dim; ++i) acc[i] *= p.v_scale;
  vec::convert(out, acc.data(), rows * dim);
}

// Work items are whole sequences unless there are too few to keep every thread busy; then each
// kv head is an item of its own.
template <typename T, typename S>
void run_decode(const DecodeProblem<T, S>& p, int64_t num_seqs) {
  const int64_t split = num_seqs < 2 * at::get_num_threads() ? p.num_kv_heads : 1;
  const int64_t heads_per_item = p.num_kv_heads / split;
  const int64_t width = heads_per_item * (p.num_heads / p.num_kv_heads) * p.head_dim;
  at::parallel_for(0, num_seqs * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, q(width), acc(width);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h0 = item % split * heads_per_item;
      attend(p, item / split, h0, h0 + heads_per_item, scores, q, acc);
    }
  });
}

template <typename T, typename S>
void decode_typed(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                  const at::Tensor& seq_lens, double scale, int64_t window, double soft_cap,
                  double k_scale, double v_scale) {
  constexpr bool kScaled = !std::is_same_v<T, S>;  // only an fp8 cache has scales
  DecodeProblem<T, S> p{query.data_ptr<T>(),
                        static_cast<const S*>(key_cache.data_ptr()),
                        static_cast<const S*>(value_cache.data_ptr()),
                        block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                        out.data_ptr<T>(), query.size(1), key_cache.size(2), query.size(2),
                        key_cache.size(1), block_tables.size(1), static_cast<float>(scale),
                        window, static_cast<float>(soft_cap),
                        kScaled ? static_cast<float>(k_scale) : 1.f,
                        kScaled ? static_cast<float>(v_scale) : 1.f};
  run_decode(p, query.size(0));
}

}  // namespace

void paged_decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale, int64_t window,
                            double soft_cap, double k_scale, double v_scale) {
  TORCH_CHECK(query.is_contiguous() && out.is_contiguous(), "query and out must be contiguous");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "block_tables and seq_lens must be int64");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous(), "tables must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "K and V cache dtypes differ");
  TORCH_CHECK(query.scalar_type() == out.scalar_type(), "query and out dtypes differ");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(k_scale > 0 && v_scale > 0, "k_scale and v_scale must be positive");
  dispatch_attention(query.scalar_type(), key_cache.scalar_type(), "paged_decode_attention",
                     [&](auto query_type, auto cache_type) {
                       decode_typed<typename decltype(query_type)::type,
                                    typename decltype(cache_type)::type>(
                           out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                           window, soft_cap, k_scale, v_scale);
                     });
}

}  // namespace pagedllm
