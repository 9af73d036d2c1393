// The normalization operators of batchnorm.ops (schemas defined in Python) on the CPU: what
// their composite implementation computes (batchnorm/core/normalize.py and core/policy.py
// over the kernel primitives), with the primitives of ops.h called directly and the small
// per-(chunk, channel) table math in plain loops instead of a dozen tiny ATen operators.
//
// Each table expression is evaluated in the composite's order and precision, one rounding
// per torch operator (this file is compiled without contraction into fused multiply-adds).
// Sums over chunks or samples accumulate in float64 and square roots are correctly rounded,
// where the composite's torch reductions and sqrt may round differently: such outputs can
// differ from the composite's in the last bit.
//
// Calls these kernels do not take (input of a non-float dtype, statistics of an unexpected
// dtype, or while Python forces a backend other than the C++ kernels, see
// defer_to_composite) go to the composite implementation registered in Python.
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/WrapDimUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/view_native.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "ops.h"

// One rounding per operation, like the torch operators of the composite.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace batchnorm_cpu {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor>;

std::atomic<bool> composite_forced{false};

// While set, every operator here hands its calls to the composite implementation, so that a
// backend forced from Python (batchnorm.kernels.use_backend) reaches the operators too.
void defer_to_composite(bool defer) {
  composite_forced.store(defer);
}

bool is_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

bool runs_composite(const Tensor& input) {
  return composite_forced.load(std::memory_order_relaxed) || !is_float(input.scalar_type());
}

// Calls operator `name`'s CompositeExplicitAutograd kernel (the Python composite) and
// returns its N tensor outputs.
template <size_t N, typename... Args>
std::array<Tensor, N> composite(const char* name, const Args&... args) {
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  torch::jit::Stack stack;
  stack.reserve(sizeof...(Args));
  (stack.emplace_back(args), ...);
  c10::Dispatcher::singleton().callBoxedForDispatchKey(
      op, c10::DispatchKey::CompositeExplicitAutograd, &stack);
  std::array<Tensor, N> outputs;
  for (size_t i = 0; i < N; ++i) outputs[i] = std::move(stack[i]).toTensor();
  return outputs;
}

template <typename Tuple, size_t N, size_t... I>
Tuple as_tuple(std::array<Tensor, N>&& outputs, std::index_sequence<I...>) {
  return Tuple(std::move(outputs[I])...);
}

template <typename Tuple, size_t N>
Tuple as_tuple(std::array<Tensor, N>&& outputs) {
  return as_tuple<Tuple>(std::move(outputs), std::make_index_sequence<N>{});
}

bool given(const OptionalTensor& t) {
  return t.has_value() && t->defined();
}

// t's values as a contiguous tensor of dtype acc (t itself when it already is one).
Tensor as_table(const Tensor& t, at::ScalarType acc) {
  const Tensor converted = t.scalar_type() == acc ? t : t.to(acc);
  return converted.contiguous();
}

Tensor optional_table(const OptionalTensor& t, at::ScalarType acc) {
  return given(t) ? as_table(*t, acc) : Tensor();
}

// Tables, outputs and views straight from ATen's CPU implementations: a dispatcher round trip
// per small tensor would cost more than the table math, and this CPU kernel is the last key.
Tensor new_cpu(c10::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype);
}

Tensor view_of(const Tensor& t, c10::IntArrayRef sizes) {
  return at::native::view(t, sizes);
}

// N tables of shape (rows, columns) for the primitives, as views of one allocation.
template <size_t N>
std::array<Tensor, N> new_tables(int64_t rows, int64_t columns, at::ScalarType dtype) {
  const Tensor block = new_cpu({static_cast<int64_t>(N), rows, columns}, dtype);
  std::array<Tensor, N> tables;
  for (size_t i = 0; i < N; ++i) {
    tables[i] = at::native::as_strided_tensorimpl(block, {rows, columns}, {columns, 1},
                                                  static_cast<int64_t>(i) * rows * columns);
  }
  return tables;
}

// Each given tensor holds `expected` values (one per channel, per normalized element, or per
// statistic): the kernels index them that far. The functional layers raise torch's own
// messages first; a direct operator call stops here instead of reading past a short tensor.
void check_sizes(const char* op, int64_t expected,
                 std::initializer_list<std::pair<const char*, OptionalTensor>> tensors) {
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(!given(tensor) || tensor->numel() == expected, op, ": ", name, " has ",
                tensor->numel(), " values, expected ", expected);
  }
}

void check_grad_shape(const char* op, const Tensor& grad_output, const Tensor& input) {
  TORCH_CHECK(grad_output.sizes() == input.sizes(), op, ": grad_output has shape ",
              grad_output.sizes(), ", expected the input's ", input.sizes());
}

// A (1, C) table of dtype acc holding per-channel tensor t's values: a memcpy in the common
// case (an eval call's running statistics), where a dispatched copy_ costs about a microsecond.
Tensor table_copy(const Tensor& t, at::ScalarType acc) {
  Tensor table = new_cpu({1, t.numel()}, acc);
  if (t.is_cpu() && t.scalar_type() == acc && t.is_contiguous()) {
    std::memcpy(table.mutable_data_ptr(), t.const_data_ptr(), t.nbytes());
  } else {
    table.copy_(t.reshape({1, -1}));
  }
  return table;
}

Tensor empty_grad(const Tensor& input) {
  return new_cpu({0}, input.scalar_type());
}

// The gradients of an empty input: zeros where they are wanted.
Grads zero_grads(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                 std::array<bool, 3> output_mask) {
  return {output_mask[0] ? at::zeros_like(input) : empty_grad(input),
          output_mask[1] && given(weight) ? at::zeros_like(*weight) : empty_grad(input),
          output_mask[2] && given(bias) ? at::zeros_like(*bias) : empty_grad(input)};
}

// A parameter's gradient in the parameter's dtype (`.to(param.dtype)`).
Tensor in_dtype_of(const Tensor& grad, const Tensor& param) {
  return grad.scalar_type() == param.scalar_type() ? grad : grad.to(param.scalar_type());
}

int64_t product(c10::IntArrayRef sizes, int64_t begin, int64_t end) {
  int64_t result = 1;
  for (int64_t d = begin; d < end; ++d) result *= sizes[d];
  return result;
}

// The strides of `sizes` in channels-last order: channel `axis` innermost, then the other
// dims from the last to the first.
c10::SmallVector<int64_t, 6> channels_last_strides(c10::IntArrayRef sizes, int64_t axis) {
  c10::SmallVector<int64_t, 6> strides(sizes.size());
  int64_t next = sizes[axis];
  strides[axis] = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    if (d == axis) continue;
    strides[d] = next;
    next *= sizes[d];
  }
  return strides;
}

// batchnorm.core.layout.is_channels_last: memory ordered with channel `axis` innermost, and
// not also plainly contiguous; `x.movedim(axis, -1).is_contiguous()` without building the view.
bool is_channels_last(const Tensor& x, int64_t axis) {
  if (x.dim() <= 2 || x.is_contiguous()) return false;
  const auto strides = channels_last_strides(x.sizes(), axis);
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) != 1 && x.stride(d) != strides[d]) return false;
  }
  return true;
}

// batchnorm.core.layout.channel_view: x as (P, C, Q), in channels-last order (P, C, 1) when
// channels_last. Views are built from strides (no dispatcher round trip per view: several of
// them cost as much as a small layer's kernels); a tensor not laid out as asked is copied.
Tensor channel_view(const Tensor& x, int64_t axis, bool channels_last) {
  const int64_t channels = x.size(axis);
  if (!channels_last) {
    return view_of(x.contiguous(), {product(x.sizes(), 0, axis), channels,
                                    product(x.sizes(), axis + 1, x.dim())});
  }
  if (!is_channels_last(x, axis)) return x.movedim(axis, -1).reshape({-1, channels, 1});
  return at::native::as_strided_tensorimpl(x, {x.numel() / channels, channels, 1},
                                           {channels, 1, 1}, x.storage_offset());
}

// batchnorm.core.layout.restore: a (P, C, Q) result in the shape and memory order of `like`.
Tensor restore(const Tensor& y, const Tensor& like, int64_t axis, bool channels_last) {
  if (!channels_last) return view_of(y, like.sizes());
  return at::native::as_strided_tensorimpl(y, like.sizes(),
                                           channels_last_strides(like.sizes(), axis),
                                           y.storage_offset());
}

// batchnorm.core.layout.rows_per_sample.
int64_t rows_per_sample(const Tensor& x, int64_t axis, bool channels_last) {
  if (channels_last) return product(x.sizes(), 1, x.dim()) / x.size(axis);
  return product(x.sizes(), 1, axis);
}

// Rows of the channels view per statistics group (batchnorm.core.normalize._rows_chunk).
int64_t rows_chunk(int64_t rows, int64_t per_sample, bool training, int64_t chunk) {
  if (!training || chunk == 0) return std::max<int64_t>(rows, 1);
  return std::max<int64_t>(per_sample * chunk, 1);
}

template <typename acc_t>
acc_t rsqrt(acc_t value) {
  return acc_t(1) / std::sqrt(value);
}

// torch.clamp(value, low, high) with its NaN propagation.
template <typename acc_t>
acc_t clamp(acc_t value, acc_t low, acc_t high) {
  if (std::isnan(value)) return value;
  return std::min(std::max(value, low), high);
}

std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    default: return c10::toString(dtype);
  }
}

// batchnorm.core.policy's text for a finite input whose variance overflows `dtype`.
std::string overflow_message(const char* what, at::ScalarType dtype) {
  double largest = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "overflow_message", [&] {
    largest = static_cast<double>(std::numeric_limits<scalar_t>::max());
  });
  char limit[32];
  std::snprintf(limit, sizeof(limit), "%.1e", std::sqrt(largest));  // Python's ".1e"
  return std::string("the ") + what + " overflows " + dtype_name(dtype) +
         ": the input is finite but spreads over more than ~" + limit +
         " around its mean; normalize such data in float64 (e.g. layer.double() and "
         "x.double())";
}

// batchnorm.core.policy.check_finite: a batch with NaN or infinity is rejected before it
// touches any buffer; a finite batch whose variance overflows says so.
template <typename acc_t>
void check_finite(const acc_t* mean, const acc_t* var, int64_t n) {
  bool finite = true;
  bool overflow_only = true;  // every mean finite and no variance NaN
  for (int64_t i = 0; i < n; ++i) {
    finite = finite && std::isfinite(mean[i]) && std::isfinite(var[i]);
    overflow_only = overflow_only && std::isfinite(mean[i]) && !std::isnan(var[i]);
  }
  if (finite) return;
  TORCH_CHECK_VALUE(!overflow_only,
                    overflow_message("batch variance", c10::CppTypeToScalarType<acc_t>::value),
                    "; the running statistics were left unchanged");
  TORCH_CHECK_VALUE(false, "input contains NaN or infinity: batch statistics are not finite, "
                    "so the running statistics were left unchanged");
}

// batchnorm.core.policy.check_variance: 1 / sqrt(var + eps) is 0 only where the variance
// overflowed (NaN input gives NaN, which propagates to the output as in torch).
void check_variance(const Tensor& invstd) {
  AT_DISPATCH_FLOATING_TYPES(invstd.scalar_type(), "check_variance", [&] {
    const Tensor values = invstd.contiguous();
    const scalar_t* data = values.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < values.numel(); ++i) {
      TORCH_CHECK_VALUE(data[i] != scalar_t(0), overflow_message("variance",
                                                                 invstd.scalar_type()));
    }
  });
}

// ---------------------------------------------------------------------------------------
// The running statistics follow an accepted training batch
// (batchnorm.core.policy.update_running_stats).

// Python's format(value, ".4g").
std::string format_4g(double value) {
  if (std::isnan(value)) return "nan";
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.4g", value);
  return buffer;
}

// Writes into a tensor's memory count like torch's in-place operators: its version counter
// moves, except where torch's would not (inference tensors, ADInplaceOrView excluded).
void bump_version(const Tensor& t) {
  if (t.key_set().has(c10::DispatchKey::ADInplaceOrView) &&
      !c10::impl::tls_is_dispatch_key_excluded(c10::DispatchKey::ADInplaceOrView)) {
    t.unsafeGetTensorImpl()->bump_version();
  }
}

void count_batch(const OptionalTensor& num_batches_tracked) {
  if (!given(num_batches_tracked)) return;
  const Tensor& counter = *num_batches_tracked;
  if (counter.scalar_type() != at::kLong || counter.numel() != 1) {
    counter.add_(1);
    return;
  }
  *counter.mutable_data_ptr<int64_t>() += 1;
  bump_version(counter);
}

void update_running_stats(const Tensor& running_mean, const Tensor& running_var,
                          const OptionalTensor& num_batches_tracked, const Tensor& mean,
                          const Tensor& var, int64_t count, int64_t last_count,
                          std::optional<double> momentum) {
  TORCH_CHECK_VALUE(is_float(running_mean.scalar_type()) &&
                        is_float(running_var.scalar_type()) &&
                        running_mean.numel() == mean.size(1) &&
                        running_var.numel() == mean.size(1),
                    "batch_norm: running_mean and running_var must be floating point with one "
                    "value per channel (", mean.size(1), "), got ", running_mean.scalar_type(),
                    " of ", running_mean.numel(), " and ", running_var.scalar_type(), " of ",
                    running_var.numel());
  TORCH_CHECK_VALUE(mean.size(0) > 1 || count != 1, "Expected more than 1 value per channel "
                    "when training, got ", count);
  if (mean.numel() == 0 || count == 0) {  // an empty batch only counts
    count_batch(num_batches_tracked);
    return;
  }
  const int64_t chunks = mean.size(0);
  const int64_t channels = mean.size(1);
  const Tensor mean_table = mean.contiguous();
  const Tensor var_table = var.contiguous();
  const std::array<const Tensor*, 2> running = {&running_mean, &running_var};
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "update_running_stats", [&] {
    using acc_t = scalar_t;
    const acc_t* m = mean_table.const_data_ptr<acc_t>();
    const acc_t* v = var_table.const_data_ptr<acc_t>();
    std::vector<acc_t> updated(2 * channels);  // the new running mean, then var
    acc_t* new_mean = updated.data();
    acc_t* new_var = new_mean + channels;
    // pooled statistics: sum(n_a * mean_a) / sum(n_a), sum(n_a * var_a) / (sum(n_a) - A)
    const acc_t correction = static_cast<acc_t>(static_cast<double>(count) / (count - 1));
    acc_t total = 0;
    for (int64_t a = 0; a < chunks; ++a) {
      total += static_cast<acc_t>(a == chunks - 1 ? last_count : count);
    }
    for (int64_t c = 0; c < channels; ++c) {
      if (chunks == 1) {
        new_mean[c] = m[c];
        new_var[c] = v[c] * correction;
      } else {
        double weighted_mean = 0;
        double weighted_var = 0;
        for (int64_t a = 0; a < chunks; ++a) {
          const acc_t n = static_cast<acc_t>(a == chunks - 1 ? last_count : count);
          weighted_mean += n * m[a * channels + c];
          weighted_var += n * v[a * channels + c];
        }
        new_mean[c] = acc_t(weighted_mean) / total;
        new_var[c] = acc_t(weighted_var) / (total - static_cast<acc_t>(chunks));
      }
    }
    check_finite(new_mean, new_var, channels);
    // running = lerp(running, batch, factor), as torch.lerp computes it
    acc_t factor = 0;
    if (momentum.has_value()) {
      factor = static_cast<acc_t>(*momentum);
    } else if (given(num_batches_tracked)) {
      factor = acc_t(1) / static_cast<acc_t>(num_batches_tracked->item<int64_t>() + 1);
    }
    const bool small = std::abs(factor) < acc_t(0.5);
    for (int k = 0; k < 2; ++k) {
      const Tensor current = as_table(*running[k], mean.scalar_type());
      const acc_t* old = current.const_data_ptr<acc_t>();
      acc_t* values = new_mean + k * channels;
      for (int64_t c = 0; c < channels; ++c) {
        const acc_t difference = values[c] - old[c];
        values[c] = small ? std::fma(factor, difference, old[c])
                          : std::fma(factor - acc_t(1), difference, values[c]);
      }
    }
    // values the buffers' dtype cannot hold raise before anything changes
    const std::array<const char*, 2> names = {"running_mean", "running_var"};
    for (int k = 0; k < 2; ++k) {
      const acc_t* values = new_mean + k * channels;
      const auto dtype = running[k]->scalar_type();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "update_running_stats",
                                      [&] {
        bool finite = true;
        for (int64_t c = 0; c < channels; ++c) {
          finite = finite && std::isfinite(static_cast<double>(static_cast<scalar_t>(values[c])));
        }
        if (finite) return;
        double largest = 0;  // torch's max: NaN wins
        for (int64_t c = 0; c < channels; ++c) {
          const double magnitude = std::abs(static_cast<double>(values[c]));
          largest = std::isnan(magnitude) || std::isnan(largest) ? magnitude + largest
                                                                 : std::max(largest, magnitude);
        }
        TORCH_CHECK_VALUE(false, names[k], " overflows its ", dtype_name(dtype),
                          " buffer (new values up to ", format_4g(largest),
                          "); keep the layer's buffers in float32, e.g. with torch.autocast "
                          "instead of .half()");
      });
    }
    for (int k = 0; k < 2; ++k) {
      const Tensor& buffer = *running[k];
      acc_t* values = new_mean + k * channels;
      if (!buffer.is_contiguous()) {
        buffer.copy_(at::from_blob(values, {channels}, mean.options()).view_as(buffer));
        continue;
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(),
                                      "update_running_stats", [&] {
        scalar_t* out = buffer.mutable_data_ptr<scalar_t>();
        for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<scalar_t>(values[c]);
      });
      bump_version(buffer);
    }
  });
  count_batch(num_batches_tracked);
}

// batchnorm.core.policy.statistics_counts: values per chunk of `chunk` samples, and in the
// last chunk.
std::pair<int64_t, int64_t> statistics_counts(const Tensor& input, int64_t axis, int64_t chunk) {
  const int64_t batch = input.size(0);
  const int64_t values = input.numel() / std::max<int64_t>(input.size(axis), 1);
  if (chunk == 0 || batch == 0) return {values, values};
  const int64_t remainder = batch % chunk;
  const int64_t per_sample = values / batch;
  return {per_sample * std::min(chunk, batch), per_sample * (remainder ? remainder : chunk)};
}

// batchnorm.core.policy.follow_batch.
void follow_batch(const Tensor& input, int64_t axis, int64_t chunk, const Tensor& mean,
                  const Tensor& var, const Tensor& running_mean,
                  const OptionalTensor& running_var,
                  const OptionalTensor& num_batches_tracked, std::optional<double> momentum,
                  const OptionalTensor& renorm_mean, const OptionalTensor& renorm_var,
                  double renorm_momentum) {
  TORCH_CHECK_VALUE(given(running_var), "batch_norm: running_mean and running_var must be "
                    "given together");
  const auto [count, last_count] = statistics_counts(input, axis, chunk);
  update_running_stats(running_mean, *running_var, num_batches_tracked, mean, var, count,
                       last_count, momentum);
  if (given(renorm_mean)) {
    TORCH_CHECK_VALUE(given(renorm_var), "batch_norm: renorm_mean and renorm_var must be "
                      "given together");
    update_running_stats(*renorm_mean, *renorm_var, std::nullopt, mean, var, count, last_count,
                         renorm_momentum);
  }
}

// ---------------------------------------------------------------------------------------
// batch_norm: BatchNorm, ghost batches and InstanceNorm of channel `axis`.

struct Renorm {
  double rmax, rmin, dmax;
  Tensor reference_mean, reference_var;  // (C,) accumulation dtype
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
    const OptionalTensor& running_mean, const OptionalTensor& running_var,
    const OptionalTensor& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, int64_t axis, int64_t chunk, c10::string_view activation,
    double activation_param, std::optional<at::ArrayRef<double>> renorm_clipping,
    const OptionalTensor& renorm_mean, const OptionalTensor& renorm_var,
    double renorm_momentum) {
  if (runs_composite(input)) {
    return as_tuple<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>>(composite<5>(
        "batchnorm::batch_norm", input, weight, bias, running_mean, running_var,
        num_batches_tracked, training, momentum, eps, axis, chunk, activation,
        activation_param, renorm_clipping, renorm_mean, renorm_var, renorm_momentum));
  }
  axis = at::maybe_wrap_dim(axis, input.dim());
  const bool channels_last = is_channels_last(input, axis);
  const Tensor x = channel_view(input, axis, channels_last);
  const int64_t rows = x.size(0);
  const int64_t channels = x.size(1);
  check_sizes("batch_norm", channels,
              {{"weight", weight}, {"bias", bias}, {"running_mean", running_mean},
               {"running_var", running_var}, {"renorm_mean", renorm_mean},
               {"renorm_var", renorm_var}});
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto options = input.options().dtype(acc);
  const int64_t group_rows =
      rows_chunk(rows, rows_per_sample(input, axis, channels_last), training, chunk);
  const bool empty = x.numel() == 0;

  Tensor mean, var;
  if (training && !empty) {
    std::tie(mean, var) = channel_stats(x, group_rows);
  } else if (training) {
    mean = at::zeros({1, channels}, options);
    var = at::ones({1, channels}, options);
  } else {  // copies: an operator's outputs never alias its inputs
    TORCH_CHECK_VALUE(given(running_mean) && given(running_var),
                      "batch_norm: running_mean and running_var must be given when "
                      "training=False");
    mean = table_copy(*running_mean, acc);
    var = table_copy(*running_var, acc);
  }
  const int64_t chunks = mean.size(0);
  std::optional<Renorm> renorm;
  if (training && renorm_clipping.has_value()) {
    const auto& clipping = *renorm_clipping;
    TORCH_CHECK_VALUE(clipping.size() == 3, "batch_norm: renorm_clipping must be (rmax, rmin, "
                      "dmax), got ", clipping.size(), " values");
    const OptionalTensor& reference_mean = given(renorm_mean) ? renorm_mean : running_mean;
    const OptionalTensor& reference_var = given(renorm_var) ? renorm_var : running_var;
    TORCH_CHECK_VALUE(given(reference_mean) && given(reference_var),
                      "batch_norm: Batch Renormalization needs renorm_mean and renorm_var or "
                      "running_mean and running_var");
    renorm = Renorm{clipping[0], clipping[1], clipping[2], as_table(*reference_mean, acc),
                    as_table(*reference_var, acc)};
  }
  const Tensor w = optional_table(weight, acc);
  const Tensor b = optional_table(bias, acc);
  const std::array<Tensor, 2> tables = new_tables<2>(chunks, channels, acc);
  const Tensor& scale = tables[0];
  const Tensor& shift = tables[1];
  Tensor r = renorm ? new_cpu({chunks, channels}, acc) : new_cpu({0}, acc);
  Tensor d = renorm ? new_cpu({chunks, channels}, acc) : new_cpu({0}, acc);

  AT_DISPATCH_FLOATING_TYPES(acc, "batch_norm", [&] {
    using acc_t = scalar_t;
    const int64_t n = chunks * channels;
    const acc_t* m = mean.const_data_ptr<acc_t>();
    const acc_t* v = var.const_data_ptr<acc_t>();
    if (training && !empty) {
      check_finite(m, v, n);
    }
    const acc_t* w_data = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const acc_t* b_data = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    acc_t* scale_data = scale.mutable_data_ptr<acc_t>();
    acc_t* shift_data = shift.mutable_data_ptr<acc_t>();
    const acc_t eps_acc = static_cast<acc_t>(eps);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = i % channels;
      const acc_t invstd = rsqrt<acc_t>(v[i] + eps_acc);
      scale_data[i] = w_data ? invstd * w_data[c] : invstd;
      shift_data[i] = b_data ? b_data[c] : acc_t(0);
    }
    if (renorm) {
      // batchnorm.core.policy.renorm_correction, against the reference statistics
      const acc_t* reference_mean = renorm->reference_mean.const_data_ptr<acc_t>();
      const acc_t* reference_var = renorm->reference_var.const_data_ptr<acc_t>();
      const acc_t rmax = static_cast<acc_t>(renorm->rmax);
      const acc_t rmin = static_cast<acc_t>(renorm->rmin);
      const acc_t dmax = static_cast<acc_t>(renorm->dmax);
      acc_t* r_data = r.mutable_data_ptr<acc_t>();
      acc_t* d_data = d.mutable_data_ptr<acc_t>();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = i % channels;
        const acc_t sigma = std::sqrt(reference_var[c] + eps_acc);
        r_data[i] = clamp<acc_t>(std::sqrt(v[i] + eps_acc) / sigma, rmin, rmax);
        d_data[i] = clamp<acc_t>((m[i] - reference_mean[c]) / sigma, -dmax, dmax);
        scale_data[i] = scale_data[i] * r_data[i];
        shift_data[i] = shift_data[i] + (w_data ? w_data[c] * d_data[i] : d_data[i]);
      }
    }
  });

  const Tensor y = empty ? at::empty_like(x)
                         : channel_normalize(x, mean, scale, shift, group_rows, activation,
                                             activation_param);
  if (training && given(running_mean)) {  // the batch is accepted: finite statistics
    follow_batch(input, axis, chunk, mean, var, *running_mean, running_var, num_batches_tracked,
                 momentum, renorm_mean, renorm_var, renorm_momentum);
  }
  return {restore(y, input, axis, channels_last), mean, var, r, d};
}

Grads batch_norm_backward(const Tensor& grad_output, const Tensor& input,
                          const OptionalTensor& weight, const OptionalTensor& bias,
                          const Tensor& mean, const Tensor& var, const Tensor& renorm_r,
                          const Tensor& renorm_d, bool training, double eps, int64_t axis,
                          int64_t chunk, c10::string_view activation, double activation_param,
                          std::array<bool, 3> output_mask) {
  const auto acc = mean.scalar_type();
  if (runs_composite(input) || acc != at::toOpMathType(input.scalar_type())) {
    return as_tuple<Grads>(composite<3>(
        "batchnorm::batch_norm_backward", grad_output, input, weight, bias, mean, var,
        renorm_r, renorm_d, training, eps, axis, chunk, activation, activation_param,
        output_mask));
  }
  axis = at::maybe_wrap_dim(axis, input.dim());
  check_grad_shape("batch_norm_backward", grad_output, input);
  const bool channels_last = is_channels_last(input, axis);
  const Tensor x = channel_view(input, axis, channels_last);
  const bool want_weight = output_mask[1] && given(weight);
  const bool want_bias = output_mask[2] && given(bias);
  if (x.numel() == 0) {
    return zero_grads(input, weight, bias, output_mask);
  }
  const Tensor dy = channel_view(grad_output, axis, channels_last);
  const int64_t rows = x.size(0);
  const int64_t channels = x.size(1);
  const int64_t quantity = x.size(2);
  const int64_t group_rows =
      rows_chunk(rows, rows_per_sample(input, axis, channels_last), training, chunk);
  const int64_t chunks = (rows + group_rows - 1) / group_rows;
  const bool renorm = renorm_r.numel() > 0;
  check_sizes("batch_norm_backward", channels, {{"weight", weight}, {"bias", bias}});
  check_sizes("batch_norm_backward", chunks * channels,
              {{"mean", mean}, {"var", var}, {"renorm_r", renorm ? renorm_r : Tensor()},
               {"renorm_d", renorm ? renorm_d : Tensor()}});
  const Tensor var_table = as_table(var, acc);
  const Tensor r = renorm ? as_table(renorm_r, acc) : Tensor();
  const Tensor d = renorm ? as_table(renorm_d, acc) : Tensor();
  const Tensor w = optional_table(weight, acc);
  const Tensor b = optional_table(bias, acc);
  const std::array<Tensor, 4> tables = new_tables<4>(chunks, channels, acc);
  const Tensor& scale = tables[0];
  const Tensor& shift = tables[1];
  const Tensor& k0 = tables[2];
  const Tensor& k2 = tables[3];

  // z = x_hat * w' + b' with w' = w * r, b' = b + w * d under renorm
  AT_DISPATCH_FLOATING_TYPES(acc, "batch_norm_backward", [&] {
    using acc_t = scalar_t;
    const acc_t* v = var_table.const_data_ptr<acc_t>();
    const acc_t* w_data = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const acc_t* b_data = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    const acc_t* r_data = renorm ? r.const_data_ptr<acc_t>() : nullptr;
    const acc_t* d_data = renorm ? d.const_data_ptr<acc_t>() : nullptr;
    acc_t* scale_data = scale.mutable_data_ptr<acc_t>();
    acc_t* shift_data = shift.mutable_data_ptr<acc_t>();
    for (int64_t i = 0; i < chunks * channels; ++i) {
      const int64_t c = i % channels;
      const acc_t invstd = rsqrt<acc_t>(v[i] + static_cast<acc_t>(eps));
      acc_t effective_w = w_data ? w_data[c] : acc_t(1);
      acc_t shift_i = b_data ? b_data[c] : acc_t(0);
      if (renorm) {
        shift_i = shift_i + effective_w * d_data[i];
        effective_w = effective_w * r_data[i];
      }
      scale_data[i] = invstd * effective_w;
      shift_data[i] = shift_i;
    }
  });
  const auto [sum_g, sum_gxc] = channel_backward_reduce(dy, x, mean, scale, shift, group_rows,
                                                        activation, activation_param);

  Tensor grad_weight = want_weight ? new_cpu({channels}, acc) : empty_grad(input);
  Tensor grad_bias = want_bias ? new_cpu({channels}, acc) : empty_grad(input);
  AT_DISPATCH_FLOATING_TYPES(acc, "batch_norm_backward", [&] {
    using acc_t = scalar_t;
    const acc_t* v = var_table.const_data_ptr<acc_t>();
    const acc_t* w_data = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const acc_t* r_data = renorm ? r.const_data_ptr<acc_t>() : nullptr;
    const acc_t* d_data = renorm ? d.const_data_ptr<acc_t>() : nullptr;
    const acc_t* g = sum_g.const_data_ptr<acc_t>();
    const acc_t* gxc = sum_gxc.const_data_ptr<acc_t>();
    acc_t* grad_weight_data = want_weight ? grad_weight.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* grad_bias_data = want_bias ? grad_bias.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* k0_data = output_mask[0] ? k0.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* k2_data = output_mask[0] ? k2.mutable_data_ptr<acc_t>() : nullptr;
    // values behind each chunk's statistics: chunk * Q, the last chunk's possibly fewer
    const acc_t count = static_cast<acc_t>(group_rows * quantity);
    const acc_t last_count =
        static_cast<acc_t>((rows % group_rows ? rows % group_rows : group_rows) * quantity);
    for (int64_t c = 0; c < channels; ++c) {
      double grad_weight_c = 0;
      double grad_bias_c = 0;
      for (int64_t a = 0; a < chunks; ++a) {
        const int64_t i = a * channels + c;
        const acc_t invstd = rsqrt<acc_t>(v[i] + static_cast<acc_t>(eps));
        acc_t effective_w = w_data ? w_data[c] : acc_t(1);
        if (renorm) effective_w = effective_w * r_data[i];
        const acc_t sum_g_xhat = gxc[i] * invstd;
        grad_weight_c +=
            renorm ? acc_t(sum_g_xhat * r_data[i]) + acc_t(g[i] * d_data[i]) : sum_g_xhat;
        grad_bias_c += g[i];
        if (!k0_data) continue;
        if (!training) {
          k0_data[i] = k2_data[i] = acc_t(0);
          continue;
        }
        const acc_t n = a == chunks - 1 ? last_count : count;
        k2_data[i] = -(sum_g_xhat * effective_w / n) * (invstd * invstd);
        k0_data[i] = -(g[i] * effective_w / n) * invstd;
      }
      if (grad_weight_data) grad_weight_data[c] = acc_t(grad_weight_c);
      if (grad_bias_data) grad_bias_data[c] = acc_t(grad_bias_c);
    }
  });
  return {output_mask[0] ? restore(channel_backward_input(dy, x, mean, scale, shift, scale, k0,
                                                          k2, group_rows, activation,
                                                          activation_param),
                                   input, axis, channels_last)
                         : empty_grad(input),
          want_weight ? in_dtype_of(grad_weight, *weight) : grad_weight,
          want_bias ? in_dtype_of(grad_bias, *bias) : grad_bias};
}

// ---------------------------------------------------------------------------------------
// group_norm: per-(sample, channel) statistics merged over each group's channels.

struct InstanceView {
  Tensor x;  // (P, C, Q), statistics per sample: `rows` rows each
  int64_t rows;
  bool channels_last;
};

InstanceView instance_view(const Tensor& input) {
  const bool channels_last = is_channels_last(input, 1);
  return {channel_view(input, 1, channels_last),
          std::max<int64_t>(rows_per_sample(input, 1, channels_last), 1), channels_last};
}

// Per-channel sums over the samples of per-(sample, channel) sums (N, C), each scaled by its
// (sample, group) invstd when given, in double: dw = sum_n invstd * sum(g * (x - mean)),
// db = sum_n sum(g).
Tensor parameter_sums(const Tensor& sums, const Tensor& invstd, int64_t num_groups) {
  const int64_t samples = sums.size(0);
  const int64_t channels = sums.size(1);
  const int64_t per_group = channels / num_groups;
  Tensor out = new_cpu({channels}, sums.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "group_norm_backward", [&] {
    const scalar_t* data = sums.const_data_ptr<scalar_t>();
    const scalar_t* inv = invstd.defined() ? invstd.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      double total = 0;
      for (int64_t n = 0; n < samples; ++n) {
        const scalar_t value = data[n * channels + c];
        total += inv ? value * inv[n * num_groups + c / per_group] : value;
      }
      result[c] = static_cast<scalar_t>(total);
    }
  });
  return out;
}

void check_groups(int64_t channels, int64_t num_groups) {
  TORCH_CHECK(num_groups > 0 && channels % num_groups == 0,
              "group_norm: num_groups must divide the channels, got num_groups=", num_groups,
              " for ", channels, " channels");
}

std::tuple<Tensor, Tensor, Tensor> group_norm(const Tensor& input, const OptionalTensor& weight,
                                              const OptionalTensor& bias, int64_t num_groups,
                                              double eps) {
  if (runs_composite(input)) {
    return as_tuple<std::tuple<Tensor, Tensor, Tensor>>(composite<3>(
        "batchnorm::group_norm", input, weight, bias, num_groups, eps));
  }
  const InstanceView view = instance_view(input);
  const int64_t samples = input.size(0);
  const int64_t channels = input.size(1);
  check_sizes("group_norm", channels, {{"weight", weight}, {"bias", bias}});
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto options = input.options().dtype(acc);
  if (view.x.numel() == 0) {
    return {at::empty_like(input), at::zeros({samples, num_groups}, options),
            at::ones({samples, num_groups}, options)};
  }
  check_groups(channels, num_groups);
  if (!view.channels_last) {  // each (sample, group) block is contiguous
    auto [y, mean, invstd] = group_blocks_forward(view.x, optional_table(weight, acc),
                                                  optional_table(bias, acc), num_groups, eps);
    check_variance(invstd);
    return {restore(y, input, 1, false), mean, invstd};
  }
  const auto [channel_mean, channel_var] = channel_stats(view.x, view.rows);
  const int64_t per_group = channels / num_groups;
  Tensor mean = new_cpu({samples, num_groups}, acc);
  Tensor invstd = new_cpu({samples, num_groups}, acc);
  Tensor expanded_mean = new_cpu({samples, channels}, acc);
  Tensor scale = new_cpu({samples, channels}, acc);
  Tensor shift = new_cpu({samples, channels}, acc);
  const Tensor w = optional_table(weight, acc);
  const Tensor b = optional_table(bias, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "group_norm", [&] {
    using acc_t = scalar_t;
    const acc_t* cm = channel_mean.const_data_ptr<acc_t>();
    const acc_t* cv = channel_var.const_data_ptr<acc_t>();
    const acc_t* w_data = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const acc_t* b_data = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_data = invstd.mutable_data_ptr<acc_t>();
    acc_t* expanded = expanded_mean.mutable_data_ptr<acc_t>();
    acc_t* scale_data = scale.mutable_data_ptr<acc_t>();
    acc_t* shift_data = shift.mutable_data_ptr<acc_t>();
    for (int64_t n = 0; n < samples; ++n) {
      for (int64_t g = 0; g < num_groups; ++g) {
        // in float64: the mean of the means, the mean of the variances plus the variance
        // of the means
        const int64_t first = n * channels + g * per_group;
        double sum_mean = 0;
        double sum_var = 0;
        for (int64_t k = 0; k < per_group; ++k) {
          sum_mean += static_cast<double>(cm[first + k]);
          sum_var += static_cast<double>(cv[first + k]);
        }
        const double group_mean = sum_mean / per_group;
        double spread = 0;
        for (int64_t k = 0; k < per_group; ++k) {
          const double deviation = static_cast<double>(cm[first + k]) - group_mean;
          spread += deviation * deviation;
        }
        const double group_var = sum_var / per_group + spread / per_group;
        const acc_t m = static_cast<acc_t>(group_mean);
        const acc_t inv = static_cast<acc_t>(1.0 / std::sqrt(group_var + eps));
        mean_data[n * num_groups + g] = m;
        invstd_data[n * num_groups + g] = inv;
        for (int64_t k = 0; k < per_group; ++k) {
          const int64_t c = g * per_group + k;
          expanded[first + k] = m;
          scale_data[first + k] = w_data ? inv * w_data[c] : inv;
          shift_data[first + k] = b_data ? b_data[c] : acc_t(0);
        }
      }
    }
  });
  check_variance(invstd);
  const Tensor y = channel_normalize(view.x, expanded_mean, scale, shift, view.rows,
                                     "identity", 0.0);
  return {restore(y, input, 1, view.channels_last), mean, invstd};
}

Grads group_norm_backward(const Tensor& grad_output, const Tensor& input,
                          const OptionalTensor& weight, const OptionalTensor& bias,
                          const Tensor& mean, const Tensor& invstd, int64_t num_groups,
                          std::array<bool, 3> output_mask) {
  const auto acc = mean.scalar_type();
  if (runs_composite(input) || acc != at::toOpMathType(input.scalar_type())) {
    return as_tuple<Grads>(composite<3>("batchnorm::group_norm_backward", grad_output, input,
                                        weight, bias, mean, invstd, num_groups, output_mask));
  }
  const InstanceView view = instance_view(input);
  const bool want_weight = output_mask[1] && given(weight);
  const bool want_bias = output_mask[2] && given(bias);
  if (view.x.numel() == 0) {
    return zero_grads(input, weight, bias, output_mask);
  }
  check_grad_shape("group_norm_backward", grad_output, input);
  const Tensor dy = channel_view(grad_output, 1, view.channels_last);
  const int64_t samples = input.size(0);
  const int64_t channels = input.size(1);
  check_groups(channels, num_groups);
  check_sizes("group_norm_backward", channels, {{"weight", weight}, {"bias", bias}});
  check_sizes("group_norm_backward", samples * num_groups,
              {{"mean", mean}, {"invstd", invstd}});
  if (!view.channels_last) {  // each (sample, group) block is contiguous
    const Tensor invstd_table = as_table(invstd, acc);
    const auto [dx, sum_dy, sum_dy_xc] =
        group_blocks_backward(dy, view.x, mean, invstd_table, optional_table(weight, acc),
                              num_groups, output_mask[0]);
    return {output_mask[0] ? restore(dx, input, 1, false) : empty_grad(input),
            want_weight
                ? in_dtype_of(parameter_sums(sum_dy_xc, invstd_table, num_groups), *weight)
                : empty_grad(input),
            want_bias ? in_dtype_of(parameter_sums(sum_dy, Tensor(), num_groups), *bias)
                      : empty_grad(input)};
  }
  const int64_t per_group = channels / num_groups;
  const auto options = mean.options();
  const Tensor mean_table = mean.contiguous();
  const Tensor invstd_table = as_table(invstd, acc);
  const Tensor w = optional_table(weight, acc);
  Tensor expanded_mean = new_cpu({samples, channels}, acc);
  Tensor scale = new_cpu({samples, channels}, acc);
  Tensor shift = at::zeros({samples, channels}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "group_norm_backward", [&] {
    using acc_t = scalar_t;
    const acc_t* m = mean_table.const_data_ptr<acc_t>();
    const acc_t* inv = invstd_table.const_data_ptr<acc_t>();
    const acc_t* w_data = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    acc_t* expanded = expanded_mean.mutable_data_ptr<acc_t>();
    acc_t* scale_data = scale.mutable_data_ptr<acc_t>();
    for (int64_t n = 0; n < samples; ++n) {
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t group = n * num_groups + c / per_group;
        expanded[n * channels + c] = m[group];
        scale_data[n * channels + c] = w_data ? inv[group] * w_data[c] : inv[group];
      }
    }
  });
  const auto [sum_g, sum_gxc] = channel_backward_reduce(dy, view.x, expanded_mean, scale, shift,
                                                        view.rows, "identity", 0.0);
  const Tensor grad_weight = want_weight ? parameter_sums(sum_gxc, invstd_table, num_groups)
                                         : empty_grad(input);
  const Tensor grad_bias = want_bias ? parameter_sums(sum_g, Tensor(), num_groups)
                                     : empty_grad(input);
  Tensor k0, k2;
  if (output_mask[0]) {
    k0 = new_cpu({samples, channels}, acc);
    k2 = new_cpu({samples, channels}, acc);
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "group_norm_backward", [&] {
    using acc_t = scalar_t;
    const acc_t* inv = invstd_table.const_data_ptr<acc_t>();
    const acc_t* w_data = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const acc_t* g = sum_g.const_data_ptr<acc_t>();
    const acc_t* gxc = sum_gxc.const_data_ptr<acc_t>();
    auto sum_g_xhat = [&](int64_t n, int64_t c) {
      return gxc[n * channels + c] * inv[n * num_groups + c / per_group];
    };
    if (!output_mask[0]) return;
    // per group: mean over its values of w * g and of w * g * x_hat
    const acc_t count = static_cast<acc_t>(view.x.numel() / (samples * num_groups));
    acc_t* k0_data = k0.mutable_data_ptr<acc_t>();
    acc_t* k2_data = k2.mutable_data_ptr<acc_t>();
    for (int64_t n = 0; n < samples; ++n) {
      for (int64_t group = 0; group < num_groups; ++group) {
        double sum_wg = 0;
        double sum_wg_xhat = 0;
        for (int64_t c = group * per_group; c < (group + 1) * per_group; ++c) {
          const acc_t effective_w = w_data ? w_data[c] : acc_t(1);
          sum_wg += g[n * channels + c] * effective_w;
          sum_wg_xhat += sum_g_xhat(n, c) * effective_w;
        }
        const acc_t inv_g = inv[n * num_groups + group];
        const acc_t k0_value = -(acc_t(sum_wg) / count) * inv_g;
        const acc_t k2_value = -(acc_t(sum_wg_xhat) / count) * (inv_g * inv_g);
        for (int64_t c = group * per_group; c < (group + 1) * per_group; ++c) {
          k0_data[n * channels + c] = k0_value;
          k2_data[n * channels + c] = k2_value;
        }
      }
    }
  });
  return {output_mask[0] ? restore(channel_backward_input(dy, view.x, expanded_mean, scale,
                                                          shift, scale, k0, k2, view.rows,
                                                          "identity", 0.0),
                                   input, 1, view.channels_last)
                         : empty_grad(input),
          want_weight ? in_dtype_of(grad_weight, *weight) : grad_weight,
          want_bias ? in_dtype_of(grad_bias, *bias) : grad_bias};
}

// ---------------------------------------------------------------------------------------
// layer_norm: statistics per row of the (R, K) view over the trailing dims.

Tensor row_view(const Tensor& x, int64_t normalized_ndim) {
  const int64_t split = x.dim() - normalized_ndim;
  return view_of(x.contiguous(),
                 {product(x.sizes(), 0, split), product(x.sizes(), split, x.dim())});
}

OptionalTensor flat(const OptionalTensor& t) {
  return given(t) ? OptionalTensor(t->reshape({-1})) : std::nullopt;
}

std::tuple<Tensor, Tensor, Tensor> layer_norm(const Tensor& input, int64_t normalized_ndim,
                                              const OptionalTensor& weight,
                                              const OptionalTensor& bias, double eps) {
  if (runs_composite(input)) {
    return as_tuple<std::tuple<Tensor, Tensor, Tensor>>(composite<3>(
        "batchnorm::layer_norm", input, normalized_ndim, weight, bias, eps));
  }
  const Tensor x = row_view(input, normalized_ndim);
  check_sizes("layer_norm", x.size(1), {{"weight", weight}, {"bias", bias}});
  if (x.numel() == 0) {
    const auto options = input.options().dtype(at::toOpMathType(input.scalar_type()));
    return {at::empty_like(input), at::zeros({x.size(0)}, options),
            at::ones({x.size(0)}, options)};
  }
  auto [y, mean, invstd] = rows_forward(x, flat(weight), flat(bias), eps);
  check_variance(invstd);
  return {view_of(y, input.sizes()), mean, invstd};
}

Grads layer_norm_backward(const Tensor& grad_output, const Tensor& input,
                          int64_t normalized_ndim, const OptionalTensor& weight,
                          const OptionalTensor& bias, const Tensor& mean, const Tensor& invstd,
                          std::array<bool, 3> output_mask) {
  if (runs_composite(input)) {
    return as_tuple<Grads>(composite<3>("batchnorm::layer_norm_backward", grad_output, input,
                                        normalized_ndim, weight, bias, mean, invstd,
                                        output_mask));
  }
  const Tensor x = row_view(input, normalized_ndim);
  const bool want_weight = output_mask[1] && given(weight);
  const bool want_bias = output_mask[2] && given(bias);
  if (x.numel() == 0) {
    return zero_grads(input, weight, bias, output_mask);
  }
  check_grad_shape("layer_norm_backward", grad_output, input);
  check_sizes("layer_norm_backward", x.size(1), {{"weight", weight}, {"bias", bias}});
  check_sizes("layer_norm_backward", x.size(0), {{"mean", mean}, {"invstd", invstd}});
  const Tensor dy = row_view(grad_output, normalized_ndim);
  auto [dx, sum_g_xhat, sum_g] = rows_backward(dy, x, mean, invstd, flat(weight));
  return {output_mask[0] ? view_of(dx, input.sizes()) : empty_grad(input),
          want_weight ? in_dtype_of(view_of(sum_g_xhat, weight->sizes()), *weight)
                      : empty_grad(input),
          want_bias ? in_dtype_of(view_of(sum_g, bias->sizes()), *bias) : empty_grad(input)};
}

}  // namespace
}  // namespace batchnorm_cpu

TORCH_LIBRARY_FRAGMENT(batchnorm_cpu, m) {
  m.def("defer_to_composite(bool defer) -> ()", &batchnorm_cpu::defer_to_composite);
}

TORCH_LIBRARY_IMPL(batchnorm, CPU, m) {
  m.impl("batch_norm", &batchnorm_cpu::batch_norm);
  m.impl("batch_norm_backward", &batchnorm_cpu::batch_norm_backward);
  m.impl("group_norm", &batchnorm_cpu::group_norm);
  m.impl("group_norm_backward", &batchnorm_cpu::group_norm_backward);
  m.impl("layer_norm", &batchnorm_cpu::layer_norm);
  m.impl("layer_norm_backward", &batchnorm_cpu::layer_norm_backward);
}
