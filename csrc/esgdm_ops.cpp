// Registration of the esgdm::fused_step_ operator, its argument checks, its Meta
// kernel, and the Python module esgdm._C (whose only job besides loading the
// operators is to report how it was built).
//
// The CPU kernel registers itself in esgdm_cpu.cpp and the CUDA kernel in
// esgdm_cuda_host.cpp (kernel in esgdm_cuda.cu), both with TORCH_LIBRARY_IMPL, so a
// profiler shows one op, "esgdm::fused_step_", whichever device runs it.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#include "esgdm_common.h"
#if defined(ESGDM_WITH_CUDA)
#include "esgdm_cuda.h"
#endif

namespace esgdm {

namespace {

bool supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Tensor `t` (the `what` of tensor `i`) must match its parameter `p` in dtype, device,
// shape and, along every dimension longer than 1, stride.
void check_like(const at::Tensor& t, const char* what, int64_t i, const at::Tensor& p,
                at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), "esgdm::fused_step_: ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.scalar_type() == dtype, "esgdm::fused_step_: ", what, "[", i,
              "] has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.device() == p.device(), "esgdm::fused_step_: ", what, "[", i,
              "] is on ", t.device(), " but its parameter is on ", p.device());
  TORCH_CHECK(t.sizes() == p.sizes(), "esgdm::fused_step_: ", what, "[", i,
              "] has shape ", t.sizes(), " but its parameter has shape ", p.sizes());
  for (int64_t k = 0; k < p.dim(); ++k) {
    TORCH_CHECK(p.size(k) <= 1 || t.stride(k) == p.stride(k), "esgdm::fused_step_: ",
                what, "[", i, "] has strides ", t.strides(),
                " but its parameter has strides ", p.strides(),
                "; every tensor must be laid out like its parameter");
  }
}

}  // namespace

void check_step_args(const StepArgs& a, c10::DeviceType device_type) {
  const size_t n = a.params.size();
  TORCH_CHECK(a.grads.size() == n, "esgdm::fused_step_: got ", n, " params but ",
              a.grads.size(), " grads");
  TORCH_CHECK(a.exp_avgs.size() == n, "esgdm::fused_step_: got ", n, " params but ",
              a.exp_avgs.size(), " exp_avgs");
  TORCH_CHECK(a.exp_avg_ds.size() == n, "esgdm::fused_step_: got ", n, " params but ",
              a.exp_avg_ds.size(), " exp_avg_ds");
  if (a.hvps.has_value()) {
    TORCH_CHECK(a.hvps->size() == n, "esgdm::fused_step_: got ", n, " params but ",
                a.hvps->size(), " hvps");
  }
  const at::Tensor& s = a.scalars;
  TORCH_CHECK(s.defined() && s.device().is_cpu(),
              "esgdm::fused_step_: scalars must be a CPU tensor, got one on ",
              s.defined() ? s.device().str() : std::string("<undefined>"));
  TORCH_CHECK(s.scalar_type() == at::kDouble,
              "esgdm::fused_step_: scalars must be float64, got ", s.scalar_type());
  TORCH_CHECK(s.dim() == 2 && s.size(0) == static_cast<int64_t>(n) &&
                  s.size(1) == kNumColumns,
              "esgdm::fused_step_: scalars must have shape [", n, ", ", int(kNumColumns),
              "] (one row per tensor: beta1, beta2, eps, step_scale, decay), got ",
              s.sizes());
  if (n == 0) return;

  const at::Tensor& p0 = a.params[0];
  const at::ScalarType dtype = p0.scalar_type();
  TORCH_CHECK(supported_param_dtype(dtype),
              "esgdm::fused_step_: parameters must be float32, float64, float16 or "
              "bfloat16, got ",
              dtype);
  TORCH_CHECK(p0.device().type() == device_type, "esgdm::fused_step_: this kernel runs on ",
              c10::DeviceTypeName(device_type), " tensors, got params on ", p0.device());
  const at::ScalarType state_dtype = state_dtype_for(dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    TORCH_CHECK(p.defined(), "esgdm::fused_step_: params[", i, "] is undefined");
    TORCH_CHECK(p.scalar_type() == dtype, "esgdm::fused_step_: params[", i, "] has dtype ",
                p.scalar_type(), " but params[0] has ", dtype,
                "; one call steps one dtype");
    TORCH_CHECK(p.device() == p0.device(), "esgdm::fused_step_: params[", i, "] is on ",
                p.device(), " but params[0] is on ", p0.device());
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "esgdm::fused_step_: params[", i,
                "] (shape ", p.sizes(), ", strides ", p.strides(),
                ") is not dense; step a dense copy instead");
    check_like(a.grads[i], "grads", static_cast<int64_t>(i), p, dtype);
    check_like(a.exp_avgs[i], "exp_avgs", static_cast<int64_t>(i), p, state_dtype);
    check_like(a.exp_avg_ds[i], "exp_avg_ds", static_cast<int64_t>(i), p, state_dtype);
    if (a.hvps.has_value()) {
      check_like((*a.hvps)[i], "hvps", static_cast<int64_t>(i), p, dtype);
    }
  }
}

namespace {

// Meta kernel: checks the arguments and writes nothing (the op returns nothing), so
// that fake-tensor tracing (torch.compile, torch.export) can go through the op.
void fused_step_meta(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_ds, c10::optional<at::TensorList> hvps,
                     const at::Tensor& scalars) {
  StepArgs a{params, grads, exp_avgs, exp_avg_ds, hvps, scalars};
  check_step_args(a, c10::DeviceType::Meta);
}

}  // namespace

}  // namespace esgdm

TORCH_LIBRARY(esgdm, m) {
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_ds, Tensor[]? hvps, Tensor scalars) -> ()");
}

TORCH_LIBRARY_IMPL(esgdm, Meta, m) {
  m.impl("fused_step_", &esgdm::fused_step_meta);
}

// ---------------------------------------------------------------- Python module

namespace {

// esgdm._C.build_info() -> dict describing what this extension was compiled with.
PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
  PyObject* info = PyDict_New();
  if (info == nullptr) return nullptr;
  auto put = [&](const char* key, PyObject* value) {
    if (value == nullptr) return false;
    const int rc = PyDict_SetItemString(info, key, value);
    Py_DECREF(value);
    return rc == 0;
  };
#if defined(__clang__)
  const char* compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  const char* compiler = "gcc " __VERSION__;
#else
  const char* compiler = "unknown compiler";
#endif
#if defined(ESGDM_WITH_CUDA)
  const bool cuda = true;
  const char* archs = esgdm::cuda::cuda_archs();
  const char* arch_list = esgdm::cuda::cuda_arch_list();
  const char* cuda_version = esgdm::cuda::cuda_version();
#else
  const bool cuda = false;
  const char* archs = "";
  const char* arch_list = "";
  const char* cuda_version = "";
#endif
#ifdef _OPENMP
  const bool openmp = true;
#else
  const bool openmp = false;
#endif
  const bool ok = put("cuda", PyBool_FromLong(cuda)) &&
                  put("cuda_archs", PyUnicode_FromString(archs)) &&
                  put("cuda_arch_list", PyUnicode_FromString(arch_list)) &&
                  put("cuda_version", PyUnicode_FromString(cuda_version)) &&
                  put("cpu_isa", PyUnicode_FromString(esgdm::cpu_isa())) &&
                  put("openmp", PyBool_FromLong(openmp)) &&
                  put("compiler", PyUnicode_FromString(compiler));
  if (!ok) {
    Py_DECREF(info);
    return nullptr;
  }
  return info;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> dict: whether the CUDA kernel was built, for which architectures, "
     "and how the CPU kernel was compiled."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "esgdm._C",
    "Compiled ESGD-M kernels: importing this module registers torch.ops.esgdm.fused_step_.",
    -1,
    methods,
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
