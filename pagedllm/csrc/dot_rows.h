// Dot products of one weight row against a few float32 input rows at once: the inner loop of
// every decode-sized product (bf16_linear, lora_delta). Memory-bound at these sizes, so each
// weight row is read once per pass of up to kRowsPerPass input rows and widened in registers.
//
//   x32   [R, k_dim] float32 rows, contiguous
//   w_row [k_dim]    float32 or bf16
//   sums  [R]        sums[r] = dot(x32[r], w_row)
#pragma once

#include <cstdint>

#include "vec.h"

namespace pagedllm {

constexpr int64_t kRowsPerPass = 8;  // input rows sharing one read of a weight row

template <int R, typename W>
void dot_rows(const float* x32, int64_t k_dim, const W* w_row, float* sums) {
  vec::F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vec::zero();
  int64_t k = 0;
  for (; k + vec::kLanes <= k_dim; k += vec::kLanes) {
    const vec::F w = vec::load(w_row + k);
    for (int r = 0; r < R; ++r) acc[r] = vec::fma(w, vec::load(x32 + r * k_dim + k), acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    sums[r] = vec::reduce_add(acc[r]);
    for (int64_t j = k; j < k_dim; ++j) sums[r] += vec::to_float(w_row[j]) * x32[r * k_dim + j];
  }
}

template <typename W>
using DotRows = void (*)(const float*, int64_t, const W*, float*);

// dot_rows<rows, W>, rows in [1, kRowsPerPass]
template <typename W>
DotRows<W> dot_rows_for(int64_t rows) {
  static constexpr DotRows<W> kTable[kRowsPerPass] = {
      dot_rows<1, W>, dot_rows<2, W>, dot_rows<3, W>, dot_rows<4, W>,
      dot_rows<5, W>, dot_rows<6, W>, dot_rows<7, W>, dot_rows<8, W>};
  return kTable[rows - 1];
}

}  // namespace pagedllm
