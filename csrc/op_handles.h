// The typed dispatcher handle of each cnnops op, `name_op()`, looked up at its
// first call: the C++ signatures of the schemas of csrc/cnnops.cpp, written
// once for the files that call ops through the dispatcher (csrc/autograd.cpp,
// csrc/autocast.cpp). Arguments are found by their schema names
// (arg_position), not by numbers written at the call sites.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace cnnops {
namespace ops {

using at::Tensor;
using OptTensor = c10::optional<at::Tensor>;
using Ints = at::IntArrayRef;
template <size_t n>
using Mask = std::array<bool, n>;

#define CNNOPS_OP(fn, name, ...)                                                                  \
  inline const c10::TypedOperatorHandle<__VA_ARGS__>& fn() {                                      \
    static const auto handle =                                                                    \
        c10::Dispatcher::singleton().findSchemaOrThrow("cnnops::" name, "").typed<__VA_ARGS__>(); \
    return handle;                                                                                \
  }

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
CNNOPS_OP(conv_bn_relu_inference_op, "conv_bn_relu_inference",
          Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                 const OptTensor&, const Tensor&, const Tensor&, const OptTensor&, Ints, Ints,
                 Ints, int64_t, double, bool))
CNNOPS_OP(conv_bn_relu_into_residual_op, "conv_bn_relu_into_residual",
          void(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
               const OptTensor&, const Tensor&, const Tensor&, Ints, Ints, Ints, int64_t, double,
               bool))
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

// The position of argument `name` in op's schema.
inline size_t arg_position(const c10::OperatorHandle& op, const char* name) {
  const auto position = op.schema().argumentIndexWithName(name);
  TORCH_INTERNAL_ASSERT(position.has_value(), op.schema().name(), " has no argument ", name);
  return static_cast<size_t>(*position);
}

}  // namespace ops
}  // namespace cnnops
