// int_linear: out = x @ W.T for integer weights kept packed (4 or 8 bits, a scale and a zero
// point per group of input channels), dequantized in registers just before each FMA.
//
// The one layout every checkpoint format is repacked into (quantization/int_weight.py):
//
//   4 bits: one weight row = K/2 bytes; each block of 32 input channels is 16 bytes,
//           byte j = channel j (low nibble) | channel 16 + j (high nibble)
//             bytes  [ b0  b1 ... b15 ]
//             low    [ c0  c1 ... c15 ]   one widening load gives 16 (or 8) lanes of each
//             high   [ c16 c17 .. c31 ]
//   8 bits: one weight row = K bytes, channel k in byte k
//   scales float16, bfloat16 or float32, zeros uint8, both [N, K / group_size];
//   w = (q - zero) * scale
//
// Why this shape: a block never straddles a group (group_size is a multiple of 32), one vector
// load of bytes widens to whole vectors of consecutive channels at every ISA level, and x is
// read in plain order, so desc_act checkpoints only permute x's columns before the call.
// (The decode path applies scale and zero once per group, not per weight: see dot_rows.)
//
// Few rows (decode): memory-bound on the packed weight, so each weight row is read once per
// pass of up to kRowsPerPass input rows; threads split the output rows (at::parallel_for, i.e.
// OpenMP). Many rows (prefill): compute-bound; tiles of weight rows are dequantized (to bf16
// where oneDNN runs bf16 GEMMs, else float32) and handed to ATen's GEMM.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "int_kernels.h"
#include "vec.h"

namespace pagedllm {
namespace {

using vec::F;
using vec::kLanes;

constexpr int64_t kBlock = 32;               // input channels per 4-bit block (16 bytes)
constexpr int kVecs = kBlock / kLanes;       // vectors per block
constexpr int64_t kRowsPerPass = 4;          // input rows sharing one read of a weight row
constexpr int64_t kWeightRows = 16;          // output rows per parallel task
constexpr int64_t kGemmRows = 16;            // from this many input rows on: tiles + GEMM
constexpr int64_t kTileElements = 1 << 20;   // a dequantized tile: 2 MiB of bf16 (L2-sized)

// ---- bytes to float lanes, per ISA ---------------------------------------------------------
#if defined(__AVX512F__)
inline __m512i widen(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline F bytes_at(const uint8_t* p) { return {_mm512_cvtepi32_ps(widen(p))}; }
inline void nibbles_at(const uint8_t* p, F& low, F& high) {
  const __m512i v = widen(p);
  low = {_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)))};
  high = {_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4))};
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256i widen(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline F bytes_at(const uint8_t* p) { return {_mm256_cvtepi32_ps(widen(p))}; }
inline void nibbles_at(const uint8_t* p, F& low, F& high) {
  const __m256i v = widen(p);
  low = {_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)))};
  high = {_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4))};
}
#else
inline F bytes_at(const uint8_t* p) {
  return vec::each([&](int i) { return static_cast<float>(p[i]); });
}
inline void nibbles_at(const uint8_t* p, F& low, F& high) {
  low = vec::each([&](int i) { return static_cast<float>(p[i] & 15); });
  high = vec::each([&](int i) { return static_cast<float>(p[i] >> 4); });
}
#endif

// The codes of channels [k, k + 32) of one weight row, as floats: w[i] holds channels
// k + i * kLanes ...
template <int Bits>
inline void block_codes(const uint8_t* row, int64_t k, F* w) {
  if constexpr (Bits == 4) {
    const uint8_t* bytes = row + k / 2;
    for (int h = 0; h < kBlock / 2; h += kLanes) {
      nibbles_at(bytes + h, w[h / kLanes], w[(kBlock / 2 + h) / kLanes]);
    }
  } else {
    for (int i = 0; i < kVecs; ++i) w[i] = bytes_at(row + k + i * kLanes);
  }
}

// The same channels dequantized: (q - zero) * scale.
template <int Bits>
inline void block_weights(const uint8_t* row, int64_t k, F scale, F zero, F* w) {
  block_codes<Bits>(row, k, w);
  for (int i = 0; i < kVecs; ++i) w[i] = vec::mul(vec::sub(w[i], zero), scale);
}

// A group's scale in the type the layout keeps it (int_weight.py: fp16 or bf16 where they hold
// the checkpoint's scales exactly); read once per group, so the switch costs nothing.
struct Scales {
  const void* data;
  at::ScalarType type;
  float operator[](int64_t i) const {
    switch (type) {
      case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(data)[i]);
      case at::kBFloat16: return vec::to_float(static_cast<const vec::bf16*>(data)[i]);
      default: return static_cast<const float*>(data)[i];
    }
  }
};

struct Weights {
  const uint8_t* q;
  Scales scales;
  const uint8_t* zeros;
  int64_t k_dim, group_size, groups, row_bytes;
};

// sums[r] = x[r] . w[n] for R input rows (float32, row stride k_dim) and one weight row n.
//
// Per group g the codes are multiplied as they are and the group's scale and zero applied
// once:  sum_k (q_k - z) s x_k = s * (sum_k q_k x_k) - s * z * xsums[r][g],
// with xsums (each row's sum of x over each group) computed once per call. That leaves two
// vector ops per weight vector (widen, FMA) instead of four; the zero's share is a scalar per
// group. Two accumulators per row: consecutive FMAs into one register would wait on each other.
template <int Bits, int R>
void dot_rows(const Weights& wt, int64_t n, const float* x, const float* xsums, float* sums) {
  const uint8_t* row = wt.q + n * wt.row_bytes;
  F total[R];
  float shift[R];
  for (int r = 0; r < R; ++r) {
    total[r] = vec::zero();
    shift[r] = 0.f;
  }
  for (int64_t g = 0; g < wt.groups; ++g) {
    F acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vec::zero();
    const int64_t end = (g + 1) * wt.group_size;
    for (int64_t k = g * wt.group_size; k < end; k += kBlock) {
      F w[kVecs];
      block_codes<Bits>(row, k, w);
      for (int i = 0; i < kVecs; ++i) {
        for (int r = 0; r < R; ++r) {
          acc[r][i & 1] = vec::fma(w[i], vec::load(x + r * wt.k_dim + k + i * kLanes),
                                   acc[r][i & 1]);
        }
      }
    }
    const float scale = wt.scales[n * wt.groups + g];
    const float zero_share = scale * static_cast<float>(wt.zeros[n * wt.groups + g]);
    const F scale_v = vec::set1(scale);
    for (int r = 0; r < R; ++r) {
      total[r] = vec::fma(vec::add(acc[r][0], acc[r][1]), scale_v, total[r]);
      shift[r] += zero_share * xsums[r * wt.groups + g];
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = vec::reduce_add(total[r]) - shift[r];
}

using DotRows = void (*)(const Weights&, int64_t, const float*, const float*, float*);

template <int Bits>
DotRows dot_rows_for(int64_t rows) {
  static constexpr DotRows kTable[kRowsPerPass] = {dot_rows<Bits, 1>, dot_rows<Bits, 2>,
                                                   dot_rows<Bits, 3>, dot_rows<Bits, 4>};
  return kTable[rows - 1];
}

// Each row's sum of x over each group: [M, groups].
std::vector<float> group_sums(const float* x, int64_t m_dim, const Weights& wt) {
  std::vector<float> sums(m_dim * wt.groups);
  for (int64_t r = 0; r < m_dim; ++r) {
    for (int64_t g = 0; g < wt.groups; ++g) {
      const float* start = x + r * wt.k_dim + g * wt.group_size;
      F acc = vec::zero();
      for (int64_t k = 0; k < wt.group_size; k += kLanes) acc = vec::add(acc, vec::load(start + k));
      sums[r * wt.groups + g] = vec::reduce_add(acc);
    }
  }
  return sums;
}

template <typename T>
void linear_few_rows(at::Tensor& out, const at::Tensor& x, const Weights& wt, int64_t n_dim,
                     int64_t bits) {
  const int64_t m_dim = x.size(0);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const float* xs = x32.data_ptr<float>();
  T* o = out.data_ptr<T>();
  const std::vector<float> xsums = group_sums(xs, m_dim, wt);
  at::parallel_for(0, n_dim, kWeightRows, [&](int64_t n0, int64_t n1) {
    float sums[kRowsPerPass];
    for (int64_t m0 = 0; m0 < m_dim; m0 += kRowsPerPass) {
      const int64_t rows = std::min(kRowsPerPass, m_dim - m0);
      const DotRows dot = bits == 4 ? dot_rows_for<4>(rows) : dot_rows_for<8>(rows);
      for (int64_t n = n0; n < n1; ++n) {
        dot(wt, n, xs + m0 * wt.k_dim, xsums.data() + m0 * wt.groups, sums);
        for (int64_t r = 0; r < rows; ++r) vec::store_scalar(o + (m0 + r) * n_dim + n, sums[r]);
      }
    }
  });
}

// Rows [n0, n1) of the weight into dst (row stride k_dim), as float32 or bf16.
template <int Bits, typename T>
void dequantize_rows(const Weights& wt, int64_t n0, int64_t n1, T* dst) {
  at::parallel_for(n0, n1, kWeightRows, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      T* out_row = dst + (n - n0) * wt.k_dim;
      for (int64_t g = 0; g < wt.groups; ++g) {
        const F scale = vec::set1(wt.scales[n * wt.groups + g]);
        const F zero = vec::set1(static_cast<float>(wt.zeros[n * wt.groups + g]));
        for (int64_t k = g * wt.group_size; k < (g + 1) * wt.group_size; k += kBlock) {
          F w[kVecs];
          block_weights<Bits>(wt.q + n * wt.row_bytes, k, scale, zero, w);
          for (int i = 0; i < kVecs; ++i) vec::store(out_row + k + i * kLanes, w[i]);
        }
      }
    }
  });
}

template <typename T>
void dequantize_into(const Weights& wt, int64_t bits, int64_t n0, int64_t n1, T* dst) {
  if (bits == 4) {
    dequantize_rows<4>(wt, n0, n1, dst);
  } else {
    dequantize_rows<8>(wt, n0, n1, dst);
  }
}

// Tiles of weight rows dequantized to `tile_type` (float32, or bf16 where the caller knows
// oneDNN runs bf16 GEMMs natively: a float32 GEMM there is several times slower), each handed
// to ATen's GEMM with x in the same type.
void linear_many_rows(at::Tensor& out, const at::Tensor& x, const Weights& wt, int64_t n_dim,
                      int64_t bits, at::ScalarType tile_type) {
  const int64_t tile_rows = std::max<int64_t>(kWeightRows, kTileElements / wt.k_dim);
  const at::Tensor xt = x.to(tile_type);
  at::Tensor tile = at::empty({std::min(tile_rows, n_dim), wt.k_dim}, xt.options());
  for (int64_t n0 = 0; n0 < n_dim; n0 += tile_rows) {
    const int64_t n1 = std::min(n_dim, n0 + tile_rows);
    if (tile_type == at::kBFloat16) {
      dequantize_into(wt, bits, n0, n1, tile.data_ptr<vec::bf16>());
    } else {
      dequantize_into(wt, bits, n0, n1, tile.data_ptr<float>());
    }
    out.slice(1, n0, n1).copy_(at::mm(xt, tile.slice(0, 0, n1 - n0).t()));
  }
}

Weights check_weights(const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, "int kernels take 4- or 8-bit weights, got ", bits);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous(),
              "qweight must be a contiguous uint8 matrix");
  const at::ScalarType scale_type = scales.scalar_type();
  TORCH_CHECK((scale_type == at::kFloat || scale_type == at::kHalf || scale_type == at::kBFloat16) &&
                  zeros.scalar_type() == at::kByte && scales.is_contiguous() &&
                  zeros.is_contiguous(),
              "scales must be contiguous float32/float16/bfloat16, zeros contiguous uint8");
  const int64_t n_dim = qweight.size(0), k_dim = qweight.size(1) * (8 / bits);
  TORCH_CHECK(group_size > 0 && group_size % kBlock == 0 && k_dim % group_size == 0,
              "group_size ", group_size, " must be a multiple of 32 dividing ", k_dim);
  const int64_t groups = k_dim / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n_dim && scales.size(1) == groups &&
                  zeros.sizes() == scales.sizes(),
              "scales and zeros must be [", n_dim, ", ", groups, "]");
  return {qweight.data_ptr<uint8_t>(), Scales{scales.data_ptr(), scale_type},
          zeros.data_ptr<uint8_t>(),
          k_dim, group_size, groups, qweight.size(1)};
}

}  // namespace

void int_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& qweight,
                const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                int64_t group_size, bool bf16_gemm) {
  const Weights wt = check_weights(qweight, scales, zeros, bits, group_size);
  const int64_t n_dim = qweight.size(0);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == wt.k_dim, "int_linear: x must be "
              "a contiguous [M, ", wt.k_dim, "] matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int_linear takes float32 or bfloat16 input");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == x.size(0) && out.size(1) == n_dim,
              "int_linear: out must be a contiguous [M, N] tensor of x's dtype");
  if (x.size(0) >= kGemmRows) {
    const bool bf16_tiles = bf16_gemm && x.scalar_type() == at::kBFloat16;
    linear_many_rows(out, x, wt, n_dim, bits, bf16_tiles ? at::kBFloat16 : at::kFloat);
  } else if (x.size(0) == 0) {
    return;
  } else if (x.scalar_type() == at::kFloat) {
    linear_few_rows<float>(out, x, wt, n_dim, bits);
  } else {
    linear_few_rows<vec::bf16>(out, x, wt, n_dim, bits);
  }
}

at::Tensor int_dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t bits, int64_t group_size) {
  const Weights wt = check_weights(qweight, scales, zeros, bits, group_size);
  at::Tensor out = at::empty({qweight.size(0), wt.k_dim}, scales.options().dtype(at::kFloat));
  dequantize_into(wt, bits, 0, qweight.size(0), out.data_ptr<float>());
  return out;
}

}  // namespace pagedllm
