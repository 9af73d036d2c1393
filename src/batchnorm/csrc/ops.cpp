// The CPU kernel primitives as operators of namespace batchnorm_cpu: schemas and CPU
// implementations. Python calls them eagerly from the operator implementations, so they carry
// no autograd or fake kernels. Only this file includes torch/library.h (slow to compile); the
// kernels (channel_*.cpp, rows.cpp) see ATen alone.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(batchnorm_cpu, m) {
  m.def("channel_stats(Tensor x, int chunk) -> (Tensor, Tensor)");
  m.def(
      "channel_normalize(Tensor x, Tensor mean, Tensor scale, Tensor shift, int chunk, "
      "str activation, float param) -> Tensor");
  m.def(
      "channel_backward_reduce(Tensor dy, Tensor x, Tensor mean, Tensor scale, Tensor shift, "
      "int chunk, str activation, float param) -> (Tensor, Tensor)");
  m.def(
      "channel_backward_input(Tensor dy, Tensor x, Tensor mean, Tensor scale, Tensor shift, "
      "Tensor k1, Tensor k0, Tensor k2, int chunk, str activation, float param) -> Tensor");
  m.def(
      "channel_normalize_residual(Tensor x, Tensor residual, Tensor mean, Tensor scale, "
      "Tensor shift, int chunk, str activation, float param) -> Tensor");
  m.def(
      "channel_backward_reduce_residual(Tensor dy, Tensor x, Tensor residual, Tensor mean, "
      "Tensor scale, Tensor shift, int chunk, str activation, float param) -> (Tensor, Tensor)");
  m.def(
      "channel_backward_input_residual(Tensor dy, Tensor x, Tensor residual, Tensor mean, "
      "Tensor scale, Tensor shift, Tensor k1, Tensor k0, Tensor k2, int chunk, "
      "str activation, float param) -> (Tensor, Tensor)");
  m.def("rows_forward(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rows_backward(Tensor dy, Tensor x, Tensor mean, Tensor invstd, Tensor? weight) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(batchnorm_cpu, CPU, m) {
  m.impl("channel_stats", &batchnorm_cpu::channel_stats);
  m.impl("channel_normalize", &batchnorm_cpu::channel_normalize);
  m.impl("channel_backward_reduce", &batchnorm_cpu::channel_backward_reduce);
  m.impl("channel_backward_input", &batchnorm_cpu::channel_backward_input);
  m.impl("channel_normalize_residual", &batchnorm_cpu::channel_normalize_residual);
  m.impl("channel_backward_reduce_residual", &batchnorm_cpu::channel_backward_reduce_residual);
  m.impl("channel_backward_input_residual", &batchnorm_cpu::channel_backward_input_residual);
  m.impl("rows_forward", &batchnorm_cpu::rows_forward);
  m.impl("rows_backward", &batchnorm_cpu::rows_backward);
}
