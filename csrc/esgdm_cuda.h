// What the CUDA kernels (esgdm_cuda.cu, compiled by nvcc) and their host side
// (esgdm_cuda_host.cpp, compiled by the C++ compiler) share: the per-tensor address
// table, the tiling, the kernel arguments and the launch functions.  Nothing here
// includes ATen, so nvcc parses little besides the kernels themselves.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
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

// Elements per tile with uint8 state (8-bit, esgdm/quant.py), whatever the parameter
// dtype: one warp per block of kQuantBlock elements, kThreads / 32 blocks per tile.
constexpr int64_t kTile8 = static_cast<int64_t>(kThreads / 32) * kQuantBlock;

// One non-empty tensor of the bucket, in the device-side address table.  Only
// addresses and sizes: the table stays valid for as long as the tensors keep their
// addresses, so the host builds it once and keeps it (esgdm_cuda_host.cpp).  Numbers
// (the per-tensor coefficients) are derived on the device at every step.
struct TensorMeta {
  void* p;
  const void* g;
  void* m;
  void* d;
  const void* h;       // null on a plain step
  float* qs;           // uint8 state: the [n_blocks, 2] block scales; else null
  int64_t numel;
  int64_t tile_begin;  // global index of this tensor's first tile; strictly increasing
  int32_t pos;         // position of the tensor in the call's lists: its row of `index`
  int32_t aligned;     // all addresses 16-byte aligned: full tiles use vector accesses
};
static_assert(sizeof(TensorMeta) == 72, "TensorMeta is uploaded as 9 words");

// Parameter and state dtypes of the kernel instantiations.
enum class ParamType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };
enum class StateType : int { kFloat32, kFloat64, kBFloat16, kUInt8 };

// The arguments of one step, passed by value to the kernels.  All pointers are device
// addresses; grad_scale and found_inf are null when absent.
struct StepParams {
  const TensorMeta* metas;  // ntensors entries (the non-empty tensors)
  int64_t ntiles;
  int32_t ntensors;
  int32_t n;                // rows of `index` (every stepped tensor, empty ones included)
  double* scalars;          // [n_slots, 4], advanced by launch_advance
  const int32_t* index;     // [n, 2]
  const double* hparams;    // [n_groups, 6]
  const float* grad_scale;
  const float* found_inf;
  int64_t n_slots;
  int64_t n_groups;
  uint32_t seed_mix;        // mix32 of the low 32 bits of the seed
  int32_t exact;            // FLAG_EXACT
  int32_t stochastic;       // FLAG_STOCHASTIC_ROUNDING (acted on for 16-bit parameters)
  int32_t d_step;
};

// Launches the element-wise kernel over the table on `stream` (of `device`, which the
// caller has made current).  Every block reads found_inf and the per-tensor scalars
// from device memory; nothing is read back to the host.  Checks the launch.
void launch_step(ParamType param, StateType state, const StepParams& prm, int device,
                 cudaStream_t stream);

// Launches the kernel that advances bias, warm and steps of the rows of `scalars` of
// the n stepped tensors (unless found_inf is nonzero).  Must follow launch_step on the
// same stream: the element-wise kernel reads the old rows.
void launch_advance(const StepParams& prm, cudaStream_t stream);

// Copies `bytes` (a multiple of 8) from host memory to the device address `dst` by
// launching kernels that carry the bytes in their arguments: no host buffer has to
// outlive the call, and under CUDA graph capture it records kernel nodes that rewrite
// the same bytes at every replay.
void upload(void* dst, const void* src, size_t bytes, cudaStream_t stream);

// Whether `stream` is being captured into a CUDA graph.
bool is_capturing(cudaStream_t stream);

// Build details for esgdm._C.build_info().
const char* cuda_archs();      // as asked of nvcc, e.g. "sm_75+sm_80+compute_90+sm_90"
const char* cuda_arch_list();  // nvcc's __CUDA_ARCH_LIST__, the virtual archs compiled: "750,800,900"
const char* cuda_version();    // CUDA toolkit the kernel was compiled with, e.g. "13.0"

}  // namespace cuda
}  // namespace esgdm
