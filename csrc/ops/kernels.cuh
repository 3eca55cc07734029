// GPU kernels of the fused ops: CUDA source with no torch headers, so that it compiles on its
// own (tools/compile_check.py) and hipify turns it into HIP for MI250X (gfx90a, wavefront 64).
//
// Portability rules kept here: half and bfloat16 travel as 16-bit storage structs converted by
// hand or through cuda_fp16.h names that hipify maps (no cuda_bf16.h: Debian's ROCm 5.2 has no
// hip_bf16.h); warp shuffles go through shfl_xor() and the warp size is MX_WARP_SIZE (64 on
// AMD); block sizes are multiples of 64. All arithmetic is fp32.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIP_PLATFORM_HCC__)
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define MX_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#else
#define MX_WARP_SIZE 64
#endif
#define MX_SHFL_XOR(v, mask) __shfl_xor((v), (mask))
#else
#define MX_WARP_SIZE 32
#define MX_SHFL_XOR(v, mask) __shfl_xor_sync(0xffffffffu, (v), (mask))
#endif

namespace mx {
namespace gpu {

constexpr int kMaxWarps = 1024 / 32;
constexpr float kNegInf = -__builtin_huge_valf();

struct bf16_t {
  unsigned short bits;
};
struct fp16_t {
  unsigned short bits;
};

template <class T>
struct IO;

template <>
struct IO<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float f) { return f; }
};

template <>
struct IO<bf16_t> {
  static __device__ __forceinline__ float load(bf16_t v) {
    return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
  }
  // Round to nearest even, NaN kept quiet: the same bits as torch's bfloat16 conversion.
  static __device__ __forceinline__ bf16_t store(float f) {
    const unsigned int u = __float_as_uint(f);
    bf16_t r;
    r.bits = (u & 0x7FFFFFFFu) > 0x7F800000u
                 ? static_cast<unsigned short>(0x7FC0)
                 : static_cast<unsigned short>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return r;
  }
};

template <>
struct IO<fp16_t> {
  static __device__ __forceinline__ float load(fp16_t v) {
    return __half2float(__ushort_as_half(v.bits));
  }
  static __device__ __forceinline__ fp16_t store(float f) {
    fp16_t r;
    r.bits = __half_as_ushort(__float2half_rn(f));
    return r;
  }
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = MX_WARP_SIZE / 2; offset > 0; offset >>= 1) v += MX_SHFL_XOR(v, offset);
  return v;
}

// Sum over the block, returned to every thread. smem holds kMaxWarps floats; the leading
// barrier lets callers reuse smem back to back.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x % MX_WARP_SIZE, warp = threadIdx.x / MX_WARP_SIZE;
  const int num_warps = (blockDim.x + MX_WARP_SIZE - 1) / MX_WARP_SIZE;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < num_warps; ++w) total += smem[w];
  return total;
}

// Merge two (max, sum of exp(v - max)) pairs of an online softmax.
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  const float a = m == kNegInf ? 0.0f : s * __expf(m - mn);
  const float b = m2 == kNegInf ? 0.0f : s2 * __expf(m2 - mn);
  m = mn;
  s = a + b;
}

__device__ __forceinline__ void block_max_sum(float& m, float& s, float* smem_m, float* smem_s) {
  const int lane = threadIdx.x % MX_WARP_SIZE, warp = threadIdx.x / MX_WARP_SIZE;
  const int num_warps = (blockDim.x + MX_WARP_SIZE - 1) / MX_WARP_SIZE;
  for (int offset = MX_WARP_SIZE / 2; offset > 0; offset >>= 1) {
    const float m2 = MX_SHFL_XOR(m, offset), s2 = MX_SHFL_XOR(s, offset);
    merge_max_sum(m, s, m2, s2);
  }
  __syncthreads();
  if (lane == 0) {
    smem_m[warp] = m;
    smem_s[warp] = s;
  }
  __syncthreads();
  m = kNegInf;
  s = 0.0f;
  for (int w = 0; w < num_warps; ++w) merge_max_sum(m, s, smem_m[w], smem_s[w]);
}

__device__ __forceinline__ int64_t causal_limit(int64_t i, int64_t sq, int64_t sk, bool causal) {
  if (!causal) return sk;
  const int64_t limit = i + sk - sq + 1;  // bottom-right aligned, as the CPU kernel
  return limit < 0 ? 0 : (limit > sk ? sk : limit);
}

// One block per row of [b, np, sq, sk]: pass 1 an online max/sum, pass 2 normalise and store.
// Masks and the ALiBi bias are computed from indices, never read from memory (except the
// padding mask itself).
template <class T>
__global__ void softmax_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                   const float* __restrict__ slopes,
                                   const unsigned char* __restrict__ pad, int64_t rows,
                                   int64_t np, int64_t sq, int64_t sk, int64_t pad_b,
                                   int64_t pad_q, float scale, bool causal) {
  __shared__ float smem_m[kMaxWarps], smem_s[kMaxWarps];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t i = row % sq, bh = row / sq;
    const float slope = slopes ? slopes[bh % np] : 0.0f;
    const unsigned char* pm = pad ? pad + (bh / np) * pad_b + i * pad_q : nullptr;
    const int64_t limit = causal_limit(i, sq, sk, causal);
    const T* xr = x + row * sk;
    T* yr = y + row * sk;
    float m = kNegInf, s = 0.0f;
    for (int64_t j = threadIdx.x; j < limit; j += blockDim.x) {
      if (pm && pm[j]) continue;
      const float v = IO<T>::load(xr[j]) * scale + slope * static_cast<float>(j);
      if (v > m) {
        s = s * __expf(m - v) + 1.0f;
        m = v;
      } else {
        s += __expf(v - m);
      }
    }
    block_max_sum(m, s, smem_m, smem_s);
    const bool dead = m == kNegInf;  // every key masked: a row of zeros
    const float inv = dead ? 0.0f : 1.0f / s;
    for (int64_t j = threadIdx.x; j < sk; j += blockDim.x) {
      float p = 0.0f;
      if (!dead && j < limit && !(pm && pm[j])) {
        p = __expf(IO<T>::load(xr[j]) * scale + slope * static_cast<float>(j) - m) * inv;
      }
      yr[j] = IO<T>::store(p);
    }
  }
}

template <class T>
__global__ void softmax_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                   T* __restrict__ dx, int64_t rows, int64_t sq, int64_t sk,
                                   float scale, bool causal) {
  __shared__ float smem[kMaxWarps];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t limit = causal_limit(row % sq, sq, sk, causal);
    const T* dyr = dy + row * sk;
    const T* yr = y + row * sk;
    T* dxr = dx + row * sk;
    float dot = 0.0f;
    for (int64_t j = threadIdx.x; j < limit; j += blockDim.x) {
      dot += IO<T>::load(dyr[j]) * IO<T>::load(yr[j]);
    }
    dot = block_sum(dot, smem);
    for (int64_t j = threadIdx.x; j < sk; j += blockDim.x) {
      float g = 0.0f;
      if (j < limit) g = scale * IO<T>::load(yr[j]) * (IO<T>::load(dyr[j]) - dot);
      dxr[j] = IO<T>::store(g);
    }
  }
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoeff = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

__device__ __forceinline__ float gelu(float x, bool tanh_approx) {
  if (tanh_approx) {
    return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * x * (1.0f + kGeluCoeff * x * x)));
  }
  return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
}

__device__ __forceinline__ float gelu_grad(float x, bool tanh_approx) {
  if (tanh_approx) {
    const float t = tanhf(kSqrt2OverPi * x * (1.0f + kGeluCoeff * x * x));
    const float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluCoeff * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
  }
  return 0.5f * (1.0f + erff(x * kInvSqrt2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}

template <class T>
__global__ void bias_gelu_fwd_kernel(const T* __restrict__ x, const float* __restrict__ bias,
                                     T* __restrict__ y, int64_t n, int64_t h, bool tanh_approx) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    y[k] = IO<T>::store(gelu(IO<T>::load(x[k]) + bias[k % h], tanh_approx));
  }
}

// Column reductions (bias, weight gradients) in two steps: blocks of kColTile columns by
// kRowLanes row lanes write one partial sum per (row chunk, column); column_sum_kernel adds the
// chunks. No atomics, so results are deterministic.
constexpr int kColTile = 32;
constexpr int kRowLanes = 8;

template <class T>
__global__ void bias_gelu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                     const float* __restrict__ bias, T* __restrict__ dx,
                                     float* __restrict__ partial, int64_t rows, int64_t h,
                                     int64_t rows_per_chunk, bool tanh_approx) {
  __shared__ float acc[kRowLanes][kColTile + 1];
  const int64_t c = blockIdx.x * int64_t(kColTile) + threadIdx.x;
  const int64_t r0 = blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float sum = 0.0f;
  if (c < h) {
    const float b = bias[c];
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) {
      const int64_t k = r * h + c;
      const float d = IO<T>::load(dy[k]) * gelu_grad(IO<T>::load(x[k]) + b, tanh_approx);
      dx[k] = IO<T>::store(d);
      sum += d;
    }
  }
  acc[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < h) {
    float total = 0.0f;
    for (int k = 0; k < kRowLanes; ++k) total += acc[k][threadIdx.x];
    partial[blockIdx.y * h + c] = total;
  }
}

// out[q * h + c] = sum over chunks of partial[(q * chunks + chunk) * h + c].
__global__ void column_sum_kernel(const float* __restrict__ partial, float* __restrict__ out,
                                  int64_t chunks, int64_t h) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t q = blockIdx.y;
  if (c >= h) return;
  const float* p = partial + q * chunks * h + c;
  float total = 0.0f;
  for (int64_t k = 0; k < chunks; ++k) total += p[k * h];
  out[q * h + c] = total;
}

// One block per row. The row is read three times (mean, variance, output); the later reads
// hit L1/L2. Two-pass variance, no E[x^2] - E[x]^2 cancellation.
template <class T>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                      const float* __restrict__ b, T* __restrict__ y,
                                      float* __restrict__ mean, float* __restrict__ rstd,
                                      int64_t rows, int64_t h, float eps) {
  __shared__ float smem[kMaxWarps];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * h;
    T* yr = y + row * h;
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) s += IO<T>::load(xr[j]);
    const float mu = block_sum(s, smem) / static_cast<float>(h);
    float v = 0.0f;
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      const float d = IO<T>::load(xr[j]) - mu;
      v += d * d;
    }
    const float r = rsqrtf(block_sum(v, smem) / static_cast<float>(h) + eps);
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      const float o = (IO<T>::load(xr[j]) - mu) * r * w[j] + (b ? b[j] : 0.0f);
      yr[j] = IO<T>::store(o);
    }
    if (threadIdx.x == 0) {
      mean[row] = mu;
      rstd[row] = r;
    }
  }
}

template <class T>
__global__ void layer_norm_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                         const float* __restrict__ w,
                                         const float* __restrict__ mean,
                                         const float* __restrict__ rstd, T* __restrict__ dx,
                                         int64_t rows, int64_t h) {
  __shared__ float smem[kMaxWarps];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * h;
    const T* dyr = dy + row * h;
    T* dxr = dx + row * h;
    const float mu = mean[row], r = rstd[row];
    float sg = 0.0f, sgx = 0.0f;
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      const float g = IO<T>::load(dyr[j]) * w[j];
      sg += g;
      sgx += g * (IO<T>::load(xr[j]) - mu) * r;
    }
    const float c_mean = block_sum(sg, smem) / static_cast<float>(h);
    const float c_xhat = block_sum(sgx, smem) / static_cast<float>(h);
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      const float xhat = (IO<T>::load(xr[j]) - mu) * r;
      dxr[j] = IO<T>::store(r * (IO<T>::load(dyr[j]) * w[j] - c_mean - xhat * c_xhat));
    }
  }
}

// Partial sums of dy * xhat (and dy when with_bias) per (row chunk, column); mean may be null
// (RMSNorm).
template <class T>
__global__ void norm_bwd_params_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                       const float* __restrict__ mean,
                                       const float* __restrict__ rstd,
                                       float* __restrict__ partial, int64_t rows, int64_t h,
                                       int64_t chunks, int64_t rows_per_chunk, bool with_bias) {
  __shared__ float acc_w[kRowLanes][kColTile + 1];
  __shared__ float acc_b[kRowLanes][kColTile + 1];
  const int64_t c = blockIdx.x * int64_t(kColTile) + threadIdx.x;
  const int64_t r0 = blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float sw = 0.0f, sb = 0.0f;
  if (c < h) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) {
      const int64_t k = r * h + c;
      const float d = IO<T>::load(dy[k]);
      const float xhat = (IO<T>::load(x[k]) - (mean ? mean[r] : 0.0f)) * rstd[r];
      sw += d * xhat;
      sb += d;
    }
  }
  acc_w[threadIdx.y][threadIdx.x] = sw;
  acc_b[threadIdx.y][threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y == 0 && c < h) {
    float tw = 0.0f, tb = 0.0f;
    for (int k = 0; k < kRowLanes; ++k) {
      tw += acc_w[k][threadIdx.x];
      tb += acc_b[k][threadIdx.x];
    }
    partial[blockIdx.y * h + c] = tw;
    if (with_bias) partial[(chunks + blockIdx.y) * h + c] = tb;
  }
}

template <class T>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                    T* __restrict__ y, float* __restrict__ rstd, int64_t rows,
                                    int64_t h, float eps) {
  __shared__ float smem[kMaxWarps];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * h;
    T* yr = y + row * h;
    float ss = 0.0f;
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      const float v = IO<T>::load(xr[j]);
      ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss, smem) / static_cast<float>(h) + eps);
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      yr[j] = IO<T>::store(IO<T>::load(xr[j]) * r * w[j]);
    }
    if (threadIdx.x == 0) rstd[row] = r;
  }
}

template <class T>
__global__ void rms_norm_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                       const float* __restrict__ w,
                                       const float* __restrict__ rstd, T* __restrict__ dx,
                                       int64_t rows, int64_t h) {
  __shared__ float smem[kMaxWarps];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * h;
    const T* dyr = dy + row * h;
    T* dxr = dx + row * h;
    const float r = rstd[row];
    float sgx = 0.0f;
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      sgx += IO<T>::load(dyr[j]) * w[j] * IO<T>::load(xr[j]) * r;
    }
    const float c_xhat = block_sum(sgx, smem) / static_cast<float>(h);
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      const float xhat = IO<T>::load(xr[j]) * r;
      dxr[j] = IO<T>::store(r * (IO<T>::load(dyr[j]) * w[j] - xhat * c_xhat));
    }
  }
}

// Rotate-half on the first rot features of each row of hn; cos/sin [s, rot], row -> position
// row / rows_per_pos. Backward applies the transposed rotation.
template <class T>
__global__ void rotary_kernel(const T* __restrict__ x, const float* __restrict__ cos_,
                              const float* __restrict__ sin_, T* __restrict__ y, int64_t n,
                              int64_t rows_per_pos, int64_t hn, int64_t rot, bool backward) {
  const int64_t half = rot / 2;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = k % hn, row = k / hn;
    if (d >= rot) {
      y[k] = x[k];
      continue;
    }
    const float* c = cos_ + (row / rows_per_pos) * rot;
    const float* s = sin_ + (row / rows_per_pos) * rot;
    const T* xr = x + row * hn;
    float out;
    if (d < half) {
      const float x1 = IO<T>::load(xr[d]), x2 = IO<T>::load(xr[d + half]);
      out = backward ? x1 * c[d] + x2 * s[d + half] : x1 * c[d] - x2 * s[d];
    } else {
      const float x1 = IO<T>::load(xr[d - half]), x2 = IO<T>::load(xr[d]);
      out = backward ? x2 * c[d] - x1 * s[d - half] : x2 * c[d] + x1 * s[d];
    }
    y[k] = IO<T>::store(out);
  }
}

}  // namespace gpu
}  // namespace mx
