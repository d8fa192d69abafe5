// boundary_map on CUDA: one pass, one thread per pixel of a row.
//
// The grid is (column blocks, rows); each block walks rows with a stride of
// gridDim.y, so no per-pixel integer division is needed and any N*H fits.
// Neighbour reads of adjacent rows hit L1/L2, so a plain kernel stays near the
// copy bandwidth of ids-in + edges-out.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"

namespace fastp2phd {
namespace {

constexpr int kThreads = 256;

// Ids are compared as themselves, except 16-bit floats, which compare as float
// (torch builds CUDA code without implicit half operators).
template <typename T>
__device__ __forceinline__ T id_key(T v) { return v; }
__device__ __forceinline__ float id_key(c10::Half v) { return static_cast<float>(v); }
__device__ __forceinline__ float id_key(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename id_t, typename out_t>
__global__ void boundary_map_kernel(const id_t* __restrict__ ids,  // (N*H, W) contiguous ids
                                    out_t* __restrict__ out,       // (N*H, W) contiguous edges
                                    int64_t rows,                  // N*H
                                    int64_t H, int64_t W) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= W) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t y = r % H;
    const int64_t i = r * W + x;
    const auto v = id_key(ids[i]);
    bool edge = false;
    if (x > 0) edge |= id_key(ids[i - 1]) != v;
    if (x + 1 < W) edge |= id_key(ids[i + 1]) != v;
    if (y > 0) edge |= id_key(ids[i - W]) != v;
    if (y + 1 < H) edge |= id_key(ids[i + W]) != v;
    out[i] = static_cast<out_t>(edge ? 1.0f : 0.0f);
  }
}

at::Tensor boundary_map_cuda(const at::Tensor& inst_in, at::ScalarType dtype) {
  check_instance_map(inst_in, "boundary_map");
  TORCH_CHECK(inst_in.is_cuda(), "boundary_map: the CUDA kernel got a ", inst_in.device(), " tensor");
  const c10::cuda::CUDAGuard guard(inst_in.device());
  const at::Tensor inst = inst_in.contiguous();
  at::Tensor out = at::empty(inst.sizes(), inst.options().dtype(dtype));
  const int64_t N = inst.size(0), H = inst.size(2), W = inst.size(3);
  if (out.numel() == 0) return out;

  const int64_t rows = N * H;
  const dim3 block(kThreads);
  const dim3 grid(static_cast<unsigned>((W + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, inst.scalar_type(), "boundary_map_ids", [&] {
    using id_t = scalar_t;
    AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, dtype, "boundary_map_out", [&] {
      boundary_map_kernel<id_t, scalar_t><<<grid, block, 0, stream>>>(
          inst.const_data_ptr<id_t>(), out.mutable_data_ptr<scalar_t>(), rows, H, W);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastp2phd, CUDA, m) {
  m.impl("boundary_map", &boundary_map_cuda);
}

}  // namespace fastp2phd
