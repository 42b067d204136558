// The one operator library of cnnops: every schema, forward and backward.
//
// Device files (csrc/cpu/*.cpp, csrc/cuda/*.cu) only implement these with
// TORCH_LIBRARY_IMPL; csrc/autograd.cpp registers the autograd kernels (one
// torch::autograd::Function per forward op, calling its backward op). Fake
// (meta) kernels are registered from Python (cnnops/ops.py).
//
// Conventions shared by every op:
//  * Ops never mutate their inputs. Training-mode BatchNorm returns the batch
//    mean and inverse standard deviation; the Python layer updates running
//    statistics with the one in-place op, update_running_stats (one kernel, not
//    a dozen small tensor ops per BN layer). This keeps torch.compile and
//    opcheck simple.
//  * Backward ops take `output_mask` (which gradients are wanted) and return an
//    empty tensor (shape [0]) for each gradient that was not asked for.
//  * Outputs are channels_last when the input is channels_last (and not also
//    contiguous), NCHW-contiguous otherwise: see cnnops::output_memory_format.
//  * save_mean / save_invstd are float32 for half/bfloat16 inputs, else the
//    input dtype. In inference they hold running_mean and 1/sqrt(running_var+eps).
//    The BN weight and bias gradients have that dtype too (as aten's batch
//    norm); a conv bias gradient has the input's.

#include <Python.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/conv_core.h"
#include "cpu/vectorised.h"

// `import cnnops._C` loads this library, whose static initialisers register the
// ops below. The module's only functions set and report the CPU convolution
// core (cnnops.set_cpu_conv, cnnops.cpu_conv_choices, cnnops.explain) and the
// vectorised kernels' instruction set (cnnops.explain_table): process
// settings, not ops, so they stay out of the op library and of torch.compile.
namespace {

using cnnops::cpu::CoreMode;

PyObject* records_to_list(const std::vector<cnnops::cpu::ChoiceRecord>& records) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(records.size()));
  for (size_t i = 0; i < records.size(); ++i) {
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i),
                    Py_BuildValue("(sss)", records[i].key.c_str(), records[i].core.c_str(),
                                  records[i].reason.c_str()));
  }
  return list;
}

// _cpu_conv_mode() -> "auto" | "im2col" | "onednn" | "winograd"
PyObject* cpu_conv_mode(PyObject*, PyObject*) {
  const CoreMode mode = cnnops::cpu::core_mode();
  return PyUnicode_FromString(mode == CoreMode::Auto       ? "auto"
                              : mode == CoreMode::Im2col   ? "im2col"
                              : mode == CoreMode::OneDNN   ? "onednn"
                                                           : "winograd");
}

// _set_cpu_conv_mode(mode: str); the caller (cnnops.backends) validates it.
PyObject* set_cpu_conv_mode(PyObject*, PyObject* arg) {
  const char* mode = PyUnicode_AsUTF8(arg);
  if (mode == nullptr) return nullptr;
  if (std::strcmp(mode, "auto") == 0) {
    cnnops::cpu::set_core_mode(CoreMode::Auto);
  } else if (std::strcmp(mode, "im2col") == 0) {
    cnnops::cpu::set_core_mode(CoreMode::Im2col);
  } else if (std::strcmp(mode, "onednn") == 0) {
    cnnops::cpu::set_core_mode(CoreMode::OneDNN);
  } else if (std::strcmp(mode, "winograd") == 0) {
    cnnops::cpu::set_core_mode(CoreMode::Winograd);
  } else {
    PyErr_Format(PyExc_ValueError, "expected 'auto', 'im2col', 'onednn' or 'winograd', got %R",
                 arg);
    return nullptr;
  }
  Py_RETURN_NONE;
}

// _cpu_conv_choices() -> [(configuration, core, reason)]: every measured choice.
PyObject* cpu_conv_choices(PyObject*, PyObject*) {
  return records_to_list(cnnops::cpu::recorded_choices());
}

// _cpu_conv_trace(on: bool) -> [(configuration, core, reason)]: the calls
// traced since the last switch, which it clears.
PyObject* cpu_conv_trace(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  PyObject* out = records_to_list(cnnops::cpu::take_trace());
  cnnops::cpu::set_trace(on != 0);
  return out;
}

// _cpu_vector_level() -> str: the instruction set the vectorised CPU kernels
// run at here (cpu/vectorised.h).
PyObject* cpu_vector_level(PyObject*, PyObject*) {
  return PyUnicode_FromString(cnnops::cpu::vector_level());
}

PyMethodDef methods[] = {
    {"_cpu_conv_mode", cpu_conv_mode, METH_NOARGS, nullptr},
    {"_set_cpu_conv_mode", set_cpu_conv_mode, METH_O, nullptr},
    {"_cpu_conv_choices", cpu_conv_choices, METH_NOARGS, nullptr},
    {"_cpu_conv_trace", cpu_conv_trace, METH_O, nullptr},
    {"_cpu_vector_level", cpu_vector_level, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(cnnops, m) {
  // ---- convolution (cross-correlation) ----------------------------------
  // input [N, C, H, W], weight [OC, C/groups, KH, KW], bias [OC] -> [N, OC, OH, OW]
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // -> (grad_input, grad_weight, grad_bias)
  m.def("conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // relu(conv2d(input) + residual?): the conv -> ReLU of networks without BN.
  // Its backward is add_relu_backward (the ReLU mask) followed by conv2d_backward.
  m.def("conv2d_relu(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");

  // ---- batch normalisation ----------------------------------------------
  // -> (output, save_mean, save_invstd)
  // (arguments in torch.nn.functional.batch_norm's order, as cnnops.functional)
  m.def("batch_norm(Tensor input, Tensor? running_mean, Tensor? running_var, "
        "Tensor? weight, Tensor? bias, bool training, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  // -> (grad_input, grad_weight, grad_bias)
  m.def("batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, "
        "Tensor save_mean, Tensor save_invstd, bool training, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // running = (1 - momentum) * running + momentum * batch, in place, from a
  // training forward's save_mean / save_invstd over `count` values per channel:
  // running_var takes the unbiased variance 1/save_invstd^2 - eps, times
  // count / (count - 1). count == 0 (an empty batch) changes nothing.
  m.def("update_running_stats(Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor save_mean, Tensor save_invstd, int count, float momentum, float eps) -> ()");

  // ---- synchronised BatchNorm (cnnops/distributed.py) ------------------------
  // A BatchNorm whose statistics span several processes runs in phases around
  // its collectives. The apply pass is bn_relu with training=False, the global
  // mean and variance standing in for running_mean / running_var; the backward
  // takes this process's sums from bn_relu_backward (grad_weight = sum(gy * xhat),
  // grad_bias = sum(gy)) and, once they are summed over the processes,
  // finishes with bn_relu_backward_elemt.
  // Per-channel mean and biased variance of this process's batch:
  // input [N, C, H, W] with N*H*W > 0 -> ([C], [C]) in the statistics dtype.
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  // The input and residual gradients of relu?(batch_norm(input) + residual?)
  // from the gradient means over the whole batch (every process's):
  // mean_dy = sum(gy) / count, mean_dy_xhat = sum(gy * xhat) / count, with gy
  // the gradient through the ReLU and xhat = (input - save_mean) * save_invstd.
  // grad_input = weight * save_invstd * (gy - mean_dy - xhat * mean_dy_xhat),
  // grad_residual = gy. -> (grad_input, grad_residual)
  m.def("bn_relu_backward_elemt(Tensor grad_output, Tensor? output, Tensor input, "
        "Tensor? weight, Tensor save_mean, Tensor save_invstd, Tensor mean_dy, "
        "Tensor mean_dy_xhat, bool relu, bool[2] output_mask) -> (Tensor, Tensor)");

  // relu?(batch_norm(input) + residual?) -> (output, save_mean, save_invstd)
  m.def("bn_relu(Tensor input, Tensor? running_mean, Tensor? running_var, "
        "Tensor? weight, Tensor? bias, Tensor? residual, "
        "bool training, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  // output is the forward result (its sign is the ReLU mask); may be None when relu=False.
  // -> (grad_input, grad_weight, grad_bias, grad_residual)
  m.def("bn_relu_backward(Tensor grad_output, Tensor? output, Tensor input, "
        "Tensor? weight, Tensor save_mean, Tensor save_invstd, bool training, "
        "bool relu, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // relu?(batch_norm(conv2d(input)) + residual?)
  // -> (output, conv_output, save_mean, save_invstd); conv_output (the
  // pre-normalisation activations, needed by the training backward) is an
  // empty tensor in inference, where BN is folded into the convolution.
  m.def("conv_bn_relu(Tensor input, Tensor weight, Tensor? conv_bias, "
        "Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, "
        "Tensor? running_var, Tensor? residual, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool training, float eps, bool relu) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Inference (BN from its running statistics) -> output alone: conv_bn_relu
  // with training=false, none of the statistics made. CPU only, no autograd:
  // cnnops.nn._inference_op runs it for an inference call outside autograd
  // (FusedConvBNReLU, apply_conv_bn_relu, cnnops.fuse), where nothing reads the
  // statistics.
  m.def("conv_bn_relu_inference(Tensor input, Tensor weight, Tensor? conv_bias, "
        "Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, Tensor running_var, "
        "Tensor? residual, int[2] stride, int[2] padding, int[2] dilation, int groups, "
        "float eps, bool relu) -> Tensor");
  // Inference (BN from its running statistics) with the result written into
  // residual, which must not share memory with the input:
  // residual = relu?(batch_norm(conv2d(input)) + residual). CPU only, no
  // autograd: cnnops.fuse runs it for a residual add whose residual nothing
  // reads afterwards, saving the output's allocation and a cold write.
  m.def("conv_bn_relu_into_residual(Tensor(a!) residual, Tensor input, Tensor weight, "
        "Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, "
        "Tensor running_var, int[2] stride, int[2] padding, int[2] dilation, int groups, "
        "float eps, bool relu) -> ()");
  // -> (grad_input, grad_weight, grad_conv_bias, grad_bn_weight, grad_bn_bias, grad_residual)
  // conv_bias is needed only in inference, to recompute conv_output when the
  // BN weight gradient is asked for (BN affine trained with frozen statistics).
  m.def("conv_bn_relu_backward(Tensor grad_output, Tensor output, Tensor input, "
        "Tensor weight, Tensor? conv_bias, Tensor conv_output, Tensor? bn_weight, "
        "Tensor save_mean, "
        "Tensor save_invstd, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups, bool training, bool relu, bool[6] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- pooling ------------------------------------------------------------
  // -> (output, indices); indices are int64 flat offsets into each H*W plane.
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  // The window geometry (as in aten's max_pool2d_with_indices_backward) lets a
  // kernel gather: each input element visits only the windows that can hold it.
  m.def("max_pool2d_backward(Tensor grad_output, Tensor input, Tensor indices, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def("avg_pool2d(Tensor input, int[2] kernel_size, int[2] stride, "
        "int[2] padding, bool ceil_mode, bool count_include_pad, "
        "int? divisor_override) -> Tensor");
  m.def("avg_pool2d_backward(Tensor grad_output, Tensor input, "
        "int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
        "bool count_include_pad, int? divisor_override) -> Tensor");
  m.def("adaptive_avg_pool2d(Tensor input, int[2] output_size) -> Tensor");
  m.def("adaptive_avg_pool2d_backward(Tensor grad_output, Tensor input) -> Tensor");

  // ---- elementwise ----------------------------------------------------------
  // relu(input + other), same shape and dtype (broadcasting happens in Python).
  m.def("add_relu(Tensor input, Tensor other) -> Tensor");
  m.def("add_relu_backward(Tensor grad_output, Tensor output) -> Tensor");
}
