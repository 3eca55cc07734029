// CPU kernels of the fused ops: plain C++, no torch headers.
//
// Each kernel works on a range of rows [r0, r1) of a contiguous tensor so that the caller
// (ops_cpu.cpp) can split rows over threads with at::parallel_for. Data pointers are untyped;
// the suffix names the storage type (f32, bf16, f16). All arithmetic is fp32.
#pragma once

#include <cstdint>

namespace mx {

// Scores [b, np, sq, sk] -> probabilities of the same shape.
struct SoftmaxArgs {
  const void* x = nullptr;
  void* y = nullptr;
  const float* slopes = nullptr;  // [np] or null: bias slopes[h] * j on key position j
  const uint8_t* pad = nullptr;   // bool, nonzero = masked; row (b, i) at b*pad_b + i*pad_q
  int64_t np = 1, sq = 1, sk = 1;
  int64_t pad_b = 0, pad_q = 0;
  float scale = 1.0f;
  bool causal = true;  // key j is visible from query i iff j <= i + (sk - sq)
};

// Backward: dx = scale * y * (dy - sum(dy * y)), zero where the causal mask hides the key.
struct SoftmaxBwdArgs {
  const void* dy = nullptr;
  const void* y = nullptr;
  void* dx = nullptr;
  int64_t sq = 1, sk = 1;
  float scale = 1.0f;
  bool causal = true;
};

struct BiasGeluArgs {
  const void* x = nullptr;   // [rows, h]
  const float* bias = nullptr;  // [h]
  const void* dy = nullptr;  // backward only
  void* out = nullptr;       // y (forward) or dx (backward)
  float* dbias = nullptr;    // backward: this thread's [h] accumulator
  int64_t h = 1;
  bool tanh = true;
};

struct NormArgs {
  const void* x = nullptr;   // [rows, h]
  const float* w = nullptr;  // [h]
  const float* b = nullptr;  // [h] or null (LayerNorm only)
  const void* dy = nullptr;  // backward only
  void* out = nullptr;       // y (forward) or dx (backward)
  float* mean = nullptr;     // [rows] (LayerNorm)
  float* rstd = nullptr;     // [rows]
  float* dw = nullptr;       // backward: this thread's [h] accumulators
  float* db = nullptr;
  int64_t h = 1;
  float eps = 1e-5f;
};

// x [s, b, np, hn] as rows of hn; cos/sin [s, rot]; rows_per_pos = b * np.
struct RotaryArgs {
  const void* x = nullptr;
  void* out = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t rows_per_pos = 1, hn = 1, rot = 0;
  bool backward = false;
};

#define MX_DECLARE_KERNELS(sfx)                                                                 \
  void softmax_fwd_##sfx(const SoftmaxArgs& a, int64_t r0, int64_t r1, float* buf);             \
  void softmax_bwd_##sfx(const SoftmaxBwdArgs& a, int64_t r0, int64_t r1);                      \
  void bias_gelu_fwd_##sfx(const BiasGeluArgs& a, int64_t r0, int64_t r1);                      \
  void bias_gelu_bwd_##sfx(const BiasGeluArgs& a, int64_t r0, int64_t r1);                      \
  void layer_norm_fwd_##sfx(const NormArgs& a, int64_t r0, int64_t r1, float* buf);             \
  void layer_norm_bwd_##sfx(const NormArgs& a, int64_t r0, int64_t r1, float* buf);             \
  void rms_norm_fwd_##sfx(const NormArgs& a, int64_t r0, int64_t r1, float* buf);               \
  void rms_norm_bwd_##sfx(const NormArgs& a, int64_t r0, int64_t r1, float* buf);               \
  void rotary_##sfx(const RotaryArgs& a, int64_t r0, int64_t r1);

MX_DECLARE_KERNELS(f32)
MX_DECLARE_KERNELS(bf16)
MX_DECLARE_KERNELS(f16)

#undef MX_DECLARE_KERNELS

}  // namespace mx
