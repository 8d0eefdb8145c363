// The "cuda" backend's kernels: multi-tensor apply over a device-side address table,
// one launch of the element-wise kernel per call whatever the number of tensors, then
// one tiny launch that advances the per-tensor scalars.
//
// With uint8 state (8-bit, esgdm/quant.py) step_kernel8 runs instead: the same walk, one
// warp per block of 256 elements (see there).
//
// The host (esgdm_cuda_host.cpp) keeps one TensorMeta per non-empty tensor on the
// device.  The tensors are cut into tiles of kThreads * VEC elements, VEC being 16
// bytes of the parameter dtype, numbered one after the other across tensors.  Block b
// steps the contiguous tile range [b * tiles_per_block, (b + 1) * tiles_per_block),
// the grid being sized to fill the GPU once, so every block gets the same amount of
// work.  A full tile of an aligned tensor moves through vector loads and stores; a
// tensor with a misaligned address, and the partial last tile of each tensor, go
// element by element (still coalesced).  Tile offsets are 64-bit, so a tensor may have
// more than 2^31 elements; offsets inside a tile are 32-bit.
//
// Nothing is read on the host: every block reads found_inf (and returns at once when
// it is nonzero), grad_scale, and derives each of its tensors' coefficients from that
// tensor's rows of `index`, `scalars` and `hparams` in device memory (esgdm_update.h's
// derive and make_coeffs, in float64, then rounded to the math type).  Because every
// block reads the old rows, the rows are advanced by a second kernel launched after
// the first on the same stream (launch_advance), not by the blocks themselves.

#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
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

template <typename P>
using MathType = std::conditional_t<std::is_same<P, double>::value, double, float>;

// N elements of T moved as whole words of up to 16 bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

// The parameter value to store: x rounded to P, to nearest or (16-bit P with
// stochastic rounding on) with the element's random bits.
template <typename P, typename T>
__device__ __forceinline__ P to_param(T x, bool sr, uint32_t key, int64_t idx) {
  if constexpr (sizeof(P) == 2) {
    if (sr) {
      const uint32_t r = mix32(key ^ static_cast<uint32_t>(idx));
      x = stochastic_round<std::is_same<P, c10::BFloat16>::value>(x, r);
    }
  }
  return static_cast<P>(x);
}

// The tensor's rows of `index`, `scalars` and `hparams`: false (after a device-side
// assertion) if `index` points outside the tables.
__device__ __forceinline__ bool tensor_rows(const StepParams& prm, int32_t pos, int32_t* slot,
                                            const double** row, const double** hp) {
  const int32_t s = prm.index[2 * pos];
  const int32_t g = prm.index[2 * pos + 1];
  const bool ok = s >= 0 && s < prm.n_slots && g >= 0 && g < prm.n_groups;
  CUDA_KERNEL_ASSERT(ok && "esgdm: index names a row outside scalars or hparams");
  *slot = s;
  *row = prm.scalars + static_cast<int64_t>(s) * kNumScalarColumns;
  *hp = prm.hparams + static_cast<int64_t>(g) * kNumHparamColumns;
  return ok;
}

// The tensor holding tile `tile`: the last one with tile_begin <= tile.
__device__ __forceinline__ int first_tensor(const StepParams& prm, int64_t tile) {
  int lo = 0, hi = prm.ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (prm.metas[mid].tile_begin <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Tensor t's coefficients and rounding key from its old rows; false (the tensor is then
// skipped) where its index entry points outside the tables (tensor_rows).
template <bool kDStep, typename T>
__device__ __forceinline__ bool tensor_coeffs(const StepParams& prm, const TensorMeta& t, Coeffs<T>* c,
                                              uint32_t* key) {
  int32_t slot;
  const double* row;
  const double* hp;
  if (!tensor_rows(prm, t.pos, &slot, &row, &hp)) return false;
  const Derived r = derive(row, hp, kDStep);
  *c = make_coeffs<T>(r, prm.exact != 0);
  *key = rounding_key(prm.seed_mix, slot, r.steps);
  return true;
}

template <bool kDStep, typename P, typename S>
__global__ void __launch_bounds__(kThreads)
    step_kernel(const StepParams prm, int64_t tiles_per_block) {
  using T = MathType<P>;
  constexpr int VEC = 16 / static_cast<int>(sizeof(P));
  constexpr int kTile = kThreads * VEC;
  static_assert(kTile == tile_elements(sizeof(P)), "tile size mismatch with the host");
  if (prm.found_inf != nullptr && *prm.found_inf != 0.0f) return;  // nothing is written

  int64_t tile = static_cast<int64_t>(blockIdx.x) * tiles_per_block;
  const int64_t tile_end = tile + tiles_per_block < prm.ntiles ? tile + tiles_per_block : prm.ntiles;
  if (tile >= tile_end) return;
  const TensorMeta* __restrict__ metas = prm.metas;
  // grad_scale as the math type (float32 -> float64 is exact for float64 parameters).
  const T scale = prm.grad_scale != nullptr ? static_cast<T>(*prm.grad_scale) : T(1);
  const bool sr = sizeof(P) == 2 && prm.stochastic != 0;

  int k = first_tensor(prm, tile);
  int current = -1;  // the tensor whose coefficients are in c and key
  bool valid = false;
  Coeffs<T> c;
  uint32_t key = 0;

  for (; tile < tile_end; ++tile) {
    while (k + 1 < prm.ntensors && metas[k + 1].tile_begin <= tile) ++k;
    const TensorMeta& t = metas[k];
    if (k != current) {  // a new tensor: derive its coefficients from the old rows
      current = k;
      valid = tensor_coeffs<kDStep>(prm, t, &c, &key);
    }
    if (!valid) continue;
    const int64_t start = (tile - t.tile_begin) * kTile;
    const int64_t left = t.numel - start;
    const int n = left < kTile ? static_cast<int>(left) : kTile;
    P* __restrict__ p = static_cast<P*>(t.p) + start;
    const P* __restrict__ g = static_cast<const P*>(t.g) + start;
    S* __restrict__ m = static_cast<S*>(t.m) + start;
    S* __restrict__ d = static_cast<S*>(t.d) + start;
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
        T pe = static_cast<T>(pv.v[e]);
        T me = static_cast<T>(mv.v[e]);
        T de = static_cast<T>(dv.v[e]);
        const T he = kDStep ? static_cast<T>(hv.v[e]) : T(0);
        update<kDStep, true>(pe, static_cast<T>(gv.v[e]), me, de, he, scale, c);
        pv.v[e] = to_param<P>(pe, sr, key, start + j + e);
        mv.v[e] = static_cast<S>(me);
        if (kDStep) dv.v[e] = static_cast<S>(de);
      }
      *reinterpret_cast<Pack<P, VEC>*>(p + j) = pv;
      *reinterpret_cast<Pack<S, VEC>*>(m + j) = mv;
      if (kDStep) *reinterpret_cast<Pack<S, VEC>*>(d + j) = dv;
    } else {
      for (int j = threadIdx.x; j < n; j += kThreads) {
        T pj = static_cast<T>(p[j]);
        T mj = static_cast<T>(m[j]);
        T dj = static_cast<T>(d[j]);
        const T hj = kDStep ? static_cast<T>(h[j]) : T(0);
        update<kDStep, true>(pj, static_cast<T>(g[j]), mj, dj, hj, scale, c);
        p[j] = to_param<P>(pj, sr, key, start + j);
        m[j] = static_cast<S>(mj);
        if (kDStep) d[j] = static_cast<S>(dj);
      }
    }
  }
}

// The element-wise kernel for uint8 state (8-bit, esgdm/quant.py; codes in
// esgdm_update.h).  The same walk over tiles as step_kernel, with tiles of kTile8
// elements: warp w of the block steps quantization block 8 * tile + w of its tensor,
// lane l its elements l, l + 32, ..., l + 224 (coalesced, element by element).  Each
// lane decodes its 8 elements, runs update() on them, keeps the new m (and sqrt(D) on a
// D-step) in registers; the block's max is a warp max over __shfl_xor_sync; then every
// lane encodes its 8 elements against the new scale (quant_block_m/_d: one division per
// lane and block) and lane 0 writes the scale.  A plain
// step reads the D codes and scale and writes neither.  Simple rather than fast: no
// vector accesses.
template <bool kDStep, typename P>
__global__ void __launch_bounds__(kThreads)
    step_kernel8(const StepParams prm, int64_t tiles_per_block) {
  constexpr int kPerLane = kQuantBlock / 32;
  constexpr int kWarps = kThreads / 32;
  static_assert(kTile8 == static_cast<int64_t>(kWarps) * kQuantBlock, "tile size mismatch");
  if (prm.found_inf != nullptr && *prm.found_inf != 0.0f) return;  // nothing is written

  int64_t tile = static_cast<int64_t>(blockIdx.x) * tiles_per_block;
  const int64_t tile_end = tile + tiles_per_block < prm.ntiles ? tile + tiles_per_block : prm.ntiles;
  if (tile >= tile_end) return;
  const TensorMeta* __restrict__ metas = prm.metas;
  const float scale = prm.grad_scale != nullptr ? *prm.grad_scale : 1.0f;
  const bool sr = sizeof(P) == 2 && prm.stochastic != 0;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  int k = first_tensor(prm, tile);
  int current = -1;
  bool valid = false;
  Coeffs<float> c;
  uint32_t key = 0;

  for (; tile < tile_end; ++tile) {
    while (k + 1 < prm.ntensors && metas[k + 1].tile_begin <= tile) ++k;
    const TensorMeta& t = metas[k];
    if (k != current) {  // a new tensor: derive its coefficients from the old rows
      current = k;
      valid = tensor_coeffs<kDStep>(prm, t, &c, &key);
    }
    if (!valid) continue;
    // This warp's block; the whole warp takes the same branch (the shuffles need it).
    const int64_t block = (tile - t.tile_begin) * kWarps + warp;
    const int64_t start = block * kQuantBlock;
    if (start >= t.numel) continue;
    const int64_t left = t.numel - start;
    const int n = left < kQuantBlock ? static_cast<int>(left) : kQuantBlock;
    P* __restrict__ p = static_cast<P*>(t.p) + start;
    const P* __restrict__ g = static_cast<const P*>(t.g) + start;
    uint8_t* __restrict__ mc = static_cast<uint8_t*>(t.m) + start;
    uint8_t* __restrict__ dc = static_cast<uint8_t*>(t.d) + start;
    const P* __restrict__ h = kDStep ? static_cast<const P*>(t.h) + start : nullptr;
    float* __restrict__ qs = t.qs + 2 * block;
    const float m_scale = qs[kQuantMScale];
    const float d_scale = qs[kQuantDScale];

    float mv[kPerLane];
    float rv[kPerLane];
    uint32_t m_max = 0;
    uint32_t r_max = 0;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int j = e * 32 + lane;
      mv[e] = 0.0f;
      rv[e] = 0.0f;
      if (j < n) {
        float pj = static_cast<float>(p[j]);
        float mj = decode_m(mc[j], m_scale);
        float dj = decode_d(dc[j], d_scale);
        const float hj = kDStep ? static_cast<float>(h[j]) : 0.0f;
        update<kDStep, true>(pj, static_cast<float>(g[j]), mj, dj, hj, scale, c);
        p[j] = to_param<P>(pj, sr, key, start + j);
        mv[e] = mj;
        m_max = max(m_max, abs_bits(mj));
        if (kDStep) {
          rv[e] = esgdm_sqrt(dj);
          r_max = max(r_max, abs_bits(rv[e]));
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      m_max = max(m_max, __shfl_xor_sync(0xFFFFFFFFu, m_max, off));
      if (kDStep) r_max = max(r_max, __shfl_xor_sync(0xFFFFFFFFu, r_max, off));
    }
    const float m_new = bits_float(m_max);
    const float d_new = bits_float(r_max);
    const QuantBlock bm = quant_block_m(m_new);  // one division per lane and block
    const QuantBlock bd = quant_block_d(d_new);
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int j = e * 32 + lane;
      if (j < n) {
        mc[j] = encode_m(mv[e], bm);
        if (kDStep) dc[j] = encode_root(rv[e], bd);
      }
    }
    if (lane == 0) {
      qs[kQuantMScale] = m_new;
      if (kDStep) qs[kQuantDScale] = d_new;
    }
  }
}

// Advances bias, warm and steps of each stepped tensor's row (rule.derive), from the
// rows as the element-wise kernel read them.
__global__ void advance_kernel(const StepParams prm) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= prm.n) return;
  if (prm.found_inf != nullptr && *prm.found_inf != 0.0f) return;
  int32_t slot;
  const double* row;
  const double* hp;
  if (!tensor_rows(prm, static_cast<int32_t>(i), &slot, &row, &hp)) return;
  const Derived r = derive(row, hp, prm.d_step != 0);
  double* out = prm.scalars + static_cast<int64_t>(slot) * kNumScalarColumns;
  out[kBias] = r.bias;
  out[kWarm] = r.warm;
  out[kSteps] = r.steps;
}

// The bytes of one upload, carried in the kernel's arguments (under the 4 KiB limit).
constexpr int kUploadWords = 480;
struct UploadChunk {
  uint64_t w[kUploadWords];
};

__global__ void upload_kernel(uint64_t* dst, const UploadChunk chunk, int nwords) {
  for (int i = threadIdx.x; i < nwords; i += blockDim.x) dst[i] = chunk.w[i];
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

// The element-wise kernel for parameters P and state S (uint8_t: step_kernel8).
template <bool kDStep, typename P, typename S>
auto step_kernel_for() {
  if constexpr (std::is_same<S, uint8_t>::value) {
    return step_kernel8<kDStep, P>;
  } else {
    return step_kernel<kDStep, P, S>;
  }
}

template <bool kDStep, typename P, typename S>
void launch_typed(const StepParams& prm, int device, cudaStream_t stream) {
  auto kernel = step_kernel_for<kDStep, P, S>();
  static int occupancy[kMaxDevices] = {};  // one per instantiation and device
  const int slot = device >= 0 && device < kMaxDevices ? device : 0;
  if (occupancy[slot] == 0) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
    occupancy[slot] = blocks > 0 ? blocks : 1;
  }
  const int64_t max_blocks = static_cast<int64_t>(sm_count(device)) * occupancy[slot];
  const int64_t per_block = (prm.ntiles + max_blocks - 1) / max_blocks;
  const int64_t grid = (prm.ntiles + per_block - 1) / per_block;
  kernel<<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(prm, per_block);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename P, typename S>
void launch_for(const StepParams& prm, int device, cudaStream_t stream) {
  if (prm.d_step) {
    launch_typed<true, P, S>(prm, device, stream);
  } else {
    launch_typed<false, P, S>(prm, device, stream);
  }
}

template <typename P>
void launch_param(StateType state, const StepParams& prm, int device, cudaStream_t stream) {
  if (state == StateType::kBFloat16) {
    launch_for<P, c10::BFloat16>(prm, device, stream);
  } else if (state == StateType::kUInt8) {
    launch_for<P, uint8_t>(prm, device, stream);
  } else {
    launch_for<P, float>(prm, device, stream);
  }
}

}  // namespace

void launch_step(ParamType param, StateType state, const StepParams& prm, int device,
                 cudaStream_t stream) {
  if (prm.ntiles == 0 || prm.ntensors == 0) return;
  switch (param) {
    case ParamType::kFloat32:
      return launch_param<float>(state, prm, device, stream);
    case ParamType::kFloat64:
      return launch_for<double, double>(prm, device, stream);
    case ParamType::kFloat16:
      return launch_param<c10::Half>(state, prm, device, stream);
    case ParamType::kBFloat16:
      return launch_param<c10::BFloat16>(state, prm, device, stream);
  }
}

void launch_advance(const StepParams& prm, cudaStream_t stream) {
  if (prm.n == 0) return;
  constexpr int kAdvanceThreads = 128;
  const int blocks = (prm.n + kAdvanceThreads - 1) / kAdvanceThreads;
  advance_kernel<<<blocks, kAdvanceThreads, 0, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void upload(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  const size_t words = bytes / sizeof(uint64_t);
  auto* out = static_cast<uint64_t*>(dst);
  const auto* in = static_cast<const unsigned char*>(src);
  for (size_t done = 0; done < words; done += kUploadWords) {
    const int now = static_cast<int>(words - done < kUploadWords ? words - done : kUploadWords);
    UploadChunk chunk{};
    std::memcpy(chunk.w, in + done * sizeof(uint64_t), now * sizeof(uint64_t));
    upload_kernel<<<1, 128, 0, stream>>>(out + done, chunk, now);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace cuda
}  // namespace esgdm
