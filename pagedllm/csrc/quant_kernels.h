// Kernels on quantized weights that stay packed in memory (bindings.cpp names them for Python).
// Activations and outputs are float32 or bfloat16; weights are raw bytes in their file format.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pagedllm {

// gguf_linear.cpp: llama.cpp's block formats (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K), one weight
// row of K values = K / block_values blocks, stored as a uint8 tensor [N, bytes_per_row].

// interleaved: the weight's rows regrouped 16 at a time by gguf_interleave (gguf_interleaved.cpp
// draws the layout), which decode multiplies several times faster; Q4_0, Q4_1 and Q8_0 only.

// out[:, :N] = x @ W.T. out may be a column slice of a wider tensor (row stride >= N).
// int8_activations: quantize each row of x to 8-bit blocks first and take integer dot products
// (llama.cpp's fast path; Q4_0, Q4_1 and Q8_0 weights), else dequantize each block to float.
void gguf_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& weight,
                 int64_t ggml_type, bool int8_activations, bool interleaved);

// out [N, K] (float32 or bfloat16) = the weight's values; with rows, out[i] = row rows[i].
void gguf_dequantize(at::Tensor out, const at::Tensor& weight, int64_t ggml_type,
                     bool interleaved, const std::optional<at::Tensor>& rows);

// The same bytes, regrouped 16 rows at a time (rows: a multiple of 16).
at::Tensor gguf_interleave(const at::Tensor& weight, int64_t ggml_type);

}  // namespace pagedllm
