// instance_norm_act on the CPU: y = act((x - mean) * rstd) per (n, c) plane, and its backward.
//
// Statistics. Each plane's moments come from blocks of a few thousand values, each giving its mean
// (relative to the plane's first value) and M2, merged in float64 with Chan's formula, so neither
// uniform regions nor planes far from zero lose precision. A float32 block is one pass of float64 sums
// of x - origin and its square; other types take two passes over the block while it sits in L1 (see
// block_moments). x is read
// from memory once for the statistics and once to write y; nothing is accumulated in the input's 16-bit
// type, and no sum of squares of raw values is ever formed. The mean is the float64 sum of x - origin over the count
// (float64 input: a compensated sum of x), correctly rounded, so exact where the values hold it: pixels at the mean
// get xhat 0 and PyTorch's branch of the activation. It is returned in float64; y is computed as
// ((x - hi) - lo) * rstd with mean = hi + lo split into two floats, so the sign of every xhat (which
// decides the activation and its gradient) is the sign of x - mean, as in float64.
//
// Layouts. A plane's pixels are one strided axis (the Python side copies other views first).
// NCHW-like tensors are processed plane by plane; channels_last tensors row by row, all channels of
// a pixel at once, so neither layout is ever copied. Work is split into fixed chunks (not per
// thread), so results do not depend on the number of threads.
//
// Backward. dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * act'(xhat), with xhat
// recomputed from x exactly as the forward computed it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "simd_clones.h"

#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace fastp2phd {
namespace {

constexpr int64_t kBlock = 2048;       // values per two-pass block (8 KiB of float32: stays in L1)
constexpr int64_t kChunk = 1 << 15;    // values per unit of parallel work
constexpr int64_t kCachedPlaneBytes = 4 << 20;  // planes normalised straight after their statistics (cache)
enum Activation { kNone = 0, kRelu = 1, kLeakyRelu = 2 };  // fastp2phd.ops._common.ACTIVATIONS order

// Loads and stores between an element type and its compute type (float32, or float64 for float64),
// written with bit operations so the loops vectorise.
template <typename T>
struct Elem {
  using acc = float;
  static inline acc load(T v) { return static_cast<acc>(v); }
  static inline T store(acc v) { return static_cast<T>(v); }
};
template <>
struct Elem<double> {
  using acc = double;
  static inline double load(double v) { return v; }
  static inline double store(double v) { return v; }
};
template <>
struct Elem<c10::BFloat16> {
  using acc = float;
  static inline float load(c10::BFloat16 v) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static inline c10::BFloat16 store(float f) {  // round to nearest even; NaN stays NaN
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    const uint32_t rounded = f != f ? 0x7FC00000u : bits + 0x7FFFu + ((bits >> 16) & 1u);
    return c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
  }
  // store without the NaN select (25% faster on AVX2), for values that are numbers or the default NaN
  // (0x7FC00000 or 0xFFC00000, which the rounding keeps NaN); a NaN with a payload could round to inf or -0.
  static inline c10::BFloat16 store_number(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    return c10::BFloat16(static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16), c10::BFloat16::from_bits());
  }
};
template <>
struct Elem<c10::Half> {
  using acc = float;
  static inline float load(c10::Half v) { return c10::detail::fp16_ieee_to_fp32_value(v.x); }
  static inline c10::Half store(float f) {
    return c10::Half(c10::detail::fp16_ieee_from_fp32_value(f), c10::Half::from_bits());
  }
};

// The activation and its gradient, written as selects between values computed unconditionally, so the
// loops vectorise (a conditional division or product would be kept as a branch).
template <int ACT, typename acc>
inline acc activate(acc v, acc slope) {
  if (ACT == kRelu) return v < acc(0) ? acc(0) : v;  // NaN stays NaN, as in F.relu
  if (ACT == kLeakyRelu) {
    const acc scaled = v * slope;
    return v > acc(0) ? v : scaled;
  }
  return v;
}

// act'(xhat) * dy: the gate PyTorch's relu / leaky_relu backward applies (xhat > 0 passes dy).
template <int ACT, typename acc>
inline acc gate(acc dy, acc xhat, acc slope) {
  if (ACT == kRelu) return xhat > acc(0) ? dy : acc(0);
  if (ACT == kLeakyRelu) {
    const acc scaled = dy * slope;
    return xhat > acc(0) ? dy : scaled;
  }
  return dy;
}

// xhat, exactly as the forward computes it.
template <typename acc>
inline acc normalized(acc x, acc hi, acc lo, acc rstd) {
  return ((x - hi) - lo) * rstd;
}

// Running (count, mean, M2) in float64, merged with Chan's formula, and the plain float64 sum of the values
// relative to the origin: for every type but float64 those differences and their sums are exact or nearly, so
// sum / count is the mean correctly rounded where Chan's merges err by an ulp. That ulp decided the activation's
// branch in backward at pixels equal to the mean (label-like planes: 0.78 of dx off there).
struct Moments {
  double count = 0, mean = 0, m2 = 0, sum = 0;
  void merge(double n, double block_mean, double block_m2, double block_sum) {
    if (n == 0) return;
    const double total = count + n, delta = block_mean - mean;
    mean += delta * (n / total);
    m2 += block_m2 + delta * delta * (count * n / total);
    sum += block_sum;
    count = total;
  }
};

// ----------------------------------------------------------------------------------- the hot loops

// Sums of d = x[i * stride] - shift and of d * d over n values. Each of 8 lanes sums pieces of 256 values in S
// (so a float32 partial takes 32 roundings) and adds them up in float64; the lanes meet once, at the end.
template <typename S, typename T>
FASTP2PHD_SIMD_CLONES void shifted_sums(const T* x, int64_t stride, int64_t n, S shift, double& s1, double& s2) {
  constexpr int64_t kLanes = 8, kPiece = 256;
  double lane1[kLanes] = {}, lane2[kLanes] = {};
  auto piece = [&](const T* p, auto step) {
    S a[kLanes] = {}, b[kLanes] = {};
    for (int64_t i = 0; i < kPiece; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) {
        const S d = static_cast<S>(Elem<T>::load(p[(i + j) * step])) - shift;
        a[j] += d;
        b[j] += d * d;
      }
    for (int64_t j = 0; j < kLanes; ++j) {
      lane1[j] += static_cast<double>(a[j]);
      lane2[j] += static_cast<double>(b[j]);
    }
  };
  int64_t i = 0;
  if (stride == 1) {
    for (; i + kPiece <= n; i += kPiece) piece(x + i, std::integral_constant<int64_t, 1>());
  } else {
    for (; i + kPiece <= n; i += kPiece) piece(x + i * stride, stride);
  }
  S a = 0, b = 0;
  for (; i < n; ++i) {
    const S d = static_cast<S>(Elem<T>::load(x[i * stride])) - shift;
    a += d;
    b += d * d;
  }
  s1 = static_cast<double>(a);
  s2 = static_cast<double>(b);
  for (int64_t j = 0; j < kLanes; ++j) {
    s1 += lane1[j];
    s2 += lane2[j];
  }
}

// Mean (relative to origin, the plane's first value) and M2 of n <= kBlock values x[i * stride] (buf:
// kBlock scratch values), by the cheapest scheme that is exact enough for the type:
// - float32: one pass of float64 sums of d = x - origin and d * d (d is exact in float64, d * d nearly so).
//   M2 = S2 - S1 * mean errs by about n * 1e-16 * (M2_block + n (block mean - origin)^2), and as the origin
//   is one of the plane's values, (origin - plane mean)^2 <= the plane's M2, so the error stays below
//   n (2n + 3) * 1e-16 ~ 1e-9 of the plane's M2 (worst-case rounding; a random walk gives ~1e-11): far below
//   float32's 6e-8.
// - 16-bit: one pass of float32 sums about the block's first value (8 lanes where float64 has 4; 2.4x faster
//   than float64 on AVX2), kept when its cancellation is mild, S2 <= 4 M2: the sums then err by at most
//   ~1e-5 of S2 (the tail of under 256 values, summed in one lane), 4e-5 of M2, against y's rounding at
//   4e-3 (bfloat16) or 5e-4 (float16). A block whose first value lies far out (1 in 12 of normal data) takes the two passes.
// - float64, and those 16-bit blocks: two passes over the block in buf, while it sits in L1. The mean is
//   summed in float64 (relative to origin, a constant plane sums to exactly 0) and rounded to the compute type;
//   the second pass sums the residuals x - that rounded mean and their squares (exact near the mean), which
//   correct the mean and give M2 about it.
template <typename T>
FASTP2PHD_SIMD_CLONES void block_moments(const T* x, int64_t stride, int64_t n, double origin,
                                         typename Elem<T>::acc* buf, Moments& moments) {
  using acc = typename Elem<T>::acc;
  if constexpr (std::is_same_v<T, float>) {
    double s1, s2;
    shifted_sums<double>(x, stride, n, origin, s1, s2);
    const double mean = s1 / static_cast<double>(n);
    moments.merge(static_cast<double>(n), mean, std::max(0.0, s2 - s1 * mean), s1);
    return;
  }
  if constexpr (sizeof(T) == 2) {
    const float first = Elem<T>::load(x[0]);
    double s1, s2;
    shifted_sums<float>(x, stride, n, first, s1, s2);
    const double m2 = s2 - s1 * s1 / static_cast<double>(n);
    if (std::isfinite(s2) && s2 <= 4 * m2) {  // (NaN, inf and float32 sums past its range take the two passes)
      const double shift = static_cast<double>(first) - origin;
      const double count = static_cast<double>(n);
      moments.merge(count, shift + s1 / count, m2, count * shift + s1);
      return;
    }
  }
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) buf[i] = Elem<T>::load(x[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = Elem<T>::load(x[i * stride]);
  }
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(buf[i]) - origin;
  const acc rounded = static_cast<acc>(origin + sum / static_cast<double>(n));
  // Summed in pieces that meet the totals once each: an outlier's square would otherwise take every small
  // square after it with an error at its own size (1e4 among values near 1: M2 off by 2e-15 in float64).
  constexpr int64_t kPiece = 128;
  double m2 = 0, residual = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kPiece) {
    double piece_m2 = 0, piece_residual = 0;
#pragma omp simd reduction(+ : piece_m2, piece_residual)
    for (int64_t i = i0; i < std::min(n, i0 + kPiece); ++i) {
      const acc d = buf[i] - rounded;
      piece_m2 += static_cast<double>(d * d);
      piece_residual += static_cast<double>(d);
    }
    m2 += piece_m2;
    residual += piece_residual;
  }
  // The mean is rounded's distance from the origin plus the residuals' mean: a sum of x - origin errs at the
  // size of x - origin, which an outlying origin makes large (1e4 among values near 1: 3e-15 of y in float64).
  const double offset = residual / static_cast<double>(n);
  moments.merge(static_cast<double>(n), (static_cast<double>(rounded) - origin) + offset,
                m2 - static_cast<double>(n) * offset * offset, sum);
}

// Per-channel mean (relative to origin[c]) and M2 of R pixel rows of C channels, x[r * sp + c * sc]
// (channels_last), as above. Scratch: buf R * C values, col 2C values.
template <typename T>
FASTP2PHD_SIMD_CLONES void rows_moments(const T* x, int64_t sp, int64_t sc, int64_t R, int64_t C,
                                        const double* origin, typename Elem<T>::acc* buf, double* col,
                                        Moments* moments) {
  using acc = typename Elem<T>::acc;
  double* sums = col;
  double* m2 = col + C;
  for (int64_t c = 0; c < 2 * C; ++c) col[c] = 0;
  if constexpr (!std::is_same_v<T, double>) {  // one pass of float64 shifted sums, as in block_moments
    for (int64_t r = 0; r < R; ++r) {
      const T* row = x + r * sp;
      if (sc == 1) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double d = static_cast<double>(Elem<T>::load(row[c])) - origin[c];
          sums[c] += d;
          m2[c] += d * d;
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const double d = static_cast<double>(Elem<T>::load(row[c * sc])) - origin[c];
          sums[c] += d;
          m2[c] += d * d;
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const double mean = sums[c] / static_cast<double>(R);
      moments[c].merge(static_cast<double>(R), mean, std::max(0.0, m2[c] - sums[c] * mean), sums[c]);
    }
    return;
  }
  for (int64_t r = 0; r < R; ++r) {
    const T* row = x + r * sp;
    acc* b = buf + r * C;
    if (sc == 1) {
      for (int64_t c = 0; c < C; ++c) b[c] = Elem<T>::load(row[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) b[c] = Elem<T>::load(row[c * sc]);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) sums[c] += static_cast<double>(buf[r * C + c]) - origin[c];
  constexpr int64_t kPiece = 16;  // rows (see block_moments)
  for (int64_t c = 0; c < C; ++c) {
    const acc rounded_c = static_cast<acc>(origin[c] + sums[c] / static_cast<double>(R));
    double total = 0, residual = 0;
    for (int64_t r0 = 0; r0 < R; r0 += kPiece) {
      double piece = 0, piece_residual = 0;
      for (int64_t r = r0; r < std::min(R, r0 + kPiece); ++r) {
        const acc d = buf[r * C + c] - rounded_c;
        piece += static_cast<double>(d * d);
        piece_residual += static_cast<double>(d);
      }
      total += piece;
      residual += piece_residual;
    }
    const double offset = residual / static_cast<double>(R);
    moments[c].merge(static_cast<double>(R), (static_cast<double>(rounded_c) - origin[c]) + offset,
                     total - static_cast<double>(R) * offset * offset, sums[c]);
  }
}

// y[i] = act(((x[i * sx] - hi) - lo) * rstd) for n values of one plane; NUMBERS (bfloat16 only): y holds no
// NaN but the CPU's default one (see Elem<c10::BFloat16>::store_number).
template <typename T, int ACT, bool NUMBERS>
FASTP2PHD_SIMD_CLONES void normalize_run(const T* x, int64_t sx, T* y, int64_t n, typename Elem<T>::acc hi,
                                         typename Elem<T>::acc lo, typename Elem<T>::acc rstd,
                                         typename Elem<T>::acc slope) {
  using acc = typename Elem<T>::acc;
  auto value = [&](T v) {
    const acc out = activate<ACT, acc>(((Elem<T>::load(v) - hi) - lo) * rstd, slope);
    if constexpr (NUMBERS) return Elem<T>::store_number(out);
    else return Elem<T>::store(out);
  };
  if (sx == 1) {
    for (int64_t i = 0; i < n; ++i) y[i] = value(x[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = value(x[i * sx]);
  }
}

// The same for R pixel rows of C channels (channels_last): per-channel hi, lo, rstd.
template <typename T, int ACT>
FASTP2PHD_SIMD_CLONES void normalize_rows(const T* x, int64_t sp, int64_t sc, T* y, int64_t ysp, int64_t R, int64_t C,
                                          const typename Elem<T>::acc* hi, const typename Elem<T>::acc* lo,
                                          const typename Elem<T>::acc* rstd, typename Elem<T>::acc slope) {
  using acc = typename Elem<T>::acc;
  for (int64_t r = 0; r < R; ++r) {
    const T* in = x + r * sp;
    T* out = y + r * ysp;
    if (sc == 1) {
      for (int64_t c = 0; c < C; ++c)
        out[c] = Elem<T>::store(activate<ACT, acc>(((Elem<T>::load(in[c]) - hi[c]) - lo[c]) * rstd[c], slope));
    } else {
      for (int64_t c = 0; c < C; ++c)
        out[c] = Elem<T>::store(activate<ACT, acc>(((Elem<T>::load(in[c * sc]) - hi[c]) - lo[c]) * rstd[c], slope));
    }
  }
}

// Sums of g and g * xhat over n <= kBlock values of one plane, accumulated in float64.
template <typename T, int ACT>
FASTP2PHD_SIMD_CLONES void grad_block_sums(const T* s, int64_t ss, const T* dy, int64_t sdy, int64_t n,
                                           typename Elem<T>::acc hi, typename Elem<T>::acc lo,
                                           typename Elem<T>::acc rstd, typename Elem<T>::acc slope, double& sum_g,
                                           double& sum_gx) {
  using acc = typename Elem<T>::acc;
  // float64 terms are summed in pieces that meet the totals once each (see block_moments); the other types'
  // terms are far coarser than a float64 sum's rounding.
  const int64_t piece = std::is_same_v<T, double> ? 128 : n;
  for (int64_t i0 = 0; i0 < n; i0 += piece) {
    const int64_t i1 = std::min(n, i0 + piece);
    double g_total = 0, gx_total = 0;
    if (ss == 1 && sdy == 1) {
#pragma omp simd reduction(+ : g_total, gx_total)
      for (int64_t i = i0; i < i1; ++i) {
        const acc xhat = normalized<acc>(Elem<T>::load(s[i]), hi, lo, rstd);
        const acc g = gate<ACT, acc>(Elem<T>::load(dy[i]), xhat, slope);
        g_total += static_cast<double>(g);
        gx_total += static_cast<double>(g * xhat);
      }
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        const acc xhat = normalized<acc>(Elem<T>::load(s[i * ss]), hi, lo, rstd);
        const acc g = gate<ACT, acc>(Elem<T>::load(dy[i * sdy]), xhat, slope);
        g_total += static_cast<double>(g);
        gx_total += static_cast<double>(g * xhat);
      }
    }
    sum_g += g_total;
    sum_gx += gx_total;
  }
}

// Per-channel sums of g and g * xhat over R pixel rows (channels_last), accumulated in float64; float64 terms in
// pieces of rows (as in grad_block_sums) through piece, 2C scratch values.
template <typename T, int ACT>
FASTP2PHD_SIMD_CLONES void grad_rows_sums(const T* s, int64_t ssp, int64_t ssc, const T* dy, int64_t dsp,
                                          int64_t dsc, int64_t R, int64_t C, const typename Elem<T>::acc* hi,
                                          const typename Elem<T>::acc* lo, const typename Elem<T>::acc* rstd,
                                          typename Elem<T>::acc slope, double* sum_g, double* sum_gx, double* piece) {
  using acc = typename Elem<T>::acc;
  constexpr bool kPieces = std::is_same_v<T, double>;
  double* g_piece = kPieces ? piece : sum_g;
  double* gx_piece = kPieces ? piece + C : sum_gx;
  const int64_t rows = kPieces ? 16 : R;
  for (int64_t r0 = 0; r0 < R; r0 += rows) {
    if (kPieces) std::fill(piece, piece + 2 * C, 0.0);
    for (int64_t r = r0; r < std::min(R, r0 + rows); ++r) {
      const T* srow = s + r * ssp;
      const T* drow = dy + r * dsp;
      for (int64_t c = 0; c < C; ++c) {
        const acc xhat = normalized<acc>(Elem<T>::load(srow[c * ssc]), hi[c], lo[c], rstd[c]);
        const acc g = gate<ACT, acc>(Elem<T>::load(drow[c * dsc]), xhat, slope);
        g_piece[c] += static_cast<double>(g);
        gx_piece[c] += static_cast<double>(g * xhat);
      }
    }
    if (kPieces) {
      for (int64_t c = 0; c < C; ++c) {
        sum_g[c] += g_piece[c];
        sum_gx[c] += gx_piece[c];
      }
    }
  }
}

// dx = rstd * (g - mean_g - xhat * mean_gx) for n values of one plane.
template <typename T, int ACT>
FASTP2PHD_SIMD_CLONES void grad_run(const T* s, int64_t ss, const T* dy, int64_t sdy, T* dx, int64_t n,
                                    typename Elem<T>::acc hi, typename Elem<T>::acc lo, typename Elem<T>::acc rstd,
                                    typename Elem<T>::acc slope, typename Elem<T>::acc mean_g,
                                    typename Elem<T>::acc mean_gx) {
  using acc = typename Elem<T>::acc;
  auto value = [&](acc x, acc grad) {
    const acc xhat = normalized<acc>(x, hi, lo, rstd);
    return Elem<T>::store(rstd * ((gate<ACT, acc>(grad, xhat, slope) - mean_g) - xhat * mean_gx));
  };
  if (ss == 1 && sdy == 1) {
    for (int64_t i = 0; i < n; ++i) dx[i] = value(Elem<T>::load(s[i]), Elem<T>::load(dy[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) dx[i] = value(Elem<T>::load(s[i * ss]), Elem<T>::load(dy[i * sdy]));
  }
}

template <typename T, int ACT>
FASTP2PHD_SIMD_CLONES void grad_rows(const T* s, int64_t ssp, int64_t ssc, const T* dy, int64_t dsp, int64_t dsc,
                                     T* dx, int64_t xsp, int64_t R, int64_t C, const typename Elem<T>::acc* hi,
                                     const typename Elem<T>::acc* lo, const typename Elem<T>::acc* rstd,
                                     typename Elem<T>::acc slope, const typename Elem<T>::acc* mean_g,
                                     const typename Elem<T>::acc* mean_gx) {
  using acc = typename Elem<T>::acc;
  for (int64_t r = 0; r < R; ++r) {
    const T* srow = s + r * ssp;
    const T* drow = dy + r * dsp;
    T* out = dx + r * xsp;
    for (int64_t c = 0; c < C; ++c) {
      const acc xhat = normalized<acc>(Elem<T>::load(srow[c * ssc]), hi[c], lo[c], rstd[c]);
      const acc g = gate<ACT, acc>(Elem<T>::load(drow[c * dsc]), xhat, slope);
      out[c] = Elem<T>::store(rstd[c] * ((g - mean_g[c]) - xhat * mean_gx[c]));
    }
  }
}

// ----------------------------------------------------------------------------------- geometry

// An (N, C, H, W) tensor whose pixels are one strided axis: element (n, c, p) at n*sn + c*sc + p*sp.
struct Planes {
  int64_t N, C, P, sn, sc, sp;
};

Planes planes_of(const at::Tensor& t) {
  const int64_t H = t.size(2), W = t.size(3);
  const int64_t sp = W == 1 ? t.stride(2) : t.stride(3);
  TORCH_CHECK(W == 1 || H == 1 || t.stride(2) == W * t.stride(3),
              "instance_norm_act: internal error: the CPU kernel needs a tensor whose pixels are one strided axis");
  return {t.size(0), t.size(1), H * W, t.stride(0), t.stride(1), sp};
}

// Pixels one strided axis (every view the ops read in place), else a copy in the op's output layout.
at::Tensor as_planes(const at::Tensor& t) {
  const int64_t H = t.size(2), W = t.size(3);
  if (W == 1 || H == 1 || t.stride(2) == W * t.stride(3)) return t;
  return t.contiguous(t.suggest_memory_format());
}

// channels_last work (rows of all channels) when the output is channels_last; plane by plane otherwise.
bool rows_layout(const at::Tensor& out) {
  return out.size(1) > 1 && !out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor new_output(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(like.suggest_memory_format()));
}

int activation_code(c10::string_view activation) {
  if (activation == "none") return kNone;
  if (activation == "relu") return kRelu;
  TORCH_CHECK(activation == "leaky_relu", "instance_norm_act: activation must be none, relu or leaky_relu, got ",
              std::string(activation));
  return kLeakyRelu;
}

// Work units: (plane, chunk of pixels) plane by plane, or (n, chunk of rows) for channels_last.
struct Split {
  int64_t chunk, chunks;  // pixels per chunk, chunks per plane (or per batch item)
};

Split split_planes(int64_t P) {
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  return {(P + chunks - 1) / chunks, chunks};
}

Split split_rows(int64_t P, int64_t C) {
  const int64_t rows = std::max<int64_t>(1, kChunk / C);
  const int64_t chunks = (P + rows - 1) / rows;
  return {(P + chunks - 1) / chunks, chunks};
}

// Rows per two-pass block of the channels_last loops: at least 16, so the per-channel merges that end a
// block stay rare when channels are many (deep layers have 1024).
int64_t block_rows(int64_t C) { return std::max<int64_t>(16, kBlock / C); }

// Enough units per task that a task moves about a chunk.
int64_t grain(int64_t values_per_unit) { return std::max<int64_t>(1, kChunk / std::max<int64_t>(1, values_per_unit)); }

// hi + lo = mean (two floats; one double for float64).
template <typename acc>
inline void split_mean(double mean, acc& hi, acc& lo) {
  hi = static_cast<acc>(mean);
  lo = static_cast<acc>(mean - static_cast<double>(hi));
}

// ----------------------------------------------------------------------------------- forward

template <typename T>
void forward_kernel(const at::Tensor& x, at::Tensor& y, at::Tensor& mean_out, at::Tensor& rstd_out, int act,
                    double slope_d, double eps) {
  using acc = typename Elem<T>::acc;
  const Planes in = planes_of(x), out = planes_of(y);
  const int64_t N = in.N, C = in.C, P = in.P;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  double* mean_p = mean_out.mutable_data_ptr<double>();
  acc* rstd_p = rstd_out.mutable_data_ptr<acc>();
  const acc slope = static_cast<acc>(slope_d);
  const bool rows = rows_layout(y);
  const Split split = rows ? split_rows(P, C) : split_planes(P);
  const int64_t per_plane = rows ? 1 : split.chunks;  // moments per plane per chunk index

  // Moments are taken relative to an origin per plane: its first value, so a constant plane sums to exactly 0.
  // float64 holds its mean relative to the origin only to float64's precision of |origin - mean| (an outlying
  // first value, 1e4 among values near 1, costs 1e-12 of the mean), so there the origin is the mean of the
  // plane's first block instead, summed about its first value (still exact for a constant plane).
  std::vector<double> origin(N * C);
  const int64_t origin_grain = grain(std::is_same_v<T, double> ? std::min(P, kBlock) : 1);
  at::parallel_for(0, N * C, origin_grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const T* base = xp + (plane / C) * in.sn + (plane % C) * in.sc;
      const double first = static_cast<double>(Elem<T>::load(base[0]));
      origin[plane] = first;
      if constexpr (std::is_same_v<T, double>) {
        const int64_t m = std::min(P, kBlock);
        double sum = 0;
        for (int64_t p = 0; p < m; ++p) sum += base[p * in.sp] - first;
        origin[plane] = first + sum / static_cast<double>(m);
      }
    }
  });
  std::vector<acc> hi(N * C), lo(N * C), rstd(N * C);
  // A plane's mean (float64) and rstd from its chunks' moments, merged in a fixed order.
  auto finish_plane = [&](int64_t plane, auto chunk_moments) {
    Moments total;
    for (int64_t k = 0; k < split.chunks; ++k) {
      const Moments& m = chunk_moments(k);
      total.merge(m.count, m.mean, m.m2, m.sum);
    }
    double mean = origin[plane] + (std::is_same_v<T, double> ? total.mean : total.sum / static_cast<double>(P));
    if constexpr (std::is_same_v<T, double>) {
      // float64's differences from its origin (the first block's mean) are not exact, and Chan's merges err by an
      // ulp, which decided the activation's branch at pixels equal to the mean (label-like planes). A compensated
      // (Neumaier) sum of the values instead, sum + error within n^2 ulps^2 of their magnitudes, divided with the
      // division's remainder (exact by fma) taken into account: the mean rounded once, exact where the values hold
      // it (sum + error, then / P, rounded twice: 1 ulp off in 1 of 4 random planes).
      const T* base = xp + (plane / C) * in.sn + (plane % C) * in.sc;
      double sum = 0, error = 0;
      for (int64_t p = 0; p < P; ++p) {
        const double v = base[p * in.sp], next = sum + v;
        error += std::abs(sum) >= std::abs(v) ? (sum - next) + v : (v - next) + sum;
        sum = next;
      }
      const double count = static_cast<double>(P), quotient = sum / count;
      const double refined = quotient + (std::fma(-quotient, count, sum) + error) / count;
      if (std::isfinite(refined)) mean = refined;
    }
    mean_p[plane] = mean;
    // A one-value plane normalises to 0 whatever eps is. Where var + eps is 0 (a constant plane, eps = 0), rstd is
    // 0 as PyTorch's invstd is, so y and dx are 0 (1 / 0 would make them 0 * inf = NaN).
    const double var = P == 1 ? 0.0 : total.m2 / static_cast<double>(P);
    rstd_p[plane] = rstd[plane] = static_cast<acc>(var + eps == 0 ? 0.0 : 1.0 / std::sqrt(var + eps));
    split_mean(mean, hi[plane], lo[plane]);
  };
  auto plane_moments = [&](int64_t plane, int64_t k, acc* buf, Moments& m) {
    const int64_t p0 = k * split.chunk, p1 = std::min(P, p0 + split.chunk);
    const T* base = xp + (plane / C) * in.sn + (plane % C) * in.sc;
    for (int64_t p = p0; p < p1; p += kBlock)
      block_moments<T>(base + p * in.sp, in.sp, std::min(kBlock, p1 - p), origin[plane], buf, m);
  };
  auto normalize_plane_chunk = [&](auto act_tag, int64_t plane, int64_t k) {
    constexpr int ACT = decltype(act_tag)::value;
    const int64_t p0 = k * split.chunk, p1 = std::min(P, p0 + split.chunk);
    const int64_t n = plane / C, c = plane % C;
    const T* from = xp + n * in.sn + c * in.sc + p0 * in.sp;
    T* to = yp + n * out.sn + c * out.sc + p0;
    // A finite mean means x holds no NaN: any NaN of y is then the CPU's default NaN, which the plain
    // rounding keeps NaN, so y needs no NaN select.
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (std::isfinite(mean_p[plane]))
        return normalize_run<T, ACT, true>(from, in.sp, to, p1 - p0, hi[plane], lo[plane], rstd[plane], slope);
    }
    normalize_run<T, ACT, false>(from, in.sp, to, p1 - p0, hi[plane], lo[plane], rstd[plane], slope);
  };
  auto with_act = [&](auto body) {
    if (act == kRelu) body(std::integral_constant<int, kRelu>());
    else if (act == kLeakyRelu) body(std::integral_constant<int, kLeakyRelu>());
    else body(std::integral_constant<int, kNone>());
  };

  // Enough planes to keep every thread busy: each plane is normalised right after its statistics, while
  // it is still in the core's cache, so x's second read comes from cache rather than memory. The chunks
  // and the merge order are those of the two passes below, so the bits are the same.
  if (!rows && N * C >= 2 * at::get_num_threads() && P * static_cast<int64_t>(sizeof(T)) <= kCachedPlaneBytes) {
    with_act([&](auto act_tag) {
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc> buf(kBlock);
        std::vector<Moments> parts(split.chunks);
        for (int64_t plane = begin; plane < end; ++plane) {
          for (int64_t k = 0; k < split.chunks; ++k) {
            parts[k] = Moments();
            plane_moments(plane, k, buf.data(), parts[k]);
          }
          finish_plane(plane, [&](int64_t k) -> const Moments& { return parts[k]; });
          for (int64_t k = 0; k < split.chunks; ++k) normalize_plane_chunk(act_tag, plane, k);
        }
      });
    });
    return;
  }

  // Pass 1: moments of every (plane, chunk), relative to the plane's first value.
  std::vector<Moments> partial(N * C * split.chunks);
  if (rows) {
    at::parallel_for(0, N * split.chunks, grain(split.chunk * C), [&](int64_t begin, int64_t end) {
      const int64_t R = block_rows(C);
      std::vector<acc> buf(R * C);
      std::vector<double> col(2 * C);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t n = unit / split.chunks, k = unit % split.chunks;
        const int64_t p0 = k * split.chunk, p1 = std::min(P, p0 + split.chunk);
        Moments* m = &partial[(n * split.chunks + k) * C];
        for (int64_t p = p0; p < p1; p += R)
          rows_moments<T>(xp + n * in.sn + p * in.sp, in.sp, in.sc, std::min(R, p1 - p), C, &origin[n * C],
                          buf.data(), col.data(), m);
      }
    });
  } else {
    at::parallel_for(0, N * C * split.chunks, grain(split.chunk), [&](int64_t begin, int64_t end) {
      std::vector<acc> buf(kBlock);
      for (int64_t unit = begin; unit < end; ++unit)
        plane_moments(unit / split.chunks, unit % split.chunks, buf.data(), partial[unit]);
    });
  }
  at::parallel_for(0, N * C, grain(std::is_same_v<T, double> ? P : 1), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane)
      finish_plane(plane, [&](int64_t k) -> const Moments& {
        return rows ? partial[((plane / C) * split.chunks + k) * C + plane % C] : partial[plane * per_plane + k];
      });
  });

  // Pass 2: y.
  with_act([&](auto act_tag) {
    constexpr int ACT = decltype(act_tag)::value;
    if (rows) {
      at::parallel_for(0, N * split.chunks, grain(split.chunk * C), [&](int64_t begin, int64_t end) {
        for (int64_t unit = begin; unit < end; ++unit) {
          const int64_t n = unit / split.chunks, k = unit % split.chunks;
          const int64_t p0 = k * split.chunk, p1 = std::min(P, p0 + split.chunk);
          normalize_rows<T, ACT>(xp + n * in.sn + p0 * in.sp, in.sp, in.sc, yp + n * out.sn + p0 * out.sp, out.sp,
                                 p1 - p0, C, &hi[n * C], &lo[n * C], &rstd[n * C], slope);
        }
      });
    } else {
      at::parallel_for(0, N * C * split.chunks, grain(split.chunk), [&](int64_t begin, int64_t end) {
        for (int64_t unit = begin; unit < end; ++unit)
          normalize_plane_chunk(act_tag, unit / split.chunks, unit % split.chunks);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_act_cpu(const at::Tensor& x_in,
                                                                     c10::string_view activation,
                                                                     double negative_slope, double eps) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.is_floating_point(),
              "instance_norm_act: x must be a floating-point (N, C, H, W) tensor, got ", x_in.sizes(), " ",
              x_in.scalar_type());
  TORCH_CHECK(x_in.device().is_cpu(), "instance_norm_act: the CPU kernel got a ", x_in.device(), " tensor");
  const int act = activation_code(activation);
  const at::Tensor x = as_planes(x_in);
  at::Tensor y = new_output(x_in);
  const auto rstd_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({x.size(0) * x.size(1)}, x.options().dtype(at::kDouble));
  at::Tensor rstd = at::empty({x.size(0) * x.size(1)}, x.options().dtype(rstd_type));
  if (x.numel() == 0) return {y, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "instance_norm_act_cpu", [&] {
    forward_kernel<scalar_t>(x, y, mean, rstd, act, negative_slope, eps);
  });
  return {y, mean, rstd};
}

// ----------------------------------------------------------------------------------- backward

template <typename T, int ACT>
void backward_kernel(const at::Tensor& dy_t, const at::Tensor& x_t, at::Tensor& dx_t, const at::Tensor& mean_t,
                     const at::Tensor& rstd_t, double slope_d) {
  using acc = typename Elem<T>::acc;
  const Planes sv = planes_of(x_t), dv = planes_of(dy_t), xv = planes_of(dx_t);
  const int64_t N = sv.N, C = sv.C, P = sv.P;
  const T* s = x_t.const_data_ptr<T>();
  const T* dy = dy_t.const_data_ptr<T>();
  T* dx = dx_t.mutable_data_ptr<T>();
  const acc slope = static_cast<acc>(slope_d);
  std::vector<acc> hi(N * C), lo(N * C), rstd(N * C), mean_g(N * C), mean_gx(N * C);
  {
    const at::Tensor mean_c = mean_t.contiguous(), rstd_c = rstd_t.contiguous();
    const double* mp = mean_c.const_data_ptr<double>();
    const acc* rp = rstd_c.const_data_ptr<acc>();
    for (int64_t plane = 0; plane < N * C; ++plane) {
      split_mean(mp[plane], hi[plane], lo[plane]);
      rstd[plane] = rp[plane];
    }
  }
  const bool rows = rows_layout(dx_t);
  const Split split = rows ? split_rows(P, C) : split_planes(P);
  std::vector<double> sum_g(N * C * split.chunks, 0.0), sum_gx(N * C * split.chunks, 0.0);

  // Pass 1: sums of g and g * xhat per (plane, chunk), float32 within a block, float64 across.
  if (rows) {
    at::parallel_for(0, N * split.chunks, grain(split.chunk * C), [&](int64_t begin, int64_t end) {
      std::vector<double> piece(std::is_same_v<T, double> ? 2 * C : 0);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t n = unit / split.chunks, k = unit % split.chunks;
        const int64_t p0 = k * split.chunk, p1 = std::min(P, p0 + split.chunk);
        grad_rows_sums<T, ACT>(s + n * sv.sn + p0 * sv.sp, sv.sp, sv.sc, dy + n * dv.sn + p0 * dv.sp,
                                                dv.sp, dv.sc, p1 - p0, C, &hi[n * C], &lo[n * C], &rstd[n * C], slope,
                                                &sum_g[unit * C], &sum_gx[unit * C], piece.data());
      }
    });
  } else {
    at::parallel_for(0, N * C * split.chunks, grain(split.chunk), [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t plane = unit / split.chunks, k = unit % split.chunks;
        const int64_t n = plane / C, c = plane % C;
        const int64_t p0 = k * split.chunk, p1 = std::min(P, p0 + split.chunk);
        for (int64_t p = p0; p < p1; p += kBlock)
          grad_block_sums<T, ACT>(s + n * sv.sn + c * sv.sc + p * sv.sp, sv.sp,
                                                   dy + n * dv.sn + c * dv.sc + p * dv.sp, dv.sp,
                                                   std::min(kBlock, p1 - p), hi[plane], lo[plane], rstd[plane],
                                                   slope, sum_g[unit], sum_gx[unit]);
      }
    });
  }
  for (int64_t plane = 0; plane < N * C; ++plane) {
    double g = 0, gx = 0;
    for (int64_t k = 0; k < split.chunks; ++k) {
      const int64_t at = rows ? ((plane / C) * split.chunks + k) * C + plane % C : plane * split.chunks + k;
      g += sum_g[at];
      gx += sum_gx[at];
    }
    mean_g[plane] = static_cast<acc>(g / static_cast<double>(P));
    mean_gx[plane] = static_cast<acc>(gx / static_cast<double>(P));
  }

  // Pass 2: dx.
  if (rows) {
    at::parallel_for(0, N * split.chunks, grain(split.chunk * C), [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t n = unit / split.chunks, k = unit % split.chunks;
        const int64_t p0 = k * split.chunk, p1 = std::min(P, p0 + split.chunk);
        grad_rows<T, ACT>(s + n * sv.sn + p0 * sv.sp, sv.sp, sv.sc, dy + n * dv.sn + p0 * dv.sp,
                                           dv.sp, dv.sc, dx + n * xv.sn + p0 * xv.sp, xv.sp, p1 - p0, C, &hi[n * C],
                                           &lo[n * C], &rstd[n * C], slope, &mean_g[n * C], &mean_gx[n * C]);
      }
    });
  } else {
    at::parallel_for(0, N * C * split.chunks, grain(split.chunk), [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t plane = unit / split.chunks, k = unit % split.chunks;
        const int64_t n = plane / C, c = plane % C;
        const int64_t p0 = k * split.chunk, p1 = std::min(P, p0 + split.chunk);
        grad_run<T, ACT>(s + n * sv.sn + c * sv.sc + p0 * sv.sp, sv.sp,
                                          dy + n * dv.sn + c * dv.sc + p0 * dv.sp, dv.sp,
                                          dx + n * xv.sn + c * xv.sc + p0, p1 - p0, hi[plane], lo[plane],
                                          rstd[plane], slope, mean_g[plane], mean_gx[plane]);
      }
    });
  }
}

at::Tensor instance_norm_act_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                          const at::Tensor& mean, const at::Tensor& rstd,
                                          c10::string_view activation, double negative_slope) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.is_floating_point() && grad_in.sizes() == x_in.sizes() &&
                  grad_in.scalar_type() == x_in.scalar_type(),
              "instance_norm_act_backward: grad ", grad_in.sizes(), " and x ", x_in.sizes(),
              " must be one floating-point (N, C, H, W) shape and dtype");
  const int64_t planes = x_in.size(0) * x_in.size(1);
  const auto rstd_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == planes && mean.scalar_type() == at::kDouble,
              "instance_norm_act_backward: mean must be (", planes, ",) float64, got ", mean.sizes(), " ",
              mean.scalar_type());
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == planes && rstd.scalar_type() == rstd_type,
              "instance_norm_act_backward: rstd must be (", planes, ",) ", rstd_type, ", got ", rstd.sizes(), " ",
              rstd.scalar_type());
  const int act = activation_code(activation);
  const at::Tensor x = as_planes(x_in), grad = as_planes(grad_in);
  at::Tensor dx = new_output(x_in);
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "instance_norm_act_backward_cpu", [&] {
    if (act == kRelu) backward_kernel<scalar_t, kRelu>(grad, x, dx, mean, rstd, negative_slope);
    else if (act == kLeakyRelu) backward_kernel<scalar_t, kLeakyRelu>(grad, x, dx, mean, rstd, negative_slope);
    else backward_kernel<scalar_t, kNone>(grad, x, dx, mean, rstd, negative_slope);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastp2phd, CPU, m) {
  m.impl("instance_norm_act", &instance_norm_act_cpu);
  m.impl("instance_norm_act_backward", &instance_norm_act_backward_cpu);
}

}  // namespace fastp2phd
