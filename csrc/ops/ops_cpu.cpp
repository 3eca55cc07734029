// Torch binding of the CPU kernels: megatron_ext._ops_cpu.
//
// Checks and allocates here; the kernels (cpu_kernels.cpp) see raw pointers. Rows are split over
// torch's intra-op threads (at::parallel_for, OpenMP in the CPU wheels), so torch.set_num_threads
// and OMP_NUM_THREADS apply. Weights, biases, cos/sin and ALiBi slopes arrive as fp32 (the Python
// wrapper casts them); weight and bias gradients come back as fp32.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "cpu_kernels.h"

namespace {

using mx::BiasGeluArgs;
using mx::NormArgs;
using mx::RotaryArgs;
using mx::SoftmaxArgs;
using mx::SoftmaxBwdArgs;

template <class Fn>
Fn pick(const at::Tensor& t, Fn f32, Fn bf16, Fn f16, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return f32;
    case at::kBFloat16: return bf16;
    case at::kHalf: return f16;
    default: TORCH_CHECK(false, op, ": expected float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
}

void check_f32_vec(const at::Tensor& t, int64_t n, const char* op, const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, op, ": ",
              name, " must be a contiguous float32 tensor of ", n, " elements");
}

// Enough rows per task that thread start-up is amortised.
int64_t grain_for(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1)); }

// Per-thread [h] accumulators for weight/bias gradients, summed at the end.
struct Partials {
  at::Tensor buf;
  int64_t h;
  Partials(int64_t num, int64_t h_) : buf(at::zeros({at::get_num_threads(), num, h_}, at::kFloat)), h(h_) {}
  float* get(int which) {
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), buf.size(0) - 1);
    return buf.data_ptr<float>() + (tid * buf.size(1) + which) * h;
  }
  at::Tensor sum(int which) { return buf.select(1, which).sum(0); }
};

at::Tensor softmax_fwd(const at::Tensor& scores, double scale, const std::optional<at::Tensor>& slopes,
                       bool causal, const std::optional<at::Tensor>& pad) {
  const char* op = "scaled_alibi_softmax";
  check_cpu(scores, op, "scores");
  TORCH_CHECK(scores.dim() == 4, op, ": scores must be [b, np, sq, sk], got ", scores.sizes());
  auto x = scores.contiguous();
  auto fn = pick(x, mx::softmax_fwd_f32, mx::softmax_fwd_bf16, mx::softmax_fwd_f16, op);
  auto y = at::empty_like(x);
  SoftmaxArgs a;
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.np = x.size(1);
  a.sq = x.size(2);
  a.sk = x.size(3);
  TORCH_CHECK(a.sk < (int64_t(1) << 31), op, ": sk must be below 2^31");
  a.scale = float(scale);
  a.causal = causal;
  at::Tensor slopes_c, pad_c;
  if (slopes) {
    slopes_c = slopes->contiguous();
    check_f32_vec(slopes_c, a.np, op, "alibi_slopes");
    a.slopes = slopes_c.data_ptr<float>();
  }
  if (pad) {
    pad_c = pad->contiguous();
    check_cpu(pad_c, op, "padding_mask");
    TORCH_CHECK(pad_c.scalar_type() == at::kBool && pad_c.dim() == 4 && pad_c.size(1) == 1 &&
                    (pad_c.size(0) == 1 || pad_c.size(0) == x.size(0)) &&
                    (pad_c.size(2) == 1 || pad_c.size(2) == a.sq) && pad_c.size(3) == a.sk,
                op, ": padding_mask must be bool [b|1, 1, 1|sq, sk], got ", pad_c.sizes());
    a.pad = reinterpret_cast<const uint8_t*>(pad_c.data_ptr<bool>());
    a.pad_q = pad_c.size(2) == 1 ? 0 : a.sk;
    a.pad_b = pad_c.size(0) == 1 ? 0 : pad_c.size(2) * a.sk;
  }
  const int64_t rows = x.numel() / std::max<int64_t>(a.sk, 1);
  at::parallel_for(0, rows, grain_for(a.sk), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(size_t(std::max<int64_t>(a.sk, 1)));
    fn(a, r0, r1, buf.data());
  });
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& dy_, const at::Tensor& y_, double scale, bool causal) {
  const char* op = "scaled_alibi_softmax backward";
  check_cpu(y_, op, "probs");
  auto dy = dy_.contiguous().to(y_.scalar_type());
  auto y = y_.contiguous();
  TORCH_CHECK(y.dim() == 4 && dy.sizes() == y.sizes(), op, ": grad and probs shapes differ");
  auto fn = pick(y, mx::softmax_bwd_f32, mx::softmax_bwd_bf16, mx::softmax_bwd_f16, op);
  auto dx = at::empty_like(y);
  SoftmaxBwdArgs a;
  a.dy = dy.data_ptr();
  a.y = y.data_ptr();
  a.dx = dx.data_ptr();
  a.sq = y.size(2);
  a.sk = y.size(3);
  a.scale = float(scale);
  a.causal = causal;
  const int64_t rows = y.numel() / std::max<int64_t>(a.sk, 1);
  at::parallel_for(0, rows, grain_for(a.sk), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  return dx;
}

at::Tensor bias_gelu_fwd(const at::Tensor& x_, const at::Tensor& bias, bool tanh) {
  const char* op = "bias_gelu";
  check_cpu(x_, op, "x");
  auto x = x_.contiguous();
  const int64_t h = x.size(-1);
  check_f32_vec(bias, h, op, "bias");
  auto fn = pick(x, mx::bias_gelu_fwd_f32, mx::bias_gelu_fwd_bf16, mx::bias_gelu_fwd_f16, op);
  auto y = at::empty_like(x);
  BiasGeluArgs a;
  a.x = x.data_ptr();
  a.bias = bias.data_ptr<float>();
  a.out = y.data_ptr();
  a.h = h;
  a.tanh = tanh;
  at::parallel_for(0, x.numel() / std::max<int64_t>(h, 1), grain_for(h),
                   [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  return y;
}

std::vector<at::Tensor> bias_gelu_bwd(const at::Tensor& dy_, const at::Tensor& x_,
                                      const at::Tensor& bias, bool tanh) {
  const char* op = "bias_gelu backward";
  check_cpu(x_, op, "x");
  auto x = x_.contiguous();
  auto dy = dy_.contiguous().to(x.scalar_type());
  const int64_t h = x.size(-1);
  check_f32_vec(bias, h, op, "bias");
  auto fn = pick(x, mx::bias_gelu_bwd_f32, mx::bias_gelu_bwd_bf16, mx::bias_gelu_bwd_f16, op);
  auto dx = at::empty_like(x);
  Partials part(1, h);
  BiasGeluArgs a;
  a.x = x.data_ptr();
  a.dy = dy.data_ptr();
  a.bias = bias.data_ptr<float>();
  a.out = dx.data_ptr();
  a.h = h;
  a.tanh = tanh;
  at::parallel_for(0, x.numel() / std::max<int64_t>(h, 1), grain_for(h), [&](int64_t r0, int64_t r1) {
    BiasGeluArgs local = a;
    local.dbias = part.get(0);
    fn(local, r0, r1);
  });
  return {dx, part.sum(0)};
}

NormArgs norm_args(const at::Tensor& x, const at::Tensor& w, const char* op) {
  check_cpu(x, op, "x");
  NormArgs a;
  a.h = x.size(-1);
  check_f32_vec(w, a.h, op, "weight");
  a.x = x.data_ptr();
  a.w = w.data_ptr<float>();
  return a;
}

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x_, const at::Tensor& w,
                                       const std::optional<at::Tensor>& b, double eps) {
  const char* op = "layer_norm";
  auto x = x_.contiguous();
  NormArgs a = norm_args(x, w, op);
  auto fn = pick(x, mx::layer_norm_fwd_f32, mx::layer_norm_fwd_bf16, mx::layer_norm_fwd_f16, op);
  const int64_t rows = x.numel() / std::max<int64_t>(a.h, 1);
  auto y = at::empty_like(x);
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (b) {
    check_f32_vec(*b, a.h, op, "bias");
    a.b = b->data_ptr<float>();
  }
  a.out = y.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.eps = float(eps);
  at::parallel_for(0, rows, grain_for(a.h), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(size_t(a.h));
    fn(a, r0, r1, buf.data());
  });
  return {y, mean, rstd};
}

std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w,
                                       const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "layer_norm backward";
  auto x = x_.contiguous();
  auto dy = dy_.contiguous().to(x.scalar_type());
  NormArgs a = norm_args(x, w, op);
  auto fn = pick(x, mx::layer_norm_bwd_f32, mx::layer_norm_bwd_bf16, mx::layer_norm_bwd_f16, op);
  const int64_t rows = x.numel() / std::max<int64_t>(a.h, 1);
  auto dx = at::empty_like(x);
  Partials part(2, a.h);
  a.dy = dy.data_ptr();
  a.out = dx.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  at::parallel_for(0, rows, grain_for(a.h), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(size_t(a.h));
    NormArgs local = a;
    local.dw = part.get(0);
    local.db = part.get(1);
    fn(local, r0, r1, buf.data());
  });
  return {dx, part.sum(0), part.sum(1)};
}

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x_, const at::Tensor& w, double eps) {
  const char* op = "rms_norm";
  auto x = x_.contiguous();
  NormArgs a = norm_args(x, w, op);
  auto fn = pick(x, mx::rms_norm_fwd_f32, mx::rms_norm_fwd_bf16, mx::rms_norm_fwd_f16, op);
  const int64_t rows = x.numel() / std::max<int64_t>(a.h, 1);
  auto y = at::empty_like(x);
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  a.out = y.data_ptr();
  a.rstd = rstd.data_ptr<float>();
  a.eps = float(eps);
  at::parallel_for(0, rows, grain_for(a.h), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(size_t(a.h));
    fn(a, r0, r1, buf.data());
  });
  return {y, rstd};
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w,
                                     const at::Tensor& rstd) {
  const char* op = "rms_norm backward";
  auto x = x_.contiguous();
  auto dy = dy_.contiguous().to(x.scalar_type());
  NormArgs a = norm_args(x, w, op);
  auto fn = pick(x, mx::rms_norm_bwd_f32, mx::rms_norm_bwd_bf16, mx::rms_norm_bwd_f16, op);
  const int64_t rows = x.numel() / std::max<int64_t>(a.h, 1);
  auto dx = at::empty_like(x);
  Partials part(1, a.h);
  a.dy = dy.data_ptr();
  a.out = dx.data_ptr();
  a.rstd = rstd.data_ptr<float>();
  at::parallel_for(0, rows, grain_for(a.h), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(size_t(a.h));
    NormArgs local = a;
    local.dw = part.get(0);
    fn(local, r0, r1, buf.data());
  });
  return {dx, part.sum(0)};
}

at::Tensor rotary(const at::Tensor& x_, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const char* op = "apply_rotary";
  check_cpu(x_, op, "x");
  auto x = x_.contiguous();
  TORCH_CHECK(x.dim() == 4, op, ": x must be [s, b, np, hn], got ", x.sizes());
  const int64_t s = x.size(0), hn = x.size(3);
  const int64_t rot = cos.numel() / std::max<int64_t>(s, 1);
  TORCH_CHECK(rot % 2 == 0 && rot <= hn, op, ": rot_dim must be even and <= hn");
  check_f32_vec(cos, s * rot, op, "cos");
  check_f32_vec(sin, s * rot, op, "sin");
  auto fn = pick(x, mx::rotary_f32, mx::rotary_bf16, mx::rotary_f16, op);
  auto y = at::empty_like(x);
  RotaryArgs a;
  a.x = x.data_ptr();
  a.out = y.data_ptr();
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.rows_per_pos = x.size(1) * x.size(2);
  a.hn = hn;
  a.rot = rot;
  a.backward = backward;
  at::parallel_for(0, x.numel() / std::max<int64_t>(hn, 1), grain_for(hn),
                   [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-ext fused ops, CPU kernels (see megatron_ext/ops)";
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
