// C interface of the GPU kernels (launch.cu): raw pointers, sizes and a cudaStream_t passed as
// void*, so the torch binding (ops_cuda.cpp) and the compile check need no shared headers.
// Every function returns a cudaError_t value (0 = success); mx_gpu_error_string explains it.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { MX_GPU_F32 = 0, MX_GPU_F16 = 1, MX_GPU_BF16 = 2 };

const char* mx_gpu_error_string(int code);

// Row chunks of the two-step column reductions; workspaces hold chunks * h floats per output.
int64_t mx_gpu_reduce_chunks(int64_t rows);

int mx_gpu_softmax_fwd(int dtype, const void* x, void* y, const float* slopes,
                       const unsigned char* pad, int64_t rows, int64_t np, int64_t sq,
                       int64_t sk, int64_t pad_b, int64_t pad_q, float scale, int causal,
                       void* stream);
int mx_gpu_softmax_bwd(int dtype, const void* dy, const void* y, void* dx, int64_t rows,
                       int64_t sq, int64_t sk, float scale, int causal, void* stream);
int mx_gpu_bias_gelu_fwd(int dtype, const void* x, const float* bias, void* y, int64_t rows,
                         int64_t h, int tanh_approx, void* stream);
int mx_gpu_bias_gelu_bwd(int dtype, const void* dy, const void* x, const float* bias, void* dx,
                         float* dbias, float* workspace, int64_t rows, int64_t h,
                         int tanh_approx, void* stream);
int mx_gpu_layer_norm_fwd(int dtype, const void* x, const float* w, const float* b, void* y,
                          float* mean, float* rstd, int64_t rows, int64_t h, float eps,
                          void* stream);
// dwb receives [2, h]: weight gradient then bias gradient. workspace: 2 * chunks * h floats.
int mx_gpu_layer_norm_bwd(int dtype, const void* dy, const void* x, const float* w,
                          const float* mean, const float* rstd, void* dx, float* dwb,
                          float* workspace, int64_t rows, int64_t h, void* stream);
int mx_gpu_rms_norm_fwd(int dtype, const void* x, const float* w, void* y, float* rstd,
                        int64_t rows, int64_t h, float eps, void* stream);
int mx_gpu_rms_norm_bwd(int dtype, const void* dy, const void* x, const float* w,
                        const float* rstd, void* dx, float* dw, float* workspace, int64_t rows,
                        int64_t h, void* stream);
int mx_gpu_rotary(int dtype, const void* x, const float* cos_, const float* sin_, void* y,
                  int64_t rows, int64_t rows_per_pos, int64_t hn, int64_t rot, int backward,
                  void* stream);

#ifdef __cplusplus
}
#endif
