// One SIMD vocabulary for every kernel, so each kernel is written once and built per ISA.
//
// pagedllm/ops/cpu.py compiles every .cpp in this folder once per kernel level with that level's
// flags (-mavx512f ..., -mavx2 -mfma, or none) into its own module, and loads the one the CPU
// probe picks. Which `F` a build gets follows from the flags:
//
//   AVX-512   F = __m512, 16 float lanes
//   AVX2+FMA  F = __m256,  8 float lanes
//   portable  F = float[8]; plain loops that the compiler vectorizes for whatever it targets
//
// Storage is float32 or bfloat16 (and, for KV caches, fp8 loaded only); arithmetic is always
// float32. bf16 is the top half of a float: loading shifts it up 16 bits (exact), storing
// rounds to nearest even, as c10 does.
//
// fp8 loads go through fp16, whose layout holds both fp8 kinds exactly:
//   e5m2  s eeeee mm            is fp16's top byte:        fp16 bits = byte << 8
//   e4m3  s eeee mmm (bias 7)   moved into fp16's fields:  fp16 bits = s << 15 | (rest << 7)
//         reads as the value x 2^-8 (fp16's bias is 15), subnormals included; times 256 fixes it
// and the CPU's fp16 -> float conversion (F16C, AVX-512) widens eight or sixteen at once. For
// e4m3 the byte is sign-extended to 16 bits and shifted left 7: that puts s at bit 15 and the
// rest at bits 7-13, and (for s = 1) a stray 1 at bit 14 that one AND clears.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pagedllm::vec {

using bf16 = c10::BFloat16;
using fp8e4m3 = c10::Float8_e4m3fn;
using fp8e5m2 = c10::Float8_e5m2;

// ---- scalar conversions, shared by every level -----------------------------------------------
inline float to_float(float x) { return x; }
inline float to_float(fp8e4m3 x) { return static_cast<float>(x); }
inline float to_float(fp8e5m2 x) { return static_cast<float>(x); }
inline float to_float(bf16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline void store_scalar(float* p, float value) { *p = value; }
inline void store_scalar(bf16* p, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits += 0x7FFF + ((bits >> 16) & 1);
  p->x = static_cast<uint16_t>(bits >> 16);
}
// `value` as a tensor of T holds it: bf16 rounding where the PyTorch reference rounds.
template <typename T>
inline float round_to(float value) {
  T held;
  store_scalar(&held, value);
  return to_float(held);
}

// Cephes' expf: exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2, a degree-6
// polynomial for exp(r) (relative error ~1e-7). Inputs below kExpLow give exactly 0, so masked
// scores of -inf vanish.
constexpr float kExpLow = -87.3f, kExpHigh = 88.3f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#ifdef __AVX512BF16__
constexpr const char* kLevel = "avx512_bf16";
#else
constexpr const char* kLevel = "avx512";
#endif
struct F {
  __m512 v;
};
inline F zero() { return {_mm512_setzero_ps()}; }
inline F set1(float x) { return {_mm512_set1_ps(x)}; }
inline F load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline F load(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))};
}
inline F load(const fp8e5m2* p) {
  const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm512_cvtph_ps(_mm256_slli_epi16(bytes, 8))};
}
inline F load(const fp8e4m3* p) {
  const __m256i wide = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i half = _mm256_and_si256(_mm256_slli_epi16(wide, 7), _mm256_set1_epi16(-0x4001));
  return {_mm512_mul_ps(_mm512_cvtph_ps(half), _mm512_set1_ps(256.f))};
}
inline void store(float* p, F x) { _mm512_storeu_ps(p, x.v); }
inline void store(bf16* p, F x) {
  const __m512i bits = _mm512_castps_si512(x.v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(up, 16)));
}
inline F add(F a, F b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F sub(F a, F b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F mul(F a, F b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F div(F a, F b) { return {_mm512_div_ps(a.v, b.v)}; }
inline F fma(F a, F b, F c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a * b + c
inline F max(F a, F b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F min(F a, F b) { return {_mm512_min_ps(a.v, b.v)}; }
inline float reduce_add(F a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(F a) { return _mm512_reduce_max_ps(a.v); }
inline F round_nearest(F a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline F pow2_times(F p, F n) { return {_mm512_scalef_ps(p.v, n.v)}; }  // p * 2^n
inline F zero_below(F x, F value, float low) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_set1_ps(low), _CMP_GE_OQ), value.v)};
}

#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
constexpr const char* kLevel = "avx2";
struct F {
  __m256 v;
};
inline F zero() { return {_mm256_setzero_ps()}; }
inline F set1(float x) { return {_mm256_set1_ps(x)}; }
inline F load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline F load(const bf16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))};
}
inline F load(const fp8e5m2* p) {
  const __m128i bytes = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_cvtph_ps(_mm_slli_epi16(bytes, 8))};
}
inline F load(const fp8e4m3* p) {
  const __m128i wide = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i half = _mm_and_si128(_mm_slli_epi16(wide, 7), _mm_set1_epi16(-0x4001));
  return {_mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.f))};
}
inline void store(float* p, F x) { _mm256_storeu_ps(p, x.v); }
inline void store(bf16* p, F x) {
  const __m256i bits = _mm256_castps_si256(x.v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  const __m256i halves = _mm256_srli_epi32(up, 16);  // each lane now fits 16 bits
  // packus works within 128-bit lanes: [a0..a3 a0..a3 | a4..a7 a4..a7]; gather the low quads.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(halves, halves), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline F add(F a, F b) { return {_mm256_add_ps(a.v, b.v)}; }
inline F sub(F a, F b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline F mul(F a, F b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline F div(F a, F b) { return {_mm256_div_ps(a.v, b.v)}; }
inline F fma(F a, F b, F c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline F max(F a, F b) { return {_mm256_max_ps(a.v, b.v)}; }
inline F min(F a, F b) { return {_mm256_min_ps(a.v, b.v)}; }
inline float reduce_add(F a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}
inline float reduce_max(F a) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}
inline F round_nearest(F a) {
  return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline F pow2_times(F p, F n) {  // n is a whole number in [-126, 127]: build 2^n's exponent
  const __m256i exponent = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(p.v, _mm256_castsi256_ps(exponent))};
}
inline F zero_below(F x, F value, float low) {
  return {_mm256_and_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(low), _CMP_GE_OQ), value.v)};
}

#else
constexpr int kLanes = 8;
constexpr const char* kLevel = "portable";
struct F {
  float v[kLanes];
};
template <typename Op>
inline F each(Op op) {
  F out;
  for (int i = 0; i < kLanes; ++i) out.v[i] = op(i);
  return out;
}
inline F set1(float x) { return each([&](int) { return x; }); }
inline F zero() { return set1(0.f); }
inline F load(const float* p) { return each([&](int i) { return p[i]; }); }
inline F load(const bf16* p) { return each([&](int i) { return to_float(p[i]); }); }
inline F load(const fp8e4m3* p) { return each([&](int i) { return to_float(p[i]); }); }
inline F load(const fp8e5m2* p) { return each([&](int i) { return to_float(p[i]); }); }
inline void store(float* p, F x) { std::copy(x.v, x.v + kLanes, p); }
inline void store(bf16* p, F x) {
  for (int i = 0; i < kLanes; ++i) store_scalar(p + i, x.v[i]);
}
inline F add(F a, F b) { return each([&](int i) { return a.v[i] + b.v[i]; }); }
inline F sub(F a, F b) { return each([&](int i) { return a.v[i] - b.v[i]; }); }
inline F mul(F a, F b) { return each([&](int i) { return a.v[i] * b.v[i]; }); }
inline F div(F a, F b) { return each([&](int i) { return a.v[i] / b.v[i]; }); }
inline F fma(F a, F b, F c) { return each([&](int i) { return a.v[i] * b.v[i] + c.v[i]; }); }
inline F max(F a, F b) { return each([&](int i) { return std::max(a.v[i], b.v[i]); }); }
inline F min(F a, F b) { return each([&](int i) { return std::min(a.v[i], b.v[i]); }); }
inline float reduce_add(F a) {
  float sum = 0.f;
  for (float x : a.v) sum += x;
  return sum;
}
inline float reduce_max(F a) { return *std::max_element(a.v, a.v + kLanes); }
inline F round_nearest(F a) { return each([&](int i) { return std::nearbyint(a.v[i]); }); }
inline F pow2_times(F p, F n) {
  return each([&](int i) { return std::ldexp(p.v[i], static_cast<int>(n.v[i])); });
}
inline F zero_below(F x, F value, float low) {
  return each([&](int i) { return x.v[i] >= low ? value.v[i] : 0.f; });
}
#endif

// exp of every lane (see kExpPoly); 0 below kExpLow, clamped above kExpHigh.
inline F exp(F x) {
  const F clamped = max(min(x, set1(kExpHigh)), set1(kExpLow));
  const F n = round_nearest(mul(clamped, set1(kLog2e)));
  F r = fma(n, set1(-kLn2Hi), clamped);
  r = fma(n, set1(-kLn2Lo), r);
  F p = set1(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = fma(p, r, set1(kExpPoly[i]));
  p = fma(p, mul(r, r), add(r, set1(1.f)));
  return zero_below(x, pow2_times(p, n), kExpLow);
}

// Every lane as a tensor of T holds it (see the scalar round_to).
template <typename T>
inline F round_to(F x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    T held[kLanes];
    store(held, x);
    return load(held);
  }
}

// Scalar tails and reductions over arrays of any length.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  F acc = zero();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = fma(load(a + i), load(b + i), acc);
  float sum = reduce_add(acc);
  for (; i < n; ++i) sum += a[i] * to_float(b[i]);
  return sum;
}

// out[i] += w * x[i]
template <typename T>
inline void axpy(float* out, float w, const T* x, int64_t n) {
  const F wv = set1(w);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(out + i, fma(wv, load(x + i), load(out + i)));
  for (; i < n; ++i) out[i] += w * to_float(x[i]);
}

// dst[i] = src[i] as float (or back), any length
template <typename S, typename D>
inline void convert(D* dst, const S* src, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load(src + i));
  for (; i < n; ++i) store_scalar(dst + i, to_float(src[i]));
}

}  // namespace pagedllm::vec
