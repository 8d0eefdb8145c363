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

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "esgdm_common.h"
#include "esgdm_python.h"

namespace esgdm {

namespace {

inline uint64_t mix(uint64_t h, uint64_t v) {
  // boost::hash_combine's mixing step, widened to 64 bits.
  return h ^ (v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2));
}

// h with tensor t's memory and layout folded in.
uint64_t mix_layout(uint64_t h, const at::Tensor& t) {
  const bool strided = t.defined() && t.layout() == at::kStrided;
  h = mix(h, reinterpret_cast<uintptr_t>(strided ? t.data_ptr() : nullptr));
  if (!t.defined()) return h;
  h = mix(h, static_cast<uint64_t>(t.scalar_type()));
  h = mix(h, static_cast<uint64_t>(t.device().type()) * 1024 + static_cast<uint64_t>(t.device().index() + 1));
  h = mix(h, static_cast<uint64_t>(t.layout()) * 2 + (t.is_neg() ? 1 : 0));
  for (int64_t k = 0; k < t.dim(); ++k) {
    h = mix(h, static_cast<uint64_t>(t.size(k)));
    if (strided) h = mix(h, static_cast<uint64_t>(t.stride(k)));
  }
  return h;
}

int64_t layout_key(const pybind11::handle& seq) {
  const TensorSeq tensors(seq, "esgdm._C.layout_key");
  uint64_t h = static_cast<uint64_t>(tensors.size());
  for (int64_t i = 0; i < tensors.size(); ++i) h = mix_layout(h, tensors[i]);
  return static_cast<int64_t>(h >> 1);
}

// esgdm._C.params_key(groups): layout_key over the parameters of every group (a list of
// lists), with each parameter's identity (its Python object) and each group's length
// folded in; None if a parameter is a tensor subclass that dispatches to Python (a
// DTensor: its memory is its local shard's).  One call instead of a tuple of ids per
// group, a list of all parameters and layout_key over it: what the optimizer compares
// on every step to know that its buckets still describe the parameters.
pybind11::object params_key(const pybind11::handle& groups) {
  const pybind11::object fast =
      pybind11::reinterpret_steal<pybind11::object>(PySequence_Fast(groups.ptr(), "esgdm._C.params_key"));
  if (!fast) throw pybind11::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
  uint64_t h = static_cast<uint64_t>(n);
  for (Py_ssize_t g = 0; g < n; ++g) {
    const TensorSeq params(PySequence_Fast_GET_ITEM(fast.ptr(), g), "esgdm._C.params_key");
    h = mix(h, static_cast<uint64_t>(params.size()));
    for (int64_t i = 0; i < params.size(); ++i) {
      if (dispatches_to_python(params[i])) return pybind11::none();
      h = mix(h, reinterpret_cast<uintptr_t>(params.item(i)));
      h = mix_layout(h, params[i]);
    }
  }
  return pybind11::int_(static_cast<int64_t>(h >> 1));
}

// Whether kernels may read `g` as the gradient of `p` (up to strides): a plain strided
// tensor with memory of its own (not a tensor subclass that dispatches to Python, such as
// a DTensor: the kernels read memory, with the GIL released).
bool steppable_as(const at::Tensor& g, const at::Tensor& p) {
  return !dispatches_to_python(g) && g.unsafeGetTensorImpl()->has_storage() && g.layout() == at::kStrided &&
         !g.is_neg() && g.scalar_type() == p.scalar_type() && g.device() == p.device() && g.sizes() == p.sizes();
}

pybind11::tuple gather_checked_grads(const pybind11::handle& seq) {
  const TensorSeq params(seq, "esgdm._C.gather_checked_grads");
  pybind11::list grads(params.size());
  bool all_present = true;
  bool all_like = true;
  int64_t bad = -1;
  for (int64_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = p.unsafeGetTensorImpl()->grad();  // (Tensor::grad() also warns on non-leaves)
    if (!g.defined()) {
      all_present = false;
      all_like = false;
      grads[i] = pybind11::none();
      continue;
    }
    if (bad < 0 && !steppable_as(g, p)) {
      bad = i;
      all_like = false;
    }
    if (all_like) {
      all_like = g.strides() == p.strides() && p.is_non_overlapping_and_dense();
    }
    grads[i] = pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(g));
  }
  return pybind11::make_tuple(grads, all_present, all_like, bad);
}

// esgdm._C.data_ptrs(lists) -> int64 [len(lists) + 1, n]: row j the data pointers of
// lists[j] (lists or tuples of tensors), the last row the sizes (numel) of lists[0].  The
// Triton launcher's address table per step, without a Python call per tensor.
at::Tensor data_ptrs(const pybind11::sequence& lists) {
  std::vector<TensorSeq> rows;
  rows.reserve(lists.size());
  for (const pybind11::handle& row : lists) rows.emplace_back(row, "esgdm._C.data_ptrs");
  const int64_t k = static_cast<int64_t>(rows.size());
  const int64_t n = k > 0 ? rows[0].size() : 0;
  at::Tensor out = at::empty({k + 1, n}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(rows[j].size() == n, "esgdm._C.data_ptrs: list ", j, " has ", rows[j].size(),
                " tensors, list 0 has ", n);
    for (int64_t i = 0; i < n; ++i) {
      o[j * n + i] = static_cast<int64_t>(reinterpret_cast<intptr_t>(rows[j][i].data_ptr()));
    }
  }
  for (int64_t i = 0; i < n; ++i) o[k * n + i] = rows[0][i].numel();
  return out;
}

// t[k] += alpha * v[k] over elements [lo, hi), v the signs of esgdm/signs.py under
// `key` (v = -1 where mix32(index ^ key) has its top bit set, index = start + k, low 32
// bits), as torch's add with alpha computes a + alpha * b: alpha rounded to the tensor's
// dtype, the sum in T (float for 16-bit tensors) and rounded once (alpha * v is exact:
// a fused multiply-add rounds the same).
template <typename X>
void add_signs_range(X* t, X* backup, int64_t lo, int64_t hi, uint32_t key, int64_t start, double alpha) {
  using T = std::conditional_t<std::is_same<X, double>::value, double, float>;
  const T a = static_cast<T>(static_cast<X>(alpha));
  for (int64_t k = lo; k < hi; ++k) {
    const uint32_t h = mix32(static_cast<uint32_t>(static_cast<uint64_t>(start + k)) ^ key);
    const T v = (h >> 31) != 0 ? T(-1) : T(1);
    const X old = t[k];
    if (backup != nullptr) backup[k] = old;
    t[k] = static_cast<X>(static_cast<T>(old) + a * v);
  }
}

// esgdm._C.add_signs_(tensors, keys, starts, alpha, backups=None): the finite-difference
// probe's perturbation t += alpha * v with the signs drawn here, element by element, not
// materialised (and, with backups, each tensor copied there first, in the same pass).
void add_signs_(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& keys,
                const std::vector<int64_t>& starts, double alpha,
                const std::optional<std::vector<at::Tensor>>& backups) {
  const size_t n = tensors.size();
  TORCH_CHECK(keys.size() == n && starts.size() == n && (!backups || backups->size() == n),
              "esgdm._C.add_signs_: got ", n, " tensors, ", keys.size(), " keys, ", starts.size(),
              " starts", backups ? " and " + std::to_string(backups->size()) + " backups" : "");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.layout() == at::kStrided && t.is_contiguous() &&
                    !t.is_neg() && !t.is_conj(),
                "esgdm._C.add_signs_: tensors[", i, "] must be a contiguous CPU tensor");
    const at::ScalarType dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                "esgdm._C.add_signs_: tensors[", i, "] has dtype ", dt);
    if (backups) {
      const at::Tensor& b = (*backups)[i];
      TORCH_CHECK(b.defined() && b.device().is_cpu() && b.scalar_type() == dt && b.is_contiguous() &&
                      b.numel() == t.numel() && !b.is_neg(),
                  "esgdm._C.add_signs_: backups[", i, "] must be a contiguous CPU tensor like tensors[", i, "]");
    }
  }
  pybind11::gil_scoped_release no_gil;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    const int64_t numel = t.numel();
    if (numel == 0) continue;
    const uint32_t key = static_cast<uint32_t>(static_cast<uint64_t>(keys[i]));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "add_signs_", [&] {
      scalar_t* data = t.data_ptr<scalar_t>();
      scalar_t* back = backups ? (*backups)[i].data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, numel, 1 << 16, [&](int64_t lo, int64_t hi) {
        add_signs_range<scalar_t>(data, back, lo, hi, key, starts[i], alpha);
      });
    });
  }
}

}  // namespace

void register_frontend(pybind11::module& m) {
  namespace py = pybind11;
  m.def("layout_key", &layout_key, py::arg("tensors"),
        "layout_key(tensors) -> int: changes when any tensor's data pointer, sizes, strides, "
        "dtype or device changes.");
  m.def("params_key", &params_key, py::arg("groups"),
        "params_key(groups) -> int or None: changes when a group's parameters (objects, order, "
        "count) or any parameter's data pointer, sizes, strides, dtype or device change; None "
        "if a parameter is a tensor subclass that dispatches to Python (a DTensor).");
  m.def("data_ptrs", &data_ptrs, py::arg("lists"),
        "data_ptrs(lists) -> int64 tensor [len(lists) + 1, n]: the data pointers of each list's "
        "tensors, one row per list, then the sizes (numel) of the first list's.");
  m.def("add_signs_", &add_signs_, py::arg("tensors"), py::arg("keys"), py::arg("starts"),
        py::arg("alpha"), py::arg("backups") = py::none(),
        "add_signs_(tensors, keys, starts, alpha, backups=None): tensors[i] += alpha * v, v the "
        "Rademacher signs of esgdm.signs under the 32-bit keys[i] (element k's index: starts[i] + k), "
        "rounded once as torch's add with alpha; with backups, each tensor is first copied there "
        "in the same pass. Contiguous CPU float32/float64/bfloat16/float16 tensors.");
  m.def("gather_checked_grads", &gather_checked_grads, py::arg("params"),
        "gather_checked_grads(params) -> (grads, all_present, all_like, bad): each parameter's "
        ".grad (None where absent); all_like: every gradient present, of its parameter's dtype, "
        "device and shape, and laid out like its dense parameter; bad: the index of the first "
        "gradient that is not a strided tensor of its parameter's dtype, device and shape "
        "(or is a negated view), else -1.");
}

}  // namespace esgdm
