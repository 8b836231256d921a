// lora_delta: the LoRA deltas of a flat batch whose rows run under different adapters, added to
// the base projection's output in one call:
//
//   out[m] += (x[m] @ A[s].T) @ B[s]      s = row_slots[m]; rows with s < 0 (the base model) or
//                                         whose slot leaves this layer alone are untouched
//
//   x          [M, K]              float32 or bf16, rows may be strided
//   out        [M, N]              x's dtype, rows may be strided (a column slice of a fused out)
//   lora_a     [slots, rank, K]    x's dtype: shrink rows; slot s uses its first slot_rows[s]
//   lora_b     [slots, rank, N]    x's dtype: expand rows (the adapter's scaling folded in)
//
// Why one call: at decode sizes a layer's delta is a few microseconds of arithmetic, and the
// PyTorch version (gather the rows by slot, two small matmuls per adapter, scatter back) spent
// ten times that in dispatch and oneDNN set-up, on every one of a model's LoRA layers.
//
// How: the rows are grouped by slot (a counting sort), and each group is cut into passes of up
// to kRowsPerPass rows. A pass reads its slot's A and B once: every A row is dotted with the
// pass's rows (widened to float32), giving h [rows, used] in float32; then each run of kLanes
// output columns sums h[i][r] * B[r][cols] over r in registers and is added to out once, so a
// bf16 out is rounded once, as PyTorch's out.add_(float32 delta) rounds. Passes write disjoint
// rows, so they run in parallel; a step of a few passes stays on one thread (waking another for
// a few microseconds of work costs more than it saves).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "dot_rows.h"
#include "kernels.h"
#include "vec.h"

namespace pagedllm {
namespace {

constexpr int64_t kParallelMacs = 1 << 18;  // multiply-adds per parallel task, at least

struct Pass {
  int64_t slot;
  int64_t first;  // its rows: order[first, first + rows)
  int64_t rows;
};

struct Problem {
  int64_t k_dim, n_dim, rank, x_stride, out_stride;
};

// out rows of one pass += h @ B[:used], R rows at a time in registers
template <int R, typename T>
void expand_rows(const Problem& p, const float* h, int64_t used, const T* b, T* const* out_rows) {
  int64_t n = 0;
  for (; n + vec::kLanes <= p.n_dim; n += vec::kLanes) {
    vec::F acc[R];
    for (int i = 0; i < R; ++i) acc[i] = vec::zero();
    for (int64_t r = 0; r < used; ++r) {
      const vec::F w = vec::load(b + r * p.n_dim + n);
      for (int i = 0; i < R; ++i) acc[i] = vec::fma(vec::set1(h[i * used + r]), w, acc[i]);
    }
    for (int i = 0; i < R; ++i) vec::store(out_rows[i] + n, vec::add(vec::load(out_rows[i] + n), acc[i]));
  }
  for (; n < p.n_dim; ++n) {
    for (int i = 0; i < R; ++i) {
      float sum = vec::to_float(out_rows[i][n]);
      for (int64_t r = 0; r < used; ++r) sum += h[i * used + r] * vec::to_float(b[r * p.n_dim + n]);
      vec::store_scalar(out_rows[i] + n, sum);
    }
  }
}

template <typename T>
using ExpandRows = void (*)(const Problem&, const float*, int64_t, const T*, T* const*);

template <typename T>
ExpandRows<T> expand_rows_for(int64_t rows) {
  static constexpr ExpandRows<T> kTable[kRowsPerPass] = {
      expand_rows<1, T>, expand_rows<2, T>, expand_rows<3, T>, expand_rows<4, T>,
      expand_rows<5, T>, expand_rows<6, T>, expand_rows<7, T>, expand_rows<8, T>};
  return kTable[rows - 1];
}

// One pass: x rows widened, h = x @ A.T, out += h @ B. `x32` and `h` are the task's scratch.
template <typename T>
void run_pass(const Problem& p, const Pass& pass, int64_t used, const int64_t* order, const T* x,
              const T* a, const T* b, T* out, std::vector<float>& x32, std::vector<float>& h) {
  T* out_rows[kRowsPerPass];
  for (int64_t i = 0; i < pass.rows; ++i) {
    const int64_t row = order[pass.first + i];
    const T* src = x + row * p.x_stride;
    float* dst = x32.data() + i * p.k_dim;
    int64_t k = 0;
    for (; k + vec::kLanes <= p.k_dim; k += vec::kLanes) vec::store(dst + k, vec::load(src + k));
    for (; k < p.k_dim; ++k) dst[k] = vec::to_float(src[k]);
    out_rows[i] = out + row * p.out_stride;
  }
  const DotRows<T> dot = dot_rows_for<T>(pass.rows);
  float sums[kRowsPerPass];
  for (int64_t r = 0; r < used; ++r) {
    dot(x32.data(), p.k_dim, a + r * p.k_dim, sums);
    for (int64_t i = 0; i < pass.rows; ++i) h[i * used + r] = sums[i];
  }
  expand_rows_for<T>(pass.rows)(p, h.data(), used, b, out_rows);
}

template <typename T>
void lora_delta_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                     const at::Tensor& lora_b, const at::Tensor& row_slots,
                     const std::vector<int64_t>& slot_rows) {
  const int64_t num_slots = lora_a.size(0), num_rows = x.size(0);
  const Problem p{x.size(1), out.size(1), lora_a.size(1), x.stride(0), out.stride(0)};
  const int64_t* slots = row_slots.data_ptr<int64_t>();
  // counting sort of the rows that take a delta here, by slot
  std::vector<int64_t> starts(num_slots + 1, 0);
  for (int64_t m = 0; m < num_rows; ++m) {
    const int64_t s = slots[m];
    TORCH_CHECK(s < num_slots, "lora_delta: row ", m, " names slot ", s, " of ", num_slots);
    if (s >= 0 && slot_rows[s] > 0) ++starts[s + 1];
  }
  for (int64_t s = 0; s < num_slots; ++s) starts[s + 1] += starts[s];
  if (starts[num_slots] == 0) return;
  std::vector<int64_t> order(starts[num_slots]);
  std::vector<int64_t> next(starts.begin(), starts.end() - 1);
  for (int64_t m = 0; m < num_rows; ++m) {
    const int64_t s = slots[m];
    if (s >= 0 && slot_rows[s] > 0) order[next[s]++] = m;
  }
  std::vector<Pass> passes;
  int64_t macs = 0;
  for (int64_t s = 0; s < num_slots; ++s) {
    for (int64_t first = starts[s]; first < starts[s + 1]; first += kRowsPerPass) {
      passes.push_back({s, first, std::min(kRowsPerPass, starts[s + 1] - first)});
      macs += passes.back().rows * slot_rows[s] * (p.k_dim + p.n_dim);
    }
  }
  const int64_t num_passes = static_cast<int64_t>(passes.size());
  const int64_t grain = std::max<int64_t>(1, num_passes * kParallelMacs / std::max<int64_t>(macs, 1));
  const T* xs = x.data_ptr<T>();
  const T* a = lora_a.data_ptr<T>();
  const T* b = lora_b.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, num_passes, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x32(kRowsPerPass * p.k_dim), h(kRowsPerPass * p.rank);
    for (int64_t i = begin; i < end; ++i) {
      const Pass& pass = passes[i];
      run_pass<T>(p, pass, slot_rows[pass.slot], order.data(), xs,
                  a + pass.slot * p.rank * p.k_dim, b + pass.slot * p.rank * p.n_dim, o, x32, h);
    }
  });
}

}  // namespace

void lora_delta(at::Tensor out, const at::Tensor& x, const at::Tensor& lora_a,
                const at::Tensor& lora_b, const at::Tensor& row_slots,
                const std::vector<int64_t>& slot_rows) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && lora_a.dim() == 3 && lora_b.dim() == 3,
              "lora_delta takes 2-D x and out, 3-D lora_a and lora_b");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && lora_a.scalar_type() == x.scalar_type() &&
                  lora_b.scalar_type() == x.scalar_type(),
              "lora_delta: x, out, lora_a and lora_b must share a dtype");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1 && lora_a.is_contiguous() &&
                  lora_b.is_contiguous(),
              "lora_delta needs rows of x and out with unit stride and contiguous lora_a, lora_b");
  TORCH_CHECK(lora_a.size(0) == lora_b.size(0) && lora_a.size(1) == lora_b.size(1),
              "lora_delta: lora_a and lora_b differ in slots or rank");
  TORCH_CHECK(lora_a.size(2) == x.size(1) && lora_b.size(2) == out.size(1),
              "lora_delta: x has ", x.size(1), " features and out ", out.size(1),
              ", the slots take ", lora_a.size(2), " and give ", lora_b.size(2));
  TORCH_CHECK(out.size(0) == x.size(0) && row_slots.dim() == 1 &&
                  row_slots.numel() == x.size(0) && row_slots.scalar_type() == at::kLong &&
                  row_slots.is_contiguous(),
              "lora_delta: row_slots must be a contiguous int64 slot per row of x and out");
  TORCH_CHECK(static_cast<int64_t>(slot_rows.size()) == lora_a.size(0),
              "lora_delta: slot_rows must give the rows used of each of ", lora_a.size(0), " slots");
  for (const int64_t used : slot_rows) {
    TORCH_CHECK(used >= 0 && used <= lora_a.size(1), "lora_delta: a slot uses ", used,
                " rows of ", lora_a.size(1));
  }
  PAGEDLLM_DISPATCH(x.scalar_type(), "lora_delta", lora_delta_impl, out, x, lora_a, lora_b,
                    row_slots, slot_rows);
}

}  // namespace pagedllm
