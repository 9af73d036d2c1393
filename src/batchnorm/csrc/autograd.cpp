// Autograd of the normalization operators on the CPU: the formulas batchnorm/ops/__init__.py
// registers in Python (which stay in force on other devices), without Python in the loop.
//
// Each forward records one autograd node the way ATen's own operators do (VariableType): the
// edges of input, weight and bias, the normalized output's history, and what the Python
// setup_context saves, then redispatches below autograd; the statistics outputs get no
// history (not differentiable). A torch::autograd::Function does the same through generic
// bookkeeping of every tensor argument and output, which costs a small layer more than the
// kernel itself.
// Backward calls the *_backward operator, or, when the backward itself is being
// differentiated (grad mode on: create_graph=True), its *_backward_differentiable twin,
// which autograd can differentiate. Forward-mode AD is not implemented, as in Python.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "signatures.h"

namespace batchnorm_cpu {
namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

bool requires_grad(const Tensor& t) {
  return t.requires_grad();
}

bool requires_grad(const OptionalTensor& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

bool has_tangent(const Tensor& t) {
  return t._fw_grad(/*level=*/0).defined();
}

bool has_tangent(const OptionalTensor& t) {
  return t.has_value() && t->defined() && has_tangent(*t);
}

// torch 2.13 holds autograd nodes in c10::intrusive_ptr, earlier releases in std::shared_ptr.
constexpr bool kIntrusiveNodes =
    std::is_base_of_v<c10::intrusive_ptr_target, torch::autograd::Node>;
template <typename T>
using NodePtr = std::conditional_t<kIntrusiveNodes, c10::intrusive_ptr<T>, std::shared_ptr<T>>;

// The node of a forward with differentiable arguments (input, weight, bias), when grad mode
// asks for one; its edges are those three, in order (an absent one is an empty edge).
template <typename Node>
NodePtr<Node> make_node(const char* op, const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(has_tangent(input) || has_tangent(weight) || has_tangent(bias)), op,
      ": forward-mode AD (jvp) is not implemented; torch.func transforms of the batchnorm "
      "layers and functions use plain torch operations instead");
  if (!at::GradMode::is_enabled() ||
      !(requires_grad(input) || requires_grad(weight) || requires_grad(bias))) {
    return {};
  }
  NodePtr<Node> node;
  if constexpr (kIntrusiveNodes) {
    node = c10::make_intrusive<Node>();
  } else {
    node = std::make_shared<Node>();
  }
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  return node;
}

OptionalTensor present(const Tensor& t) {
  return t.defined() ? OptionalTensor(t) : std::nullopt;
}

// Calls a backward operator: straight to its kernel when grad mode is off (the autograd
// fallback of an operator without autograd would only cost a boxed round trip), through
// autograd otherwise.
template <typename Signature, typename... Args>
Grads call_backward(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// The saved tensors and backward of one normalization: input, weight, bias, then the
// statistics the backward operator takes. The gradient of the normalized output is zeros
// when it has none (as a Python autograd.Function materializes it).
template <size_t Saved>
struct NormBackward : public torch::autograd::Node {
  std::array<SavedVariable, Saved> saved;

  void save(std::array<Tensor, Saved> tensors) {
    for (size_t i = 0; i < Saved; ++i) saved[i] = SavedVariable(tensors[i], false);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& tensor : saved) tensor.reset_data();
  }

  // The saved tensors, the gradient of the output, and which of (input, weight, bias)
  // need gradients.
  std::tuple<std::array<Tensor, Saved>, Tensor, Mask> unpack(const variable_list& grads) {
    std::array<Tensor, Saved> tensors;
    for (size_t i = 0; i < Saved; ++i) tensors[i] = saved[i].unpack();
    Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(tensors[0]);
    const Mask mask = {task_should_compute_output(0), task_should_compute_output(1),
                       task_should_compute_output(2)};
    return {std::move(tensors), std::move(grad_output), mask};
  }

  static variable_list wanted(const Grads& grads, const Mask& mask) {
    return {mask[0] ? std::get<0>(grads) : Tensor(), mask[1] ? std::get<1>(grads) : Tensor(),
            mask[2] ? std::get<2>(grads) : Tensor()};
  }
};

struct BatchNormBackward final : public NormBackward<7> {  // + mean, var, r, d
  bool training = false;
  double eps = 0;
  int64_t axis = 0;
  int64_t chunk = 0;
  std::string activation;
  double activation_param = 0;

  std::string name() const override {
    return "BatchNormBackward";
  }

  variable_list apply(variable_list&& grads) override {
    static const auto backward_op =
        typed_operator<BatchNormBackwardSignature>("batchnorm::batch_norm_backward");
    static const auto differentiable_op = typed_operator<BatchNormBackwardSignature>(
        "batchnorm::batch_norm_backward_differentiable");
    std::lock_guard<std::mutex> lock(mutex_);
    const auto [t, grad_output, mask] = unpack(grads);
    const auto& op = at::GradMode::is_enabled() ? differentiable_op : backward_op;
    return wanted(call_backward(op, grad_output, t[0], present(t[1]), present(t[2]), t[3], t[4],
                                t[5], t[6], training, eps, axis, chunk, activation,
                                activation_param, mask),
                  mask);
  }
};

struct GroupNormBackward final : public NormBackward<5> {  // + mean, invstd
  int64_t num_groups = 0;
  double eps = 0;

  std::string name() const override {
    return "GroupNormBackward";
  }

  variable_list apply(variable_list&& grads) override {
    static const auto backward_op =
        typed_operator<GroupNormBackwardSignature>("batchnorm::group_norm_backward");
    static const auto differentiable_op =
        typed_operator<GroupNormBackwardDifferentiableSignature>(
            "batchnorm::group_norm_backward_differentiable");
    std::lock_guard<std::mutex> lock(mutex_);
    const auto [t, grad_output, mask] = unpack(grads);
    if (at::GradMode::is_enabled()) {
      return wanted(differentiable_op.call(grad_output, t[0], present(t[1]), present(t[2]),
                                           t[3], t[4], num_groups, eps, mask),
                    mask);
    }
    return wanted(call_backward(backward_op, grad_output, t[0], present(t[1]), present(t[2]),
                                t[3], t[4], num_groups, mask),
                  mask);
  }
};

struct LayerNormBackward final : public NormBackward<5> {  // + mean, invstd
  int64_t normalized_ndim = 0;
  double eps = 0;

  std::string name() const override {
    return "LayerNormBackward";
  }

  variable_list apply(variable_list&& grads) override {
    static const auto backward_op =
        typed_operator<LayerNormBackwardSignature>("batchnorm::layer_norm_backward");
    static const auto differentiable_op =
        typed_operator<LayerNormBackwardDifferentiableSignature>(
            "batchnorm::layer_norm_backward_differentiable");
    std::lock_guard<std::mutex> lock(mutex_);
    const auto [t, grad_output, mask] = unpack(grads);
    if (at::GradMode::is_enabled()) {
      return wanted(differentiable_op.call(grad_output, t[0], normalized_ndim, present(t[1]),
                                           present(t[2]), eps, mask),
                    mask);
    }
    return wanted(call_backward(backward_op, grad_output, t[0], normalized_ndim, present(t[1]),
                                present(t[2]), t[3], t[4], mask),
                  mask);
  }
};

// The buffers the forward moves in training count the write in their version counters: the
// kernel moves them itself below autograd, where torch's in-place operators would.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
    const OptionalTensor& running_mean, const OptionalTensor& running_var,
    const OptionalTensor& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, int64_t axis, int64_t chunk, c10::string_view activation,
    double activation_param, std::optional<at::ArrayRef<double>> renorm_clipping,
    const OptionalTensor& renorm_mean, const OptionalTensor& renorm_var,
    double renorm_momentum) {
  static const auto op = typed_operator<BatchNormSignature>("batchnorm::batch_norm");
  auto node = make_node<BatchNormBackward>("batchnorm::batch_norm", input, weight, bias);
  auto outputs = [&] {
    at::AutoDispatchBelowAutograd guard;
    return op.call(input, weight, bias, running_mean, running_var, num_batches_tracked,
                   training, momentum, eps, axis, chunk, activation, activation_param,
                   renorm_clipping, renorm_mean, renorm_var, renorm_momentum);
  }();
  if (node) {
    const auto& [y, mean, var, r, d] = outputs;
    torch::autograd::set_history(y, node);
    node->save({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, var, r, d});
    node->training = training;
    node->eps = eps;
    node->axis = axis;
    node->chunk = chunk;
    node->activation = std::string(activation.data(), activation.size());
    node->activation_param = activation_param;
  }
  return outputs;
}

std::tuple<Tensor, Tensor, Tensor> group_norm(const Tensor& input, const OptionalTensor& weight,
                                              const OptionalTensor& bias, int64_t num_groups,
                                              double eps) {
  static const auto op = typed_operator<GroupNormSignature>("batchnorm::group_norm");
  auto node = make_node<GroupNormBackward>("batchnorm::group_norm", input, weight, bias);
  auto outputs = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, num_groups, eps);
  }();
  if (node) {
    const auto& [y, mean, invstd] = outputs;
    torch::autograd::set_history(y, node);
    node->save({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd});
    node->num_groups = num_groups;
    node->eps = eps;
  }
  return outputs;
}

std::tuple<Tensor, Tensor, Tensor> layer_norm(const Tensor& input, int64_t normalized_ndim,
                                              const OptionalTensor& weight,
                                              const OptionalTensor& bias, double eps) {
  static const auto op = typed_operator<LayerNormSignature>("batchnorm::layer_norm");
  auto node = make_node<LayerNormBackward>("batchnorm::layer_norm", input, weight, bias);
  auto outputs = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, normalized_ndim, weight, bias, eps);
  }();
  if (node) {
    const auto& [y, mean, invstd] = outputs;
    torch::autograd::set_history(y, node);
    node->save({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd});
    node->normalized_ndim = normalized_ndim;
    node->eps = eps;
  }
  return outputs;
}

}  // namespace
}  // namespace batchnorm_cpu

TORCH_LIBRARY_IMPL(batchnorm, AutogradCPU, m) {
  m.impl("batch_norm", &batchnorm_cpu::batch_norm);
  m.impl("group_norm", &batchnorm_cpu::group_norm);
  m.impl("layer_norm", &batchnorm_cpu::layer_norm);
}
