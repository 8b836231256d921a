// The kernels each build exports (bindings.cpp names them for Python). Every kernel takes
// float32 or bfloat16 tensors and checks its inputs with a message naming the problem.
#pragma once

#include <ATen/ATen.h>

#include <optional>

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

// decode_attention.cpp
void paged_decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale, int64_t window,
                            double soft_cap);

// prefill_attention.cpp
void paged_prefill_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& chunks,
                             const at::Tensor& block_tables, double scale, int64_t window,
                             double soft_cap);

// elementwise.cpp
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps);
void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps);
void silu_and_mul(at::Tensor out, const at::Tensor& gate_up);
void rotary_embedding(const at::Tensor& positions, at::Tensor query, at::Tensor key,
                      const at::Tensor& cos, const at::Tensor& sin);
void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor key_cache,
              at::Tensor value_cache, const at::Tensor& slot_mapping);

// linear.cpp
void bf16_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias);

}  // namespace pagedllm
