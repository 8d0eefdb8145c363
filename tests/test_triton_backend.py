"""The fused Triton kernel against esgdm.rule.reference_step (the readable reference).

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 before anything imports the kernel).  The GPU twins (marked ``gpu``)
run the same comparisons on CUDA, plus a bucket of more than 2**31 elements.

Every comparison starts the kernel and the reference from the same state and checks
one call.  Tolerances:

* float32 values: within 1e-6 relative to the magnitude of the terms that produced them
  (|p| + |p - p_new| for p, |m| + |g| for m, |D| for D);
* bfloat16/float16 values (parameters rounded to nearest, bfloat16 state): within one
  unit in the last place of their dtype (the two may round float32 values that differ in
  their last bit);
* stochastically rounded parameters: bit for bit where the kernel's float32 value before
  rounding equals the reference's (the kernel's float32 values come from the same call on
  float32 copies of the parameters), and always bit for bit equal to rounding the
  kernel's own float32 values with the rule's random bits;
* non-finite values: the same NaN/Inf at the same places;
* the ``bias, warm, steps`` columns of ``scalars``: exactly (both compute them in
  float64); ``dscale`` and every row not stepped: untouched by the kernel.
"""

from __future__ import annotations

import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import numpy as np  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from helpers import clone_fields  # noqa: E402

from esgdm import rule  # noqa: E402
from esgdm.kernels import esgdm_step as K  # noqa: E402

# CPU runs need the interpreter; on a GPU machine the kernel is compiled instead.
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not K.INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before the kernels are imported")),
    pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda]),
]
P_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
S_DTYPES = [torch.float32, torch.bfloat16]
HALF = [torch.bfloat16, torch.float16]
# Around the test block (32): empty, one element, odd, a full block, full blocks + tails.
SIZES = [0, 1, 3, 32, 33, 70]
BLOCK = 32
SR = rule.FLAG_STOCHASTIC_ROUNDING
EXACT = rule.FLAG_EXACT
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


# ----------------------------------------------------------------- helpers

class Case:
    """One bucket: the op's arguments, on ``device``."""

    def __init__(self, sizes, p_dtype=torch.float32, s_dtype=torch.float32, d_step=True,
                 device="cpu", seed=0, shapes=None, n_groups=3, dscale=(0.0, 0.3),
                 zero_d=True):
        gen = torch.Generator().manual_seed(seed)
        n = len(sizes)
        shapes = shapes or [(k,) for k in sizes]

        def rnd(shape, scale=1.0):
            return torch.randn(shape, generator=gen, dtype=torch.float64) * scale

        def dense(shape, values):  # (shape) or a transposed layout given as ("T", rows, cols)
            if shape[0] == "T":
                return values.reshape(shape[2], shape[1]).t()
            return values.reshape(shape)

        numels = [(s[1] * s[2] if s[0] == "T" else int(torch.Size(s).numel())) for s in shapes]

        def make(scale, dtype, positive=False):
            out = []
            for s, k in zip(shapes, numels):
                v = rnd(k, scale)
                v = v.abs() if positive else v
                out.append(dense(s, v.to(dtype)).to(device))
            return out

        self.params = make(1.0, p_dtype)
        self.grads = make(1.0, p_dtype)
        self.exp_avgs = make(0.3, s_dtype)
        self.exp_avg_ds = make(1.0, s_dtype, positive=True)
        self.hvps = make(2.0, p_dtype) if d_step else None
        if zero_d:  # curvature never observed: D == 0 (and h == 0, so it stays 0)
            for i, d in enumerate(self.exp_avg_ds):
                d.as_strided((d.numel(),), (1,), d.storage_offset())[::3] = 0  # memory order
                if i % 3 == 2:
                    d.zero_()
                if self.hvps is not None:
                    h = self.hvps[i]
                    h.masked_fill_(d == 0, 0.0)
        # more slots than tensors, in another order: the kernel must go through index
        n_slots = n + 3
        perm = torch.randperm(n_slots, generator=gen)[:n]
        k = torch.randint(0, 20, (n_slots,), generator=gen).double()
        sc = torch.empty(n_slots, 4, dtype=torch.float64)
        sc[:, rule.BIAS] = 0.9 ** k
        sc[:, rule.WARM] = 0.8 ** (k / 2).floor()
        sc[:, rule.STEPS] = k
        sc[:, rule.DSCALE] = torch.tensor([dscale[i % len(dscale)] for i in range(n_slots)],
                                          dtype=torch.float64)
        self.scalars = sc.to(device)
        self.index = torch.stack([perm, torch.arange(n) % n_groups], 1).to(torch.int32).to(device)
        u = torch.rand(n_groups, 6, generator=gen, dtype=torch.float64)
        hp = torch.empty(n_groups, 6, dtype=torch.float64)
        hp[:, rule.LR] = 0.01 + 0.2 * u[:, 0]
        hp[:, rule.BETA1] = torch.tensor([0.9, 0.3, 0.99][:n_groups] + [0.5] * max(0, n_groups - 3))
        hp[:, rule.BETA2] = 0.99 + 0.009 * u[:, 2]
        hp[:, rule.LR_WARMUP] = 0.5 + 0.4 * u[:, 3]
        hp[:, rule.EPS] = 10 ** (-2 - 4 * u[:, 4])
        hp[:, rule.WEIGHT_DECAY] = torch.where(u[:, 5] < 0.3, torch.zeros_like(u[:, 5]), 0.05 * u[:, 5])
        self.hparams = hp.to(device)
        self.grad_scale = None
        self.found_inf = None

    def lists(self):
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_ds, self.hvps)

    def clone(self) -> Case:
        return clone_fields(self)

    def args(self, flags=0, seed=0):
        return (*self.lists(), self.scalars, self.index, self.hparams, self.grad_scale,
                self.found_inf, flags, seed)

    def with_params(self, dtype) -> Case:
        """A copy whose parameters (and g, h) are ``dtype`` copies of these."""
        other = self.clone()
        other.params = [t.to(dtype) for t in self.params]
        other.grads = [t.to(dtype) for t in self.grads]
        if self.hvps is not None:
            other.hvps = [t.to(dtype) for t in self.hvps]
        return other


def run_kernel(case: Case, flags=0, seed=0, **kw) -> Case:
    K.fused_step(*case.args(flags, seed), **kw)
    return case


def run_reference(case: Case, flags=0, seed=0) -> Case:
    """reference_step, with the dscale column put back: the op refreshes it after the
    kernel, the kernel itself must leave it alone."""
    old = case.scalars[:, rule.DSCALE].clone()
    rule.reference_step(*case.args(flags, seed))
    case.scalars[:, rule.DSCALE] = old
    return case


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64)."""
    x = x.double().abs()
    _, e = torch.frexp(x)
    e = torch.clamp(e - 1, min=MIN_EXP[dtype])
    return torch.pow(2.0, (e - MANTISSA[dtype]).double())


def assert_close(out, ref, dtype, scale, what):
    """``out`` equals ``ref`` within the module docstring's tolerance for ``dtype``."""
    out, ref = out.cpu().double(), ref.cpu().double()
    nan_o, nan_r = out.isnan(), ref.isnan()
    assert torch.equal(nan_o, nan_r), f"{what}: NaN at different places"
    inf_r = ref.isinf()
    assert torch.equal(out.isinf(), inf_r) and torch.equal(out[inf_r], ref[inf_r]), f"{what}: Inf differ"
    fin = ~(nan_r | inf_r)
    o, r = out[fin], ref[fin]
    if dtype == torch.float32:
        tol = 1e-6 * scale.cpu().double()[fin] + 1e-30
    else:
        tol = ulp(r, dtype)
    err = (o - r).abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {r.numel()} beyond tolerance, max error "
                           f"{err.max().item():.3g} (tol {tol[err.argmax()].item():.3g}) at {int(err.argmax())}")


def compare(case0: Case, out: Case, ref: Case, flags=0):
    """Asserts ``out`` (kernel) matches ``ref`` (reference), both stepped from ``case0``."""
    p_dtype = case0.params[0].dtype if case0.params else torch.float32
    s_dtype = case0.exp_avgs[0].dtype if case0.exp_avgs else torch.float32
    S = 1.0 if case0.grad_scale is None else case0.grad_scale.item()
    for i in range(len(case0.params)):
        p0 = case0.params[i].double()
        scale_p = p0.abs() + (p0 - ref.params[i].double()).abs()
        if not (flags & SR and p_dtype != torch.float32):
            assert_close(out.params[i], ref.params[i], p_dtype, scale_p, f"p[{i}]")
        g = (case0.grads[i].double() / S).nan_to_num(0.0, 0.0, 0.0)
        assert_close(out.exp_avgs[i], ref.exp_avgs[i], s_dtype,
                     case0.exp_avgs[i].double().abs() + g.abs(), f"m[{i}]")
        assert_close(out.exp_avg_ds[i], ref.exp_avg_ds[i], s_dtype,
                     ref.exp_avg_ds[i].double().abs(), f"D[{i}]")
        if case0.hvps is None:
            assert torch.equal(out.exp_avg_ds[i], case0.exp_avg_ds[i]), "a plain step wrote D"
    assert torch.equal(out.scalars.cpu(), ref.scalars.cpu()), (
        f"scalars differ:\n{out.scalars.cpu()}\nreference:\n{ref.scalars.cpu()}")


def step_and_compare(case: Case, flags=0, seed=0, **kw):
    """One kernel call and one reference call from ``case``; returns the kernel's result."""
    out = run_kernel(case.clone(), flags, seed, **kw)
    ref = run_reference(case.clone(), flags, seed)
    compare(case, out, ref, flags)
    return out, ref


def tickets_clear():
    """Every ticket counter of every cached bucket is back to zero."""
    for entry in K._ADDRESSES.values():
        assert int(entry.tickets.abs().sum()) == 0, entry.tickets


# ------------------------------------------------------------- the kernel

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p_dtype", P_DTYPES, ids=str)
@pytest.mark.parametrize("s_dtype", S_DTYPES, ids=lambda d: "state_" + str(d))
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
@pytest.mark.parametrize("flags", [0, EXACT], ids=["default", "exact"])
def test_matches_reference(device, p_dtype, s_dtype, d_step, flags):
    """Every dtype pair and step kind: fast path (full aligned blocks of 32), masked tails,
    empty and one-element tensors, three groups, D == 0 with dscale 0 and > 0."""
    case = Case(SIZES, p_dtype, s_dtype, d_step, device, seed=2 * P_DTYPES.index(p_dtype) + S_DTYPES.index(s_dtype))
    out, _ = step_and_compare(case, flags, block=BLOCK)
    tickets_clear()
    if not flags & EXACT:
        # where D == 0 and dscale == 0 the step is pure decay; where dscale > 0 it moves
        assert any(bool((d == 0).any()) for d in out.exp_avg_ds)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
def test_two_calls_advance_scalars(device, d_step):
    """Two consecutive calls on one bucket: the tickets are reset by the first, so the
    second advances every tensor's scalars again (tensors of 1 to 4 programs)."""
    case = Case([5, 64, 65, 0, 128], d_step=d_step, device=device, seed=3)
    steps0 = case.scalars[:, rule.STEPS].clone()
    out, ref = case, case.clone()
    for _ in range(2):
        before = out.clone()
        run_kernel(out, block=BLOCK)
        run_reference(ref)
        compare(before, out, ref)
        ref = out.clone()  # the next call from the kernel's state
        tickets_clear()
    slots = case.index[:, 0].long()
    assert torch.equal(out.scalars[slots, rule.STEPS], steps0[slots] + 2)
    others = torch.ones(case.scalars.shape[0], dtype=torch.bool, device=device)
    others[slots] = False
    assert torch.equal(out.scalars[others], case.scalars[others])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_configs(device, p_dtype):
    """The production configurations: CONFIGS for a bucket with large tensors (tensors of
    several programs), SMALL_CONFIG for a bucket of small ones."""
    K.clear_caches()
    config = K.CONFIGS[p_dtype]
    large = [3, 8 * config["BLOCK"] + 100, 16 * config["BLOCK"] + 33]
    small = [300, 5, 256, 700, 1, 200]
    for sizes, want in ((large, config), (small, K.SMALL_CONFIG)):
        assert K.choose_config(sizes, p_dtype) == want
        case = Case(sizes, p_dtype, d_step=True, device=device, seed=4, n_groups=2)
        out, _ = step_and_compare(case, SR)
        entry = list(K._ADDRESSES.values())[-1]
        assert (entry.block, entry.num_warps) == (want["BLOCK"], want["num_warps"])
        tickets_clear()


def test_choose_config():
    for dtype, config in K.CONFIGS.items():
        assert K.choose_config([2**20] * 3, dtype) == config
        assert K.choose_config([256] * 4096, dtype) == K.SMALL_CONFIG
        assert K.choose_config([], dtype) == config
    assert K.lanes([0, 1, 256, 257], 256) == (1 + 1 + 1 + 2) * 256


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transposed_layout(device, p_dtype):
    """Dense but not contiguous: element k of the kernel is memory offset k."""
    shapes = [("T", 7, 5), ("T", 9, 12), (4, 3)]
    case = Case([35, 108, 12], p_dtype, d_step=True, device=device, seed=5, shapes=shapes)
    assert not case.params[0].is_contiguous()
    step_and_compare(case, block=BLOCK)
    step_and_compare(case, SR, seed=77, block=BLOCK)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
def test_grad_scale(device, d_step):
    case = Case(SIZES, torch.float32, d_step=d_step, device=device, seed=6)
    case.grad_scale = torch.tensor([1024.0], device=device)
    for t in case.grads + (case.hvps or []):
        t.mul_(1024.0)
    step_and_compare(case, block=BLOCK)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [1.0, float("inf"), float("nan")], ids=["one", "inf", "nan"])
def test_found_inf_writes_nothing(device, value):
    case = Case(SIZES, torch.bfloat16, torch.bfloat16, d_step=True, device=device, seed=7)
    case.grad_scale = torch.tensor([2.0], device=device)
    case.found_inf = torch.tensor([value], device=device)
    out = run_kernel(case.clone(), EXACT | SR, seed=1, block=BLOCK)
    for a, b in zip(case.params + case.exp_avgs + case.exp_avg_ds, out.params + out.exp_avgs + out.exp_avg_ds):
        assert torch.equal(a, b)
    assert torch.equal(out.scalars, case.scalars)
    tickets_clear()
    # and with found_inf zero the same call steps
    case.found_inf = torch.zeros(1, device=device)
    out, _ = step_and_compare(case, EXACT, block=BLOCK)
    assert not torch.equal(out.scalars, case.scalars)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.float16], ids=str)
def test_nonfinite_gradients_and_hvps(device, p_dtype):
    """NaN/Inf in g: the element is left alone; in h: the observation is dropped; also
    g finite but g / grad_scale overflowing, and h * h overflowing."""
    case = Case([40, 7, 1], p_dtype, d_step=True, device=device, seed=8)
    g, h = case.grads, case.hvps
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=p_dtype, device=device)
    g[0][[0, 5, 33]] = bad
    h[0][[1, 5, 34]] = bad
    h[1][2] = float("nan")
    g[2][0] = float("inf")
    if p_dtype == torch.float32:
        h[0][10] = 3e20  # h * h overflows float32: D becomes inf, a finite observation
    case.grad_scale = torch.tensor([0.5], device=device)
    for flags in (0, EXACT):
        out, _ = step_and_compare(case, flags, block=BLOCK)
        for i in (0, 5, 33):  # untouched
            assert out.params[0][i] == case.params[0][i] and out.exp_avgs[0][i] == case.exp_avgs[0][i]
            assert out.exp_avg_ds[0][i] == case.exp_avg_ds[0][i]
        assert out.params[2][0] == case.params[2][0]
        assert torch.isfinite(out.exp_avg_ds[0][[1, 34]]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
def test_unseen_curvature_rule(device, d_step):
    """D == 0 everywhere in some tensors and in some elements of others, dscale 0 and > 0:
    default moves them by mhat / (dscale + eps) or not at all; EXACT divides by eps."""
    case = Case([12, 12, 12, 12], d_step=d_step, device=device, seed=9, n_groups=1, zero_d=False)
    case.scalars[case.index[:, 0].long(), rule.DSCALE] = torch.tensor(
        [0.0, 0.25, 0.0, 2.0], dtype=torch.float64, device=device)
    for i, d in enumerate(case.exp_avg_ds):
        d[: 6 if i < 2 else 12] = 0
        if case.hvps is not None:
            case.hvps[i][: 6 if i < 2 else 12] = 0
    for flags in (0, EXACT):
        step_and_compare(case, flags, block=8)


# ------------------------------------------------------- stochastic rounding

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p_dtype", HALF, ids=str)
@pytest.mark.parametrize("s_dtype", S_DTYPES, ids=lambda d: "state_" + str(d))
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
def test_stochastic_rounding_bits(device, p_dtype, s_dtype, d_step):
    seed = 2**40 + 12345  # only the low 32 bits count
    case = Case(SIZES + [100], p_dtype, s_dtype, d_step, device, seed=10)
    case.params[-1].mul_(1e-5)  # fp16 subnormals
    out, ref = step_and_compare(case, SR, seed, block=BLOCK)
    # the kernel's float32 values before rounding: the same call on float32 copies
    x_kernel = run_kernel(case.with_params(torch.float32), 0, block=BLOCK).params
    x_ref = run_reference(case.with_params(torch.float32), 0).params
    agree = total = 0
    for i, p in enumerate(case.params):
        if p.numel() == 0:
            continue
        slot, steps = int(case.index[i, 0]), int(out.scalars[case.index[i, 0].long(), rule.STEPS])
        r = rule.random_bits(seed, slot, steps, p.numel(), device)
        mine = rule.stochastic_round(x_kernel[i].reshape(-1), p_dtype, r).reshape(p.shape)
        assert torch.equal(out.params[i].view(torch.int16), mine.view(torch.int16)), f"p[{i}] vs own x"
        same = x_kernel[i] == x_ref[i]
        assert torch.equal(out.params[i][same].view(torch.int16), ref.params[i][same].view(torch.int16)), i
        agree += int(same.sum())
        total += p.numel()
    assert agree >= 0.8 * total, f"float32 values agree on only {agree} of {total} elements"
    # SR actually randomises: some parameters round away from the nearest value
    nearest = [x.to(p_dtype) for x in x_kernel]
    assert any(not torch.equal(a, b) for a, b in zip(out.params, nearest))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p_dtype", HALF, ids=str)
def test_stochastic_rounding_unbiased(device, p_dtype):
    """4096 equal elements: each rounds to one of the two neighbours of the float32
    result, and their mean is the float32 result within 4 standard errors."""
    n = 4096
    case = Case([n], p_dtype, d_step=False, device=device, seed=11, n_groups=1, zero_d=False)
    case.params[0].fill_(1.0)
    case.grads[0].fill_(0.37)
    case.exp_avgs[0].fill_(0.21)
    case.exp_avg_ds[0].fill_(0.5)
    x = run_kernel(case.with_params(torch.float32), 0).params[0].double()
    assert (x == x[0]).all()
    x = x[0].item()
    lo = torch.tensor(x, dtype=torch.float64).to(p_dtype).double().item()
    step = ulp(torch.tensor(x), p_dtype).item()
    lo = lo if lo <= x else lo - step
    hi = lo + step
    assert lo < x < hi, (lo, x, hi)
    out = run_kernel(case.clone(), SR, seed=5).params[0].double()
    assert set(out.unique().tolist()) <= {lo, hi}
    frac = (x - lo) / step
    mean = out.mean().item()
    se = step * (frac * (1 - frac) / n) ** 0.5
    assert abs(mean - x) <= 4 * se, (mean, x, se)


def test_mix32_in_triton_matches_rule():
    """The kernel's hash is the rule's, through the fp16 path on its own (interpreter
    or GPU): covered by test_stochastic_rounding_bits; here the rule's own constants."""
    x = torch.tensor([0, 1, 2**31, 2**32 - 1, 123456789], dtype=torch.int64)
    assert rule.mix32(x).tolist() == [rule.mix32_int(int(v)) for v in x]


# ------------------------------------------------- addresses and launches

@pytest.mark.parametrize("device", DEVICES)
def test_address_cache_follows_moved_tensors(device):
    """Same addresses: the cached device table is reused (no upload); a gradient at a new
    address, or a parameter replaced: the table is refreshed and the step is right."""
    K.clear_caches()
    case = Case([33, 5], d_step=False, device=device, seed=12)
    run_kernel(case, block=BLOCK)
    (entry,) = K._ADDRESSES.values()
    table, host = entry.table, entry.host
    run_kernel(case, block=BLOCK)
    assert entry.host is host and entry.table is table  # nothing uploaded
    case.grads = [g.clone() * 0.5 for g in case.grads]  # new addresses
    step_and_compare(case, block=BLOCK)
    run_kernel(case, block=BLOCK)
    assert entry.host is not host
    case.exp_avgs[1] = case.exp_avgs[1].clone()
    step_and_compare(case, block=BLOCK)
    tickets_clear()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hints", [True, False], ids=["hints", "nohints"])
def test_unaligned_views(device, hints):
    """Tensors that start 4 or 8 bytes past a 16-byte boundary take the masked path."""
    sizes = [70, 33, 64, 5]
    case = Case(sizes, d_step=True, device=device, seed=13)
    total = sum(sizes) + 16 * len(sizes)

    def views(src, offset_step):
        flat = torch.zeros(total, device=device, dtype=src[0].dtype)
        out, at = [], 1
        for k, t in enumerate(src):
            off = at + (k % 2) * offset_step
            v = flat[off:off + t.numel()]
            v.copy_(t)
            out.append(v)
            at = off + t.numel() + 3
        return out

    case.params = views(case.params, 1)
    case.grads = views(case.grads, 2)
    case.hvps = views(case.hvps, 1)
    case.exp_avgs = views(case.exp_avgs, 0)
    case.exp_avg_ds = views(case.exp_avg_ds, 2)
    assert any(t.data_ptr() % 16 for t in case.params + case.grads + case.exp_avgs)
    out = run_kernel(case.clone(), block=BLOCK, hints=hints)
    ref = run_reference(case.clone())
    compare(case, out, ref)
    tickets_clear()


def test_block_table_64bit():
    """One program per block, one for an empty tensor; programs of a tensor with more
    than 2**31 elements get block indices whose element offset only fits in 64 bits."""
    numels = [0, 1, 2048, 2049, 2**31 + 5, 3]
    table = K.block_table_host(numels, 2048)
    counts = [1, 1, 1, 2, 2**20 + 1, 1]
    assert table.shape == (sum(counts), 2)
    tensor, chunk = table[:, 0], table[:, 1]
    assert tensor.tolist()[:6] == [0, 1, 2, 3, 3, 4] and tensor[-1] == 5
    big = chunk[tensor == 4]
    assert big[0] == 0 and big[-1] == 2**20 and (big[1:] - big[:-1] == 1).all()
    assert int(big[-1]) * 2048 >= 2**31  # the last program's offset overflows int32


@pytest.mark.skipif(not K.INTERPRET, reason="needs the Triton interpreter")
def test_64bit_offsets_interpreted():
    """The last blocks of a tensor of 2**31 + 2 blocks + 7 elements, without 8 GiB.

    The table's base addresses are moved back by the blocks' start offset, so only a
    kernel that adds the 64-bit offset finds the real buffers (a 32-bit offset would
    wrap and read elsewhere).  Only 2 of the tensor's programs run, so its ticket ends
    at 2 and its scalars stay as they were (only the last program writes them)."""
    block = 2048
    numel = 2**31 + 2 * block + 7
    last = -(-numel // block) - 1
    first = last - 1
    start = first * block
    assert start > 2**31
    n_real = numel - start  # one full block and a tail of 7
    case = Case([n_real], d_step=True, seed=14, n_groups=1)
    ref = run_reference(case.clone())
    out = case.clone()
    ptrs = [t.data_ptr() for t in (out.params[0], out.grads[0], out.hvps[0], out.exp_avgs[0],
                                   out.exp_avg_ds[0])]
    table = torch.from_numpy(K.address_table_host(ptrs, [numel], True))
    table[0, :K.NUMEL_COL] -= start * 4
    blocks = torch.tensor([[0, first], [0, last]], dtype=torch.int32)
    tickets = torch.zeros(1, dtype=torch.int32)
    K.launch(blocks, table, tickets, out.params[0], out.exp_avgs[0], out.index, out.scalars,
             out.hparams, None, None, True, block=block)
    assert int(tickets[0]) == 2
    assert torch.equal(out.scalars, case.scalars)
    out.scalars = ref.scalars  # the scalars were checked above
    compare(case, out, ref)


def test_empty_lists_and_empty_tensors():
    K.fused_step([], [], [], [], None, torch.zeros(0, 4, dtype=torch.float64),
                 torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 6, dtype=torch.float64))
    if not K.INTERPRET:
        return
    case = Case([0, 0], d_step=False, seed=15)
    out, ref = step_and_compare(case)  # one program each: the scalars advance
    assert not torch.equal(out.scalars, case.scalars)
    tickets_clear()


def test_rejects_float64_and_state_dtypes():
    case = Case([4], d_step=False, seed=16)
    case.params = [case.params[0].double()]
    with pytest.raises(TypeError, match="float64"):
        run_kernel(case)
    case = Case([4], d_step=False, seed=16)
    case.exp_avgs = [case.exp_avgs[0].half()]
    with pytest.raises(TypeError, match="float16 state"):
        run_kernel(case)


def test_cpu_without_interpreter_raises(monkeypatch):
    from esgdm import backends
    from esgdm.backends import BackendUnavailableError

    monkeypatch.setattr(K, "INTERPRET", False)
    case = Case([5], d_step=False, seed=17)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run_kernel(case)
    reason = backends.get("triton").why_not(torch.device("cpu"), torch.float32)
    assert "TRITON_INTERPRET=1" in reason
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        backends.resolve("triton", torch.device("cpu"), torch.float32)


# ------------------------------------------------------------- the backend

def test_why_not_reasons(monkeypatch):
    from esgdm import backends

    b = backends.get("triton")
    assert b.name == "triton"
    assert "not torch.float64" in b.why_not(torch.device("cpu"), torch.float64)
    assert "not torch.float64" in b.why_not(torch.device("cpu"), torch.float32, torch.float64)
    assert "not torch.float16" in b.why_not(torch.device("cpu"), torch.float32, torch.float16)
    assert "not mps" in b.why_not(torch.device("mps"), torch.float32)
    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" now fails
    reason = b.why_not(torch.device("cuda"), torch.float32)
    assert reason.startswith("Triton is not importable (") and "import of triton halted" in reason


@pytest.mark.skipif(not K.INTERPRET, reason="needs the Triton interpreter")
def test_resolve_on_cpu():
    from esgdm import backends

    backend, note = backends.resolve("triton", torch.device("cpu"), torch.bfloat16)
    assert backend.name == "triton" and note is None
    auto, _ = backends.resolve("auto", torch.device("cpu"), torch.float32)
    assert auto.name != "triton"  # auto never picks the interpreter


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flags", [0, EXACT | SR], ids=["default", "exact_sr"])
def test_through_the_operator(device, flags):
    """esgdm.ops.step_ with kernel="triton" (the op refreshes dscale on D-steps) against
    the whole reference_step."""
    import esgdm.ops as ops

    case = Case(SIZES, torch.bfloat16, d_step=True, device=device, seed=18)
    case.grad_scale = torch.tensor([4.0], device=device)
    case.found_inf = torch.zeros(1, device=device)
    out = case.clone()
    ops.step_(*out.args(flags, 99), kernel="triton")
    ref = case.clone()
    rule.reference_step(*ref.args(flags, 99))
    dscale = rule.DSCALE
    torch.testing.assert_close(out.scalars[:, dscale], ref.scalars[:, dscale], rtol=1e-6, atol=0)
    out.scalars[:, dscale] = ref.scalars[:, dscale]
    compare(case, out, ref, flags)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    import esgdm.ops  # noqa: F401 - defines torch.ops.esgdm.step_

    case = Case([5, 40, 1], d_step=True, device=device, seed=19)
    torch.library.opcheck(torch.ops.esgdm.step_.default, (*case.args(0, 0), "triton"))


@pytest.mark.gpu
@requires_cuda
def test_auto_picks_triton_on_cuda():
    from esgdm import backends

    backend, note = backends.resolve("auto", torch.device("cuda"), torch.float32)
    assert backend.name == "triton" and note is None


# ------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_capture():
    """After a warm-up call the step uploads nothing, so it can be captured and replayed;
    replays advance the scalars and follow the reference."""
    case = Case([33, 4096 + 7, 1], torch.bfloat16, d_step=True, device="cuda", seed=20)
    case.grad_scale = torch.tensor([2.0], device="cuda")
    case.found_inf = torch.zeros(1, device="cuda")
    args = case.args(SR, 3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        K.fused_step(*args)  # warm-up: compile, build and upload the tables
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.fused_step(*args)
    for _ in range(2):
        before = case.clone()
        graph.replay()
        torch.cuda.synchronize()
        ref = run_reference(before.clone(), SR, 3)
        compare(before, case, ref, SR)
    tickets_clear()


@pytest.mark.gpu
@requires_cuda
def test_bucket_over_2_31_elements_cuda():
    """A bucket of more than 2**31 fp32 elements (about 43 GB with the HVP), checked on
    the blocks around the 2**31 boundary and at both ends."""
    free, _ = torch.cuda.mem_get_info()
    big = 2**31 + 3 * 2048 + 11
    if free < 5 * 4 * big + 2 * 2**30:
        pytest.skip(f"needs ~{5 * 4 * big / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    case = Case([1000, 1], d_step=True, device="cuda", seed=21, n_groups=2)
    lists = [case.params, case.grads, case.exp_avgs, case.exp_avg_ds, case.hvps]
    for k, t in enumerate(lists):
        t[1] = torch.empty(big, device="cuda").uniform_(0 if k == 3 else -1, 1)
    windows = [(1, (0, 4096)), (1, (2**31 - 4096, 2**31 + 4096)), (1, (big - 5000, big)), (0, (0, 1000))]
    before = [[t[i][a:b].clone() for t in lists] for i, (a, b) in windows]
    scalars0 = case.scalars.clone()
    K.fused_step(*case.args())
    torch.cuda.synchronize()
    for (i, (a, b)), parts in zip(windows, before):
        win = Case.__new__(Case)
        win.params, win.grads, win.exp_avgs, win.exp_avg_ds, win.hvps = [[t] for t in parts]
        win.scalars, win.index, win.hparams = scalars0.clone(), case.index[i:i + 1], case.hparams
        win.grad_scale = win.found_inf = None
        ref = run_reference(win.clone())
        got = win.clone()
        got.params, got.exp_avgs, got.exp_avg_ds = [[t[i][a:b]] for t in lists[:1] + lists[2:4]]
        got.scalars = ref.scalars
        compare(win, got, ref)
    slots = case.index[:, 0].long()
    assert torch.equal(case.scalars[slots, rule.STEPS], scalars0[slots, rule.STEPS] + 1)
    del lists, case
    torch.cuda.empty_cache()


def test_address_table_from_one_cpp_call_matches_the_python_one(monkeypatch):
    """The launcher's per-step addresses come from esgdm._C.data_ptrs (one C++ call) where
    the extension has it: the same table as the Python loop over the tensors, and a table
    refreshed when a gradient moves."""
    from esgdm.backends import cpp_impl
    if cpp_impl._C is None or not hasattr(cpp_impl._C, "data_ptrs"):
        pytest.skip("esgdm._C (with data_ptrs) is not built")
    n = 37
    ps = [torch.randn(5 + i) for i in range(n)]
    lists = (ps, [torch.randn(5 + i) for i in range(n)], [torch.zeros(5 + i) for i in range(n)],
             [torch.zeros(5 + i) for i in range(n)])
    fast_ptrs, fast_numels = K._pointers(lists)
    monkeypatch.setattr(K, "_data_ptrs_op", lambda: None)
    slow_ptrs, slow_numels = K._pointers(lists)
    assert list(fast_ptrs) == list(slow_ptrs) and list(fast_numels) == list(slow_numels)
    for d_step in (False,):
        assert np.array_equal(K.address_table_host(fast_ptrs, fast_numels, d_step),
                              K.address_table_host(slow_ptrs, slow_numels, d_step))
    monkeypatch.undo()
    cpu = torch.device("cpu")
    first = K._addresses(*lists, None, None, None, cpu)
    assert K._addresses(*lists, None, None, None, cpu) is first  # nothing moved: the cached entry
    moved = (lists[0], [g.clone() for g in lists[1]], lists[2], lists[3])
    again = K._addresses(*moved, None, None, None, cpu)
    want = K.address_table_host(*K._pointers(moved), False)
    assert np.array_equal(again.host.numpy(), want)
    with pytest.raises(TypeError, match="item 3 is a NoneType, not a tensor"):
        cpp_impl._C.data_ptrs([ps[:3] + [None]])
