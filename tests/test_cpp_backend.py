"""The compiled backends ("cpu" and "cuda", extension esgdm._C) against esgdm.rule.

Every comparison is with :func:`esgdm.rule.reference_step` (torch ops, one tensor at a
time), the readable statement of the rule.  The CPU kernel runs in every test run: a
missing extension fails these tests unless the build was skipped on purpose
(ESGDM_BUILD_EXTENSION=0).  The CUDA kernel is checked for being compiled wherever it
was built (always in CI, which sets ESGDM_REQUIRE_CUDA_EXT=1); the tests that run it
are marked ``gpu``.

Tolerances.  The kernels do the reference's IEEE operations in the reference's order
(no fused multiply-add except in lerp, where torch fuses too), so ``exp_avg`` and
``exp_avg_d`` come out bit for bit on CPU.  The parameters may differ by a unit in the
last place of the math type: torch's CPU ``sqrt`` (MKL) is not always correctly
rounded, the kernels' is.  16-bit parameters rounded to nearest may therefore, rarely,
land one unit of *their* last place apart.  Stochastic rounding is checked bit for bit:
the kernel's 16-bit result must be exactly the reference's rounding
(:func:`esgdm.rule.stochastic_round` with :func:`esgdm.rule.random_bits`) of the
float32 value the kernel computed, obtained by running the same kernel on a float32
copy of the parameters.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from helpers import outputs_under_avx2

from esgdm import backends, rule
from esgdm.backends import cpp_impl

PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# uint8 (8-bit) state comes with its block scales: tests/test_quant_kernels.py
COMBOS = [(p, s) for p in PARAM_DTYPES for s in backends.CAPABILITIES["cpu"].state_dtypes(p)
          if s != torch.uint8]
HALF = (torch.bfloat16, torch.float16)


def _name(dtype):
    return str(dtype).replace("torch.", "")


COMBO_IDS = [f"{_name(p)}-state_{_name(s)}" for p, s in COMBOS]

# Sizes around the CPU kernel's 65536-element chunks and the CUDA kernel's tiles
# (256 x 16 bytes: 512 float64, 1024 float32, 2048 16-bit elements).
SIZES = [0, 1, 2, 3, 7, 17, 511, 1023, 2049, 4097, 65535, 65537, 70001]

# Parameters vs the reference, (rtol, atol); the state, the same for its dtype.
P_TOL = {torch.float32: (2e-6, 1e-6), torch.float64: (1e-14, 1e-14),
         torch.bfloat16: (2 ** -7, 1e-6), torch.float16: (2 ** -10, 1e-6)}
STATE_TOL = {torch.float32: (1e-6, 1e-7), torch.float64: (1e-14, 1e-15),
             torch.bfloat16: (2 ** -7, 1e-7)}

#: Hyper-parameter rows (lr, beta1, beta2, lr_warmup, eps, weight_decay), varied:
#: beta1 < 0.5 makes torch's lerp work from the far end, beta1 = 0 and beta2 = 1 are
#: the ends of their ranges, eps = 0 divides by zero where D == 0 under FLAG_EXACT.
HPARAMS = [
    (0.1, 0.9, 0.999, 0.9, 1e-8, 0.0),
    (0.3, 0.3, 0.5, 0.5, 1e-4, 0.01),
    (0.05, 0.0, 1.0, 0.99, 1e-3, 0.1),
    (1.0, 0.99, 0.9, 0.0, 0.0, 0.0),
]


def _build_skipped() -> bool:
    return os.environ.get("ESGDM_BUILD_EXTENSION", "").strip().lower() in ("0", "false", "no", "off")


@pytest.fixture
def ext():
    """The loaded extension; a missing one fails the test unless its build was skipped."""
    if cpp_impl._C is None:
        if _build_skipped():
            pytest.skip(f"ESGDM_BUILD_EXTENSION=0: {cpp_impl.LOAD_ERROR}")
        pytest.fail(cpp_impl.LOAD_ERROR)
    return cpp_impl._C


# ------------------------------------------------------------------ inputs


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A dense copy of ``t`` in the given memory layout."""
    if kind == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


class Case:
    """One bucket's worth of op arguments.

    ``shapes``: ints (1-D) or tuples; ``layouts``: one of "contiguous", "transposed",
    "channels_last" per tensor (all of a tensor's arguments share it).  A quarter of D
    is zero, and so is a quarter of h (where both are, curvature stays unobserved);
    every third tensor has dscale 0.  Slots are a random subset of a larger table, so
    that index is not the identity.
    """

    def __init__(self, shapes, dtype, state_dtype, d_step, *, device="cpu", seed=0, layouts=None):
        gen = torch.Generator().manual_seed(seed)
        shapes = [(s,) if isinstance(s, int) else tuple(s) for s in shapes]
        layouts = layouts or ["contiguous"] * len(shapes)
        n = len(shapes)

        def make(shape, dt, kind, positive=False):
            t = torch.randn(shape, generator=gen, dtype=torch.float64)
            if positive:
                t = t.abs() * (torch.rand(shape, generator=gen, dtype=torch.float64) > 0.25)
            return _layout(t, kind).to(device=device, dtype=dt)

        self.dtype, self.state_dtype, self.device = dtype, state_dtype, device
        self.params = [make(s, dtype, k) for s, k in zip(shapes, layouts)]
        self.grads = [make(s, dtype, k) for s, k in zip(shapes, layouts)]
        self.exp_avgs = [make(s, state_dtype, k) for s, k in zip(shapes, layouts)]
        self.exp_avg_ds = [make(s, state_dtype, k, positive=True) for s, k in zip(shapes, layouts)]
        self.hvps = None
        if d_step:
            self.hvps = [(make(s, dtype, k) * (make(s, dtype, k, positive=True) != 0)).to(dtype)
                         for s, k in zip(shapes, layouts)]
        n_slots = 2 * n + 3
        slots = torch.randperm(n_slots, generator=gen)[:n]
        groups = torch.randint(0, len(HPARAMS), (n,), generator=gen)
        scalars = torch.zeros(n_slots, 4, dtype=torch.float64)
        k = torch.randint(0, 40, (n_slots,), generator=gen).double()
        scalars[:, rule.BIAS] = 0.9 ** k
        scalars[:, rule.WARM] = 0.95 ** torch.randint(0, 60, (n_slots,), generator=gen).double()
        scalars[:, rule.STEPS] = k + torch.randint(0, 1000, (n_slots,), generator=gen).double()
        scalars[:, rule.DSCALE] = torch.rand(n_slots, generator=gen, dtype=torch.float64) + 0.05
        scalars[slots[::3], rule.DSCALE] = 0.0
        self.scalars = scalars.to(device)
        self.index = torch.stack([slots, groups], dim=1).to(device=device, dtype=torch.int32)
        self.hparams = torch.tensor(HPARAMS, dtype=torch.float64, device=device)

    def clone(self):
        c = Case.__new__(Case)
        c.__dict__.update(self.__dict__)
        for name in ("params", "grads", "exp_avgs", "exp_avg_ds", "hvps"):
            ts = getattr(self, name)
            setattr(c, name, None if ts is None else [t.clone() for t in ts])
        c.scalars = self.scalars.clone()
        return c

    def args(self):
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_ds, self.hvps,
                self.scalars, self.index, self.hparams)

    def as_dtype(self, dtype):
        """A copy with params, grads and hvps converted (exactly) to ``dtype``."""
        c = self.clone()
        c.dtype = dtype
        c.params = [t.to(dtype) for t in c.params]
        c.grads = [t.to(dtype) for t in c.grads]
        c.hvps = None if c.hvps is None else [t.to(dtype) for t in c.hvps]
        return c


def _kernel(backend, case, flags=0, seed=0, grad_scale=None, found_inf=None):
    """A stepped copy of ``case`` (the kernel through its backend)."""
    c = case.clone()
    backend.step(*c.args(), grad_scale, found_inf, flags, seed)
    return c


def _reference(case, flags=0, seed=0, grad_scale=None, found_inf=None):
    """A stepped copy of ``case`` (esgdm.rule.reference_step, which also refreshes dscale)."""
    c = case.clone()
    rule.reference_step(*c.args(), grad_scale, found_inf, flags, seed)
    return c


def _cpu(case, **kw):
    return _kernel(cpp_impl.CPU_BACKEND, case, **kw)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements in memory order (element k = offset k)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return _flat(t).view(view)


def _assert_bits_equal(got, want, what):
    """Equal to the bit (the sign of zero included), any NaN equal to any NaN."""
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.stride() == b.stride() or a.numel() <= 1, f"{what}[{i}]: layout changed"
        differ = (_bits(a) != _bits(b)) & ~(_flat(a).isnan() & _flat(b).isnan())
        if differ.any():
            bad = differ.nonzero().flatten()
            raise AssertionError(f"{what}[{i}] (numel {a.numel()}): {bad.numel()} elements differ "
                                 f"in their bits, first at {bad[:5].tolist()}: "
                                 f"{_flat(a)[bad[:5]].tolist()} vs {_flat(b)[bad[:5]].tolist()}")


def _assert_close(got, want, tol, what):
    rtol, atol = tol
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.stride() == b.stride() or a.numel() <= 1, f"{what}[{i}]: layout changed"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, i=i, a=a: f"{what}[{i}] (numel {a.numel()}): {m}")


def _assert_matches_reference(got, want, d_step, device_exact_state=True):
    """``got`` (kernel) against ``want`` (reference): params within P_TOL, state within
    STATE_TOL (bit for bit where ``device_exact_state``), the scalars' bias, warm and steps
    exactly, dscale untouched by the kernel."""
    _assert_close(got.params, want.params, P_TOL[got.dtype], "params")
    if got.dtype in HALF:  # rounding to nearest flips only where the float32 results differ
        total = sum(p.numel() for p in got.params)
        same = sum(int((_bits(a) == _bits(b)).sum()) for a, b in zip(got.params, want.params))
        assert same >= 0.99 * total, f"only {same} of {total} 16-bit parameters agree to the bit"
    for name in ("exp_avgs", "exp_avg_ds"):
        if device_exact_state:
            _assert_bits_equal(getattr(got, name), getattr(want, name), name)
        else:
            _assert_close(getattr(got, name), getattr(want, name), STATE_TOL[got.state_dtype], name)
    assert torch.equal(got.scalars[:, :3], want.scalars[:, :3]), "bias, warm, steps"


# ------------------------------------------------------------------ build and loading


def test_extension_builds_a_python_module_and_no_dispatcher_op(ext):
    info = cpp_impl.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "cuda_arch_list", "cuda_version", "cpu_isa",
                         "openmp", "compiler"}
    assert info["openmp"], "the CPU kernel must be built with OpenMP to use every core"
    assert callable(ext.step)
    assert "C++ kernel" in cpp_impl.CPU_BACKEND.describe()
    # The one operator is esgdm::step_, defined in Python (esgdm/ops.py).
    assert not hasattr(torch.ops.esgdm, "fused_step_")


def test_cuda_kernel_is_compiled(ext):
    """Runs unconditionally under ESGDM_REQUIRE_CUDA_EXT=1 (CI, which has nvcc but no GPU)."""
    info = cpp_impl.build_info()
    required = os.environ.get("ESGDM_REQUIRE_CUDA_EXT", "").strip() == "1"
    if not required and not info["cuda"]:
        pytest.skip("esgdm._C was built without its CUDA kernel "
                    f"(torch CUDA build: {torch.version.cuda or 'no'})")
    assert info["cuda"], "ESGDM_REQUIRE_CUDA_EXT=1 but esgdm._C was built without CUDA"
    archs = cpp_impl.cuda_archs(info)
    assert archs and all(a.startswith(("sm_", "compute_")) for a in archs), archs
    # What we asked nvcc for agrees with the virtual architectures nvcc says it compiled.
    asked = {int(a.split("_")[1].rstrip("af")) * 10 for a in archs}
    compiled = {int(x) for x in info["cuda_arch_list"].split(",") if x}
    assert asked == compiled, (archs, info["cuda_arch_list"])
    assert info["cuda_version"].split(".")[0].isdigit()
    description = cpp_impl.CUDA_BACKEND.describe()
    assert all(a in description for a in archs), description


def test_auto_picks_the_cpu_kernel_for_cpu_buckets(ext):
    for dtype in PARAM_DTYPES:
        backend, note = backends.resolve("auto", torch.device("cpu"), dtype)
        assert backend is cpp_impl.CPU_BACKEND and note is None, (dtype, note)


def test_each_backend_refuses_the_other_device(ext):
    assert "cuda tensors only" in cpp_impl.CUDA_BACKEND.why_not(torch.device("cpu"), torch.float32)
    assert "cpu tensors only" in cpp_impl.CPU_BACKEND.why_not(torch.device("cuda"), torch.float32)
    assert "not torch.int32" in cpp_impl.CPU_BACKEND.why_not(torch.device("cpu"), torch.int32)
    with pytest.raises(backends.BackendUnavailableError, match="cuda tensors only"):
        backends.resolve("cuda", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("archs,capability,ok", [
    (["sm_80"], (8, 0), True), (["sm_80"], (8, 6), True), (["sm_80"], (9, 0), False),
    (["sm_75", "sm_80"], (7, 0), False), (["compute_90"], (10, 0), True),
    (["compute_90"], (8, 9), False), (["sm_90a"], (9, 0), True), (["sm_90a"], (9, 1), False),
    (["sm_75", "sm_80", "compute_90", "sm_90"], (12, 0), True), ([], (9, 0), False),
])
def test_which_gpus_a_build_runs_on(archs, capability, ok):
    assert cpp_impl.runs_on(archs, capability) is ok


def test_missing_extension_is_reported_and_auto_falls_back(monkeypatch):
    module, reason = cpp_impl.load_extension("esgdm._no_such_extension")
    assert module is None and reason.startswith("esgdm._no_such_extension was not built")
    monkeypatch.setattr(cpp_impl, "_C", None)
    monkeypatch.setattr(cpp_impl, "LOAD_ERROR", reason)
    backend, note = backends.resolve("auto", torch.device("cpu"), torch.float32)
    assert backend.name == "torch"
    assert "'cpu' cannot run (esgdm._no_such_extension was not built" in note
    with pytest.raises(backends.BackendUnavailableError, match="was not built"):
        backends.resolve("cpu", torch.device("cpu"), torch.float32)


def test_an_extension_without_step_is_out_of_date(monkeypatch):
    import types

    monkeypatch.setattr(cpp_impl.importlib, "import_module", lambda name: types.ModuleType(name))
    module, reason = cpp_impl.load_extension("esgdm._C")
    assert module is None and "out of date" in reason


# ------------------------------------------------------------------ the CPU kernel vs the rule


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "d_step"])
@pytest.mark.parametrize("dtype,state_dtype", COMBOS, ids=COMBO_IDS)
def test_cpu_kernel_matches_the_reference(ext, dtype, state_dtype, d_step, exact):
    case = Case(SIZES, dtype, state_dtype, d_step, seed=1)
    flags = rule.FLAG_EXACT if exact else 0
    got, want = _cpu(case, flags=flags), _reference(case, flags=flags)
    _assert_matches_reference(got, want, d_step)
    assert torch.equal(got.scalars[:, rule.DSCALE], case.scalars[:, rule.DSCALE]), \
        "the kernel must leave dscale to the op"
    if not d_step:
        _assert_bits_equal(got.exp_avg_ds, case.exp_avg_ds, "exp_avg_ds (plain step)")
    moved = sum(int((_bits(a) != _bits(b)).sum()) for a, b in zip(got.params, case.params))
    assert moved > 0.5 * sum(p.numel() for p in case.params)


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
def test_dense_non_contiguous_layouts_and_tiny_tensors(ext, layout, dtype):
    """Walked as flat memory, state laid out the same way; 0-dim and 1-element tensors."""
    shapes = [(6, 5, 4, 3), (2, 3, 1, 5), (1, 1, 1, 1), (3, 7, 9, 2)]
    case = Case(shapes, dtype, torch.float32, True, seed=2, layouts=[layout] * len(shapes))
    assert not case.params[0].is_contiguous()
    scalar = Case([()], dtype, torch.float32, True, seed=3)  # a 0-dim parameter on its own
    for c in (case, scalar):
        got, want = _cpu(c), _reference(c)
        _assert_matches_reference(got, want, True)
        assert [p.stride() for p in got.params] == [p.stride() for p in c.params]


def test_several_groups_and_slots_and_empty_tensors(ext):
    """Only the rows named by index move; empty tensors still advance theirs."""
    case = Case([5, 0, 300, 0, 1, 2048], torch.float32, torch.float32, True, seed=4)
    case.index[:, 1] = torch.tensor([0, 1, 2, 3, 1, 0], dtype=torch.int32)
    got, want = _cpu(case), _reference(case)
    _assert_matches_reference(got, want, True)
    stepped = case.index[:, 0].long()
    others = torch.ones(case.scalars.shape[0], dtype=torch.bool)
    others[stepped] = False
    assert torch.equal(got.scalars[others], case.scalars[others])
    assert torch.equal(got.scalars[stepped, rule.STEPS], case.scalars[stepped, rule.STEPS] + 1)


@pytest.mark.parametrize("dtype,flags", [(torch.float32, 0), (torch.float64, rule.FLAG_EXACT),
                                         (torch.bfloat16, rule.FLAG_STOCHASTIC_ROUNDING)],
                         ids=["float32", "float64-exact", "bfloat16-stochastic"])
def test_neighbours_with_equal_scalars_each_get_their_own(ext, dtype, flags):
    """Runs of neighbouring tensors whose scalars rows and group are equal (the kernel
    derives their coefficients once per run), next to runs that differ only in the group
    or only in one value of the row: every tensor is stepped with its own numbers, and
    with its own random bits (its slot) where they round stochastically."""
    sizes = [1 + (37 * i) % 300 for i in range(60)] + [70001, 3, 5, 2]
    state = torch.float64 if dtype == torch.float64 else torch.float32
    case = Case(sizes, dtype, state, False, seed=21)
    # Each group has a twin row that differs only in lr (so only in the step's size).
    twins = case.hparams.clone()
    twins[:, 0] *= 1.5
    case.hparams = torch.cat([case.hparams, twins])
    run = [i // 3 for i in range(len(sizes))]  # tensors 3r, 3r+1, 3r+2 share a row's values
    for i, r in enumerate(run):
        first = int(case.index[3 * r, 0])
        case.scalars[int(case.index[i, 0])] = case.scalars[first]
        case.index[i, 1] = case.index[3 * r, 1]
        if r % 4 == 1 and i % 3 == 2:  # differs from its neighbours only in lr
            case.index[i, 1] += len(HPARAMS)
        if r % 4 == 2 and i % 3 == 1:  # only in dscale
            case.scalars[int(case.index[i, 0]), rule.DSCALE] += 0.25
    got = _cpu(case, flags=flags, seed=7)
    if flags & rule.FLAG_STOCHASTIC_ROUNDING:
        twin = _cpu(case.as_dtype(torch.float32), flags=flags, seed=7)
        for i, (p, e) in enumerate(zip(got.params, _expected_rounding(twin, got, 7))):
            assert torch.equal(_bits(p), e.view(torch.int16)), f"params[{i}]"
        got, case = twin, case.as_dtype(torch.float32)
    _assert_matches_reference(got, _reference(case, flags=flags & ~rule.FLAG_STOCHASTIC_ROUNDING), False)


@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "d_step"])
def test_scalars_advance_exactly_as_derive_says(ext, d_step):
    case = Case([3, 0, 70000, 9], torch.float64, torch.float64, d_step, seed=5)
    new_rows, _ = rule.derive(case.scalars, case.index, case.hparams, d_step)
    got = _cpu(case, flags=rule.FLAG_EXACT)
    slots = case.index[:, 0].long()
    assert torch.equal(got.scalars[slots, :3], new_rows[:, :3])
    assert torch.equal(got.scalars[:, rule.DSCALE], case.scalars[:, rule.DSCALE])
    if not d_step:  # warmup advances on D-steps only
        assert torch.equal(got.scalars[slots, rule.WARM], case.scalars[slots, rule.WARM])
    # A second step starts from the advanced rows.
    again = _cpu(got, flags=rule.FLAG_EXACT)
    rows2, _ = rule.derive(got.scalars, case.index, case.hparams, d_step)
    assert torch.equal(again.scalars[slots, :3], rows2[:, :3])


def test_empty_bucket_and_all_empty_tensors(ext):
    hparams = torch.tensor(HPARAMS, dtype=torch.float64)
    scalars = torch.zeros(0, 4, dtype=torch.float64)
    ext.step([], [], [], [], None, scalars, torch.zeros(0, 2, dtype=torch.int32), hparams,
             None, None, 0, 0)
    case = Case([0, 0], torch.float32, torch.float32, False, seed=6)
    got = _cpu(case)
    slots = case.index[:, 0].long()
    assert torch.equal(got.scalars[slots, rule.STEPS], case.scalars[slots, rule.STEPS] + 1)


# ------------------------------------------------------------------ grad_scale, found_inf, NaN


@pytest.mark.parametrize("dtype,state_dtype", COMBOS, ids=COMBO_IDS)
def test_grad_scale_divides_g_and_h(ext, dtype, state_dtype):
    case = Case([1, 33, 4097], dtype, state_dtype, True, seed=7)
    # A power of two: g * S / S == g exactly, so the scaled step is the unscaled one.
    scale = 8.0
    scaled = case.clone()
    scaled.grads = [(g.double() * scale).to(dtype) for g in case.grads]
    scaled.hvps = [(h.double() * scale).to(dtype) for h in case.hvps]
    gs = torch.tensor(scale)
    plain = _cpu(case)
    got = _cpu(scaled, grad_scale=gs)
    _assert_bits_equal(got.params, plain.params, "params")
    _assert_bits_equal(got.exp_avg_ds, plain.exp_avg_ds, "exp_avg_ds")
    # Not a power of two: the division, as the reference does it.
    gs = torch.tensor(3.0)
    _assert_matches_reference(_cpu(scaled, grad_scale=gs), _reference(scaled, grad_scale=gs), True)


@pytest.mark.parametrize("value", [1.0, float("inf"), float("nan"), 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
def test_found_inf_writes_nothing(ext, dtype, value):
    case = Case([5, 70001], dtype, torch.bfloat16, True, seed=8)
    flags = rule.FLAG_STOCHASTIC_ROUNDING
    got = _cpu(case, flags=flags, seed=3, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(value))
    if value == 0.0:  # a clean step: as if found_inf were not given
        want = _cpu(case, flags=flags, seed=3, grad_scale=torch.tensor(2.0))
    else:
        want = case
    for name in ("params", "exp_avgs", "exp_avg_ds"):
        _assert_bits_equal(getattr(got, name), getattr(want, name), name)
    assert torch.equal(got.scalars, want.scalars)


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "d_step"])
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=_name)
def test_non_finite_gradients_and_hvps(ext, dtype, d_step, exact):
    """Non-finite g (after the division by grad_scale): the element is left alone.
    Non-finite h: the observation is dropped (h^2 = 0), the rest of the step happens."""
    state = backends.CAPABILITIES["cpu"].state_dtypes(dtype)[0]
    case = Case([37, 2500], dtype, state, d_step, seed=9)
    bad_g = {0: [0, 5, 36], 1: [1, 1024, 2499]}
    bad_h = {0: [2, 5, 7], 1: [3, 1030, 2000]}
    specials = [float("nan"), float("inf"), -float("inf")]
    for i, where in bad_g.items():
        for k, j in enumerate(where):
            case.grads[i][j] = specials[k % 3]
        if d_step:
            for k, j in enumerate(bad_h[i]):
                case.hvps[i][j] = specials[(k + 1) % 3]
    case.exp_avg_ds[1][7] = float("nan")  # a NaN already in D spreads (torch.maximum)
    flags = rule.FLAG_EXACT if exact else 0
    got, want = _cpu(case, flags=flags), _reference(case, flags=flags)
    _assert_matches_reference(got, want, d_step)
    math = _math(dtype)
    for i, where in bad_g.items():
        for name in ("params", "exp_avgs", "exp_avg_ds"):
            before, after = getattr(case, name)[i], getattr(got, name)[i]
            assert torch.equal(_bits(after)[where], _bits(before)[where]), (name, i)
    if d_step:
        for i, where in bad_h.items():
            where = [j for j in where if j not in bad_g[i]]
            beta2 = torch.tensor(HPARAMS[int(case.index[i, 1])][rule.BETA2], dtype=torch.float64)
            decayed = case.exp_avg_ds[i][where].to(math) * beta2.to(math)  # max(b2 * D, 0)
            assert torch.equal(got.exp_avg_ds[i][where], decayed.to(case.state_dtype)), i
            assert not torch.equal(got.params[i][where], case.params[i][where]), i


def _math(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def test_gradient_overflowing_after_unscaling_is_non_finite(ext):
    case = Case([8], torch.float32, torch.float32, False, seed=10)
    case.grads[0][3] = 3e38
    got = _cpu(case, grad_scale=torch.tensor(0.5))  # 3e38 / 0.5 = inf
    assert torch.equal(got.params[0][3], case.params[0][3])
    _assert_matches_reference(got, _reference(case, grad_scale=torch.tensor(0.5)), False)


# ------------------------------------------------------------------ unobserved curvature


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_name)
def test_unobserved_curvature_rule(ext, dtype):
    """D == 0 after the update: FLAG_EXACT divides by eps; otherwise by dscale + eps, or
    no step (only weight decay) where dscale == 0."""
    math = _math(dtype)
    case = Case([1000, 1000], dtype, dtype, True, seed=11)
    for i in range(2):
        case.exp_avg_ds[i][:500] = 0
        case.hvps[i][:500] = 0
        case.index[i, 1] = 1  # eps 1e-4, weight decay 0.01
    slots = case.index[:, 0].long()
    case.scalars[slots[0], rule.DSCALE] = 0.0
    case.scalars[slots[1], rule.DSCALE] = 0.37
    _, co = rule.derive(case.scalars, case.index, case.hparams, True)

    def c(name, i):
        return torch.tensor(co[name][i].item(), dtype=torch.float64).to(math)

    for flags in (0, rule.FLAG_EXACT):
        got, want = _cpu(case, flags=flags), _reference(case, flags=flags)
        _assert_matches_reference(got, want, True)
        for i in range(2):
            p0, g = case.params[i][:500].to(math), case.grads[i][:500].to(math)
            m = got.exp_avgs[i][:500].to(math)
            mhat = torch.lerp(m, g, c("w", i).item())
            if flags:
                denom = c("eps", i)
            elif i == 0:
                denom = None  # dscale == 0: no step
            else:
                denom = (c("dscale", i).double() + c("eps", i).double()).to(math)
            decayed = p0 * c("decay", i)
            expect = decayed if denom is None else decayed - c("step_scale", i) * (mhat / denom)
            torch.testing.assert_close(got.params[i][:500], expect.to(dtype), rtol=0, atol=0)


# ------------------------------------------------------------------ stochastic rounding


def _expected_rounding(x32_case, got16_case, seed):
    """Per tensor: rule.stochastic_round of the kernel's float32 result, in memory order."""
    out = []
    for i, (x, p16) in enumerate(zip(x32_case.params, got16_case.params)):
        slot = int(x32_case.index[i, 0])
        steps = int(x32_case.scalars[slot, rule.STEPS].item())  # already advanced
        r = rule.random_bits(seed, slot, steps, x.numel(), x.device)
        out.append(rule.stochastic_round(_flat(x), p16.dtype, r))
    return out


@pytest.mark.parametrize("d_step,exact", [(False, False), (True, True)], ids=["plain", "d_step-exact"])
@pytest.mark.parametrize("dtype,state_dtype", [c for c in COMBOS if c[0] in HALF],
                         ids=[i for c, i in zip(COMBOS, COMBO_IDS) if c[0] in HALF])
def test_stochastic_rounding_is_the_reference_rounding(ext, dtype, state_dtype, d_step, exact):
    case = Case([1, 3, 17, 2049, 70001, (9, 4, 3, 5)], dtype, state_dtype, d_step, seed=12,
                layouts=["contiguous"] * 5 + ["transposed"])
    seed = 0x1234_5678_9ABC  # only the low 32 bits count
    flags = rule.FLAG_STOCHASTIC_ROUNDING | (rule.FLAG_EXACT if exact else 0)
    got = _cpu(case, flags=flags, seed=seed)
    twin = _cpu(case.as_dtype(torch.float32), flags=flags, seed=seed)  # the float32 results
    # Same math, same state: only the parameters' rounding differs.
    _assert_bits_equal(got.exp_avgs, twin.exp_avgs, "exp_avgs")
    _assert_bits_equal(got.exp_avg_ds, twin.exp_avg_ds, "exp_avg_ds")
    expected = _expected_rounding(twin, got, seed)
    for i, (p, e) in enumerate(zip(got.params, expected)):
        assert torch.equal(_bits(p), e.view(torch.int16)), f"params[{i}] (numel {p.numel()})"
    # And the whole reference op: bit for bit wherever its float32 result is the kernel's.
    # (Contiguous tensors only: reference_step hands the random number of memory offset
    # k to the k-th element in logical order, then stores it at offset k.)
    want = _reference(case, flags=flags, seed=seed)
    want32 = _reference(case.as_dtype(torch.float32), flags=flags, seed=seed)
    for i in range(len(case.params)):
        if not case.params[i].is_contiguous():
            continue
        same_x = _bits(want32.params[i]) == _bits(twin.params[i])
        assert same_x.float().mean() > 0.9
        assert torch.equal(_bits(got.params[i])[same_x], _bits(want.params[i])[same_x]), i
    # The rounding did something: not everything is the nearest value.
    nearest = _cpu(case, flags=flags & ~rule.FLAG_STOCHASTIC_ROUNDING, seed=seed)
    differ = sum(int((_bits(a) != _bits(b)).sum()) for a, b in zip(got.params, nearest.params))
    assert differ > 0.05 * sum(p.numel() for p in case.params)


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_stochastic_rounding_is_unbiased(ext, dtype):
    """x = p * decay lies between two representable values; the mean of the rounded
    values is x (and not the nearest value), with the probabilities that make it so."""
    n = 1 << 16
    gen = torch.Generator().manual_seed(13)
    p = (2.0 ** torch.randint(-8, 9, (n,), generator=gen).double()).to(dtype)  # powers of 2
    zeros = torch.zeros(n, dtype=dtype)
    m, d = torch.zeros(n), torch.ones(n)
    ulp_below = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)  # spacing just below 1
    frac = 0.3
    decay = 1 - frac * ulp_below  # x / p, exactly a float32
    hparams = torch.tensor([[1.0, 0.9, 0.999, 1.0, 1e-8, frac * ulp_below]], dtype=torch.float64)
    scalars = torch.tensor([[0.9, 0.0, 5.0, 0.0]], dtype=torch.float64)  # warm 0: alpha = lr
    index = torch.zeros(1, 2, dtype=torch.int32)
    means = []
    for seed in (1, 2):
        q = p.clone()
        cpp_impl.CPU_BACKEND.step([q], [zeros], [m.clone()], [d.clone()], None, scalars.clone(),
                                  index, hparams, None, None, rule.FLAG_STOCHASTIC_ROUNDING, seed)
        ratio = q.double() / p.double()
        down = (ratio < 1).double().mean().item()
        assert set(torch.unique(ratio).tolist()) == {1.0, 1 - ulp_below}
        sigma = (frac * (1 - frac) / n) ** 0.5
        assert abs(down - frac) < 5 * sigma, (down, frac)
        assert abs(ratio.mean().item() - decay) < 5 * sigma * ulp_below
        means.append(ratio.mean().item())
    assert means[0] != means[1], "the seed must change the random bits"
    nearest = p.clone()
    cpp_impl.CPU_BACKEND.step([nearest], [zeros], [m.clone()], [d.clone()], None, scalars.clone(),
                              index, hparams, None, None, 0, 1)
    assert torch.equal(nearest, p)  # rounding to nearest loses the decay altogether


def test_random_bits_depend_on_seed_slot_and_steps(ext):
    case = Case([4096], torch.bfloat16, torch.float32, False, seed=14)
    flags = rule.FLAG_STOCHASTIC_ROUNDING
    base = _cpu(case, flags=flags, seed=7).params[0]
    assert torch.equal(_cpu(case, flags=flags, seed=7).params[0], base)  # deterministic
    assert torch.equal(_cpu(case, flags=flags, seed=7 + (1 << 32)).params[0], base)  # low 32 bits
    assert not torch.equal(_cpu(case, flags=flags, seed=8).params[0], base)
    later = case.clone()
    later.scalars[:, rule.STEPS] += 1
    assert not torch.equal(_cpu(later, flags=flags, seed=7).params[0], base)


# ------------------------------------------------------------------ threads, profiler, the op


def test_result_does_not_depend_on_the_thread_count(ext):
    case = Case([1, 300_001, 7, 150_000], torch.bfloat16, torch.float32, True, seed=15)
    flags = rule.FLAG_STOCHASTIC_ROUNDING
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_cpu(case, flags=flags, seed=5))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for name in ("params", "exp_avgs", "exp_avg_ds"):
            _assert_bits_equal(getattr(r, name), getattr(results[0], name), name)
        assert torch.equal(r.scalars, results[0].scalars)


def test_profiler_shows_the_kernel(ext):
    case = Case([5, 300, 1], torch.float32, torch.float32, False, seed=16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _cpu(case)
    calls = [e for e in prof.key_averages() if e.key == "esgdm::cpu_step"]
    assert len(calls) == 1 and calls[0].count == 1


def test_through_the_operator(ext):
    """esgdm.ops.step_ with kernel="cpu": the kernel, then the op's dscale refresh."""
    ops = pytest.importorskip("esgdm.ops")
    case = Case([3, 1025, 0, 70001], torch.float32, torch.float32, True, seed=17)
    got = case.clone()
    ops.step_(*got.args(), None, None, 0, 0, kernel="cpu")
    want = _reference(case)
    _assert_matches_reference(got, want, True)
    torch.testing.assert_close(got.scalars, want.scalars, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ bad input


def _good_args(n=2):
    case = Case([4] * n, torch.float32, torch.float32, True, seed=18)
    return [*case.args(), None, None, 0, 0]


@pytest.mark.parametrize("break_it,message", [
    (lambda a: a[1].pop(), "got 2 params but 1 grads"),
    (lambda a: a[4].pop(), "got 2 params but 1 hvps"),
    (lambda a: a.__setitem__(5, a[5].float()), "scalars must be a Double tensor"),
    (lambda a: a.__setitem__(5, a[5][:, :3]), r"scalars must be a Double tensor of shape \[n, 4\]"),
    (lambda a: a.__setitem__(6, a[6][:1]), r"index must be a Int tensor of shape \[2, 2\]"),
    (lambda a: a.__setitem__(6, a[6].long()), "index must be a Int tensor"),
    (lambda a: a.__setitem__(7, a[7][:, :5]), r"hparams must be a Double tensor of shape \[n, 6\]"),
    (lambda a: a.__setitem__(8, torch.ones(2)), "grad_scale must be a one-element float32 tensor"),
    (lambda a: a.__setitem__(9, torch.zeros(1, dtype=torch.float64)), "found_inf must be a one-element float32"),
    (lambda a: a[2].__setitem__(1, a[2][1].double()), r"exp_avgs\[1\] has dtype Double, expected Float"),
    (lambda a: [a[i].__setitem__(0, a[i][0].half()) for i in (2, 3)], r"exp_avgs\[0\] has dtype Half; state"),
    (lambda a: a[1].__setitem__(0, torch.randn(5)), r"grads\[0\] has shape \[5\]"),
    (lambda a: a[0].__setitem__(1, torch.randn(4).half()), r"params\[1\] has dtype Half but params\[0\] has Float"),
    (lambda a: a[0].__setitem__(0, torch.randn(8)[::2]), r"params\[0\] .* is not dense"),
    (lambda a: [a[i].__setitem__(0, torch.zeros(4, dtype=torch.int32)) for i in (0, 1, 4)],
     "parameters must be float32, float64, float16 or bfloat16, got Int"),
    (lambda a: a[6].__setitem__((1, 0), 99), r"index\[1, 0\] = 99 is not a row of scalars"),
    (lambda a: a[6].__setitem__((0, 1), -1), r"index\[0, 1\] = -1 is not a row of hparams"),
])
def test_bad_arguments_raise_naming_the_problem(ext, break_it, message):
    args = _good_args()
    break_it(args)
    with pytest.raises(RuntimeError, match=message):
        ext.step(*args)


def test_an_item_that_is_not_a_tensor_is_named(ext):
    args = _good_args()
    args[1][1] = 0.5
    with pytest.raises(TypeError, match=r"grads\[1\] is a float, not a tensor"):
        ext.step(*args)


def test_the_lists_are_read_without_taking_or_dropping_references(ext):
    """The lists are borrowed: every tensor's reference counts (C++ and Python) are what
    they were after calls that step, that refuse a tensor's layout and that refuse a
    non-tensor item; a tuple or any iterable does as well as a list."""
    args = _good_args()
    tensors = [t for k in (0, 1, 2, 3, 4) for t in args[k]]
    before = [(t._use_count(), sys.getrefcount(t)) for t in tensors]
    ext.step(*args)
    ext.step(*[tuple(a) if isinstance(a, list) else a for a in args])
    ext.step(*[iter(a) if isinstance(a, list) else a for a in args])
    bad = list(args)
    bad[1] = [args[1][0], torch.randn(5)]
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape \[5\]"):
        ext.step(*bad)
    bad[1] = [args[1][0], "g"]
    with pytest.raises(TypeError, match="is a str, not a tensor"):
        ext.step(*bad)
    del bad
    assert [(t._use_count(), sys.getrefcount(t)) for t in tensors] == before


def test_mismatched_strides_raise(ext):
    args = _good_args(1)
    args[0] = [torch.randn(3, 4)]
    args[1] = [torch.randn(4, 3).t()]
    args[2] = [torch.zeros(3, 4)]
    args[3] = [torch.zeros(3, 4)]
    args[4] = None
    with pytest.raises(RuntimeError, match=r"grads\[0\] has strides \[1, 3\] but its parameter has strides \[4, 1\]"):
        ext.step(*args)


# ------------------------------------------------------------------ the CUDA kernel (GPU)


def _cuda_ready():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = cpp_impl.CUDA_BACKEND.why_not(torch.device("cuda"), torch.float32)
    if reason is not None:
        pytest.fail(f"the 'cuda' backend cannot run on this GPU: {reason}")


def _cuda(case, **kw):
    return _kernel(cpp_impl.CUDA_BACKEND, case, **kw)


def _to(case, device):
    c = case.clone()
    for name in ("params", "grads", "exp_avgs", "exp_avg_ds", "hvps"):
        ts = getattr(c, name)
        if ts is not None:
            setattr(c, name, [t.to(device) for t in ts])
    c.scalars, c.index, c.hparams = (t.to(device) for t in (c.scalars, c.index, c.hparams))
    c.device = device
    return c


def _misalign(case):
    """Views one element into their storage: the element-wise path of the kernel."""
    c = case.clone()
    for name in ("params", "grads", "hvps"):
        ts = getattr(c, name)
        if ts is not None:
            setattr(c, name, [torch.cat([t.reshape(-1).new_zeros(1), t.reshape(-1)])[1:].view(t.shape)
                              if t.is_contiguous() else t for t in ts])
    return c


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "d_step"])
@pytest.mark.parametrize("dtype,state_dtype", COMBOS, ids=COMBO_IDS)
def test_cuda_kernel_matches_the_reference(ext, dtype, state_dtype, d_step, exact, offset):
    _cuda_ready()
    case = Case(SIZES + [(33, 17, 5)], dtype, state_dtype, d_step, device="cuda", seed=21,
                layouts=["contiguous"] * len(SIZES) + ["transposed"])
    if offset:
        case = _misalign(case)
        assert case.params[-2].data_ptr() % 16 != 0
    flags = rule.FLAG_EXACT if exact else 0
    gs = torch.tensor(2.0, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # the kernel runs on the current stream
        got = _cuda(case, flags=flags, grad_scale=gs)
    torch.cuda.synchronize()
    want = _reference(case, flags=flags, grad_scale=gs)
    _assert_matches_reference(got, want, d_step, device_exact_state=False)
    assert torch.equal(got.scalars[:, rule.DSCALE], case.scalars[:, rule.DSCALE])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,state_dtype", COMBOS, ids=COMBO_IDS)
def test_cuda_and_cpu_kernels_agree_to_the_bit(ext, dtype, state_dtype):
    """One rule, written once: same operations, same roundings, stochastic ones included."""
    _cuda_ready()
    if not cpp_impl.build_info()["cpu_isa"].startswith(("AVX2", "AArch64")):
        pytest.skip("the CPU kernel's baseline loop rounds torch's lerp twice; CUDA fuses it")
    sizes = [int(s) for s in torch.randint(1, 3000, (200,), generator=torch.Generator().manual_seed(0))]
    case = Case(sizes + [70001, 0, 1], dtype, state_dtype, True, seed=22)
    flags = rule.FLAG_STOCHASTIC_ROUNDING
    cpu = _cpu(case, flags=flags, seed=99, grad_scale=torch.tensor(4.0))
    gpu = _cuda(_to(case, "cuda"), flags=flags, seed=99, grad_scale=torch.tensor(4.0, device="cuda"))
    gpu = _to(gpu, "cpu")
    for name in ("params", "exp_avgs", "exp_avg_ds"):
        _assert_bits_equal(getattr(gpu, name), getattr(cpu, name), name)
    assert torch.equal(gpu.scalars, cpu.scalars)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_cuda_stochastic_rounding_is_the_reference_rounding(ext, dtype):
    _cuda_ready()
    case = Case([1, 17, 2049, 70001, 1_000_003], dtype, torch.float32, True, device="cuda", seed=23)
    flags = rule.FLAG_STOCHASTIC_ROUNDING
    got = _cuda(case, flags=flags, seed=31)
    twin = _cuda(case.as_dtype(torch.float32), flags=flags, seed=31)
    expected = _expected_rounding(twin, got, 31)
    for i, (p, e) in enumerate(zip(got.params, expected)):
        assert torch.equal(_bits(p), e.view(torch.int16)), f"params[{i}]"


@pytest.mark.gpu
def test_cuda_found_inf_writes_nothing_and_nan_policy(ext):
    _cuda_ready()
    case = Case([5, 70001], torch.bfloat16, torch.bfloat16, True, device="cuda", seed=24)
    got = _cuda(case, flags=rule.FLAG_STOCHASTIC_ROUNDING, found_inf=torch.ones((), device="cuda"))
    for name in ("params", "exp_avgs", "exp_avg_ds"):
        _assert_bits_equal(getattr(got, name), getattr(case, name), name)
    assert torch.equal(got.scalars, case.scalars)
    case.grads[1][[3, 500]] = float("nan")
    case.hvps[1][[4, 600]] = float("inf")
    got = _cuda(case, found_inf=torch.zeros((), device="cuda"))
    _assert_matches_reference(got, _reference(case), True, device_exact_state=False)
    assert torch.equal(got.params[1][[3, 500]], case.params[1][[3, 500]])


def _kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.gpu
def test_cuda_address_table_is_uploaded_once(ext):
    """Steady state: two kernels per step (the step and the scalars), no copy."""
    _cuda_ready()
    case = Case([7, 5001, 1, 300_007], torch.float32, torch.float32, False, device="cuda", seed=25)
    args = case.args()

    def step():
        cpp_impl.CUDA_BACKEND.step(*args, None, None, 0, 0)

    first = _kernel_names(step)
    assert any("upload" in k for k in first), first
    again = _kernel_names(step)
    assert len(again) == 2 and not any("upload" in k or "Memcpy" in k for k in again), again


@pytest.mark.gpu
def test_cuda_step_can_be_captured_in_a_graph(ext):
    _cuda_ready()
    case = Case([7, 5000, 1, 300_000], torch.bfloat16, torch.float32, True, device="cuda", seed=26)
    eager = case.clone()
    graphed = case.clone()
    gs = torch.tensor(2.0, device="cuda")
    fi = torch.zeros((), device="cuda")
    flags = rule.FLAG_STOCHASTIC_ROUNDING

    def step(c):
        cpp_impl.CUDA_BACKEND.step(*c.args(), gs, fi, flags, 5)

    for _ in range(3):
        step(eager)
    warm = graphed.clone()  # warm up on a side stream (the table for other addresses)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(warm)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for name in ("params", "exp_avgs", "exp_avg_ds"):
        _assert_bits_equal(getattr(graphed, name), getattr(eager, name), name)
    assert torch.equal(graphed.scalars, eager.scalars)
    fi.fill_(1.0)  # a skipped step, decided on the device inside the graph
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graphed.scalars, eager.scalars)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_kernel_indexes_past_2_to_the_31(ext):
    """A bfloat16 tensor of 2^31 + 4099 elements (24 GiB with its state)."""
    _cuda_ready()
    n = 2 ** 31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs a GPU with 40 GiB")
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    m = torch.randn(n, device="cuda", generator=gen)
    d = torch.rand(n, device="cuda", generator=gen)
    scalars = torch.tensor([[0.9, 0.5, 3.0, 0.0]], dtype=torch.float64, device="cuda")
    index = torch.zeros(1, 2, dtype=torch.int32, device="cuda")
    hparams = torch.tensor([HPARAMS[1]], dtype=torch.float64, device="cuda")
    ends = [slice(0, 5000), slice(2 ** 31 - 3000, 2 ** 31 + 3000), slice(n - 5000, n)]
    want = []
    for s in ends:
        pw, mw, dw = p[s].clone(), m[s].clone(), d[s].clone()
        rule.reference_step([pw], [g[s]], [mw], [dw], None, scalars.clone(), index, hparams,
                            None, None, 0, 0)
        want.append((pw, mw))
    cpp_impl.CUDA_BACKEND.step([p], [g], [m], [d], None, scalars, index, hparams, None, None, 0, 0)
    for s, (pw, mw) in zip(ends, want):
        torch.testing.assert_close(p[s], pw, rtol=2 ** -7, atol=1e-6)
        torch.testing.assert_close(m[s], mw, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("d_step", [False, True])
def test_bfloat16_state_stores_what_torch_rounds_to(ext, d_step):
    """What the CPU kernel stores in bfloat16 state and bfloat16 parameters (rounding to
    nearest) is torch's own round-to-nearest-even of its float32 result, overflow to inf
    and NaN included.  The float32 result comes from the same kernel run on float32 state
    (bfloat16 values are exact in float32) and float32 parameters."""
    case = Case([4096, 333, 17], torch.bfloat16, torch.bfloat16, d_step, seed=21)
    # values whose float32 updates land on and around bfloat16 ties and overflow
    case.exp_avgs[0][:64] = torch.tensor([3.3895e38, -3.3895e38, float("nan"), float("inf")] * 16,
                                         dtype=torch.bfloat16)
    case.grads[0][64:128] = torch.tensor([3.3e38, float("nan"), -0.0, 1e-40] * 16, dtype=torch.bfloat16)
    wide = case.as_dtype(torch.float32)
    wide.exp_avgs = [t.float() for t in wide.exp_avgs]
    wide.exp_avg_ds = [t.float() for t in wide.exp_avg_ds]
    for flags in (0, rule.FLAG_EXACT):
        got = _cpu(case, flags=flags)
        want = _cpu(wide, flags=flags)
        for name in ("exp_avgs", "params") + (("exp_avg_ds",) if d_step else ()):
            rounded = [t.to(torch.bfloat16) for t in getattr(want, name)]
            _assert_bits_equal(getattr(got, name), rounded, name)


# (float state: the 8-bit loops have their own instruction-set test in test_quant_kernels.py)
ISA_COMBOS = [(p, s) for p, s in COMBOS if s != torch.uint8]


def _isa_outputs():
    """The CPU kernel's results on every float (param, state) dtype pair, plain and
    D-step, default and exact, with and without grad_scale and stochastic rounding."""
    out = []
    for k, (dtype, state_dtype) in enumerate(ISA_COMBOS):
        for d_step in (False, True):
            case = Case(SIZES, dtype, state_dtype, d_step, seed=40 + k)
            for flags, gs in ((0, None), (rule.FLAG_EXACT, torch.tensor(4.0)),
                              (rule.FLAG_STOCHASTIC_ROUNDING, None)):
                c = _cpu(case, flags=flags, seed=9, grad_scale=gs)
                out.append([c.params, c.exp_avgs, c.exp_avg_ds, [c.scalars]])
    return out


def test_cpu_loops_on_avx512_and_avx2_store_the_same_bytes(ext, tmp_path):
    """The float loops compiled for AVX-512 (where the CPU and ATen have it) and for AVX2
    (ATEN_CPU_CAPABILITY=avx2, in a subprocess) store the same bytes."""
    if "AVX-512" not in ext.build_info()["cpu_isa"]:
        pytest.skip("the loops run AVX-512 only on CPUs (and ATen builds) that have it")
    avx2 = outputs_under_avx2(tmp_path, "test_cpp_backend", "_isa_outputs")
    for k, (a, b) in enumerate(zip(_isa_outputs(), avx2)):
        for what, xs, ys in zip(("params", "exp_avgs", "exp_avg_ds", "scalars"), a, b):
            for i, (x, y) in enumerate(zip(xs, ys)):
                assert torch.equal(_bits(x), _bits(y)), f"case {k}: {what}[{i}] differ between AVX-512 and AVX2"
