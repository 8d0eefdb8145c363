// The "cpu" backend: esgdm::fused_step_ for CPU tensors, one pass over every tensor.
//
// The bucket's tensors are laid end to end in one global index space and cut into
// fixed-size chunks; the threads of ATen's intra-op pool take chunks from a shared
// counter, so a bucket of one 10M-element tensor and many 1-element ones keeps both
// cores busy, and a thread slowed down by a neighbour on a shared machine does not
// hold the others up.  Each chunk is a few straight loops over contiguous memory that
// the compiler vectorises (ESGDM_VEC_REPORT=1 shows gcc's report; see setup_ext.py),
// once for the baseline instruction set and once for AVX2 + FMA, chosen at run time.
// Parameters of any supported dtype are converted to float (double for float64) on
// load and rounded back on store; the state is float32 (float64).

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "esgdm_common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define ESGDM_X86_DISPATCH 1
#else
#define ESGDM_X86_DISPATCH 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define ESGDM_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ESGDM_ALWAYS_INLINE inline
#endif

namespace esgdm {

namespace {

// Whether the AVX2 + FMA loops run: the CPU has both and ATen uses AVX2 too (so
// ATEN_CPU_CAPABILITY=default turns them off here as it does in PyTorch).
bool use_avx2() {
#if ESGDM_X86_DISPATCH
  static const bool yes = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return false;
    const std::string aten = at::get_cpu_capability();
    return aten == "AVX2" || aten == "AVX512";
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace

const char* cpu_isa() {
#if ESGDM_X86_DISPATCH
  return use_avx2() ? "AVX2+FMA (chosen at run time; compiler auto-vectorised, 8 floats per instruction)"
                    : "x86-64 baseline SSE2 (this CPU or ATEN_CPU_CAPABILITY rules out AVX2; "
                      "compiler auto-vectorised, 4 floats per instruction)";
#elif defined(__aarch64__)
  return "AArch64 NEON (compiler auto-vectorised)";
#else
  return "generic (compiler auto-vectorised where possible)";
#endif
}

namespace {

// Elements per unit of work handed to a thread.  Large enough that the per-chunk
// bookkeeping is noise, small enough to balance two threads over a 1M-element tensor.
constexpr int64_t kChunk = 1 << 16;

// One tensor of the bucket, as raw pointers of the parameter type P and state type S.
template <typename P, typename S>
struct Segment {
  P* p;
  const P* g;
  S* m;
  S* d;
  const P* h;  // null on a plain step
  int64_t numel;
  Coeffs<S> c;
};

// The loop over n consecutive elements.  Restrict-qualified parameters tell the
// compiler that the streams do not overlap, so it vectorises without a runtime check.
// Which side of the lerp formula applies is fixed per tensor; kWSmall makes it a
// compile-time constant so that the loop body has no branch.  Always inlined into
// the wrappers below, which compile it for one instruction set each.
template <bool kDStep, bool kWSmall, typename P, typename S>
ESGDM_ALWAYS_INLINE void step_loop(P* __restrict__ p, const P* __restrict__ g,
                                   S* __restrict__ m, S* __restrict__ d,
                                   const P* __restrict__ h, int64_t n, Coeffs<S> c) {
  c.w_small = kWSmall;
  for (int64_t i = 0; i < n; ++i) {
    S pi = static_cast<S>(p[i]);
    S mi = m[i];
    S di = d[i];
    update<kDStep>(pi, static_cast<S>(g[i]), mi, di, kDStep ? static_cast<S>(h[i]) : S(0), c);
    p[i] = static_cast<P>(pi);
    m[i] = mi;
    if (kDStep) d[i] = di;
  }
}

// The loop for the instruction set the file is compiled for (x86-64: SSE2).
template <bool kDStep, bool kWSmall, typename P, typename S>
void step_loop_baseline(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m,
                        S* __restrict__ d, const P* __restrict__ h, int64_t n, Coeffs<S> c) {
  step_loop<kDStep, kWSmall>(p, g, m, d, h, n, c);
}

#if ESGDM_X86_DISPATCH
// The same loop compiled for AVX2 + FMA (8 floats per instruction), taken at run time
// on CPUs that have them.  Only this function is compiled for AVX2 (with the loop and
// the update, which are inlined into it); anything it calls out of line keeps its
// baseline code, so no AVX2 instruction can reach the baseline path.
template <bool kDStep, bool kWSmall, typename P, typename S>
__attribute__((target("avx2,fma"))) void step_loop_avx2(
    P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m, S* __restrict__ d,
    const P* __restrict__ h, int64_t n, Coeffs<S> c) {
  step_loop<kDStep, kWSmall>(p, g, m, d, h, n, c);
}
#endif

// Steps elements [lo, hi) of one tensor.
template <bool kDStep, typename P, typename S>
void step_range(const Segment<P, S>& t, int64_t lo, int64_t hi, bool avx2) {
  P* p = t.p + lo;
  const P* g = t.g + lo;
  S* m = t.m + lo;
  S* d = t.d + lo;
  const P* h = kDStep ? t.h + lo : nullptr;
  const int64_t n = hi - lo;
#if ESGDM_X86_DISPATCH
  if (avx2) {
    if (t.c.w_small) {
      step_loop_avx2<kDStep, true>(p, g, m, d, h, n, t.c);
    } else {
      step_loop_avx2<kDStep, false>(p, g, m, d, h, n, t.c);
    }
    return;
  }
#endif
  (void)avx2;
  if (t.c.w_small) {
    step_loop_baseline<kDStep, true>(p, g, m, d, h, n, t.c);
  } else {
    step_loop_baseline<kDStep, false>(p, g, m, d, h, n, t.c);
  }
}

// Steps the global index range [begin, end) of the concatenated tensors.
template <bool kDStep, typename P, typename S>
void step_global(const std::vector<Segment<P, S>>& segs, const std::vector<int64_t>& starts,
                 int64_t begin, int64_t end, bool avx2) {
  // Last tensor starting at or before `begin`.
  size_t k = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
  for (; k < segs.size() && starts[k] < end; ++k) {
    const int64_t lo = std::max(begin, starts[k]) - starts[k];
    const int64_t hi = std::min(end, starts[k] + segs[k].numel) - starts[k];
    if (lo < hi) step_range<kDStep>(segs[k], lo, hi, avx2);
  }
}

template <typename P>
void step_typed(const StepArgs& a) {
  using S = std::conditional_t<std::is_same<P, double>::value, double, float>;
  const at::Tensor table = a.scalars.contiguous();
  const double* rows = table.data_ptr<double>();

  std::vector<Segment<P, S>> segs;
  std::vector<int64_t> starts;
  segs.reserve(a.size());
  starts.reserve(a.size());
  int64_t total = 0;
  for (int64_t i = 0; i < a.size(); ++i) {
    const int64_t numel = a.params[i].numel();
    if (numel == 0) continue;  // nothing to do, and its data pointer may be null
    segs.push_back(Segment<P, S>{
        a.params[i].data_ptr<P>(),
        a.grads[i].data_ptr<P>(),
        a.exp_avgs[i].data_ptr<S>(),
        a.exp_avg_ds[i].data_ptr<S>(),
        a.d_step() ? (*a.hvps)[i].data_ptr<P>() : nullptr,
        numel,
        coeffs_for<S>(rows, i),
    });
    starts.push_back(total);
    total += numel;
  }
  if (total == 0) return;

  const bool avx2 = use_avx2();
  auto run = [&](int64_t begin, int64_t end) {
    if (a.d_step()) {
      step_global<true>(segs, starts, begin, end, avx2);
    } else {
      step_global<false>(segs, starts, begin, end, avx2);
    }
  };
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  const int64_t workers = std::min<int64_t>(chunks, at::get_num_threads());
  if (workers <= 1 || at::in_parallel_region()) {
    run(0, total);
    return;
  }
  // Dynamic schedule: each worker takes the next chunk until none are left.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      run(c * kChunk, std::min(total, (c + 1) * kChunk));
    }
  });
}

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_ds, c10::optional<at::TensorList> hvps,
                    const at::Tensor& scalars) {
  StepArgs a{params, grads, exp_avgs, exp_avg_ds, hvps, scalars};
  check_step_args(a, c10::DeviceType::CPU);
  if (a.size() == 0) return;
  switch (params[0].scalar_type()) {
    case at::kFloat:
      return step_typed<float>(a);
    case at::kDouble:
      return step_typed<double>(a);
    case at::kHalf:
      return step_typed<c10::Half>(a);
    case at::kBFloat16:
      return step_typed<c10::BFloat16>(a);
    default:
      TORCH_CHECK(false, "esgdm::fused_step_: unsupported parameter dtype ",
                  params[0].scalar_type());
  }
}

}  // namespace
}  // namespace esgdm

TORCH_LIBRARY_IMPL(esgdm, CPU, m) {
  m.impl("fused_step_", &esgdm::fused_step_cpu);
}
