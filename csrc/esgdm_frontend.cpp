// Host-side helpers of the optimizer's front-end (esgdm/optimizer.py), in C++ because
// they touch every tensor every step: at thousands of small tensors, three Python-level
// maps over the parameters cost the host more than the fused kernel costs the device.
//
// layout_key(tensors): one integer that changes when a tensor's memory or layout
//   changes (data pointer, sizes, strides, dtype, device), so the optimizer knows its
//   buckets still describe the parameters.
// gather_grads(params): the parameters' .grad, and whether every one is present, dense
//   (not sparse) and laid out exactly like its parameter: the usual case, which then
//   needs no other check before the kernel runs.

#include <torch/extension.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace esgdm {

namespace {

inline uint64_t mix(uint64_t h, uint64_t v) {
  // boost::hash_combine's mixing step, widened to 64 bits.
  return h ^ (v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2));
}

int64_t layout_key(const std::vector<at::Tensor>& tensors) {
  uint64_t h = tensors.size();
  for (const at::Tensor& t : tensors) {
    h = mix(h, reinterpret_cast<uintptr_t>(t.defined() ? t.data_ptr() : nullptr));
    h = mix(h, static_cast<uint64_t>(t.scalar_type()));
    h = mix(h, static_cast<uint64_t>(t.device().type()) * 1024 + static_cast<uint64_t>(t.device().index() + 1));
    for (int64_t k = 0; k < t.dim(); ++k) {
      h = mix(h, static_cast<uint64_t>(t.size(k)));
      h = mix(h, static_cast<uint64_t>(t.stride(k)));
    }
  }
  return static_cast<int64_t>(h >> 1);
}

std::tuple<std::vector<at::Tensor>, bool, bool> gather_grads(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  bool all_present = true;
  bool all_like = true;
  for (const at::Tensor& p : params) {
    const at::Tensor& g = p.grad();
    if (!g.defined()) {
      all_present = false;
      all_like = false;
      grads.emplace_back();
      continue;
    }
    if (all_like) {
      all_like = !g.is_sparse() && g.strides() == p.strides() && g.sizes() == p.sizes() &&
                 p.is_non_overlapping_and_dense();
    }
    grads.push_back(g);
  }
  return {grads, all_present, all_like};
}

}  // namespace

void register_frontend(pybind11::module& m) {
  namespace py = pybind11;
  m.def("layout_key", &layout_key, py::arg("tensors"),
        "layout_key(tensors) -> int: changes when any tensor's data pointer, sizes, strides, "
        "dtype or device changes.");
  m.def("gather_grads", &gather_grads, py::arg("params"),
        "gather_grads(params) -> (grads, all_present, all_like): each parameter's .grad (None "
        "where absent); all_like: every gradient present, dense and laid out like its parameter.");
}

}  // namespace esgdm
