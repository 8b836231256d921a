// CPU kernels for the hot path, compiled once on first use (see pagedllm/ops/cpu.py).
//
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
// The elementwise kernels (rms_norm, fused_add_rms_norm, silu_and_mul, rotary_embedding,
// write_kv) each replace a chain of small PyTorch ops whose per-op dispatch and extra memory
// passes dominate small batches. They compute in float32 and round to the tensor's dtype where
// the PyTorch reference rounds, so bfloat16 results match it (rotary rounds once, not per op).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
struct DecodeProblem {
  const T* query;        // [num_seqs, num_heads, head_dim]
  const T* key_cache;    // [num_blocks, block_size, num_kv_heads, head_dim]
  const T* value_cache;
  const int64_t* block_tables;  // [num_seqs, max_blocks]
  const int64_t* seq_lens;      // [num_seqs]
  T* out;                // [num_seqs, num_heads, head_dim]
  int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  float scale;
  int64_t window;  // 0: the whole context
  float soft_cap;  // 0: none
};

// The tokens a sequence of `len` attends to: [first, len).
template <typename T>
inline int64_t first_token(const DecodeProblem<T>& p, int64_t len) {
  return p.window > 0 && len > p.window ? len - p.window : 0;
}

// Row `token` of head `kv_head` in a sequence's paged cache.
template <typename T>
inline const T* cache_row(const T* cache, const int64_t* table, int64_t token,
                          const DecodeProblem<T>& p, int64_t kv_head) {
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
    for (int64_t t = 0; t < len; ++t) {
      row[t] = std::exp(row[t] - top);
      sum += row[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < len; ++t) row[t] *= inv;
  }
}

#ifdef __AVX512F__
#include <immintrin.h>

inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const c10::BFloat16* x) {  // bf16 is the top half of a float
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
constexpr int64_t kLanes = 16;

// One kv head of one sequence, with its G query heads and head_dim = C * 16 known at compile
// time, so the queries and the output accumulators live in registers for the whole pass.
// scores (G rows of len) = q . k, then softmax (by the caller), then out = sum w * v.
// Tokens [first, first + len) of the sequence fill score columns [0, len).
template <typename T, int C, int G>
void score_keys_head(const DecodeProblem<T>& p, const int64_t* table, int64_t h, int64_t first,
                     int64_t len, const float* q, float* scores) {
  __m512 qv[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = _mm512_loadu_ps(q + g * p.head_dim + c * kLanes);
  for (int64_t t = 0; t < len; ++t) {
    const T* k = cache_row(p.key_cache, table, first + t, p, h);
    __m512 row[C];
    for (int c = 0; c < C; ++c) row[c] = load16(k + c * kLanes);
    for (int g = 0; g < G; ++g) {
      __m512 sum = _mm512_mul_ps(row[0], qv[g][0]);
      for (int c = 1; c < C; ++c) sum = _mm512_fmadd_ps(row[c], qv[g][c], sum);
      scores[g * len + t] = _mm512_reduce_add_ps(sum);
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
void score_keys_head_bf16(const DecodeProblem<c10::BFloat16>& p, const int64_t* table, int64_t h,
                          int64_t first, int64_t len, const c10::BFloat16* q_raw, float* scores) {
  constexpr int kPairs = C / 2;  // 32 bf16 per load
  __m512bh qv[G][kPairs];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < kPairs; ++j)
      qv[g][j] = (__m512bh)_mm512_loadu_si512(q_raw + g * p.head_dim + j * 32);
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - t0));
    const c10::BFloat16* rows[16];
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

template <typename T, int C, int G>
void weigh_values_head(const DecodeProblem<T>& p, const int64_t* table, int64_t h, int64_t first,
                       int64_t len, const float* weights, float* acc) {
  __m512 sums[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) sums[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const T* v = cache_row(p.value_cache, table, first + t, p, h);
    __m512 row[C];
    for (int c = 0; c < C; ++c) row[c] = load16(v + c * kLanes);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(weights[g * len + t]);
      for (int c = 0; c < C; ++c) sums[g][c] = _mm512_fmadd_ps(w, row[c], sums[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + g * p.head_dim + c * kLanes, sums[g][c]);
}

// Both passes for kv heads [h0, h1) of one sequence, softmax between them.
template <typename T, int C, int G>
void attend_heads(const DecodeProblem<T>& p, const int64_t* table, int64_t h0, int64_t h1,
                  int64_t first, int64_t len, const T* q_raw, const float* q, float* scores,
                  float* acc) {
  for (int64_t h = h0; h < h1; ++h) {
    const int64_t row = (h - h0) * G;
#ifdef __AVX512BF16__
    if constexpr (std::is_same_v<T, c10::BFloat16> && C % 2 == 0) {
      score_keys_head_bf16<C, G>(p, table, h, first, len, q_raw + row * p.head_dim,
                                 scores + row * len);
    } else
#endif
    {
      score_keys_head<T, C, G>(p, table, h, first, len, q + row * p.head_dim, scores + row * len);
    }
    softmax_rows(scores + row * len, G, len, p.soft_cap);
    weigh_values_head<T, C, G>(p, table, h, first, len, scores + row * len,
                               acc + row * p.head_dim);
  }
}

// The (head_dim, group) shapes with a register-resident kernel; others take the scalar path.
template <typename T>
using HeadsKernel = void (*)(const DecodeProblem<T>&, const int64_t*, int64_t, int64_t, int64_t,
                             int64_t, const T*, const float*, float*, float*);

template <typename T, int C>
HeadsKernel<T> kernel_for_group(int64_t group) {
  switch (group) {
    case 1: return attend_heads<T, C, 1>;
    case 2: return attend_heads<T, C, 2>;
    case 3: return attend_heads<T, C, 3>;
    case 4: return attend_heads<T, C, 4>;
    case 5: return attend_heads<T, C, 5>;
    case 6: return attend_heads<T, C, 6>;
    case 7: return attend_heads<T, C, 7>;
    case 8: return attend_heads<T, C, 8>;
    default: return nullptr;
  }
}

template <typename T>
HeadsKernel<T> vectorized_kernel(const DecodeProblem<T>& p) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  switch (p.head_dim) {
    case 32: return kernel_for_group<T, 2>(group);
    case 64: return kernel_for_group<T, 4>(group);
    case 128: return group <= 4 ? kernel_for_group<T, 8>(group) : nullptr;
    default: return nullptr;
  }
}
#endif


template <typename T>
void score_keys_scalar(const DecodeProblem<T>& p, const int64_t* table, int64_t h0, int64_t h1,
                       int64_t first, int64_t len, const float* q, float* scores) {
  const int64_t group = p.num_heads / p.num_kv_heads, dim = p.head_dim;
  for (int64_t t = 0; t < len; ++t)
    for (int64_t g = 0; g < (h1 - h0) * group; ++g) {
      const T* k = cache_row(p.key_cache, table, first + t, p, h0 + g / group);
      float s = 0.f;
      for (int64_t d = 0; d < dim; ++d) s += q[g * dim + d] * to_float(k[d]);
      scores[g * len + t] = s;
    }
}

template <typename T>
void weigh_values_scalar(const DecodeProblem<T>& p, const int64_t* table, int64_t h0, int64_t h1,
                         int64_t first, int64_t len, const float* weights, float* acc) {
  const int64_t group = p.num_heads / p.num_kv_heads, dim = p.head_dim;
  std::fill(acc, acc + (h1 - h0) * group * dim, 0.f);
  for (int64_t t = 0; t < len; ++t)
    for (int64_t g = 0; g < (h1 - h0) * group; ++g) {
      const T* v = cache_row(p.value_cache, table, first + t, p, h0 + g / group);
      for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] += weights[g * len + t] * to_float(v[d]);
    }
}

// One sequence, kv heads [h0, h1): its query heads are rows [h0 * group, h1 * group).
template <typename T>
void attend(const DecodeProblem<T>& p, int64_t seq, int64_t h0, int64_t h1,
            std::vector<float>& scores, std::vector<float>& q, std::vector<float>& acc) {
  const int64_t dim = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int64_t rows = (h1 - h0) * group, first = first_token(p, p.seq_lens[seq]);
  const int64_t len = p.seq_lens[seq] - first;  // tokens attended to
  const int64_t* table = p.block_tables + seq * p.max_blocks;
  const T* q_src = p.query + (seq * p.num_heads + h0 * group) * dim;
  for (int64_t i = 0; i < rows * dim; ++i) q[i] = to_float(q_src[i]) * p.scale;
  scores.resize(rows * len);
#ifdef __AVX512F__
  if (const HeadsKernel<T> kernel = vectorized_kernel(p)) {
    kernel(p, table, h0, h1, first, len, q_src, q.data(), scores.data(), acc.data());
  } else
#endif
  {
    score_keys_scalar(p, table, h0, h1, first, len, q.data(), scores.data());
    softmax_rows(scores.data(), rows, len, p.soft_cap);
    weigh_values_scalar(p, table, h0, h1, first, len, scores.data(), acc.data());
  }
  T* out = p.out + (seq * p.num_heads + h0 * group) * dim;
  for (int64_t i = 0; i < rows * dim; ++i) out[i] = static_cast<T>(acc[i]);
}

// Work items are whole sequences unless there are too few to keep every thread busy; then each
// kv head is an item of its own.
template <typename T>
void run_decode(const DecodeProblem<T>& p, int64_t num_seqs) {
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

template <typename T>
void decode_typed(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                  const at::Tensor& seq_lens, double scale, int64_t window, double soft_cap) {
  DecodeProblem<T> p{query.data_ptr<T>(), key_cache.data_ptr<T>(), value_cache.data_ptr<T>(),
                     block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                     out.data_ptr<T>(), query.size(1), key_cache.size(2), query.size(2),
                     key_cache.size(1), block_tables.size(1), static_cast<float>(scale),
                     window, static_cast<float>(soft_cap)};
  run_decode(p, query.size(0));
}

void paged_decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale, int64_t window,
                            double soft_cap) {
  TORCH_CHECK(query.is_contiguous() && out.is_contiguous(), "query and out must be contiguous");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "block_tables and seq_lens must be int64");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous(), "tables must be contiguous");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type(), "query and cache dtypes differ");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "heads must be a multiple of kv heads");
  if (query.scalar_type() == at::kFloat) {
    decode_typed<float>(out, query, key_cache, value_cache, block_tables, seq_lens, scale, window,
                        soft_cap);
  } else if (query.scalar_type() == at::kBFloat16) {
    decode_typed<c10::BFloat16>(out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                                window, soft_cap);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16, got ",
                query.scalar_type());
  }
}


// ---------------------------------------------------------------------------------------------
// Elementwise kernels. load/store convert between the storage type and float; bf16 is the top
// half of a float, rounded to nearest even on the way back (as c10::BFloat16 does).

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline void store(float* p, int64_t i, float value) { p[i] = value; }
inline void store(c10::BFloat16* p, int64_t i, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits += 0x7FFF + ((bits >> 16) & 1);
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(bits >> 16);
}
// value as the PyTorch op would hold it after rounding to T
template <typename T>
inline float round_to(float value) {
  T held[1];
  store(held, 0, value);
  return load(held, 0);
}

constexpr int64_t kRowGrain = 8;  // rows per parallel task: enough work to amortize dispatch

// out = w * round(x / rms(x)), as transformers' LlamaRMSNorm.
template <typename T>
void rms_norm_row(T* out, const T* x, const T* weight, int64_t hidden, float eps) {
  float squares = 0.f;
  for (int64_t i = 0; i < hidden; ++i) squares += load(x, i) * load(x, i);
  const float inv_rms = 1.f / std::sqrt(squares / hidden + eps);
  for (int64_t i = 0; i < hidden; ++i)
    store(out, i, load(weight, i) * round_to<T>(load(x, i) * inv_rms));
}

template <typename T>
void rms_norm_typed(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  T* o = out.data_ptr<T>();
  const T* in = x.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      rms_norm_row(o + r * hidden, in + r * hidden, w, hidden, static_cast<float>(eps));
  });
}

// residual = round(x + residual); x = norm(residual): the decoder's "add, then normalize".
template <typename T>
void fused_add_rms_norm_typed(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                              double eps) {
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  T* xs = x.data_ptr<T>();
  T* res = residual.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = xs + r * hidden;
      T* rr = res + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) store(rr, i, load(xr, i) + load(rr, i));
      rms_norm_row(xr, rr, w, hidden, static_cast<float>(eps));
    }
  });
}

// out = round(silu(gate)) * up for gate_up = [gate | up] along the last dimension.
template <typename T>
void silu_and_mul_typed(at::Tensor& out, const at::Tensor& gate_up) {
  const int64_t width = out.size(-1), rows = out.numel() / width;
  T* o = out.data_ptr<T>();
  const T* in = gate_up.data_ptr<T>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = in + r * 2 * width;
      const T* up = gate + width;
      for (int64_t i = 0; i < width; ++i) {
        const float g = load(gate, i);
        store(o + r * width, i, round_to<T>(g / (1.f + std::exp(-g))) * load(up, i));
      }
    }
  });
}

// Neox-style rotation of the first rotary_dim dims of every head, in place:
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for the two halves x1, x2.
template <typename T>
void rotate_heads(T* x, int64_t heads, int64_t head_dim, const float* cos,
                  const float* sin, int64_t half) {
  for (int64_t h = 0; h < heads; ++h) {
    T* head = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = load(head, i), x2 = load(head, i + half);
      store(head, i, x1 * cos[i] - x2 * sin[i]);
      store(head, i + half, x2 * cos[i] + x1 * sin[i]);
    }
  }
}

template <typename T>
void rotary_typed(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                  const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t tokens = query.size(0), rotary_dim = cos.size(1), half = rotary_dim / 2;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cos_table = cos.data_ptr<float>();
  const float* sin_table = sin.data_ptr<float>();
  T* q = query.data_ptr<T>();
  T* k = key.data_ptr<T>();
  const int64_t q_stride = query.stride(0), k_stride = key.stride(0);
  at::parallel_for(0, tokens, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos_table + pos[t] * rotary_dim;
      const float* s = sin_table + pos[t] * rotary_dim;
      rotate_heads(q + t * q_stride, query.size(1), query.size(2), c, s, half);
      rotate_heads(k + t * k_stride, key.size(1), key.size(2), c, s, half);
    }
  });
}

// Copy each new token's key and value rows into its slot of the paged pools.
template <typename T>
void write_kv_typed(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                    at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  const int64_t tokens = key.size(0), row = key.size(1) * key.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  T* kc = key_cache.data_ptr<T>();
  T* vc = value_cache.data_ptr<T>();
  const int64_t k_stride = key.stride(0), v_stride = value.stride(0);
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(kc + slots[t] * row, k + t * k_stride, row * sizeof(T));
    std::memcpy(vc + slots[t] * row, v + t * v_stride, row * sizeof(T));
  }
}

// Dispatch on float32 / bfloat16; anything else is an error the caller avoids by checking first.
#define PAGEDLLM_DISPATCH(dtype, NAME, ...)                                            \
  if ((dtype) == at::kFloat) {                                                         \
    NAME<float>(__VA_ARGS__);                                                          \
  } else if ((dtype) == at::kBFloat16) {                                               \
    NAME<c10::BFloat16>(__VA_ARGS__);                                                  \
  } else {                                                                             \
    TORCH_CHECK(false, #NAME " supports float32 and bfloat16, got ", (dtype));         \
  }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && weight.is_contiguous(),
              "rms_norm needs contiguous tensors");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm weight and input dtypes differ");
  PAGEDLLM_DISPATCH(x.scalar_type(), rms_norm_typed, out, x, weight, eps);
}

void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(),
              "fused_add_rms_norm needs contiguous tensors");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && residual.scalar_type() == x.scalar_type(),
              "fused_add_rms_norm dtypes differ");
  PAGEDLLM_DISPATCH(x.scalar_type(), fused_add_rms_norm_typed, x, residual, weight, eps);
}

void silu_and_mul(at::Tensor out, const at::Tensor& gate_up) {
  TORCH_CHECK(out.is_contiguous() && gate_up.is_contiguous(), "silu_and_mul needs contiguous tensors");
  TORCH_CHECK(gate_up.size(-1) == 2 * out.size(-1), "gate_up must be twice as wide as out");
  PAGEDLLM_DISPATCH(out.scalar_type(), silu_and_mul_typed, out, gate_up);
}

void rotary_embedding(const at::Tensor& positions, at::Tensor query, at::Tensor key,
                      const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(query, "query");
  check_rows(key, "key");
  TORCH_CHECK(query.stride(1) == query.size(2) && key.stride(1) == key.size(2),
              "heads must be packed within a token's row");
  TORCH_CHECK(positions.scalar_type() == at::kLong, "positions must be int64");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "cos/sin tables must be contiguous float32");
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), "query and key dtypes differ");
  PAGEDLLM_DISPATCH(query.scalar_type(), rotary_typed, positions, query, key, cos, sin);
}

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor key_cache,
              at::Tensor value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.stride(1) == key.size(2) && key.stride(2) == 1 && value.stride(1) == value.size(2) &&
                  value.stride(2) == 1,
              "key/value heads must be packed within a token's row");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64");
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type(), "key and cache dtypes differ");
  PAGEDLLM_DISPATCH(key.scalar_type(), write_kv_typed, key, value, key_cache, value_cache,
                    slot_mapping);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over a paged KV cache, in place (CPU)");
  m.def("rms_norm", &rms_norm, "out = RMSNorm(x) * weight");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual += x; x = RMSNorm(residual) * weight");
  m.def("silu_and_mul", &silu_and_mul, "out = silu(gate) * up");
  m.def("rotary_embedding", &rotary_embedding, "neox rotary on query and key, in place");
  m.def("write_kv", &write_kv, "copy new key/value rows into their cache slots");
}
