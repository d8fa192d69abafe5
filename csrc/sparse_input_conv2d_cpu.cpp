// sparse_input_conv2d on the CPU: a stride-1, unpadded convolution of an input with few nonzero channels
// per pixel, such as the generator's input (a one-hot label map and a boundary map, average-pooled for
// the global generator of a 1024p model).
//
// A dense convolution multiplies every weight by every input value, zeros included: at the 1024p
// generator's first layer (36 -> 32 channels, 7x7, 1024x2048) that is 237 GFLOP, about 1 s on two cores.
// Here each pixel's nonzero channels are found once (a bit mask per pixel), and each output pixel adds,
// for every kernel tap, the weight rows of that tap's nonzero channels only: about 36x less work on a
// one-hot map. A window whose pixels are all equal and finite (the inside of a region: 88% of the 7x7
// windows of a Cityscapes-like map) is one term per nonzero, from the weights summed over the taps. Where the input
// turns out dense (more than 1/kDensestSparse of its values nonzero) or the weights are not finite
// (0 * inf must give NaN, as in the dense convolution), it runs at::conv2d.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "simd_clones.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastp2phd {
namespace {

constexpr int64_t kDensestSparse = 4;  // at most 1 value in 4 nonzero (one-hot maps: 1 in 36)
constexpr int64_t kOutBlock = 64;      // output channels accumulated together (in L1)
constexpr int64_t kInline = 2;         // nonzero values per pixel kept beside its mask (the rest: read from x)

// Whether pixels a and b hold the same finite values, all of them inline (at most kInline nonzero). Non-finite
// values never match: a window of inf summed from the tap sums gives inf * (2 - 1) = inf where the convolution
// gives inf * 2 + inf * -1 = NaN.
template <typename T>
inline bool same_inline_pixel(const uint64_t* masks, const T* values, int64_t words, int64_t a, int64_t b) {
  int64_t count = 0;
  for (int64_t word = 0; word < words; ++word) {
    if (masks[a * words + word] != masks[b * words + word]) return false;
    count += __builtin_popcountll(masks[a * words + word]);
  }
  if (count > kInline) return false;
  for (int64_t k = 0; k < count; ++k)
    if (!(values[a * kInline + k] == values[b * kInline + k]) || !std::isfinite(values[a * kInline + k])) return false;
  return true;
}

// One row of W pixels: bit c of mask[w * words + c / 64] says whether channel c of pixel w is nonzero (NaN
// counts as nonzero), and value[w * kInline + k] holds its k-th nonzero value, so that the kh input rows an
// output row reads take 24 bytes a pixel (in cache) instead of C values. same[w] counts the pixels from w on
// that equal pixel w (see same_inline_pixel; 0 when w's values are not all inline), up to 255. Returns the
// row's nonzero count.
template <typename T>
FASTP2PHD_SIMD_CLONES int64_t mask_row(const T* __restrict px, int64_t W, int64_t C, int64_t sC, int64_t sW,
                                       int64_t words, uint64_t* __restrict mask, T* __restrict value,
                                       uint8_t* __restrict same) {
  int64_t count = 0;
  if (sW == 1 && sC != 1) {
    // NCHW rows: one contiguous pass per channel plane sets that channel's bit in every pixel's mask (per
    // pixel, the C planes were C streams at once: this pass took as long as the sums).
    std::fill(mask, mask + W * words, uint64_t(0));
    for (int64_t c = 0; c < C; ++c) {
      const T* plane = px + c * sC;
      uint64_t* word = mask + c / 64;
      const int shift = static_cast<int>(c % 64);
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) word[w * words] |= static_cast<uint64_t>(plane[w] != T(0)) << shift;
    }
    for (int64_t w = 0; w < W; ++w) {
      int64_t k = 0;
      for (int64_t word = 0; word < words; ++word) {
        uint64_t bits = mask[w * words + word];
        count += __builtin_popcountll(bits);
        for (; bits && k < kInline; bits &= bits - 1)
          value[w * kInline + k++] = px[w + (word * 64 + __builtin_ctzll(bits)) * sC];
      }
    }
  } else {  // each pixel's channels together (channels_last): one pass per pixel
    for (int64_t w = 0; w < W; ++w) {
      int64_t k = 0;
      for (int64_t word = 0; word < words; ++word) {
        const T* channels = px + w * sW + word * 64 * sC;
        const int64_t n = std::min<int64_t>(64, C - word * 64);
        uint64_t bits = 0;
#pragma omp simd reduction(| : bits)
        for (int64_t c = 0; c < n; ++c) bits |= static_cast<uint64_t>(channels[c * sC] != T(0)) << c;
        mask[w * words + word] = bits;
        count += __builtin_popcountll(bits);
        for (; bits && k < kInline; bits &= bits - 1) value[w * kInline + k++] = channels[__builtin_ctzll(bits) * sC];
      }
    }
  }
  for (int64_t w = W - 1; w >= 0; --w) {
    if (!same_inline_pixel(mask, value, words, w, w)) {
      same[w] = 0;
    } else {
      const bool next = w + 1 < W && same_inline_pixel(mask, value, words, w, w + 1);
      same[w] = next ? static_cast<uint8_t>(std::min(same[w + 1] + 1, 255)) : 1;
    }
  }
  return count;
}

// Masks and values of every pixel (see mask_row); returns the number of nonzero values.
template <typename T>
int64_t nonzero_masks(const at::Tensor& x, std::vector<uint64_t>& masks, T* values, std::vector<uint8_t>& same,
                      int64_t words) {
  const int64_t H = x.size(2), W = x.size(3);
  const T* data = x.const_data_ptr<T>();
  std::atomic<int64_t> nonzero{0};
  at::parallel_for(0, x.size(0) * H, 1, [&](int64_t begin, int64_t end) {
    int64_t count = 0;
    for (int64_t row = begin; row < end; ++row) {
      count += mask_row(data + row / H * x.stride(0) + row % H * x.stride(2), W, x.size(1), x.stride(1), x.stride(3),
                        words, masks.data() + row * W * words, values + row * W * kInline, same.data() + row * W);
    }
    nonzero += count;
  });
  return nonzero.load();
}

struct Geometry {
  int64_t H, W, sN, sC, sH, sW;  // the input
  int64_t Ho, Wo, O;              // the output
  int64_t oN, oO, oH, oW;         // its strides (NCHW or channels_last: written in place, no layout copy)
  int64_t KH, KW, C, words;
};

// What the output rows read: x, its masks, inline values and runs of equal pixels (mask_row), the weights as
// (kh, kw, C, O) taps, their sums over the taps as (C, O) in float64, and the bias (or null).
template <typename T>
struct Operands {
  const T* data;
  const uint64_t* masks;
  const T* values;
  const uint8_t* same;
  const T* taps;
  const double* tap_sums;
  const T* bias;
};

// acc[0:block] += the weight rows of one input pixel's nonzero channels, each times its value.
template <typename T, typename W, int64_t kOut>
inline void add_pixel(double* __restrict acc, const uint64_t* mask, const T* value, const T* px, const W* tap,
                      const Geometry& g, int64_t block) {
  int64_t k = 0;
  for (int64_t word = 0; word < g.words; ++word) {
    for (uint64_t bits = mask[word]; bits; bits &= bits - 1, ++k) {
      const int64_t c = word * 64 + __builtin_ctzll(bits);
      const double v = k < kInline ? value[k] : px[c * g.sC];
      const W* w = tap + c * g.O;
#pragma omp simd
      for (int64_t o = 0; o < (kOut ? kOut : block); ++o) acc[o] += v * static_cast<double>(w[o]);
    }
  }
}

// Output rows [begin, end) (row = n * Ho + ho), each pixel's outputs in blocks of kOut (0: of up to kOutBlock,
// a number known at run time; a fixed kOut keeps the sums in registers). Sums are float64: each output adds
// its terms in sequence, so this keeps it at least as accurate as the dense convolution's blocked sums.
// Columns are taken kTile at a time, so the input rows under a tile stay in cache from one row to the next.
// A window of equal pixels is summed at once (1 term per nonzero instead of kh * kw). Each pixel's outputs
// are written side by side: into the output when it is channels_last, else into a tile that is then
// copied out plane by plane (a store per plane and pixel took half the time).
// Compiled whole for each instruction set, so the inner loops inline.
template <typename T, int64_t kOut>
FASTP2PHD_SIMD_CLONES void sparse_rows(const Operands<T> in, T* __restrict out, const Geometry g,
                                       int64_t begin, int64_t end) {
  constexpr int64_t kTile = 256;
  double acc[kOut ? kOut : kOutBlock];
  const bool pixel_major = g.oO == 1 && g.oW == g.O;
  std::vector<T> tile(pixel_major ? 0 : kTile * g.O);
  for (int64_t wo0 = 0; wo0 < g.Wo; wo0 += kTile) {
    const int64_t wo1 = std::min(g.Wo, wo0 + kTile);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.Ho, ho = row % g.Ho;
      for (int64_t wo = wo0; wo < wo1; ++wo) {
        T* y = pixel_major ? out + n * g.oN + ho * g.oH + wo * g.oW : tile.data() + (wo - wo0) * g.O;
        const int64_t first = (n * g.H + ho) * g.W + wo;  // the window's top left input pixel
        bool uniform = in.same[first] >= g.KW;
        for (int64_t i = 1; uniform && i < g.KH; ++i) {
          const int64_t pixel = first + i * g.W;
          uniform = in.same[pixel] >= g.KW && same_inline_pixel(in.masks, in.values, g.words, first, pixel);
        }
        for (int64_t o0 = 0; o0 < g.O; o0 += kOut ? kOut : kOutBlock) {
          const int64_t block = kOut ? kOut : std::min(kOutBlock, g.O - o0);
          for (int64_t o = 0; o < block; ++o) acc[o] = in.bias ? in.bias[o0 + o] : T(0);
          if (uniform) {  // every value inline: x itself is not read
            add_pixel<T, double, kOut>(acc, in.masks + first * g.words, in.values + first * kInline, nullptr,
                                       in.tap_sums + o0, g, block);
            for (int64_t o = 0; o < block; ++o) y[o0 + o] = static_cast<T>(acc[o]);
            continue;
          }
          for (int64_t i = 0; i < g.KH; ++i) {
            const int64_t pixel = first + i * g.W;
            const uint64_t* mask = in.masks + pixel * g.words;
            const T* value = in.values + pixel * kInline;
            const T* px = in.data + n * g.sN + (ho + i) * g.sH + wo * g.sW;
            const T* tap = in.taps + i * g.KW * g.C * g.O + o0;
            const int64_t step = g.C * g.O;
            for (int64_t j = 0; j < g.KW; ++j, mask += g.words, value += kInline, px += g.sW, tap += step) {
              add_pixel<T, T, kOut>(acc, mask, value, px, tap, g, block);
            }
          }
          for (int64_t o = 0; o < block; ++o) y[o0 + o] = static_cast<T>(acc[o]);
        }
      }
      if (!pixel_major) {
        for (int64_t o = 0; o < g.O; ++o) {
          T* plane = out + n * g.oN + o * g.oO + ho * g.oH + wo0 * g.oW;
          for (int64_t t = 0; t < wo1 - wo0; ++t) plane[t * g.oW] = tile[t * g.O + o];
        }
      }
    }
  }
}

template <typename T>
void sparse_conv(const Operands<T>& in, T* out, const Geometry& g, int64_t rows) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    switch (g.O % 64 == 0 ? 64 : g.O == 32 ? 32 : g.O == 16 ? 16 : 0) {  // the generators' widths
      case 64: return sparse_rows<T, 64>(in, out, g, begin, end);
      case 32: return sparse_rows<T, 32>(in, out, g, begin, end);
      case 16: return sparse_rows<T, 16>(in, out, g, begin, end);
      default: return sparse_rows<T, 0>(in, out, g, begin, end);
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
  std::vector<uint8_t> same;
  at::Tensor values;  // (pixels, kInline) in x's dtype
  int64_t nonzero = x.numel();
  if (float_type && x.numel() > 0 && weight.isfinite().all().item<bool>()) {
    masks.resize(pixels * words);
    same.resize(pixels);
    values = at::empty({pixels * kInline}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_input_conv2d_masks", [&] {
      nonzero = nonzero_masks<scalar_t>(x, masks, values.mutable_data_ptr<scalar_t>(), same, words);
    });
  }
  // Empty inputs and outputs too: the convolution gives their empty result, or refuses them as F.conv2d does.
  if (nonzero * kDensestSparse > x.numel() || x.numel() == 0 || weight.numel() == 0) {
    // In x's dtype, as the sparse path computes, also under autocast (the Python wrapper casts after).
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
    return at::conv2d(x, weight, bias);
  }
  const auto taps = weight.permute({2, 3, 1, 0}).contiguous();
  const auto tap_sums = taps.to(at::kDouble).sum(at::IntArrayRef{0, 1}).contiguous();  // (C, O)
  const auto bias_values = bias ? bias->contiguous() : at::Tensor();
  // The layout oneDNN's convolution gives: channels_last when the input or the weight is, else contiguous.
  const bool channels_last = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                             weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  auto out = at::empty({x.size(0), weight.size(0), x.size(2) - weight.size(2) + 1, x.size(3) - weight.size(3) + 1},
                       x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                               : at::MemoryFormat::Contiguous));
  const Geometry g{x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                   out.size(2), out.size(3), out.size(1), out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                   weight.size(2), weight.size(3), weight.size(1), words};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_input_conv2d", [&] {
    const Operands<scalar_t> in{x.const_data_ptr<scalar_t>(), masks.data(), values.const_data_ptr<scalar_t>(),
                                same.data(), taps.const_data_ptr<scalar_t>(), tap_sums.const_data_ptr<double>(),
                                bias ? bias_values.const_data_ptr<scalar_t>() : nullptr};
    sparse_conv<scalar_t>(in, out.mutable_data_ptr<scalar_t>(), g, out.size(0) * g.Ho);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastp2phd, CPU, m) {
  m.impl("sparse_input_conv2d", &sparse_input_conv2d_cpu);
}

}  // namespace fastp2phd
