// Elementwise maps of a channels view x (P, C, Q) with per-(chunk, channel) tables:
//   channel_normalize:      y  = act(z),  z = (x - mean) * scale + shift
//   channel_backward_input: dx = g * k1 + k0 + (x - mean) * k2,  g = dy * act'(z)
// and their *_residual forms (the ResNet block tail), where z also adds the shortcut r (x's
// view) and the backward also writes d r = g.
// Long segments (Q >= ChannelShape::kSegmentMinLength) run one (row, channel) segment per
// item with scalar table entries, vectorized along Q; short ones one row of C * Q values
// per item with the tables spread over the columns, vectorized along the row.
#include <unistd.h>

#include <array>

#include "kernels.h"
#include "ops.h"

namespace batchnorm_cpu {
namespace {

// Outputs at least as large as the last-level cache (BATCHNORM_STREAM_MB overrides its size)
// are written with non-temporal stores: they cannot stay in cache for their reader anyway,
// and an ordinary store first reads each line it writes, one more pass over memory.
bool streams(const at::Tensor& out) {
  static const size_t bytes = [] {
    const long cache = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return megabytes_setting("BATCHNORM_STREAM_MB",
                             cache > 0 ? static_cast<size_t>(cache) : size_t(32) << 20);
  }();
  return out.nbytes() >= bytes;
}

// Non-temporal stores are weakly ordered: each thread fences its own before its task ends.
inline void finish_streaming(bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();
#endif
}

// Visits x in runs: op.segment(offset, Q, item) for every (row, channel) segment, item
// indexing the (chunks, C) tables, or op.columns(offset, C * Q, table) for every row, table
// the row's offset into the tables spread over the columns (per_column).
template <typename Op>
void for_each_run(const ChannelShape& s, Op op) {
  const int64_t chunk = s.chunk;
  if (s.columns()) {
    const int64_t W = s.width();
    at::parallel_for(0, s.rows, grain_for(W), [=](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) op.columns(row * W, W, (row / chunk) * W);
      finish_streaming(op.stream);
    });
    return;
  }
  const int64_t C = s.channels;
  const int64_t Q = s.quantity;
  // segments are short: step (row, channel) without a division per segment
  at::parallel_for(0, s.rows * C, grain_for(Q), [=](int64_t begin, int64_t end) {
    int64_t row = begin / C;
    int64_t channel = begin - row * C;
    int64_t table = (row / chunk) * C;
    for (int64_t index = begin; index < end; ++index) {
      op.segment(index * Q, Q, table + channel);
      if (++channel == C) {
        channel = 0;
        ++row;
        table = (row / chunk) * C;
      }
    }
    finish_streaming(op.stream);
  });
}

// The data of a map's tables, spread over the columns in the columns regime.
template <typename acc_t, size_t N>
std::array<const acc_t*, N> map_tables(const std::array<at::Tensor, N>& tables,
                                       const ChannelShape& s,
                                       std::array<std::vector<acc_t>, N>& storage) {
  std::array<const acc_t*, N> data;
  for (size_t k = 0; k < N; ++k) {
    data[k] = tables[k].template const_data_ptr<acc_t>();
    if (s.columns()) data[k] = per_column(data[k], s, storage[k]);
  }
  return data;
}

// y = act((x - mean) * scale + shift [+ r])
template <typename T, Activation A, bool Residual>
struct Normalize {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const T* x;
  const T* r;  // with Residual
  T* y;
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  acc_t param;
  bool stream;

  void store(int64_t offset, int64_t count, Vec z, const Vec& p) const {
    if constexpr (Residual) z = z + L::load(r + offset, count);
    const Vec out = activation_forward<A>(z, p);
    if (stream) {
      L::stream(y + offset, out, count);
    } else {
      L::store(y + offset, out, count);
    }
  }

  void segment(int64_t offset, int64_t n, int64_t item) const {
    const T* xs = x + offset;
    const Vec m(mean[item]), a(scale[item]), b(shift[item]), p(param);
    over_run<L::width>(n, [=](int64_t i, int64_t count) {
      store(offset + i, count, (L::load(xs + i, count) - m) * a + b, p);
    });
  }

  void columns(int64_t offset, int64_t n, int64_t table) const {
    const T* xs = x + offset;
    const acc_t* ms = mean + table;
    const acc_t* as = scale + table;
    const acc_t* bs = shift + table;
    const Vec p(param);
    over_run<L::width>(n, [=](int64_t i, int64_t count) {
      store(offset + i, count,
            (L::load(xs + i, count) - Vec::loadu(ms + i, count)) * Vec::loadu(as + i, count) +
                Vec::loadu(bs + i, count),
            p);
    });
  }
};

// dx = g * k1 + k0 + (x - mean) * k2,  g = dy * act'((x - mean) * scale + shift [+ r]),
// and with Residual dr = g
template <typename T, Activation A, bool Residual>
struct BackwardInput {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const T* dy;
  const T* x;
  const T* r;  // with Residual
  T* dx;
  T* dr;  // with Residual
  std::array<const acc_t*, 6> t;  // mean, scale, shift, k1, k0, k2
  acc_t param;
  bool stream;

  void store(int64_t offset, int64_t count, const Vec& m, const Vec& a, const Vec& b,
             const Vec& k1, const Vec& k0, const Vec& k2, const Vec& p) const {
    const Vec xc = L::load(x + offset, count) - m;
    Vec z = xc * a + b;
    if constexpr (Residual) z = z + L::load(r + offset, count);
    const Vec g = activation_backward<A>(L::load(dy + offset, count), z, p);
    const Vec out = g * k1 + k0 + xc * k2;
    if (stream) {
      L::stream(dx + offset, out, count);
      if constexpr (Residual) L::stream(dr + offset, g, count);
    } else {
      L::store(dx + offset, out, count);
      if constexpr (Residual) L::store(dr + offset, g, count);
    }
  }

  void segment(int64_t offset, int64_t n, int64_t item) const {
    const Vec m(t[0][item]), a(t[1][item]), b(t[2][item]);
    const Vec k1(t[3][item]), k0(t[4][item]), k2(t[5][item]), p(param);
    over_run<L::width>(n, [=](int64_t i, int64_t count) {
      store(offset + i, count, m, a, b, k1, k0, k2, p);
    });
  }

  void columns(int64_t offset, int64_t n, int64_t table) const {
    const acc_t *m = t[0] + table, *a = t[1] + table, *b = t[2] + table;
    const acc_t *k1 = t[3] + table, *k0 = t[4] + table, *k2 = t[5] + table;
    const Vec p(param);
    over_run<L::width>(n, [=](int64_t i, int64_t count) {
      store(offset + i, count, Vec::loadu(m + i, count), Vec::loadu(a + i, count),
            Vec::loadu(b + i, count), Vec::loadu(k1 + i, count), Vec::loadu(k0 + i, count),
            Vec::loadu(k2 + i, count), p);
    });
  }
};

at::Tensor normalize(const at::Tensor& x_in, const at::Tensor* residual_in,
                     const at::Tensor& mean_in, const at::Tensor& scale_in,
                     const at::Tensor& shift_in, int64_t chunk, c10::string_view activation,
                     double param, const char* op) {
  const ChannelShape s = channel_shape(x_in, chunk, op);
  const Activation act = parse_activation(activation, op);
  const auto acc = accumulation_type(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = residual_in ? like_x(*residual_in, x, op, "residual") : at::Tensor();
  const at::Tensor mean = table_arg(mean_in, s.chunks, s.channels, acc, op, "mean");
  const at::Tensor scale = table_arg(scale_in, s.chunks, s.channels, acc, op, "scale");
  const at::Tensor shift = table_arg(shift_in, s.chunks, s.channels, acc, op, "shift");
  at::Tensor y = empty_output(x.sizes(), x.scalar_type());
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_normalize",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::array<std::vector<acc_t>, 3> storage;
    const auto t = map_tables<acc_t, 3>({mean, scale, shift}, s, storage);
    const scalar_t* r = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    dispatch_activation(act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      const scalar_t* xs = x.const_data_ptr<scalar_t>();
      scalar_t* ys = y.mutable_data_ptr<scalar_t>();
      const acc_t p = static_cast<acc_t>(param);
      const bool stream = streams(y);
      if (r) {
        for_each_run(s, Normalize<scalar_t, A, true>{xs, r, ys, t[0], t[1], t[2], p, stream});
      } else {
        for_each_run(s, Normalize<scalar_t, A, false>{xs, r, ys, t[0], t[1], t[2], p, stream});
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> backward_input(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor* residual_in,
    const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& k1, const at::Tensor& k0, const at::Tensor& k2, int64_t chunk,
    c10::string_view activation, double param, const char* op) {
  const BackwardArgs a = backward_args(dy_in, x_in, residual_in, chunk, activation, op);
  const ChannelShape& s = a.s;
  const auto acc = a.acc;
  const at::Tensor& x = a.x;
  const at::Tensor& residual = a.residual;
  const std::array<at::Tensor, 6> tables = {
      table_arg(mean, s.chunks, s.channels, acc, op, "mean"),
      table_arg(scale, s.chunks, s.channels, acc, op, "scale"),
      table_arg(shift, s.chunks, s.channels, acc, op, "shift"),
      table_arg(k1, s.chunks, s.channels, acc, op, "k1"),
      table_arg(k0, s.chunks, s.channels, acc, op, "k0"),
      table_arg(k2, s.chunks, s.channels, acc, op, "k2")};
  at::Tensor dx = empty_output(x.sizes(), x.scalar_type());
  at::Tensor dr =
      residual.defined() ? empty_output(x.sizes(), x.scalar_type()) : at::Tensor();
  if (x.numel() == 0) return {dx, dr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "channel_backward_input", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::array<std::vector<acc_t>, 6> storage;
    const auto data = map_tables<acc_t, 6>(tables, s, storage);
    const scalar_t* dys = a.dy.const_data_ptr<scalar_t>();
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    scalar_t* dxs = dx.mutable_data_ptr<scalar_t>();
    const acc_t p = static_cast<acc_t>(param);
    dispatch_activation(a.act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      const bool stream = streams(dx);
      if (residual.defined()) {
        for_each_run(s, BackwardInput<scalar_t, A, true>{
                            dys, xs, residual.const_data_ptr<scalar_t>(), dxs,
                            dr.mutable_data_ptr<scalar_t>(), data, p, stream});
      } else {
        for_each_run(s, BackwardInput<scalar_t, A, false>{dys, xs, nullptr, dxs, nullptr,
                                                           data, p, stream});
      }
    });
  });
  return {dx, dr};
}

}  // namespace

at::Tensor channel_normalize(const at::Tensor& x, const at::Tensor& mean,
                             const at::Tensor& scale, const at::Tensor& shift, int64_t chunk,
                             c10::string_view activation, double param) {
  return normalize(x, nullptr, mean, scale, shift, chunk, activation, param,
                   "channel_normalize");
}

at::Tensor channel_normalize_residual(const at::Tensor& x, const at::Tensor& residual,
                                      const at::Tensor& mean, const at::Tensor& scale,
                                      const at::Tensor& shift, int64_t chunk,
                                      c10::string_view activation, double param) {
  return normalize(x, &residual, mean, scale, shift, chunk, activation, param,
                   "channel_normalize_residual");
}

at::Tensor channel_backward_input(const at::Tensor& dy, const at::Tensor& x,
                                  const at::Tensor& mean, const at::Tensor& scale,
                                  const at::Tensor& shift, const at::Tensor& k1,
                                  const at::Tensor& k0, const at::Tensor& k2, int64_t chunk,
                                  c10::string_view activation, double param) {
  return std::get<0>(backward_input(dy, x, nullptr, mean, scale, shift, k1, k0, k2, chunk,
                                    activation, param, "channel_backward_input"));
}

std::tuple<at::Tensor, at::Tensor> channel_backward_input_residual(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual,
    const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& k1, const at::Tensor& k0, const at::Tensor& k2, int64_t chunk,
    c10::string_view activation, double param) {
  return backward_input(dy, x, &residual, mean, scale, shift, k1, k0, k2, chunk, activation,
                        param, "channel_backward_input_residual");
}

}  // namespace batchnorm_cpu
