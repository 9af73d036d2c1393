// Direct Python entry points of the batchnorm:: operators, for eager calls. Each makes one
// typed call through the dispatcher, so autograd, autocast, the profiler, the JIT tracer and
// Python dispatch modes see the operator as they see a torch.ops call, and returns only the
// normalized output. torch.ops' generic binding converts every argument through the schema
// and wraps every output: several microseconds, a fair share of a small layer's call.
// batchnorm.ops decides when a call may come here: never under torch.compile or with a
// __torch_function__ override, which need the torch.ops object.
#include <pybind11/stl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

#include "signatures.h"

namespace {

namespace py = pybind11;
using at::Tensor;
using batchnorm_cpu::OptionalTensor;
using batchnorm_cpu::typed_operator;

// The first output of `call()`, run without the GIL (as torch's own bindings run operators);
// a C++ error becomes the Python exception torch raises for it.
template <typename Call>
Tensor first_output(Call call) {
  HANDLE_TH_ERRORS
  py::gil_scoped_release no_gil;
  return std::get<0>(call());
  END_HANDLE_TH_ERRORS_PYBIND
}

Tensor batch_norm(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                  const OptionalTensor& running_mean, const OptionalTensor& running_var,
                  const OptionalTensor& num_batches_tracked, bool training,
                  std::optional<double> momentum, double eps, int64_t axis, int64_t chunk,
                  const std::string& activation, double activation_param,
                  const std::optional<std::vector<double>>& renorm_clipping,
                  const OptionalTensor& renorm_mean, const OptionalTensor& renorm_var,
                  double renorm_momentum) {
  static const auto op =
      typed_operator<batchnorm_cpu::BatchNormSignature>("batchnorm::batch_norm");
  return first_output([&] {
    std::optional<at::ArrayRef<double>> clipping;
    if (renorm_clipping) clipping = *renorm_clipping;
    return op.call(input, weight, bias, running_mean, running_var, num_batches_tracked,
                   training, momentum, eps, axis, chunk, activation, activation_param, clipping,
                   renorm_mean, renorm_var, renorm_momentum);
  });
}

Tensor batch_norm_add(const Tensor& input, const Tensor& residual, const OptionalTensor& weight,
                      const OptionalTensor& bias, const OptionalTensor& running_mean,
                      const OptionalTensor& running_var,
                      const OptionalTensor& num_batches_tracked, bool training,
                      std::optional<double> momentum, double eps, int64_t axis, int64_t chunk,
                      const std::string& activation, double activation_param) {
  static const auto op =
      typed_operator<batchnorm_cpu::BatchNormAddSignature>("batchnorm::batch_norm_add");
  return first_output([&] {
    return op.call(input, residual, weight, bias, running_mean, running_var,
                   num_batches_tracked, training, momentum, eps, axis, chunk, activation,
                   activation_param);
  });
}

Tensor group_norm(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                  int64_t num_groups, double eps) {
  static const auto op =
      typed_operator<batchnorm_cpu::GroupNormSignature>("batchnorm::group_norm");
  return first_output([&] { return op.call(input, weight, bias, num_groups, eps); });
}

Tensor layer_norm(const Tensor& input, int64_t normalized_ndim, const OptionalTensor& weight,
                  const OptionalTensor& bias, double eps) {
  static const auto op =
      typed_operator<batchnorm_cpu::LayerNormSignature>("batchnorm::layer_norm");
  return first_output([&] { return op.call(input, normalized_ndim, weight, bias, eps); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_norm", &batch_norm, py::arg("input"), py::arg("weight"), py::arg("bias"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("num_batches_tracked"),
        py::arg("training"), py::arg("momentum"), py::arg("eps"), py::arg("axis") = 1,
        py::arg("chunk") = 0, py::arg("activation") = "identity",
        py::arg("activation_param") = 0.0, py::arg("renorm_clipping") = py::none(),
        py::arg("renorm_mean") = py::none(), py::arg("renorm_var") = py::none(),
        py::arg("renorm_momentum") = 0.1);
  m.def("batch_norm_add", &batch_norm_add);
  m.def("group_norm", &group_norm);
  m.def("layer_norm", &layer_norm);
}
