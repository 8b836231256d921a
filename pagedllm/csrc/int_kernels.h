// Kernels for integer-quantized weights (GPTQ, AWQ, compressed-tensors after their repack into
// one layout; see pagedllm/model/layers/quantization/int_weight.py). Kept apart from kernels.h
// so the quantized-weight kernels can grow without touching the float ones.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace pagedllm {

// out = x @ dequantize(qweight).T for float32/bfloat16 x [M, K] (out has x's dtype), where
//   bits 4: qweight uint8 [N, K/2], each 32 input channels in 16 bytes: byte j holds channel
//           j in its low nibble and channel 16 + j in its high nibble
//   bits 8: qweight uint8 [N, K]
//   w[n][k] = (q[n][k] - zeros[n][g]) * scales[n][g], g = k / group_size, scales float32,
//   float16 or bfloat16 and zeros uint8, both [N, K / group_size]; group_size a multiple of 32
//   that divides K.
// bf16_gemm: for many rows of bf16 x, multiply bf16 tiles (say so only where oneDNN runs bf16
// natively; elsewhere float32 tiles are faster).
void int_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& qweight,
                const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                int64_t group_size, bool bf16_gemm);

// The float32 weight [N, K] that int_linear multiplies by (for tests and prefill tiles).
at::Tensor int_dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t bits, int64_t group_size);

}  // namespace pagedllm
