// Host-side pieces shared by the Python module (esgdm_module.cpp) and the CPU and
// CUDA implementations of esgdm._C.step: the unpacked arguments and the entry points.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "esgdm_update.h"

namespace esgdm {

// The arguments of esgdm._C.step, checked by check_step_args (esgdm_module.cpp): one
// entry per tensor in each list, all dense and laid out like their parameter, on one
// device; the tables on that device.  The lists are views of the caller's vectors.
// The data pointers and sizes of a bucket's tensors, taken once by a StepPlan
// (esgdm_plan.cpp; grads per step) so that the CPU kernel need not ask every tensor for
// them on every step.
struct TensorPtrs {
  std::vector<void*> params, exp_avgs, exp_avg_ds, qscales;
  std::vector<const void*> grads;
  std::vector<int64_t> numels;
};

struct StepArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_ds;
  // The dtype of exp_avgs and exp_avg_ds (from exp_avgs[0]; set by the caller when the
  // state comes as pointers only, see ptrs).
  at::ScalarType state_dtype = at::ScalarType::Undefined;
  at::TensorList hvps;  // empty unless d_step
  bool d_step = false;
  // uint8 state (exp_avgs/exp_avg_ds codes): each tensor's float32 [n_blocks, 2] block
  // scales (esgdm/quant.py), read and written; empty for float state.
  at::TensorList qscales;
  bool quantized = false;
  at::Tensor scalars;     // float64 [n_slots, 4], advanced in place (bias, warm, steps)
  at::Tensor index;       // int32 [n, 2]: slot in scalars, row in hparams
  at::Tensor hparams;     // float64 [n_groups, 6]
  at::Tensor grad_scale;  // float32, one element; undefined when absent
  at::Tensor found_inf;   // float32, one element; undefined when absent
  int64_t flags = 0;
  int64_t seed = 0;
  // Set on a plain step by a StepPlan or by esgdm._C.step_flat: the lists' data pointers
  // and sizes, which the kernels read instead of the tensors (TensorMemory).  A plan's
  // `grads` is then empty (the plan holds the gradients' memory); step_flat's
  // `exp_avgs`/`exp_avg_ds` are (its state is one flat buffer per list, cut by offsets,
  // laid out like the parameters: state_from_ptrs()).
  const TensorPtrs* ptrs = nullptr;

  bool state_from_ptrs() const { return ptrs != nullptr && exp_avgs.empty() && !params.empty(); }

  int64_t size() const { return static_cast<int64_t>(params.size()); }
  bool exact() const { return (flags & kFlagExact) != 0; }
  bool stochastic_rounding() const { return (flags & kFlagStochasticRounding) != 0; }
  uint32_t seed32() const { return static_cast<uint32_t>(static_cast<uint64_t>(seed)); }
};

// Tensor k's memory and size for the kernels: from a StepPlan's tables on a plain step,
// else from the tensors (untyped data_ptr(): the dtypes were checked once, up front).
struct TensorMemory {
  const StepArgs& a;
  const TensorPtrs* plan;

  explicit TensorMemory(const StepArgs& args) : a(args), plan(args.d_step ? nullptr : args.ptrs) {}
  int64_t size() const { return a.size(); }
  int64_t numel(int64_t k) const { return plan ? plan->numels[k] : a.params[k].numel(); }
  void* param(int64_t k) const { return plan ? plan->params[k] : a.params[k].data_ptr(); }
  const void* grad(int64_t k) const { return plan ? plan->grads[k] : a.grads[k].data_ptr(); }
  void* exp_avg(int64_t k) const { return plan ? plan->exp_avgs[k] : a.exp_avgs[k].data_ptr(); }
  void* exp_avg_d(int64_t k) const { return plan ? plan->exp_avg_ds[k] : a.exp_avg_ds[k].data_ptr(); }
  void* qscale(int64_t k) const { return plan ? plan->qscales[k] : a.qscales[k].data_ptr(); }
  void* hvp(int64_t k) const { return a.hvps[k].data_ptr(); }
};

// The arguments of one step (hvps, d_step, qscales and quantized are the caller's to set
// where there are any).  The lists are views: the vectors must outlive the StepArgs.
inline StepArgs make_step_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_ds, const at::Tensor& scalars,
                               const at::Tensor& index, const at::Tensor& hparams,
                               const at::Tensor& grad_scale, const at::Tensor& found_inf,
                               int64_t flags, int64_t seed) {
  StepArgs a;
  a.params = params;
  a.grads = grads;
  a.exp_avgs = exp_avgs;
  a.exp_avg_ds = exp_avg_ds;
  if (!exp_avgs.empty() && exp_avgs[0].defined()) a.state_dtype = exp_avgs[0].scalar_type();
  a.scalars = scalars;
  a.index = index;
  a.hparams = hparams;
  a.grad_scale = grad_scale;
  a.found_inf = found_inf;
  a.flags = flags;
  a.seed = seed;
  return a;
}

// Whether `t` is a tensor subclass that dispatches to Python (a DTensor, a FakeTensor):
// then even its sizes may be Python's to answer, so nothing but this may be asked of it
// without the GIL, and it has no memory for a kernel to read.
inline bool dispatches_to_python(const at::Tensor& t) {
  return t.defined() && t.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python);
}

// Checks of esgdm._C.step's tables and one-element tensors (esgdm_module.cpp).
void check_table(const at::Tensor& t, const char* what, at::ScalarType dtype, int64_t width,
                 int64_t rows, const at::Device& device);
void check_one_element(const at::Tensor& t, const char* what, const at::Device& device);

// Checks what memory safety needs of esgdm._C.step's arguments (esgdm_module.cpp):
// tables: the tables and one-element tensors; per_tensor: every tensor of the lists.
void check_step_args(const StepArgs& a, bool tables, bool per_tensor);

// Runs checked arguments on their device's implementation (esgdm_module.cpp).
void run_step(const StepArgs& a);

// The CPU implementation (esgdm_cpu.cpp).
void step_cpu(const StepArgs& a);

#if defined(ESGDM_WITH_CUDA)
// The CUDA implementation (esgdm_cuda_host.cpp, kernels in esgdm_cuda.cu).
void step_cuda(const StepArgs& a);
#endif

// The instruction set the CPU kernel runs with (esgdm._C.build_info()).
const char* cpu_isa();

}  // namespace esgdm
