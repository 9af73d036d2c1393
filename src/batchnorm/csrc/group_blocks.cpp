// GroupNorm of contiguous (N, C, L) input, one visit per (sample, group) block: the block's
// S = C / G channels of L values are adjacent in memory, so its statistics and then its
// normalization (forward), or its sums and then its input gradient (backward), run while
// the block is in cache: two passes over memory instead of three.
//   forward:  y = (x - mean) * invstd * w_c + b_c, mean and invstd = 1 / sqrt(var + eps)
//             of the block from pivot-shifted sums
//   backward: per channel sum(dy), sum(dy * (x - mean)); per block
//             k0 = -mean_block(w * dy) * invstd, k2 = -mean_block(w * dy * x_hat) * invstd^2,
//             dx = dy * invstd * w_c + k0 + (x - mean) * k2;
//             dw_c = sum_n invstd * sum(dy * (x - mean)), db_c = sum_n sum(dy)
// Each block is summed by one thread in a fixed order, so results do not depend on the
// number of threads.
#include "kernels.h"
#include "ops.h"

namespace batchnorm_cpu {
namespace {

struct GroupShape {
  int64_t groups;    // G
  int64_t per_group; // S
  int64_t length;    // L
  int64_t channels() const { return groups * per_group; }
  int64_t block() const { return per_group * length; }
};

template <typename T>
void forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                    const GroupShape& s, double eps, at::Tensor& y, at::Tensor& mean,
                    at::Tensor& invstd) {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const int64_t K = s.block();
  const T* x_data = x.const_data_ptr<T>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* b = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  T* y_data = y.mutable_data_ptr<T>();
  acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
  acc_t* invstd_data = invstd.mutable_data_ptr<acc_t>();
  const int64_t blocks = mean.numel();
  at::parallel_for(0, blocks, grain_for(2 * K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* block = x_data + r * K;
      const auto [m, inv] = shifted_moments(block, K, eps);
      mean_data[r] = m;
      invstd_data[r] = inv;
      const int64_t first_channel = (r % s.groups) * s.per_group;
      for (int64_t k = 0; k < s.per_group; ++k) {
        const int64_t c = first_channel + k;
        const Vec m_vec(m);
        const Vec scale(w ? inv * w[c] : inv);
        const Vec shift(b ? b[c] : acc_t(0));
        const T* xs = block + k * s.length;
        T* ys = y_data + r * K + k * s.length;
        over_run<L::width>(s.length, [=](int64_t i, int64_t count) {
          L::store(ys + i, (L::load(xs + i, count) - m_vec) * scale + shift, count);
        });
      }
    }
  });
}

template <typename T>
void backward_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                     const at::Tensor& invstd, const at::Tensor& weight, const GroupShape& s,
                     at::Tensor& dx, at::Tensor& sum_dy, at::Tensor& sum_dy_xc) {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const int64_t K = s.block();
  const T* dy_data = dy.const_data_ptr<T>();
  const T* x_data = x.const_data_ptr<T>();
  const acc_t* mean_data = mean.const_data_ptr<acc_t>();
  const acc_t* invstd_data = invstd.const_data_ptr<acc_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  T* dx_data = dx.defined() ? dx.mutable_data_ptr<T>() : nullptr;
  // per (sample, channel), laid out (N, C) = (blocks, S)
  acc_t* g_data = sum_dy.mutable_data_ptr<acc_t>();
  acc_t* gxc_data = sum_dy_xc.mutable_data_ptr<acc_t>();
  const int64_t blocks = mean.numel();
  at::parallel_for(0, blocks, grain_for(3 * K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t m = mean_data[r];
      const acc_t inv = invstd_data[r];
      const Vec m_vec(m);
      const int64_t first_channel = (r % s.groups) * s.per_group;
      double weighted_g = 0;
      double weighted_gxc = 0;
      for (int64_t k = 0; k < s.per_group; ++k) {
        const int64_t offset = r * K + k * s.length;
        TwoSums<acc_t> sums;
        sums.add(s.length, [&](int64_t i, int64_t count) {
          Vec g = L::load(dy_data + offset + i, count);
          Vec xc = L::load(x_data + offset + i, count) - m_vec;
          if (count != L::width) xc = Vec::set(Vec(0), xc, count);
          return std::pair<Vec, Vec>(g, g * xc);
        });
        sums.flush();
        const acc_t g = static_cast<acc_t>(sums.total_first);
        const acc_t gxc = static_cast<acc_t>(sums.total_second);
        g_data[r * s.per_group + k] = g;
        gxc_data[r * s.per_group + k] = gxc;
        const acc_t w_c = w ? w[first_channel + k] : acc_t(1);
        weighted_g += static_cast<double>(w_c * g);
        weighted_gxc += static_cast<double>(w_c * (gxc * inv));
      }
      if (!dx_data) continue;
      const acc_t k0 = -static_cast<acc_t>(weighted_g / K) * inv;
      const acc_t k2 = -static_cast<acc_t>(weighted_gxc / K) * (inv * inv);
      const Vec k0_vec(k0);
      const Vec k2_vec(k2);
      for (int64_t k = 0; k < s.per_group; ++k) {
        const int64_t offset = r * K + k * s.length;
        const Vec k1(w ? inv * w[first_channel + k] : inv);
        over_run<L::width>(s.length, [=](int64_t i, int64_t count) {
          const Vec xc = L::load(x_data + offset + i, count) - m_vec;
          L::store(dx_data + offset + i,
                   L::load(dy_data + offset + i, count) * k1 + k0_vec + xc * k2_vec, count);
        });
      }
    }
  });
}

GroupShape group_shape(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.size(1) % groups == 0,
              "group blocks: x must be a contiguous (N, C, L) view with C divisible by ",
              groups, ", got ", x.sizes());
  return {groups, x.size(1) / groups, x.size(2)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_blocks_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
    double eps) {
  const GroupShape s = group_shape(x, groups);
  const auto options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor y = empty_output(x.sizes(), x.scalar_type());
  at::Tensor mean = at::empty({x.size(0), groups}, options);
  at::Tensor invstd = at::empty({x.size(0), groups}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "group_blocks_forward", [&] {
    forward_kernel<scalar_t>(x, weight, bias, s, eps, y, mean, invstd);
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_blocks_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, int64_t groups, bool input_gradient) {
  const GroupShape s = group_shape(x, groups);
  const auto options = mean.options();
  at::Tensor dx =
      input_gradient ? empty_output(x.sizes(), x.scalar_type()) : at::Tensor();
  at::Tensor sum_dy = at::empty({x.size(0), s.channels()}, options);
  at::Tensor sum_dy_xc = at::empty({x.size(0), s.channels()}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "group_blocks_backward", [&] {
    backward_kernel<scalar_t>(dy.contiguous(), x, mean.contiguous(), invstd.contiguous(),
                              weight, s, dx, sum_dy, sum_dy_xc);
  });
  return {dx, sum_dy, sum_dy_xc};
}

}  // namespace batchnorm_cpu
