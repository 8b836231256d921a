// bf16_linear: out = x @ weight.T + bias for bfloat16 tensors, computed in float32.
//
// Where oneDNN cannot run bf16 (no AVX-512 BW/VL/DQ, no AVX-NE-CONVERT: AMD Zen 2/3, most
// laptops) a plain bf16 matmul crawls, yet bf16 weights are still worth keeping: they halve the
// bytes a decode step streams. So the weights stay bf16 and every product is a float32 FMA of
// the widened values (exact: a bf16 times a bf16 fits a float), summed in float32 and rounded
// once at the end, the same numbers a bf16 GEMM with float32 accumulation gives.
//
// Few rows (decode): memory-bound, so each weight row is read once per pass of up to
// kRowsPerPass input rows, widened in registers, and reduced against every row of the pass.
//
//   x32   [M, K] float32 copy of x, in L1/L2 for the whole call
//   W     [N, K] bf16, split across threads in runs of kWeightRows rows
//
// Many rows (prefill): compute-bound; runs of the weight are widened into a float32 tile and
// handed to ATen's float32 GEMM (oneDNN/MKL, near the machine's peak), a tile at a time so the
// widened copy stays small.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <vector>

#include "dot_rows.h"
#include "kernels.h"
#include "vec.h"

namespace pagedllm {
namespace {

using vec::bf16;
using vec::kLanes;

constexpr int64_t kWeightRows = 16;  // weight rows per parallel task
constexpr int64_t kGemmRows = 32;    // from this many input rows on, widen and call the GEMM
constexpr int64_t kTileElements = 1 << 22;  // a widened weight tile: at most 16 MiB of float32

void linear_few_rows(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias) {
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_dim = weight.size(0);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const float* xs = x32.data_ptr<float>();
  const bf16* w = weight.data_ptr<bf16>();
  const bf16* b = bias ? bias->data_ptr<bf16>() : nullptr;
  bf16* o = out.data_ptr<bf16>();
  at::parallel_for(0, n_dim, kWeightRows, [&](int64_t n0, int64_t n1) {
    float sums[kRowsPerPass];
    for (int64_t m0 = 0; m0 < m_dim; m0 += kRowsPerPass) {
      const int64_t rows = std::min(kRowsPerPass, m_dim - m0);
      const DotRows<bf16> dot = dot_rows_for<bf16>(rows);
      for (int64_t n = n0; n < n1; ++n) {
        dot(xs + m0 * k_dim, k_dim, w + n * k_dim, sums);
        const float shift = b ? vec::to_float(b[n]) : 0.f;
        for (int64_t r = 0; r < rows; ++r) vec::store_scalar(o + (m0 + r) * n_dim + n, sums[r] + shift);
      }
    }
  });
}

void linear_many_rows(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias) {
  const int64_t k_dim = x.size(1), n_dim = weight.size(0);
  const int64_t tile_rows = std::max<int64_t>(kLanes, kTileElements / std::max<int64_t>(k_dim, 1));
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor bias32 = bias ? bias->to(at::kFloat) : at::Tensor();
  for (int64_t n0 = 0; n0 < n_dim; n0 += tile_rows) {
    const int64_t n1 = std::min(n_dim, n0 + tile_rows);
    const at::Tensor w32 = weight.slice(0, n0, n1).to(at::kFloat);
    at::Tensor part = bias ? at::addmm(bias32.slice(0, n0, n1), x32, w32.t())
                           : at::mm(x32, w32.t());
    out.slice(1, n0, n1).copy_(part);  // rounds to bf16 once
  }
}

}  // namespace

void bf16_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && out.dim() == 2, "bf16_linear takes 2-D tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16,
              "bf16_linear takes bfloat16 input, weight and output");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && out.is_contiguous(),
              "bf16_linear needs contiguous tensors");
  TORCH_CHECK(x.size(1) == weight.size(1), "bf16_linear: input has ", x.size(1),
              " features, weight expects ", weight.size(1));
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == weight.size(0),
              "bf16_linear: out has the wrong shape");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() &&
                    bias->numel() == weight.size(0),
                "bf16_linear: bias must be a contiguous bfloat16 vector of out_features");
  }
  if (x.size(0) >= kGemmRows) {
    linear_many_rows(out, x, weight, bias);
  } else if (x.size(0) > 0) {
    linear_few_rows(out, x, weight, bias);
  }
}

}  // namespace pagedllm
