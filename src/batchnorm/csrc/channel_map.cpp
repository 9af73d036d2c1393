// Elementwise maps of a channels view x (P, C, Q) with per-(chunk, channel) tables:
//   channel_normalize:      y  = act(z),  z = (x - mean) * scale + shift
//   channel_backward_input: dx = g * k1 + k0 + (x - mean) * k2,  g = dy * act'(z)
// Long segments (Q >= ChannelShape::kSegmentMinLength) run one (row, channel) segment per
// item with scalar table entries, vectorized along Q; short ones one row of C * Q values
// per item with the tables spread over the columns, vectorized along the row.
#include <array>

#include "kernels.h"
#include "ops.h"

namespace batchnorm_cpu {
namespace {

// Calls body(out_offset, count, table_index_or_pointer...) for every vector of x:
// segments(offset, count, item) with item = (group, channel) index into the tables, or
// columns(offset, count, column_offset) with column_offset into the (chunks, C * Q) tables.
template <int64_t width, typename Segment, typename Columns>
void for_each_vector(const ChannelShape& s, const Segment& segment, const Columns& columns) {
  const int64_t C = s.channels;
  const int64_t Q = s.quantity;
  if (s.columns()) {
    const int64_t W = s.width();
    const int64_t whole = W - W % width;
    at::parallel_for(0, s.rows, grain_for(W), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t table = (row / s.chunk) * W;
        for (int64_t j = 0; j < whole; j += width) columns(row * W + j, width, table + j);
        if (whole < W) columns(row * W + whole, W - whole, table + whole);
      }
    });
    return;
  }
  const int64_t whole = Q - Q % width;
  at::parallel_for(0, s.rows * C, grain_for(Q), [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t row = index / C;
      const int64_t item = (row / s.chunk) * C + (index - row * C);
      const int64_t offset = index * Q;
      for (int64_t i = 0; i < whole; i += width) segment(offset + i, width, item);
      if (whole < Q) segment(offset + whole, Q - whole, item);
    }
  });
}

template <typename T, Activation A>
void normalize_kernel(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                      const at::Tensor& shift, const ChannelShape& s, double param,
                      at::Tensor& y) {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const T* x_data = x.const_data_ptr<T>();
  T* y_data = y.mutable_data_ptr<T>();
  const Vec param_vec(static_cast<acc_t>(param));
  auto apply = [&](int64_t offset, int64_t count, const Vec& m, const Vec& a, const Vec& b) {
    const Vec z = (L::load(x_data + offset, count) - m) * a + b;
    L::store(y_data + offset, activation_forward<A>(z, param_vec), count);
  };
  const int64_t Q = s.quantity;
  const at::Tensor mean_t = s.columns() ? per_column(mean, Q).contiguous() : mean;
  const at::Tensor scale_t = s.columns() ? per_column(scale, Q).contiguous() : scale;
  const at::Tensor shift_t = s.columns() ? per_column(shift, Q).contiguous() : shift;
  const acc_t* m = mean_t.const_data_ptr<acc_t>();
  const acc_t* a = scale_t.const_data_ptr<acc_t>();
  const acc_t* b = shift_t.const_data_ptr<acc_t>();
  for_each_vector<L::width>(
      s,
      [&](int64_t offset, int64_t count, int64_t item) {
        apply(offset, count, Vec(m[item]), Vec(a[item]), Vec(b[item]));
      },
      [&](int64_t offset, int64_t count, int64_t t) {
        apply(offset, count, Vec::loadu(m + t, count), Vec::loadu(a + t, count),
              Vec::loadu(b + t, count));
      });
}

template <typename T, Activation A>
void backward_input_kernel(const at::Tensor& dy, const at::Tensor& x,
                           const std::array<at::Tensor, 6>& tables, const ChannelShape& s,
                           double param, at::Tensor& dx) {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const T* dy_data = dy.const_data_ptr<T>();
  const T* x_data = x.const_data_ptr<T>();
  T* dx_data = dx.mutable_data_ptr<T>();
  const Vec param_vec(static_cast<acc_t>(param));
  // tables: mean, scale, shift, k1, k0, k2
  std::array<at::Tensor, 6> spread;
  std::array<const acc_t*, 6> t{};
  for (size_t k = 0; k < tables.size(); ++k) {
    spread[k] = s.columns() ? per_column(tables[k], s.quantity).contiguous() : tables[k];
    t[k] = spread[k].const_data_ptr<acc_t>();
  }
  auto apply = [&](int64_t offset, int64_t count, const std::array<Vec, 6>& v) {
    const Vec xc = L::load(x_data + offset, count) - v[0];
    const Vec g = activation_backward<A>(L::load(dy_data + offset, count), xc * v[1] + v[2],
                                         param_vec);
    L::store(dx_data + offset, g * v[3] + v[4] + xc * v[5], count);
  };
  for_each_vector<L::width>(
      s,
      [&](int64_t offset, int64_t count, int64_t item) {
        apply(offset, count,
              {Vec(t[0][item]), Vec(t[1][item]), Vec(t[2][item]), Vec(t[3][item]),
               Vec(t[4][item]), Vec(t[5][item])});
      },
      [&](int64_t offset, int64_t count, int64_t j) {
        apply(offset, count,
              {Vec::loadu(t[0] + j, count), Vec::loadu(t[1] + j, count),
               Vec::loadu(t[2] + j, count), Vec::loadu(t[3] + j, count),
               Vec::loadu(t[4] + j, count), Vec::loadu(t[5] + j, count)});
      });
}

}  // namespace

at::Tensor channel_normalize(const at::Tensor& x_in, const at::Tensor& mean_in,
                             const at::Tensor& scale_in, const at::Tensor& shift_in,
                             int64_t chunk, c10::string_view activation, double param) {
  constexpr const char* op = "channel_normalize";
  const ChannelShape s = channel_shape(x_in, chunk, op);
  const Activation act = parse_activation(activation, op);
  const auto acc = accumulation_type(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mean = table_arg(mean_in, s.chunks, s.channels, acc, op, "mean");
  const at::Tensor scale = table_arg(scale_in, s.chunks, s.channels, acc, op, "scale");
  const at::Tensor shift = table_arg(shift_in, s.chunks, s.channels, acc, op, "shift");
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    dispatch_activation(act, [&](auto tag) {
      normalize_kernel<scalar_t, decltype(tag)::value>(x, mean, scale, shift, s, param, y);
    });
  });
  return y;
}

at::Tensor channel_backward_input(const at::Tensor& dy_in, const at::Tensor& x_in,
                                  const at::Tensor& mean, const at::Tensor& scale,
                                  const at::Tensor& shift, const at::Tensor& k1,
                                  const at::Tensor& k0, const at::Tensor& k2, int64_t chunk,
                                  c10::string_view activation, double param) {
  constexpr const char* op = "channel_backward_input";
  const ChannelShape s = channel_shape(x_in, chunk, op);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(), op,
              ": dy must match x (", x_in.scalar_type(), " ", x_in.sizes(), "), got ",
              dy_in.scalar_type(), " ", dy_in.sizes());
  const Activation act = parse_activation(activation, op);
  const auto acc = accumulation_type(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const std::array<at::Tensor, 6> tables = {
      table_arg(mean, s.chunks, s.channels, acc, op, "mean"),
      table_arg(scale, s.chunks, s.channels, acc, op, "scale"),
      table_arg(shift, s.chunks, s.channels, acc, op, "shift"),
      table_arg(k1, s.chunks, s.channels, acc, op, "k1"),
      table_arg(k0, s.chunks, s.channels, acc, op, "k0"),
      table_arg(k2, s.chunks, s.channels, acc, op, "k2")};
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    dispatch_activation(act, [&](auto tag) {
      backward_input_kernel<scalar_t, decltype(tag)::value>(dy, x, tables, s, param, dx);
    });
  });
  return dx;
}

}  // namespace batchnorm_cpu
