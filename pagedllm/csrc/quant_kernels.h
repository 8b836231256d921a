// Kernels on quantized weights that stay packed in memory (bindings.cpp names them for Python).
// Activations and outputs are float32 or bfloat16; weights are raw bytes in their file format.
#pragma once

#include <ATen/ATen.h>

namespace pagedllm {

// gguf_linear.cpp: llama.cpp's block formats (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K), one weight
// row of K values = K / block_values blocks, stored as a uint8 tensor [N, bytes_per_row].

// out[:, :N] = x @ W.T. out may be a column slice of a wider tensor (row stride >= N).
// int8_activations: quantize each row of x to 8-bit blocks first and take integer dot products
// (llama.cpp's fast path; Q4_0, Q4_1 and Q8_0 weights), else dequantize each block to float.
void gguf_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& weight,
                 int64_t ggml_type, bool int8_activations);

// out [N, K] (float32 or bfloat16) = the weight's values.
void gguf_dequantize(at::Tensor out, const at::Tensor& weight, int64_t ggml_type);

}  // namespace pagedllm
