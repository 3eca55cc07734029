// Scalar math for the CPU kernels, written so that GCC vectorises the loops that call it.
//
// Every helper is branch-free and always inlined: inside a `#pragma omp simd` loop the compiler
// turns it into SSE2/AVX2/AVX-512 code, depending on which clone of the calling kernel runs.
// Build with -fno-trapping-math, otherwise GCC keeps the selects below as branches and the
// loops stay scalar. No torch headers here: the kernels compile without them.
#pragma once

#include <cstdint>

#define MX_INLINE inline __attribute__((always_inline))

// Runtime dispatch without -march flags: each kernel is compiled for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2+FMA) and the baseline, and the loader picks one per machine (ifunc).
// Elsewhere (aarch64, clang, old GCC) the kernels are compiled once for the baseline.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12 && !defined(MX_NO_CLONES)
#define MX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MX_CLONES
#endif

namespace mx {

MX_INLINE float bits_to_f32(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

MX_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}

// Storage types. All arithmetic is fp32; these load and store one element.
struct F32 {
  using storage = float;
  static MX_INLINE float load(float v) { return v; }
  static MX_INLINE float store(float f) { return f; }
};

struct BF16 {
  using storage = uint16_t;
  static MX_INLINE float load(uint16_t v) { return bits_to_f32(uint32_t(v) << 16); }
  // Round to nearest even; NaN stays a (quiet) NaN, as c10::BFloat16 does.
  static MX_INLINE uint16_t store(float f) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(rounded);
  }
};

// IEEE half conversions without F16C (same bit tricks as c10/util/Half.h), so they vectorise
// in every clone and give the same results as torch's conversions.
struct F16 {
  using storage = uint16_t;
  static MX_INLINE float load(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t mag = two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized);
    return bits_to_f32(sign | mag);
  }
  static MX_INLINE uint16_t store(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

constexpr float kNegInf = -__builtin_huge_valf();

// exp(x) to about 1 ulp (Cephes polynomial); 0 below -87.3 (where exp is denormal or 0,
// including -inf), clamped at the top (callers pass x <= 88).
MX_INLINE float exp_f32(float x) {
  const float lo = -87.33654f, hi = 88.37626f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  // Round x/ln2 to nearest with the 1.5*2^23 trick; the integer sits in the low mantissa bits.
  const float magic = 12582912.0f;
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  const int32_t e = int32_t(f32_to_bits(t) - f32_to_bits(magic));
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r * r + r + 1.0f) * bits_to_f32(uint32_t(e + 127) << 23);
  return x < lo ? 0.0f : y;
}

// tanh: odd polynomial near 0 (no cancellation), 1 - 2/(exp(2|x|)+1) elsewhere.
MX_INLINE float tanh_f32(float x) {
  const float ax = __builtin_fabsf(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = x + x * z * p;
  const float e = exp_f32(2.0f * (ax < 10.0f ? ax : 10.0f));
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;
}

// erf, Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), as torch's vectorised erf.
MX_INLINE float erf_f32(float x) {
  const float ax = __builtin_fabsf(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * exp_f32(-ax * ax);
  return x < 0.0f ? -y : y;
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoeff = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// GeLU with the tanh approximation (BLOOM / Megatron bias_gelu) and its derivative.
MX_INLINE float gelu_tanh(float x) {
  return 0.5f * x * (1.0f + tanh_f32(kSqrt2OverPi * x * (1.0f + kGeluCoeff * x * x)));
}

MX_INLINE float gelu_tanh_grad(float x) {
  const float t = tanh_f32(kSqrt2OverPi * x * (1.0f + kGeluCoeff * x * x));
  const float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluCoeff * x * x);
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
}

// Exact GeLU, x * Phi(x).
MX_INLINE float gelu_erf(float x) { return 0.5f * x * (1.0f + erf_f32(x * kInvSqrt2)); }

MX_INLINE float gelu_erf_grad(float x) {
  return 0.5f * (1.0f + erf_f32(x * kInvSqrt2)) + x * kInvSqrt2Pi * exp_f32(-0.5f * x * x);
}

}  // namespace mx
