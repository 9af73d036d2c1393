// Shared pieces of the CPU kernels: vector loads and stores in the accumulation type,
// the fused activations, and the two-sum accumulator that keeps statistics exact.
//
// Exactness and determinism rules every kernel follows:
// * sums run in the accumulation type's vector lanes over at most kFlushValues values, then
//   are added into double; statistics are shifted by a pivot (one value of the group) so a
//   large common offset never enters the sums;
// * work is split by shape only (never by the number of threads) and partial sums are
//   merged in a fixed order, so results are bitwise identical for any thread count;
// * NaN and inf are never masked: they reach the sums and from there the statistics.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace batchnorm_cpu {

using at::vec::Vectorized;

// Values summed in float lanes before they are added into double.
constexpr int64_t kFlushValues = 2048;
// Rows a column accumulator (channels-last view) sums before it is added into double.
constexpr int64_t kFlushRows = 128;
// Work per parallel task, in values, below which at::parallel_for runs inline.
constexpr int64_t kGrainValues = 32768;

enum class Activation { identity, relu, relu6, leaky_relu, elu, silu };

inline double at_least_zero(double value) {
  return value < 0 ? 0.0 : value;  // NaN stays NaN
}

// Loads and stores of T in vectors of its accumulation type (float for half types).
template <typename T>
struct Lanes {
  using acc_t = at::opmath_type<T>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t width = Vec::size();
  static constexpr bool reduced = !std::is_same_v<T, acc_t>;

  // Lanes [0, count) from p, the others zero.
  static inline Vec load(const T* p, int64_t count = width) {
    if constexpr (!reduced) {
      return Vec::loadu(p, count);
    } else {
      if (count == width) {
        Vec out;
        if constexpr (std::is_same_v<T, at::Half>) {
          at::vec::load_fp32_from_fp16(p, out);
        } else {
          at::vec::load_fp32_from_bf16(p, out);
        }
        return out;
      }
      __at_align__ acc_t buffer[width] = {};
      for (int64_t i = 0; i < count; ++i) {
        buffer[i] = static_cast<acc_t>(p[i]);
      }
      return Vec::loadu(buffer);
    }
  }

  // store(), bypassing the caches for a whole vector at a 32-byte aligned address of a
  // float or double output (a non-temporal store: no read of the line before it is written).
  static inline void stream(T* p, const Vec& v, int64_t count = width) {
#if defined(CPU_CAPABILITY_AVX2)
    if (count == width && (reinterpret_cast<std::uintptr_t>(p) & 31) == 0) {
      if constexpr (std::is_same_v<T, float>) {
        _mm256_stream_ps(p, v);
        return;
      } else if constexpr (std::is_same_v<T, double>) {
        _mm256_stream_pd(p, v);
        return;
      }
    }
#endif
    store(p, v, count);
  }

  // Writes lanes [0, count) to p.
  static inline void store(T* p, const Vec& v, int64_t count = width) {
    if constexpr (!reduced) {
      v.store(p, count);
    } else {
#if defined(CPU_CAPABILITY_AVX2)
      if (count == width) {
        __m256i packed = at::vec::convert<T>(v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
        return;
      }
#endif
      __at_align__ acc_t buffer[width];
      v.store(buffer);
      for (int64_t i = 0; i < count; ++i) {
        p[i] = static_cast<T>(buffer[i]);
      }
    }
  }
};

// act(z), the forward activation.
template <Activation A, typename Vec>
inline Vec activation_forward(const Vec& z, const Vec& param) {
  const Vec zero(0);
  if constexpr (A == Activation::relu) {
    return at::vec::maximum(z, zero);  // NaN stays NaN
  } else if constexpr (A == Activation::relu6) {
    return at::vec::minimum(at::vec::maximum(z, zero), Vec(6));
  } else if constexpr (A == Activation::leaky_relu) {
    return Vec::blendv(z * param, z, z > zero);
  } else if constexpr (A == Activation::elu) {
    return Vec::blendv(z.expm1() * param, z, z > zero);
  } else if constexpr (A == Activation::silu) {
    const Vec one(1);
    return z * (one / (one + z.neg().exp()));
  } else {
    return z;
  }
}

// dy * act'(z): the gradient through the activation, with the reference's choice of
// act'(z) where z is NaN (relu, relu6: 0; leaky_relu: 1) and at relu6's kinks (0, as torch's
// hardtanh_backward).
template <Activation A, typename Vec>
inline Vec activation_backward(const Vec& dy, const Vec& z, const Vec& param) {
  const Vec zero(0);
  const Vec one(1);
  if constexpr (A == Activation::relu) {
    return dy * ((z > zero) & one);
  } else if constexpr (A == Activation::relu6) {
    return dy * ((z > zero) & (z < Vec(6)) & one);
  } else if constexpr (A == Activation::leaky_relu) {
    return dy * Vec::blendv(one, param, z <= zero);
  } else if constexpr (A == Activation::elu) {
    return dy * Vec::blendv(z.exp() * param, one, z > zero);
  } else if constexpr (A == Activation::silu) {
    const Vec s = one / (one + z.neg().exp());
    return dy * (s * (one + z * (one - s)));
  } else {
    return dy;
  }
}

template <Activation A>
using ActivationTag = std::integral_constant<Activation, A>;

// Calls body(ActivationTag<A>{}), the activation as a compile-time constant.
template <typename Body>
inline void dispatch_activation(Activation activation, const Body& body) {
  switch (activation) {
    case Activation::identity:
      return body(ActivationTag<Activation::identity>{});
    case Activation::relu:
      return body(ActivationTag<Activation::relu>{});
    case Activation::relu6:
      return body(ActivationTag<Activation::relu6>{});
    case Activation::leaky_relu:
      return body(ActivationTag<Activation::leaky_relu>{});
    case Activation::elu:
      return body(ActivationTag<Activation::elu>{});
    case Activation::silu:
      return body(ActivationTag<Activation::silu>{});
  }
}

// step(i, count) for the consecutive vectors of a run of n values (the last may be partial).
// Loops that store capture by value (steps, row terms, the map ops): a vector store may
// alias any memory, so values read through references would be reloaded after every store.
template <int64_t width, typename Step>
inline void over_run(int64_t n, Step step) {
  int64_t i = 0;
  for (; i + width <= n; i += width) step(i, width);
  if (i < n) step(i, n - i);
}

// Two running sums over a sequence of values: vector lanes of acc_t (four independent
// accumulators each), added into double every kFlushValues values and at the end.
template <typename acc_t>
struct TwoSums {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t width = Vec::size();
  static constexpr int kUnroll = 4;

  Vec first[kUnroll] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  Vec second[kUnroll] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  double total_first = 0;
  double total_second = 0;
  int64_t pending = 0;

  // Adds terms(i, count) for consecutive vectors of [0, n): terms returns the pair of
  // contributions of values [i, i + count), with lanes past count zero.
  template <typename Terms>
  inline void add(int64_t n, const Terms& terms) {
    for (int64_t start = 0; start < n; start += kFlushValues) {
      const int64_t stop = std::min(n, start + kFlushValues);
      int64_t i = start;
      for (; i + kUnroll * width <= stop; i += kUnroll * width) {
        for (int u = 0; u < kUnroll; ++u) {
          auto [a, b] = terms(i + u * width, width);
          first[u] += a;
          second[u] += b;
        }
      }
      for (; i + width <= stop; i += width) {
        auto [a, b] = terms(i, width);
        first[0] += a;
        second[0] += b;
      }
      if (i < stop) {
        auto [a, b] = terms(i, stop - i);
        first[0] += a;
        second[0] += b;
      }
      pending += stop - start;
      if (pending >= kFlushValues) {
        flush();
      }
    }
  }

  inline void flush() {
    const Vec a = (first[0] + first[1]) + (first[2] + first[3]);
    const Vec b = (second[0] + second[1]) + (second[2] + second[3]);
    __at_align__ acc_t lanes_a[width];
    __at_align__ acc_t lanes_b[width];
    a.store(lanes_a);
    b.store(lanes_b);
    for (int64_t k = 0; k < width; ++k) {
      total_first += static_cast<double>(lanes_a[k]);
      total_second += static_cast<double>(lanes_b[k]);
    }
    for (int u = 0; u < kUnroll; ++u) {
      first[u] = Vec(0);
      second[u] = Vec(0);
    }
    pending = 0;
  }
};

// Adds a float column accumulator into its double partials and clears it.
template <typename acc_t>
inline void flush_columns(acc_t* acc, double* total, int64_t width) {
  for (int64_t j = 0; j < width; ++j) {
    total[j] += static_cast<double>(acc[j]);
    acc[j] = 0;
  }
}

// Mean and invstd = 1 / sqrt(var + eps) of n contiguous values, from sums shifted by the
// first value: a large common offset costs the variance no digits.
template <typename T>
inline std::pair<at::opmath_type<T>, at::opmath_type<T>> shifted_moments(const T* data,
                                                                         int64_t n, double eps) {
  using L = Lanes<T>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const acc_t pivot = static_cast<acc_t>(data[0]);
  const Vec pivot_vec(pivot);
  TwoSums<acc_t> sums;
  sums.add(n, [&](int64_t i, int64_t count) {
    Vec d = L::load(data + i, count) - pivot_vec;
    if (count != L::width) d = Vec::set(Vec(0), d, count);
    return std::pair<Vec, Vec>(d, d * d);
  });
  sums.flush();
  const double shifted = sums.total_first / n;
  const double var = at_least_zero(sums.total_second / n - shifted * shifted);
  return {static_cast<acc_t>(pivot + shifted),
          acc_t(1) / std::sqrt(static_cast<acc_t>(var) + static_cast<acc_t>(eps))};
}

// Row blocks (partial sums of their own) of a column reduction over `rows` rows: a function
// of the shape only. Fewer than kBlockRows rows per block would cost more to merge than
// they save.
constexpr int64_t kBlockRows = 64;
constexpr int64_t kMaxBlocks = 64;

// Values per row block of a long-segment reduction, when its (group, channel) items are few.
constexpr int64_t kSegmentBlockValues = 1 << 18;

// A long-segment reduction over at least kStreamValues values (16 MB of float32, past the
// caches) runs in memory order, over blocks of kStreamBlockRows rows.
constexpr int64_t kStreamValues = int64_t(1) << 22;
constexpr int64_t kStreamBlockRows = 4;

inline int64_t row_blocks(int64_t rows) {
  return std::clamp<int64_t>(rows / kBlockRows, 1, kMaxBlocks);
}

// at::parallel_for grain for items of `values` values each.
inline int64_t grain_for(int64_t values) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, values));
}

inline int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// A channels view x (P, C, Q) with statistics per (chunk of rows, channel).
struct ChannelShape {
  int64_t rows;      // P
  int64_t channels;  // C
  int64_t quantity;  // Q
  int64_t chunk;     // rows per statistics group
  int64_t chunks;    // A = ceil(P / chunk)

  int64_t begin(int64_t group) const { return group * chunk; }
  int64_t end(int64_t group) const { return std::min(rows, (group + 1) * chunk); }
  int64_t width() const { return channels * quantity; }  // values per row
  int64_t group_rows() const { return std::min(chunk, rows); }
  // Short segments are summed along C (channels-last, vectorized over C * Q columns),
  // long ones along Q (one contiguous segment per row and channel).
  bool columns() const { return quantity < kSegmentMinLength; }

  static constexpr int64_t kSegmentMinLength = 16;
};

// A (chunks, C) table spread over the columns of the rows of a channels view:
// (chunks, C * Q), each channel's value repeated over its Q columns. The table itself when
// Q == 1, else written into `storage`.
template <typename acc_t>
const acc_t* per_column(const acc_t* table, const ChannelShape& s, std::vector<acc_t>& storage) {
  const int64_t Q = s.quantity;
  if (Q == 1) return table;
  storage.resize(s.chunks * s.channels * Q);
  for (int64_t k = 0; k < s.chunks * s.channels; ++k) {
    std::fill(storage.begin() + k * Q, storage.begin() + (k + 1) * Q, table[k]);
  }
  return storage.data();
}

// The accumulation dtype of x's dtype: float32 for half types, else the same.
inline at::ScalarType accumulation_type(at::ScalarType dtype) {
  return at::toOpMathType(dtype);
}

inline Activation parse_activation(c10::string_view name, const char* op) {
  if (name == "identity") return Activation::identity;
  if (name == "relu") return Activation::relu;
  if (name == "relu6") return Activation::relu6;
  if (name == "leaky_relu") return Activation::leaky_relu;
  if (name == "elu") return Activation::elu;
  if (name == "silu") return Activation::silu;
  TORCH_CHECK(false, op,
              ": activation must be one of identity, relu, relu6, leaky_relu, elu, silu; got '",
              std::string(name.data(), name.size()), "'");
}

inline void check_float_input(const at::Tensor& x, const char* op, const char* name) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", x.device());
}

inline at::Tensor table_arg(const at::Tensor& table, int64_t chunks, int64_t channels,
                     at::ScalarType acc, const char* op, const char* name) {
  TORCH_CHECK(table.dim() == 2 && table.size(0) == chunks && table.size(1) == channels, op,
              ": ", name, " must have shape (", chunks, ", ", channels, "), got ", table.sizes());
  TORCH_CHECK(table.device().is_cpu(), op, ": ", name, " must be on the CPU, got ",
              table.device());
  if (table.scalar_type() == acc && table.is_contiguous()) return table;
  return table.to(acc).contiguous();
}

// A tensor read element by element beside x (dy, the shortcut): x's shape and dtype, contiguous.
inline at::Tensor like_x(const at::Tensor& t, const at::Tensor& x, const char* op,
                         const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), op, ": ", name,
              " must match x (", x.scalar_type(), " ", x.sizes(), "), got ", t.scalar_type(),
              " ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  return t.contiguous();
}

inline ChannelShape channel_shape(const at::Tensor& x, int64_t chunk, const char* op) {
  check_float_input(x, op, "x");
  TORCH_CHECK(x.dim() == 3, op, ": x must be a (P, C, Q) view, got shape ", x.sizes());
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1, got ", chunk);
  const int64_t rows = x.size(0);
  TORCH_CHECK(x.size(2) > 0 || rows == 0, op, ": x must have Q >= 1, got shape ", x.sizes());
  return ChannelShape{rows, x.size(1), x.size(2), chunk, (rows + chunk - 1) / chunk};
}

// What both backward passes read: the view's shape, the activation, the accumulation type,
// and x, dy and the optional shortcut, contiguous, of x's shape and dtype.
struct BackwardArgs {
  ChannelShape s;
  Activation act;
  at::ScalarType acc;
  at::Tensor x, dy, residual;
};

inline BackwardArgs backward_args(const at::Tensor& dy, const at::Tensor& x,
                                  const at::Tensor* residual, int64_t chunk,
                                  c10::string_view activation, const char* op) {
  const ChannelShape s = channel_shape(x, chunk, op);
  const Activation act = parse_activation(activation, op);
  const at::Tensor xc = x.contiguous();
  return {s, act, accumulation_type(x.scalar_type()), xc, like_x(dy, xc, op, "dy"),
          residual ? like_x(*residual, xc, op, "residual") : at::Tensor()};
}

}  // namespace batchnorm_cpu
