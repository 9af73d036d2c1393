// The CPU kernel primitives, registered in ops.cpp as operators of namespace batchnorm_cpu.
// Signatures and semantics: batchnorm/kernels/reference.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace batchnorm_cpu {

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& x, int64_t chunk);

at::Tensor channel_normalize(const at::Tensor& x, const at::Tensor& mean,
                             const at::Tensor& scale, const at::Tensor& shift, int64_t chunk,
                             c10::string_view activation, double param);

std::tuple<at::Tensor, at::Tensor> channel_backward_reduce(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, int64_t chunk, c10::string_view activation, double param);

at::Tensor channel_backward_input(const at::Tensor& dy, const at::Tensor& x,
                                  const at::Tensor& mean, const at::Tensor& scale,
                                  const at::Tensor& shift, const at::Tensor& k1,
                                  const at::Tensor& k0, const at::Tensor& k2, int64_t chunk,
                                  c10::string_view activation, double param);

at::Tensor channel_normalize_residual(const at::Tensor& x, const at::Tensor& residual,
                                      const at::Tensor& mean, const at::Tensor& scale,
                                      const at::Tensor& shift, int64_t chunk,
                                      c10::string_view activation, double param);

std::tuple<at::Tensor, at::Tensor> channel_backward_reduce_residual(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual,
    const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift, int64_t chunk,
    c10::string_view activation, double param);

std::tuple<at::Tensor, at::Tensor> channel_backward_input_residual(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual,
    const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& k1, const at::Tensor& k0, const at::Tensor& k2, int64_t chunk,
    c10::string_view activation, double param);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight);

// GroupNorm of a contiguous (N, C, L) view, one visit per (sample, group) block; called by
// the group_norm operators (group_blocks.cpp), not registered. Forward: (y, mean (N, G),
// invstd (N, G)); backward: (dx or undefined, sum(dy) (N, C), sum(dy * (x - mean)) (N, C)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_blocks_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
    double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_blocks_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, int64_t groups, bool input_gradient);

// An uninitialized contiguous CPU tensor for a kernel's output, in memory reused from freed
// outputs when it is large (output_cache.cpp).
at::Tensor empty_output(c10::IntArrayRef sizes, at::ScalarType dtype);

// A size setting in MiB from environment variable `name`, in bytes (`fallback` when unset or
// empty); anything but a non-negative integer raises, naming the variable. Callers read it
// once (settings.cpp).
size_t megabytes_setting(const char* name, size_t fallback);

}  // namespace batchnorm_cpu
