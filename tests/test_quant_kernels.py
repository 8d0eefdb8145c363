"""8-bit state (uint8 codes, per-block float32 scales) in the fused kernels, against
:func:`esgdm.quant.reference_step`, the one reference quantizer's step.

Each backend steps a bucket through the operator, ``esgdm.ops.step_(..., kernel=name,
qscales=...)``, i.e. its ``Backend.step`` then the op's curvature-scale refresh (the C++
CPU kernel always here; the Triton kernel in the interpreter on CPU tensors, its big
cases marked slow; the CUDA kernel, and Triton compiled, only on a GPU), and the
reference steps a copy of the same inputs.  Compared:

* parameters: float32 within 1e-6 of the magnitude of the terms that made them
  (``|p| + |p - p_new|``, as tests/test_triton_backend.py), 16-bit within one unit in
  their last place on top of that;
* codes: equal, except a fraction of at most 1e-3 off by one (the kernel's float32 ``m``
  or ``sqrt(D)`` may differ from the reference's in its last bit, and land on the other
  side of a code boundary);
* scales: within a relative 1e-6; ``bias, warm, steps`` exactly; ``dscale`` (refreshed by
  the op from the codes on default-rule D-steps) within 1e-3;
* bit for bit: what a step must not write (D codes and scales on a plain step,
  everything with ``found_inf`` set).

The C++ CPU kernel does every IEEE operation of the reference in its order, so its codes
and scales are bit for bit the reference's, and so are float32 parameters on plain
steps.  On D-steps a few float32 parameters (well under 1%) land one unit in the last
place apart, as they do with float32 state (torch's CPU lerp and the kernel's round the
Nesterov look-ahead differently there): compared within the tolerance above.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import clone_fields, outputs_under_avx2

from esgdm import quant, rule
from esgdm.backends import cpp_impl

# float16 parameters stepped by 1e6 (FLAG_EXACT, eps 1e-8 where D == 0) overflow to inf,
# as in the reference; the Triton interpreter's numpy cast warns about it
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

EXACT = rule.FLAG_EXACT
SR = rule.FLAG_STOCHASTIC_ROUNDING
P_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}
#: Sizes: whole blocks (4096, 512), partial last blocks (4097, 5000), and a transposed
#: (dense, not contiguous) 2-D tensor with a partial last block ("T", rows, cols).
SIZES = [4096, 4097, 5000, 512, ("T", 61, 70)]
BIG = [70000, 4097]
#: (lr, beta1, beta2, lr_warmup, eps, weight_decay): weight decay in two groups;
#: beta1 < 0.5 works torch's lerp from the far end.
HPARAMS = [
    (0.1, 0.9, 0.999, 0.9, 1e-8, 0.0),
    (0.3, 0.3, 0.99, 0.5, 1e-4, 0.01),
    (0.05, 0.95, 0.995, 0.99, 1e-3, 0.1),
]


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------ backends


def _triton_interpreted():
    try:
        from esgdm.kernels import esgdm_step
    except Exception:  # noqa: BLE001 - no Triton: skipped
        return None
    return esgdm_step.INTERPRET


def _cuda_built() -> bool:
    info = cpp_impl.build_info()
    return bool(info and info.get("cuda"))


_NO_GPU = not torch.cuda.is_available()
_INTERP = _triton_interpreted()

#: (backend name, device) pairs; each skipped with its reason where it cannot run.
BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu",
                 marks=pytest.mark.skipif(cpp_impl._C is None, reason=str(cpp_impl.LOAD_ERROR))),
    pytest.param("triton", "cpu", id="triton-interpreted",
                 marks=pytest.mark.skipif(not _INTERP, reason="needs Triton with TRITON_INTERPRET=1")),
    pytest.param("triton", "cuda", id="triton-gpu",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(_NO_GPU or _INTERP is not False,
                                                            reason="needs a GPU and compiled Triton")]),
    pytest.param("cuda", "cuda", id="cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(_NO_GPU or not _cuda_built(),
                                                            reason="needs a GPU and esgdm._C with CUDA")]),
]


def _backend(name):
    from esgdm import backends

    return backends.get(name)


# ------------------------------------------------------------------ inputs


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements in memory order."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class Case:
    """One bucket with 8-bit state: the op's arguments and the codes' scales."""

    def __init__(self, sizes, dtype, d_step, *, device="cpu", seed=0, nonfinite=True,
                 grad_scale=None):
        gen = torch.Generator().manual_seed(seed)
        n = len(sizes)

        def dense(size, values):
            if isinstance(size, tuple):  # ("T", rows, cols): a transposed (cols, rows) tensor
                return values.reshape(size[2], size[1]).t()
            return values

        numels = [s[1] * s[2] if isinstance(s, tuple) else s for s in sizes]

        def make(dtype_, scale=1.0, positive=False):
            out = []
            for s, k in zip(sizes, numels):
                v = torch.randn(k, generator=gen, dtype=torch.float64) * scale
                v = v.abs() if positive else v
                out.append(dense(s, v.to(dtype_)).to(device))
            return out

        S = 1.0 if grad_scale is None else grad_scale
        self.dtype, self.device = dtype, device
        self.params = make(dtype)
        self.grads = make(dtype, S)
        self.hvps = make(dtype, 2.0 * S) if d_step else None
        self.exp_avgs, self.exp_avg_ds, self.qscales = [], [], []
        for i, (p, k) in enumerate(zip(self.params, numels)):
            m = torch.randn(k, generator=gen) * 0.3
            head = min(k, quant.BLOCK)
            m[:head] *= torch.logspace(-8, 0, quant.BLOCK)[:head]  # a block spanning decades
            d = torch.rand(k, generator=gen) * 2.0
            d[torch.rand(k, generator=gen) < 0.25] = 0.0  # curvature never observed
            d[quant.BLOCK: 2 * quant.BLOCK] = 0.0          # a whole block of D == 0
            if i == 1:
                m[2 * quant.BLOCK: 3 * quant.BLOCK] = 0.0  # a whole block of m == 0
            if i == 2:
                d.zero_()                                   # a tensor never observed
            mc = torch.empty_like(p, dtype=torch.uint8, device="cpu")
            dc = torch.empty_like(p, dtype=torch.uint8, device="cpu")
            qs = quant.new_qscale(k)
            laid = torch.empty_like(p, dtype=torch.float32, device="cpu")
            _flat(laid).copy_(m)
            laid_d = torch.empty_like(laid)
            _flat(laid_d).copy_(d)
            quant.quantize_into(laid, laid_d, mc, dc, qs)
            self.exp_avgs.append(mc.to(device))
            self.exp_avg_ds.append(dc.to(device))
            self.qscales.append(qs.to(device))
            if self.hvps is not None:  # where D == 0, h is too in a third of the places
                h = self.hvps[i]
                unseen = (_flat(laid_d) == 0) & (torch.rand(k, generator=gen) < 0.3)
                _flat(h)[unseen.to(device)] = 0
        if nonfinite:  # non-finite gradients leave their elements alone
            _flat(self.grads[0])[[5, 300]] = torch.tensor([float("nan"), float("inf")], dtype=dtype)
            _flat(self.grads[-1])[7] = float("-inf")
            if self.hvps is not None:
                _flat(self.hvps[1])[9] = float("nan")  # a non-finite h is dropped
        n_slots = n + 3
        slots = torch.randperm(n_slots, generator=gen)[:n]
        groups = torch.arange(n) % len(HPARAMS)
        sc = torch.zeros(n_slots, 4, dtype=torch.float64)
        k = torch.randint(1, 30, (n_slots,), generator=gen).double()
        sc[:, rule.BIAS] = 0.9 ** k
        sc[:, rule.WARM] = 0.8 ** (k / 2).floor()
        sc[:, rule.STEPS] = k
        sc[:, rule.DSCALE] = torch.rand(n_slots, generator=gen, dtype=torch.float64) + 0.05
        sc[slots[::3], rule.DSCALE] = 0.0
        self.scalars = sc.to(device)
        self.index = torch.stack([slots, groups], 1).to(torch.int32).to(device)
        self.hparams = torch.tensor(HPARAMS, dtype=torch.float64, device=device)
        self.grad_scale = None if grad_scale is None else torch.tensor([float(grad_scale)], device=device)
        self.found_inf = None

    def clone(self) -> Case:
        return clone_fields(self)


def run_backend(name, case: Case, flags=0, seed=0) -> Case:
    """A stepped copy of ``case``: the op with backend ``name`` (its kernel, then the
    curvature-scale refresh from the codes)."""
    from esgdm import ops

    c = case.clone()
    ops.step_(c.params, c.grads, c.exp_avgs, c.exp_avg_ds, c.hvps, c.scalars, c.index, c.hparams,
              c.grad_scale, c.found_inf, flags, seed, kernel=name, qscales=c.qscales)
    return c


def run_kernel(name, case: Case, flags=0, seed=0) -> Case:
    """A stepped copy of ``case``: ``Backend.step`` alone (no dscale refresh)."""
    c = case.clone()
    _backend(name).step(c.params, c.grads, c.exp_avgs, c.exp_avg_ds, c.hvps, c.scalars, c.index,
                        c.hparams, c.grad_scale, c.found_inf, flags, seed, qscales=c.qscales)
    return c


def run_reference(case: Case, flags=0, seed=0) -> Case:
    c = case.clone()
    quant.reference_step(c.params, c.grads, c.exp_avgs, c.exp_avg_ds, c.qscales, c.hvps, c.scalars,
                         c.index, c.hparams, c.grad_scale, c.found_inf, flags, seed)
    return c


# ------------------------------------------------------------------ comparisons


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    _, e = torch.frexp(x.double().abs())
    e = torch.clamp(e - 1, min=MIN_EXP[dtype])
    return torch.pow(2.0, (e - MANTISSA[dtype]).double())


def _cancellation(start: Case, i: int) -> torch.Tensor:
    """How much the step of tensor ``i``'s elements magnifies a last-bit difference of
    ``m``: ``mhat = lerp(lerp(m, g, w), g, w)`` in float64 from the starting state,
    against the magnitude of the terms it is made of (large where m and g nearly cancel;
    a kernel whose lerp rounds differently from torch's differs there)."""
    m0 = _flat(quant.dequantize(start.exp_avgs[i], start.exp_avg_ds[i], start.qscales[i])[0])
    m0 = m0.cpu().double()
    g = _flat(start.grads[i]).cpu().double()
    if start.grad_scale is not None:
        g = g / float(start.grad_scale)
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    w = 1.0 - float(start.hparams[int(start.index[i, 1]), rule.BETA1])
    m1 = m0 + w * (g - m0)
    mhat = m1 + w * (g - m1)
    return (m0.abs() + g.abs() + m1.abs()) / mhat.abs().clamp(min=1e-30)


def assert_params_close(out: Case, ref: Case, start: Case):
    for i, (o, r, p0) in enumerate(zip(out.params, ref.params, start.params)):
        assert o.stride() == p0.stride(), f"p[{i}]: layout changed"
        factor = torch.empty_like(p0, dtype=torch.float64, device="cpu")
        _flat(factor).copy_(_cancellation(start, i).clamp(min=1.0))
        o, r, p0 = o.cpu().double(), r.cpu().double(), p0.cpu().double()
        nan_o, nan_r = o.isnan(), r.isnan()
        assert torch.equal(nan_o, nan_r), f"p[{i}]: NaN at different places"
        fin = torch.isfinite(r)
        assert torch.equal(o[~fin & ~nan_r], r[~fin & ~nan_r]), f"p[{i}]: infinities differ"
        tol = 1e-6 * (p0.abs() + (p0 - r).abs() * factor)[fin] + 1e-30
        if out.dtype != torch.float32:
            tol = tol + _ulp(r[fin], out.dtype)
        err = (o[fin] - r[fin]).abs()
        bad = err > tol
        assert not bad.any(), (f"p[{i}]: {int(bad.sum())} of {int(fin.sum())} beyond tolerance, "
                               f"max error {err.max().item():.3g}")


def assert_codes_close(out, ref, what, exact=False):
    total = sum(t.numel() for t in out)
    off = 0
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.dtype == torch.uint8 and o.stride() == r.stride(), f"{what}[{i}]"
        diff = (_flat(o).cpu().int() - _flat(r).cpu().int()).abs()
        worst = int(diff.max()) if diff.numel() else 0
        assert worst <= (0 if exact else 1), f"{what}[{i}]: codes differ by {worst}"
        off += int((diff != 0).sum())
    assert off <= (0 if exact else 1e-3 * total), f"{what}: {off} of {total} codes off by one"


def assert_scales_close(out, ref, exact=False):
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.shape == r.shape and o.dtype == torch.float32 and o.is_contiguous()
        if exact:
            assert torch.equal(o.cpu(), r.cpu()), f"qscale[{i}] not bit for bit"
        else:
            torch.testing.assert_close(o.cpu(), r.cpu(), rtol=1e-6, atol=1e-30, msg=f"qscale[{i}]")


def assert_matches(start: Case, out: Case, ref: Case):
    """``out`` (backend) against ``ref`` (reference), both stepped from ``start``."""
    assert_params_close(out, ref, start)
    assert_codes_close(out.exp_avgs, ref.exp_avgs, "m codes")
    assert_codes_close(out.exp_avg_ds, ref.exp_avg_ds, "D codes")
    assert_scales_close(out.qscales, ref.qscales)
    assert torch.equal(out.scalars[:, :3], ref.scalars[:, :3]), "bias, warm, steps"
    # dscale is the mean decoded sqrt(D) over a tensor's coordinates with D > 0: a code
    # off by one in 1e-3 of them moves it by far less than 1e-3
    torch.testing.assert_close(out.scalars[:, rule.DSCALE], ref.scalars[:, rule.DSCALE],
                               rtol=1e-3, atol=0.0, msg="dscale")


def assert_bits_equal(out: Case, ref: Case, scalars=True):
    """Everything the step writes, bit for bit."""
    for what in ("params", "exp_avgs", "exp_avg_ds", "qscales"):
        for i, (a, b) in enumerate(zip(getattr(out, what), getattr(ref, what))):
            assert a.stride() == b.stride()
            differ = _flat(a).view(torch.uint8) != _flat(b).view(torch.uint8)
            assert not differ.any(), f"{what}[{i}]: {int(differ.sum())} bytes differ"
    if scalars:
        assert torch.equal(out.scalars.view(torch.int64), ref.scalars.view(torch.int64)), "scalars"


@contextlib.contextmanager
def correctly_rounded_sqrt():
    """torch.sqrt and Tensor.sqrt of float32 correctly rounded (computed in float64: the
    double rounding is exact for sqrt).  torch's vectorised CPU float32 sqrt is off by a
    unit in the last place for a few inputs in a thousand; the kernels' is IEEE."""
    sqrt = torch.sqrt

    def exact(x, *args, **kwargs):
        out = kwargs.pop("out", None)  # (the rule's code writes into reused buffers)
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not args and not kwargs:
            root = sqrt(x.double()).float()
            return root if out is None else out.copy_(root)
        if out is not None:
            kwargs["out"] = out
        return sqrt(x, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "sqrt", exact)
        mp.setattr(torch.Tensor, "sqrt", exact)
        yield


def assert_unchanged(tensors, before, what):
    for i, (a, b) in enumerate(zip(tensors, before)):
        assert torch.equal(_flat(a).view(torch.uint8), _flat(b).view(torch.uint8)), \
            f"{what}[{i}] changed"


# ------------------------------------------------------------------ the kernels


@pytest.mark.parametrize("flags", [0, EXACT], ids=["default", "exact"])
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
@pytest.mark.parametrize("dtype", P_DTYPES, ids=_name)
@pytest.mark.parametrize("name,device", BACKENDS)
def test_kernel_matches_the_reference(name, device, dtype, d_step, flags):
    case = Case(SIZES, dtype, d_step, device=device, seed=1)
    out, ref = run_backend(name, case, flags), run_reference(case, flags)
    assert_matches(case, out, ref)
    if not d_step:  # a plain step only reads D
        assert_unchanged(out.exp_avg_ds, case.exp_avg_ds, "D codes (plain step)")
        for o, c in zip(out.qscales, case.qscales):
            assert torch.equal(o[:, quant.D_SCALE], c[:, quant.D_SCALE]), "D scales (plain step)"
    if not d_step or flags & EXACT:
        assert torch.equal(out.scalars[:, rule.DSCALE], case.scalars[:, rule.DSCALE]), "dscale"
    else:
        assert not torch.equal(out.scalars[:, rule.DSCALE], case.scalars[:, rule.DSCALE])
    kernel = run_kernel(name, case, flags)  # the kernel alone leaves dscale to the op
    assert torch.equal(kernel.scalars[:, rule.DSCALE], case.scalars[:, rule.DSCALE]), "kernel dscale"
    assert_bits_equal(kernel, out, scalars=False)
    # non-finite gradient elements: p left alone, m kept (re-encoded with the new scale)
    for t, k in ((0, 5), (0, 300), (len(SIZES) - 1, 7)):
        assert _flat(out.params[t])[k] == _flat(case.params[t])[k]
    moved = sum(int((_flat(a) != _flat(b)).sum()) for a, b in zip(out.params, case.params))
    assert moved > 0.5 * sum(p.numel() for p in case.params)


@pytest.mark.parametrize("variant", ["plain", "dstep", "grad_scale", "stochastic", "big"])
@pytest.mark.parametrize("flags", [0, EXACT], ids=["default", "exact"])
@pytest.mark.parametrize("dtype", P_DTYPES, ids=_name)
def test_cpu_kernel_is_bit_for_bit(dtype, flags, variant):
    """The C++ CPU kernel against the reference with a correctly rounded sqrt: every
    parameter, code, scale and scalar equal to the bit, whatever the dtype."""
    if cpp_impl._C is None:
        pytest.skip(str(cpp_impl.LOAD_ERROR))
    if variant == "stochastic" and dtype == torch.float32:
        pytest.skip("float32 parameters are always rounded to nearest")
    d_step = variant != "plain"
    case = Case(BIG if variant == "big" else SIZES, dtype, d_step, seed=7,
                grad_scale=512.0 if variant == "grad_scale" else None)
    flags |= SR if variant == "stochastic" else 0
    out = run_backend("cpu", case, flags, seed=3)
    with correctly_rounded_sqrt():
        ref = run_reference(case, flags, seed=3)
    assert_bits_equal(out, ref)


# steps of m near 2**127 overflow p to inf where D == 0, in the reference too
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
@pytest.mark.parametrize("name,device", BACKENDS)
def test_extreme_m_scales(name, device, d_step):
    """Blocks whose max |m| is subnormal (m decaying where the gradient is 0) or above
    2**126: encoded with the pre-scale (quant.PRESCALE), as the reference does; the C++
    kernel bit for bit."""
    case = Case([4096, 4096], torch.float32, d_step, device=device, seed=9, nonfinite=False)
    qs, g = case.qscales[0], _flat(case.grads[0])
    qs[3, quant.M_SCALE] = 1.3 * 2.0 ** -135  # subnormal, and no gradient: it stays so
    g[3 * quant.BLOCK: 4 * quant.BLOCK] = 0.0
    if d_step:
        _flat(case.hvps[0])[3 * quant.BLOCK: 4 * quant.BLOCK] = 0.0
    qs[5, quant.M_SCALE] = 2.0 ** 127  # 1 / s would be subnormal
    qs[6, quant.M_SCALE] = 2.0 ** -149  # the least subnormal
    g[6 * quant.BLOCK: 7 * quant.BLOCK] = 0.0
    out = run_backend(name, case)
    if name == "cpu":
        with correctly_rounded_sqrt():
            assert_bits_equal(out, run_reference(case))
    else:
        assert_matches(case, out, run_reference(case))
    got = out.qscales[0][:, quant.M_SCALE].cpu()
    assert 0 < got[3] < quant.TINY and got[5] > quant.HUGE
    m = quant.decode_m(_flat(out.exp_avgs[0]).cpu(), got)
    assert (m[3 * quant.BLOCK: 4 * quant.BLOCK].abs().amax() == got[3])  # the max round-trips


#: Cases of the cross-instruction-set check: (dtype, d_step, flags, grad_scale).
ISA_CASES = [(dtype, d_step, flags, gs) for dtype in P_DTYPES for d_step in (False, True)
             for flags in (0, EXACT, SR) for gs in (None, 64.0)
             if not (flags == SR and dtype == torch.float32)]


def _cpu_kernel_outputs():
    """The C++ kernel's results on ISA_CASES (params, codes, scales, scalars)."""
    out = []
    for i, (dtype, d_step, flags, gs) in enumerate(ISA_CASES):
        case = Case(SIZES + [70000], dtype, d_step, seed=30 + i, grad_scale=gs)
        c = run_backend("cpu", case, flags, seed=5)
        out.append([c.params, c.exp_avgs, c.exp_avg_ds, c.qscales, c.scalars])
    return out


def test_cpu_kernel_instruction_sets_agree(tmp_path):
    """The 8-bit loops compiled for AVX-512 (where the CPU and ATen have it) and for AVX2
    (ATEN_CPU_CAPABILITY=avx2, in a subprocess) store the same bytes."""
    if cpp_impl._C is None:
        pytest.skip(str(cpp_impl.LOAD_ERROR))
    if "AVX-512" not in cpp_impl.build_info()["cpu_isa"]:
        pytest.skip("the 8-bit loops run AVX-512 only on CPUs (and ATen builds) that have it")
    avx2 = outputs_under_avx2(tmp_path, "test_quant_kernels", "_cpu_kernel_outputs")
    for case, (a, b) in zip(ISA_CASES, zip(_cpu_kernel_outputs(), avx2)):
        for what, xs, ys in zip(("params", "m codes", "D codes", "qscales", "scalars"), a, b):
            for i, (x, y) in enumerate(zip(xs if isinstance(xs, list) else [xs],
                                           ys if isinstance(ys, list) else [ys])):
                assert torch.equal(_flat(x).view(torch.uint8), _flat(y).view(torch.uint8)), \
                    f"{case}: {what}[{i}] differ between AVX-512 and AVX2"


def _big(name, device, dtype, d_step):
    case = Case(BIG, dtype, d_step, device=device, seed=2)
    assert_matches(case, run_backend(name, case), run_reference(case))


@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
@pytest.mark.parametrize("dtype", P_DTYPES, ids=_name)
@pytest.mark.parametrize("name,device", [p for p in BACKENDS if p.id != "triton-interpreted"])
def test_big_tensor(name, device, dtype, d_step):
    """70000 elements: many programs / chunks / warps per tensor, a partial last block."""
    _big(name, device, dtype, d_step)


@pytest.mark.slow
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
@pytest.mark.parametrize("dtype", P_DTYPES, ids=_name)
@pytest.mark.parametrize("name,device", [p for p in BACKENDS if p.id == "triton-interpreted"])
def test_big_tensor_interpreted(name, device, dtype, d_step):
    _big(name, device, dtype, d_step)


@pytest.mark.parametrize("flags", [0, EXACT], ids=["default", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("name,device", BACKENDS)
def test_grad_scale(name, device, dtype, flags):
    """g and h arrive multiplied by grad_scale; the kernel divides (AMP)."""
    case = Case(SIZES[:3], dtype, True, device=device, seed=3, grad_scale=1024.0)
    assert_matches(case, run_backend(name, case, flags), run_reference(case, flags))


@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
@pytest.mark.parametrize("name,device", BACKENDS)
def test_found_inf_writes_nothing(name, device, d_step):
    case = Case(SIZES, torch.bfloat16, d_step, device=device, seed=4, grad_scale=8.0)
    case.found_inf = torch.ones(1, device=device)
    out = run_backend(name, case)
    for what in ("params", "exp_avgs", "exp_avg_ds", "qscales"):
        assert_unchanged(getattr(out, what), getattr(case, what), what)
    assert torch.equal(out.scalars, case.scalars), "scalars"
    assert_matches(case, out, run_reference(case))  # which does nothing either
    case.found_inf = torch.zeros(1, device=device)  # zero: the step happens
    out = run_backend(name, case)
    assert not torch.equal(out.scalars, case.scalars)
    assert_matches(case, out, run_reference(case))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_name)
@pytest.mark.parametrize("name,device", BACKENDS)
def test_stochastic_rounding(name, device, dtype):
    """16-bit parameters rounded stochastically, with the rule's random bits (keyed by
    the element's index in its tensor): within one unit of the reference."""
    case = Case(SIZES[:3], dtype, True, device=device, seed=5)
    out, ref = run_backend(name, case, SR, seed=77), run_reference(case, SR, seed=77)
    assert_matches(case, out, ref)
    total = sum(p.numel() for p in case.params)
    same = sum(int((_flat(a).view(torch.int16) == _flat(b).view(torch.int16)).sum())
               for a, b in zip(out.params, ref.params))
    assert same >= 0.99 * total, f"only {same} of {total} stochastically rounded values agree"


@pytest.mark.parametrize("name,device", BACKENDS)
def test_several_steps_stay_with_the_reference(name, device):
    """Four steps (plain, D-step, plain, D-step), each from the previous one's results."""
    case = Case(SIZES[:3], torch.float32, True, device=device, seed=6, nonfinite=False)
    hvps = case.hvps
    out, ref = case, case
    for d_step in (False, True, False, True):
        out.hvps = ref.hvps = hvps if d_step else None
        start = out
        out, ref = run_backend(name, out), run_reference(ref)
    assert_params_close(out, ref, start)
    assert_codes_close(out.exp_avgs, ref.exp_avgs, "m codes")
    assert_codes_close(out.exp_avg_ds, ref.exp_avg_ds, "D codes")
    assert_scales_close(out.qscales, ref.qscales)


# ------------------------------------------------------------------ arguments and capability


@pytest.mark.parametrize("name,device", [p for p in BACKENDS if p.id in ("cpu", "triton-interpreted")])
def test_uint8_state_and_qscales_come_together(name, device):
    case = Case([4096], torch.float32, False, device=device, nonfinite=False)
    c = case.clone()
    args = (c.params, c.grads, c.exp_avgs, c.exp_avg_ds, None, c.scalars, c.index, c.hparams,
            None, None, 0, 0)
    with pytest.raises((RuntimeError, TypeError, ValueError), match="qscales"):
        _backend(name).step(*args)  # uint8 state without its scales
    floats = [torch.zeros(4096)], [torch.zeros(4096)]
    with pytest.raises((RuntimeError, TypeError, ValueError), match="qscales"):
        _backend(name).step(c.params, c.grads, *floats, None, c.scalars, c.index, c.hparams,
                            None, None, 0, 0, qscales=c.qscales)
    assert_unchanged(c.params, case.params, "params")


def test_the_cpu_kernel_checks_the_scales():
    if cpp_impl._C is None:
        pytest.skip(str(cpp_impl.LOAD_ERROR))
    case = Case([4097], torch.float32, False, nonfinite=False)
    c = case.clone()
    for bad in (torch.zeros(16, 2), torch.zeros(17, 2, dtype=torch.float64), torch.zeros(2, 17).t()):
        with pytest.raises(RuntimeError, match=r"qscales\[0\]"):
            cpp_impl.CPU_BACKEND.step(c.params, c.grads, c.exp_avgs, c.exp_avg_ds, None, c.scalars,
                                      c.index, c.hparams, None, None, 0, 0, qscales=[bad])
    p64 = [p.double() for p in c.params]
    with pytest.raises(RuntimeError, match="float64"):
        cpp_impl.CPU_BACKEND.step(p64, [g.double() for g in c.grads], c.exp_avgs, c.exp_avg_ds, None,
                                  c.scalars, c.index, c.hparams, None, None, 0, 0, qscales=c.qscales)
    assert_unchanged(c.params, case.params, "params")


def test_capability_table_gives_the_fused_kernels_8bit_state():
    """float32/bfloat16/float16 parameters may have uint8 state on every fused backend;
    float64 parameters never."""
    from esgdm.backends import CAPABILITIES

    for name in ("triton", "cuda", "cpu"):
        row = CAPABILITIES[name]
        for dtype in P_DTYPES:
            assert torch.uint8 in row.state_dtypes(dtype), (name, dtype)
            assert row.why_not(row.devices[0], dtype, torch.uint8) is None
        assert torch.uint8 not in row.state_dtypes(torch.float64)
        if torch.float64 in row.params:
            assert "not torch.uint8" in row.why_not(row.devices[0], torch.float64, torch.uint8)


def test_empty_and_tiny_tensors():
    """An empty tensor (no blocks) and one of 3 elements (one short block) in a bucket."""
    if cpp_impl._C is None:
        pytest.skip(str(cpp_impl.LOAD_ERROR))
    case = Case([4096, 3], torch.float32, True, nonfinite=False)
    for name in ("cpu",) + (("triton",) if _INTERP else ()):
        assert_matches(case, run_backend(name, case), run_reference(case))
    empty = Case([0, 300], torch.float32, True, nonfinite=False)
    out, ref = run_backend("cpu", empty), run_reference(empty)
    assert_matches(empty, out, ref)


@pytest.mark.parametrize("block,warps", [(256, 2), (512, 4), (1024, 4)])
@pytest.mark.parametrize("name,device", [p for p in BACKENDS if p.id.startswith("triton")])
def test_triton_program_sizes(name, device, block, warps):
    """Programs of one, two and four quantization blocks (SMALL_CONFIG and CONFIGS), on the
    fast path (full, aligned tiles) and the masked one (tails); a program size that is not
    a multiple of 256 is refused."""
    from esgdm.kernels import esgdm_step as K

    case = Case([4096, 4097, 1500], torch.bfloat16, True, device=device, seed=8)
    out, ref = case.clone(), run_reference(case, EXACT)
    K.fused_step(out.params, out.grads, out.exp_avgs, out.exp_avg_ds, out.hvps, out.scalars, out.index,
                 out.hparams, flags=EXACT, block=block, num_warps=warps, qscales=out.qscales)
    assert_matches(case, out, ref)
    with pytest.raises(ValueError, match="multiple of 256"):
        c = case.clone()
        K.fused_step(c.params, c.grads, c.exp_avgs, c.exp_avg_ds, c.hvps, c.scalars, c.index,
                     c.hparams, block=128, num_warps=2, qscales=c.qscales)
