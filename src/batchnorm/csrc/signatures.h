// The C++ signatures of the batchnorm:: operators (schemas in batchnorm/ops/__init__.py), for
// typed calls through the dispatcher from autograd.cpp and python.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

namespace batchnorm_cpu {

using OptionalTensor = std::optional<at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Mask = std::array<bool, 3>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_operator(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using BatchNormSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, const OptionalTensor&, bool, std::optional<double>, double, int64_t,
    int64_t, c10::string_view, double, std::optional<at::ArrayRef<double>>,
    const OptionalTensor&, const OptionalTensor&, double);
using BatchNormBackwardSignature =
    Grads(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
          double, int64_t, int64_t, c10::string_view, double, Mask);
using BatchNormAddSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, bool,
    std::optional<double>, double, int64_t, int64_t, c10::string_view, double);
using GroupNormSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, int64_t, double);
using GroupNormBackwardSignature =
    Grads(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
          const at::Tensor&, const at::Tensor&, int64_t, Mask);
using GroupNormBackwardDifferentiableSignature =
    Grads(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
          const at::Tensor&, const at::Tensor&, int64_t, double, Mask);
using LayerNormSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, int64_t, const OptionalTensor&, const OptionalTensor&, double);
using LayerNormBackwardSignature =
    Grads(const at::Tensor&, const at::Tensor&, int64_t, const OptionalTensor&,
          const OptionalTensor&, const at::Tensor&, const at::Tensor&, Mask);
using LayerNormBackwardDifferentiableSignature =
    Grads(const at::Tensor&, const at::Tensor&, int64_t, const OptionalTensor&,
          const OptionalTensor&, double, Mask);

}  // namespace batchnorm_cpu
