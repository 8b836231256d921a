// The kernels each build exports (bindings.cpp names them for Python). Every kernel takes
// float32 or bfloat16 tensors and checks its inputs with a message naming the problem.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

// Calls NAME<float> or NAME<c10::BFloat16> by `dtype`; any other dtype is an error naming the
// kernel (callers that can be handed other dtypes check first and keep their PyTorch path).
#define PAGEDLLM_DISPATCH(dtype, KERNEL, NAME, ...)                                    \
  if ((dtype) == at::kFloat) {                                                         \
    NAME<float>(__VA_ARGS__);                                                          \
  } else if ((dtype) == at::kBFloat16) {                                               \
    NAME<c10::BFloat16>(__VA_ARGS__);                                                  \
  } else {                                                                             \
    TORCH_CHECK(false, KERNEL " supports float32 and bfloat16, got ", (dtype));        \
  }

namespace pagedllm {

template <typename T>
struct Type {
  using type = T;
};

// The attention kernels' two element types: T of query and output (float32 or bfloat16) and S
// of the KV cache (T itself, or fp8 e4m3 / e5m2 with per-layer scales). Calls
// fn(Type<T>{}, Type<S>{}); any other pair is an error naming the kernel.
template <typename Fn>
void dispatch_attention(at::ScalarType query, at::ScalarType cache, const char* kernel, Fn&& fn) {
  auto with_cache = [&](auto query_type) {
    using T = typename decltype(query_type)::type;
    if (cache == query) {
      fn(query_type, query_type);
    } else if (cache == at::kFloat8_e4m3fn) {
      fn(query_type, Type<c10::Float8_e4m3fn>{});
    } else if (cache == at::kFloat8_e5m2) {
      fn(query_type, Type<c10::Float8_e5m2>{});
    } else {
      TORCH_CHECK(false, kernel, ": a ", cache, " cache with ", query,
                  " queries (the cache must be the query's dtype or fp8)");
    }
  };
  if (query == at::kFloat) {
    with_cache(Type<float>{});
  } else if (query == at::kBFloat16) {
    with_cache(Type<c10::BFloat16>{});
  } else {
    TORCH_CHECK(false, kernel, " supports float32 and bfloat16 queries, got ", query);
  }
}

// decode_attention.cpp (k_scale, v_scale: an fp8 cache's scales, ignored for a float cache)
void paged_decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale, int64_t window,
                            double soft_cap, double k_scale, double v_scale);

// prefill_attention.cpp
void paged_prefill_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& chunks,
                             const at::Tensor& block_tables, double scale, int64_t window,
                             double soft_cap, double k_scale, double v_scale);

// elementwise.cpp
// torch.argmax(logits, dim=-1) for contiguous [rows, vocab] rows (greedy sampling's hot spot:
// ATen's reduction is not vectorized along one long row)
at::Tensor argmax(const at::Tensor& logits);
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps);
void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps);
void silu_and_mul(at::Tensor out, const at::Tensor& gate_up);
void rotary_embedding(const at::Tensor& positions, at::Tensor query, at::Tensor key,
                      const at::Tensor& cos, const at::Tensor& sin);
// an fp8 cache stores key / k_scale and value / v_scale, saturated to its range
void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor key_cache,
              at::Tensor value_cache, const at::Tensor& slot_mapping, double k_scale,
              double v_scale);

// linear.cpp
void bf16_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias);

// lora.cpp: out[m] += (x[m] @ A[s].T) @ B[s], s = row_slots[m] (< 0: no adapter), slot s
// using the first slot_rows[s] rows of lora_a [slots, rank, K] and lora_b [slots, rank, N]
void lora_delta(at::Tensor out, const at::Tensor& x, const at::Tensor& lora_a,
                const at::Tensor& lora_b, const at::Tensor& row_slots,
                const std::vector<int64_t>& slot_rows);

}  // namespace pagedllm
