// CPU kernels of the fused ops (see cpu_kernels.h). Each row is processed in a few passes over
// an fp32 scratch row that stays in L1/L2, so main memory is read and written once per pass of
// the op (the eager reference reads and writes every intermediate tensor instead).
#include "cpu_kernels.h"

#include <cmath>
#include <cstring>

#include "cpu_math.h"

namespace mx {
namespace {

MX_INLINE int32_t causal_limit(const int64_t i, const int64_t sq, const int64_t sk, bool causal) {
  if (!causal) return int32_t(sk);
  const int64_t limit = i + sk - sq + 1;  // bottom-right aligned: the last query sees every key
  return int32_t(limit < 0 ? 0 : (limit > sk ? sk : limit));
}

template <class IO>
MX_INLINE void zero_tail(typename IO::storage* out, int64_t from, int64_t to) {
  if (to > from) std::memset(out + from, 0, size_t(to - from) * sizeof(typename IO::storage));
}

template <class IO>
MX_INLINE void softmax_fwd_impl(const SoftmaxArgs& a, int64_t r0, int64_t r1, float* buf) {
  using T = typename IO::storage;
  const T* __restrict x = static_cast<const T*>(a.x);
  T* __restrict y = static_cast<T*>(a.y);
  const int64_t sk = a.sk;
  const float scale = a.scale;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t i = row % a.sq, bh = row / a.sq;
    const T* __restrict xr = x + row * sk;
    T* __restrict yr = y + row * sk;
    const int32_t limit = causal_limit(i, a.sq, sk, a.causal);
    const float slope = a.slopes ? a.slopes[bh % a.np] : 0.0f;
    // Pass 1: logits (scale, ALiBi bias, masks applied on the fly), row max.
    float m = kNegInf;
    if (a.pad) {
      const uint8_t* __restrict pm = a.pad + (bh / a.np) * a.pad_b + i * a.pad_q;
      // The mask becomes an additive 0/-inf row first: GCC vectorises a select on bytes inside
      // the max-reduction loop with 2-wide vectors (10x slower), but both of these at full width.
#pragma omp simd
      for (int32_t j = 0; j < limit; ++j) buf[j] = pm[j] ? kNegInf : 0.0f;
#pragma omp simd reduction(max : m)
      for (int32_t j = 0; j < limit; ++j) {
        const float v = IO::load(xr[j]) * scale + slope * float(j) + buf[j];
        buf[j] = v;
        m = v > m ? v : m;
      }
    } else {
#pragma omp simd reduction(max : m)
      for (int32_t j = 0; j < limit; ++j) {
        const float v = IO::load(xr[j]) * scale + slope * float(j);
        buf[j] = v;
        m = v > m ? v : m;
      }
    }
    if (m == kNegInf) {  // every key masked (or sk == 0): the row is all zeros, not NaN
      zero_tail<IO>(yr, 0, sk);
      continue;
    }
    // Pass 2: exponentials and their sum (exp_f32(-inf) is 0, so masked keys drop out).
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int32_t j = 0; j < limit; ++j) {
      const float e = exp_f32(buf[j] - m);
      buf[j] = e;
      sum += e;
    }
    // Pass 3: normalise and store; keys beyond the causal limit are never read, only zeroed.
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int32_t j = 0; j < limit; ++j) yr[j] = IO::store(buf[j] * inv);
    zero_tail<IO>(yr, limit, sk);
  }
}

template <class IO>
MX_INLINE void softmax_bwd_impl(const SoftmaxBwdArgs& a, int64_t r0, int64_t r1) {
  using T = typename IO::storage;
  const T* __restrict dy = static_cast<const T*>(a.dy);
  const T* __restrict y = static_cast<const T*>(a.y);
  T* __restrict dx = static_cast<T*>(a.dx);
  const int64_t sk = a.sk;
  const float scale = a.scale;
  for (int64_t row = r0; row < r1; ++row) {
    const T* __restrict dyr = dy + row * sk;
    const T* __restrict yr = y + row * sk;
    T* __restrict dxr = dx + row * sk;
    const int32_t limit = causal_limit(row % a.sq, a.sq, sk, a.causal);
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int32_t j = 0; j < limit; ++j) dot += IO::load(dyr[j]) * IO::load(yr[j]);
#pragma omp simd
    for (int32_t j = 0; j < limit; ++j) {
      dxr[j] = IO::store(scale * IO::load(yr[j]) * (IO::load(dyr[j]) - dot));
    }
    zero_tail<IO>(dxr, limit, sk);  // y is 0 there, so is the gradient
  }
}

template <class IO>
MX_INLINE void bias_gelu_fwd_impl(const BiasGeluArgs& a, int64_t r0, int64_t r1) {
  using T = typename IO::storage;
  const T* __restrict x = static_cast<const T*>(a.x);
  T* __restrict y = static_cast<T*>(a.out);
  const float* __restrict bias = a.bias;
  const int64_t h = a.h;
  for (int64_t row = r0; row < r1; ++row) {
    const T* __restrict xr = x + row * h;
    T* __restrict yr = y + row * h;
    if (a.tanh) {
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) yr[j] = IO::store(gelu_tanh(IO::load(xr[j]) + bias[j]));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) yr[j] = IO::store(gelu_erf(IO::load(xr[j]) + bias[j]));
    }
  }
}

template <class IO>
MX_INLINE void bias_gelu_bwd_impl(const BiasGeluArgs& a, int64_t r0, int64_t r1) {
  using T = typename IO::storage;
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict dy = static_cast<const T*>(a.dy);
  T* __restrict dx = static_cast<T*>(a.out);
  const float* __restrict bias = a.bias;
  float* __restrict dbias = a.dbias;
  const int64_t h = a.h;
  for (int64_t row = r0; row < r1; ++row) {
    const T* __restrict xr = x + row * h;
    const T* __restrict dyr = dy + row * h;
    T* __restrict dxr = dx + row * h;
    if (a.tanh) {
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) {
        const float d = IO::load(dyr[j]) * gelu_tanh_grad(IO::load(xr[j]) + bias[j]);
        dxr[j] = IO::store(d);
        dbias[j] += d;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) {
        const float d = IO::load(dyr[j]) * gelu_erf_grad(IO::load(xr[j]) + bias[j]);
        dxr[j] = IO::store(d);
        dbias[j] += d;
      }
    }
  }
}

template <class IO>
MX_INLINE void layer_norm_fwd_impl(const NormArgs& a, int64_t r0, int64_t r1, float* buf) {
  using T = typename IO::storage;
  const T* __restrict x = static_cast<const T*>(a.x);
  T* __restrict y = static_cast<T*>(a.out);
  const float* __restrict w = a.w;
  const float* __restrict b = a.b;
  const int64_t h = a.h;
  for (int64_t row = r0; row < r1; ++row) {
    const T* __restrict xr = x + row * h;
    T* __restrict yr = y + row * h;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < h; ++j) {
      buf[j] = IO::load(xr[j]);
      sum += buf[j];
    }
    const float mean = sum / float(h);
    float var = 0.0f;  // two passes over the cached row: no E[x^2] - E[x]^2 cancellation
#pragma omp simd reduction(+ : var)
    for (int64_t j = 0; j < h; ++j) var += (buf[j] - mean) * (buf[j] - mean);
    const float rstd = 1.0f / std::sqrt(var / float(h) + a.eps);
    if (b) {
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) yr[j] = IO::store((buf[j] - mean) * rstd * w[j] + b[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) yr[j] = IO::store((buf[j] - mean) * rstd * w[j]);
    }
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

template <class IO>
MX_INLINE void layer_norm_bwd_impl(const NormArgs& a, int64_t r0, int64_t r1, float* buf) {
  using T = typename IO::storage;
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict dy = static_cast<const T*>(a.dy);
  T* __restrict dx = static_cast<T*>(a.out);
  const float* __restrict w = a.w;
  float* __restrict dw = a.dw;
  float* __restrict db = a.db;
  const int64_t h = a.h;
  for (int64_t row = r0; row < r1; ++row) {
    const T* __restrict xr = x + row * h;
    const T* __restrict dyr = dy + row * h;
    T* __restrict dxr = dx + row * h;
    const float mean = a.mean[row], rstd = a.rstd[row];
    float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t j = 0; j < h; ++j) {
      const float d = IO::load(dyr[j]);
      const float xhat = (IO::load(xr[j]) - mean) * rstd;
      const float g = d * w[j];
      buf[j] = xhat;
      sum_g += g;
      sum_gx += g * xhat;
      dw[j] += d * xhat;
      db[j] += d;
    }
    const float c_mean = sum_g / float(h), c_xhat = sum_gx / float(h);
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      dxr[j] = IO::store(rstd * (IO::load(dyr[j]) * w[j] - c_mean - buf[j] * c_xhat));
    }
  }
}

template <class IO>
MX_INLINE void rms_norm_fwd_impl(const NormArgs& a, int64_t r0, int64_t r1, float* buf) {
  using T = typename IO::storage;
  const T* __restrict x = static_cast<const T*>(a.x);
  T* __restrict y = static_cast<T*>(a.out);
  const float* __restrict w = a.w;
  const int64_t h = a.h;
  for (int64_t row = r0; row < r1; ++row) {
    const T* __restrict xr = x + row * h;
    T* __restrict yr = y + row * h;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < h; ++j) {
      buf[j] = IO::load(xr[j]);
      ss += buf[j] * buf[j];
    }
    const float rstd = 1.0f / std::sqrt(ss / float(h) + a.eps);
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) yr[j] = IO::store(buf[j] * rstd * w[j]);
    a.rstd[row] = rstd;
  }
}

template <class IO>
MX_INLINE void rms_norm_bwd_impl(const NormArgs& a, int64_t r0, int64_t r1, float* buf) {
  using T = typename IO::storage;
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict dy = static_cast<const T*>(a.dy);
  T* __restrict dx = static_cast<T*>(a.out);
  const float* __restrict w = a.w;
  float* __restrict dw = a.dw;
  const int64_t h = a.h;
  for (int64_t row = r0; row < r1; ++row) {
    const T* __restrict xr = x + row * h;
    const T* __restrict dyr = dy + row * h;
    T* __restrict dxr = dx + row * h;
    const float rstd = a.rstd[row];
    float sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_gx)
    for (int64_t j = 0; j < h; ++j) {
      const float d = IO::load(dyr[j]);
      const float xhat = IO::load(xr[j]) * rstd;
      buf[j] = xhat;
      sum_gx += d * w[j] * xhat;
      dw[j] += d * xhat;
    }
    const float c_xhat = sum_gx / float(h);
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      dxr[j] = IO::store(rstd * (IO::load(dyr[j]) * w[j] - buf[j] * c_xhat));
    }
  }
}

// Rotate-half: y1 = x1*c1 - x2*s1, y2 = x2*c2 + x1*s2 on the first rot features; the rest is
// copied. The backward is the transpose: dx1 = g1*c1 + g2*s2, dx2 = g2*c2 - g1*s1.
template <class IO>
MX_INLINE void rotary_impl(const RotaryArgs& a, int64_t r0, int64_t r1) {
  using T = typename IO::storage;
  const T* __restrict x = static_cast<const T*>(a.x);
  T* __restrict y = static_cast<T*>(a.out);
  const int64_t hn = a.hn, rot = a.rot, half = a.rot / 2;
  for (int64_t row = r0; row < r1; ++row) {
    const T* __restrict xr = x + row * hn;
    T* __restrict yr = y + row * hn;
    const int64_t pos = row / a.rows_per_pos;
    const float* __restrict c = a.cos + pos * rot;
    const float* __restrict s = a.sin + pos * rot;
    if (!a.backward) {
#pragma omp simd
      for (int64_t d = 0; d < half; ++d) {
        const float x1 = IO::load(xr[d]), x2 = IO::load(xr[d + half]);
        yr[d] = IO::store(x1 * c[d] - x2 * s[d]);
        yr[d + half] = IO::store(x2 * c[d + half] + x1 * s[d + half]);
      }
    } else {
#pragma omp simd
      for (int64_t d = 0; d < half; ++d) {
        const float g1 = IO::load(xr[d]), g2 = IO::load(xr[d + half]);
        yr[d] = IO::store(g1 * c[d] + g2 * s[d + half]);
        yr[d + half] = IO::store(g2 * c[d + half] - g1 * s[d]);
      }
    }
    if (hn > rot) std::memcpy(yr + rot, xr + rot, size_t(hn - rot) * sizeof(T));
  }
}

}  // namespace

#define MX_DEFINE_KERNELS(IO, sfx)                                                          \
  MX_CLONES void softmax_fwd_##sfx(const SoftmaxArgs& a, int64_t r0, int64_t r1, float* buf) { \
    softmax_fwd_impl<IO>(a, r0, r1, buf);                                                   \
  }                                                                                         \
  MX_CLONES void softmax_bwd_##sfx(const SoftmaxBwdArgs& a, int64_t r0, int64_t r1) {      \
    softmax_bwd_impl<IO>(a, r0, r1);                                                        \
  }                                                                                         \
  MX_CLONES void bias_gelu_fwd_##sfx(const BiasGeluArgs& a, int64_t r0, int64_t r1) {      \
    bias_gelu_fwd_impl<IO>(a, r0, r1);                                                      \
  }                                                                                         \
  MX_CLONES void bias_gelu_bwd_##sfx(const BiasGeluArgs& a, int64_t r0, int64_t r1) {      \
    bias_gelu_bwd_impl<IO>(a, r0, r1);                                                      \
  }                                                                                         \
  MX_CLONES void layer_norm_fwd_##sfx(const NormArgs& a, int64_t r0, int64_t r1, float* buf) { \
    layer_norm_fwd_impl<IO>(a, r0, r1, buf);                                                \
  }                                                                                         \
  MX_CLONES void layer_norm_bwd_##sfx(const NormArgs& a, int64_t r0, int64_t r1, float* buf) { \
    layer_norm_bwd_impl<IO>(a, r0, r1, buf);                                                \
  }                                                                                         \
  MX_CLONES void rms_norm_fwd_##sfx(const NormArgs& a, int64_t r0, int64_t r1, float* buf) { \
    rms_norm_fwd_impl<IO>(a, r0, r1, buf);                                                  \
  }                                                                                         \
  MX_CLONES void rms_norm_bwd_##sfx(const NormArgs& a, int64_t r0, int64_t r1, float* buf) { \
    rms_norm_bwd_impl<IO>(a, r0, r1, buf);                                                  \
  }                                                                                         \
  MX_CLONES void rotary_##sfx(const RotaryArgs& a, int64_t r0, int64_t r1) {                \
    rotary_impl<IO>(a, r0, r1);                                                             \
  }

MX_DEFINE_KERNELS(F32, f32)
MX_DEFINE_KERNELS(BF16, bf16)
MX_DEFINE_KERNELS(F16, f16)

}  // namespace mx
