// Launchers of the GPU kernels behind the C interface in launch.h. No torch headers: this file
// is what the CI compile check builds with nvcc (sm_80, sm_90) and, hipified, with hipcc
// (gfx90a). Launch sizes: one block per row for row-wise ops (64..512 threads, multiples of the
// AMD wavefront), grid-stride loops capped at kMaxGrid blocks.
#include "kernels.cuh"
#include "launch.h"

namespace {

using mx::gpu::bf16_t;
using mx::gpu::fp16_t;

constexpr int64_t kMaxGrid = int64_t(1) << 20;
constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxChunks = 256;
constexpr int64_t kRowsPerChunkHint = 64;

unsigned int grid_for(int64_t blocks) {
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per row for row-wise kernels: enough to cover short rows in one sweep.
int row_threads(int64_t len) {
  return len <= 128 ? 64 : (len <= 512 ? 128 : (len <= 2048 ? 256 : 512));
}

int64_t rows_per_chunk(int64_t rows) {
  int64_t chunks = ceil_div(rows, kRowsPerChunkHint);
  chunks = chunks < 1 ? 1 : (chunks > kMaxChunks ? kMaxChunks : chunks);
  return ceil_div(rows, chunks);
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

int last_error() { return static_cast<int>(cudaGetLastError()); }

template <class F>
int dispatch(int dtype, F&& launch) {
  switch (dtype) {
    case MX_GPU_F32: return launch(float{});
    case MX_GPU_F16: return launch(fp16_t{});
    case MX_GPU_BF16: return launch(bf16_t{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int column_sum(const float* partial, float* out, int64_t chunks, int64_t h, int outputs,
               cudaStream_t stream) {
  const dim3 grid(grid_for(ceil_div(h, kElementwiseThreads)), outputs);
  mx::gpu::column_sum_kernel<<<grid, kElementwiseThreads, 0, stream>>>(partial, out, chunks, h);
  return last_error();
}

}  // namespace

extern "C" {

const char* mx_gpu_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int64_t mx_gpu_reduce_chunks(int64_t rows) {
  return rows < 1 ? 1 : ceil_div(rows, rows_per_chunk(rows));
}

int mx_gpu_softmax_fwd(int dtype, const void* x, void* y, const float* slopes,
                       const unsigned char* pad, int64_t rows, int64_t np, int64_t sq,
                       int64_t sk, int64_t pad_b, int64_t pad_q, float scale, int causal,
                       void* stream) {
  if (rows == 0 || sk == 0) return 0;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    mx::gpu::softmax_fwd_kernel<T><<<grid_for(rows), row_threads(sk), 0, as_stream(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(y), slopes, pad, rows, np, sq, sk, pad_b,
        pad_q, scale, causal != 0);
    return last_error();
  });
}

int mx_gpu_softmax_bwd(int dtype, const void* dy, const void* y, void* dx, int64_t rows,
                       int64_t sq, int64_t sk, float scale, int causal, void* stream) {
  if (rows == 0 || sk == 0) return 0;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    mx::gpu::softmax_bwd_kernel<T><<<grid_for(rows), row_threads(sk), 0, as_stream(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(y), static_cast<T*>(dx), rows, sq, sk,
        scale, causal != 0);
    return last_error();
  });
}

int mx_gpu_bias_gelu_fwd(int dtype, const void* x, const float* bias, void* y, int64_t rows,
                         int64_t h, int tanh_approx, void* stream) {
  const int64_t n = rows * h;
  if (n == 0) return 0;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned int grid = grid_for(ceil_div(n, kElementwiseThreads));
    mx::gpu::bias_gelu_fwd_kernel<T><<<grid, kElementwiseThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), bias, static_cast<T*>(y), n, h, tanh_approx != 0);
    return last_error();
  });
}

int mx_gpu_bias_gelu_bwd(int dtype, const void* dy, const void* x, const float* bias, void* dx,
                         float* dbias, float* workspace, int64_t rows, int64_t h,
                         int tanh_approx, void* stream) {
  if (rows == 0 || h == 0) return 0;
  const int64_t per_chunk = rows_per_chunk(rows), chunks = ceil_div(rows, per_chunk);
  const int err = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(grid_for(ceil_div(h, mx::gpu::kColTile)), chunks);
    const dim3 block(mx::gpu::kColTile, mx::gpu::kRowLanes);
    mx::gpu::bias_gelu_bwd_kernel<T><<<grid, block, 0, as_stream(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), bias, static_cast<T*>(dx),
        workspace, rows, h, per_chunk, tanh_approx != 0);
    return last_error();
  });
  if (err != 0) return err;
  return column_sum(workspace, dbias, chunks, h, 1, as_stream(stream));
}

int mx_gpu_layer_norm_fwd(int dtype, const void* x, const float* w, const float* b, void* y,
                          float* mean, float* rstd, int64_t rows, int64_t h, float eps,
                          void* stream) {
  if (rows == 0 || h == 0) return 0;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    mx::gpu::layer_norm_fwd_kernel<T><<<grid_for(rows), row_threads(h), 0, as_stream(stream)>>>(
        static_cast<const T*>(x), w, b, static_cast<T*>(y), mean, rstd, rows, h, eps);
    return last_error();
  });
}

int mx_gpu_layer_norm_bwd(int dtype, const void* dy, const void* x, const float* w,
                          const float* mean, const float* rstd, void* dx, float* dwb,
                          float* workspace, int64_t rows, int64_t h, void* stream) {
  if (rows == 0 || h == 0) return 0;
  const int64_t per_chunk = rows_per_chunk(rows), chunks = ceil_div(rows, per_chunk);
  const int err = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    cudaStream_t s = as_stream(stream);
    mx::gpu::layer_norm_bwd_dx_kernel<T><<<grid_for(rows), row_threads(h), 0, s>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), w, mean, rstd, static_cast<T*>(dx),
        rows, h);
    const dim3 grid(grid_for(ceil_div(h, mx::gpu::kColTile)), chunks);
    const dim3 block(mx::gpu::kColTile, mx::gpu::kRowLanes);
    mx::gpu::norm_bwd_params_kernel<T><<<grid, block, 0, s>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), mean, rstd, workspace, rows, h,
        chunks, per_chunk, true);
    return last_error();
  });
  if (err != 0) return err;
  return column_sum(workspace, dwb, chunks, h, 2, as_stream(stream));
}

int mx_gpu_rms_norm_fwd(int dtype, const void* x, const float* w, void* y, float* rstd,
                        int64_t rows, int64_t h, float eps, void* stream) {
  if (rows == 0 || h == 0) return 0;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    mx::gpu::rms_norm_fwd_kernel<T><<<grid_for(rows), row_threads(h), 0, as_stream(stream)>>>(
        static_cast<const T*>(x), w, static_cast<T*>(y), rstd, rows, h, eps);
    return last_error();
  });
}

int mx_gpu_rms_norm_bwd(int dtype, const void* dy, const void* x, const float* w,
                        const float* rstd, void* dx, float* dw, float* workspace, int64_t rows,
                        int64_t h, void* stream) {
  if (rows == 0 || h == 0) return 0;
  const int64_t per_chunk = rows_per_chunk(rows), chunks = ceil_div(rows, per_chunk);
  const int err = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    cudaStream_t s = as_stream(stream);
    mx::gpu::rms_norm_bwd_dx_kernel<T><<<grid_for(rows), row_threads(h), 0, s>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), w, rstd, static_cast<T*>(dx), rows,
        h);
    const dim3 grid(grid_for(ceil_div(h, mx::gpu::kColTile)), chunks);
    const dim3 block(mx::gpu::kColTile, mx::gpu::kRowLanes);
    mx::gpu::norm_bwd_params_kernel<T><<<grid, block, 0, s>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), nullptr, rstd, workspace, rows, h,
        chunks, per_chunk, false);
    return last_error();
  });
  if (err != 0) return err;
  return column_sum(workspace, dw, chunks, h, 1, as_stream(stream));
}

int mx_gpu_rotary(int dtype, const void* x, const float* cos_, const float* sin_, void* y,
                  int64_t rows, int64_t rows_per_pos, int64_t hn, int64_t rot, int backward,
                  void* stream) {
  const int64_t n = rows * hn;
  if (n == 0) return 0;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned int grid = grid_for(ceil_div(n, kElementwiseThreads));
    mx::gpu::rotary_kernel<T><<<grid, kElementwiseThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), cos_, sin_, static_cast<T*>(y), n, rows_per_pos, hn, rot,
        backward != 0);
    return last_error();
  });
}

}  // extern "C"
