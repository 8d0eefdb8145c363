// Host-side helpers of the optimizer's front-end (esgdm/optimizer.py), in C++ because
// they touch every tensor every step: at thousands of small tensors, three Python-level
// maps over the parameters cost the host more than the fused kernel costs the device.
//
// layout_key(tensors): one integer that changes when a tensor's memory or layout
//   changes (data pointer, sizes, strides, dtype, device, layout), so the optimizer
//   knows its buckets still describe the parameters.
// gather_checked_grads(params): the parameters' .grad, whether every one is present and
//   laid out exactly like its (dense) parameter -- the usual case, which then needs no
//   other check before the kernel runs -- and the index of the first gradient that
//   cannot be stepped as its parameter's at all (another dtype, device or shape, not a
//   plain strided tensor, or a negated view whose memory holds -g), or -1.

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
    const bool strided = t.defined() && t.layout() == at::kStrided;
    h = mix(h, reinterpret_cast<uintptr_t>(strided ? t.data_ptr() : nullptr));
    if (!t.defined()) continue;
    h = mix(h, static_cast<uint64_t>(t.scalar_type()));
    h = mix(h, static_cast<uint64_t>(t.device().type()) * 1024 + static_cast<uint64_t>(t.device().index() + 1));
    h = mix(h, static_cast<uint64_t>(t.layout()) * 2 + (t.is_neg() ? 1 : 0));
    for (int64_t k = 0; k < t.dim(); ++k) {
      h = mix(h, static_cast<uint64_t>(t.size(k)));
      if (strided) h = mix(h, static_cast<uint64_t>(t.stride(k)));
    }
  }
  return static_cast<int64_t>(h >> 1);
}

// Whether kernels may read `g` as the gradient of `p` (up to strides).
bool steppable_as(const at::Tensor& g, const at::Tensor& p) {
  return g.layout() == at::kStrided && !g.is_neg() && g.scalar_type() == p.scalar_type() &&
         g.device() == p.device() && g.sizes() == p.sizes();
}

std::tuple<std::vector<at::Tensor>, bool, bool, int64_t> gather_checked_grads(
    const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  bool all_present = true;
  bool all_like = true;
  int64_t bad = -1;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = p.grad();
    if (!g.defined()) {
      all_present = false;
      all_like = false;
      grads.emplace_back();
      continue;
    }
    if (bad < 0 && !steppable_as(g, p)) {
      bad = static_cast<int64_t>(i);
      all_like = false;
    }
    if (all_like) {
      all_like = g.strides() == p.strides() && p.is_non_overlapping_and_dense();
    }
    grads.push_back(g);
  }
  return {grads, all_present, all_like, bad};
}

}  // namespace

void register_frontend(pybind11::module& m) {
  namespace py = pybind11;
  m.def("layout_key", &layout_key, py::arg("tensors"),
        "layout_key(tensors) -> int: changes when any tensor's data pointer, sizes, strides, "
        "dtype or device changes.");
  m.def("gather_checked_grads", &gather_checked_grads, py::arg("params"),
        "gather_checked_grads(params) -> (grads, all_present, all_like, bad): each parameter's "
        ".grad (None where absent); all_like: every gradient present, of its parameter's dtype, "
        "device and shape, and laid out like its dense parameter; bad: the index of the first "
        "gradient that is not a strided tensor of its parameter's dtype, device and shape "
        "(or is a negated view), else -1.");
}

}  // namespace esgdm
