// instance_mean on the CPU: two passes over the features, no per-pixel temporaries.
//
// Pass 1 (threads over rows): each thread maps ids to its own dense segment
// indices with a hash table and accumulates per-segment sums (float64) and pixel counts.
// Per-thread tables are merged into one, then pass 2 (threads over rows) writes
// every pixel's segment mean. Work is done per run of equal ids along a row:
// label maps are spatially coherent, so a row of 2048 pixels has a few dozen
// runs, one hash lookup each.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "simd_clones.h"

namespace fastp2phd {
namespace {

// Open-addressing hash map from an instance id to a dense segment index.
class SegmentTable {
 public:
  SegmentTable() { rehash(64); }

  // Index of `id`, inserting it as a new segment when unseen.
  int64_t insert(int64_t id) {
    int64_t slot = find_slot(id);
    if (values_[slot] < 0) {
      values_[slot] = static_cast<int64_t>(ids_.size());
      keys_[slot] = id;
      ids_.push_back(id);
      if (2 * ids_.size() > keys_.size()) {
        rehash(2 * keys_.size());
        slot = find_slot(id);
      }
    }
    return values_[slot];
  }

  // Index of an id known to be present (read-only, safe to share across threads).
  int64_t at(int64_t id) const { return values_[find_slot(id)]; }

  // Ids in the order they were first seen: segment i holds ids()[i].
  const std::vector<int64_t>& ids() const { return ids_; }

 private:
  static uint64_t mix(uint64_t x) {  // splitmix64 finaliser
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  }
  int64_t find_slot(int64_t id) const {
    const uint64_t mask = keys_.size() - 1;
    uint64_t slot = mix(static_cast<uint64_t>(id)) & mask;
    while (values_[slot] >= 0 && keys_[slot] != id) slot = (slot + 1) & mask;
    return static_cast<int64_t>(slot);
  }
  void rehash(size_t capacity) {
    keys_.assign(capacity, 0);
    values_.assign(capacity, -1);
    for (size_t i = 0; i < ids_.size(); ++i) {
      const int64_t slot = find_slot(ids_[i]);
      keys_[slot] = ids_[i];
      values_[slot] = static_cast<int64_t>(i);
    }
  }
  std::vector<int64_t> keys_;
  std::vector<int64_t> values_;  // -1 marks an empty slot
  std::vector<int64_t> ids_;
};

struct Run {
  int64_t begin, end, segment;
};

// The end of the run of ids equal to ids[x] in a contiguous row, 16 ids at a time (one or two vector compares):
// runs are tens to hundreds of pixels long, and a compare-and-branch per pixel was a third of the kernel's time.
template <typename id_t>
FASTP2PHD_SIMD_CLONES int64_t contiguous_run_end(const id_t* __restrict ids, int64_t x, int64_t W) {
  constexpr int64_t kBlock = 16;
  const id_t v = ids[x];
  int64_t end = x + 1;
  for (; end + kBlock <= W; end += kBlock) {
    int differs = 0;
#pragma omp simd reduction(| : differs)  // else GCC unrolls the 16 compares into scalar code
    for (int64_t k = 0; k < kBlock; ++k) differs |= ids[end + k] != v;
    if (differs) break;
  }
  while (end < W && ids[end] == v) ++end;
  return end;
}

// Splits one row of ids into runs of equal ids, mapping each run's id through `lookup`.
template <typename id_t, typename Lookup>
void row_runs(const id_t* ids, int64_t stride, int64_t W, Lookup&& lookup, std::vector<Run>& runs) {
  runs.clear();
  int64_t x = 0;
  while (x < W) {
    const id_t v = ids[x * stride];
    int64_t end = x + 1;
    if (stride == 1) {
      end = contiguous_run_end(ids, x, W);
    } else {
      while (end < W && ids[end * stride] == v) ++end;
    }
    runs.push_back({x, end, lookup(static_cast<int64_t>(v))});
    x = end;
  }
}

// Adds each run's sum of one channel's row to sums[run.segment * C]. In float64, over 32 independent lanes
// where the row is contiguous: a single running sum waits for each add in turn (4 cycles), which made this
// pass 3x the time of a copy; the lanes vectorise and overlap.
template <typename feat_t>
FASTP2PHD_SIMD_CLONES void add_run_sums(const feat_t* __restrict src, int64_t stride, const Run* runs, size_t n_runs,
                                        double* __restrict sums, int64_t C) {
  constexpr int64_t kLanes = 32;
  for (size_t i = 0; i < n_runs; ++i) {
    const Run& r = runs[i];
    double s = 0;
    int64_t x = r.begin;
    if (stride == 1) {
      double lanes[kLanes] = {};
      for (; x + kLanes <= r.end; x += kLanes) {
#pragma omp simd  // else GCC unrolls the lanes into scalar adds
        for (int64_t k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(src[x + k]);
      }
      for (int64_t k = 0; k < kLanes; ++k) s += lanes[k];
    }
    for (; x < r.end; ++x) s += static_cast<double>(src[x * stride]);
    sums[r.segment * C] += s;
  }
}

// Writes each run's mean, means[run.segment * C], over its pixels of one channel's row.
template <typename feat_t>
FASTP2PHD_SIMD_CLONES void fill_runs(feat_t* __restrict dst, int64_t stride, const Run* runs, size_t n_runs,
                                     const feat_t* __restrict means, int64_t C) {
  for (size_t i = 0; i < n_runs; ++i) {
    const Run& r = runs[i];
    const feat_t m = means[r.segment * C];
    if (stride == 1) {
      for (int64_t x = r.begin; x < r.end; ++x) dst[x] = m;
    } else {
      for (int64_t x = r.begin; x < r.end; ++x) dst[x * stride] = m;
    }
  }
}

// Channels-last rows, each pixel's C values side by side: a run's values are one contiguous block, summed
// (or written) over a period of kMaxPeriod or fewer lanes that is a multiple of C, so lane j is channel j % C.
// Per channel with a stride of C, as for other layouts, took 2.7x the time of a contiguous channel at C = 3.
constexpr int64_t kMaxPeriod = 64;

inline int64_t interleaved_period(int64_t C) { return C * (kMaxPeriod / C); }  // needs C <= kMaxPeriod

template <typename feat_t>
FASTP2PHD_SIMD_CLONES void add_run_sums_interleaved(const feat_t* __restrict src, int64_t C, const Run* runs,
                                                    size_t n_runs, double* __restrict sums) {
  const int64_t period = interleaved_period(C);
  for (size_t i = 0; i < n_runs; ++i) {
    const Run& r = runs[i];
    const feat_t* values = src + r.begin * C;
    const int64_t n = (r.end - r.begin) * C;
    double lanes[kMaxPeriod] = {};
    int64_t v = 0;
    for (; v + period <= n; v += period) {
#pragma omp simd
      for (int64_t j = 0; j < period; ++j) lanes[j] += static_cast<double>(values[v + j]);
    }
    for (int64_t j = 0; v + j < n; ++j) lanes[j] += static_cast<double>(values[v + j]);  // v is a multiple of C
    for (int64_t j = 0; j < period; ++j) sums[r.segment * C + j % C] += lanes[j];
  }
}

template <typename feat_t>
FASTP2PHD_SIMD_CLONES void fill_runs_interleaved(feat_t* __restrict dst, int64_t C, const Run* runs, size_t n_runs,
                                                 const feat_t* __restrict means) {
  const int64_t period = interleaved_period(C);
  feat_t pattern[kMaxPeriod];
  for (size_t i = 0; i < n_runs; ++i) {
    const Run& r = runs[i];
    for (int64_t j = 0; j < period; ++j) pattern[j] = means[r.segment * C + j % C];
    feat_t* values = dst + r.begin * C;
    const int64_t n = (r.end - r.begin) * C;
    int64_t v = 0;
    for (; v + period <= n; v += period) {
#pragma omp simd
      for (int64_t j = 0; j < period; ++j) values[v + j] = pattern[j];
    }
    for (int64_t j = 0; v + j < n; ++j) values[v + j] = pattern[j];
  }
}

// Sums and pixel counts of one thread's segments, indexed [segment * C + c].
struct Partial {
  SegmentTable table;
  std::vector<double> sums;
  std::vector<int64_t> counts;
};

template <typename feat_t, typename id_t>
void instance_mean_kernel(const at::Tensor& feat, const at::Tensor& inst, at::Tensor& out) {
  const int64_t N = feat.size(0), C = feat.size(1), H = feat.size(2), W = feat.size(3);
  const feat_t* f = feat.const_data_ptr<feat_t>();
  const int64_t fN = feat.stride(0), fC = feat.stride(1), fH = feat.stride(2), fW = feat.stride(3);
  feat_t* o = out.mutable_data_ptr<feat_t>();
  const int64_t oN = out.stride(0), oC = out.stride(1), oH = out.stride(2), oW = out.stride(3);
  const id_t* ids = inst.const_data_ptr<id_t>();
  const int64_t iN = inst.stride(0), iH = inst.stride(2), iW = inst.stride(3);
  const int64_t grain = std::max<int64_t>(1, 16384 / W);
  // Rows whose pixels hold their C values side by side (channels_last without gaps).
  const bool interleaved_in = C > 1 && C <= kMaxPeriod && fC == 1 && fW == C;
  const bool interleaved_out = C > 1 && C <= kMaxPeriod && oC == 1 && oW == C;

  for (int64_t n = 0; n < N; ++n) {
    // Pass 1: per-thread partial sums.
    std::vector<Partial> partials(at::get_num_threads());
    at::parallel_for(0, H, grain, [&](int64_t y0, int64_t y1) {
      Partial& p = partials[at::get_thread_num()];
      std::vector<Run> runs;
      for (int64_t y = y0; y < y1; ++y) {
        row_runs(ids + n * iN + y * iH, iW, W, [&](int64_t id) { return p.table.insert(id); }, runs);
        p.sums.resize(p.table.ids().size() * C, 0.0);
        p.counts.resize(p.table.ids().size(), 0);
        for (const Run& r : runs) p.counts[r.segment] += r.end - r.begin;
        if (interleaved_in) {
          add_run_sums_interleaved(f + n * fN + y * fH, C, runs.data(), runs.size(), p.sums.data());
        } else {
          for (int64_t c = 0; c < C; ++c)
            add_run_sums(f + n * fN + c * fC + y * fH, fW, runs.data(), runs.size(), p.sums.data() + c, C);
        }
      }
    });

    // Merge the threads' segments and turn sums into means.
    SegmentTable table;
    std::vector<double> sums;
    std::vector<int64_t> counts;
    for (const Partial& p : partials) {
      const auto& local_ids = p.table.ids();
      for (size_t j = 0; j < local_ids.size(); ++j) {
        const int64_t s = table.insert(local_ids[j]);
        sums.resize(table.ids().size() * C, 0.0);
        counts.resize(table.ids().size(), 0);
        counts[s] += p.counts[j];
        for (int64_t c = 0; c < C; ++c) sums[s * C + c] += p.sums[j * C + c];
      }
    }
    std::vector<feat_t> means(sums.size());
    for (size_t s = 0; s < counts.size(); ++s)
      for (int64_t c = 0; c < C; ++c)
        means[s * C + c] = static_cast<feat_t>(sums[s * C + c] / static_cast<double>(counts[s]));

    // Pass 2: broadcast each segment's mean over its pixels.
    at::parallel_for(0, H, grain, [&](int64_t y0, int64_t y1) {
      std::vector<Run> runs;
      for (int64_t y = y0; y < y1; ++y) {
        row_runs(ids + n * iN + y * iH, iW, W, [&](int64_t id) { return table.at(id); }, runs);
        if (interleaved_out) {
          fill_runs_interleaved(o + n * oN + y * oH, C, runs.data(), runs.size(), means.data());
        } else {
          for (int64_t c = 0; c < C; ++c)
            fill_runs(o + n * oN + c * oC + y * oH, oW, runs.data(), runs.size(), means.data() + c, C);
        }
      }
    });
  }
}

at::Tensor instance_mean_cpu(const at::Tensor& feat, const at::Tensor& inst) {
  check_instance_map(inst, "instance_mean");
  TORCH_CHECK(feat.dim() == 4, "instance_mean: feat must have shape (N, C, H, W), got ", feat.sizes());
  TORCH_CHECK(feat.size(0) == inst.size(0) && feat.size(2) == inst.size(2) && feat.size(3) == inst.size(3),
              "instance_mean: feat ", feat.sizes(), " and inst ", inst.sizes(),
              " must share batch, height and width");
  TORCH_CHECK(feat.is_floating_point(), "instance_mean: feat must be a floating-point tensor, got ",
              feat.scalar_type());
  if (inst.is_floating_point() && inst.numel() > 0) {
    // Ids are hashed as int64: a float id must be a whole number in int64's range, or the cast is undefined.
    const at::Tensor wide = inst.to(at::kDouble);
    const at::Tensor valid = wide.eq(wide.trunc()).logical_and(wide.ge(-9223372036854775808.0))
                                 .logical_and(wide.lt(9223372036854775808.0));
    TORCH_CHECK(valid.all().item<bool>(),
                "instance_mean: float instance ids must be whole numbers within int64's range (no fractions, NaN, "
                "inf or values beyond +-9.2e18); pass integer ids");
  }
  TORCH_CHECK(feat.device().is_cpu() && inst.device().is_cpu(),
              "instance_mean: the CPU kernel got tensors on ", feat.device(), " and ", inst.device());
  // The ops' layout contract: channels_last for channels-last-like feat (PyTorch's suggestion), NCHW otherwise.
  at::Tensor out = at::empty(feat.sizes(), feat.options().memory_format(feat.suggest_memory_format()));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "instance_mean_feat", [&] {
    using feat_t = scalar_t;
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, inst.scalar_type(), "instance_mean_ids", [&] {
      instance_mean_kernel<feat_t, scalar_t>(feat, inst, out);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastp2phd, CPU, m) {
  m.impl("instance_mean", &instance_mean_cpu);
}

}  // namespace fastp2phd
