// sparse_input_conv2d on the CPU: a stride-1, unpadded convolution of an input with few nonzero channels
// per pixel, such as the generator's input (a one-hot label map and a boundary map, average-pooled for
// the global generator of a 1024p model).
//
// A dense convolution multiplies every weight by every input value, zeros included: at the 1024p
// generator's first layer (36 -> 32 channels, 7x7, 1024x2048) that is 237 GFLOP, about 1 s on two cores.
// Here each pixel's nonzero channels are found once (a bit mask per pixel), and each output pixel adds,
// for every kernel tap, the weight rows of that tap's nonzero channels only: about 36x less work on a
// one-hot map. Where the input turns out dense (more than 1/kDensestSparse of its values nonzero) or the
// weights are not finite (0 * inf must give NaN, as in the dense convolution), it runs at::conv2d.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "simd_clones.h"

#include <atomic>
#include <cstdint>
#include <vector>

namespace fastp2phd {
namespace {

constexpr int64_t kDensestSparse = 4;  // at most 1 value in 4 nonzero (one-hot maps: 1 in 36)
constexpr int64_t kOutBlock = 64;      // output channels accumulated together (in L1)
constexpr int64_t kInline = 2;         // nonzero values per pixel kept beside its mask (the rest: read from x)

// One row of W pixels: bit c of mask[w * words + c / 64] says whether channel c of pixel w is nonzero (NaN
// counts as nonzero), and value[w * kInline + k] holds its k-th nonzero value, so that the kh input rows an
// output row reads take 24 bytes a pixel (in cache) instead of C values. Returns the row's nonzero count.
template <typename T>
FASTP2PHD_SIMD_CLONES int64_t mask_row(const T* __restrict px, int64_t W, int64_t C, int64_t sC, int64_t sW,
                                       int64_t words, uint64_t* __restrict mask, T* __restrict value) {
  int64_t count = 0;
  for (int64_t w = 0; w < W; ++w, px += sW, mask += words, value += kInline) {
    int64_t k = 0;
    for (int64_t word = 0; word < words; ++word) {
      const T* channels = px + word * 64 * sC;
      const int64_t n = std::min<int64_t>(64, C - word * 64);
      uint64_t bits = 0;
#pragma omp simd reduction(| : bits)
      for (int64_t c = 0; c < n; ++c) bits |= static_cast<uint64_t>(channels[c * sC] != T(0)) << c;
      mask[word] = bits;
      count += __builtin_popcountll(bits);
      for (; bits && k < kInline; bits &= bits - 1) value[k++] = channels[__builtin_ctzll(bits) * sC];
    }
  }
  return count;
}

// Masks and values of every pixel (see mask_row); returns the number of nonzero values.
template <typename T>
int64_t nonzero_masks(const at::Tensor& x, std::vector<uint64_t>& masks, T* values, int64_t words) {
  const int64_t H = x.size(2), W = x.size(3);
  const T* data = x.const_data_ptr<T>();
  std::atomic<int64_t> nonzero{0};
  at::parallel_for(0, x.size(0) * H, 1, [&](int64_t begin, int64_t end) {
    int64_t count = 0;
    for (int64_t row = begin; row < end; ++row) {
      count += mask_row(data + row / H * x.stride(0) + row % H * x.stride(2), W, x.size(1), x.stride(1), x.stride(3),
                        words, masks.data() + row * W * words, values + row * W * kInline);
    }
    nonzero += count;
  });
  return nonzero.load();
}

struct Geometry {
  int64_t H, W, sN, sC, sH, sW;  // the input
  int64_t Ho, Wo, O;              // the output (channels_last)
  int64_t KH, KW, C, words;
};

// acc[0:block] += the weight rows of one input pixel's nonzero channels, each times its value.
template <typename T, int64_t kOut>
inline void add_pixel(double* __restrict acc, const uint64_t* mask, const T* value, const T* px, const T* tap,
                      const Geometry& g, int64_t block) {
  int64_t k = 0;
  for (int64_t word = 0; word < g.words; ++word) {
    for (uint64_t bits = mask[word]; bits; bits &= bits - 1, ++k) {
      const int64_t c = word * 64 + __builtin_ctzll(bits);
      const double v = k < kInline ? value[k] : px[c * g.sC];
      const T* w = tap + c * g.O;
#pragma omp simd
      for (int64_t o = 0; o < (kOut ? kOut : block); ++o) acc[o] += v * static_cast<double>(w[o]);
    }
  }
}

// Output rows [begin, end) (row = n * Ho + ho), each pixel's outputs in blocks of kOut (0: of up to kOutBlock,
// a number known at run time; a fixed kOut keeps the sums in registers). Sums are float64: each output adds
// its terms in sequence, so this keeps it at least as accurate as the dense convolution's blocked sums.
// Columns are taken kTile at a time, so the input rows under a tile stay in cache from one row to the next.
// taps: weights as (kh, kw, C, O). Compiled whole for each instruction set, so the inner loops inline.
template <typename T, int64_t kOut>
FASTP2PHD_SIMD_CLONES void sparse_rows(const T* __restrict data, const uint64_t* __restrict masks,
                                       const T* __restrict values, const T* __restrict taps,
                                       const T* __restrict bias, T* __restrict out, const Geometry g,
                                       int64_t begin, int64_t end) {
  constexpr int64_t kTile = 256;
  double acc[kOut ? kOut : kOutBlock];
  for (int64_t wo0 = 0; wo0 < g.Wo; wo0 += kTile) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.Ho, ho = row % g.Ho;
      for (int64_t wo = wo0; wo < std::min(g.Wo, wo0 + kTile); ++wo) {
        T* y = out + (row * g.Wo + wo) * g.O;
        for (int64_t o0 = 0; o0 < g.O; o0 += kOut ? kOut : kOutBlock) {
          const int64_t block = kOut ? kOut : std::min(kOutBlock, g.O - o0);
          for (int64_t o = 0; o < block; ++o) acc[o] = bias ? bias[o0 + o] : T(0);
          for (int64_t i = 0; i < g.KH; ++i) {
            const int64_t pixel = (n * g.H + ho + i) * g.W + wo;
            const uint64_t* mask = masks + pixel * g.words;
            const T* value = values + pixel * kInline;
            const T* px = data + n * g.sN + (ho + i) * g.sH + wo * g.sW;
            const T* tap = taps + i * g.KW * g.C * g.O + o0;
            const int64_t step = g.C * g.O;
            for (int64_t j = 0; j < g.KW; ++j, mask += g.words, value += kInline, px += g.sW, tap += step) {
              add_pixel<T, kOut>(acc, mask, value, px, tap, g, block);
            }
          }
          for (int64_t o = 0; o < block; ++o) y[o0 + o] = static_cast<T>(acc[o]);
        }
      }
    }
  }
}

template <typename T>
void sparse_conv(const T* data, const uint64_t* masks, const T* values, const T* taps, const T* bias, T* out,
                 const Geometry& g, int64_t rows) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    switch (g.O % 64 == 0 ? 64 : g.O == 32 ? 32 : g.O == 16 ? 16 : 0) {  // the generators' widths
      case 64: return sparse_rows<T, 64>(data, masks, values, taps, bias, out, g, begin, end);
      case 32: return sparse_rows<T, 32>(data, masks, values, taps, bias, out, g, begin, end);
      case 16: return sparse_rows<T, 16>(data, masks, values, taps, bias, out, g, begin, end);
      default: return sparse_rows<T, 0>(data, masks, values, taps, bias, out, g, begin, end);
    }
  });
}

at::Tensor sparse_input_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && x.size(1) == weight.size(1), "sparse_input_conv2d: x (N, C, H, W) ",
              x.sizes(), " and weight (O, C, kh, kw) ", weight.sizes(), " do not match");
  TORCH_CHECK(x.size(2) >= weight.size(2) && x.size(3) >= weight.size(3), "sparse_input_conv2d: x ", x.sizes(),
              " is smaller than the kernel ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && (!bias || bias->scalar_type() == x.scalar_type()),
              "sparse_input_conv2d: x, weight and bias must have one dtype, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)), "sparse_input_conv2d: bias must have ",
              weight.size(0), " values");
  const bool float_type = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  const int64_t words = (x.size(1) + 63) / 64;
  const int64_t pixels = x.size(0) * x.size(2) * x.size(3);
  std::vector<uint64_t> masks;
  at::Tensor values;  // (pixels, kInline) in x's dtype
  int64_t nonzero = x.numel();
  if (float_type && x.numel() > 0 && weight.isfinite().all().item<bool>()) {
    masks.resize(pixels * words);
    values = at::empty({pixels * kInline}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_input_conv2d_masks", [&] {
      nonzero = nonzero_masks<scalar_t>(x, masks, values.mutable_data_ptr<scalar_t>(), words);
    });
  }
  // Empty inputs and outputs too: the convolution gives their empty result, or refuses them as F.conv2d does.
  if (nonzero * kDensestSparse > x.numel() || x.numel() == 0 || weight.numel() == 0) {
    // In x's dtype, as the sparse path computes, also under autocast (the Python wrapper casts after).
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
    return at::conv2d(x, weight, bias);
  }
  const auto taps = weight.permute({2, 3, 1, 0}).contiguous();
  const auto bias_values = bias ? bias->contiguous() : at::Tensor();
  auto out = at::empty({x.size(0), weight.size(0), x.size(2) - weight.size(2) + 1, x.size(3) - weight.size(3) + 1},
                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const Geometry g{x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                   out.size(2), out.size(3), out.size(1), weight.size(2), weight.size(3), weight.size(1), words};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_input_conv2d", [&] {
    sparse_conv<scalar_t>(x.const_data_ptr<scalar_t>(), masks.data(), values.const_data_ptr<scalar_t>(),
                          taps.const_data_ptr<scalar_t>(),
                          bias ? bias_values.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
                          g, out.size(0) * g.Ho);
  });
  // The layout oneDNN's convolution gives: channels_last when the input or the weight is, else contiguous.
  const bool channels_last = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                             weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return channels_last ? out : out.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastp2phd, CPU, m) {
  m.impl("sparse_input_conv2d", &sparse_input_conv2d_cpu);
}

}  // namespace fastp2phd
