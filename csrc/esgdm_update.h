// The ESGD-M per-element update, written once for the C++ CPU kernel and the CUDA
// kernel (esgdm_cpu.cpp, esgdm_cuda.cu).  See esgdm/rule.py for the whole rule; this
// header holds only the element-wise part, in the math type T (float, or double for
// float64 parameters).  Loading, converting and storing the parameter dtype is the
// kernels' business; everything here is plain arithmetic on T.
//
// The host folds each tensor's float64 scalars (esgdm.rule.SCALAR_COLUMNS: beta1,
// beta2, eps, step_scale = alpha / c, decay = 1 - weight_decay * alpha) into a
// Coeffs<T> once per tensor with make_coeffs(); the kernels then call update() on
// every element.
//
// The operations follow the "torch" backend (esgdm/backends/torch_impl.py) so that
// results agree up to rounding: both lerps use PyTorch's two-sided lerp formula with
// weight 1 - beta1, D takes a NaN-propagating maximum, and the step is
// p * decay - step_scale * (mhat / (sqrt(D) + eps)).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ESGDM_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#include <cmath>
// Always inlined, so that the CPU kernel's loops, which are compiled once per
// instruction set, compile the update for their own instruction set.
#define ESGDM_HOST_DEVICE inline __attribute__((always_inline))
#else
#include <cmath>
#define ESGDM_HOST_DEVICE inline
#endif

namespace esgdm {

// Per-tensor constants of the element-wise step, in the math type T.
template <typename T>
struct Coeffs {
  T w;           // lerp weight 1 - beta1 (m moves this far towards g)
  T one_minus_w; // 1 - w, computed in T as PyTorch's lerp does
  T beta2;
  T eps;
  T step_scale;  // alpha / c
  T decay;       // 1 - weight_decay * alpha
  bool w_small;  // |w| < 0.5: which side of PyTorch's lerp formula applies
};

// Builds a tensor's Coeffs from its row of the float64 scalar table.
template <typename T>
ESGDM_HOST_DEVICE Coeffs<T> make_coeffs(double beta1, double beta2, double eps,
                                        double step_scale, double decay) {
  Coeffs<T> c;
  c.w = static_cast<T>(1.0 - beta1);
  c.one_minus_w = T(1) - c.w;
  c.w_small = c.w < T(0.5) && c.w > T(-0.5);
  c.beta2 = static_cast<T>(beta2);
  c.eps = static_cast<T>(eps);
  c.step_scale = static_cast<T>(step_scale);
  c.decay = static_cast<T>(decay);
  return c;
}

ESGDM_HOST_DEVICE float esgdm_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);  // IEEE round-to-nearest unless built with fast math (we are not)
#else
  return std::sqrt(x);
#endif
}

ESGDM_HOST_DEVICE double esgdm_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// lerp(a, b, w) = a + w * (b - a), evaluated from the nearer end (PyTorch's formula,
// exact at w = 0 and w = 1).
template <typename T>
ESGDM_HOST_DEVICE T lerp(T a, T b, const Coeffs<T>& c) {
  const T diff = b - a;
  return c.w_small ? a + c.w * diff : b - diff * c.one_minus_w;
}

// max(a, b) that returns NaN if either is NaN, as torch.maximum does.
template <typename T>
ESGDM_HOST_DEVICE T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// One element of one ESGD-M step.  p, m and d are read and written; g (and h on a
// D-step) only read.  kDStep selects the curvature refresh at compile time so that a
// plain step neither reads h nor writes d.
template <bool kDStep, typename T>
ESGDM_HOST_DEVICE void update(T& p, T g, T& m, T& d, T h, const Coeffs<T>& c) {
  m = lerp(m, g, c);                 // m <- b1 * m + (1 - b1) * g
  if (kDStep) {
    d = nan_max(c.beta2 * d, h * h); // D <- max(b2 * D, h * h)
  }
  const T mhat = lerp(m, g, c);      // Nesterov look-ahead
  const T denom = esgdm_sqrt(d) + c.eps;
  p = p * c.decay - c.step_scale * (mhat / denom);
}

}  // namespace esgdm
