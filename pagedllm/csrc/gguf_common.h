// What gguf_linear.cpp and gguf_interleaved.cpp share: llama.cpp's block formats, and input rows
// quantized to 8-bit blocks for the integer dot products.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <cstring>
#include <vector>

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pagedllm {
namespace gguf {

// ggml_type ids (ggml.h)
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;
constexpr int64_t kQ8Values = 32;  // values per block of a quantized activation row

struct BlockFormat {
  int64_t values;
  int64_t bytes;
};

inline BlockFormat block_format(int64_t type) {
  switch (type) {
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ8_0: return {32, 34};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
    default: TORCH_CHECK(false, "gguf kernels: unsupported ggml type ", type);
  }
}

inline float fp16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

// Input rows quantized as llama.cpp's Q8 activation blocks: per 32 values an fp32 scale dx, the
// int8 values q = round(x / dx) with dx = max|x| / 127, and dx * sum(q), which folds a weight
// block's offset (Q4_0's -8, Q4_1's min) into one multiply.
struct Q8Rows {
  std::vector<int8_t> q;     // [rows, K]
  std::vector<float> scale;  // [rows, K / 32]
  std::vector<float> sum;    // [rows, K / 32]
  int64_t k_dim = 0;
};

// x [rows, K] float32 or bfloat16 (gguf_linear.cpp)
template <typename T>
Q8Rows quantize_rows(const T* x, int64_t rows, int64_t k_dim);

// ---- gguf_interleaved.cpp: Q4_0 / Q4_1 / Q8_0 weights regrouped 16 rows at a time -----------
constexpr int64_t kGroupRows = 16;

inline bool interleavable(int64_t type) { return type == kQ4_0 || type == kQ4_1 || type == kQ8_0; }

// dst [rows, row_bytes] = src's rows regrouped (rows a multiple of kGroupRows); same bytes.
void interleave_rows(const uint8_t* src, uint8_t* dst, int64_t rows, int64_t row_bytes,
                     int64_t type);

// y[0:k_dim] = the values of weight row `row` of a regrouped weight.
void dequantize_interleaved_row(const uint8_t* weight, int64_t row, int64_t row_bytes,
                                int64_t k_dim, int64_t type, float* y);

// out[m, 0:n_dim] (row stride out_stride) = x's m-th row . each regrouped weight row, for every
// input row m; parallel over groups of weight rows.
template <typename T>
void interleaved_linear(T* out, int64_t out_stride, const Q8Rows& x, int64_t m_dim,
                        const uint8_t* weight, int64_t n_dim, int64_t row_bytes, int64_t type);

}  // namespace gguf
}  // namespace pagedllm
