// The ESGD-M rule of esgdm/rule.py, written once for the C++ CPU kernel and the CUDA
// kernel (esgdm_cpu.cpp, esgdm_cuda.cu): the per-tensor scalars (derive, make_coeffs),
// the per-element update (update), the stochastic rounding of 16-bit parameters
// (mix32, stochastic_round) and the codes of the 8-bit state of esgdm/quant.py
// (decode_m, decode_root, decode_d, quant_block_m, quant_block_d, encode_m, encode_root).  Everything here is plain
// arithmetic on the math type T (float, or double for float64 parameters); loading,
// converting and storing the tensors' dtypes is the kernels' business.
//
// Every operation is one IEEE operation of the reference (esgdm.rule.reference_step,
// torch ops), in the same order, so that results agree with it to the bit where torch
// itself rounds the same way.  This needs the compilers not to contract a * b + c into
// a fused multiply-add on their own: csrc/setup_ext.py builds the C++ code with
// -ffp-contract=off and the CUDA code with --fmad=false.  The one place torch does
// fuse is its lerp (the AVX2/AVX-512 CPU kernels and the CUDA kernel compute it with one
// fma); update() takes kFma to do the same where torch does.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ESGDM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <cmath>
#include <cstring>
#if defined(__GNUC__) || defined(__clang__)
// Always inlined, so that the CPU kernel's loops, which are compiled once per
// instruction set, compile the update for their own instruction set.
#define ESGDM_HOST_DEVICE inline __attribute__((always_inline))
#else
#define ESGDM_HOST_DEVICE inline
#endif
#endif

namespace esgdm {

// Columns of the float64 per-tensor state ``scalars`` [n_slots, 4] (rule.SCALAR_COLUMNS).
enum ScalarColumn : int { kBias = 0, kWarm, kSteps, kDscale, kNumScalarColumns };
// Columns of the float64 hyper-parameter table ``hparams`` [n_groups, 6] (rule.HPARAM_COLUMNS).
enum HparamColumn : int { kLr = 0, kBeta1, kBeta2, kLrWarmup, kEps, kWeightDecay, kNumHparamColumns };
// Bits of the op's ``flags`` (rule.FLAG_EXACT, rule.FLAG_STOCHASTIC_ROUNDING).
constexpr int64_t kFlagExact = 1;
constexpr int64_t kFlagStochasticRounding = 2;
// rule.DSCALE_FLOOR: without kFlagExact, sqrt(D) is floored at kDscaleFloor * dscale.
// A power of two, so the floor is exact in float and double alike.
constexpr double kDscaleFloor = 0.0625;

// ------------------------------------------------------------------ per tensor

// One tensor's quantities of one step, in float64 (rule.derive).
struct Derived {
  double bias, warm, steps;  // the advanced row of ``scalars`` (dscale does not change)
  double w, beta2, eps, step_scale, decay, dscale;
};

// ``row``: the tensor's row of ``scalars``; ``hp``: its group's row of ``hparams``.
ESGDM_HOST_DEVICE Derived derive(const double* row, const double* hp, bool d_step) {
  const double b1 = hp[kBeta1];
  Derived r;
  r.bias = row[kBias] * b1;
  r.warm = d_step ? row[kWarm] * hp[kLrWarmup] : row[kWarm];
  r.steps = row[kSteps] + 1.0;
  const double alpha = hp[kLr] * (1.0 - r.warm);
  const double c = 1.0 - r.bias * b1;
  r.w = 1.0 - b1;
  r.beta2 = hp[kBeta2];
  r.eps = hp[kEps];
  r.step_scale = alpha / c;
  r.decay = 1.0 - hp[kWeightDecay] * alpha;
  r.dscale = row[kDscale];
  return r;
}

// Per-tensor constants of the element-wise update, in the math type T.
template <typename T>
struct Coeffs {
  T w;             // lerp weight 1 - beta1 (m moves this far towards g)
  T wm1;           // w - 1, the weight from the far end, computed in T as torch's lerp does
  T beta2;
  T eps;
  T step_scale;    // alpha / c
  T decay;         // 1 - weight_decay * alpha
  T unseen_denom;  // the denominator where D == 0: dscale + eps (eps with FLAG_EXACT)
  T dfloor;        // the least sqrt(D) where D > 0: kDscaleFloor * dscale (0 with FLAG_EXACT)
  // Flags held as T (1 or 0), not bool: gcc does not vectorise the loops when a bool
  // loaded from memory meets the floating-point comparisons in one select.
  T w_small;       // 1 if |w| < 0.5: torch's lerp works from the near end
  T unseen_zero;   // 1 if the step is 0 where D == 0 (not FLAG_EXACT and dscale == 0)
};

// Rounds a tensor's Derived to T (as rule.reference_step does) and folds in the
// unobserved-curvature rule.  With FLAG_EXACT, D == 0 divides by sqrt(0) + eps = eps;
// otherwise by dscale + eps (the sum of the two rounded values, in float64, rounded:
// what torch does for ``mhat / (dscale + eps)`` with Python floats), or the step is 0
// where dscale is not > 0, and D > 0 divides by max(sqrt(D), kDscaleFloor * dscale) + eps.
template <typename T>
ESGDM_HOST_DEVICE Coeffs<T> make_coeffs(const Derived& r, bool exact) {
  Coeffs<T> c;
  c.w = static_cast<T>(r.w);
  c.wm1 = c.w - T(1);
  c.w_small = (c.w < T(0.5) && c.w > T(-0.5)) ? T(1) : T(0);
  c.beta2 = static_cast<T>(r.beta2);
  c.eps = static_cast<T>(r.eps);
  c.step_scale = static_cast<T>(r.step_scale);
  c.decay = static_cast<T>(r.decay);
  const T dscale = static_cast<T>(r.dscale);
  if (exact) {
    c.unseen_denom = c.eps;
    c.unseen_zero = T(0);
    c.dfloor = T(0);  // max(sqrt(D), 0) is sqrt(D) where D > 0: the original rule
  } else {
    c.unseen_denom = static_cast<T>(static_cast<double>(dscale) + static_cast<double>(c.eps));
    c.unseen_zero = dscale > T(0) ? T(0) : T(1);
    c.dfloor = dscale * static_cast<T>(kDscaleFloor);  // exact: a power of two
  }
  return c;
}

// ------------------------------------------------------------------ per element

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

// a * b + c rounded once.  Only instantiated where the hardware has it (kFma).
ESGDM_HOST_DEVICE float esgdm_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

ESGDM_HOST_DEVICE double esgdm_fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// floor, for the float16 stochastic rounding (vectorises with SSE4.1/AVX, not SSE2).
ESGDM_HOST_DEVICE float esgdm_floor(float x) {
#if defined(__CUDA_ARCH__)
  return floorf(x);
#else
  return std::floor(x);
#endif
}

// Finite (not inf, not NaN), written as a comparison so that it vectorises.
ESGDM_HOST_DEVICE bool is_finite(float x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::fabs(x) <= 3.40282346638528859811704183484516925e+38f;
#endif
}

ESGDM_HOST_DEVICE bool is_finite(double x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::fabs(x) <= 1.79769313486231570814527423731704357e+308;
#endif
}

// torch.lerp(a, b, w): a + w * (b - a) from the near end, b + (w - 1) * (b - a) from
// the far end, with one rounding (kFma) or two.
template <bool kFma, typename T>
ESGDM_HOST_DEVICE T lerp(T a, T b, const Coeffs<T>& c) {
  const T diff = b - a;
  const T weight = c.w_small != T(0) ? c.w : c.wm1;
  const T base = c.w_small != T(0) ? a : b;
  return kFma ? esgdm_fma(weight, diff, base) : base + weight * diff;
}

// max(a, b) that returns NaN if either is NaN, as torch.maximum does.
template <typename T>
ESGDM_HOST_DEVICE T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// One element of one step (rule.update_elements).  p, m and d are read and written;
// g (and h on a D-step) only read, divided by ``scale`` (grad_scale, 1 when absent).
// Every branch is a select, so that the CPU loops vectorise.  kDStep selects the
// curvature refresh at compile time: a plain step does not read h nor change d.
template <bool kDStep, bool kFma, typename T>
ESGDM_HOST_DEVICE void update(T& p, T g_raw, T& m, T& d, T h_raw, T scale, const Coeffs<T>& c) {
  const T g = g_raw / scale;          // the division, not a multiply by 1 / scale
  const bool ok = is_finite(g);       // a non-finite gradient leaves the element alone
  const T m_new = lerp<kFma>(m, g, c);  // m <- b1 * m + (1 - b1) * g
  T d_new = d;
  if (kDStep) {
    const T h = h_raw / scale;
    const T hh = h * h;
    const T h2 = is_finite(hh) ? hh : T(0);  // h NaN or inf, or h * h overflowing: dropped
    d_new = nan_max(c.beta2 * d, h2);          // D <- max(b2 * D, h * h)
  }
  const T mhat = lerp<kFma>(m_new, g, c);  // Nesterov look-ahead
  const bool unseen = d_new == T(0);
  // sqrt(D) floored at dfloor (NaN stays NaN, as torch.maximum does)
  const T denom = unseen ? c.unseen_denom : nan_max(esgdm_sqrt(d_new), c.dfloor) + c.eps;
  T q = mhat / denom;
  q = (unseen && c.unseen_zero != T(0)) ? T(0) : q;
  const T p_new = p * c.decay - c.step_scale * q;
  p = ok ? p_new : p;
  m = ok ? m_new : m;
  if (kDStep) d = ok ? d_new : d;
}

// ------------------------------------------------------------- random rounding

// rule.mix32: the 32-bit integer hash of the stochastic rounding.
ESGDM_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The key of one tensor's random numbers: ``seed_mix`` = mix32(seed32), ``slot`` its
// row of ``scalars``, ``steps`` its new step count (an integer held in a double).
ESGDM_HOST_DEVICE uint32_t rounding_key(uint32_t seed_mix, int64_t slot, double steps) {
  const uint32_t steps32 = static_cast<uint32_t>(static_cast<int64_t>(steps));
  return mix32(mix32(seed_mix ^ static_cast<uint32_t>(slot)) ^ steps32);
}

ESGDM_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

ESGDM_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// rule.stochastic_round of float32 ``x`` with random bits ``r``: a float32 value that
// the parameter dtype (bfloat16, or float16 when !kBF16) holds exactly, or that
// overflows it (then converting it rounds to inf, as the reference's ``.to`` does).
// Non-finite x is returned as is (round to nearest).
template <bool kBF16>
ESGDM_HOST_DEVICE float stochastic_round(float x, uint32_t r) {
  const bool finite = is_finite(x);
  float y;
  if (kBF16) {
    y = bits_float((float_bits(x) + (r >> 16)) & 0xFFFF0000u);
  } else {
    // ulp of x in float16 (subnormals below 2**-14): a power of two, built from bits.
    int32_t e = static_cast<int32_t>((float_bits(x) >> 23) & 0xFFu) - 127;
    e = e < -14 ? -14 : e;
    const float ulp = bits_float(static_cast<uint32_t>(e - 10 + 127) << 23);
    const float q = x / ulp;
    const float f = esgdm_floor(q);
    const float u = static_cast<float>(r >> 8) * 5.9604644775390625e-08f;  // * 2**-24
    y = (f + (u < q - f ? 1.0f : 0.0f)) * ulp;
  }
  return finite ? y : x;
}

// ------------------------------------------------------------------ 8-bit state

// esgdm/quant.py, the one reference quantizer: with uint8 state, m and D are one code
// per element, in blocks of kQuantBlock consecutive elements of the tensor's memory,
// with two float32 scales per block (a contiguous [n_blocks, 2] table per tensor):
// column kQuantMScale = the block's max |m|, column kQuantDScale = its max sqrt(D).
// Every operation below is one correctly rounded float32 operation of the reference, in
// its order, so that every backend stores the same bytes.
constexpr int kQuantBlock = 256;
constexpr int kQuantMScale = 0;
constexpr int kQuantDScale = 1;
constexpr float kQuantMLevels = 127.0f;  // m: code 128 + q, q in -127..127
constexpr float kQuantMZero = 128.0f;
constexpr float kQuantDLevels = 255.0f;  // D: code 0..255, 0 iff D == 0
// quant.INV_M_LEVELS, quant.INV_D_LEVELS: 1 / 127 and 1 / 255 rounded to float32, what
// decoding multiplies by (127 and 255 times them are exactly 1).
constexpr float kQuantInvMLevels = 0x1.020408p-7f;
constexpr float kQuantInvDLevels = 0x1.010102p-8f;
// quant.TINY, quant.HUGE, quant.PRESCALE: a block whose max |m| is below kQuantTiny
// (subnormal) or above kQuantHuge has |m| and its scale multiplied by kQuantPrescale or
// 1 / kQuantPrescale (exact: powers of two) before 1 / s, which would overflow or be
// subnormal.
constexpr float kQuantTiny = 0x1p-126f;
constexpr float kQuantHuge = 0x1p126f;
constexpr float kQuantPrescale = 0x1p24f;

ESGDM_HOST_DEVICE float esgdm_fabs(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x);
#else
  return std::fabs(x);
#endif
}

// rint (half to even) of 0 <= x < 2**22: adding 2**23 leaves no fraction bits.  Exact
// as written only because no compiler here reassociates or contracts float arithmetic
// (-ffp-contract=off, --fmad=false, no fast math).
ESGDM_HOST_DEVICE float quant_rint(float x) {
  return (x + 8388608.0f) - 8388608.0f;
}

// m from its code and its block's scale s: q = code - 128, a = |q| * (1 / 127),
// m = sign(q) * (s * ((a * a) * (a * a))).
ESGDM_HOST_DEVICE float decode_m(uint8_t code, float s) {
  const float q = static_cast<float>(code) - kQuantMZero;
  const float a = esgdm_fabs(q) * kQuantInvMLevels;
  const float m = s * ((a * a) * (a * a));
  return q < 0.0f ? -m : m;
}

// sqrt(D) as stored: t = code * (1 / 255), r = s * ((t * t) * (t * t)).
ESGDM_HOST_DEVICE float decode_root(uint8_t code, float s) {
  const float t = static_cast<float>(code) * kQuantInvDLevels;
  return s * ((t * t) * (t * t));
}

// D = r * r.
ESGDM_HOST_DEVICE float decode_d(uint8_t code, float s) {
  const float r = decode_root(code, s);
  return r * r;
}

// What encoding a block needs of its scale s, computed once per block: the one division.
struct QuantBlock {
  bool live;  // s > 0: otherwise every code is the zero code
  float k;    // encode_m's pre-scale: 2**24 where s < 2**-126, 2**-24 where s > 2**126, else 1
  float inv;  // 1 / (s * k), 1 where s is not > 0
};

// For m (max |m| = s).
ESGDM_HOST_DEVICE QuantBlock quant_block_m(float s) {
  QuantBlock b;
  b.live = s > 0.0f;
  b.k = s < kQuantTiny ? kQuantPrescale : (s > kQuantHuge ? 1.0f / kQuantPrescale : 1.0f);
  b.inv = 1.0f / (b.live ? s * b.k : 1.0f);
  return b;
}

// For D (max sqrt(D) = s, in [2**-74.5, 2**64] where positive and finite: no pre-scale).
ESGDM_HOST_DEVICE QuantBlock quant_block_d(float s) {
  QuantBlock b;
  b.live = s > 0.0f;
  b.k = 1.0f;
  b.inv = 1.0f / (b.live ? s : 1.0f);
  return b;
}

// The code of m in its block (quant_block_m of its max |m|):
// 128 + sign(m) * rint(127 * sqrt(sqrt((|m| * k) * inv))), 128 where the block is not live.
// kScaled: multiply by b.k (false only where the caller knows b.k == 1, which is exact).
template <bool kScaled = true>
ESGDM_HOST_DEVICE uint8_t encode_m(float m, const QuantBlock& b) {
  const float u = (kScaled ? esgdm_fabs(m) * b.k : esgdm_fabs(m)) * b.inv;
  const float q = b.live ? quant_rint(kQuantMLevels * esgdm_sqrt(esgdm_sqrt(u))) : 0.0f;
  // 128 + (-q) is 128 - q (IEEE defines x - y as x + (-y)): one addition, one conversion
  return static_cast<uint8_t>(static_cast<int32_t>(kQuantMZero + (m < 0.0f ? -q : q)));
}

// The code of D from r = sqrt(D), in its block (quant_block_d of its max sqrt(D)):
// rint(255 * sqrt(sqrt(r * inv))), at least 1 where D > 0, 0 where D == 0.
ESGDM_HOST_DEVICE uint8_t encode_root(float r, const QuantBlock& b) {
  const float u = r * b.inv;
  float c = quant_rint(kQuantDLevels * esgdm_sqrt(esgdm_sqrt(u)));
  c = c < 1.0f ? 1.0f : c;
  c = r > 0.0f ? c : 0.0f;  // r > 0 exactly where D > 0
  return static_cast<uint8_t>(static_cast<int32_t>(c));
}

// The bits of |x|: for values >= 0 their order is the order of the floats (NaN above
// inf), so a block's max |m| or max sqrt(D) is an integer max (which vectorises, and
// keeps a NaN as torch's amax does).
ESGDM_HOST_DEVICE uint32_t abs_bits(float x) {
  return float_bits(x) & 0x7FFFFFFFu;
}

}  // namespace esgdm
