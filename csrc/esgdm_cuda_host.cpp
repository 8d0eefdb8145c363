// Host side of the "cuda" backend: finds (or builds and uploads) the device-side
// address table of the bucket, then launches the element-wise kernel and the kernel
// that advances the per-tensor scalars (esgdm_cuda.cu), on the current stream.
// Built only when the extension is built with CUDA.
//
// No host synchronisation and, in steady state, no host-to-device copy: the address
// table holds only addresses and sizes (the numbers are derived on the device), so it
// is kept in a small cache keyed by the addresses and sizes of every tensor of the
// call.  Gradients usually come back at the same addresses step after step (the
// caching allocator hands the same blocks back), so after the first steps every call
// finds its table and launches two kernels, which a CUDA graph can capture.
//
// A table is uploaded by kernels that carry its bytes in their arguments
// (cuda::upload): no pinned buffer has to outlive the call, and when that happens
// during graph capture (a table first met while capturing) the graph records kernel
// nodes that rewrite the same bytes at each replay.  A table used while capturing is
// kept for the life of the process, since the graph refers to its address; other
// tables are evicted least recently used first.  Before a table is used on another
// stream than the one it was last uploaded on, it is uploaded again on that stream
// (the same bytes), which orders the upload before the kernels without an event.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <list>
#include <mutex>
#include <vector>

#include "esgdm_common.h"
#include "esgdm_cuda.h"

namespace esgdm {
namespace {

// Tables not used under graph capture kept at most (a bucket has one for its plain
// steps and one for its D-steps).
constexpr size_t kMaxTables = 64;

struct Table {
  std::vector<uintptr_t> key;
  uint64_t hash = 0;
  std::vector<cuda::TensorMeta> host;  // what `metas` holds
  at::Tensor metas;  // device bytes: the TensorMeta of the non-empty tensors (undefined if none)
  int64_t ntiles = 0;
  bool uploaded = false;
  cudaStream_t uploaded_on = nullptr;  // (nullptr is also the default stream)
  bool pinned = false;  // used under graph capture: never evicted
};

std::mutex tables_mutex;
std::list<Table> tables;  // most recently used first

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
      TORCH_CHECK(false, "esgdm._C.step: unsupported parameter dtype ", t);
  }
}

cuda::StateType state_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::StateType::kFloat32;
    case at::kDouble:
      return cuda::StateType::kFloat64;
    case at::kBFloat16:
      return cuda::StateType::kBFloat16;
    case at::kByte:
      return cuda::StateType::kUInt8;
    default:
      TORCH_CHECK(false, "esgdm._C.step: unsupported state dtype ", t);
  }
}

uintptr_t address(const void* p) {
  return reinterpret_cast<uintptr_t>(p);
}

// Everything the table depends on: device, dtypes, kind of step, and each tensor's
// five addresses (six with 8-bit state: its block scales) and size.
std::vector<uintptr_t> table_key(const StepArgs& a) {
  const TensorMemory mem(a);
  std::vector<uintptr_t> key;
  key.reserve(5 + 7 * a.params.size());
  key.push_back(static_cast<uintptr_t>(a.params[0].device().index()));
  key.push_back(static_cast<uintptr_t>(a.params[0].scalar_type()));
  key.push_back(static_cast<uintptr_t>(a.state_dtype));
  key.push_back(a.d_step ? 1 : 0);
  key.push_back(a.params.size());
  for (int64_t i = 0; i < mem.size(); ++i) {
    key.push_back(address(mem.param(i)));
    key.push_back(address(mem.grad(i)));
    key.push_back(address(mem.exp_avg(i)));
    key.push_back(address(mem.exp_avg_d(i)));
    key.push_back(a.d_step ? address(mem.hvp(i)) : 0);
    key.push_back(a.quantized ? address(mem.qscale(i)) : 0);
    key.push_back(static_cast<uintptr_t>(mem.numel(i)));
  }
  return key;
}

uint64_t hash_key(const std::vector<uintptr_t>& key) {
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (uintptr_t w : key) {
    h ^= static_cast<uint64_t>(w) + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  }
  return h;
}

// Builds the table of a bucket (host copy and device buffer); uploads nothing yet.
Table build_table(const StepArgs& a, std::vector<uintptr_t> key, uint64_t hash) {
  const at::ScalarType dtype = a.params[0].scalar_type();
  const int64_t tile = a.quantized ? cuda::kTile8
                                   : cuda::tile_elements(static_cast<int>(c10::elementSize(dtype)));
  Table t;
  t.key = std::move(key);
  t.hash = hash;
  t.host.reserve(a.params.size());
  const TensorMemory mem(a);
  for (int64_t i = 0; i < mem.size(); ++i) {
    const int64_t numel = mem.numel(i);
    if (numel == 0) continue;  // left out: tile_begin must strictly increase
    cuda::TensorMeta meta{};
    meta.p = mem.param(i);
    meta.g = mem.grad(i);
    meta.m = mem.exp_avg(i);
    meta.d = mem.exp_avg_d(i);
    meta.h = a.d_step ? mem.hvp(i) : nullptr;
    meta.qs = a.quantized ? static_cast<float*>(mem.qscale(i)) : nullptr;
    meta.numel = numel;
    meta.tile_begin = t.ntiles;
    meta.pos = static_cast<int32_t>(i);
    meta.aligned = is_aligned(meta.p) && is_aligned(meta.g) && is_aligned(meta.m) &&
                   is_aligned(meta.d) && (meta.h == nullptr || is_aligned(meta.h));
    t.host.push_back(meta);
    t.ntiles += (numel + tile - 1) / tile;
  }
  if (!t.host.empty()) {
    const int64_t bytes = static_cast<int64_t>(t.host.size() * sizeof(cuda::TensorMeta));
    t.metas = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(a.params[0].device()));
  }
  return t;
}

// The bucket's table, ready to be read by kernels on `stream`.  The caller holds
// tables_mutex (and keeps holding it until the kernels are launched, so that no other
// thread evicts the table in between).
const Table& find_table(const StepArgs& a, const c10::cuda::CUDAStream& stream) {
  std::vector<uintptr_t> key = table_key(a);
  const uint64_t hash = hash_key(key);
  auto it = tables.begin();
  while (it != tables.end() && !(it->hash == hash && it->key == key)) ++it;
  if (it == tables.end()) {
    tables.push_front(build_table(a, std::move(key), hash));
    // Evict the least recently used tables that no graph refers to.
    size_t kept = 0;
    for (auto e = tables.begin(); e != tables.end();) {
      if (!e->pinned && ++kept > kMaxTables) {
        e = tables.erase(e);
      } else {
        ++e;
      }
    }
  } else if (it != tables.begin()) {
    tables.splice(tables.begin(), tables, it);
  }
  Table& t = tables.front();
  const bool capturing = cuda::is_capturing(stream.stream());
  if (t.metas.defined() && (!t.uploaded || t.uploaded_on != stream.stream())) {
    // First use, or first use on this stream: (again) the same bytes, ordered on this
    // stream before the kernels that read them.
    cuda::upload(t.metas.data_ptr(), t.host.data(), t.host.size() * sizeof(cuda::TensorMeta),
                 stream.stream());
    if (!capturing) {
      // The buffer is freed on eviction: not before this stream is done with it.
      c10::cuda::CUDACachingAllocator::recordStream(t.metas.storage().data_ptr(), stream);
    }
    t.uploaded = true;
    t.uploaded_on = stream.stream();
  }
  if (capturing) t.pinned = true;  // a graph now refers to this buffer
  return t;
}

}  // namespace

void step_cuda(const StepArgs& a) {
  const int64_t n = a.size();
  if (n == 0) return;
  TORCH_CHECK(n <= INT32_MAX, "esgdm._C.step: too many tensors (", n, ")");
  const at::Device device = a.params[0].device();
  const c10::DeviceGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());

  std::lock_guard<std::mutex> lock(tables_mutex);
  const Table& t = find_table(a, stream);

  cuda::StepParams prm{};
  prm.metas = t.metas.defined() ? static_cast<const cuda::TensorMeta*>(t.metas.data_ptr()) : nullptr;
  prm.ntiles = t.ntiles;
  prm.ntensors = static_cast<int32_t>(t.host.size());
  prm.n = static_cast<int32_t>(n);
  prm.scalars = a.scalars.data_ptr<double>();
  prm.index = a.index.data_ptr<int32_t>();
  prm.hparams = a.hparams.data_ptr<double>();
  prm.grad_scale = a.grad_scale.defined() ? a.grad_scale.data_ptr<float>() : nullptr;
  prm.found_inf = a.found_inf.defined() ? a.found_inf.data_ptr<float>() : nullptr;
  prm.n_slots = a.scalars.size(0);
  prm.n_groups = a.hparams.size(0);
  prm.seed_mix = mix32(a.seed32());
  prm.exact = a.exact() ? 1 : 0;
  prm.stochastic = a.stochastic_rounding() ? 1 : 0;
  prm.d_step = a.d_step ? 1 : 0;

  cuda::launch_step(param_type(a.params[0].scalar_type()), state_type(a.state_dtype),
                    prm, device.index(), stream.stream());
  cuda::launch_advance(prm, stream.stream());  // after: the step reads the old rows
}

}  // namespace esgdm
