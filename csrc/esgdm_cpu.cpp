// The "cpu" backend: esgdm._C.step for CPU tensors, one pass over every tensor.
//
// The per-tensor scalars are derived first (the tables are in CPU memory), as
// esgdm_update.h's derive/make_coeffs.  Then the bucket's tensors are laid end to end
// in one global index space and cut into fixed-size chunks; the threads of ATen's
// intra-op pool take chunks from a shared counter, so a bucket of one 10M-element
// tensor and many 1-element ones keeps every core busy, and a thread slowed down by a
// neighbour on a shared machine does not hold the others up.  Each chunk is a few
// straight loops over contiguous memory that the compiler vectorises (the rule's
// branches are selects; ESGDM_VEC_REPORT=1 shows gcc's report, see setup_ext.py), once
// for the baseline instruction set, once for AVX2 + FMA and once for AVX-512, chosen at
// run time.  Last,
// after the parallel region, the stepped tensors' rows of ``scalars`` are advanced.
//
// Parameters of any supported dtype are converted to float (double for float64) on
// load and rounded back on store (to nearest, or stochastically); the state is
// float32 or bfloat16 (float64 for float64 parameters), stored rounded to nearest, or
// 8-bit codes with a float32 scale per block of 256 elements (esgdm/quant.py; the
// "8-bit state" section below: there the unit of work is a whole block).

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "esgdm_common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define ESGDM_X86_DISPATCH 1
#else
#define ESGDM_X86_DISPATCH 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define ESGDM_ALWAYS_INLINE inline __attribute__((always_inline))
#define ESGDM_LAMBDA_ALWAYS_INLINE __attribute__((always_inline))
#else
#define ESGDM_ALWAYS_INLINE inline
#define ESGDM_LAMBDA_ALWAYS_INLINE
#endif

// Whether the baseline loop computes torch's lerp with one rounding, as torch's own
// baseline kernels do: not on x86-64 (SSE2 has no fma; torch's "default" capability
// rounds twice), yes on AArch64 (NEON's fused multiply-add).
#if ESGDM_X86_DISPATCH
#define ESGDM_BASELINE_FMA false
#elif defined(__aarch64__) || defined(__FMA__)
#define ESGDM_BASELINE_FMA true
#else
#define ESGDM_BASELINE_FMA false
#endif

namespace esgdm {

namespace {

// Whether the AVX2 + FMA loops run: the CPU has both and ATen uses AVX2 too (so
// ATEN_CPU_CAPABILITY=default turns them off here as it does in PyTorch, whose lerp
// then rounds twice, as our baseline loop does).
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

// Whether the loops run compiled for AVX-512 (F, BW, VL, DQ, 16 floats per instruction):
// on top of use_avx2(), the CPU has it and ATen uses AVX-512 too (ATEN_CPU_CAPABILITY=avx2
// turns it off).  The 8-bit step is compute-bound (decoding, encoding, the rule's
// divisions and square roots), and so are the float loops wherever memory keeps up (a
// division and a square root per element; with 16-bit parameters always); a 512-bit unit
// does twice as many per instruction.  Same IEEE operations in the same order as the AVX2
// loops (with FMA for torch's lerp), so the same bits (tests: test_quant_kernels.py and
// test_cpp_backend.py run both in one process and with ATEN_CPU_CAPABILITY=avx2).
bool use_avx512() {
#if ESGDM_X86_DISPATCH
  static const bool yes = [] {
    if (!use_avx2()) return false;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq")) {
      return false;
    }
    return at::get_cpu_capability() == "AVX512";
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace

const char* cpu_isa() {
#if ESGDM_X86_DISPATCH
  if (use_avx512()) {
    return "AVX-512 (chosen at run time; compiler auto-vectorised, 16 floats per instruction)";
  }
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

// Tensors per unit of work of the loops over tensors (their scalars).
constexpr int64_t kTensorGrain = 1024;

template <typename P>
using MathType = std::conditional_t<std::is_same<P, double>::value, double, float>;

template <typename P>
constexpr bool kIs16Bit = std::is_same<P, c10::Half>::value || std::is_same<P, c10::BFloat16>::value;

// One tensor of the bucket: raw pointers of the parameter type P and state type S,
// and its constants in the math type T.
template <typename P, typename S, typename T>
struct Segment {
  P* p;
  const P* g;
  S* m;
  S* d;
  const P* h;  // null on a plain step
  int64_t numel;
  Coeffs<T> c;
  uint32_t key;  // of its random numbers (stochastic rounding)
};

// The loop over the n consecutive elements [first, first + n) of one tensor.
// Restrict-qualified parameters tell the compiler that the streams do not overlap, so
// it vectorises without a runtime check.  Always inlined into the wrappers below,
// which compile it for one instruction set each.
template <bool kDStep, bool kSR, bool kFma, typename P, typename S, typename T>
ESGDM_ALWAYS_INLINE void step_loop(P* __restrict__ p, const P* __restrict__ g,
                                   S* __restrict__ m, S* __restrict__ d,
                                   const P* __restrict__ h, int64_t n, uint32_t first,
                                   const Coeffs<T> c, const T scale, const uint32_t key) {
  for (int64_t i = 0; i < n; ++i) {
    T pi = static_cast<T>(p[i]);
    T mi = static_cast<T>(m[i]);
    T di = static_cast<T>(d[i]);
    update<kDStep, kFma>(pi, static_cast<T>(g[i]), mi, di,
                         kDStep ? static_cast<T>(h[i]) : T(0), scale, c);
    if constexpr (kSR) {
      const uint32_t r = mix32(key ^ (first + static_cast<uint32_t>(i)));
      p[i] = static_cast<P>(stochastic_round<std::is_same<P, c10::BFloat16>::value>(pi, r));
    } else {
      p[i] = static_cast<P>(pi);
    }
    m[i] = static_cast<S>(mi);
    if (kDStep) d[i] = static_cast<S>(di);
  }
}

// The loop for the instruction set the file is compiled for (x86-64: SSE2).  kUnit:
// no grad_scale (scale 1), where the rule's g / scale (and h / scale) is g exactly: with
// the constant 1 the compiler drops those divisions, one of the three divisions and
// square roots per element that make the loop compute-bound on a CPU.
template <bool kDStep, bool kSR, bool kUnit, typename P, typename S, typename T>
void step_loop_baseline(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m,
                        S* __restrict__ d, const P* __restrict__ h, int64_t n, uint32_t first,
                        const Coeffs<T> c, const T scale, const uint32_t key) {
  step_loop<kDStep, kSR, ESGDM_BASELINE_FMA>(p, g, m, d, h, n, first, c, kUnit ? T(1) : scale, key);
}

#if ESGDM_X86_DISPATCH
// The same loop compiled for AVX2 + FMA (8 floats per instruction), taken at run time
// on CPUs that have them.  Only this function is compiled for AVX2 (with the loop and
// the update, which are inlined into it); anything it calls out of line keeps its
// baseline code, so no AVX2 instruction can reach the baseline path.
template <bool kDStep, bool kSR, bool kUnit, typename P, typename S, typename T>
__attribute__((target("avx2,fma"))) void step_loop_avx2(
    P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m, S* __restrict__ d,
    const P* __restrict__ h, int64_t n, uint32_t first, const Coeffs<T> c, const T scale,
    const uint32_t key) {
  step_loop<kDStep, kSR, true>(p, g, m, d, h, n, first, c, kUnit ? T(1) : scale, key);
}

// The same loop compiled for AVX-512 (use_avx512(): 16 floats per instruction, as the
// 8-bit loops): the same IEEE operations, so the same bits.  With fast memory the loop is
// bound by its division and square root per element, which a 512-bit unit does twice as
// many of per instruction.
template <bool kDStep, bool kSR, bool kUnit, typename P, typename S, typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")))
void step_loop_avx512(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m, S* __restrict__ d,
                      const P* __restrict__ h, int64_t n, uint32_t first, const Coeffs<T> c,
                      const T scale, const uint32_t key) {
  step_loop<kDStep, kSR, true>(p, g, m, d, h, n, first, c, kUnit ? T(1) : scale, key);
}
#endif

// Instruction sets of the CPU loops.
enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa loops_isa() {
  return use_avx512() ? Isa::kAvx512 : use_avx2() ? Isa::kAvx2 : Isa::kBaseline;
}

// Steps elements [lo, hi) of one tensor.
template <bool kDStep, bool kSR, typename P, typename S, typename T>
void step_range(const Segment<P, S, T>& t, int64_t lo, int64_t hi, T scale, Isa isa) {
  P* p = t.p + lo;
  const P* g = t.g + lo;
  S* m = t.m + lo;
  S* d = t.d + lo;
  const P* h = kDStep ? t.h + lo : nullptr;
  const int64_t n = hi - lo;
  const uint32_t first = static_cast<uint32_t>(static_cast<uint64_t>(lo));  // low 32 bits
  // kUnit: the loops compiled for scale 1 (no grad_scale), on the instruction set `isa`.
  auto run = [&](auto unit) {
    constexpr bool kUnit = decltype(unit)::value;
#if ESGDM_X86_DISPATCH
    if (isa == Isa::kAvx512) {
      step_loop_avx512<kDStep, kSR, kUnit>(p, g, m, d, h, n, first, t.c, scale, t.key);
      return;
    }
    if (isa == Isa::kAvx2) {
      step_loop_avx2<kDStep, kSR, kUnit>(p, g, m, d, h, n, first, t.c, scale, t.key);
      return;
    }
#endif
    (void)isa;
    step_loop_baseline<kDStep, kSR, kUnit>(p, g, m, d, h, n, first, t.c, scale, t.key);
  };
  if (scale == T(1)) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

// Calls f(k, lo, hi) for each tensor k that the global range [begin, end) of the
// concatenated tensors overlaps, [lo, hi) its part of that tensor.  starts: n + 1
// entries, tensor k is [starts[k], starts[k + 1]) (empty tensors included: they are
// skipped).  Units are elements, or blocks for the 8-bit state.
template <typename F>
ESGDM_ALWAYS_INLINE void for_segments(const std::vector<int64_t>& starts, int64_t begin, int64_t end,
                                      const F& f) {
  // Last tensor starting at or before `begin`.
  size_t k = std::upper_bound(starts.begin(), starts.end() - 1, begin) - starts.begin() - 1;
  for (; k + 1 < starts.size() && starts[k] < end; ++k) {
    const int64_t lo = std::max(begin, starts[k]) - starts[k];
    const int64_t hi = std::min(end, starts[k + 1]) - starts[k];
    if (lo < hi) f(k, lo, hi);
  }
}

// starts for for_segments: the running sum of each tensor's units (units(k)).
template <typename F>
std::vector<int64_t> running_starts(int64_t n, const F& units) {
  std::vector<int64_t> starts(static_cast<size_t>(n) + 1);
  int64_t total = 0;
  for (int64_t k = 0; k < n; ++k) {
    starts[k] = total;
    total += units(k);
  }
  starts[n] = total;
  return starts;
}

// Runs run(begin, end) over [0, total) cut into chunks of `chunk`, on ATen's threads:
// each worker takes the next chunk from a shared counter until none are left (a dynamic
// schedule, so a thread slowed down by a neighbour does not hold the others up).
template <typename F>
void for_each_chunk(int64_t total, int64_t chunk, const F& run) {
  const int64_t chunks = (total + chunk - 1) / chunk;
  const int64_t workers = std::min<int64_t>(chunks, at::get_num_threads());
  if (workers <= 1 || at::in_parallel_region()) {
    run(0, total);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      run(c * chunk, std::min(total, (c + 1) * chunk));
    }
  });
}

// Calls f(kDStep, kSR) with std::bool_constant arguments for the step's kind: a D-step
// or not, stochastic rounding or not (16-bit parameters only), so that each kind runs
// loops compiled for it.
template <typename P, typename F>
ESGDM_ALWAYS_INLINE void with_step_kind(bool d_step, bool sr, const F& f) {
  if constexpr (kIs16Bit<P>) {
    if (sr) {
      if (d_step) {
        f(std::true_type{}, std::true_type{});
      } else {
        f(std::false_type{}, std::true_type{});
      }
      return;
    }
  }
  if (d_step) {
    f(std::true_type{}, std::false_type{});
  } else {
    f(std::false_type{}, std::false_type{});
  }
}

// The tensors' constants of this step for one worker's chunk: tensor k's coefficients
// (make_coeffs of its Derived, computed again only where it differs from the previous
// tensor's: tensors stepped together since their first step share it) and the key of
// its random numbers (stochastic rounding only).
template <typename T, bool kSR>
class TensorConstants {
 public:
  TensorConstants(const StepArgs& a, const std::vector<Derived>& derived, uint32_t seed_mix)
      : derived_(derived), index_(a.index.data_ptr<int32_t>()), exact_(a.exact()), seed_mix_(seed_mix) {}

  const Coeffs<T>& coeffs(int64_t k) {
    if (last_ < 0 || std::memcmp(&derived_[last_], &derived_[k], sizeof(Derived)) != 0) {
      coeffs_ = make_coeffs<T>(derived_[k], exact_);
    }
    last_ = k;
    return coeffs_;
  }

  uint32_t key(int64_t k) const {
    return kSR ? rounding_key(seed_mix_, index_[2 * k], derived_[k].steps) : 0u;
  }

 private:
  const std::vector<Derived>& derived_;
  const int32_t* index_;
  bool exact_;
  uint32_t seed_mix_;
  int64_t last_ = -1;
  Coeffs<T> coeffs_{};
};

// The float-state step.  Each worker builds the segments of the tensors its chunk
// covers as it reaches them (pointers and coefficients): built up front, one thread
// wrote them while the others waited, a quarter of a step of 4096 small tensors.
template <typename P, typename S>
void step_typed(const StepArgs& a, const std::vector<Derived>& derived) {
  using T = MathType<P>;
  const uint32_t seed_mix = mix32(a.seed32());
  const bool sr = kIs16Bit<P> && a.stochastic_rounding();
  const TensorMemory mem(a);
  const std::vector<int64_t> starts = running_starts(a.size(), [&](int64_t k) { return mem.numel(k); });
  const int64_t total = starts.back();
  if (total == 0) return;

  // grad_scale as the math type (float32 -> float64 is exact for float64 parameters).
  const T scale = a.grad_scale.defined() ? static_cast<T>(*a.grad_scale.data_ptr<float>()) : T(1);
  const Isa isa = loops_isa();
  auto run = [&](int64_t begin, int64_t end) {
    with_step_kind<P>(a.d_step, sr, [&](auto d_step, auto rounding) {
      constexpr bool kDStep = decltype(d_step)::value;
      constexpr bool kSR = decltype(rounding)::value;
      TensorConstants<T, kSR> constants(a, derived, seed_mix);
      for_segments(starts, begin, end, [&](int64_t k, int64_t lo, int64_t hi) {
        const Segment<P, S, T> seg{
            static_cast<P*>(mem.param(k)),
            static_cast<const P*>(mem.grad(k)),
            static_cast<S*>(mem.exp_avg(k)),
            static_cast<S*>(mem.exp_avg_d(k)),
            kDStep ? static_cast<const P*>(mem.hvp(k)) : nullptr,
            starts[k + 1] - starts[k],
            constants.coeffs(k),
            constants.key(k),
        };
        step_range<kDStep, kSR>(seg, lo, hi, scale, isa);
      });
    });
  };
  for_each_chunk(total, kChunk, run);
}

// ------------------------------------------------------------------ 8-bit state
//
// uint8 m and D with a float32 scale per block of kQuantBlock elements (esgdm/quant.py;
// the codes are esgdm_update.h's decode_*/encode_*).  The unit of work is a block: the
// bucket's blocks are numbered one after the other across tensors and cut into chunks of
// kChunk / kQuantBlock blocks, so every block is stepped by one thread, in one pass:
// decode its m and D into stack buffers, run update() on each element (the rule,
// unchanged), keep the new m (and sqrt(D) on a D-step) there while taking the block's
// max, then encode against the new scale (one division per block, quant_block_m/_d).  A
// plain step reads the D codes and scale and writes neither.  The step is compute-bound
// (it moves 15-20 bytes per element, against 24-32 with float32 state), so its loops
// also come compiled for AVX-512 (use_avx512()), and in a copy without grad_scale, where
// the rule's divisions by the scale are divisions by the constant 1.

constexpr int64_t kChunkBlocks = kChunk / kQuantBlock;

template <typename P>
struct Segment8 {
  P* p;
  const P* g;
  uint8_t* m;
  uint8_t* d;
  const P* h;  // null on a plain step
  float* qs;   // [nblocks, 2]: max |m|, max sqrt(D)
  int64_t numel;
  int64_t nblocks;
  Coeffs<float> c;
  uint32_t key;
};

// One block of n <= kQuantBlock elements; `first` is the index of its first element in
// its tensor (low 32 bits, for the random numbers); mv and dv are scratch.  Decoding,
// the update and encoding are separate loops through mv and dv (1 KiB each, in L1): a
// loop that reads or writes the codes is vectorised 32 elements at a time (the byte
// type decides), which in one fused loop kept four vectors of every quantity of the
// update live and spilled most of them to the stack (6-9% slower on a plain step, AVX2
// and AVX-512, on a Zen 5 EPYC); the update's loop runs on floats.
template <bool kDStep, bool kSR, bool kFma, typename P>
ESGDM_ALWAYS_INLINE void step_block8(P* __restrict__ p, const P* __restrict__ g,
                                     uint8_t* __restrict__ mc, uint8_t* __restrict__ dc,
                                     const P* __restrict__ h, float* __restrict__ qs, int n,
                                     uint32_t first, const Coeffs<float> c, const float scale,
                                     const uint32_t key, float* __restrict__ mv,
                                     float* __restrict__ dv) {
  const float m_scale = qs[kQuantMScale];
  const float d_scale = qs[kQuantDScale];
  for (int i = 0; i < n; ++i) mv[i] = decode_m(mc[i], m_scale);
  for (int i = 0; i < n; ++i) dv[i] = decode_d(dc[i], d_scale);
  for (int i = 0; i < n; ++i) {
    float pi = static_cast<float>(p[i]);
    float mi = mv[i];
    float di = dv[i];
    update<kDStep, kFma>(pi, static_cast<float>(g[i]), mi, di,
                         kDStep ? static_cast<float>(h[i]) : 0.0f, scale, c);
    if constexpr (kSR) {
      const uint32_t r = mix32(key ^ (first + static_cast<uint32_t>(i)));
      p[i] = static_cast<P>(stochastic_round<std::is_same<P, c10::BFloat16>::value>(pi, r));
    } else {
      p[i] = static_cast<P>(pi);
    }
    mv[i] = mi;
    if (kDStep) dv[i] = esgdm_sqrt(di);  // r = sqrt(D), what D's code is of
  }
  uint32_t m_max = 0;
  for (int i = 0; i < n; ++i) m_max = std::max(m_max, abs_bits(mv[i]));
  const float m_new = bits_float(m_max);
  const QuantBlock bm = quant_block_m(m_new);  // the block's one division
  if (bm.k == 1.0f) {  // a scale in [2**-126, 2**126]: |m| * k is |m|, not worth a multiplication
    for (int i = 0; i < n; ++i) mc[i] = encode_m<false>(mv[i], bm);
  } else {
    for (int i = 0; i < n; ++i) mc[i] = encode_m(mv[i], bm);
  }
  qs[kQuantMScale] = m_new;
  if (kDStep) {
    uint32_t r_max = 0;
    for (int i = 0; i < n; ++i) r_max = std::max(r_max, abs_bits(dv[i]));
    const float d_new = bits_float(r_max);
    const QuantBlock bd = quant_block_d(d_new);
    for (int i = 0; i < n; ++i) dc[i] = encode_root(dv[i], bd);
    qs[kQuantDScale] = d_new;
  }
}

// Blocks [b_lo, b_hi) of one tensor.
template <bool kDStep, bool kSR, bool kFma, typename P>
ESGDM_ALWAYS_INLINE void step_blocks8(const Segment8<P>& t, int64_t b_lo, int64_t b_hi,
                                      float scale) {
  alignas(64) float mv[kQuantBlock];
  alignas(64) float dv[kQuantBlock];
  auto blocks = [&](const float s) ESGDM_LAMBDA_ALWAYS_INLINE {
    for (int64_t b = b_lo; b < b_hi; ++b) {
      const int64_t start = b * kQuantBlock;
      const int n = static_cast<int>(std::min<int64_t>(kQuantBlock, t.numel - start));
      step_block8<kDStep, kSR, kFma>(t.p + start, t.g + start, t.m + start, t.d + start,
                                     kDStep ? t.h + start : nullptr, t.qs + 2 * b, n,
                                     static_cast<uint32_t>(static_cast<uint64_t>(start)), t.c,
                                     s, t.key, mv, dv);
    }
  };
  // Without grad_scale (scale 1) the rule's g / scale (and h / scale) is g exactly: a
  // copy of the loops with the constant 1 lets the compiler drop those divisions.
  if (scale == 1.0f) {
    blocks(1.0f);
  } else {
    blocks(scale);
  }
}

template <bool kDStep, bool kSR, typename P>
void step_blocks8_baseline(const Segment8<P>& t, int64_t b_lo, int64_t b_hi, float scale) {
  step_blocks8<kDStep, kSR, ESGDM_BASELINE_FMA>(t, b_lo, b_hi, scale);
}

#if ESGDM_X86_DISPATCH
// Compiled for AVX2 + FMA, as step_loop_avx2.
template <bool kDStep, bool kSR, typename P>
__attribute__((target("avx2,fma"))) void step_blocks8_avx2(const Segment8<P>& t, int64_t b_lo,
                                                           int64_t b_hi, float scale) {
  step_blocks8<kDStep, kSR, true>(t, b_lo, b_hi, scale);
}

// Compiled for AVX-512 (use_avx512()), with 512-bit vectors preferred (GCC's default
// tuning keeps auto-vectorised loops at 256 bits).
template <bool kDStep, bool kSR, typename P>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")))
void step_blocks8_avx512(const Segment8<P>& t, int64_t b_lo, int64_t b_hi, float scale) {
  step_blocks8<kDStep, kSR, true>(t, b_lo, b_hi, scale);
}
#endif


// Blocks [b_lo, b_hi) of one tensor, with the loops of the instruction set `isa`.
template <bool kDStep, bool kSR, typename P>
ESGDM_ALWAYS_INLINE void step_blocks8_on(const Segment8<P>& t, int64_t b_lo, int64_t b_hi, float scale,
                                         Isa isa) {
#if ESGDM_X86_DISPATCH
  if (isa == Isa::kAvx512) {
    step_blocks8_avx512<kDStep, kSR>(t, b_lo, b_hi, scale);
    return;
  }
  if (isa == Isa::kAvx2) {
    step_blocks8_avx2<kDStep, kSR>(t, b_lo, b_hi, scale);
    return;
  }
#endif
  (void)isa;
  step_blocks8_baseline<kDStep, kSR>(t, b_lo, b_hi, scale);
}

// The 8-bit step: as step_typed, with blocks as the unit of work.
template <typename P>
void step_typed8(const StepArgs& a, const std::vector<Derived>& derived) {
  const uint32_t seed_mix = mix32(a.seed32());
  const bool sr = kIs16Bit<P> && a.stochastic_rounding();
  const TensorMemory mem(a);
  const std::vector<int64_t> starts = running_starts(  // in blocks
      a.size(), [&](int64_t k) { return (mem.numel(k) + kQuantBlock - 1) / kQuantBlock; });
  const int64_t total = starts.back();
  if (total == 0) return;

  const float scale = a.grad_scale.defined() ? *a.grad_scale.data_ptr<float>() : 1.0f;
  const Isa isa = loops_isa();
  auto run = [&](int64_t begin, int64_t end) {
    with_step_kind<P>(a.d_step, sr, [&](auto d_step, auto rounding) {
      constexpr bool kDStep = decltype(d_step)::value;
      constexpr bool kSR = decltype(rounding)::value;
      TensorConstants<float, kSR> constants(a, derived, seed_mix);
      for_segments(starts, begin, end, [&](int64_t k, int64_t lo, int64_t hi) {
        const Segment8<P> seg{
            static_cast<P*>(mem.param(k)),
            static_cast<const P*>(mem.grad(k)),
            static_cast<uint8_t*>(mem.exp_avg(k)),
            static_cast<uint8_t*>(mem.exp_avg_d(k)),
            kDStep ? static_cast<const P*>(mem.hvp(k)) : nullptr,
            static_cast<float*>(mem.qscale(k)),
            mem.numel(k),
            starts[k + 1] - starts[k],
            constants.coeffs(k),
            constants.key(k),
        };
        step_blocks8_on<kDStep, kSR>(seg, lo, hi, scale, isa);
      });
    });
  };
  for_each_chunk(total, kChunkBlocks, run);
}

template <typename P>
void step_param(const StepArgs& a, const std::vector<Derived>& derived) {
  const at::ScalarType state = a.state_dtype;
  if constexpr (std::is_same<P, double>::value) {
    TORCH_CHECK(state == at::kDouble, "esgdm._C.step: state of float64 parameters must be float64, got ", state);
    step_typed<double, double>(a, derived);
  } else {
    if (state == at::kFloat) {
      step_typed<P, float>(a, derived);
    } else if (state == at::kByte) {
      step_typed8<P>(a, derived);
    } else {
      TORCH_CHECK(state == at::kBFloat16, "esgdm._C.step: state must be float32, bfloat16 or uint8, got ", state);
      step_typed<P, c10::BFloat16>(a, derived);
    }
  }
}

}  // namespace

void step_cpu(const StepArgs& a) {
  const int64_t n = a.size();
  if (n == 0) return;
  if (a.found_inf.defined() && *a.found_inf.data_ptr<float>() != 0.0f) {
    return;  // the step did not happen: nothing is written, scalars included
  }
  const double* scalars = a.scalars.data_ptr<double>();
  const int32_t* index = a.index.data_ptr<int32_t>();
  const double* hparams = a.hparams.data_ptr<double>();
  const int64_t n_slots = a.scalars.size(0);
  const int64_t n_groups = a.hparams.size(0);

  // Every tensor's scalars from the old rows, before anything is written (on ATen's
  // threads, as the write-back below: at thousands of small tensors, serial loops over
  // the tensors cost as much as the update).
  std::vector<Derived> derived(static_cast<size_t>(n));
  at::parallel_for(0, n, kTensorGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int32_t slot = index[2 * i];
      const int32_t group = index[2 * i + 1];
      TORCH_CHECK(slot >= 0 && slot < n_slots, "esgdm._C.step: index[", i, ", 0] = ", slot,
                  " is not a row of scalars (", n_slots, " rows)");
      TORCH_CHECK(group >= 0 && group < n_groups, "esgdm._C.step: index[", i, ", 1] = ", group,
                  " is not a row of hparams (", n_groups, " rows)");
      derived[i] = derive(scalars + slot * kNumScalarColumns, hparams + group * kNumHparamColumns,
                          a.d_step);
    }
  });

  switch (a.params[0].scalar_type()) {
    case at::kFloat:
      step_param<float>(a, derived);
      break;
    case at::kDouble:
      step_param<double>(a, derived);
      break;
    case at::kHalf:
      step_param<c10::Half>(a, derived);
      break;
    case at::kBFloat16:
      step_param<c10::BFloat16>(a, derived);
      break;
    default:
      TORCH_CHECK(false, "esgdm._C.step: unsupported parameter dtype ", a.params[0].scalar_type());
  }

  // Advance the stepped tensors' rows (not dscale), after the update.
  double* rows = a.scalars.data_ptr<double>();
  at::parallel_for(0, n, kTensorGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      double* row = rows + index[2 * i] * kNumScalarColumns;
      row[kBias] = derived[i].bias;
      row[kWarm] = derived[i].warm;
      row[kSteps] = derived[i].steps;
    }
  });
}

}  // namespace esgdm
