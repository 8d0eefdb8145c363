// What the CUDA kernel (esgdm_cuda.cu, compiled by nvcc) and its host side
// (esgdm_cuda_host.cpp, compiled by the C++ compiler) share: the per-tensor address
// table, the tiling, and the launch function.  Nothing here includes ATen, so nvcc
// parses little besides the kernel itself, once per architecture.
#pragma once

#include <cstdint>

#include "esgdm_update.h"

namespace esgdm {
namespace cuda {

// Threads per block; each thread steps 16 bytes of parameters per tile.
constexpr int kThreads = 256;

// Elements per tile for parameters of `param_bytes` bytes (1024 for float32).
constexpr int64_t tile_elements(int param_bytes) {
  return static_cast<int64_t>(kThreads) * (16 / param_bytes);
}

// One tensor of the bucket.  The host writes one per non-empty tensor, in order, into
// pinned memory and copies the table to the device.  S is the state and math type
// (float, or double for float64 parameters); the parameter type is erased here and
// restored by the kernel, which is instantiated per parameter dtype.
template <typename S>
struct TensorMeta {
  void* p;
  const void* g;
  S* m;
  S* d;
  const void* h;       // null on a plain step
  int64_t numel;
  int64_t tile_begin;  // global index of this tensor's first tile; strictly increasing
  Coeffs<S> c;
  int32_t aligned;     // all five addresses 16-byte aligned: full tiles use 128-bit accesses
};

// Parameter dtypes of the kernel instantiations.
enum class ParamType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Launches the kernel on the current stream of `device` (which the caller has made
// current) over a table of `ntensors` TensorMeta<S> (S = double for kFloat64, else
// float) at device address `metas`, covering `ntiles` tiles.  Checks the launch.
void launch_fused_step(ParamType type, bool d_step, const void* metas, int ntensors,
                       int64_t ntiles, int device);

// Build details for esgdm._C.build_info().
const char* cuda_archs();      // as asked of nvcc, e.g. "sm_75+sm_80+compute_90+sm_90"
const char* cuda_arch_list();  // nvcc's __CUDA_ARCH_LIST__, the virtual archs compiled: "750,800,900"
const char* cuda_version();  // CUDA toolkit the kernel was compiled with, e.g. "13.0"

}  // namespace cuda
}  // namespace esgdm
