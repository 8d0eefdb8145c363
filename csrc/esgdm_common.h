// Host-side pieces shared by the CPU and CUDA implementations of esgdm::fused_step_:
// the argument checks (one clear error per kind of bad input) and the scalar table.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

#include "esgdm_update.h"

namespace esgdm {

// Columns of the float64 scalar table (esgdm/rule.py SCALAR_COLUMNS).
enum ScalarColumn : int { kBeta1 = 0, kBeta2, kEps, kStepScale, kDecay, kNumColumns };

// The op's arguments, unpacked once.
struct StepArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_ds;
  c10::optional<at::TensorList> hvps;
  at::Tensor scalars;

  int64_t size() const { return static_cast<int64_t>(params.size()); }
  bool d_step() const { return hvps.has_value(); }
};

// Raises a c10::Error naming the first problem with the arguments: list lengths,
// scalar table shape and dtype, devices, dtypes, shapes, and layout (every tensor
// dense and laid out like its parameter, so that all can be walked as flat arrays).
// ``device_type`` is the device the kernel runs on.
void check_step_args(const StepArgs& a, c10::DeviceType device_type);

// Tensor i's row of the scalar table, as the math type T.  ``table`` is the table's
// contiguous float64 data.
template <typename T>
inline Coeffs<T> coeffs_for(const double* table, int64_t i) {
  const double* row = table + i * kNumColumns;
  return make_coeffs<T>(row[kBeta1], row[kBeta2], row[kEps], row[kStepScale], row[kDecay]);
}

// The state dtype for a parameter dtype (float32, or float64 for float64 parameters).
inline at::ScalarType state_dtype_for(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The instruction set the CPU kernel was compiled for (esgdm._C.build_info()).
const char* cpu_isa();

}  // namespace esgdm
