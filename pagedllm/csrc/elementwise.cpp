// The elementwise kernels (rms_norm, fused_add_rms_norm, silu_and_mul, rotary_embedding,
// write_kv) each replace a chain of small PyTorch ops whose per-op dispatch and extra memory
// passes dominate small batches. They compute in float32 and round to the tensor's dtype where
// the PyTorch reference rounds, so bfloat16 results match it (rotary rounds once, not per op).
//
// Each loop runs whole vectors (vec.h, built per ISA) and finishes the row's tail one element
// at a time with the same arithmetic.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "kernels.h"
#include "vec.h"

namespace pagedllm {
namespace {

using vec::bf16;
using vec::F;
using vec::kLanes;
using vec::to_float;

constexpr int64_t kRowGrain = 8;  // rows per parallel task: enough work to amortize dispatch

// out = w * round(x / rms(x)), as transformers' LlamaRMSNorm.
template <typename T>
void rms_norm_row(T* out, const T* x, const T* weight, int64_t hidden, float eps) {
  F squares = vec::zero();
  int64_t i = 0;
  for (; i + kLanes <= hidden; i += kLanes) {
    const F v = vec::load(x + i);
    squares = vec::fma(v, v, squares);
  }
  float sum = vec::reduce_add(squares);
  for (int64_t j = i; j < hidden; ++j) sum += to_float(x[j]) * to_float(x[j]);
  const float inv_rms = 1.f / std::sqrt(sum / hidden + eps);
  const F inv = vec::set1(inv_rms);
  for (i = 0; i + kLanes <= hidden; i += kLanes)
    vec::store(out + i,
               vec::mul(vec::load(weight + i), vec::round_to<T>(vec::mul(vec::load(x + i), inv))));
  for (; i < hidden; ++i)
    vec::store_scalar(out + i, to_float(weight[i]) * vec::round_to<T>(to_float(x[i]) * inv_rms));
}

// residual = round(x + residual), row by row.
template <typename T>
void add_into(T* residual, const T* x, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    vec::store(residual + i, vec::add(vec::load(x + i), vec::load(residual + i)));
  for (; i < n; ++i) vec::store_scalar(residual + i, to_float(x[i]) + to_float(residual[i]));
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
      add_into(res + r * hidden, xs + r * hidden, hidden);
      rms_norm_row(xs + r * hidden, res + r * hidden, w, hidden, static_cast<float>(eps));
    }
  });
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }
inline F silu(F g) {
  return vec::div(g, vec::add(vec::set1(1.f), vec::exp(vec::sub(vec::zero(), g))));
}

// out = round(silu(gate)) * up for gate_up = [gate | up] along the last dimension.
template <typename T>
void silu_and_mul_row(T* out, const T* gate, const T* up, int64_t width) {
  int64_t i = 0;
  for (; i + kLanes <= width; i += kLanes)
    vec::store(out + i, vec::mul(vec::round_to<T>(silu(vec::load(gate + i))), vec::load(up + i)));
  for (; i < width; ++i)
    vec::store_scalar(out + i, vec::round_to<T>(silu(to_float(gate[i]))) * to_float(up[i]));
}

template <typename T>
void silu_and_mul_typed(at::Tensor& out, const at::Tensor& gate_up) {
  const int64_t width = out.size(-1), rows = out.numel() / width;
  T* o = out.data_ptr<T>();
  const T* in = gate_up.data_ptr<T>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = in + r * 2 * width;
      silu_and_mul_row(o + r * width, gate, gate + width, width);
    }
  });
}

// Neox-style rotation of the first rotary_dim dims of every head, in place:
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for the two halves x1, x2.
template <typename T>
void rotate_heads(T* x, int64_t heads, int64_t head_dim, const float* cos,
                  const float* sin, int64_t half) {
  for (int64_t h = 0; h < heads; ++h) {
    T* lo = x + h * head_dim;
    T* hi = lo + half;
    int64_t i = 0;
    for (; i + kLanes <= half; i += kLanes) {
      const F x1 = vec::load(lo + i), x2 = vec::load(hi + i);
      const F c = vec::load(cos + i), s = vec::load(sin + i);
      vec::store(lo + i, vec::sub(vec::mul(x1, c), vec::mul(x2, s)));
      vec::store(hi + i, vec::add(vec::mul(x2, c), vec::mul(x1, s)));
    }
    for (; i < half; ++i) {
      const float x1 = to_float(lo[i]), x2 = to_float(hi[i]);
      vec::store_scalar(lo + i, x1 * cos[i] - x2 * sin[i]);
      vec::store_scalar(hi + i, x2 * cos[i] + x1 * sin[i]);
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

// dst[i] = src[i] / scale as fp8, saturated to S's range (a cast past it would give NaN); the
// same division and rounding as kv_quant.quantize.
template <typename T, typename S>
void quantize_row(S* dst, const T* src, int64_t n, float scale) {
  const float limit = static_cast<float>(std::numeric_limits<S>::max());
  for (int64_t i = 0; i < n; ++i)
    dst[i] = static_cast<S>(std::clamp(to_float(src[i]) / scale, -limit, limit));
}

// Copy each new token's key and value rows into its slot of the paged pools (memcpy is already
// the widest copy the C library has for this CPU); an fp8 cache quantizes them on the way.
template <typename T, typename S>
void write_kv_typed(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                    at::Tensor& value_cache, const at::Tensor& slot_mapping, float k_scale,
                    float v_scale) {
  const int64_t tokens = key.size(0), row = key.size(1) * key.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  S* kc = static_cast<S*>(key_cache.data_ptr());
  S* vc = static_cast<S*>(value_cache.data_ptr());
  const int64_t k_stride = key.stride(0), v_stride = value.stride(0);
  for (int64_t t = 0; t < tokens; ++t) {
    if constexpr (std::is_same_v<T, S>) {
      std::memcpy(kc + slots[t] * row, k + t * k_stride, row * sizeof(T));
      std::memcpy(vc + slots[t] * row, v + t * v_stride, row * sizeof(T));
    } else {
      quantize_row(kc + slots[t] * row, k + t * k_stride, row, k_scale);
      quantize_row(vc + slots[t] * row, v + t * v_stride, row, v_scale);
    }
  }
}

// NaN tests on the bits: the kernels build with -ffast-math, under which the compiler may assume
// a float is never NaN (std::isnan, x != x and x * 0 all fold away). A value's magnitude bits,
// as an unsigned integer, are above infinity's exactly when it is NaN.
inline uint32_t magnitude_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits & 0x7fffffffu;
}
inline uint32_t magnitude_bits(bf16 x) { return static_cast<uint32_t>(x.x & 0x7fff) << 16; }
constexpr uint32_t kInfinityBits = 0x7f800000u;

template <typename T>
int64_t first_nan(const T* x, int64_t n) {
  uint32_t largest = 0;
  for (int64_t j = 0; j < n; ++j) largest = std::max(largest, magnitude_bits(x[j]));  // vectorized
  if (largest <= kInfinityBits) return -1;
  for (int64_t j = 0; j < n; ++j) {
    if (magnitude_bits(x[j]) > kInfinityBits) return j;
  }
  return -1;
}

// The index of a row's first largest value, as torch.argmax: a NaN counts as the largest (its
// first one wins). One vector pass finds the maximum; its first index is then found a tile at a
// time, skipping the tiles whose maximum is below it.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  if (const int64_t nan = first_nan(x, n); nan >= 0) return nan;
  constexpr int64_t kTile = 8 * kLanes;
  F best = vec::set1(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) best = vec::max(best, vec::load(x + i));
  float top = vec::reduce_max(best);
  for (int64_t j = i; j < n; ++j) top = std::max(top, to_float(x[j]));
  int64_t start = 0;
  for (; start + kTile <= n; start += kTile) {
    F tile = vec::load(x + start);
    for (int64_t k = kLanes; k < kTile; k += kLanes) tile = vec::max(tile, vec::load(x + start + k));
    if (vec::reduce_max(tile) == top) break;
  }
  for (int64_t j = start; j < n; ++j) {
    if (to_float(x[j]) == top) return j;
  }
  return 0;  // not reached: top is one of the row's values
}

template <typename T>
void argmax_typed(at::Tensor& out, const at::Tensor& logits) {
  const int64_t rows = logits.size(0), n = logits.size(1);
  const T* x = logits.data_ptr<T>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) o[r] = argmax_row(x + r * n, n);
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

}  // namespace

at::Tensor argmax(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0,
              "argmax takes contiguous non-empty rows [rows, vocab]");
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  PAGEDLLM_DISPATCH(logits.scalar_type(), "argmax", argmax_typed, out, logits);
  return out;
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && weight.is_contiguous(),
              "rms_norm needs contiguous tensors");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm weight and input dtypes differ");
  PAGEDLLM_DISPATCH(x.scalar_type(), "rms_norm", rms_norm_typed, out, x, weight, eps);
}

void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(),
              "fused_add_rms_norm needs contiguous tensors");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && residual.scalar_type() == x.scalar_type(),
              "fused_add_rms_norm dtypes differ");
  PAGEDLLM_DISPATCH(x.scalar_type(), "fused_add_rms_norm", fused_add_rms_norm_typed, x, residual,
                    weight, eps);
}

void silu_and_mul(at::Tensor out, const at::Tensor& gate_up) {
  TORCH_CHECK(out.is_contiguous() && gate_up.is_contiguous(), "silu_and_mul needs contiguous tensors");
  TORCH_CHECK(gate_up.size(-1) == 2 * out.size(-1), "gate_up must be twice as wide as out");
  TORCH_CHECK(gate_up.scalar_type() == out.scalar_type(), "silu_and_mul dtypes differ");
  PAGEDLLM_DISPATCH(out.scalar_type(), "silu_and_mul", silu_and_mul_typed, out, gate_up);
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
  PAGEDLLM_DISPATCH(query.scalar_type(), "rotary_embedding", rotary_typed, positions, query, key,
                    cos, sin);
}

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor key_cache,
              at::Tensor value_cache, const at::Tensor& slot_mapping, double k_scale,
              double v_scale) {
  TORCH_CHECK(key.stride(1) == key.size(2) && key.stride(2) == 1 && value.stride(1) == value.size(2) &&
                  value.stride(2) == 1,
              "key/value heads must be packed within a token's row");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "key and value dtypes differ");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "K and V cache dtypes differ");
  TORCH_CHECK(k_scale > 0 && v_scale > 0, "k_scale and v_scale must be positive");
  dispatch_attention(key.scalar_type(), key_cache.scalar_type(), "write_kv",
                     [&](auto key_type, auto cache_type) {
                       write_kv_typed<typename decltype(key_type)::type,
                                      typename decltype(cache_type)::type>(
                           key, value, key_cache, value_cache, slot_mapping,
                           static_cast<float>(k_scale), static_cast<float>(v_scale));
                     });
}

}  // namespace pagedllm
