// Torch binding of the GPU kernels: megatron_ext._ops_cuda (CUDA, or ROCm after the hipify pass
// that torch's BuildExtension runs). Same functions and conventions as ops_cpu.cpp: checks and
// allocation here, kernels behind the C interface of launch.h on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <vector>

#include "launch.h"

namespace {

int dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return MX_GPU_F32;
    case at::kHalf: return MX_GPU_F16;
    case at::kBFloat16: return MX_GPU_BF16;
    default: TORCH_CHECK(false, op, ": expected float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": GPU kernel failed: ", mx_gpu_error_string(err));
}

void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

void check_gpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a GPU tensor");
}

void check_f32_vec(const at::Tensor& t, const at::Tensor& like, int64_t n, const char* op,
                   const char* name) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.numel() == n,
              op, ": ", name, " must be a contiguous float32 tensor of ", n, " elements on ",
              like.device());
}

int64_t rows_of(const at::Tensor& x) { return x.numel() / std::max<int64_t>(x.size(-1), 1); }

at::Tensor workspace(const at::Tensor& like, int64_t outputs, int64_t rows, int64_t h) {
  return at::empty({outputs * mx_gpu_reduce_chunks(rows) * h}, like.options().dtype(at::kFloat));
}

at::Tensor softmax_fwd(const at::Tensor& scores, double scale, const std::optional<at::Tensor>& slopes,
                       bool causal, const std::optional<at::Tensor>& pad) {
  const char* op = "scaled_alibi_softmax";
  check_gpu(scores, op, "scores");
  TORCH_CHECK(scores.dim() == 4, op, ": scores must be [b, np, sq, sk], got ", scores.sizes());
  c10::cuda::CUDAGuard guard(scores.device());
  auto x = scores.contiguous();
  auto y = at::empty_like(x);
  const int64_t np = x.size(1), sq = x.size(2), sk = x.size(3);
  const float* slopes_ptr = nullptr;
  const unsigned char* pad_ptr = nullptr;
  int64_t pad_b = 0, pad_q = 0;
  at::Tensor slopes_c, pad_c;
  if (slopes) {
    slopes_c = slopes->contiguous();
    check_f32_vec(slopes_c, x, np, op, "alibi_slopes");
    slopes_ptr = slopes_c.data_ptr<float>();
  }
  if (pad) {
    pad_c = pad->contiguous();
    TORCH_CHECK(pad_c.device() == x.device() && pad_c.scalar_type() == at::kBool && pad_c.dim() == 4 &&
                    pad_c.size(1) == 1 && (pad_c.size(0) == 1 || pad_c.size(0) == x.size(0)) &&
                    (pad_c.size(2) == 1 || pad_c.size(2) == sq) && pad_c.size(3) == sk,
                op, ": padding_mask must be bool [b|1, 1, 1|sq, sk] on ", x.device(), ", got ",
                pad_c.sizes());
    pad_ptr = reinterpret_cast<const unsigned char*>(pad_c.data_ptr<bool>());
    pad_q = pad_c.size(2) == 1 ? 0 : sk;
    pad_b = pad_c.size(0) == 1 ? 0 : pad_c.size(2) * sk;
  }
  check_launch(mx_gpu_softmax_fwd(dtype_code(x, op), x.data_ptr(), y.data_ptr(), slopes_ptr, pad_ptr,
                                  x.numel() / std::max<int64_t>(sk, 1), np, sq, sk, pad_b, pad_q,
                                  float(scale), causal, current_stream()),
               op);
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& dy_, const at::Tensor& y_, double scale, bool causal) {
  const char* op = "scaled_alibi_softmax backward";
  check_gpu(y_, op, "probs");
  c10::cuda::CUDAGuard guard(y_.device());
  auto y = y_.contiguous();
  auto dy = dy_.contiguous().to(y.scalar_type());
  TORCH_CHECK(y.dim() == 4 && dy.sizes() == y.sizes(), op, ": grad and probs shapes differ");
  auto dx = at::empty_like(y);
  const int64_t sq = y.size(2), sk = y.size(3);
  check_launch(mx_gpu_softmax_bwd(dtype_code(y, op), dy.data_ptr(), y.data_ptr(), dx.data_ptr(),
                                  y.numel() / std::max<int64_t>(sk, 1), sq, sk, float(scale), causal,
                                  current_stream()),
               op);
  return dx;
}

at::Tensor bias_gelu_fwd(const at::Tensor& x_, const at::Tensor& bias, bool tanh) {
  const char* op = "bias_gelu";
  check_gpu(x_, op, "x");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  const int64_t h = x.size(-1);
  check_f32_vec(bias, x, h, op, "bias");
  auto y = at::empty_like(x);
  check_launch(mx_gpu_bias_gelu_fwd(dtype_code(x, op), x.data_ptr(), bias.data_ptr<float>(),
                                    y.data_ptr(), rows_of(x), h, tanh, current_stream()),
               op);
  return y;
}

std::vector<at::Tensor> bias_gelu_bwd(const at::Tensor& dy_, const at::Tensor& x_,
                                      const at::Tensor& bias, bool tanh) {
  const char* op = "bias_gelu backward";
  check_gpu(x_, op, "x");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto dy = dy_.contiguous().to(x.scalar_type());
  const int64_t h = x.size(-1), rows = rows_of(x);
  check_f32_vec(bias, x, h, op, "bias");
  auto dx = at::empty_like(x);
  auto dbias = at::zeros({h}, x.options().dtype(at::kFloat));
  auto ws = workspace(x, 1, rows, h);
  check_launch(mx_gpu_bias_gelu_bwd(dtype_code(x, op), dy.data_ptr(), x.data_ptr(),
                                    bias.data_ptr<float>(), dx.data_ptr(), dbias.data_ptr<float>(),
                                    ws.data_ptr<float>(), rows, h, tanh, current_stream()),
               op);
  return {dx, dbias};
}

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x_, const at::Tensor& w,
                                       const std::optional<at::Tensor>& b, double eps) {
  const char* op = "layer_norm";
  check_gpu(x_, op, "x");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  const int64_t h = x.size(-1), rows = rows_of(x);
  check_f32_vec(w, x, h, op, "weight");
  const float* b_ptr = nullptr;
  if (b) {
    check_f32_vec(*b, x, h, op, "bias");
    b_ptr = b->data_ptr<float>();
  }
  auto y = at::empty_like(x);
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  check_launch(mx_gpu_layer_norm_fwd(dtype_code(x, op), x.data_ptr(), w.data_ptr<float>(), b_ptr,
                                     y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                     rows, h, float(eps), current_stream()),
               op);
  return {y, mean, rstd};
}

std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w,
                                       const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "layer_norm backward";
  check_gpu(x_, op, "x");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto dy = dy_.contiguous().to(x.scalar_type());
  const int64_t h = x.size(-1), rows = rows_of(x);
  check_f32_vec(w, x, h, op, "weight");
  auto dx = at::empty_like(x);
  auto dwb = at::zeros({2, h}, x.options().dtype(at::kFloat));
  auto ws = workspace(x, 2, rows, h);
  check_launch(mx_gpu_layer_norm_bwd(dtype_code(x, op), dy.data_ptr(), x.data_ptr(), w.data_ptr<float>(),
                                     mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(),
                                     dwb.data_ptr<float>(), ws.data_ptr<float>(), rows, h,
                                     current_stream()),
               op);
  return {dx, dwb[0], dwb[1]};
}

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x_, const at::Tensor& w, double eps) {
  const char* op = "rms_norm";
  check_gpu(x_, op, "x");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  const int64_t h = x.size(-1), rows = rows_of(x);
  check_f32_vec(w, x, h, op, "weight");
  auto y = at::empty_like(x);
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  check_launch(mx_gpu_rms_norm_fwd(dtype_code(x, op), x.data_ptr(), w.data_ptr<float>(), y.data_ptr(),
                                   rstd.data_ptr<float>(), rows, h, float(eps), current_stream()),
               op);
  return {y, rstd};
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w,
                                     const at::Tensor& rstd) {
  const char* op = "rms_norm backward";
  check_gpu(x_, op, "x");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto dy = dy_.contiguous().to(x.scalar_type());
  const int64_t h = x.size(-1), rows = rows_of(x);
  check_f32_vec(w, x, h, op, "weight");
  auto dx = at::empty_like(x);
  auto dw = at::zeros({h}, x.options().dtype(at::kFloat));
  auto ws = workspace(x, 1, rows, h);
  check_launch(mx_gpu_rms_norm_bwd(dtype_code(x, op), dy.data_ptr(), x.data_ptr(), w.data_ptr<float>(),
                                   rstd.data_ptr<float>(), dx.data_ptr(), dw.data_ptr<float>(),
                                   ws.data_ptr<float>(), rows, h, current_stream()),
               op);
  return {dx, dw};
}

at::Tensor rotary(const at::Tensor& x_, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const char* op = "apply_rotary";
  check_gpu(x_, op, "x");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  TORCH_CHECK(x.dim() == 4, op, ": x must be [s, b, np, hn], got ", x.sizes());
  const int64_t s = x.size(0), hn = x.size(3);
  const int64_t rot = cos.numel() / std::max<int64_t>(s, 1);
  TORCH_CHECK(rot % 2 == 0 && rot <= hn, op, ": rot_dim must be even and <= hn");
  check_f32_vec(cos, x, s * rot, op, "cos");
  check_f32_vec(sin, x, s * rot, op, "sin");
  auto y = at::empty_like(x);
  check_launch(mx_gpu_rotary(dtype_code(x, op), x.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                             y.data_ptr(), x.numel() / std::max<int64_t>(hn, 1), x.size(1) * x.size(2),
                             hn, rot, backward, current_stream()),
               op);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-ext fused ops, GPU kernels (see megatron_ext/ops)";
  m.def("softmax_fwd", &softmax_fwd, "scaled softmax with ALiBi, causal and padding masks");
  m.def("softmax_bwd", &softmax_bwd);
  m.def("bias_gelu_fwd", &bias_gelu_fwd);
  m.def("bias_gelu_bwd", &bias_gelu_bwd);
  m.def("layer_norm_fwd", &layer_norm_fwd);
  m.def("layer_norm_bwd", &layer_norm_bwd);
  m.def("rms_norm_fwd", &rms_norm_fwd);
  m.def("rms_norm_bwd", &rms_norm_bwd);
  m.def("rotary", &rotary);
}
