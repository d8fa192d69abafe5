// instance_norm_act's autograd, in C++: the same formula as the Python registration in
// fastp2phd/ops/instance_norm_act.py, without Python on the way. At pix2pixHD's batch 1 a
// training step's time is host time, and torch.library's Python autograd cost more per call
// than the CPU kernel itself on small planes (see bench/bench_host_overhead.py).
//
// Registered for the Autograd key, so it serves every device: forward and backward call the
// operators through the dispatcher, which picks the device's kernel (C++ on the CPU, Triton
// on CUDA, registered from Python). Only the plain backward takes the fast path here:
// double backward (grad mode on during backward) and gradients reaching the mean and rstd
// outputs go to fastp2phd::instance_norm_act_input_grad, whose Python composite kernel is the
// one differentiable formula. Without the extension, the same formula is registered from Python. Forward-mode AD and torch.func never reach this kernel: the
// Python wrapper sends them to an autograd.Function with a jvp.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace fastp2phd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Stats forward_op(const at::Tensor& x, c10::string_view activation, double negative_slope, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastp2phd::instance_norm_act", "")
                       .typed<Stats(const at::Tensor&, c10::string_view, double, double)>();
  return op.call(x, activation, negative_slope, eps);
}

at::Tensor backward_op(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                       c10::string_view activation, double negative_slope) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastp2phd::instance_norm_act_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         c10::string_view, double)>();
  return op.call(grad, x, mean, rstd, activation, negative_slope);
}

at::Tensor input_grad_op(const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_mean,
                         const std::optional<at::Tensor>& grad_rstd, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& rstd, c10::string_view activation, double negative_slope) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastp2phd::instance_norm_act_input_grad", "")
                       .typed<at::Tensor(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, c10::string_view, double)>();
  return op.call(grad_y, grad_mean, grad_rstd, x, mean, rstd, activation, negative_slope);
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

struct InstanceNormActFunction : public torch::autograd::Function<InstanceNormActFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, c10::string_view activation,
                               double negative_slope, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = forward_op(x, activation, negative_slope, eps);
    // x, as nn.InstanceNorm2d saves: y stays a plain tensor the caller may modify in place. The
    // statistics are saved detached: a C++ Function saving its own outputs kept them alive after
    // backward under torch.utils.checkpoint (non-reentrant), one plane set per checkpointed layer.
    // Double backward recomputes them differentiably instead (below).
    ctx->save_for_backward({x, mean.detach(), rstd.detach()});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["eps"] = eps;
    ctx->set_materialize_grads(false);  // mean and rstd rarely get gradients: no zeros filled for them
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
    const at::Tensor &grad_y = grads[0], &grad_mean = grads[1], &grad_rstd = grads[2];
    const at::Tensor& x = saved[0];
    at::Tensor dx;
    if (!at::GradMode::is_enabled()) {
      dx = grad_y.defined() && !grad_mean.defined() && !grad_rstd.defined()
               ? backward_op(grad_y, x, saved[1], saved[2], activation, negative_slope)
               : input_grad_op(defined_or_none(grad_y), defined_or_none(grad_mean), defined_or_none(grad_rstd), x,
                               saved[1], saved[2], activation, negative_slope);
    } else {
      // create_graph: dx's graph must reach x through the statistics too, so they are recomputed
      // from x (the same kernel on the same x: the same values) with their own graph.
      auto [y, mean, rstd] = forward_op(x, activation, negative_slope, ctx->saved_data["eps"].toDouble());
      dx = input_grad_op(defined_or_none(grad_y), defined_or_none(grad_mean), defined_or_none(grad_rstd), x, mean,
                         rstd, activation, negative_slope);
    }
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Stats instance_norm_act_autograd(const at::Tensor& x, c10::string_view activation, double negative_slope,
                                 double eps) {
  auto out = InstanceNormActFunction::apply(x, activation, negative_slope, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastp2phd, Autograd, m) {
  m.impl("instance_norm_act", &instance_norm_act_autograd);
}

}  // namespace fastp2phd
