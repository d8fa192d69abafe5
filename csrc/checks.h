// Input checks shared by the CPU and CUDA kernels. The Python wrappers in
// fastp2phd/ops/ validate first with friendlier messages; these guard direct
// torch.ops.fastp2phd.* calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastp2phd {

inline void check_instance_map(const at::Tensor& inst, const char* op) {
  TORCH_CHECK(inst.dim() == 4 && inst.size(1) == 1, op,
              ": the instance map must have shape (N, 1, H, W), got ",
              inst.sizes(), "; add the missing dimensions with unsqueeze");
  TORCH_CHECK(!inst.is_complex() && inst.scalar_type() != at::kBool, op,
              ": instance ids must be an integer or float tensor, got ",
              inst.scalar_type());
}

}  // namespace fastp2phd
