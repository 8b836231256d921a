// gguf_interleaved: Q4_0 / Q4_1 / Q8_0 weights regrouped 16 rows at a time, for decode.
//
// In the file's layout each row's blocks lie together, so one row's dot product with the input
// ends in a horizontal sum, and every block of every row costs scalar work of its own (its fp16
// scale, its min, the broadcast of both). Regrouped, block b of 16 consecutive rows lies in one
// run of bytes, each field of the 16 rows side by side:
//
//   Q4_1 group block (320 B = 16 x 20 B):
//     d[0..15] fp16 | m[0..15] fp16 | chunk 0 | chunk 1 | chunk 2 | chunk 3     (chunks: 64 B)
//     chunk s, bytes 4j..4j+3 = row j's packed bytes 4s..4s+3: low nibbles = its values
//     4s..4s+3, high nibbles = its values 16+4s..16+4s+3
//   Q4_0 (288 B): the same without m
//   Q8_0 (544 B): d[0..15] | chunks 0..7, chunk s bytes 4j..4j+3 = row j's int8 values
//     4s..4s+3, each stored xor 0x80 (as the unsigned value + 128)
//
// Lane j (32 bits) of a chunk then holds four values of row j, which is the shape VNNI's dpbusd
// multiplies: four activation bytes broadcast to every lane, one instruction takes four values
// of 16 rows, and a block ends with its 16 rows' sums in one register, scaled by the 16 rows' d
// in one fp16 -> fp32 conversion, with no horizontal sum. AVX2 builds take the 16 lanes as two
// halves of 8 with maddubs + madd; the portable build loops. The weight keeps its shape and size.
//
// The file is compiled into the same module as gguf_linear.cpp, which calls it through
// gguf_common.h for decode steps and for dequantizing (prefill, embedding rows).

#include <ATen/Parallel.h>

#include "gguf_common.h"
#include "vec.h"

namespace pagedllm {
namespace gguf {
namespace {

// Byte offsets within one group block.
template <int64_t kType>
struct GroupLayout {
  static constexpr int64_t kRowBlockBytes = kType == kQ4_0 ? 18 : kType == kQ4_1 ? 20 : 34;
  static constexpr int64_t kBytes = kGroupRows * kRowBlockBytes;
  static constexpr int64_t kMins = 2 * kGroupRows;  // Q4_1's m[16] follows d[16]
  static constexpr int64_t kChunks = kType == kQ4_1 ? 4 * kGroupRows : 2 * kGroupRows;
  static constexpr int64_t kNumChunks = kType == kQ8_0 ? 8 : 4;
};

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Q8_0's weights are stored + 128 (dpbusd wants one unsigned operand): the block's dot product
// comes out 128 * sum(qx) too high, which the offset term below takes off again.
constexpr float kQ8Offset = 128.f;

template <int64_t kType>
void group_dot(const uint8_t* g, int64_t blocks, const int8_t* qx, const float* dx,
               const float* sx, float* out) {
  using L = GroupLayout<kType>;
  const __m512i nibble = _mm512_set1_epi8(0xF);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, g += L::kBytes, qx += kQ8Values) {
    const uint8_t* chunks = g + L::kChunks;
    // two independent dpbusd chains (dpbusd's latency is 5 cycles)
    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
    if constexpr (kType == kQ8_0) {
      for (int s = 0; s < 8; s += 2) {
        lo = _mm512_dpbusd_epi32(lo, _mm512_loadu_si512(chunks + 64 * s),
                                 _mm512_set1_epi32(load_i32(qx + 4 * s)));
        hi = _mm512_dpbusd_epi32(hi, _mm512_loadu_si512(chunks + 64 * (s + 1)),
                                 _mm512_set1_epi32(load_i32(qx + 4 * (s + 1))));
      }
    } else {
      for (int s = 0; s < 4; ++s) {
        const __m512i packed = _mm512_loadu_si512(chunks + 64 * s);
        lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(packed, nibble),
                                 _mm512_set1_epi32(load_i32(qx + 4 * s)));
        hi = _mm512_dpbusd_epi32(hi, _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble),
                                 _mm512_set1_epi32(load_i32(qx + 16 + 4 * s)));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g)));
    const __m512 dots = _mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi));
    acc = _mm512_fmadd_ps(dots, _mm512_mul_ps(d, _mm512_set1_ps(dx[b])), acc);
    if constexpr (kType == kQ4_1) {  // + m * (dx sum qx)
      const __m512 m =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + L::kMins)));
      acc = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[b]), acc);
    } else {  // - offset * d * (dx sum qx)
      const float offset = kType == kQ4_0 ? 8.f : kQ8Offset;
      acc = _mm512_fnmadd_ps(d, _mm512_set1_ps(offset * sx[b]), acc);
    }
  }
  _mm512_storeu_ps(out, acc);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// maddubs saturates at int16: Q8_0's weights go back to signed and multiply through the sign
// trick (|w| unsigned, w's sign moved onto the activation), which keeps every pair in range.

// rows 8h..8h+7 of a group: lane j of every 32-byte half-chunk is row 8h + j
template <int64_t kType>
void half_group_dot(const uint8_t* g, int64_t blocks, const int8_t* qx, const float* dx,
                    const float* sx, int half, float* out) {
  using L = GroupLayout<kType>;
  const __m256i nibble = _mm256_set1_epi8(0xF), ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, g += L::kBytes, qx += kQ8Values) {
    const uint8_t* chunks = g + L::kChunks + 32 * half;
    __m256i dot;
    if constexpr (kType == kQ8_0) {
      dot = _mm256_setzero_si256();
      for (int s = 0; s < 8; ++s) {
        const __m256i w = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunks + 64 * s)), flip);
        const __m256i x = _mm256_set1_epi32(load_i32(qx + 4 * s));
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
      }
    } else {
      // int16 sums of 8 maddubs pairs of at most 2 * 15 * 127 each stay below 32767
      __m256i pairs = _mm256_setzero_si256();
      for (int s = 0; s < 4; ++s) {
        const __m256i packed =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunks + 64 * s));
        pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(_mm256_and_si256(packed, nibble),
                                 _mm256_set1_epi32(load_i32(qx + 4 * s))));
        pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(
            _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble),
            _mm256_set1_epi32(load_i32(qx + 16 + 4 * s))));
      }
      dot = _mm256_madd_epi16(pairs, ones);
    }
    const __m256 d =
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 16 * half)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(dx[b])), acc);
    if constexpr (kType == kQ4_1) {
      const __m256 m = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(g + L::kMins + 16 * half)));
      acc = _mm256_fmadd_ps(m, _mm256_set1_ps(sx[b]), acc);
    } else if constexpr (kType == kQ4_0) {
      acc = _mm256_fnmadd_ps(d, _mm256_set1_ps(8.f * sx[b]), acc);
    }
  }
  _mm256_storeu_ps(out + 8 * half, acc);
}

template <int64_t kType>
void group_dot(const uint8_t* g, int64_t blocks, const int8_t* qx, const float* dx,
               const float* sx, float* out) {
  half_group_dot<kType>(g, blocks, qx, dx, sx, 0, out);
  half_group_dot<kType>(g, blocks, qx, dx, sx, 1, out);
}

#else
template <int64_t kType>
void group_dot(const uint8_t* g, int64_t blocks, const int8_t* qx, const float* dx,
               const float* sx, float* out) {
  using L = GroupLayout<kType>;
  float acc[kGroupRows] = {};
  for (int64_t b = 0; b < blocks; ++b, g += L::kBytes, qx += kQ8Values) {
    const uint8_t* chunks = g + L::kChunks;
    for (int j = 0; j < kGroupRows; ++j) {
      int32_t dot = 0;
      for (int s = 0; s < L::kNumChunks; ++s) {
        for (int c = 0; c < 4; ++c) {
          const uint8_t byte = chunks[64 * s + 4 * j + c];
          if constexpr (kType == kQ8_0) {
            dot += static_cast<int8_t>(byte ^ 0x80) * qx[4 * s + c];
          } else {
            dot += (byte & 0xF) * qx[4 * s + c] + (byte >> 4) * qx[16 + 4 * s + c];
          }
        }
      }
      const float d = fp16(g + 2 * j);
      acc[j] += static_cast<float>(dot) * (d * dx[b]);
      if constexpr (kType == kQ4_1) acc[j] += fp16(g + L::kMins + 2 * j) * sx[b];
      if constexpr (kType == kQ4_0) acc[j] -= d * (8.f * sx[b]);
    }
  }
  std::copy(acc, acc + kGroupRows, out);
}
#endif

using GroupDot = void (*)(const uint8_t*, int64_t, const int8_t*, const float*, const float*,
                          float*);

GroupDot group_dot_for(int64_t type) {
  switch (type) {
    case kQ4_0: return group_dot<kQ4_0>;
    case kQ4_1: return group_dot<kQ4_1>;
    case kQ8_0: return group_dot<kQ8_0>;
    default: TORCH_CHECK(false, "gguf kernels: type ", type, " has no regrouped layout");
  }
}

int64_t header_bytes(int64_t type) { return type == kQ4_1 ? 4 : 2; }  // d (and m) per row block

}  // namespace

void interleave_rows(const uint8_t* src, uint8_t* dst, int64_t rows, int64_t row_bytes,
                     int64_t type) {
  TORCH_CHECK(interleavable(type), "gguf kernels: type ", type, " has no regrouped layout");
  const BlockFormat format = block_format(type);
  const int64_t header = header_bytes(type), chunks = (format.bytes - header) / 4;
  const uint8_t flip = type == kQ8_0 ? 0x80 : 0;
  at::parallel_for(0, rows / kGroupRows, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t b = 0; b < row_bytes / format.bytes; ++b) {
        uint8_t* out = dst + g * kGroupRows * row_bytes + b * kGroupRows * format.bytes;
        for (int64_t j = 0; j < kGroupRows; ++j) {
          const uint8_t* block = src + (g * kGroupRows + j) * row_bytes + b * format.bytes;
          for (int64_t h = 0; h < header; h += 2) {  // d, then m
            std::memcpy(out + h * kGroupRows + 2 * j, block + h, 2);
          }
          for (int64_t s = 0; s < chunks; ++s) {
            for (int64_t c = 0; c < 4; ++c) {
              out[header * kGroupRows + 64 * s + 4 * j + c] = block[header + 4 * s + c] ^ flip;
            }
          }
        }
      }
    }
  });
}

void dequantize_interleaved_row(const uint8_t* weight, int64_t row, int64_t row_bytes,
                                int64_t k_dim, int64_t type, float* y) {
  const BlockFormat format = block_format(type);
  const int64_t header = header_bytes(type), j = row % kGroupRows;
  const uint8_t* group = weight + (row - j) * row_bytes;
  for (int64_t b = 0; b < k_dim / format.values; ++b, y += format.values) {
    const uint8_t* g = group + b * kGroupRows * format.bytes;
    const uint8_t* chunks = g + header * kGroupRows + 4 * j;
    const float d = fp16(g + 2 * j);
    if (type == kQ8_0) {
      for (int s = 0; s < 8; ++s) {
        for (int c = 0; c < 4; ++c) {
          y[4 * s + c] = static_cast<float>(static_cast<int8_t>(chunks[64 * s + c] ^ 0x80)) * d;
        }
      }
      continue;
    }
    const float m = type == kQ4_1 ? fp16(g + 2 * kGroupRows + 2 * j) : 0.f;
    const int offset = type == kQ4_0 ? 8 : 0;
    for (int s = 0; s < 4; ++s) {
      for (int c = 0; c < 4; ++c) {
        const uint8_t byte = chunks[64 * s + c];
        y[4 * s + c] = static_cast<float>((byte & 0xF) - offset) * d + m;
        y[16 + 4 * s + c] = static_cast<float>((byte >> 4) - offset) * d + m;
      }
    }
  }
}

template <typename T>
void interleaved_linear(T* out, int64_t out_stride, const Q8Rows& x, int64_t m_dim,
                        const uint8_t* weight, int64_t n_dim, int64_t row_bytes, int64_t type) {
  const GroupDot dot = group_dot_for(type);
  const int64_t k_dim = x.k_dim, blocks = k_dim / kQ8Values;
  // a group's bytes (at most 16 rows x a few KiB) stay in L1 while every input row reads them
  at::parallel_for(0, n_dim / kGroupRows, 1, [&](int64_t g0, int64_t g1) {
    alignas(64) float sums[kGroupRows];
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* group = weight + g * kGroupRows * row_bytes;
      for (int64_t m = 0; m < m_dim; ++m) {
        dot(group, blocks, x.q.data() + m * k_dim, x.scale.data() + m * blocks,
            x.sum.data() + m * blocks, sums);
        T* o = out + m * out_stride + g * kGroupRows;
        for (int64_t j = 0; j < kGroupRows; ++j) vec::store_scalar(o + j, sums[j]);
      }
    }
  });
}

template void interleaved_linear<float>(float*, int64_t, const Q8Rows&, int64_t, const uint8_t*,
                                        int64_t, int64_t, int64_t);
template void interleaved_linear<vec::bf16>(vec::bf16*, int64_t, const Q8Rows&, int64_t,
                                            const uint8_t*, int64_t, int64_t, int64_t);

}  // namespace gguf
}  // namespace pagedllm
