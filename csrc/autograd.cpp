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
// cnnops/ops.py, register_autograd.

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace cnnops {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

// The typed dispatcher handle of each op, looked up once: `name_op()`.
#define CNNOPS_OP(fn, name, ...)                                                                  \
  const c10::TypedOperatorHandle<__VA_ARGS__>& fn() {                                             \
    static const auto handle =                                                                    \
        c10::Dispatcher::singleton().findSchemaOrThrow("cnnops::" name, "").typed<__VA_ARGS__>(); \
    return handle;                                                                                \
  }

using Ints = at::IntArrayRef;
template <size_t n>
using Mask = std::array<bool, n>;

CNNOPS_OP(conv2d_op, "conv2d",
          Tensor(const Tensor&, const Tensor&, const OptTensor&, Ints, Ints, Ints, int64_t))
CNNOPS_OP(conv2d_backward_op, "conv2d_backward",
          std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, Ints,
                                             Ints, Ints, int64_t, Mask<3>))
CNNOPS_OP(conv2d_relu_op, "conv2d_relu",
          Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, Ints, Ints, Ints,
                 int64_t))
CNNOPS_OP(batch_norm_op, "batch_norm",
          std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                             const OptTensor&, const OptTensor&, bool, double))
CNNOPS_OP(batch_norm_backward_op, "batch_norm_backward",
          std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                             const Tensor&, const Tensor&, bool, Mask<3>))
CNNOPS_OP(bn_relu_op, "bn_relu",
          std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                             const OptTensor&, const OptTensor&, const OptTensor&,
                                             bool, double, bool))
CNNOPS_OP(bn_relu_backward_op, "bn_relu_backward",
          std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                     const OptTensor&, const Tensor&, const Tensor&,
                                                     bool, bool, Mask<4>))
CNNOPS_OP(conv_bn_relu_op, "conv_bn_relu",
          std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                     const OptTensor&, const OptTensor&,
                                                     const OptTensor&, const OptTensor&,
                                                     const OptTensor&, Ints, Ints, Ints, int64_t,
                                                     bool, double, bool))
CNNOPS_OP(conv_bn_relu_backward_op, "conv_bn_relu_backward",
          std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
              const Tensor&, const OptTensor&, const Tensor&, const Tensor&, Ints, Ints, Ints,
              int64_t, bool, bool, Mask<6>))
CNNOPS_OP(max_pool2d_op, "max_pool2d",
          std::tuple<Tensor, Tensor>(const Tensor&, Ints, Ints, Ints, Ints, bool))
CNNOPS_OP(max_pool2d_backward_op, "max_pool2d_backward",
          Tensor(const Tensor&, const Tensor&, const Tensor&, Ints, Ints, Ints, Ints))
CNNOPS_OP(avg_pool2d_op, "avg_pool2d",
          Tensor(const Tensor&, Ints, Ints, Ints, bool, bool, c10::optional<int64_t>))
CNNOPS_OP(avg_pool2d_backward_op, "avg_pool2d_backward",
          Tensor(const Tensor&, const Tensor&, Ints, Ints, Ints, bool, bool,
                 c10::optional<int64_t>))
CNNOPS_OP(adaptive_avg_pool2d_op, "adaptive_avg_pool2d", Tensor(const Tensor&, Ints))
CNNOPS_OP(adaptive_avg_pool2d_backward_op, "adaptive_avg_pool2d_backward",
          Tensor(const Tensor&, const Tensor&))
CNNOPS_OP(add_relu_op, "add_relu", Tensor(const Tensor&, const Tensor&))
CNNOPS_OP(add_relu_backward_op, "add_relu_backward", Tensor(const Tensor&, const Tensor&))
#undef CNNOPS_OP

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

template <typename... Args>
void save_tensor_args(AutogradContext* ctx, const Args&... args) {
  TensorArgs a;
  (a(args), ...);
  ctx->saved_data["tensor_args"] = a.mask;
}

// Which of a forward's arguments need a gradient, by argument position.
class NeedsGrad {
 public:
  explicit NeedsGrad(AutogradContext* ctx) {
    const int64_t mask = ctx->saved_data["tensor_args"].toInt();
    for (int64_t arg = 0, edge = 0; arg < 64; ++arg) {
      needs_[arg] = ((mask >> arg) & 1) && ctx->needs_input_grad(edge++);
    }
  }
  // The output_mask of a backward op whose gradients are those of `args`.
  template <size_t n>
  std::array<bool, n> mask(std::array<size_t, n> args) const {
    std::array<bool, n> m;
    for (size_t i = 0; i < n; ++i) m[i] = needs_[args[i]];
    return m;
  }
  // `g` for an argument that needs it, else undefined (backward ops return an
  // empty tensor for gradients not asked for).
  Tensor operator()(size_t arg, const Tensor& g) const { return needs_[arg] ? g : Tensor(); }

 private:
  std::array<bool, 64> needs_{};
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

// What a backward returns for the op `name` with `n_args` arguments: `grads`
// for the first ones, undefined for the rest (non-tensor arguments included).
//
// The backward ops have no derivatives of their own. Under create_graph=True
// (grad mode on during backward), when the gradients depend on something that
// requires grad (the backward's `incoming` gradients or its saved tensors),
// they are attached to a node that raises, naming the op, when a second
// backward reaches it, rather than coming back as constants that silently
// drop out of second derivatives.
variable_list backward_result(const char* name, AutogradContext* ctx, const variable_list& incoming,
                              variable_list grads, size_t n_args) {
  grads.resize(n_args);
  if (!at::GradMode::is_enabled()) return grads;
  variable_list sources = ctx->get_saved_variables();
  sources.insert(sources.end(), incoming.begin(), incoming.end());
  if (!torch::autograd::compute_requires_grad(sources)) return grads;
  const auto error = make_node<torch::autograd::Error>(
      std::string("cnnops::") + name +
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

// conv2d_backward of a saved conv, for the gradient `grad` of its output.
std::tuple<Tensor, Tensor, Tensor> conv_backward(AutogradContext* ctx, const NeedsGrad& needs,
                                                 const Tensor& grad, const Tensor& input,
                                                 const Tensor& weight) {
  return below_autograd(conv2d_backward_op(), grad, input, weight, ints(ctx, "stride"),
                        ints(ctx, "padding"), ints(ctx, "dilation"),
                        ctx->saved_data["groups"].toInt(), needs.mask<3>({0, 1, 2}));
}

}  // namespace

// The Functions are named after the graph node they make (out.grad_fn prints
// as torch::autograd::CppNode<cnnops::Conv2dBackward>), hence outside the
// anonymous namespace.

// ---- convolution --------------------------------------------------------------

struct Conv2dBackward : torch::autograd::Function<Conv2dBackward> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const OptTensor& bias, Ints stride, Ints padding, Ints dilation,
                        int64_t groups) {
    ctx->save_for_backward({input, weight});
    save_tensor_args(ctx, input, weight, bias, stride, padding, dilation, groups);
    save_conv(ctx, stride, padding, dilation, groups);
    return below_autograd(conv2d_op(), input, weight, bias, stride, padding, dilation, groups);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const NeedsGrad needs(ctx);
    auto [gi, gw, gb] = conv_backward(ctx, needs, grads[0], s[0], s[1]);
    return backward_result("conv2d", ctx, grads, {needs(0, gi), needs(1, gw), needs(2, gb)}, 7);
  }
};

struct Conv2dReluBackward : torch::autograd::Function<Conv2dReluBackward> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const OptTensor& bias, const OptTensor& residual, Ints stride, Ints padding,
                        Ints dilation, int64_t groups) {
    Tensor out = below_autograd(conv2d_relu_op(), input, weight, bias, residual, stride, padding,
                                dilation, groups);
    ctx->save_for_backward({input, weight, out});
    save_tensor_args(ctx, input, weight, bias, residual, stride, padding, dilation, groups);
    save_conv(ctx, stride, padding, dilation, groups);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const NeedsGrad needs(ctx);
    // Through the ReLU: also the residual's gradient.
    const Tensor g = below_autograd(add_relu_backward_op(), grads[0], s[2]);
    auto [gi, gw, gb] = conv_backward(ctx, needs, g, s[0], s[1]);
    return backward_result("conv2d_relu", ctx, grads,
                           {needs(0, gi), needs(1, gw), needs(2, gb), needs(3, g)}, 8);
  }
};

// ---- batch normalisation ---------------------------------------------------------

// (output, save_mean, save_invstd) as the forward's outputs; the statistics
// have no gradient.
variable_list with_stats(AutogradContext* ctx, const std::tuple<Tensor, Tensor, Tensor>& r) {
  ctx->mark_non_differentiable({std::get<1>(r), std::get<2>(r)});
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

struct BatchNormBackward : torch::autograd::Function<BatchNormBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double eps) {
    const auto r = below_autograd(batch_norm_op(), input, weight, bias, running_mean, running_var,
                                  training, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), std::get<1>(r), std::get<2>(r)});
    save_tensor_args(ctx, input, weight, bias, running_mean, running_var, training, eps);
    ctx->saved_data["training"] = training;
    return with_stats(ctx, r);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const NeedsGrad needs(ctx);
    auto [gi, gw, gb] =
        below_autograd(batch_norm_backward_op(), grads[0], s[0], s[1], s[2], s[3],
                       ctx->saved_data["training"].toBool(), needs.mask<3>({0, 1, 2}));
    return backward_result("batch_norm", ctx, grads, {needs(0, gi), needs(1, gw), needs(2, gb)}, 7);
  }
};

struct BnReluBackward : torch::autograd::Function<BnReluBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& residual,
                               bool training, double eps, bool relu) {
    const auto r = below_autograd(bn_relu_op(), input, weight, bias, running_mean, running_var,
                                  residual, training, eps, relu);
    ctx->save_for_backward({input, weight.value_or(Tensor()), std::get<1>(r), std::get<2>(r),
                            relu ? std::get<0>(r) : Tensor()});
    save_tensor_args(ctx, input, weight, bias, running_mean, running_var, residual, training, eps,
                     relu);
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    return with_stats(ctx, r);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const NeedsGrad needs(ctx);
    auto [gi, gw, gb, gr] =
        below_autograd(bn_relu_backward_op(), grads[0], s[4], s[0], s[1], s[2], s[3],
                       ctx->saved_data["training"].toBool(), ctx->saved_data["relu"].toBool(),
                       needs.mask<4>({0, 1, 2, 5}));
    return backward_result(
        "bn_relu", ctx, grads,
        {needs(0, gi), needs(1, gw), needs(2, gb), Tensor(), Tensor(), needs(5, gr)}, 9);
  }
};

struct ConvBnReluBackward : torch::autograd::Function<ConvBnReluBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const OptTensor& conv_bias, const OptTensor& bn_weight,
                               const OptTensor& bn_bias, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& residual, Ints stride,
                               Ints padding, Ints dilation, int64_t groups, bool training,
                               double eps, bool relu) {
    auto [out, conv_out, mean, invstd] = below_autograd(
        conv_bn_relu_op(), input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
        residual, stride, padding, dilation, groups, training, eps, relu);
    ctx->mark_non_differentiable({conv_out, mean, invstd});
    // The training backward reads the output only for the ReLU mask: without a ReLU it is
    // not kept (a conv -> BN whose output feeds a residual add would keep it for nothing).
    const Tensor kept_out = (relu || !training) ? out : Tensor();
    ctx->save_for_backward({input, weight, conv_bias.value_or(Tensor()),
                            bn_weight.value_or(Tensor()), kept_out, conv_out, mean, invstd});
    save_tensor_args(ctx, input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                     residual, stride, padding, dilation, groups, training, eps, relu);
    save_conv(ctx, stride, padding, dilation, groups);
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    return {out, conv_out, mean, invstd};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const NeedsGrad needs(ctx);
    // (output: any tensor of its shape where it is not read, see forward)
    const Tensor& output = s[4].defined() ? s[4] : s[5];
    auto [gi, gw, gcb, gbw, gbb, gr] =
        below_autograd(conv_bn_relu_backward_op(), grads[0], output, s[0], s[1], s[2], s[5], s[3],
                       s[6], s[7], ints(ctx, "stride"), ints(ctx, "padding"), ints(ctx, "dilation"),
                       ctx->saved_data["groups"].toInt(), ctx->saved_data["training"].toBool(),
                       ctx->saved_data["relu"].toBool(), needs.mask<6>({0, 1, 2, 3, 4, 7}));
    return backward_result("conv_bn_relu", ctx, grads,
                           {needs(0, gi), needs(1, gw), needs(2, gcb), needs(3, gbw), needs(4, gbb),
                            Tensor(), Tensor(), needs(7, gr)},
                           15);
  }
};

// ---- pooling ------------------------------------------------------------------------

struct MaxPool2dBackward : torch::autograd::Function<MaxPool2dBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, Ints kernel_size,
                               Ints stride, Ints padding, Ints dilation, bool ceil_mode) {
    auto [out, indices] =
        below_autograd(max_pool2d_op(), input, kernel_size, stride, padding, dilation, ceil_mode);
    ctx->mark_non_differentiable({indices});
    ctx->save_for_backward({input, indices});
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    return {out, indices};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    return backward_result(
        "max_pool2d", ctx, grads,
        {below_autograd(max_pool2d_backward_op(), grads[0], s[0], s[1], ints(ctx, "kernel_size"),
                        ints(ctx, "stride"), ints(ctx, "padding"), ints(ctx, "dilation"))},
        6);
  }
};

struct AvgPool2dBackward : torch::autograd::Function<AvgPool2dBackward> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, Ints kernel_size, Ints stride,
                        Ints padding, bool ceil_mode, bool count_include_pad,
                        c10::optional<int64_t> divisor_override) {
    ctx->save_for_backward({input});
    auto& d = ctx->saved_data;
    d["kernel_size"] = kernel_size;
    d["stride"] = stride;
    d["padding"] = padding;
    d["ceil_mode"] = ceil_mode;
    d["count_include_pad"] = count_include_pad;
    d["divisor_override"] = divisor_override;
    return below_autograd(avg_pool2d_op(), input, kernel_size, stride, padding, ceil_mode,
                          count_include_pad, divisor_override);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    return backward_result(
        "avg_pool2d", ctx, grads,
        {below_autograd(avg_pool2d_backward_op(), grads[0], s[0], ints(ctx, "kernel_size"),
                        ints(ctx, "stride"), ints(ctx, "padding"), d["ceil_mode"].toBool(),
                        d["count_include_pad"].toBool(),
                        d["divisor_override"].toOptional<int64_t>())},
        7);
  }
};

struct AdaptiveAvgPool2dBackward : torch::autograd::Function<AdaptiveAvgPool2dBackward> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, Ints output_size) {
    ctx->save_for_backward({input});
    return below_autograd(adaptive_avg_pool2d_op(), input, output_size);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    return backward_result("adaptive_avg_pool2d", ctx, grads,
                           {below_autograd(adaptive_avg_pool2d_backward_op(), grads[0], s[0])}, 2);
  }
};

// ---- elementwise ----------------------------------------------------------------------

struct AddReluBackward : torch::autograd::Function<AddReluBackward> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& other) {
    Tensor out = below_autograd(add_relu_op(), input, other);
    ctx->save_for_backward({out});
    save_tensor_args(ctx, input, other);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const NeedsGrad needs(ctx);
    const Tensor g = below_autograd(add_relu_backward_op(), grads[0], s[0]);
    return backward_result("add_relu", ctx, grads, {needs(0, g), needs(1, g)}, 2);
  }
};

namespace {

// ---- the Autograd kernels (the ops' own signatures) -------------------------------

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

// The op's result, through Function Fn (its autograd node) when a tensor needs
// one, else from the kernel below autograd.
template <typename Fn, typename Result, typename... Params, typename... Args>
Result autograd_call(const c10::TypedOperatorHandle<Result(Params...)>& op, const Args&... args) {
  const bool grad_mode = at::GradMode::is_enabled();
  if (!(wants_autograd(args, grad_mode) || ...)) return below_autograd(op, args...);
  if constexpr (std::is_same_v<Result, Tensor>) {
    return Fn::apply(args...);
  } else {
    return as_tuple<Result>(Fn::apply(args...),
                            std::make_index_sequence<std::tuple_size_v<Result>>{});
  }
}

Tensor conv2d_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                       Ints stride, Ints padding, Ints dilation, int64_t groups) {
  return autograd_call<Conv2dBackward>(conv2d_op(), input, weight, bias, stride, padding,
                                       dilation, groups);
}

Tensor conv2d_relu_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                            const OptTensor& residual, Ints stride, Ints padding, Ints dilation,
                            int64_t groups) {
  return autograd_call<Conv2dReluBackward>(conv2d_relu_op(), input, weight, bias, residual,
                                           stride, padding, dilation, groups);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_autograd(const Tensor& input, const OptTensor& weight,
                                                       const OptTensor& bias,
                                                       const OptTensor& running_mean,
                                                       const OptTensor& running_var, bool training,
                                                       double eps) {
  return autograd_call<BatchNormBackward>(batch_norm_op(), input, weight, bias, running_mean,
                                          running_var, training, eps);
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_autograd(const Tensor& input, const OptTensor& weight,
                                                    const OptTensor& bias,
                                                    const OptTensor& running_mean,
                                                    const OptTensor& running_var,
                                                    const OptTensor& residual, bool training,
                                                    double eps, bool relu) {
  return autograd_call<BnReluBackward>(bn_relu_op(), input, weight, bias, running_mean,
                                       running_var, residual, training, eps, relu);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bn_relu_autograd(
    const Tensor& input, const Tensor& weight, const OptTensor& conv_bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& residual, Ints stride, Ints padding,
    Ints dilation, int64_t groups, bool training, double eps, bool relu) {
  return autograd_call<ConvBnReluBackward>(conv_bn_relu_op(), input, weight, conv_bias, bn_weight,
                                           bn_bias, running_mean, running_var, residual, stride,
                                           padding, dilation, groups, training, eps, relu);
}

std::tuple<Tensor, Tensor> max_pool2d_autograd(const Tensor& input, Ints kernel_size, Ints stride,
                                               Ints padding, Ints dilation, bool ceil_mode) {
  return autograd_call<MaxPool2dBackward>(max_pool2d_op(), input, kernel_size, stride, padding,
                                          dilation, ceil_mode);
}

Tensor avg_pool2d_autograd(const Tensor& input, Ints kernel_size, Ints stride, Ints padding,
                           bool ceil_mode, bool count_include_pad,
                           c10::optional<int64_t> divisor_override) {
  return autograd_call<AvgPool2dBackward>(avg_pool2d_op(), input, kernel_size, stride, padding,
                                          ceil_mode, count_include_pad, divisor_override);
}

Tensor adaptive_avg_pool2d_autograd(const Tensor& input, Ints output_size) {
  return autograd_call<AdaptiveAvgPool2dBackward>(adaptive_avg_pool2d_op(), input, output_size);
}

Tensor add_relu_autograd(const Tensor& input, const Tensor& other) {
  return autograd_call<AddReluBackward>(add_relu_op(), input, other);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnops, Autograd, m) {
  m.impl("conv2d", &conv2d_autograd);
  m.impl("conv2d_relu", &conv2d_relu_autograd);
  m.impl("batch_norm", &batch_norm_autograd);
  m.impl("bn_relu", &bn_relu_autograd);
  m.impl("conv_bn_relu", &conv_bn_relu_autograd);
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("avg_pool2d", &avg_pool2d_autograd);
  m.impl("adaptive_avg_pool2d", &adaptive_avg_pool2d_autograd);
  m.impl("add_relu", &add_relu_autograd);
}

}  // namespace cnnops
