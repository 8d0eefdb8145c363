// Host side of the "cuda" backend: checks the arguments, writes the per-tensor
// address table (esgdm_cuda.h) into pinned memory, copies it to the GPU on the
// current stream, and launches the kernel of esgdm_cuda.cu.  Registered as the CUDA
// kernel of esgdm::fused_step_.  Built only when the extension is built with CUDA.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "esgdm_common.h"
#include "esgdm_cuda.h"

namespace esgdm {
namespace {

bool is_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

cuda::ParamType param_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::ParamType::kFloat32;
    case at::kDouble:
      return cuda::ParamType::kFloat64;
    case at::kHalf:
      return cuda::ParamType::kFloat16;
    case at::kBFloat16:
      return cuda::ParamType::kBFloat16;
    default:
      TORCH_CHECK(false, "esgdm::fused_step_: unsupported parameter dtype ", t);
  }
}

template <typename S>
void step_with_state(const StepArgs& a) {
  using Meta = cuda::TensorMeta<S>;
  const at::ScalarType dtype = a.params[0].scalar_type();
  const int64_t tile = cuda::tile_elements(static_cast<int>(c10::elementSize(dtype)));

  int64_t ntensors = 0;
  for (int64_t i = 0; i < a.size(); ++i) ntensors += a.params[i].numel() > 0;
  if (ntensors == 0) return;
  TORCH_CHECK(ntensors <= INT32_MAX, "esgdm::fused_step_: too many tensors (", ntensors, ")");

  // Written straight into pinned memory; the caching host allocator keeps the block
  // from being reused until the asynchronous copy below has read it.
  const at::Tensor host = at::empty({ntensors * static_cast<int64_t>(sizeof(Meta))},
                                    at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* metas = reinterpret_cast<Meta*>(host.data_ptr<uint8_t>());
  const at::Tensor table = a.scalars.contiguous();
  const double* rows = table.data_ptr<double>();
  int64_t ntiles = 0;
  int64_t k = 0;
  for (int64_t i = 0; i < a.size(); ++i) {
    const int64_t numel = a.params[i].numel();
    if (numel == 0) continue;  // left out: tile_begin must strictly increase
    Meta meta;
    meta.p = a.params[i].data_ptr();
    meta.g = a.grads[i].data_ptr();
    meta.m = a.exp_avgs[i].data_ptr<S>();
    meta.d = a.exp_avg_ds[i].data_ptr<S>();
    meta.h = a.d_step() ? (*a.hvps)[i].data_ptr() : nullptr;
    meta.numel = numel;
    meta.tile_begin = ntiles;
    meta.c = coeffs_for<S>(rows, i);
    meta.aligned = is_aligned(meta.p) && is_aligned(meta.g) && is_aligned(meta.m) &&
                   is_aligned(meta.d) && (meta.h == nullptr || is_aligned(meta.h));
    std::memcpy(metas + k, &meta, sizeof(Meta));
    ++k;
    ntiles += (numel + tile - 1) / tile;
  }

  const at::Device device = a.params[0].device();
  const c10::DeviceGuard guard(device);
  const at::Tensor on_device = host.to(device, /*non_blocking=*/true);
  cuda::launch_fused_step(param_type(dtype), a.d_step(), on_device.data_ptr(),
                          static_cast<int>(ntensors), ntiles, device.index());
}

void fused_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_ds, c10::optional<at::TensorList> hvps,
                     const at::Tensor& scalars) {
  StepArgs a{params, grads, exp_avgs, exp_avg_ds, hvps, scalars};
  check_step_args(a, c10::DeviceType::CUDA);
  if (a.size() == 0) return;
  if (params[0].scalar_type() == at::kDouble) {
    step_with_state<double>(a);
  } else {
    step_with_state<float>(a);
  }
}

}  // namespace
}  // namespace esgdm

TORCH_LIBRARY_IMPL(esgdm, CUDA, m) {
  m.impl("fused_step_", &esgdm::fused_step_cuda);
}
