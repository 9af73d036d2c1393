// Reductions of a channels view x (P, C, Q) per (chunk, channel):
//   channel_stats:           mean, biased var                        (pivot-shifted sums)
//   channel_backward_reduce: sum(g), sum(g * (x - mean)),  g = dy * act'(z),
//                            z = (x - mean) * scale + shift
// Two loop regimes: long segments (Q >= ChannelShape::kSegmentMinLength) are summed one
// (chunk, channel) item per task, vectorized along Q; short ones (channels-last, Q == 1)
// as the columns of a (P, C * Q) matrix, vectorized along the columns, over fixed row
// blocks whose double partials are merged in block order.
#include <vector>

#include "kernels.h"
#include "ops.h"

namespace batchnorm_cpu {
namespace {

// Column sums of two terms over each group's rows of the (P, W = C * Q) matrix:
// terms(group, row, column, count) gives the pair of vectors for columns
// [column, column + count) of one row (lanes past count zero); finish(group, first, second)
// receives the double sums of the group's W (padded) columns.
template <typename acc_t, typename Terms, typename Finish>
void column_sums(const ChannelShape& s, const Terms& terms, const Finish& finish) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t width = Vec::size();
  const int64_t columns = s.width();
  const int64_t whole = columns - columns % width;
  const int64_t padded = round_up(columns, width);
  const int64_t blocks = row_blocks(s.group_rows());
  std::vector<double> partial(blocks > 1 ? s.chunks * blocks * 2 * padded : 0);

  at::parallel_for(0, s.chunks * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(2 * padded);
    std::vector<double> own_total(blocks > 1 ? 0 : 2 * padded);
    acc_t* acc_first = acc.data();
    acc_t* acc_second = acc_first + padded;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / blocks;
      const int64_t block = task - group * blocks;
      const int64_t group_begin = s.begin(group);
      const int64_t group_rows = s.end(group) - group_begin;
      const int64_t row_end = group_begin + (block + 1) * group_rows / blocks;
      double* total = blocks > 1 ? partial.data() + task * 2 * padded : own_total.data();
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(total, total + 2 * padded, 0.0);

      int64_t row = group_begin + block * group_rows / blocks;
      int64_t since_flush = 0;
      while (row < row_end) {
        if (row + 4 <= row_end) {
          auto step = [&](int64_t j, int64_t count) {
            auto [a0, b0] = terms(group, row, j, count);
            auto [a1, b1] = terms(group, row + 1, j, count);
            auto [a2, b2] = terms(group, row + 2, j, count);
            auto [a3, b3] = terms(group, row + 3, j, count);
            (Vec::loadu(acc_first + j) + ((a0 + a1) + (a2 + a3))).store(acc_first + j);
            (Vec::loadu(acc_second + j) + ((b0 + b1) + (b2 + b3))).store(acc_second + j);
          };
          for (int64_t j = 0; j < whole; j += width) step(j, width);
          if (whole < columns) step(whole, columns - whole);
          row += 4;
          since_flush += 4;
        } else {
          auto step = [&](int64_t j, int64_t count) {
            auto [a, b] = terms(group, row, j, count);
            (Vec::loadu(acc_first + j) + a).store(acc_first + j);
            (Vec::loadu(acc_second + j) + b).store(acc_second + j);
          };
          for (int64_t j = 0; j < whole; j += width) step(j, width);
          if (whole < columns) step(whole, columns - whole);
          row += 1;
          since_flush += 1;
        }
        if (since_flush >= kFlushRows) {
          flush_columns(acc_first, total, 2 * padded);
          since_flush = 0;
        }
      }
      flush_columns(acc_first, total, 2 * padded);
      if (blocks == 1) finish(group, total, total + padded);
    }
  });

  if (blocks > 1) {
    at::parallel_for(0, s.chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> total(2 * padded);
      for (int64_t group = begin; group < end; ++group) {
        std::fill(total.begin(), total.end(), 0.0);
        for (int64_t block = 0; block < blocks; ++block) {
          const double* part = partial.data() + (group * blocks + block) * 2 * padded;
          for (int64_t k = 0; k < 2 * padded; ++k) total[k] += part[k];
        }
        finish(group, total.data(), total.data() + padded);
      }
    });
  }
}

// Sums of a channel's Q columns, in column order.
inline std::pair<double, double> channel_total(const double* first, const double* second,
                                               int64_t channel, int64_t quantity) {
  double a = 0;
  double b = 0;
  for (int64_t q = channel * quantity; q < (channel + 1) * quantity; ++q) {
    a += first[q];
    b += second[q];
  }
  return {a, b};
}

template <typename T>
void stats_kernel(const at::Tensor& x, const ChannelShape& s, at::Tensor& mean,
                  at::Tensor& var) {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const T* data = x.const_data_ptr<T>();
  acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
  acc_t* var_data = var.mutable_data_ptr<acc_t>();
  const int64_t C = s.channels;
  const int64_t Q = s.quantity;

  auto write = [&](int64_t item, int64_t group, double pivot, double sum, double sum_sq) {
    const double count = static_cast<double>((s.end(group) - s.begin(group)) * Q);
    const double shifted = sum / count;
    mean_data[item] = static_cast<acc_t>(pivot + shifted);
    var_data[item] = static_cast<acc_t>(at_least_zero(sum_sq / count - shifted * shifted));
  };

  if (s.columns()) {
    const int64_t W = s.width();
    // pivot of (group, channel): the group's first value x[begin, channel, 0]
    const at::Tensor pivots =
        per_column(x.slice(0, 0, s.rows, s.chunk).select(2, 0).to(mean.scalar_type()), Q)
            .contiguous();
    const acc_t* pivot = pivots.const_data_ptr<acc_t>();
    column_sums<acc_t>(
        s,
        [&](int64_t group, int64_t row, int64_t j, int64_t count) {
          const Vec d = L::load(data + row * W + j, count) - Vec::loadu(pivot + group * W + j, count);
          return std::pair<Vec, Vec>(d, d * d);
        },
        [&](int64_t group, const double* sum, const double* sum_sq) {
          for (int64_t c = 0; c < C; ++c) {
            auto [a, b] = channel_total(sum, sum_sq, c, Q);
            write(group * C + c, group, pivot[group * W + c * Q], a, b);
          }
        });
    return;
  }

  at::parallel_for(0, s.chunks * C, grain_for(s.group_rows() * Q), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / C;
      const int64_t channel = item - group * C;
      const acc_t pivot = static_cast<acc_t>(data[(s.begin(group) * C + channel) * Q]);
      const Vec pivot_vec(pivot);
      TwoSums<acc_t> sums;
      for (int64_t row = s.begin(group); row < s.end(group); ++row) {
        const T* segment = data + (row * C + channel) * Q;
        sums.add(Q, [&](int64_t i, int64_t count) {
          Vec d = L::load(segment + i, count) - pivot_vec;
          if (count != L::width) d = Vec::set(Vec(0), d, count);
          return std::pair<Vec, Vec>(d, d * d);
        });
      }
      sums.flush();
      write(item, group, pivot, sums.total_first, sums.total_second);
    }
  });
}

template <typename T, Activation A>
void backward_reduce_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& scale, const at::Tensor& shift,
                            const ChannelShape& s, double param, at::Tensor& sum_g,
                            at::Tensor& sum_g_xc) {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const T* dy_data = dy.const_data_ptr<T>();
  const T* x_data = x.const_data_ptr<T>();
  acc_t* sum_g_data = sum_g.mutable_data_ptr<acc_t>();
  acc_t* sum_g_xc_data = sum_g_xc.mutable_data_ptr<acc_t>();
  const Vec param_vec(static_cast<acc_t>(param));
  const int64_t C = s.channels;
  const int64_t Q = s.quantity;

  if (s.columns()) {
    const int64_t W = s.width();
    const at::Tensor mean_columns = per_column(mean, Q).contiguous();
    const at::Tensor scale_columns = per_column(scale, Q).contiguous();
    const at::Tensor shift_columns = per_column(shift, Q).contiguous();
    const acc_t* mean_data = mean_columns.const_data_ptr<acc_t>();
    const acc_t* scale_data = scale_columns.const_data_ptr<acc_t>();
    const acc_t* shift_data = shift_columns.const_data_ptr<acc_t>();
    column_sums<acc_t>(
        s,
        [&](int64_t group, int64_t row, int64_t j, int64_t count) {
          const int64_t t = group * W + j;
          const Vec xc = L::load(x_data + row * W + j, count) - Vec::loadu(mean_data + t, count);
          const Vec z = xc * Vec::loadu(scale_data + t, count) + Vec::loadu(shift_data + t, count);
          const Vec g =
              activation_backward<A>(L::load(dy_data + row * W + j, count), z, param_vec);
          return std::pair<Vec, Vec>(g, g * xc);
        },
        [&](int64_t group, const double* first, const double* second) {
          for (int64_t c = 0; c < C; ++c) {
            auto [a, b] = channel_total(first, second, c, Q);
            sum_g_data[group * C + c] = static_cast<acc_t>(a);
            sum_g_xc_data[group * C + c] = static_cast<acc_t>(b);
          }
        });
    return;
  }

  const acc_t* mean_data = mean.const_data_ptr<acc_t>();
  const acc_t* scale_data = scale.const_data_ptr<acc_t>();
  const acc_t* shift_data = shift.const_data_ptr<acc_t>();
  at::parallel_for(0, s.chunks * C, grain_for(2 * s.group_rows() * Q), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / C;
      const int64_t channel = item - group * C;
      const Vec m(mean_data[item]);
      const Vec a(scale_data[item]);
      const Vec b(shift_data[item]);
      TwoSums<acc_t> sums;
      for (int64_t row = s.begin(group); row < s.end(group); ++row) {
        const int64_t offset = (row * C + channel) * Q;
        sums.add(Q, [&](int64_t i, int64_t count) {
          Vec xc = L::load(x_data + offset + i, count) - m;
          Vec g = activation_backward<A>(L::load(dy_data + offset + i, count), xc * a + b,
                                         param_vec);
          if (count != L::width) {
            xc = Vec::set(Vec(0), xc, count);
            g = Vec::set(Vec(0), g, count);
          }
          return std::pair<Vec, Vec>(g, g * xc);
        });
      }
      sums.flush();
      sum_g_data[item] = static_cast<acc_t>(sums.total_first);
      sum_g_xc_data[item] = static_cast<acc_t>(sums.total_second);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& x_in, int64_t chunk) {
  constexpr const char* op = "channel_stats";
  const ChannelShape s = channel_shape(x_in, chunk, op);
  const at::Tensor x = x_in.contiguous();
  const auto options = x.options().dtype(accumulation_type(x.scalar_type()));
  at::Tensor mean = at::empty({s.chunks, s.channels}, options);
  at::Tensor var = at::empty({s.chunks, s.channels}, options);
  if (s.chunks == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op,
                                  [&] { stats_kernel<scalar_t>(x, s, mean, var); });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> channel_backward_reduce(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& mean_in,
    const at::Tensor& scale_in, const at::Tensor& shift_in, int64_t chunk,
    c10::string_view activation, double param) {
  constexpr const char* op = "channel_backward_reduce";
  const ChannelShape s = channel_shape(x_in, chunk, op);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(), op,
              ": dy must match x (", x_in.scalar_type(), " ", x_in.sizes(), "), got ",
              dy_in.scalar_type(), " ", dy_in.sizes());
  const Activation act = parse_activation(activation, op);
  const auto acc = accumulation_type(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor mean = table_arg(mean_in, s.chunks, s.channels, acc, op, "mean");
  const at::Tensor scale = table_arg(scale_in, s.chunks, s.channels, acc, op, "scale");
  const at::Tensor shift = table_arg(shift_in, s.chunks, s.channels, acc, op, "shift");
  const auto options = x.options().dtype(acc);
  at::Tensor sum_g = at::empty({s.chunks, s.channels}, options);
  at::Tensor sum_g_xc = at::empty({s.chunks, s.channels}, options);
  if (s.chunks == 0) return {sum_g, sum_g_xc};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    dispatch_activation(act, [&](auto tag) {
      backward_reduce_kernel<scalar_t, decltype(tag)::value>(dy, x, mean, scale, shift, s,
                                                             param, sum_g, sum_g_xc);
    });
  });
  return {sum_g, sum_g_xc};
}

}  // namespace batchnorm_cpu
