// The Python module esgdm._C: ``step`` (the "cpu" and "cuda" kernels behind the
// esgdm::step_ operator, which esgdm/ops.py defines) and ``build_info``.
//
// ``step`` checks what memory safety needs (list lengths, dtypes, devices, shapes,
// layouts, table shapes; esgdm.ops checks the same first, with friendlier messages),
// then runs the CPU implementation (esgdm_cpu.cpp) or the CUDA one (esgdm_cuda_host.cpp)
// for the parameters' device.  The operators esgdm::step_ and esgdm::step_flat_ are
// Python's (esgdm/ops.py) and call it eagerly; the GIL is released while it runs.  One
// operator is defined here, esgdm::step_flat_cpu_: a compiled plain step on CPU tensors,
// whose kernel is C++ from the dispatcher on (see step_flat_cpu_op).

#include <torch/extension.h>

#include <ATen/record_function.h>

#include <optional>
#include <string>
#include <vector>

#include "esgdm_common.h"
#include "esgdm_python.h"
#if defined(ESGDM_WITH_CUDA)
#include "esgdm_cuda.h"
#endif

namespace esgdm {

// A table (scalars, index, hparams): `dtype`, [rows (any when < 0), width], contiguous,
// on `device`.
void check_table(const at::Tensor& t, const char* what, at::ScalarType dtype, int64_t width,
                 int64_t rows, const at::Device& device) {
  TORCH_CHECK(t.defined(), "esgdm._C.step: ", what, " is undefined");
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 2 && t.size(1) == width &&
                  (rows < 0 || t.size(0) == rows),
              "esgdm._C.step: ", what, " must be a ", dtype, " tensor of shape [",
              rows < 0 ? std::string("n") : std::to_string(rows), ", ", width, "], got ",
              t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.device() == device, "esgdm._C.step: ", what, " is on ", t.device(),
              ", the parameters on ", device);
  TORCH_CHECK(t.is_contiguous(), "esgdm._C.step: ", what, " must be contiguous");
}

// grad_scale or found_inf: absent, or one float32 element on `device`.
void check_one_element(const at::Tensor& t, const char* what, const at::Device& device) {
  if (!t.defined()) return;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1 && t.device() == device,
              "esgdm._C.step: ", what, " must be a one-element float32 tensor on ", device,
              ", got ", t.scalar_type(), " with ", t.numel(), " elements on ", t.device());
}

namespace {

bool supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool supported_state_dtype(at::ScalarType param, at::ScalarType state) {
  return param == at::kDouble ? state == at::kDouble
                              : (state == at::kFloat || state == at::kBFloat16 || state == at::kByte);
}

// Tensor `t` (the `what` of tensor `i`) must match its parameter `p` in dtype, device,
// shape and, along every dimension longer than 1, stride.
void check_like(const at::Tensor& t, const char* what, size_t i, const at::Tensor& p,
                at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), "esgdm._C.step: ", what, "[", i, "] is undefined");
  TORCH_CHECK(!dispatches_to_python(t) && t.unsafeGetTensorImpl()->has_storage(), "esgdm._C.step: ", what,
              "[", i, "] is a tensor subclass without memory of its own (such as a DTensor): "
              "the kernels step plain tensors");
  TORCH_CHECK(t.scalar_type() == dtype, "esgdm._C.step: ", what, "[", i, "] has dtype ",
              t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.device() == p.device(), "esgdm._C.step: ", what, "[", i, "] is on ",
              t.device(), " but its parameter is on ", p.device());
  TORCH_CHECK(t.sizes() == p.sizes(), "esgdm._C.step: ", what, "[", i, "] has shape ",
              t.sizes(), " but its parameter has shape ", p.sizes());
  for (int64_t k = 0; k < p.dim(); ++k) {
    TORCH_CHECK(p.size(k) <= 1 || t.stride(k) == p.stride(k), "esgdm._C.step: ", what, "[",
                i, "] has strides ", t.strides(), " but its parameter has strides ",
                p.strides(), "; every tensor must be laid out like its parameter");
  }
}

}  // namespace

// tables: check scalars, index, hparams, grad_scale and found_inf; per_tensor: check
// every tensor of the lists (a StepPlan checks them once, when it is built).
void check_step_args(const StepArgs& a, bool tables, bool per_tensor) {
  const size_t n = a.params.size();
  const bool state_ptrs = a.state_from_ptrs();
  const size_t n_grads = a.ptrs ? a.ptrs->grads.size() : a.grads.size();  // (TensorMemory)
  const size_t n_m = state_ptrs ? a.ptrs->exp_avgs.size() : a.exp_avgs.size();
  const size_t n_d = state_ptrs ? a.ptrs->exp_avg_ds.size() : a.exp_avg_ds.size();
  TORCH_CHECK(n_grads == n, "esgdm._C.step: got ", n, " params but ", n_grads, " grads");
  TORCH_CHECK(n_m == n, "esgdm._C.step: got ", n, " params but ", n_m, " exp_avgs");
  TORCH_CHECK(n_d == n, "esgdm._C.step: got ", n, " params but ", n_d, " exp_avg_ds");
  TORCH_CHECK(!state_ptrs || (!a.d_step && !a.quantized && a.ptrs->numels.size() == n),
              "esgdm._C.step: state as pointers is for plain steps of float state");
  if (a.d_step) {
    TORCH_CHECK(a.hvps.size() == n, "esgdm._C.step: got ", n, " params but ", a.hvps.size(), " hvps");
  }
  if (n == 0) return;

  const at::Tensor& p0 = a.params[0];
  TORCH_CHECK(p0.defined(), "esgdm._C.step: params[0] is undefined");
  // First: nothing else may be asked of such a tensor here.  (A StepPlan's per-step call,
  // per_tensor false, has checked its parameters' memory and layout itself.)
  for (size_t i = 0; per_tensor && i < n; ++i) {
    TORCH_CHECK(!a.params[i].defined() ||
                    (!dispatches_to_python(a.params[i]) && a.params[i].unsafeGetTensorImpl()->has_storage()),
                "esgdm._C.step: params[", i, "] is a tensor subclass without memory of its own (such "
                "as a DTensor): the kernels step plain tensors (a DTensor's local shard)");
  }
  const at::ScalarType dtype = p0.scalar_type();
  const at::Device device = p0.device();
  TORCH_CHECK(supported_param_dtype(dtype),
              "esgdm._C.step: parameters must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(device.is_cpu() || device.is_cuda(),
              "esgdm._C.step: parameters must be on a CPU or CUDA device, got ", device);
  if (tables) {
    check_table(a.scalars, "scalars", at::kDouble, kNumScalarColumns, -1, device);
    check_table(a.index, "index", at::kInt, 2, static_cast<int64_t>(n), device);
    check_table(a.hparams, "hparams", at::kDouble, kNumHparamColumns, -1, device);
    check_one_element(a.grad_scale, "grad_scale", device);
    check_one_element(a.found_inf, "found_inf", device);
  }
  if (!per_tensor) return;

  TORCH_CHECK(state_ptrs || a.exp_avgs[0].defined(), "esgdm._C.step: exp_avgs[0] is undefined");
  const at::ScalarType state = a.state_dtype;
  TORCH_CHECK(supported_state_dtype(dtype, state), "esgdm._C.step: exp_avgs[0] has dtype ", state,
              "; state for ", dtype, " parameters must be ",
              dtype == at::kDouble ? "float64" : "float32, bfloat16 or uint8 (with qscales)");
  TORCH_CHECK(a.quantized == (state == at::kByte), "esgdm._C.step: ",
              a.quantized ? "qscales are given but the state is not uint8"
                          : "uint8 state needs its block scales (qscales)");
  if (a.quantized) {
    TORCH_CHECK(a.qscales.size() == n, "esgdm._C.step: got ", n, " params but ",
                a.qscales.size(), " qscales");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    TORCH_CHECK(p.defined(), "esgdm._C.step: params[", i, "] is undefined");
    TORCH_CHECK(p.scalar_type() == dtype, "esgdm._C.step: params[", i, "] has dtype ",
                p.scalar_type(), " but params[0] has ", dtype, "; one call steps one dtype");
    TORCH_CHECK(p.device() == device, "esgdm._C.step: params[", i, "] is on ", p.device(),
                " but params[0] is on ", device);
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "esgdm._C.step: params[", i, "] (shape ",
                p.sizes(), ", strides ", p.strides(), ") is not dense; step a dense copy instead");
    check_like(a.grads[i], "grads", i, p, dtype);
    if (!state_ptrs) {  // (else cut from one buffer like p: esgdm._C.step_flat checked the extents)
      check_like(a.exp_avgs[i], "exp_avgs", i, p, state);
      check_like(a.exp_avg_ds[i], "exp_avg_ds", i, p, state);
    }
    if (a.d_step) check_like(a.hvps[i], "hvps", i, p, dtype);
    if (a.quantized) {
      const at::Tensor& q = a.qscales[i];
      const int64_t blocks = (p.numel() + kQuantBlock - 1) / kQuantBlock;
      TORCH_CHECK(q.defined() && q.scalar_type() == at::kFloat && q.dim() == 2 &&
                      q.size(0) == blocks && q.size(1) == 2 && q.is_contiguous() &&
                      q.device() == device,
                  "esgdm._C.step: qscales[", i, "] must be a contiguous float32 tensor of shape [",
                  blocks, ", 2] on ", device, ", got ",
                  q.defined() ? c10::toString(q.scalar_type()) : "undefined", " of shape ",
                  q.defined() ? q.sizes() : at::IntArrayRef{});
    }
  }
}

namespace {

// esgdm._C.step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
//               grad_scale, found_inf, flags, seed, qscales=None)
// The lists are borrowed (esgdm_python.h) and the GIL released while the step runs.
void step(const pybind11::handle& params, const pybind11::handle& grads, const pybind11::handle& exp_avgs,
          const pybind11::handle& exp_avg_ds, const pybind11::handle& hvps, const at::Tensor& scalars,
          const at::Tensor& index, const at::Tensor& hparams,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
          int64_t flags, int64_t seed, const pybind11::handle& qscales) {
  const BorrowedTensors p(params, "params"), g(grads, "grads"), m(exp_avgs, "exp_avgs"),
      d(exp_avg_ds, "exp_avg_ds");
  std::optional<BorrowedTensors> h, q;
  if (!hvps.is_none()) h.emplace(hvps, "hvps");
  if (!qscales.is_none()) q.emplace(qscales, "qscales");
  pybind11::gil_scoped_release no_gil;
  StepArgs a = make_step_args(p.tensors(), g.tensors(), m.tensors(), d.tensors(), scalars, index, hparams,
                              grad_scale.value_or(at::Tensor()), found_inf.value_or(at::Tensor()),
                              flags, seed);
  a.d_step = h.has_value();
  if (a.d_step) a.hvps = h->tensors();
  a.quantized = q.has_value();
  if (a.quantized) a.qscales = q->tensors();
  check_step_args(a, true, true);
  run_step(a);
}

// esgdm._C.step_flat(params, grads, exp_avg, exp_avg_d, offsets, scalars, index, hparams,
//                    grad_scale, found_inf, flags, seed): a plain step with float state
// held in two flat buffers, parameter i's state at offsets[i] with its shape and strides
// (esgdm::step_flat_, the operator torch.compile'd steps call): the state views are cut
// here and every tensor checked as step() checks it, in C++ (done in Python, per tensor,
// that cost a compiled step more than the kernel did).
void step_flat_lists(at::TensorList params, at::TensorList grads,
                     const at::Tensor& exp_avg, const at::Tensor& exp_avg_d,
                     c10::ArrayRef<int64_t> offsets, const at::Tensor& scalars,
                     const at::Tensor& index, const at::Tensor& hparams,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     int64_t flags, int64_t seed) {
  const size_t n = params.size();
  TORCH_CHECK(offsets.size() == n, "esgdm._C.step_flat: got ", n, " params but ", offsets.size(), " offsets");
  // First, before anything else is asked of them (this runs without the GIL): no tensor
  // subclass that dispatches to Python (check_step_args says the same of every list).
  for (const bool is_params : {true, false}) {
    const at::TensorList list = is_params ? params : grads;
    for (size_t i = 0; i < list.size(); ++i) {
      TORCH_CHECK(!dispatches_to_python(list[i]), "esgdm._C.step_flat: ", is_params ? "params" : "grads",
                  "[", i, "] is a tensor subclass without memory of its own (such as a DTensor): the "
                  "kernels step plain tensors");
    }
  }
  TORCH_CHECK(!dispatches_to_python(exp_avg) && !dispatches_to_python(exp_avg_d),
              "esgdm._C.step_flat: exp_avg and exp_avg_d must be plain tensors, not tensor subclasses");
  for (const at::Tensor* flat : {&exp_avg, &exp_avg_d}) {
    TORCH_CHECK(flat->defined() && flat->dim() == 1 && flat->layout() == at::kStrided && !flat->is_neg() &&
                    flat->stride(0) == 1,
                "esgdm._C.step_flat: exp_avg and exp_avg_d must be contiguous 1-d tensors");
  }
  TORCH_CHECK(exp_avg.scalar_type() == exp_avg_d.scalar_type() && exp_avg.numel() == exp_avg_d.numel(),
              "esgdm._C.step_flat: exp_avg and exp_avg_d differ in dtype or size");
  // The state's pointers, not views: cutting 2n views cost more than the kernel on small
  // tensors.  Parameter i is dense (checked below), so its state spans exactly numel
  // elements from offsets[i], which must lie inside the flat buffers.
  if (n > 0) {
    TORCH_CHECK(exp_avg.device() == params[0].device() && exp_avg_d.device() == params[0].device(),
                "esgdm._C.step_flat: exp_avg and exp_avg_d are on ", exp_avg.device(), ", the parameters on ",
                params[0].device());
  }
  TensorPtrs ptrs;
  const auto elem = static_cast<int64_t>(exp_avg.element_size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined() && p.layout() == at::kStrided, "esgdm._C.step_flat: params[", i,
                "] is not a strided tensor");
    // the view's last element: the sum over dimensions of (size - 1) * stride
    int64_t extent = p.numel() > 0 ? 1 : 0;
    for (int64_t k = 0; k < p.dim() && extent > 0; ++k) {
      TORCH_CHECK(p.stride(k) >= 0, "esgdm._C.step_flat: params[", i, "] has a negative stride");
      extent += (p.size(k) - 1) * p.stride(k);
    }
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + extent <= exp_avg.numel(), "esgdm._C.step_flat: offsets[",
                i, "] = ", offsets[i], " puts the state of a parameter of shape ", p.sizes(),
                " outside the flat buffers of ", exp_avg.numel(), " elements");
    ptrs.params.push_back(p.data_ptr());
    ptrs.grads.push_back(nullptr);  // (once the gradients are checked)
    ptrs.exp_avgs.push_back(static_cast<char*>(exp_avg.data_ptr()) + offsets[i] * elem);
    ptrs.exp_avg_ds.push_back(static_cast<char*>(exp_avg_d.data_ptr()) + offsets[i] * elem);
    ptrs.numels.push_back(p.numel());
  }
  StepArgs a = make_step_args(params, grads, {}, {}, scalars, index, hparams,
                              grad_scale.value_or(at::Tensor()), found_inf.value_or(at::Tensor()), flags, seed);
  a.state_dtype = exp_avg.scalar_type();
  a.ptrs = &ptrs;
  TORCH_CHECK(grads.size() == n, "esgdm._C.step_flat: got ", n, " params but ", grads.size(), " grads");
  check_step_args(a, true, true);
  for (size_t i = 0; i < n; ++i) ptrs.grads[i] = grads[i].data_ptr();
  run_step(a);
}

void step_flat(const pybind11::handle& params, const pybind11::handle& grads, const at::Tensor& exp_avg,
               const at::Tensor& exp_avg_d, const std::vector<int64_t>& offsets, const at::Tensor& scalars,
               const at::Tensor& index, const at::Tensor& hparams,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               int64_t flags, int64_t seed) {
  const BorrowedTensors p(params, "params"), g(grads, "grads");
  pybind11::gil_scoped_release no_gil;
  step_flat_lists(p.tensors(), g.tensors(), exp_avg, exp_avg_d, offsets, scalars, index, hparams, grad_scale,
                  found_inf, flags, seed);
}

// esgdm::step_flat_cpu_ (schema in TORCH_LIBRARY_FRAGMENT below): esgdm._C.step_flat as a
// dispatcher operator with a C++ kernel, what a torch.compile'd plain step of the "cpu"
// backend calls.  Through esgdm::step_flat_ (a Python kernel) every call converted both
// tensor lists to Python objects and back: more host time than the kernel on small
// models.  Here nothing is Python's, so the index table's values are checked here too
// (the kernels address scalars and hparams with them; on a CPU, reading them is cheap).
void step_flat_cpu_op(at::TensorList params, at::TensorList grads, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_d, c10::SymIntArrayRef offsets, const at::Tensor& scalars,
                      const at::Tensor& index, const at::Tensor& hparams,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      int64_t flags, int64_t seed) {
  std::vector<int64_t> offs;
  offs.reserve(offsets.size());
  for (const c10::SymInt& o : offsets) offs.push_back(o.expect_int());
  const auto n = static_cast<int64_t>(params.size());
  if (n > 0) {
    const at::Device device = params[0].device();
    TORCH_CHECK(device.is_cpu(), "esgdm::step_flat_cpu_: the parameters are on ", device,
                "; this operator steps CPU tensors (esgdm::step_flat_ takes any backend)");
    check_table(scalars, "scalars", at::kDouble, kNumScalarColumns, -1, device);
    check_table(index, "index", at::kInt, 2, n, device);
    check_table(hparams, "hparams", at::kDouble, kNumHparamColumns, -1, device);
    const int32_t* rows = index.data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(rows[2 * i] >= 0 && rows[2 * i] < scalars.size(0), "esgdm::step_flat_cpu_: index[", i,
                  ", 0] = ", rows[2 * i], " is not a row of scalars (", scalars.size(0), " rows)");
      TORCH_CHECK(rows[2 * i + 1] >= 0 && rows[2 * i + 1] < hparams.size(0), "esgdm::step_flat_cpu_: index[", i,
                  ", 1] = ", rows[2 * i + 1], " is not a row of hparams (", hparams.size(0), " rows)");
    }
  }
  step_flat_lists(params, grads, exp_avg, exp_avg_d, offs, scalars, index, hparams, grad_scale, found_inf,
                  flags, seed);
}

}  // namespace

// The operator's schema: esgdm::step_flat_'s (esgdm/ops.py) for a plain step, without
// hvps, kernel and 8-bit state.
TORCH_LIBRARY_FRAGMENT(esgdm, m) {
  m.def("step_flat_cpu_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!) exp_avg, Tensor(c!) exp_avg_d, "
        "SymInt[] offsets, Tensor(d!) scalars, Tensor index, Tensor hparams, Tensor? grad_scale, "
        "Tensor? found_inf, int flags, int seed) -> ()");
}

TORCH_LIBRARY_IMPL(esgdm, CPU, m) {
  m.impl("step_flat_cpu_", &step_flat_cpu_op);
}

void run_step(const StepArgs& a) {
  if (a.size() == 0) return;
  if (a.params[0].is_cuda()) {
#if defined(ESGDM_WITH_CUDA)
    RECORD_FUNCTION("esgdm::cuda_step", std::vector<c10::IValue>());
    step_cuda(a);
#else
    TORCH_CHECK(false, "esgdm._C.step: this build of esgdm._C has no CUDA kernel (it needs a "
                "CUDA build of torch and nvcc at install time)");
#endif
  } else {
    RECORD_FUNCTION("esgdm::cpu_step", std::vector<c10::IValue>());
    step_cpu(a);
  }
}

namespace {

// esgdm._C.build_info() -> dict describing what this extension was compiled with.
pybind11::dict build_info() {
#if defined(__clang__)
  const char* compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  const char* compiler = "gcc " __VERSION__;
#else
  const char* compiler = "unknown compiler";
#endif
  pybind11::dict info;
#if defined(ESGDM_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_archs"] = esgdm::cuda::cuda_archs();
  info["cuda_arch_list"] = esgdm::cuda::cuda_arch_list();
  info["cuda_version"] = esgdm::cuda::cuda_version();
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_arch_list"] = "";
  info["cuda_version"] = "";
#endif
  info["cpu_isa"] = esgdm::cpu_isa();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = compiler;
  return info;
}

}  // namespace
}  // namespace esgdm

namespace esgdm {
void register_frontend(pybind11::module& m);  // esgdm_frontend.cpp
void register_plan(pybind11::module& m);      // esgdm_plan.cpp
}  // namespace esgdm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled ESGD-M kernels (the \"cpu\" and \"cuda\" backends of esgdm::step_).";
  namespace py = pybind11;
  m.def("step", &esgdm::step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_ds"), py::arg("hvps"), py::arg("scalars"), py::arg("index"),
        py::arg("hparams"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("flags"),
        py::arg("seed"), py::arg("qscales") = py::none(),
        "step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams, grad_scale, "
        "found_inf, flags, seed, qscales=None) -> None\n\n"
        "One ESGD-M step of one bucket in place, as esgdm.rule says, on the parameters' device "
        "(CPU or CUDA; on CUDA on the current stream, with no host synchronisation). Advances the "
        "bias, warm and steps columns of the stepped tensors' rows of scalars; writes nothing when "
        "found_inf is nonzero. hvps is None on a plain step; grad_scale and found_inf may be None. "
        "With uint8 exp_avgs/exp_avg_ds (8-bit state, esgdm.quant), qscales holds each tensor's "
        "float32 [ceil(numel / 256), 2] block scales, updated in place (D's only on a D-step); "
        "dscale is left to the caller.");
  m.def("step_flat", &esgdm::step_flat, py::arg("params"), py::arg("grads"), py::arg("exp_avg"),
        py::arg("exp_avg_d"), py::arg("offsets"), py::arg("scalars"), py::arg("index"),
        py::arg("hparams"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("flags"),
        py::arg("seed"),
        "step_flat(params, grads, exp_avg, exp_avg_d, offsets, scalars, index, hparams, grad_scale, "
        "found_inf, flags, seed) -> None\n\n"
        "step() of a plain step (float state), the state of parameter i being the view of the flat "
        "exp_avg/exp_avg_d at offsets[i] with the parameter's shape and strides.");
  esgdm::register_frontend(m);
  esgdm::register_plan(m);
  m.def("build_info", &esgdm::build_info,
        "build_info() -> dict: whether the CUDA kernel was built, for which architectures, "
        "and how the CPU kernel was compiled.");
}
