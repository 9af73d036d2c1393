// Reductions of a channels view x (P, C, Q) per (chunk, channel):
//   channel_stats:           mean, biased var                        (pivot-shifted sums)
//   channel_backward_reduce: sum(g), sum(g * (x - mean)),  g = dy * act'(z [+ r]),
//                            z = (x - mean) * scale + shift
// Two loop regimes: long segments (Q >= ChannelShape::kSegmentMinLength) are summed one
// (chunk, channel) item per task, vectorized along Q (a group's rows split into blocks when
// the items are few and long); short ones (channels-last, Q == 1) as the columns of a
// (P, C * Q) matrix, vectorized along the columns, over fixed row blocks. Block partials are
// doubles merged in block order.
#include <vector>

#include "kernels.h"
#include "ops.h"

namespace batchnorm_cpu {
namespace {

// Adds columns [begin, end) of `Rows` consecutive rows of the terms into the float column
// accumulators, the rows' terms summed pairwise first: one load and store of each
// accumulator per Rows rows (a row at a time, those loads and stores bound the loop while
// the data is in cache). The statistics of views up to kGroupedValues group rows so; past
// that, four rows read side by side are four streams, which the prefetcher serves worse than
// one (views not in cache, two threads: 256x1024 float32 83 -> 57 us grouped, but 800x784
// 91 -> 123-138 us and 25088x128 350-440 -> 870-930 us). The backward reduction, with two
// tensors and the activation's terms, never does (grouped, it took up to 2x the time).
// Captures by value (see over_run).
constexpr int64_t kGroupedValues = int64_t(1) << 18;  // 1 MiB of float32: one core's L2
template <int Rows, typename acc_t, typename Terms>
inline void add_rows(const Terms terms, int64_t group, int64_t row, int64_t begin, int64_t end,
                     acc_t* first, acc_t* second) {
  using Vec = Vectorized<acc_t>;
  over_run<Vec::size()>(end - begin, [=](int64_t i, int64_t count) {
    const int64_t j = begin + i;
    auto [a, b] = terms(group, row, j, count);
    if constexpr (Rows == 4) {
      auto [a1, b1] = terms(group, row + 1, j, count);
      auto [a2, b2] = terms(group, row + 2, j, count);
      auto [a3, b3] = terms(group, row + 3, j, count);
      a = (a + a1) + (a2 + a3);
      b = (b + b1) + (b2 + b3);
    }
    (Vec::loadu(first + j) + a).store(first + j);
    (Vec::loadu(second + j) + b).store(second + j);
  });
}

// Column parts of a column reduction whose row tasks (groups x row blocks) are too few for
// the threads: few rows of many columns (channels-last on a small image, a wide
// BatchNorm1d). Each part sums a vector-aligned column range; columns sum independently, so
// the sums do not depend on the split. Parts keep at least kPartValues values each; a
// reduction too small to run in parallel keeps whole rows.
constexpr int64_t kTasksPerThread = 4;
constexpr int64_t kPartValues = 4096;

template <typename acc_t>
int64_t column_parts(int64_t row_tasks, int64_t task_rows, int64_t padded) {
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || row_tasks >= kTasksPerThread * threads ||
      row_tasks * task_rows * padded <= kGrainValues) {
    return 1;
  }
  const int64_t wanted = (kTasksPerThread * threads + row_tasks - 1) / row_tasks;
  const int64_t vectors = padded / Vectorized<acc_t>::size();
  return std::max<int64_t>(1, std::min({wanted, task_rows * padded / kPartValues, vectors}));
}

// Column sums of two terms over each group's rows of the (P, W = C * Q) matrix:
// terms(group, row, column, count) gives the pair of vectors for columns
// [column, column + count) of one row (lanes past count zero); finish(group, first, second)
// receives the double sums of the group's W columns (arrays padded to the vector width, its
// own to overwrite).
// Each group's rows are split into row_blocks() blocks; a block sums in float over at most
// kFlushRows rows at a time (four rows at a time when `grouped`), then in double; blocks
// are merged in block order. A task sums one block over one column part.
template <typename acc_t, typename Terms, typename Finish>
void column_sums(const ChannelShape& s, const Terms terms, const Finish& finish,
                 bool grouped) {
  constexpr int64_t width = Vectorized<acc_t>::size();
  const int64_t columns = s.width();
  const int64_t padded = round_up(columns, width);
  const int64_t blocks = row_blocks(s.group_rows());
  const int64_t block_rows = s.group_rows() / blocks;
  const int64_t parts = column_parts<acc_t>(s.chunks * blocks, block_rows, padded);
  const int64_t part_vectors = (padded / width + parts - 1) / parts;
  const bool merged = blocks > 1 || parts > 1;  // finish after every task
  std::vector<double> partial(merged ? s.chunks * blocks * 2 * padded : 0);

  at::parallel_for(0, s.chunks * blocks * parts, grain_for(block_rows * part_vectors * width),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(2 * padded, acc_t(0));  // zero again after every flush
    std::vector<double> own_total(merged ? 0 : 2 * padded);
    acc_t* first = acc.data();
    acc_t* second = first + padded;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / (blocks * parts);
      const int64_t block = task / parts - group * blocks;
      const int64_t part = task % parts;
      const int64_t column_begin = std::min(columns, part * part_vectors * width);
      const int64_t column_end = std::min(columns, (part + 1) * part_vectors * width);
      const int64_t group_begin = s.begin(group);
      const int64_t group_rows = s.end(group) - group_begin;
      const int64_t row_end = group_begin + (block + 1) * group_rows / blocks;
      double* total = merged ? partial.data() + (group * blocks + block) * 2 * padded
                             : own_total.data();
      bool flushed = false;
      auto flush = [&, first, total] {
        for (const int64_t half : {int64_t(0), padded}) {
          for (int64_t k = half + column_begin; k < half + column_end; ++k) {
            total[k] = flushed ? total[k] + static_cast<double>(first[k])
                               : static_cast<double>(first[k]);
            first[k] = acc_t(0);
          }
        }
        flushed = true;
      };
      int64_t since_flush = 0;
      int64_t row = group_begin + block * group_rows / blocks;
      for (; grouped && row + 4 <= row_end; row += 4) {  // kFlushRows is a multiple of 4
        add_rows<4>(terms, group, row, column_begin, column_end, first, second);
        if ((since_flush += 4) == kFlushRows) {
          flush();
          since_flush = 0;
        }
      }
      for (; row < row_end; ++row) {
        add_rows<1>(terms, group, row, column_begin, column_end, first, second);
        if (++since_flush == kFlushRows) {
          flush();
          since_flush = 0;
        }
      }
      if (since_flush > 0 || !flushed) flush();
      if (!merged) finish(group, total, total + padded);
    }
  });

  if (merged) {
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

// segment_sums in memory order, for views larger than the caches: a task sums a block of a
// group's rows, each row's C segments in turn, one sequential stream (item order would jump
// a whole row between two segments, which the hardware prefetcher follows at about half the
// bandwidth: the statistics of a 51 MB NCHW batch took 2.5x a sequential read). Each
// segment's sums go into the block's per-channel doubles; blocks (a function of the shape)
// merge in block order.
template <typename acc_t, typename Add, typename Finish>
void streamed_segment_sums(const ChannelShape& s, const Add& add, const Finish& finish) {
  const int64_t C = s.channels;
  const int64_t blocks = std::clamp<int64_t>(s.group_rows() / kStreamBlockRows, 1, kMaxBlocks);
  std::vector<double> partial(s.chunks * blocks * 2 * C, 0.0);
  at::parallel_for(0, s.chunks * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / blocks;
      const int64_t block = task - group * blocks;
      const int64_t first_row = s.begin(group);
      const int64_t rows = s.end(group) - first_row;
      double* first = partial.data() + task * 2 * C;
      double* second = first + C;
      for (int64_t row = first_row + block * rows / blocks;
           row < first_row + (block + 1) * rows / blocks; ++row) {
        for (int64_t channel = 0; channel < C; ++channel) {
          TwoSums<acc_t> sums;
          add(sums, group, channel, row);
          sums.flush();
          first[channel] += sums.total_first;
          second[channel] += sums.total_second;
        }
      }
    }
  });
  for (int64_t group = 0; group < s.chunks; ++group) {
    for (int64_t channel = 0; channel < C; ++channel) {
      double a = 0;
      double b = 0;
      for (int64_t block = 0; block < blocks; ++block) {
        const double* part = partial.data() + (group * blocks + block) * 2 * C;
        a += part[channel];
        b += part[C + channel];
      }
      finish(group * C + channel, a, b);
    }
  }
}

// Sums of two terms per (group, channel) item over the long segments of a channels view:
// add(sums, group, channel, row) adds the terms of one row's segment to a TwoSums;
// finish(item, first, second) receives the item's double totals. A view of at least
// kStreamValues values with kStreamBlockRows rows per group or more is summed in memory
// order (streamed_segment_sums); otherwise item by item, and when the items are few and
// long each group's rows are split into blocks (a function of the shape), merged in block
// order.
template <typename acc_t, typename Add, typename Finish>
void segment_sums(const ChannelShape& s, const Add& add, const Finish& finish) {
  if (s.rows * s.width() >= kStreamValues && s.group_rows() >= kStreamBlockRows) {
    streamed_segment_sums<acc_t>(s, add, finish);
    return;
  }
  const int64_t C = s.channels;
  const int64_t items = s.chunks * C;
  const int64_t blocks = std::clamp<int64_t>(
      s.group_rows() * s.quantity / kSegmentBlockValues, 1, std::min(s.group_rows(), kMaxBlocks));
  auto block_sums = [&](int64_t item, int64_t block) {
    const int64_t group = item / C;
    const int64_t channel = item - group * C;
    const int64_t begin = s.begin(group);
    const int64_t rows = s.end(group) - begin;
    TwoSums<acc_t> sums;
    for (int64_t row = begin + block * rows / blocks; row < begin + (block + 1) * rows / blocks;
         ++row) {
      add(sums, group, channel, row);
    }
    sums.flush();
    return std::pair<double, double>(sums.total_first, sums.total_second);
  };
  if (blocks == 1) {
    at::parallel_for(0, items, grain_for(s.group_rows() * s.quantity),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t item = begin; item < end; ++item) {
                         auto [a, b] = block_sums(item, 0);
                         finish(item, a, b);
                       }
                     });
    return;
  }
  std::vector<std::pair<double, double>> partial(items * blocks);
  at::parallel_for(0, items * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      partial[task] = block_sums(task / blocks, task % blocks);
    }
  });
  for (int64_t item = 0; item < items; ++item) {
    double a = 0;
    double b = 0;
    for (int64_t block = 0; block < blocks; ++block) {
      a += partial[item * blocks + block].first;
      b += partial[item * blocks + block].second;
    }
    finish(item, a, b);
  }
}

// Sums each channel's Q adjacent columns into column `channel`, in place and in column order.
inline void fold_columns(double* values, int64_t channels, int64_t quantity) {
  if (quantity == 1) return;
  for (int64_t c = 0; c < channels; ++c) {
    double total = 0;
    for (int64_t q = c * quantity; q < (c + 1) * quantity; ++q) total += values[q];
    values[c] = total;
  }
}

// mean = pivot + sum / n,  var = sum_sq / n - (sum / n)^2  from pivot-shifted sums over n
// values (a plain loop over local pointers, so that it vectorizes).
template <typename acc_t>
void write_stats(const double* sum, const double* sum_sq, const acc_t* pivot, int64_t count,
                 double inverse_n, acc_t* mean, acc_t* var) {
  for (int64_t k = 0; k < count; ++k) {
    const double shifted = sum[k] * inverse_n;
    const double variance = sum_sq[k] * inverse_n - shifted * shifted;
    mean[k] = static_cast<acc_t>(static_cast<double>(pivot[k]) + shifted);
    var[k] = static_cast<acc_t>(variance < 0 ? 0.0 : variance);  // NaN stays NaN
  }
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

  auto inverse_count = [&](int64_t group) {
    return 1.0 / static_cast<double>((s.end(group) - s.begin(group)) * Q);
  };

  if (s.columns()) {
    const int64_t W = s.width();
    // pivot of (group, channel): the group's first value x[begin, channel, 0]
    std::vector<acc_t> pivot_channels(s.chunks * C);
    for (int64_t group = 0; group < s.chunks; ++group) {
      for (int64_t c = 0; c < C; ++c) {
        pivot_channels[group * C + c] = static_cast<acc_t>(data[(s.begin(group) * C + c) * Q]);
      }
    }
    std::vector<acc_t> storage;
    const acc_t* pivot = per_column(pivot_channels.data(), s, storage);
    const acc_t* pivot_of_channel = pivot_channels.data();
    column_sums<acc_t>(
        s,
        [=](int64_t group, int64_t row, int64_t j, int64_t count) {
          const Vec d = L::load(data + row * W + j, count) -
                        Vec::loadu(pivot + group * W + j, count);
          return std::pair<Vec, Vec>(d, d * d);
        },
        [&](int64_t group, double* sum, double* sum_sq) {
          fold_columns(sum, C, Q);
          fold_columns(sum_sq, C, Q);
          write_stats(sum, sum_sq, pivot_of_channel + group * C, C, inverse_count(group),
                      mean_data + group * C, var_data + group * C);
        },
        /*grouped=*/s.rows * s.width() <= kGroupedValues);
    return;
  }

  segment_sums<acc_t>(
      s,
      [&](TwoSums<acc_t>& sums, int64_t group, int64_t channel, int64_t row) {
        const Vec pivot(static_cast<acc_t>(data[(s.begin(group) * C + channel) * Q]));
        const T* segment = data + (row * C + channel) * Q;
        sums.add(Q, [&](int64_t i, int64_t count) {
          Vec d = L::load(segment + i, count) - pivot;
          if (count != L::width) d = Vec::set(Vec(0), d, count);
          return std::pair<Vec, Vec>(d, d * d);
        });
      },
      [&](int64_t item, double sum, double sum_sq) {
        const int64_t group = item / C;
        const acc_t pivot =
            static_cast<acc_t>(data[(s.begin(group) * C + item - group * C) * Q]);
        write_stats(&sum, &sum_sq, &pivot, 1, inverse_count(group), mean_data + item,
                    var_data + item);
      });
}

// With Residual, z adds the shortcut r (the ResNet block tail).
template <typename T, Activation A, bool Residual>
void backward_reduce_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& r,
                            const at::Tensor& mean, const at::Tensor& scale,
                            const at::Tensor& shift, const ChannelShape& s, double param,
                            at::Tensor& sum_g, at::Tensor& sum_g_xc) {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const T* dy_data = dy.const_data_ptr<T>();
  const T* x_data = x.const_data_ptr<T>();
  const T* r_data = Residual ? r.const_data_ptr<T>() : nullptr;
  acc_t* sum_g_data = sum_g.mutable_data_ptr<acc_t>();
  acc_t* sum_g_xc_data = sum_g_xc.mutable_data_ptr<acc_t>();
  const Vec param_vec(static_cast<acc_t>(param));
  const int64_t C = s.channels;
  const int64_t Q = s.quantity;

  if (s.columns()) {
    const int64_t W = s.width();
    std::vector<acc_t> storage[3];
    const acc_t* mean_data = per_column(mean.const_data_ptr<acc_t>(), s, storage[0]);
    const acc_t* scale_data = per_column(scale.const_data_ptr<acc_t>(), s, storage[1]);
    const acc_t* shift_data = per_column(shift.const_data_ptr<acc_t>(), s, storage[2]);
    column_sums<acc_t>(
        s,
        [=](int64_t group, int64_t row, int64_t j, int64_t count) {
          const int64_t t = group * W + j;
          const Vec xc = L::load(x_data + row * W + j, count) - Vec::loadu(mean_data + t, count);
          Vec z = xc * Vec::loadu(scale_data + t, count) + Vec::loadu(shift_data + t, count);
          if constexpr (Residual) z = z + L::load(r_data + row * W + j, count);
          const Vec g =
              activation_backward<A>(L::load(dy_data + row * W + j, count), z, param_vec);
          return std::pair<Vec, Vec>(g, g * xc);
        },
        [&](int64_t group, double* first, double* second) {
          fold_columns(first, C, Q);
          fold_columns(second, C, Q);
          acc_t* out_g = sum_g_data + group * C;
          acc_t* out_g_xc = sum_g_xc_data + group * C;
          for (int64_t c = 0; c < C; ++c) {
            out_g[c] = static_cast<acc_t>(first[c]);
            out_g_xc[c] = static_cast<acc_t>(second[c]);
          }
        },
        /*grouped=*/false);
    return;
  }

  const acc_t* mean_data = mean.const_data_ptr<acc_t>();
  const acc_t* scale_data = scale.const_data_ptr<acc_t>();
  const acc_t* shift_data = shift.const_data_ptr<acc_t>();
  segment_sums<acc_t>(
      s,
      [&](TwoSums<acc_t>& sums, int64_t group, int64_t channel, int64_t row) {
        const int64_t item = group * C + channel;
        const Vec m(mean_data[item]);
        const Vec a(scale_data[item]);
        const Vec b(shift_data[item]);
        const int64_t offset = (row * C + channel) * Q;
        sums.add(Q, [&](int64_t i, int64_t count) {
          Vec xc = L::load(x_data + offset + i, count) - m;
          Vec z = xc * a + b;
          if constexpr (Residual) z = z + L::load(r_data + offset + i, count);
          Vec g = activation_backward<A>(L::load(dy_data + offset + i, count), z, param_vec);
          if (count != L::width) {
            xc = Vec::set(Vec(0), xc, count);
            g = Vec::set(Vec(0), g, count);
          }
          return std::pair<Vec, Vec>(g, g * xc);
        });
      },
      [&](int64_t item, double first, double second) {
        sum_g_data[item] = static_cast<acc_t>(first);
        sum_g_xc_data[item] = static_cast<acc_t>(second);
      });
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor* residual_in,
    const at::Tensor& mean_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    int64_t chunk, c10::string_view activation, double param, const char* op) {
  const BackwardArgs a = backward_args(dy_in, x_in, residual_in, chunk, activation, op);
  const ChannelShape& s = a.s;
  const auto acc = a.acc;
  const at::Tensor mean = table_arg(mean_in, s.chunks, s.channels, acc, op, "mean");
  const at::Tensor scale = table_arg(scale_in, s.chunks, s.channels, acc, op, "scale");
  const at::Tensor shift = table_arg(shift_in, s.chunks, s.channels, acc, op, "shift");
  const auto options = a.x.options().dtype(acc);
  at::Tensor sum_g = at::empty({s.chunks, s.channels}, options);
  at::Tensor sum_g_xc = at::empty({s.chunks, s.channels}, options);
  if (s.chunks == 0) return {sum_g, sum_g_xc};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "channel_backward_reduce", [&] {
    dispatch_activation(a.act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      if (a.residual.defined()) {
        backward_reduce_kernel<scalar_t, A, true>(a.dy, a.x, a.residual, mean, scale, shift, s,
                                                  param, sum_g, sum_g_xc);
      } else {
        backward_reduce_kernel<scalar_t, A, false>(a.dy, a.x, a.residual, mean, scale, shift, s,
                                                   param, sum_g, sum_g_xc);
      }
    });
  });
  return {sum_g, sum_g_xc};
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
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, int64_t chunk, c10::string_view activation, double param) {
  return backward_reduce(dy, x, nullptr, mean, scale, shift, chunk, activation, param,
                         "channel_backward_reduce");
}

std::tuple<at::Tensor, at::Tensor> channel_backward_reduce_residual(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual,
    const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift, int64_t chunk,
    c10::string_view activation, double param) {
  return backward_reduce(dy, x, &residual, mean, scale, shift, chunk, activation, param,
                         "channel_backward_reduce_residual");
}

}  // namespace batchnorm_cpu
