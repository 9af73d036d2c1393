// LayerNorm on a rows view x (R, K): statistics per row, parameters per column.
//   rows_forward:  y = (x - mean) * invstd * w + b, with mean and invstd = 1 / sqrt(var + eps)
//                  from pivot-shifted sums; one visit per row (statistics, then normalize
//                  while the row is in cache).
//   rows_backward: dx = invstd * (gh - mean_k(gh) - x_hat * mean_k(gh * x_hat)), gh = dy * w,
//                  and the column sums sum_r(dy * x_hat), sum_r(dy); one visit per row, the
//                  column sums over fixed row blocks merged in block order.
#include <vector>

#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include "kernels.h"
#include "ops.h"

namespace batchnorm_cpu {
namespace {

at::Tensor as_accumulation(const at::Tensor& t, const at::TensorOptions& options) {
  if (t.scalar_type() == options.dtype() && t.is_contiguous()) return t;
  return t.to(options.dtype()).contiguous();
}

// weight or bias as a (K,) accumulation-dtype tensor; `fill` when absent.
at::Tensor column_param(const std::optional<at::Tensor>& param, int64_t columns,
                        const at::TensorOptions& options, double fill, const char* op,
                        const char* name) {
  if (!param.has_value() || !param->defined()) return at::full({columns}, fill, options);
  TORCH_CHECK(param->dim() == 1 && param->size(0) == columns, op, ": ", name,
              " must have shape (", columns, ",), got ", param->sizes());
  return as_accumulation(*param, options);
}

template <typename T>
void forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                    double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd) {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const int64_t K = x.size(1);
  const T* x_data = x.const_data_ptr<T>();
  const acc_t* w = weight.const_data_ptr<acc_t>();
  const acc_t* b = bias.const_data_ptr<acc_t>();
  T* y_data = y.mutable_data_ptr<T>();
  acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
  acc_t* invstd_data = invstd.mutable_data_ptr<acc_t>();
  at::parallel_for(0, x.size(0), grain_for(2 * K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x_data + r * K;
      const auto [m, inv] = shifted_moments(row, K, eps);
      mean_data[r] = m;
      invstd_data[r] = inv;
      const Vec m_vec(m);
      const Vec inv_vec(inv);
      T* out = y_data + r * K;
      over_run<L::width>(K, [=](int64_t i, int64_t count) {
        const Vec x_hat = (L::load(row + i, count) - m_vec) * inv_vec;
        L::store(out + i, x_hat * Vec::loadu(w + i, count) + Vec::loadu(b + i, count), count);
      });
    }
  });
}

template <typename T>
void backward_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                     const at::Tensor& invstd, const at::Tensor& weight, at::Tensor& dx,
                     at::Tensor& sum_dy_xhat, at::Tensor& sum_dy) {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const int64_t R = x.size(0);
  const int64_t K = x.size(1);
  const int64_t padded = round_up(K, L::width);
  const int64_t blocks = row_blocks(R);
  const T* dy_data = dy.const_data_ptr<T>();
  const T* x_data = x.const_data_ptr<T>();
  const acc_t* mean_data = mean.const_data_ptr<acc_t>();
  const acc_t* invstd_data = invstd.const_data_ptr<acc_t>();
  const acc_t* w = weight.const_data_ptr<acc_t>();
  T* dx_data = dx.mutable_data_ptr<T>();
  // per block: sum_r(dy * x_hat) then sum_r(dy), `padded` columns each
  std::vector<double> partial(blocks * 2 * padded, 0.0);

  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(2 * padded);
    acc_t* acc_dy_xhat = acc.data();
    acc_t* acc_dy = acc_dy_xhat + padded;
    for (int64_t block = begin; block < end; ++block) {
      double* total = partial.data() + block * 2 * padded;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      int64_t since_flush = 0;
      for (int64_t r = block * R / blocks; r < (block + 1) * R / blocks; ++r) {
        const T* x_row = x_data + r * K;
        const T* dy_row = dy_data + r * K;
        const Vec m(mean_data[r]);
        const Vec inv(invstd_data[r]);
        TwoSums<acc_t> sums;
        sums.add(K, [&](int64_t i, int64_t count) {
          Vec x_hat = (L::load(x_row + i, count) - m) * inv;
          Vec gh = L::load(dy_row + i, count) * Vec::loadu(w + i, count);
          if (count != L::width) {
            x_hat = Vec::set(Vec(0), x_hat, count);
            gh = Vec::set(Vec(0), gh, count);
          }
          return std::pair<Vec, Vec>(gh, gh * x_hat);
        });
        sums.flush();
        const Vec mean_gh(static_cast<acc_t>(sums.total_first / K));
        const Vec mean_gh_xhat(static_cast<acc_t>(sums.total_second / K));
        T* out = dx_data + r * K;
        over_run<L::width>(K, [=](int64_t i, int64_t count) {
          Vec x_hat = (L::load(x_row + i, count) - m) * inv;
          const Vec g = L::load(dy_row + i, count);
          const Vec gh = g * Vec::loadu(w + i, count);
          L::store(out + i, inv * (gh - mean_gh - x_hat * mean_gh_xhat), count);
          if (count != L::width) x_hat = Vec::set(Vec(0), x_hat, count);
          (Vec::loadu(acc_dy_xhat + i) + g * x_hat).store(acc_dy_xhat + i);
          (Vec::loadu(acc_dy + i) + g).store(acc_dy + i);
        });
        if (++since_flush == kFlushRows) {
          flush_columns(acc.data(), total, 2 * padded);
          since_flush = 0;
        }
      }
      flush_columns(acc.data(), total, 2 * padded);
    }
  });

  acc_t* out_dy_xhat = sum_dy_xhat.mutable_data_ptr<acc_t>();
  acc_t* out_dy = sum_dy.mutable_data_ptr<acc_t>();
  for (int64_t k = 0; k < K; ++k) {
    double a = 0;
    double b = 0;
    for (int64_t block = 0; block < blocks; ++block) {
      a += partial[block * 2 * padded + k];
      b += partial[block * 2 * padded + padded + k];
    }
    out_dy_xhat[k] = static_cast<acc_t>(a);
    out_dy[k] = static_cast<acc_t>(b);
  }
}

void check_rows(const at::Tensor& x, const char* op) {
  check_float_input(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be a (R, K) view, got shape ", x.sizes());
  TORCH_CHECK(x.size(1) >= 1, op, ": x must have K >= 1 columns, got shape ", x.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_forward(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps) {
  constexpr const char* op = "rows_forward";
  check_rows(x_in, op);
  const at::Tensor x = x_in.contiguous();
  const auto options = x.options().dtype(accumulation_type(x.scalar_type()));
  const int64_t K = x.size(1);
  const at::Tensor weight = column_param(weight_in, K, options, 1.0, op, "weight");
  const at::Tensor bias = column_param(bias_in, K, options, 0.0, op, "bias");
  at::Tensor y = empty_output(x.sizes(), x.scalar_type());
  at::Tensor mean = at::empty({x.size(0)}, options);
  at::Tensor invstd = at::empty({x.size(0)}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    forward_kernel<scalar_t>(x, weight, bias, eps, y, mean, invstd);
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_backward(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& mean_in,
    const at::Tensor& invstd_in, const std::optional<at::Tensor>& weight_in) {
  constexpr const char* op = "rows_backward";
  check_rows(x_in, op);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(), op,
              ": dy must match x (", x_in.scalar_type(), " ", x_in.sizes(), "), got ",
              dy_in.scalar_type(), " ", dy_in.sizes());
  const int64_t R = x_in.size(0);
  const int64_t K = x_in.size(1);
  TORCH_CHECK(mean_in.dim() == 1 && mean_in.size(0) == R, op, ": mean must have shape (", R,
              ",), got ", mean_in.sizes());
  TORCH_CHECK(invstd_in.dim() == 1 && invstd_in.size(0) == R, op,
              ": invstd must have shape (", R, ",), got ", invstd_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const auto options = x.options().dtype(accumulation_type(x.scalar_type()));
  const at::Tensor mean = as_accumulation(mean_in, options);
  const at::Tensor invstd = as_accumulation(invstd_in, options);
  const at::Tensor weight = column_param(weight_in, K, options, 1.0, op, "weight");
  at::Tensor dx = empty_output(x.sizes(), x.scalar_type());
  at::Tensor sum_dy_xhat = at::zeros({K}, options);
  at::Tensor sum_dy = at::zeros({K}, options);
  if (R == 0) return {dx, sum_dy_xhat, sum_dy};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    backward_kernel<scalar_t>(dy, x, mean, invstd, weight, dx, sum_dy_xhat, sum_dy);
  });
  return {dx, sum_dy_xhat, sum_dy};
}

}  // namespace batchnorm_cpu
