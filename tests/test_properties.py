"""Property-based tests (hypothesis): random shapes, dtypes, layouts and hyper-parameters.

1. The fused backends agree with the ``"torch"`` backend (the plain-PyTorch rule of
   :mod:`esgdm.rule`): after each of K steps, parameters and every state tensor of
   ``backend="cpu"`` and ``backend="triton"`` (Triton's interpreter on CPU tensors, see
   conftest.py) equal those of ``backend="torch"`` within per-dtype tolerances.
2. A step that raises changes nothing: parameters, state and counters are exactly as
   before, and the next valid step gives bit for bit what an optimizer that never saw
   the bad call gives (so nothing hidden changed either).
3. A bad gradient (another shape or dtype, sparse, a negated view) is refused that
   way on every backend; a gradient merely laid out otherwise (transposed, sliced,
   expanded, misaligned) steps bit for bit as its contiguous copy.
4. A corrupted checkpoint either is refused, changing nothing, or loads and reads back
   exactly as given.

The loss is a sum of functions of single coordinates, so its Hessian is diagonal and
the Hessian-vector product is exact whatever signs are drawn; every element's
trajectory depends on that element alone.  Some elements ("dead" ones) see a purely
linear loss: their curvature is exactly zero, which exercises the unobserved-curvature
rule (``dscale``) and, with ``exact=True``, the ``g / eps`` step.

Tolerances.  The backends may evaluate the float32 rule with other roundings (fused
multiply-adds), so float32 (float64) values agree to about 1e-5 (1e-12) relative per
step.  A value stored in a 16-bit dtype (a bf16/fp16 parameter, bf16 state) rounds
identically unless the float32 values before rounding straddle a rounding boundary
(or, with stochastic rounding, the random threshold): then the two differ by exactly
one unit in the last place, which is rare.  Such an element is allowed one ulp of
difference once, is counted, and is left out of later comparisons (its inputs now
differ legitimately); the count must stay small.  A backend that rounds the wrong way,
draws other random bits or computes another rule differs on many elements, or by more
than an ulp, and fails.

Generation is derandomized (the same examples every run), so CI is reproducible.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import esgdm
from esgdm import backends
from esgdm.rule import FLAG_EXACT

CPU = torch.device("cpu")
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
HALF = (BF16, F16)
DTYPES = (F32, BF16, F16, F64)

#: Largest size of each dimension, by number of dimensions (at most a few hundred elements).
MAX_DIM = {1: 40, 2: 9, 3: 5, 4: 4}

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


def _why_not(name: str, dtype: torch.dtype):
    return backends.get(name).why_not(CPU, dtype)


# ------------------------------------------------------------------ generation

@dataclass
class TensorSpec:
    shape: tuple
    layout: str       # contiguous | transposed | channels_last | strided
    dtype: torch.dtype
    dead: float       # fraction of elements whose loss is linear (no curvature)
    group: int


@dataclass
class Case:
    specs: list
    groups: list      # hyper-parameters of each param group (dicts)
    tensor_lr: list   # per group: give lr as a 0-d tensor
    exact: bool
    stochastic_rounding: bool
    state_dtype: torch.dtype
    d_warmup: int
    update_d_every: int
    steps: int
    drops: list = field(default_factory=list)  # per step: tensor indices whose grad is dropped
    seed: int = 0
    data_seed: int = 0


@st.composite
def tensor_specs(draw, dtypes, n_groups, min_numel=0):
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed", "channels_last"]))
    ndim = 4 if layout == "channels_last" else draw(st.integers(2 if layout == "transposed" else 1, 4))
    lo = 1 if min_numel else 0
    shape = tuple(draw(st.lists(st.integers(lo, MAX_DIM[ndim]), min_size=ndim, max_size=ndim)))
    if min_numel and math.prod(shape) < min_numel:
        shape = shape[:-1] + (shape[-1] + min_numel,)
    return TensorSpec(
        shape=shape,
        layout=layout,
        dtype=draw(st.sampled_from(dtypes)),
        dead=draw(st.sampled_from([0.0, 0.0, 0.25, 1.0])),
        group=draw(st.integers(0, n_groups - 1)),
    )


@st.composite
def group_hparams(draw):
    return dict(
        lr=draw(st.floats(1e-3, 1.0)),
        betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 1.0))),
        lr_warmup=draw(st.floats(0.0, 0.999)),
        eps=10 ** draw(st.floats(-4.0, -2.0)),
        weight_decay=draw(st.sampled_from([0.0, 0.0, 1e-3, 0.05, 0.5])),
    )


@st.composite
def cases(draw, dtypes, max_tensors=3, max_steps=6, exact=None, stochastic_rounding=None,
          state_dtype=None):
    # One or two parameter dtypes per example (two dtypes: two buckets).
    chosen = draw(st.lists(st.sampled_from(dtypes), min_size=1, max_size=2, unique=True))
    n_groups = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_tensors))
    specs = [draw(tensor_specs(chosen, n_groups, min_numel=1 if i == 0 else 0)) for i in range(n)]
    used = sorted({s.group for s in specs})  # no empty groups
    for s in specs:
        s.group = used.index(s.group)
    groups = [draw(group_hparams()) for _ in used]
    if exact is None:
        exact = draw(st.booleans())
    if stochastic_rounding is None:
        stochastic_rounding = draw(st.booleans())
    if state_dtype is None:
        state_dtype = draw(st.sampled_from([F32, BF16]))
    # Drawn so that the simplest example (which hypothesis favours) is the longest run.
    steps = max_steps - draw(st.integers(0, max_steps - 1))
    drops = [draw(st.sets(st.integers(0, n - 1), max_size=n - 1)) if draw(st.integers(0, 3)) == 0
             else set() for _ in range(steps)]
    return Case(
        specs=specs, groups=groups, tensor_lr=[draw(st.integers(0, 3)) == 0 for _ in groups],
        exact=exact, stochastic_rounding=stochastic_rounding, state_dtype=state_dtype,
        d_warmup=draw(st.integers(1, 3)), update_d_every=draw(st.integers(1, 3)),
        steps=steps, drops=drops, seed=draw(st.integers(0, 2**40)),
        data_seed=draw(st.integers(0, 2**31 - 1)),
    )


# ------------------------------------------------------------------ problem

def make_param(spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    """A leaf tensor of ``spec.shape`` with the asked layout, values ~ N(0, 1)."""
    shape = spec.shape

    def randn(s):
        return torch.randn(s, generator=gen, dtype=F64).to(spec.dtype)

    if spec.layout == "transposed":
        t = randn(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    elif spec.layout == "channels_last":
        t = randn(shape).contiguous(memory_format=torch.channels_last)
    elif spec.layout == "strided":  # every other element of a wider tensor: not dense
        t = randn(shape[:-1] + (2 * shape[-1] + 1,))[..., 1::2]
    else:
        t = randn(shape)
    return t.requires_grad_()


def make_coeffs(spec: TensorSpec, gen: torch.Generator):
    """(a, b, c, l) of the per-coordinate loss a x^4 + b x^2 + c sin(3x) + l x, in the
    loss's dtype; a ``dead`` fraction of the coordinates has only the linear term (zero
    curvature: D stays 0 there)."""
    shape = spec.shape
    a = torch.rand(shape, generator=gen, dtype=F64) * 0.5 + 0.1
    b = torch.rand(shape, generator=gen, dtype=F64) + 0.5
    # |c| <= 0.1 keeps each function convex (f'' >= 2b - 9|c| >= 0.1): no coordinate is
    # thrown far away by a step through a near-zero curvature, whatever lr and betas.
    c = (torch.rand(shape, generator=gen, dtype=F64) * 2 - 1) * 0.1
    lin = torch.randn(shape, generator=gen, dtype=F64) * 0.1
    dead = torch.rand(shape, generator=gen, dtype=F64) < spec.dead
    live = (~dead).to(F64)
    math_dtype = F64 if spec.dtype == F64 else F32
    return tuple(t.to(math_dtype) for t in (a * live, b * live, c * live, lin * dead.to(F64)))


def loss_of(params, coeffs):
    total = 0
    for p, (a, b, c, lin) in zip(params, coeffs):
        x = p.to(a.dtype)
        total = total + (a * x**4 + b * x**2 + c * torch.sin(3 * x) + lin * x).sum().to(F64)
    return total


class Run:
    """One optimizer over a fresh copy of the case's parameters."""

    def __init__(self, case: Case, backend: str, hvp: str = "autograd", fd_scheme: str = "forward"):
        gen = torch.Generator().manual_seed(case.data_seed)
        self.params = [make_param(s, gen) for s in case.specs]
        self.coeffs = [make_coeffs(s, gen) for s in case.specs]
        groups = []
        for gi, hp in enumerate(case.groups):
            hp = dict(hp)
            if case.tensor_lr[gi]:
                hp["lr"] = torch.tensor(hp["lr"], dtype=F64)
            groups.append(dict(params=[p for p, s in zip(self.params, case.specs) if s.group == gi], **hp))
        # state_dict() numbers the parameters group by group: map back to our indices.
        self.order = [i for gi in range(len(case.groups)) for i, s in enumerate(case.specs) if s.group == gi]
        self.opt = esgdm.ESGDM(
            groups, backend=backend, seed=case.seed, exact=case.exact,
            stochastic_rounding=case.stochastic_rounding, state_dtype=case.state_dtype,
            d_warmup=case.d_warmup, update_d_every=case.update_d_every, hvp=hvp, fd_scheme=fd_scheme)

    def loss(self):
        return loss_of(self.params, self.coeffs)

    def closure(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward(create_graph=self.opt.should_create_graph())
        return loss

    def backward(self, drop=()):
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward(create_graph=self.opt.should_create_graph())
        for i in drop:
            self.params[i].grad = None

    def step(self, drop=()):
        if self.opt.hvp == "finite_difference":
            self.opt.step(self.closure)
        else:
            self.backward(drop)
            self.opt.step()

    def state(self):
        """``{(param index, key): tensor}`` of ``opt.state_dict()["state"]``, copied."""
        return {(self.order[k], key): torch.as_tensor(v).detach().clone()
                for k, entry in self.opt.state_dict()["state"].items() for key, v in entry.items()}


# ------------------------------------------------------------------ comparison

def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at ``|x|`` (float64; subnormal spacing below tiny)."""
    info = torch.finfo(dtype)
    ax = x.double().abs().clamp(min=info.tiny)
    _, e = torch.frexp(ax)  # ax = m * 2**e, m in [0.5, 1)
    return torch.ldexp(torch.full_like(ax, info.eps), (e - 1).to(torch.int32)).double()


class Comparer:
    """Compares one backend's run with the reference run, step after step, keeping
    per-tensor masks of elements that legitimately diverged (a one-ulp rounding
    difference of a stored 16-bit value)."""

    def __init__(self, case: Case, name: str):
        self.case, self.name = case, name
        self.diverged = [torch.zeros(s.shape, dtype=torch.bool) for s in case.specs]
        self.flips = 0
        self.half_elements = 0

    def _rtol(self, dtype, k):
        return (1e-12 if dtype == F64 else 1e-5) * k

    def quantity(self, what, i, a, b, k):
        """Compares tensor ``a`` (backend) with ``b`` (reference) of parameter ``i``."""
        assert a.shape == b.shape and a.dtype == b.dtype, (what, i, a.shape, b.shape, a.dtype, b.dtype)
        if a.numel() == 0:
            return None
        live = ~self.diverged[i]
        ad, bd = a.detach().double(), b.detach().double()
        diff = (ad - bd).abs()
        where = f"{self.name}: {what} of parameter {i} ({self.case.specs[i]}) after step {k}"
        # Non-finite values (not expected with this loss) must match exactly; such
        # elements are left out from then on.
        finite_a, finite_b = torch.isfinite(ad), torch.isfinite(bd)
        odd = live & ~(finite_a & finite_b)
        assert torch.equal(ad[odd].nan_to_num(7.0), bd[odd].nan_to_num(7.0)), (
            f"{where}: non-finite values differ: {ad[odd][:5].tolist()} vs {bd[odd][:5].tolist()}")
        if odd.any():
            event("non-finite values")
            self.diverged[i] |= odd
            live = live & ~odd
        diff = torch.where(live, diff, torch.zeros_like(diff))
        if a.dtype in HALF:
            self.half_elements += a.numel()
            tol = ulp(torch.maximum(ad.abs(), bd.abs()), a.dtype)
            bad = live & (diff > tol)
            assert not bad.any(), (
                f"{where}: differs by more than one ulp at {bad.nonzero()[:5].tolist()}: "
                f"{ad[bad][:5].tolist()} vs {bd[bad][:5].tolist()}")
            return live & (diff > 0)  # newly diverged (one ulp)
        rtol = self._rtol(a.dtype, k)
        scale = bd[live].abs().max() if live.any() else bd.new_zeros(())
        bad = live & (diff > rtol * (bd.abs() + scale))
        assert not bad.any(), (
            f"{where}: differs beyond rtol {rtol:g} at {bad.nonzero()[:5].tolist()}: "
            f"{ad[bad][:5].tolist()} vs {bd[bad][:5].tolist()}")
        return None

    def compare(self, run: Run, ref: Run, k: int):
        assert (run.opt.steps, run.opt.steps_since_d) == (ref.opt.steps, ref.opt.steps_since_d)
        new = [torch.zeros(s.shape, dtype=torch.bool) for s in self.case.specs]
        for i, (p, q) in enumerate(zip(run.params, ref.params)):
            flipped = self.quantity("the value", i, p, q, k)
            if flipped is not None:
                new[i] |= flipped
        sa, sb = run.state(), ref.state()
        assert sa.keys() == sb.keys(), f"{self.name}: state keys {sorted(sa)} vs {sorted(sb)}"
        for (i, key), va in sa.items():
            vb = sb[(i, key)]
            if va.dim() == 0:  # exp_avg_bias_corr, lr_warmup_cumprod, step: float64 scalars
                assert va.dtype == vb.dtype and torch.allclose(va, vb, rtol=1e-14, atol=0), (
                    f"{self.name}: {key} of parameter {i} after step {k}: {va.item()} vs {vb.item()}")
                continue
            flipped = self.quantity(key, i, va, vb, k)
            if flipped is not None:
                new[i] |= flipped
        for i in range(len(new)):
            self.flips += int(new[i].sum())
            self.diverged[i] |= new[i]

    def check_flips(self):
        # Each one-ulp flip needs the float32 values of the two backends to straddle a
        # rounding boundary: of the order of 2**-13 per element and step.  Allow a few.
        allowed = 2 + self.half_elements // 200
        assert self.flips <= allowed, (
            f"{self.name}: {self.flips} one-ulp differences in {self.half_elements} compared "
            f"16-bit values (at most {allowed} expected from rounding alone)")


def check_agreement(case: Case, name: str):
    event(f"dtypes {sorted(str(s.dtype)[6:] for s in case.specs)}")
    event(f"{case.steps} steps")
    event(f"layouts {sorted(s.layout for s in case.specs)}")
    event(f"exact={case.exact} sr={case.stochastic_rounding} state={str(case.state_dtype)[6:]}")
    event(f"numel {[math.prod(s.shape) for s in case.specs]}")
    runs = {"torch": Run(case, "torch"), name: Run(case, name)}
    comparer = Comparer(case, name)
    for k in range(case.steps):
        for run in runs.values():
            run.step(case.drops[k])
        comparer.compare(runs[name], runs["torch"], k + 1)
    comparer.check_flips()


def _skip_unless(name: str):
    reason = _why_not(name, F32)
    if reason is not None:
        pytest.skip(f"backend {name!r} cannot run here: {reason}")


def _dtypes(name: str):
    return tuple(d for d in DTYPES if _why_not(name, d) is None) or (F32,)


#: Every combination of the flags that select code paths in the kernels.
FLAG_COMBOS = [dict(exact=e, stochastic_rounding=sr, state_dtype=sd)
               for e in (False, True) for sr in (False, True) for sd in (F32, BF16)]
FLAG_IDS = [f"exact={c['exact']}-sr={c['stochastic_rounding']}-state={str(c['state_dtype'])[6:]}"
            for c in FLAG_COMBOS]


@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=FLAG_IDS)
@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_cpu_backend_agrees_with_torch(flags, data):
    _skip_unless("cpu")
    check_agreement(data.draw(cases(_dtypes("cpu"), **flags), label="case"), "cpu")


@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=FLAG_IDS)
@settings(max_examples=4, **SETTINGS)
@given(data=st.data())
def test_triton_backend_agrees_with_torch(flags, data):
    _skip_unless("triton")
    check_agreement(data.draw(cases(_dtypes("triton"), max_tensors=2, max_steps=5, **flags),
                              label="case"), "triton")


# ------------------------------------------------------------------ failed steps

class Boom(Exception):
    """What the raising closure raises."""


BAD_INPUTS = ("sparse_grad", "expanded_data", "shape_change", "bad_hparam", "no_create_graph")

BAD_HPARAMS = (
    ("lr", -0.1), ("lr", float("nan")), ("lr", float("inf")), ("weight_decay", float("nan")),
    ("weight_decay", -1.0), ("betas", (1.0, 0.999)), ("betas", (0.9, 1.5)), ("eps", -1e-3),
    ("lr_warmup", 1.0), ("lr", "0.1"),
)


def snapshot(run: Run):
    return ([p.detach().clone() for p in run.params], run.state(),
            (run.opt.steps, run.opt.steps_since_d), run.opt.seed)


def assert_same(before, after, what):
    (pa, sa, ca, seeda), (pb, sb, cb, seedb) = before, after
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: parameter {i} changed"
    assert sa.keys() == sb.keys(), f"{what}: state entries {sorted(sa)} became {sorted(sb)}"
    for key, a in sa.items():
        b = sb[key]
        assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: state {key} changed"
    assert ca == cb, f"{what}: (steps, steps_since_d) {ca} became {cb}"
    assert seeda == seedb, f"{what}: the seed changed"


def _available_backends():
    return [n for n in ("torch", "cpu", "triton") if _why_not(n, F32) is None]


def valid_start(draw, hvp="autograd", fd_scheme="forward", min_steps=0, d_step_next=False, backend=None):
    """Two identical optimizers after the same valid steps; only the first will see the
    bad call.  Returns ``(run, twin, backend)``."""
    # Mostly the quick backends (the checks that must fail run before any kernel).
    names = _available_backends()
    if backend is None:
        backend = draw(st.sampled_from([n for n in names for _ in range(1 if n == "triton" else 3)]),
                       label="backend")
    case = draw(cases(_dtypes(backend), max_tensors=3, max_steps=4), label="case")
    case.drops = [set() for _ in case.drops]
    valid_steps = draw(st.integers(min_steps, case.steps), label="valid steps")
    event(f"backend {backend}, {valid_steps} valid steps first")
    run, twin = Run(case, backend, hvp, fd_scheme), Run(case, backend, hvp, fd_scheme)
    for _ in range(valid_steps):
        run.step()
        twin.step()
    while d_step_next and not run.opt.is_d_step():
        run.step()
        twin.step()
    return run, twin, backend


def check_nothing_changed(run: Run, twin: Run, before, what: str):
    assert_same(before, snapshot(run), f"after a failed step ({what})")
    # Nothing hidden changed either: the next valid step matches the twin's bit for bit.
    run.step()
    twin.step()
    assert_same(snapshot(twin), snapshot(run), f"the valid step after a failed one ({what})")


@pytest.mark.parametrize("bad", BAD_INPUTS)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_a_raising_step_changes_nothing(bad, data):
    """A bad input between valid steps: the step raises, and parameters, state and
    counters are as before (checks run for every bucket before the first write)."""
    draw = data.draw
    run, twin, backend = valid_start(draw, min_steps=1 if bad == "shape_change" else 0,
                                     d_step_next=bad == "no_create_graph")
    ps, opt = run.params, run.opt
    run.backward()
    before = snapshot(run)
    repair = []  # (parameter, its data) to put back afterwards: references only
    if bad == "sparse_grad":
        i = draw(st.integers(0, len(ps) - 1), label="tensor")
        ps[i].grad = ps[i].grad.detach().to_sparse()
    elif bad == "expanded_data":
        candidates = [i for i, p in enumerate(ps) if p.numel() > 1]
        assume(candidates)
        i = draw(st.sampled_from(candidates), label="tensor")
        repair.append((ps[i], ps[i].data))
        source = torch.randn([1] * ps[i].dim(), dtype=ps[i].dtype)
        ps[i].data = source.expand(ps[i].shape)
        source_before = source.clone()
    elif bad == "shape_change":  # a parameter that has state (it was stepped)
        i = draw(st.integers(0, len(ps) - 1), label="tensor")
        repair.append((ps[i], ps[i].data))
        ps[i].data = torch.randn(ps[i].numel() + 1, dtype=ps[i].dtype)
    elif bad == "bad_hparam":
        gi = draw(st.integers(0, len(opt.param_groups) - 1), label="group")
        key, value = draw(st.sampled_from(BAD_HPARAMS), label="hyper-parameter")
        group = opt.param_groups[gi]
        old = group[key]
        group[key] = value
    elif bad == "no_create_graph":
        assert opt.is_d_step()
        opt.zero_grad(set_to_none=True)
        run.loss().backward()  # without create_graph
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        opt.step()
    if bad == "expanded_data":
        assert torch.equal(source, source_before), "the expanded parameter's memory was written"
    if bad == "bad_hparam":
        group[key] = old
    for p, p_data in repair:
        p.data = p_data
    check_nothing_changed(run, twin, before, f"{bad}, backend {backend!r}")


@pytest.mark.parametrize("hvp,in_probe", [("autograd", False), ("auto", False),
                                           ("finite_difference", False), ("finite_difference", True)])
@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_a_raising_closure_changes_nothing(hvp, in_probe, data):
    """The closure raises: on its first call, or inside the finite-difference probe
    (the parameters are perturbed then), before or after its backward pass."""
    draw = data.draw
    fd_scheme = draw(st.sampled_from(["forward", "central"]), label="fd_scheme")
    run, twin, backend = valid_start(draw, hvp, fd_scheme,
                                     d_step_next=in_probe or draw(st.booleans(), label="D-step"))
    opt = run.opt
    # On a finite-difference D-step the probe calls the closure again (twice: central).
    probes = 0 if not (hvp == "finite_difference" and opt.is_d_step()) else (
        1 if fd_scheme == "forward" else 2)
    assert probes or not in_probe
    raise_on = draw(st.integers(2, 1 + probes) if in_probe else st.just(1), label="raise on call")
    event(f"raise on call {raise_on} of {1 + probes}")
    after_backward = draw(st.booleans(), label="raise after backward")
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = run.loss()
        if calls[0] == raise_on and not after_backward:
            raise Boom
        loss.backward(create_graph=opt.should_create_graph())
        if calls[0] == raise_on:
            raise Boom
        return loss

    before = snapshot(run)
    with pytest.raises(Boom):
        opt.step(closure)
    assert calls[0] == raise_on
    check_nothing_changed(run, twin, before, f"closure raising on call {raise_on}, hvp={hvp!r}, "
                                             f"fd_scheme={fd_scheme!r}, backend {backend!r}")


# ------------------------------------------------------------------ bad gradients

#: Gradients that cannot be read as their parameter's: refused, nothing changes.
REFUSED_GRADS = ("shape", "flattened", "dtype", "sparse", "negated")
#: Gradients only laid out otherwise: stepped exactly as their contiguous copies.
RELAID_GRADS = ("transposed", "sliced", "expanded", "offset", "channels_last")


def relaid(kind: str, g: torch.Tensor) -> torch.Tensor:
    """``g``'s values (differentiably, so an autograd D-step still sees its graph) in
    another memory layout."""
    if kind == "transposed":
        return g.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":  # every other element of a wider tensor
        return torch.stack([g, g], dim=-1)[..., 0]
    if kind == "expanded":  # one value, stride 0 everywhere
        return (g.reshape(-1)[:1] * 0.5).reshape([1] * g.dim()).expand(g.shape)
    if kind == "offset":  # contiguous, one element into its storage
        flat = g.reshape(-1)
        return torch.cat([flat[:1], flat])[1:].view(g.shape)
    if kind == "channels_last":
        return g.contiguous(memory_format=torch.channels_last)
    raise AssertionError(kind)


def refused(kind: str, g: torch.Tensor, draw) -> torch.Tensor:
    """A tensor that must not be read as the gradient ``g`` stands for."""
    g = g.detach()
    if kind == "shape":
        return torch.ones(g.numel() + draw(st.integers(1, 3), label="extra elements"), dtype=g.dtype)
    if kind == "flattened":  # the same bytes, another shape
        return g.reshape(-1).clone() if g.dim() > 1 else g.reshape(1, -1).clone()
    if kind == "dtype":
        return g.to(draw(st.sampled_from([d for d in DTYPES if d != g.dtype]), label="dtype"))
    if kind == "sparse":
        return g.to_sparse()
    if kind == "negated":  # the same values, but its memory holds -g
        return g.neg()._neg_view()
    raise AssertionError(kind)


def check_bad_gradient(backend, data):
    """Random parameters (shapes, dtypes, layouts) after some valid steps; one gradient
    is replaced.  One that is not its parameter's (shape, dtype, sparse, negated view)
    is refused before any write, on every backend: parameters, state, counters and the
    global RNG are as before and the next valid step is bit for bit the twin's.  One
    that is only laid out otherwise (transposed, sliced, expanded, misaligned,
    channels-last) gives bit for bit what its contiguous copy gives."""
    if backend not in _available_backends():
        pytest.skip(f"no {backend} backend here")
    draw = data.draw
    run, twin, _ = valid_start(draw, backend=backend)
    kind = draw(st.sampled_from(REFUSED_GRADS + RELAID_GRADS), label="kind")
    ps = run.params
    fits = [i for i, p in enumerate(ps)
            if not (kind == "transposed" and p.dim() < 2) and not (kind == "channels_last" and p.dim() != 4)
            and not (kind in ("expanded", "offset", "flattened", "negated", "sparse") and p.numel() == 0)]
    assume(fits)
    i = draw(st.sampled_from(fits), label="tensor")
    event(f"{kind} gradient, backend {backend}")
    run.backward()
    if kind in RELAID_GRADS:
        twin.backward()
        ps[i].grad = relaid(kind, ps[i].grad)
        twin.params[i].grad = relaid(kind, twin.params[i].grad).contiguous()
        run.opt.step()
        twin.opt.step()
        assert_same(snapshot(twin), snapshot(run), f"a {kind} gradient of parameter {i}")
        return
    bad = refused(kind, ps[i].grad, draw)
    if kind in ("sparse", "negated"):
        ps[i].grad = bad
    else:
        ps[i].grad.data = bad
    before, rng = snapshot(run), torch.get_rng_state()
    with pytest.raises(RuntimeError, match="gradient of parameter .* in group"):
        run.opt.step()
    assert torch.equal(rng, torch.get_rng_state()), "a refused step drew from the global RNG"
    check_nothing_changed(run, twin, before, f"a {kind} gradient of parameter {i}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_bad_gradient_raises_or_equals_contiguous(backend, data):
    check_bad_gradient(backend, data)


@settings(max_examples=3, **SETTINGS)  # the interpreter is slow
@given(data=st.data())
def test_bad_gradient_raises_or_equals_contiguous_triton(data):
    check_bad_gradient("triton", data)


# ------------------------------------------------------------------ corrupted checkpoints

CORRUPTIONS = ("nan_exp_avg", "inf_exp_avg_d", "negative_exp_avg_d", "exp_avg_shape", "bias_above_1",
               "bias_negative", "bias_nan", "warm_5", "warm_negative", "step_negative", "step_fraction",
               "missing_state_key", "state_dtype", "steps_negative", "missing_global_key", "seed_negative",
               "lr_nan", "state_of_unknown_parameter")


def corrupt(sd: dict, kind: str, draw) -> None:
    """Makes ``sd`` (a deep copy of a state dict) impossible for a real run, in place."""
    glob, state = sd["global_state"], sd["state"]
    if kind in ("steps_negative", "missing_global_key", "seed_negative", "state_dtype"):
        if kind == "steps_negative":
            glob["steps"] = -3
        elif kind == "seed_negative":
            glob["seed"] = -1
        elif kind == "state_dtype":
            glob["state_dtype"] = "float16"
        else:
            del glob[draw(st.sampled_from(sorted(glob)), label="global key")]
        for group in sd["param_groups"]:  # its copy for torch.distributed.checkpoint
            group.pop("esgdm_global_state", None)
        return
    if kind == "lr_nan":
        sd["param_groups"][draw(st.integers(0, len(sd["param_groups"]) - 1), label="group")]["lr"] = float("nan")
        return
    if kind == "state_of_unknown_parameter":
        state[max(state) + 1] = dict(state[min(state)])
        return
    candidates = sorted(k for k, e in state.items() if e and (e["exp_avg"].numel() > 0 or kind not in (
        "nan_exp_avg", "inf_exp_avg_d", "negative_exp_avg_d")))
    assume(candidates)
    entry = state[draw(st.sampled_from(candidates), label="parameter id")]
    if kind in ("nan_exp_avg", "inf_exp_avg_d", "negative_exp_avg_d"):
        key = "exp_avg" if kind == "nan_exp_avg" else "exp_avg_d"
        t = entry[key].clone(memory_format=torch.contiguous_format)  # (the state may be transposed)
        j = draw(st.integers(0, t.numel() - 1), label="element")
        t.view(-1)[j] = {"nan_exp_avg": float("nan"), "inf_exp_avg_d": float("inf"),
                         "negative_exp_avg_d": -1.0}[kind]
        entry[key] = t
    elif kind == "exp_avg_shape":
        entry["exp_avg"] = torch.zeros(entry["exp_avg"].numel() + 1, dtype=entry["exp_avg"].dtype)
    elif kind == "missing_state_key":
        del entry[draw(st.sampled_from(sorted(entry)), label="state key")]
    else:
        key, value = {"bias_above_1": ("exp_avg_bias_corr", 1.5), "bias_negative": ("exp_avg_bias_corr", -0.5),
                      "bias_nan": ("exp_avg_bias_corr", float("nan")), "warm_5": ("lr_warmup_cumprod", 5.0),
                      "warm_negative": ("lr_warmup_cumprod", -0.1), "step_negative": ("step", -3.0),
                      "step_fraction": ("step", 2.5)}[kind]
        entry[key] = torch.tensor(value, dtype=torch.float64)


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        return a.shape == b.shape and torch.equal(a.nan_to_num(7.5), b.nan_to_num(7.5))
    return a == b


#: What load_state_dict accepted, by corruption (reported by the last example of each).
LOADED = set()


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_corrupted_checkpoint_raises_or_round_trips(data):
    """A checkpoint of a random run, corrupted (non-finite or negative state, bias or
    warm-up products out of range, bad step counts, wrong shapes, missing keys, a bad
    state dtype or group): loading it either raises and changes nothing (the next valid
    step is bit for bit the twin's), or loads, and then everything it holds reads back
    from ``state_dict()`` as it was given."""
    draw = data.draw
    run, twin, backend = valid_start(draw, min_steps=1)
    assume(any(run.opt.state_dict()["state"].values()))
    kind = draw(st.sampled_from(CORRUPTIONS), label="corruption")
    bad = copy.deepcopy(run.opt.state_dict())
    corrupt(bad, kind, draw)
    before = snapshot(run)
    try:
        run.opt.load_state_dict(copy.deepcopy(bad))
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        event(f"{kind}: refused ({type(e).__name__})")
        check_nothing_changed(run, twin, before, f"a checkpoint with {kind}, backend {backend!r}")
        return
    event(f"{kind}: loaded")
    LOADED.add(kind)
    now = run.opt.state_dict()
    for k, entry in bad["state"].items():
        for key, value in entry.items():
            assert _same_value(now["state"][k][key], value), f"{kind}: state {key!r} of {k} did not round-trip"
    for key, value in bad["global_state"].items():
        if key == "state_dtype" and kind == "state_dtype":
            continue  # ignored on load: the optimizer keeps its own (reads back as such)
        assert now["global_state"][key] == value, f"{kind}: global_state[{key!r}] did not round-trip"
    for g_now, g_bad in zip(now["param_groups"], bad["param_groups"]):
        for key, value in g_bad.items():
            if key not in ("params", "esgdm_global_state"):
                assert _same_value(g_now[key], value), f"{kind}: param group {key!r} did not round-trip"


# ------------------------------------------------------------------ the operator, called directly

#: One step of esgdm::step_ against esgdm.rule.reference_step: (rtol, atol) per dtype
#: (the single-step tolerances of the backends' own tests).
OP_TOL = {F32: (2e-6, 1e-6), F64: (1e-14, 1e-14), BF16: (2 ** -7, 1e-6), F16: (2 ** -10, 1e-6)}

OP_SPOILS = ("none", "none", "grad_shape", "grad_dtype", "grad_strides", "hvp_shape", "state_dtype",
             "slot_out_of_range", "group_out_of_range", "param_not_dense", "short_list")


@st.composite
def op_calls(draw, backend):
    """Valid arguments of esgdm::step_ for 1-3 dense tensors, then maybe one spoiled."""
    dtype = draw(st.sampled_from(_dtypes(backend)), label="dtype")
    state_dtype = F64 if dtype == F64 else draw(st.sampled_from([F32, BF16]), label="state dtype")
    n = draw(st.integers(1, 3), label="tensors")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="data seed"))
    transposed = draw(st.booleans(), label="transposed")
    shapes = [(draw(st.integers(1, 6)), draw(st.integers(1, 6))) for _ in range(n)]

    def like(shape, dtype, scale=1.0, positive=False):
        t = torch.randn(shape[::-1] if transposed else shape, generator=gen, dtype=F64) * scale
        t = t.abs() if positive else t
        return (t.t() if transposed else t).to(dtype)

    d_step = draw(st.booleans(), label="D-step")
    args = dict(
        params=[like(s, dtype) for s in shapes], grads=[like(s, dtype) for s in shapes],
        exp_avgs=[like(s, state_dtype, 0.1) for s in shapes],
        exp_avg_ds=[like(s, state_dtype, positive=True) for s in shapes],
        hvps=[like(s, dtype) for s in shapes] if d_step else None,
        scalars=torch.tensor([[0.9 ** (k + 1), 0.5, float(k), 0.7] for k in range(n)], dtype=F64),
        index=torch.tensor([[k, k % 2] for k in range(n)], dtype=torch.int32),
        hparams=torch.tensor([[0.3, 0.9, 0.999, 0.9, 1e-4, 0.01], [0.1, 0.5, 0.9, 0.0, 1e-3, 0.0]], dtype=F64),
        grad_scale=None, found_inf=None, flags=FLAG_EXACT if draw(st.booleans(), label="exact") else 0,
        seed=0, kernel=backend)
    spoil = draw(st.sampled_from(OP_SPOILS), label="spoil")
    if spoil == "hvp_shape" and not d_step:
        spoil = "none"
    k = draw(st.integers(0, n - 1), label="which")
    if spoil == "grad_shape":
        args["grads"][k] = torch.ones(shapes[k][0] * shapes[k][1] + 1, dtype=dtype)
    elif spoil == "grad_dtype":
        args["grads"][k] = args["grads"][k].to(F64 if dtype != F64 else F32)
    elif spoil == "grad_strides":  # the same values, laid out unlike its parameter
        g = args["grads"][k]
        args["grads"][k] = g.contiguous() if transposed else g.t().contiguous().t()
        assume(args["grads"][k].stride() != g.stride())
    elif spoil == "hvp_shape":
        h = args["hvps"][k]
        args["hvps"][k] = h.reshape(-1)[:-1].clone() if h.numel() > 1 else torch.ones(2, dtype=dtype)
    elif spoil == "state_dtype":
        other = [d for d in (F32, BF16, F64, F16) if d != state_dtype]
        args["exp_avgs"][k] = args["exp_avgs"][k].to(draw(st.sampled_from(other), label="state dtype'"))
    elif spoil == "slot_out_of_range":
        args["index"][k, 0] = draw(st.sampled_from([-1, n, 1000]), label="slot")
    elif spoil == "group_out_of_range":
        args["index"][k, 1] = draw(st.sampled_from([-1, 2]), label="group")
    elif spoil == "param_not_dense":  # every other column of a wider tensor, state alike
        for key in ("params", "grads", "exp_avgs", "exp_avg_ds") + (("hvps",) if d_step else ()):
            t = args[key][k]
            args[key][k] = torch.stack([t, t], dim=-1)[..., 0]
    elif spoil == "short_list":
        key = draw(st.sampled_from(["grads", "exp_avgs", "exp_avg_ds"] + (["hvps"] if d_step else [])), label="list")
        args[key] = args[key][:-1] if n > 1 else args[key] + args[key]
    return args, spoil


WRITTEN = ("params", "exp_avgs", "exp_avg_ds", "scalars")


def _copies(args):
    return {k: [t.clone() for t in v] if isinstance(v, list) else v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in args.items()}


def check_operator(backend, data):
    """``esgdm.ops.step_`` called directly with random arguments, some spoiled: it
    raises ValueError and writes nothing, or its result equals
    :func:`esgdm.rule.reference_step` within the per-dtype tolerances."""
    if backend not in _available_backends():
        pytest.skip(f"no {backend} backend here")
    from esgdm import ops
    from esgdm.rule import reference_step

    args, spoil = data.draw(op_calls(backend), label="call")
    event(f"{spoil}, backend {backend}")
    before = _copies(args)
    try:
        ops.step_(**args)
    except ValueError:
        assert spoil != "none", "valid arguments were refused"
        for key in WRITTEN:
            now, old = args[key], before[key]
            for a, b in zip(now if isinstance(now, list) else [now], old if isinstance(old, list) else [old]):
                assert torch.equal(a, b), f"{spoil}: {key} was written by a refused call"
        return
    assert spoil in ("none",), f"{spoil}: accepted"
    ref = {k: v for k, v in before.items() if k != "kernel"}
    reference_step(**ref)
    for key in WRITTEN:
        now, want = args[key], ref[key]
        pairs = zip(now if isinstance(now, list) else [now], want if isinstance(want, list) else [want])
        for i, (a, b) in enumerate(pairs):
            rtol, atol = OP_TOL[b.dtype] if key != "scalars" else (1e-6, 0.0)
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m, where=f"{key}[{i}]": f"{where}: {m}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_operator_raises_or_equals_reference(backend, data):
    check_operator(backend, data)


@settings(max_examples=6, **SETTINGS)  # the interpreter is slow
@given(data=st.data())
def test_operator_raises_or_equals_reference_triton(data):
    check_operator("triton", data)


# ------------------------------------------------------------------ found by these tests

def _zero_element_run(p, backend):
    q = torch.randn(3, requires_grad=True)
    opt = esgdm.ESGDM([q, p], backend=backend, seed=0)
    for _ in range(2):
        opt.zero_grad()
        ((q ** 4).sum() + (p ** 2).sum()).backward(create_graph=opt.should_create_graph())
        opt.step()
    assert opt.state[p]["exp_avg"].shape == p.shape


def test_zero_element_channels_last_parameter():
    """torch gives a 0-element channels-last tensor stride-0 dimensions; it was refused
    as an expanded tensor whose elements share memory."""
    p = torch.randn(2, 0, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert 0 in p.stride()
    _zero_element_run(p, "torch")


@pytest.mark.parametrize("make", [lambda: torch.randn(0, 5)[:, ::2],
                                  lambda: torch.randn(0, 2, 2).transpose(1, 2)],
                         ids=["strided", "transposed"])
def test_cpu_zero_element_parameter_with_other_strides(make):
    """backend='cpu' raised on every step for a 0-element parameter whose strides are not
    the contiguous ones ("grads[i] has strides ... but its parameter has strides ...")."""
    _skip_unless("cpu")
    _zero_element_run(make().requires_grad_(), "cpu")
