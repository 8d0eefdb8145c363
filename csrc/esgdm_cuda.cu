// The "cuda" backend's kernel: multi-tensor apply over a device-side address table,
// one launch per call, whatever the number of tensors.
//
// The host (esgdm_cuda_host.cpp) writes one TensorMeta per non-empty tensor.  The
// tensors are cut into tiles of kThreads * VEC elements, VEC being 16 bytes of the
// parameter dtype, numbered one after the other across tensors.  Block b steps the
// contiguous tile range [b * tiles_per_block, (b + 1) * tiles_per_block), the grid
// being sized to fill the GPU once, so every block gets the same amount of work.  A
// full tile of an aligned tensor moves through 128-bit loads and stores; a tensor
// with a misaligned address, and the partial last tile of each tensor, go element by
// element (still coalesced).  Tile offsets are 64-bit, so a tensor may have more than
// 2^31 elements; offsets inside a tile are 32-bit.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "esgdm_cuda.h"

#define ESGDM_STR_(...) #__VA_ARGS__
#define ESGDM_STR(...) ESGDM_STR_(__VA_ARGS__)

namespace esgdm {
namespace cuda {

const char* cuda_archs() {
#if defined(ESGDM_CUDA_ARCHS)
  return ESGDM_STR(ESGDM_CUDA_ARCHS);
#else
  return "unknown";
#endif
}

const char* cuda_arch_list() {
#if defined(__CUDA_ARCH_LIST__)
  return ESGDM_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

const char* cuda_version() {
  static const std::string version =
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  return version.c_str();
}

namespace {

constexpr int kMaxDevices = 64;

// N elements of T moved as whole 16-byte words (N * sizeof(T) is a multiple of 16).
template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

template <bool kDStep, typename P, typename S>
__global__ void __launch_bounds__(kThreads)
    fused_step_kernel(const TensorMeta<S>* __restrict__ metas, int ntensors, int64_t ntiles,
                      int64_t tiles_per_block) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(P));
  constexpr int kTile = kThreads * VEC;
  static_assert(kTile == tile_elements(sizeof(P)), "tile size mismatch with the host");
  int64_t tile = static_cast<int64_t>(blockIdx.x) * tiles_per_block;
  const int64_t tile_end = tile + tiles_per_block < ntiles ? tile + tiles_per_block : ntiles;
  if (tile >= tile_end) return;

  // The tensor holding the first tile: the last one with tile_begin <= tile.
  int lo = 0, hi = ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (metas[mid].tile_begin <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  int k = lo;

  for (; tile < tile_end; ++tile) {
    while (k + 1 < ntensors && metas[k + 1].tile_begin <= tile) ++k;
    const TensorMeta<S>& t = metas[k];
    const Coeffs<S> c = t.c;
    const int64_t start = (tile - t.tile_begin) * kTile;
    const int64_t left = t.numel - start;
    const int n = left < kTile ? static_cast<int>(left) : kTile;
    P* __restrict__ p = static_cast<P*>(t.p) + start;
    const P* __restrict__ g = static_cast<const P*>(t.g) + start;
    S* __restrict__ m = t.m + start;
    S* __restrict__ d = t.d + start;
    const P* __restrict__ h = kDStep ? static_cast<const P*>(t.h) + start : nullptr;

    if (t.aligned && n == kTile) {
      const int j = threadIdx.x * VEC;
      Pack<P, VEC> pv = *reinterpret_cast<const Pack<P, VEC>*>(p + j);
      const Pack<P, VEC> gv = *reinterpret_cast<const Pack<P, VEC>*>(g + j);
      Pack<S, VEC> mv = *reinterpret_cast<const Pack<S, VEC>*>(m + j);
      Pack<S, VEC> dv = *reinterpret_cast<const Pack<S, VEC>*>(d + j);
      Pack<P, VEC> hv;
      if (kDStep) hv = *reinterpret_cast<const Pack<P, VEC>*>(h + j);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        S pe = static_cast<S>(pv.v[e]);
        const S he = kDStep ? static_cast<S>(hv.v[e]) : S(0);
        update<kDStep>(pe, static_cast<S>(gv.v[e]), mv.v[e], dv.v[e], he, c);
        pv.v[e] = static_cast<P>(pe);
      }
      *reinterpret_cast<Pack<P, VEC>*>(p + j) = pv;
      *reinterpret_cast<Pack<S, VEC>*>(m + j) = mv;
      if (kDStep) *reinterpret_cast<Pack<S, VEC>*>(d + j) = dv;
    } else {
      for (int j = threadIdx.x; j < n; j += kThreads) {
        S pj = static_cast<S>(p[j]);
        S mj = m[j];
        S dj = d[j];
        const S hj = kDStep ? static_cast<S>(h[j]) : S(0);
        update<kDStep>(pj, static_cast<S>(g[j]), mj, dj, hj, c);
        p[j] = static_cast<P>(pj);
        m[j] = mj;
        if (kDStep) d[j] = dj;
      }
    }
  }
}

int sm_count(int device) {
  static int cache[kMaxDevices] = {};
  const int slot = device >= 0 && device < kMaxDevices ? device : 0;
  if (cache[slot] == 0) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[slot] = count > 0 ? count : 1;
  }
  return cache[slot];
}

template <bool kDStep, typename P, typename S>
void launch_typed(const void* metas, int ntensors, int64_t ntiles, int device) {
  auto kernel = fused_step_kernel<kDStep, P, S>;
  static int occupancy[kMaxDevices] = {};  // one per instantiation and device
  const int slot = device >= 0 && device < kMaxDevices ? device : 0;
  if (occupancy[slot] == 0) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
    occupancy[slot] = blocks > 0 ? blocks : 1;
  }
  const int64_t max_blocks = static_cast<int64_t>(sm_count(device)) * occupancy[slot];
  const int64_t per_block = (ntiles + max_blocks - 1) / max_blocks;
  const int64_t grid = (ntiles + per_block - 1) / per_block;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  kernel<<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(
      static_cast<const TensorMeta<S>*>(metas), ntensors, ntiles, per_block);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename P, typename S>
void launch_for(bool d_step, const void* metas, int ntensors, int64_t ntiles, int device) {
  if (d_step) {
    launch_typed<true, P, S>(metas, ntensors, ntiles, device);
  } else {
    launch_typed<false, P, S>(metas, ntensors, ntiles, device);
  }
}

}  // namespace

void launch_fused_step(ParamType type, bool d_step, const void* metas, int ntensors,
                       int64_t ntiles, int device) {
  if (ntiles == 0) return;
  switch (type) {
    case ParamType::kFloat32:
      return launch_for<float, float>(d_step, metas, ntensors, ntiles, device);
    case ParamType::kFloat64:
      return launch_for<double, double>(d_step, metas, ntensors, ntiles, device);
    case ParamType::kFloat16:
      return launch_for<c10::Half, float>(d_step, metas, ntensors, ntiles, device);
    case ParamType::kBFloat16:
      return launch_for<c10::BFloat16, float>(d_step, metas, ntensors, ntiles, device);
  }
}

}  // namespace cuda
}  // namespace esgdm
