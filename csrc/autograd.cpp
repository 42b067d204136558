// Autograd kernels of the cnnops:: forward ops, for every device.
//
// Each forward op gets a torch::autograd::Function that runs the op below
// autograd, saves what its backward op reads, and whose backward calls that
// backward op (csrc/cnnops.cpp) through the dispatcher, so the CPU and CUDA
// kernels share one formula. Batch statistics and max-pool indices are outputs
// without gradients. A call whose tensors need no gradient (torch.no_grad,
// frozen weights) skips the Function and runs the op below autograd.
//
// These are C++ rather than torch.library.register_autograd formulas because
// the Python glue costs 60-250 us per call in torch 2.13 (it rebuilds the
// schema's argument list for every argument of every call), several times the
// kernel on the small layers of LeNet, NiN or DenseNet. The Triton ops
// (torch.ops.cnnops_triton, Python kernels) keep the same formulas in Python:
// cnnops/triton_kernels/autograd.py.

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "op_handles.h"

#include <array>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace cnnops {
namespace {

using namespace ops;  // the ops' typed handles and argument types (op_handles.h)
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;


// Calls an op below autograd (on the device kernel).
template <typename Signature, typename... Args>
auto below_autograd(const c10::TypedOperatorHandle<Signature>& handle, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return handle.call(std::forward<Args>(args)...);
}

// Which arguments of a forward call autograd counts as inputs: the tensors,
// and the optional tensors that are present (as a bit mask over argument
// positions). Backward's needs_input_grad numbers only those.
struct TensorArgs {
  int64_t mask = 0, position = 0;
  void add(bool is_input) { mask |= int64_t{is_input} << position++; }
  void operator()(const Tensor&) { add(true); }
  void operator()(const OptTensor& t) { add(t.has_value() && t->defined()); }
  template <typename T>
  void operator()(const T&) {
    add(false);
  }
};

// Which of a forward's arguments need a gradient, by argument position.
class NeedsGrad {
 public:
  explicit NeedsGrad(AutogradContext* ctx) {
    const int64_t mask = ctx->saved_data["tensor_args"].toInt();
    for (int64_t arg = 0, edge = 0; arg < 64; ++arg) {
      needs_[arg] = ((mask >> arg) & 1) && ctx->needs_input_grad(edge++);
    }
  }
  bool operator[](size_t arg) const { return needs_[arg]; }

 private:
  std::array<bool, 64> needs_{};
};

// The n arguments of a forward op that its backward op differentiates, named
// as in the op's schema (csrc/cnnops.cpp), in the order of the backward op's
// gradients: their positions come from the registered schema, not from
// numbers written here.
template <size_t n>
class Differentiable {
 public:
  Differentiable(const c10::OperatorHandle& op, const std::array<const char*, n>& names)
      : op_name_(op.schema().name()), n_args_(op.schema().arguments().size()) {
    for (size_t i = 0; i < n; ++i) positions_[i] = arg_position(op, names[i]);
  }
  // The output_mask of a backward op whose gradients are those of the first m
  // arguments: which of them need one in this backward.
  template <size_t m = n>
  Mask<m> mask(const NeedsGrad& needs) const {
    static_assert(m <= n);
    Mask<m> out;
    for (size_t i = 0; i < m; ++i) out[i] = needs[positions_[i]];
    return out;
  }
  // What the autograd backward returns: one gradient per forward argument,
  // grads[i] for the i-th differentiable argument where it needs one, undefined
  // elsewhere (backward ops return an empty tensor for gradients not asked for).
  variable_list place(const NeedsGrad& needs, const std::array<Tensor, n>& grads) const {
    variable_list out(n_args_);
    for (size_t i = 0; i < n; ++i) {
      if (needs[positions_[i]]) out[positions_[i]] = grads[i];
    }
    return out;
  }
  const std::string& op_name() const { return op_name_; }

 private:
  std::string op_name_;
  size_t n_args_;
  std::array<size_t, n> positions_{};
};

// Saved geometry of a conv.
void save_conv(AutogradContext* ctx, Ints stride, Ints padding, Ints dilation, int64_t groups) {
  ctx->saved_data["stride"] = stride;
  ctx->saved_data["padding"] = padding;
  ctx->saved_data["dilation"] = dilation;
  ctx->saved_data["groups"] = groups;
}

std::vector<int64_t> ints(AutogradContext* ctx, const char* key) {
  return ctx->saved_data[key].toIntVector();
}

bool flag(AutogradContext* ctx, const char* key) { return ctx->saved_data[key].toBool(); }

// A new autograd node, held as this torch's Edge holds nodes (std::shared_ptr
// before torch 2.13, c10::intrusive_ptr since).
template <typename T, typename... Args>
auto make_node(Args&&... args) {
  using Ptr = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// What a backward returns: `grads`, one per forward argument (Differentiable::place).
//
// The backward ops have no derivatives of their own. Under create_graph=True
// (grad mode on during backward), when the gradients depend on something that
// requires grad (the backward's `incoming` gradients or its saved tensors),
// they are attached to a node that raises, naming the op, when a second
// backward reaches it, rather than coming back as constants that silently
// drop out of second derivatives.
variable_list backward_result(const std::string& op_name, AutogradContext* ctx,
                              const variable_list& incoming, variable_list grads) {
  if (!at::GradMode::is_enabled()) return grads;
  variable_list sources = ctx->get_saved_variables();
  sources.insert(sources.end(), incoming.begin(), incoming.end());
  if (!torch::autograd::compute_requires_grad(sources)) return grads;
  const auto error = make_node<torch::autograd::Error>(
      op_name +
          ": double backward (differentiating its gradient, as create_graph=True allows) is "
          "not supported; compute second derivatives through torch.nn.functional instead",
      torch::autograd::collect_next_edges(sources));
  for (Tensor& g : grads) {
    if (!g.defined()) continue;
    g = g.detach();
    torch::autograd::set_history(g, error);
  }
  return grads;
}

template <size_t n>
variable_list backward_result(const Differentiable<n>& args, AutogradContext* ctx,
                              const NeedsGrad& needs, const variable_list& incoming,
                              const std::array<Tensor, n>& grads) {
  return backward_result(args.op_name(), ctx, incoming, args.place(needs, grads));
}

// The base of every op's Function: forward records which arguments are
// tensors (for NeedsGrad), runs the op below autograd and hands the result to
// Fn::save, which saves what the backward op reads. Fn provides op() (its
// typed handle), grads() (its Differentiable), save(ctx, result, args...) and
// gradients(ctx, incoming), the backward for a defined output gradient.
//
// Only an op's first output is differentiable (the others, batch statistics,
// max-pool indices and conv_bn_relu's saved conv output, are marked not), and
// backward reads only its gradient. So the others' gradients stay undefined
// rather than materialised as zeros: for conv_bn_relu that was an
// activation-sized fill every backward.
template <typename Fn>
struct OpFunction : torch::autograd::Function<Fn> {
  static variable_list backward(AutogradContext* ctx, variable_list incoming) {
    // (undefined when nothing downstream gave the output a gradient)
    if (!incoming[0].defined()) return Fn::grads().place(NeedsGrad(ctx), {});
    return Fn::gradients(ctx, incoming);
  }

  template <typename... Args>
  static auto forward(AutogradContext* ctx, const Args&... args) {
    ctx->set_materialize_grads(false);
    TensorArgs tensor_args;
    (tensor_args(args), ...);
    ctx->saved_data["tensor_args"] = tensor_args.mask;
    auto result = below_autograd(Fn::op(), args...);
    Fn::save(ctx, result, args...);
    if constexpr (std::is_same_v<decltype(result), Tensor>) {
      return result;
    } else {
      return std::apply([](const auto&... t) { return variable_list{t...}; }, result);
    }
  }
};

// conv2d_backward of a saved conv, for the gradient `grad` of its output.
std::tuple<Tensor, Tensor, Tensor> conv_backward(AutogradContext* ctx, Mask<3> mask,
                                                 const Tensor& grad, const Tensor& input,
                                                 const Tensor& weight) {
  return below_autograd(conv2d_backward_op(), grad, input, weight, ints(ctx, "stride"),
                        ints(ctx, "padding"), ints(ctx, "dilation"),
                        ctx->saved_data["groups"].toInt(), mask);
}

// (output, save_mean, save_invstd): the statistics have no gradient.
void mark_stats(AutogradContext* ctx, const std::tuple<Tensor, Tensor, Tensor>& r) {
  ctx->mark_non_differentiable({std::get<1>(r), std::get<2>(r)});
}

}  // namespace

// The Functions are named after the graph node they make (out.grad_fn prints
// as torch::autograd::CppNode<cnnops::Conv2dBackward>), hence outside the
// anonymous namespace.

// ---- convolution --------------------------------------------------------------

struct Conv2dBackward : OpFunction<Conv2dBackward> {
  static const auto& op() { return conv2d_op(); }
  static const Differentiable<3>& grads() {
    static const Differentiable<3> d(op(), {"input", "weight", "bias"});
    return d;
  }
  static void save(AutogradContext* ctx, const Tensor&, const Tensor& input, const Tensor& weight,
                   const OptTensor&, Ints stride, Ints padding, Ints dilation, int64_t groups) {
    ctx->save_for_backward({input, weight});
    save_conv(ctx, stride, padding, dilation, groups);
  }
  static variable_list gradients(AutogradContext* ctx, const variable_list& incoming) {
    const auto s = ctx->get_saved_variables();
    const NeedsGrad needs(ctx);
    auto [gi, gw, gb] = conv_backward(ctx, grads().mask(needs), incoming[0], s[0], s[1]);
    return backward_result(grads(), ctx, needs, incoming, {gi, gw, gb});
  }
};

struct Conv2dReluBackward : OpFunction<Conv2dReluBackward> {
  static const auto& op() { return conv2d_relu_op(); }
  static const Differentiable<4>& grads() {
    static const Differentiable<4> d(op(), {"input", "weight", "bias", "residual"});
    return d;
  }
  static void save(AutogradContext* ctx, const Tensor& out, const Tensor& input,
                   const Tensor& weight, const OptTensor&, const OptTensor&, Ints stride,
                   Ints padding, Ints dilation, int64_t groups) {
    ctx->save_for_backward({input, weight, out});
    save_conv(ctx, stride, padding, dilation, groups);
  }
  static variable_list gradients(AutogradContext* ctx, const variable_list& incoming) {
    const auto s = ctx->get_saved_variables();
    const NeedsGrad needs(ctx);
    // Through the ReLU: also the residual's gradient.
    const Tensor g = below_autograd(add_relu_backward_op(), incoming[0], s[2]);
    auto [gi, gw, gb] = conv_backward(ctx, grads().mask<3>(needs), g, s[0], s[1]);
    return backward_result(grads(), ctx, needs, incoming, {gi, gw, gb, g});
  }
};

// ---- batch normalisation ---------------------------------------------------------

struct BatchNormBackward : OpFunction<BatchNormBackward> {
  static const auto& op() { return batch_norm_op(); }
  static const Differentiable<3>& grads() {
    static const Differentiable<3> d(op(), {"input", "weight", "bias"});
    return d;
  }
  static void save(AutogradContext* ctx, const std::tuple<Tensor, Tensor, Tensor>& r,
                   const Tensor& input, const OptTensor&, const OptTensor&,
                   const OptTensor& weight, const OptTensor&, bool training, double) {
    mark_stats(ctx, r);
    ctx->save_for_backward({input, weight.value_or(Tensor()), std::get<1>(r), std::get<2>(r)});
    ctx->saved_data["training"] = training;
  }
  static variable_list gradients(AutogradContext* ctx, const variable_list& incoming) {
    const auto s = ctx->get_saved_variables();
    const NeedsGrad needs(ctx);
    auto [gi, gw, gb] = below_autograd(batch_norm_backward_op(), incoming[0], s[0], s[1], s[2],
                                       s[3], flag(ctx, "training"), grads().mask(needs));
    return backward_result(grads(), ctx, needs, incoming, {gi, gw, gb});
  }
};

struct BnReluBackward : OpFunction<BnReluBackward> {
  static const auto& op() { return bn_relu_op(); }
  static const Differentiable<4>& grads() {
    static const Differentiable<4> d(op(), {"input", "weight", "bias", "residual"});
    return d;
  }
  static void save(AutogradContext* ctx, const std::tuple<Tensor, Tensor, Tensor>& r,
                   const Tensor& input, const OptTensor&, const OptTensor&,
                   const OptTensor& weight, const OptTensor&, const OptTensor&, bool training,
                   double, bool relu) {
    mark_stats(ctx, r);
    ctx->save_for_backward({input, weight.value_or(Tensor()), std::get<1>(r), std::get<2>(r),
                            relu ? std::get<0>(r) : Tensor()});
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
  }
  static variable_list gradients(AutogradContext* ctx, const variable_list& incoming) {
    const auto s = ctx->get_saved_variables();
    const NeedsGrad needs(ctx);
    auto [gi, gw, gb, gr] =
        below_autograd(bn_relu_backward_op(), incoming[0], s[4], s[0], s[1], s[2], s[3],
                       flag(ctx, "training"), flag(ctx, "relu"), grads().mask(needs));
    return backward_result(grads(), ctx, needs, incoming, {gi, gw, gb, gr});
  }
};

struct ConvBnReluBackward : OpFunction<ConvBnReluBackward> {
  static const auto& op() { return conv_bn_relu_op(); }
  static const Differentiable<6>& grads() {
    static const Differentiable<6> d(
        op(), {"input", "weight", "conv_bias", "bn_weight", "bn_bias", "residual"});
    return d;
  }
  static void save(AutogradContext* ctx, const std::tuple<Tensor, Tensor, Tensor, Tensor>& r,
                   const Tensor& input, const Tensor& weight, const OptTensor& conv_bias,
                   const OptTensor& bn_weight, const OptTensor&, const OptTensor&,
                   const OptTensor&, const OptTensor&, Ints stride, Ints padding, Ints dilation,
                   int64_t groups, bool training, double, bool relu) {
    const auto& [out, conv_out, mean, invstd] = r;
    ctx->mark_non_differentiable({conv_out, mean, invstd});
    // The training backward reads the output only for the ReLU mask: without a ReLU it is
    // not kept (a conv -> BN whose output feeds a residual add would keep it for nothing).
    const Tensor kept_out = (relu || !training) ? out : Tensor();
    ctx->save_for_backward({input, weight, conv_bias.value_or(Tensor()),
                            bn_weight.value_or(Tensor()), kept_out, conv_out, mean, invstd});
    save_conv(ctx, stride, padding, dilation, groups);
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
  }
  static variable_list gradients(AutogradContext* ctx, const variable_list& incoming) {
    const auto s = ctx->get_saved_variables();
    const NeedsGrad needs(ctx);
    // (output: any tensor of its shape where it is not read, see save)
    const Tensor& output = s[4].defined() ? s[4] : s[5];
    auto [gi, gw, gcb, gbw, gbb, gr] = below_autograd(
        conv_bn_relu_backward_op(), incoming[0], output, s[0], s[1], s[2], s[5], s[3], s[6], s[7],
        ints(ctx, "stride"), ints(ctx, "padding"), ints(ctx, "dilation"),
        ctx->saved_data["groups"].toInt(), flag(ctx, "training"), flag(ctx, "relu"),
        grads().mask(needs));
    return backward_result(grads(), ctx, needs, incoming, {gi, gw, gcb, gbw, gbb, gr});
  }
};

// ---- pooling ------------------------------------------------------------------------

struct MaxPool2dBackward : OpFunction<MaxPool2dBackward> {
  static const auto& op() { return max_pool2d_op(); }
  static const Differentiable<1>& grads() {
    static const Differentiable<1> d(op(), {"input"});
    return d;
  }
  static void save(AutogradContext* ctx, const std::tuple<Tensor, Tensor>& r, const Tensor& input,
                   Ints kernel_size, Ints stride, Ints padding, Ints dilation, bool) {
    ctx->mark_non_differentiable({std::get<1>(r)});
    ctx->save_for_backward({input, std::get<1>(r)});
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
  }
  static variable_list gradients(AutogradContext* ctx, const variable_list& incoming) {
    const auto s = ctx->get_saved_variables();
    const Tensor gi = below_autograd(max_pool2d_backward_op(), incoming[0], s[0], s[1],
                                     ints(ctx, "kernel_size"), ints(ctx, "stride"),
                                     ints(ctx, "padding"), ints(ctx, "dilation"));
    return backward_result(grads(), ctx, NeedsGrad(ctx), incoming, {gi});
  }
};

struct AvgPool2dBackward : OpFunction<AvgPool2dBackward> {
  static const auto& op() { return avg_pool2d_op(); }
  static const Differentiable<1>& grads() {
    static const Differentiable<1> d(op(), {"input"});
    return d;
  }
  static void save(AutogradContext* ctx, const Tensor&, const Tensor& input, Ints kernel_size,
                   Ints stride, Ints padding, bool ceil_mode, bool count_include_pad,
                   c10::optional<int64_t> divisor_override) {
    ctx->save_for_backward({input});
    auto& d = ctx->saved_data;
    d["kernel_size"] = kernel_size;
    d["stride"] = stride;
    d["padding"] = padding;
    d["ceil_mode"] = ceil_mode;
    d["count_include_pad"] = count_include_pad;
    d["divisor_override"] = divisor_override;
  }
  static variable_list gradients(AutogradContext* ctx, const variable_list& incoming) {
    const auto s = ctx->get_saved_variables();
    const Tensor gi = below_autograd(
        avg_pool2d_backward_op(), incoming[0], s[0], ints(ctx, "kernel_size"),
        ints(ctx, "stride"), ints(ctx, "padding"), flag(ctx, "ceil_mode"),
        flag(ctx, "count_include_pad"), ctx->saved_data["divisor_override"].toOptional<int64_t>());
    return backward_result(grads(), ctx, NeedsGrad(ctx), incoming, {gi});
  }
};

struct AdaptiveAvgPool2dBackward : OpFunction<AdaptiveAvgPool2dBackward> {
  static const auto& op() { return adaptive_avg_pool2d_op(); }
  static const Differentiable<1>& grads() {
    static const Differentiable<1> d(op(), {"input"});
    return d;
  }
  static void save(AutogradContext* ctx, const Tensor&, const Tensor& input, Ints) {
    ctx->save_for_backward({input});
  }
  static variable_list gradients(AutogradContext* ctx, const variable_list& incoming) {
    const auto s = ctx->get_saved_variables();
    const Tensor gi = below_autograd(adaptive_avg_pool2d_backward_op(), incoming[0], s[0]);
    return backward_result(grads(), ctx, NeedsGrad(ctx), incoming, {gi});
  }
};

// ---- elementwise ----------------------------------------------------------------------

struct AddReluBackward : OpFunction<AddReluBackward> {
  static const auto& op() { return add_relu_op(); }
  static const Differentiable<2>& grads() {
    static const Differentiable<2> d(op(), {"input", "other"});
    return d;
  }
  static void save(AutogradContext* ctx, const Tensor& out, const Tensor&, const Tensor&) {
    ctx->save_for_backward({out});
  }
  static variable_list gradients(AutogradContext* ctx, const variable_list& incoming) {
    const auto s = ctx->get_saved_variables();
    const Tensor g = below_autograd(add_relu_backward_op(), incoming[0], s[0]);
    return backward_result(grads(), ctx, NeedsGrad(ctx), incoming, {g, g});
  }
};

namespace {

// ---- the Autograd kernels -----------------------------------------------------------

// Whether a call's tensors need an autograd node: grad mode is on and one
// requires grad, or one carries a forward-mode tangent (which Function::apply
// refuses, naming the op). Other calls (inference under torch.no_grad, the
// forward of a frozen layer) go straight to the kernel: a node made and
// dropped costs several microseconds, a third of a small layer's time.
bool wants_autograd(const Tensor& t, bool grad_mode) {
  return t.defined() && ((grad_mode && t.requires_grad()) || t._fw_grad(/*level=*/0).defined());
}
bool wants_autograd(const OptTensor& t, bool grad_mode) {
  return t.has_value() && wants_autograd(*t, grad_mode);
}
template <typename T>
bool wants_autograd(const T&, bool) {
  return false;
}

// A Function's outputs as the op's tuple of tensors.
template <typename Result, size_t... i>
Result as_tuple(const variable_list& outputs, std::index_sequence<i...>) {
  return Result(outputs[i]...);
}

// The Autograd kernel of the op of Function Fn, with the op's own signature:
// the op's result through Fn (its autograd node) when a tensor needs one, else
// from the kernel below autograd.
template <typename Fn, typename Handle = std::decay_t<decltype(Fn::op())>>
struct Kernel;

template <typename Fn, typename Result, typename... Params>
struct Kernel<Fn, c10::TypedOperatorHandle<Result(Params...)>> {
  static Result call(Params... args) {
    const bool grad_mode = at::GradMode::is_enabled();
    if (!(wants_autograd(args, grad_mode) || ...)) return below_autograd(Fn::op(), args...);
    if constexpr (std::is_same_v<Result, Tensor>) {
      return Fn::apply(args...);
    } else {
      return as_tuple<Result>(Fn::apply(args...),
                              std::make_index_sequence<std::tuple_size_v<Result>>{});
    }
  }
};

// conv_bn_relu_inference and conv_bn_relu_into_residual have no gradient
// (cnnops calls them outside autograd): where autograd would record one, an
// error naming the op to use instead.
template <typename... Args>
void check_inference_only(const char* name, const Args&... args) {
  const bool g = at::GradMode::is_enabled();
  TORCH_CHECK(!(wants_autograd(args, g) || ...), "cnnops::", name,
              " is inference only: it has no gradient; call it under torch.no_grad(), or use "
              "cnnops::conv_bn_relu");
}

Tensor conv_bn_relu_inference_autograd(const Tensor& input, const Tensor& weight,
                                       const OptTensor& conv_bias, const OptTensor& bn_weight,
                                       const OptTensor& bn_bias, const Tensor& running_mean,
                                       const Tensor& running_var, const OptTensor& residual,
                                       Ints stride, Ints padding, Ints dilation, int64_t groups,
                                       double eps, bool relu) {
  check_inference_only("conv_bn_relu_inference", input, weight, conv_bias, bn_weight, bn_bias,
                       residual);
  return below_autograd(conv_bn_relu_inference_op(), input, weight, conv_bias, bn_weight,
                        bn_bias, running_mean, running_var, residual, stride, padding, dilation,
                        groups, eps, relu);
}

// conv_bn_relu_into_residual: the residual's version is counted as every
// in-place op counts it.
void conv_bn_relu_into_residual_autograd(const Tensor& residual, const Tensor& input,
                                         const Tensor& weight, const OptTensor& conv_bias,
                                         const OptTensor& bn_weight, const OptTensor& bn_bias,
                                         const Tensor& running_mean, const Tensor& running_var,
                                         Ints stride, Ints padding, Ints dilation, int64_t groups,
                                         double eps, bool relu) {
  check_inference_only("conv_bn_relu_into_residual", residual, input, weight, conv_bias,
                       bn_weight, bn_bias);
  below_autograd(conv_bn_relu_into_residual_op(), residual, input, weight, conv_bias, bn_weight,
                 bn_bias, running_mean, running_var, stride, padding, dilation, groups, eps,
                 relu);
  if (!residual.is_inference()) residual.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnops, Autograd, m) {
  m.impl("conv2d", &Kernel<Conv2dBackward>::call);
  m.impl("conv2d_relu", &Kernel<Conv2dReluBackward>::call);
  m.impl("batch_norm", &Kernel<BatchNormBackward>::call);
  m.impl("bn_relu", &Kernel<BnReluBackward>::call);
  m.impl("conv_bn_relu", &Kernel<ConvBnReluBackward>::call);
  m.impl("max_pool2d", &Kernel<MaxPool2dBackward>::call);
  m.impl("avg_pool2d", &Kernel<AvgPool2dBackward>::call);
  m.impl("adaptive_avg_pool2d", &Kernel<AdaptiveAvgPool2dBackward>::call);
  m.impl("add_relu", &Kernel<AddReluBackward>::call);
  m.impl("conv_bn_relu_inference", &conv_bn_relu_inference_autograd);
  m.impl("conv_bn_relu_into_residual", &conv_bn_relu_into_residual_autograd);
}

}  // namespace cnnops
