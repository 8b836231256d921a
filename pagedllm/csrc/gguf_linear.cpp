// gguf_linear: out = x @ W.T straight from llama.cpp's quantized blocks.
//
// A weight row of K values is K / block_values blocks, back to back; each block holds its own
// scale (and minimum) as fp16 and its values as small integers:
//
//   Q4_0  18 B / 32 values   d | 16 B nibbles: value l (l < 16) low nibble of byte l,
//                                              value l + 16 its high nibble; (q - 8) * d
//   Q4_1  20 B / 32 values   d | m | 16 B nibbles (as Q4_0);   q * d + m
//   Q8_0  34 B / 32 values   d | 32 int8;                     q * d
//   Q4_K  144 B / 256 values d | dmin | 12 B: eight 6-bit (scale, min) pairs | 128 B nibbles
//         sub-block s (32 values) = d * scale_s * q - dmin * min_s; bytes 32j..32j+31 hold
//         sub-block 2j in their low nibbles and 2j + 1 in their high nibbles
//   Q5_K  176 B / 256 values d | dmin | 12 B scales | 32 B high bits | 128 B nibbles (as Q4_K);
//         bit s of high-bits byte l is the fifth bit of value l of sub-block s
//   Q6_K  210 B / 256 values 128 B low nibbles | 64 B high 2-bit pairs | 16 int8 scales | d;
//         sixteen sub-blocks of 16 values, (q - 32) * d * scale
//
// Two ways to multiply, both OpenMP-parallel over weight rows (each thread streams its own rows
// once per pass of up to kRowsPerPass input rows; decode is one input row):
//
// - float: each block is dequantized into an L1 buffer and FMA'd against the float32 input.
//   Every format; the result is the dequantized float32 matmul up to summation order.
// - int8 activations (Q4_0, Q4_1, Q8_0): as llama.cpp, each input row is quantized once to
//   blocks of 32 int8 with a float scale, and each block product is an integer dot product:
//   VNNI's dpbusd (u8 x s8 -> s32) where the build has AVX512-VNNI, AVX2's maddubs + madd
//   elsewhere, scalar in the portable build. A 4-bit block is then one 16-byte load, two ops
//   to split the nibbles and one or two multiply-adds: the weights stream at memory speed.
//
// Many input rows (prefill) are compute-bound instead: tiles of the weight are dequantized to
// float32 and handed to ATen's GEMM.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <vector>

#include "gguf_common.h"
#include "quant_kernels.h"
#include "vec.h"

namespace pagedllm {
namespace gguf {

template <typename T>
Q8Rows quantize_rows(const T* x, int64_t rows, int64_t k_dim) {
  static_assert(kQ8Values % vec::kLanes == 0);
  constexpr int kVecs = kQ8Values / vec::kLanes;
  Q8Rows out;
  const int64_t blocks = k_dim / kQ8Values;
  out.q.resize(rows * k_dim);
  out.scale.resize(rows * blocks);
  out.sum.resize(rows * blocks);
  out.k_dim = k_dim;
  for (int64_t b = 0; b < rows * blocks; ++b, x += kQ8Values) {
    vec::F v[kVecs], amax = vec::zero();
    for (int i = 0; i < kVecs; ++i) {
      v[i] = vec::load(x + i * vec::kLanes);
      amax = vec::max(amax, vec::max(v[i], vec::sub(vec::zero(), v[i])));
    }
    const float d = vec::reduce_max(amax) / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    alignas(64) float q[kQ8Values];  // whole numbers in [-127, 127]
    for (int i = 0; i < kVecs; ++i) {
      vec::store(q + i * vec::kLanes, vec::round_nearest(vec::mul(v[i], vec::set1(inv))));
    }
    int8_t* qb = out.q.data() + b * kQ8Values;
    int sum = 0;
    for (int l = 0; l < kQ8Values; ++l) {
      qb[l] = static_cast<int8_t>(q[l]);
      sum += qb[l];
    }
    out.scale[b] = d;
    out.sum[b] = d * static_cast<float>(sum);
  }
  return out;
}

template Q8Rows quantize_rows<float>(const float*, int64_t, int64_t);
template Q8Rows quantize_rows<vec::bf16>(const vec::bf16*, int64_t, int64_t);

}  // namespace gguf

namespace {

using namespace gguf;
using vec::F;
using vec::kLanes;

constexpr int64_t kRowsPerPass = 8;   // input rows sharing one read of a weight row
constexpr int64_t kWeightRows = 16;   // weight rows per parallel task
constexpr int64_t kGemmRows = 32;     // from this many input rows on, dequantize and call GEMM
constexpr int64_t kTileElements = 1 << 22;  // a dequantized tile: at most 16 MiB of float32

// ---- one block -> float values --------------------------------------------------------------
// kLanes int8 -> kLanes floats, for Q8_0, whose plain loop gcc left scalar (the nibble formats'
// loops it vectorizes well; going through a byte buffer instead stalls on store forwarding)
#if defined(__AVX512F__)
inline F load_s8(const int8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw))};
}
#elif defined(__AVX2__) && defined(__FMA__)
inline F load_s8(const int8_t* p) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw))};
}
#else
inline F load_s8(const int8_t* p) { return vec::each([&](int i) { return float(p[i]); }); }
#endif

void dequant_q4_0(const uint8_t* b, float* y) {
  const float d = fp16(b);
  const uint8_t* qs = b + 2;
  for (int l = 0; l < 16; ++l) {
    y[l] = static_cast<float>((qs[l] & 0xF) - 8) * d;
    y[l + 16] = static_cast<float>((qs[l] >> 4) - 8) * d;
  }
}

void dequant_q4_1(const uint8_t* b, float* y) {
  const float d = fp16(b), m = fp16(b + 2);
  const uint8_t* qs = b + 4;
  for (int l = 0; l < 16; ++l) {
    y[l] = static_cast<float>(qs[l] & 0xF) * d + m;
    y[l + 16] = static_cast<float>(qs[l] >> 4) * d + m;
  }
}

void dequant_q8_0(const uint8_t* b, float* y) {
  const F d = vec::set1(fp16(b));
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; i += kLanes) vec::store(y + i, vec::mul(load_s8(qs + i), d));
}

// The 6-bit (scale, min) of sub-block j of a Q4_K/Q5_K block: the first four pairs are the low
// six bits of bytes j and j + 4; the last four take their low four bits from byte j + 4 (scale
// in the low nibble, min in the high) and their top two from the spare bits of bytes j - 4, j.
inline void scale_min_k4(int j, const uint8_t* q, float* scale, float* min) {
  if (j < 4) {
    *scale = static_cast<float>(q[j] & 63);
    *min = static_cast<float>(q[j + 4] & 63);
  } else {
    *scale = static_cast<float>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *min = static_cast<float>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Q4_K and Q5_K share everything but the fifth bit (qh == nullptr: Q4_K).
void dequant_k_quant(const uint8_t* b, const uint8_t* qh, const uint8_t* qs, float* y) {
  const float d = fp16(b), dmin = fp16(b + 2);
  const uint8_t* scales = b + 4;
  for (int j = 0; j < 4; ++j) {
    float sc_lo, m_lo, sc_hi, m_hi;
    scale_min_k4(2 * j, scales, &sc_lo, &m_lo);
    scale_min_k4(2 * j + 1, scales, &sc_hi, &m_hi);
    const float d_lo = d * sc_lo, d_hi = d * sc_hi, min_lo = dmin * m_lo, min_hi = dmin * m_hi;
    for (int l = 0; l < 32; ++l) {
      int lo = qs[32 * j + l] & 0xF, hi = qs[32 * j + l] >> 4;
      if (qh != nullptr) {
        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
      }
      y[64 * j + l] = d_lo * static_cast<float>(lo) - min_lo;
      y[64 * j + 32 + l] = d_hi * static_cast<float>(hi) - min_hi;
    }
  }
}

void dequant_q4_k(const uint8_t* b, float* y) { dequant_k_quant(b, nullptr, b + 16, y); }
void dequant_q5_k(const uint8_t* b, float* y) { dequant_k_quant(b, b + 16, b + 48, y); }

// Q6_K, per half of 128 values: low nibbles of ql[l] and ql[l + 32] are values l and l + 32,
// their high nibbles values l + 64 and l + 96; qh[l] holds the four values' top two bits.
void dequant_q6_k(const uint8_t* b, float* y) {
  const float d = fp16(b + 208);
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = b + 64 * half;
    const uint8_t* qh = b + 128 + 32 * half;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * half;
    float* out = y + 128 * half;
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      out[l] = d * sc[is] * static_cast<float>(q1);
      out[l + 32] = d * sc[is + 2] * static_cast<float>(q2);
      out[l + 64] = d * sc[is + 4] * static_cast<float>(q3);
      out[l + 96] = d * sc[is + 6] * static_cast<float>(q4);
    }
  }
}

using DequantBlock = void (*)(const uint8_t*, float*);

DequantBlock dequant_for(int64_t type) {
  switch (type) {
    case kQ4_0: return dequant_q4_0;
    case kQ4_1: return dequant_q4_1;
    case kQ8_0: return dequant_q8_0;
    case kQ4_K: return dequant_q4_k;
    case kQ5_K: return dequant_q5_k;
    case kQ6_K: return dequant_q6_k;
    default: TORCH_CHECK(false, "gguf kernels: unsupported ggml type ", type);
  }
}

void dequant_row(DequantBlock dequant, BlockFormat format, const uint8_t* w_row, int64_t k_dim,
                 float* y) {
  for (int64_t k = 0; k < k_dim; k += format.values) {
    dequant(w_row + (k / format.values) * format.bytes, y + k);
  }
}

// ---- float path: block -> L1 buffer -> FMA against every input row of the pass ---------------
// The format is a template argument, so each block's dequantization is inlined and vectorized
// with the FMAs that consume it (through a function pointer it ran at a quarter the speed).
struct FloatPass {
  const float* x32;  // [rows, K] float32
  int64_t k_dim;
};

template <DequantBlock kDequant, int64_t kValues, int64_t kBytes, int R>
void float_dot_rows(const FloatPass& p, const uint8_t* w_row, float* sums) {
  alignas(64) float buf[kValues];
  F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vec::zero();
  for (int64_t k0 = 0; k0 < p.k_dim; k0 += kValues) {
    kDequant(w_row + (k0 / kValues) * kBytes, buf);
    for (int64_t i = 0; i < kValues; i += kLanes) {
      const F w = vec::load(buf + i);
      for (int r = 0; r < R; ++r) acc[r] = vec::fma(w, vec::load(p.x32 + r * p.k_dim + k0 + i), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = vec::reduce_add(acc[r]);
}

using FloatDotRows = void (*)(const FloatPass&, const uint8_t*, float*);

template <DequantBlock kDequant, int64_t kValues, int64_t kBytes>
FloatDotRows float_dot_rows_for_format(int64_t rows) {
  static constexpr FloatDotRows kTable[kRowsPerPass] = {
      float_dot_rows<kDequant, kValues, kBytes, 1>, float_dot_rows<kDequant, kValues, kBytes, 2>,
      float_dot_rows<kDequant, kValues, kBytes, 3>, float_dot_rows<kDequant, kValues, kBytes, 4>,
      float_dot_rows<kDequant, kValues, kBytes, 5>, float_dot_rows<kDequant, kValues, kBytes, 6>,
      float_dot_rows<kDequant, kValues, kBytes, 7>, float_dot_rows<kDequant, kValues, kBytes, 8>};
  return kTable[rows - 1];
}

FloatDotRows float_dot_rows_for(int64_t type, int64_t rows) {
  switch (type) {
    case kQ4_0: return float_dot_rows_for_format<dequant_q4_0, 32, 18>(rows);
    case kQ4_1: return float_dot_rows_for_format<dequant_q4_1, 32, 20>(rows);
    case kQ8_0: return float_dot_rows_for_format<dequant_q8_0, 32, 34>(rows);
    case kQ4_K: return float_dot_rows_for_format<dequant_q4_k, 256, 144>(rows);
    case kQ5_K: return float_dot_rows_for_format<dequant_q5_k, 256, 176>(rows);
    case kQ6_K: return float_dot_rows_for_format<dequant_q6_k, 256, 210>(rows);
    default: TORCH_CHECK(false, "gguf kernels: unsupported ggml type ", type);
  }
}

// ---- int8 path ----------------------------------------------------------------------------
// (the input rows quantized to Q8 blocks: gguf_common.h)
#if defined(__AVX2__)
// 32 weight values as bytes, in value order; the int32 dot product with 32 int8 activations
// comes back as 8 partial sums.
struct Bytes32 {
  __m256i v;
};
inline Bytes32 unpack_nibbles(const uint8_t* qs) {  // 16 bytes -> values 0..15, then 16..31
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0xF);
  const __m128i lo = _mm_and_si128(raw, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  return {_mm256_set_m128i(hi, lo)};
}
inline Bytes32 load_bytes(const uint8_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))};
}
inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  // pairs of u8 * s8 summed to int16 (at most 2 * 255 * 127 for 8-bit weights, no saturation:
  // our weights are at most 128 in magnitude), then pairs of those summed to int32
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
// unsigned weights (nibbles 0..15) against signed activations
inline __m256i dot_unsigned(Bytes32 w, const int8_t* qx) {
  return dot_u8_s8(w.v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx)));
}
// signed weights (Q8_0): move the weight's sign onto the activation, as llama.cpp does
inline __m256i dot_signed(Bytes32 w, const int8_t* qx) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx));
  return dot_u8_s8(_mm256_sign_epi8(w.v, w.v), _mm256_sign_epi8(x, w.v));
}
struct Acc {
  __m256 v = _mm256_setzero_ps();
  float extra = 0.f;
  void add(__m256i dot, float scale) {
    v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), v);
  }
  float total() const {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1))) + extra;
  }
};
#else
struct Bytes32 {
  uint8_t v[32];
};
inline Bytes32 unpack_nibbles(const uint8_t* qs) {
  Bytes32 out;
  for (int l = 0; l < 16; ++l) {
    out.v[l] = qs[l] & 0xF;
    out.v[l + 16] = qs[l] >> 4;
  }
  return out;
}
inline Bytes32 load_bytes(const uint8_t* p) {
  Bytes32 out;
  std::memcpy(out.v, p, 32);
  return out;
}
inline int32_t dot_unsigned(const Bytes32& w, const int8_t* qx) {
  int32_t sum = 0;
  for (int l = 0; l < 32; ++l) sum += static_cast<int32_t>(w.v[l]) * qx[l];
  return sum;
}
inline int32_t dot_signed(const Bytes32& w, const int8_t* qx) {
  int32_t sum = 0;
  for (int l = 0; l < 32; ++l) sum += static_cast<int32_t>(static_cast<int8_t>(w.v[l])) * qx[l];
  return sum;
}
struct Acc {
  float v = 0.f;
  float extra = 0.f;
  void add(int32_t dot, float scale) { v += static_cast<float>(dot) * scale; }
  float total() const { return v + extra; }
};
#endif

// One weight block against the matching block of one quantized input row.
template <int64_t kType>
inline void block_q8(const uint8_t* w, const Bytes32& values, const int8_t* qx, float dx, float sx,
                     Acc& acc) {
  const float d = fp16(w);
  if constexpr (kType == kQ4_0) {  // sum (q - 8) d x = d dx (q . qx) - 8 d (dx sum qx)
    acc.add(dot_unsigned(values, qx), d * dx);
    acc.extra -= 8.f * d * sx;
  } else if constexpr (kType == kQ4_1) {  // sum (q d + m) x = d dx (q . qx) + m (dx sum qx)
    acc.add(dot_unsigned(values, qx), d * dx);
    acc.extra += fp16(w + 2) * sx;
  } else {
    acc.add(dot_signed(values, qx), d * dx);
  }
}

template <int64_t kType>
inline Bytes32 block_values(const uint8_t* w) {
  if constexpr (kType == kQ4_0) return unpack_nibbles(w + 2);
  if constexpr (kType == kQ4_1) return unpack_nibbles(w + 4);
  return load_bytes(w + 2);
}

struct Q8Pass {
  const Q8Rows* x;
  int64_t row0;  // first input row of this pass
};

template <int64_t kType, int R>
void q8_dot_rows(const Q8Pass& p, const uint8_t* w_row, float* sums) {
  constexpr int64_t kBytes = kType == kQ4_0 ? 18 : kType == kQ4_1 ? 20 : 34;
  const int64_t k_dim = p.x->k_dim, blocks = k_dim / kQ8Values;
  const int8_t* qx = p.x->q.data() + p.row0 * k_dim;
  const float* dx = p.x->scale.data() + p.row0 * blocks;
  const float* sx = p.x->sum.data() + p.row0 * blocks;
  Acc acc[R];
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* w = w_row + b * kBytes;
    const Bytes32 values = block_values<kType>(w);
    for (int r = 0; r < R; ++r) {
      block_q8<kType>(w, values, qx + r * k_dim + b * kQ8Values, dx[r * blocks + b],
                      sx[r * blocks + b], acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = acc[r].total();
}

using Q8DotRows = void (*)(const Q8Pass&, const uint8_t*, float*);

template <int64_t kType>
Q8DotRows q8_dot_rows_for_type(int64_t rows) {
  static constexpr Q8DotRows kTable[kRowsPerPass] = {
      q8_dot_rows<kType, 1>, q8_dot_rows<kType, 2>, q8_dot_rows<kType, 3>,
      q8_dot_rows<kType, 4>, q8_dot_rows<kType, 5>, q8_dot_rows<kType, 6>,
      q8_dot_rows<kType, 7>, q8_dot_rows<kType, 8>};
  return kTable[rows - 1];
}

Q8DotRows q8_dot_rows_for(int64_t type, int64_t rows) {
  switch (type) {
    case kQ4_0: return q8_dot_rows_for_type<kQ4_0>(rows);
    case kQ4_1: return q8_dot_rows_for_type<kQ4_1>(rows);
    default: return q8_dot_rows_for_type<kQ8_0>(rows);
  }
}

// Decode: one input row against kCols weight rows at once. The activation block is loaded once
// for all of them, and their kCols accumulators are independent: one row alone would chain
// every block's FMA on the last one's result (4 cycles each), several rows overlap them.
constexpr int64_t kCols = 4;

template <int64_t kType, int C>
void q8_dot_cols(const Q8Rows& x, const uint8_t* w_rows, int64_t row_bytes, float* sums) {
  constexpr int64_t kBytes = kType == kQ4_0 ? 18 : kType == kQ4_1 ? 20 : 34;
  const int64_t blocks = x.k_dim / kQ8Values;
  Acc acc[C];
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* qx = x.q.data() + b * kQ8Values;
    for (int c = 0; c < C; ++c) {
      const uint8_t* w = w_rows + c * row_bytes + b * kBytes;
      block_q8<kType>(w, block_values<kType>(w), qx, x.scale[b], x.sum[b], acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) sums[c] = acc[c].total();
}

template <int64_t kType, typename T>
void q8_one_row_type(T* o, const Q8Rows& x, const uint8_t* w, int64_t n_dim, int64_t row_bytes) {
  at::parallel_for(0, n_dim, kWeightRows, [&](int64_t n0, int64_t n1) {
    float sums[kCols];
    int64_t n = n0;
    for (; n + kCols <= n1; n += kCols) {
      q8_dot_cols<kType, kCols>(x, w + n * row_bytes, row_bytes, sums);
      for (int64_t c = 0; c < kCols; ++c) vec::store_scalar(o + n + c, sums[c]);
    }
    for (; n < n1; ++n) {
      q8_dot_cols<kType, 1>(x, w + n * row_bytes, row_bytes, sums);
      vec::store_scalar(o + n, sums[0]);
    }
  });
}

template <typename T>
void q8_one_row(T* o, const Q8Rows& x, const uint8_t* w, int64_t n_dim, int64_t row_bytes,
                int64_t type) {
  switch (type) {
    case kQ4_0: return q8_one_row_type<kQ4_0>(o, x, w, n_dim, row_bytes);
    case kQ4_1: return q8_one_row_type<kQ4_1>(o, x, w, n_dim, row_bytes);
    default: return q8_one_row_type<kQ8_0>(o, x, w, n_dim, row_bytes);
  }
}

bool has_int8_path(int64_t type) { return type == kQ4_0 || type == kQ4_1 || type == kQ8_0; }

// ---- drivers --------------------------------------------------------------------------------
// Calls dot(m0, rows, w_row, sums) for every pass of input rows and every weight row, in
// parallel over weight rows, and stores each sum into out (row stride out_stride).
template <typename T, typename Dot>
void few_rows(T* o, int64_t out_stride, int64_t m_dim, int64_t n_dim, const uint8_t* w,
              int64_t row_bytes, const Dot& dot) {
  at::parallel_for(0, n_dim, kWeightRows, [&](int64_t n0, int64_t n1) {
    float sums[kRowsPerPass];
    for (int64_t m0 = 0; m0 < m_dim; m0 += kRowsPerPass) {
      const int64_t rows = std::min(kRowsPerPass, m_dim - m0);
      for (int64_t n = n0; n < n1; ++n) {
        dot(m0, rows, w + n * row_bytes, sums);
        for (int64_t r = 0; r < rows; ++r) vec::store_scalar(o + (m0 + r) * out_stride + n, sums[r]);
      }
    }
  });
}

// How a weight tensor's rows are laid out: as the file stores them, or regrouped 16 at a time
// (gguf_interleaved.cpp).
struct Weight {
  const uint8_t* data;
  int64_t rows, row_bytes, type;
  bool interleaved;

  explicit Weight(const at::Tensor& weight, int64_t ggml_type, bool regrouped)
      : data(weight.data_ptr<uint8_t>()), rows(weight.size(0)), row_bytes(weight.size(1)),
        type(ggml_type), interleaved(regrouped) {}

  void dequantize_row(int64_t row, int64_t k_dim, float* y) const {
    if (interleaved) {
      dequantize_interleaved_row(data, row, row_bytes, k_dim, type, y);
    } else {
      dequant_row(dequant_for(type), block_format(type), data + row * row_bytes, k_dim, y);
    }
  }
};

template <typename T>
void linear_few_rows(at::Tensor& out, const at::Tensor& x, const Weight& w,
                     bool int8_activations) {
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_dim = w.rows;
  T* o = out.data_ptr<T>();
  if (int8_activations && has_int8_path(w.type)) {
    const Q8Rows q8 = quantize_rows(x.data_ptr<T>(), m_dim, k_dim);
    if (w.interleaved) {
      interleaved_linear(o, out.stride(0), q8, m_dim, w.data, n_dim, w.row_bytes, w.type);
    } else if (m_dim == 1) {
      q8_one_row(o, q8, w.data, n_dim, w.row_bytes, w.type);
    } else {
      few_rows(o, out.stride(0), m_dim, n_dim, w.data, w.row_bytes,
               [&](int64_t m0, int64_t rows, const uint8_t* w_row, float* sums) {
                 q8_dot_rows_for(w.type, rows)(Q8Pass{&q8, m0}, w_row, sums);
               });
    }
    return;
  }
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const float* xs = x32.data_ptr<float>();
  few_rows(o, out.stride(0), m_dim, n_dim, w.data, w.row_bytes,
           [&](int64_t m0, int64_t rows, const uint8_t* w_row, float* sums) {
             float_dot_rows_for(w.type, rows)(FloatPass{xs + m0 * k_dim, k_dim}, w_row, sums);
           });
}

// out[i] = the values of weight row row_ids[i] (row_ids == nullptr: first_row + i), i < count
template <typename T>
void dequantize_rows(T* out, const Weight& w, const int64_t* row_ids, int64_t first_row,
                     int64_t count, int64_t k_dim) {
  at::parallel_for(0, count, kWeightRows, [&](int64_t i0, int64_t i1) {
    std::vector<float> row(std::is_same_v<T, float> ? 0 : k_dim);
    for (int64_t i = i0; i < i1; ++i) {
      float* y = std::is_same_v<T, float> ? reinterpret_cast<float*>(out + i * k_dim) : row.data();
      w.dequantize_row(row_ids == nullptr ? first_row + i : row_ids[i], k_dim, y);
      if constexpr (!std::is_same_v<T, float>) vec::convert(out + i * k_dim, y, k_dim);
    }
  });
}

void linear_many_rows(at::Tensor& out, const at::Tensor& x, const Weight& w) {
  const int64_t k_dim = x.size(1), n_dim = w.rows;
  const int64_t tile_rows = std::max<int64_t>(kGroupRows,
                                              kTileElements / std::max<int64_t>(k_dim, 1));
  const at::Tensor x32 = x.to(at::kFloat);
  at::Tensor tile = at::empty({std::min(tile_rows, n_dim), k_dim}, x32.options());
  for (int64_t n0 = 0; n0 < n_dim; n0 += tile_rows) {
    const int64_t n1 = std::min(n_dim, n0 + tile_rows);
    at::Tensor w32 = tile.slice(0, 0, n1 - n0);
    dequantize_rows(w32.data_ptr<float>(), w, nullptr, n0, n1 - n0, k_dim);
    out.slice(1, n0, n1).copy_(at::mm(x32, w32.t()));  // rounds to out's dtype once
  }
}

void check_weight(const at::Tensor& weight, int64_t k_dim, int64_t type, bool interleaved) {
  const BlockFormat format = block_format(type);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous(),
              "gguf kernels take the weight as a contiguous uint8 tensor [rows, bytes_per_row]");
  TORCH_CHECK(k_dim % format.values == 0, "gguf kernels: ", k_dim,
              " values per row is not a whole number of ", format.values, "-value blocks");
  TORCH_CHECK(weight.size(1) == k_dim / format.values * format.bytes, "gguf kernels: ",
              weight.size(1), " bytes per weight row, expected ",
              k_dim / format.values * format.bytes, " for ", k_dim, " values of type ", type);
  TORCH_CHECK(!interleaved || (interleavable(type) && weight.size(0) % kGroupRows == 0),
              "gguf kernels: a regrouped weight is Q4_0, Q4_1 or Q8_0 with a multiple of ",
              kGroupRows, " rows");
}

}  // namespace

void gguf_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& weight,
                 int64_t ggml_type, bool int8_activations, bool interleaved) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.is_contiguous(),
              "gguf_linear takes a contiguous 2-D input and a 2-D output");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "gguf_linear: out and x differ in dtype");
  TORCH_CHECK(out.stride(1) == 1, "gguf_linear: out's rows must be contiguous");
  check_weight(weight, x.size(1), ggml_type, interleaved);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == weight.size(0),
              "gguf_linear: out has the wrong shape");
  TORCH_CHECK(!interleaved || int8_activations,
              "gguf_linear: a regrouped weight multiplies int8 activations only");
  if (x.size(0) == 0) return;
  const Weight w(weight, ggml_type, interleaved);
  if (x.size(0) >= kGemmRows) {
    linear_many_rows(out, x, w);
    return;
  }
  if (x.scalar_type() == at::kFloat) {
    linear_few_rows<float>(out, x, w, int8_activations);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "gguf_linear takes float32 or bfloat16, got ",
                x.scalar_type());
    linear_few_rows<vec::bf16>(out, x, w, int8_activations);
  }
}

void gguf_dequantize(at::Tensor out, const at::Tensor& weight, int64_t ggml_type,
                     bool interleaved, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(),
              "gguf_dequantize: out must be a contiguous [rows, values] tensor");
  check_weight(weight, out.size(1), ggml_type, interleaved);
  at::Tensor row_ids;
  if (rows.has_value()) {
    row_ids = rows->to(at::kLong).contiguous();
    TORCH_CHECK(row_ids.dim() == 1 && row_ids.size(0) == out.size(0),
                "gguf_dequantize: one row id per output row");
    if (row_ids.numel() > 0) {
      TORCH_CHECK(row_ids.min().item<int64_t>() >= 0 &&
                      row_ids.max().item<int64_t>() < weight.size(0),
                  "gguf_dequantize: row id out of range [0, ", weight.size(0), ")");
    }
  } else {
    TORCH_CHECK(out.size(0) == weight.size(0), "gguf_dequantize: out needs one row per weight row");
  }
  const int64_t* ids = rows.has_value() ? row_ids.data_ptr<int64_t>() : nullptr;
  const Weight w(weight, ggml_type, interleaved);
  if (out.scalar_type() == at::kFloat) {
    dequantize_rows(out.data_ptr<float>(), w, ids, 0, out.size(0), out.size(1));
  } else {
    TORCH_CHECK(out.scalar_type() == at::kBFloat16,
                "gguf_dequantize writes float32 or bfloat16, got ", out.scalar_type());
    dequantize_rows(out.data_ptr<vec::bf16>(), w, ids, 0, out.size(0), out.size(1));
  }
}

at::Tensor gguf_interleave(const at::Tensor& weight, int64_t ggml_type) {
  TORCH_CHECK(weight.dim() == 2, "gguf_interleave takes a [rows, bytes_per_row] weight");
  const BlockFormat format = block_format(ggml_type);
  check_weight(weight, weight.size(1) / format.bytes * format.values, ggml_type, true);
  at::Tensor out = at::empty_like(weight);
  gguf::interleave_rows(weight.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), weight.size(0),
                        weight.size(1), ggml_type);
  return out;
}

}  // namespace pagedllm
