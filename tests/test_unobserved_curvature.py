"""The default rule for curvature that was never observed (``D == 0``) or is tiny.

ESGD-M divides by ``sqrt(D) + eps``; a coordinate whose Hessian-vector product was
exactly zero on every D-step (a weight into a ReLU unit that was dead on the probe
batches, a weight from an input that was zero there) keeps ``D == 0`` and, under the
original rule (``exact=True``), steps by ``g / eps`` once it gets a gradient.  The
default rule preconditions such coordinates by ``dscale``, the tensor's mean observed
``sqrt(D)``, and leaves them alone while the tensor has seen no curvature at all; and
it floors ``sqrt(D)`` at ``DSCALE_FLOOR * dscale`` where ``D > 0`` (a unit that fired
on one probe image), see the docstring of :mod:`esgdm.rule`.

The model below is built so that the case happens on purpose and deterministically:

* the batch of a D-step (the "probe" batch) has input feature 3 equal to zero, and
  hidden unit 5 is dead on it (its pre-activation is -1 there); the other batch has
  feature 3 = 2, which wakes unit 5 up.  So ``W1[:, 3]``, ``W1[5, :]``, ``b1[5]`` and
  ``W2[:, 5]`` see no curvature but get gradients on non-probe steps;
* hidden unit 4 is dead on every input: its weights never get a gradient at all;
* ``rare`` (a separate tensor) multiplies feature 3 only: no curvature is ever seen in
  the whole tensor, so the default rule must not move it (dscale is 0) while the
  original one moves it by ``g / eps``.

Everything runs in float64 with ``hvp="autograd"`` (the finite-difference probe radius
depends on the parameters' norms, not on the loss scale; it is covered by the last
test only).  Tolerances: power-of-two rescalings are exact in binary floating point, so
those trajectories are compared bit for bit; 1e-3 / 1e3 rescalings round at every
operation, so those are compared to rtol 1e-9 (the float64 roundoff, about 1e-16 per
operation, amplified over 12 steps, stays far below that).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import cpu_backends

import esgdm
from esgdm import rule

STEPS = 12
HP = dict(lr=0.5, d_warmup=3, update_d_every=4, seed=1234)


def _backends(dtype=torch.float64):
    return cpu_backends(dtype, ("torch", "cpu"))


# ------------------------------------------------------------------ the model

def _data():
    gen = torch.Generator().manual_seed(7)
    xp = torch.rand(8, 4, generator=gen, dtype=torch.float64)
    xp[:, 3] = 0.0                       # probe batch: feature 3 absent
    xo = torch.rand(8, 4, generator=gen, dtype=torch.float64)
    xo[:, 3] = 2.0                       # other batch: feature 3 present, unit 5 alive
    yp = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    yo = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    return (xp, yp), (xo, yo)


def _init():
    """W1 [6, 4], b1 [6], W2 [2, 6], b2 [2], rare [2] (float64)."""
    gen = torch.Generator().manual_seed(3)
    w1 = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 0.5
    b1 = torch.rand(6, generator=gen, dtype=torch.float64) * 0.2 + 0.5   # units 0-3 alive
    w1[4] = 0.0
    b1[4] = -1.0                         # unit 4: dead on every input
    w1[5] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    b1[5] = -1.0                         # unit 5: alive only where feature 3 = 2
    w2 = torch.randn(2, 6, generator=gen, dtype=torch.float64) * 0.5
    b2 = torch.zeros(2, dtype=torch.float64)
    rare = torch.randn(2, generator=gen, dtype=torch.float64) * 0.1
    return [w1, b1, w2, b2, rare]


def _loss(ws, batch, scale=1.0):
    w1, b1, w2, b2, rare = ws
    x, y = batch
    hidden = torch.relu(x @ w1.T + b1)
    out = hidden @ w2.T + b2 + x[:, 3:4] * rare
    return scale * ((out - y) ** 2).mean()


def _train(backend, *, loss_scale=1.0, param_scale=None, exact=False, eps=0.0, steps=STEPS,
           hvp="autograd", init=None, hook=None, **kw):
    """Trains the model; returns (the trajectory of the *model's* weights w = a * u,
    the optimizer, the optimized tensors u).  ``param_scale``: one factor a per tensor
    (the optimizer sees u = w / a)."""
    a = param_scale or [1.0] * 5
    ws0 = init if init is not None else _init()
    us = [(w / s).requires_grad_() for w, s in zip(ws0, a)]
    opt = esgdm.ESGDM(us, backend=backend, exact=exact, eps=eps, hvp=hvp, **{**HP, **kw})
    probe, other = _data()
    traj = [[u.detach() * s for u, s in zip(us, a)]]
    for k in range(steps):
        batch = probe if opt.is_d_step() or k % 2 == 0 else other

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = _loss([u * s for u, s in zip(us, a)], batch, loss_scale)  # noqa: B023 (used in this iteration)
            loss.backward(create_graph=hvp == "autograd" and opt.should_create_graph())
            return loss

        if hvp == "autograd":
            closure()
            opt.step()
        else:
            opt.step(closure)
        traj.append([u.detach() * s for u, s in zip(us, a)])
        if hook is not None:
            hook(k, opt, us, batch is probe)
    return traj, opt, us


_REFERENCE: dict = {}


def _reference(backend):
    """The unscaled default-rule run (eps = 0), computed once per backend."""
    if backend not in _REFERENCE:
        _REFERENCE[backend] = _train(backend)
    return _REFERENCE[backend]


def _unobserved(opt, us):
    return [opt.state[u]["exp_avg_d"] == 0 for u in us]


def _assert_fallback_exercised(traj, opt, us):
    """The test would be vacuous if no coordinate with D == 0 had moved under the
    dscale fallback: check that some did (and that observed ones exist)."""
    masks = _unobserved(opt, us)
    moved = [(a != b) & m for a, b, m in zip(traj[-1], traj[0], masks)]
    assert sum(int(m.sum()) for m in moved) >= 6, "no unobserved coordinate moved"
    assert any(bool((~m).any()) for m in masks), "no coordinate has observed curvature"
    w1_unobs = masks[0]
    assert bool(w1_unobs[:, 3].all()) and bool(w1_unobs[5].all()), "the construction changed"


def _dscale(d: torch.Tensor) -> float:
    """The tensor's curvature scale, recomputed from its D: mean sqrt(D) over D > 0."""
    seen = d[d > 0].double()
    return float(seen.sqrt().mean()) if seen.numel() else 0.0


def _below_floor(d: torch.Tensor) -> torch.Tensor:
    return (d > 0) & (d.double().sqrt() < rule.DSCALE_FLOOR * _dscale(d))


def _floored_coordinates_moved(us, snaps):
    """How many (step, coordinate) pairs were floored (0 < sqrt(D) < floor * dscale, with
    the dscale of the D before the step) and moved on that step."""
    count = 0
    for before, after in zip(snaps, snaps[1:]):
        for i in range(len(us)):
            d_old, d_new = before["d"][i], after["d"][i]
            dfloor = rule.DSCALE_FLOOR * _dscale(d_old)
            floored = (d_new > 0) & (d_new.sqrt() < dfloor)
            count += int((floored & (after["p"][i] != before["p"][i])).sum())
    return count


def _assert_same(a, b, exact: bool, rtol=1e-9):
    for k, (xs, ys) in enumerate(zip(a, b)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            if exact:
                assert torch.equal(x, y), f"step {k}, tensor {i}: max diff {(x - y).abs().max():.3e}"
            else:
                torch.testing.assert_close(x, y, rtol=rtol, atol=1e-12 * max(1.0, float(y.abs().max())),
                                           msg=lambda m: f"step {k}, tensor {i}: {m}")  # noqa: B023 (used in this iteration)


# ------------------------------------------------------------- (a) invariance

def test_the_model_exercises_the_floor():
    """The invariance tests below would not cover the floor if no coordinate of this
    model ever had 0 < sqrt(D) < DSCALE_FLOOR * dscale while it moved."""
    ws0 = _init()
    us = [w.clone().requires_grad_() for w in ws0]
    snaps = []

    def hook(k, opt, us_, probe):
        snaps.append(dict(p=[u.detach().clone() for u in us_],
                          d=[opt.state[u]["exp_avg_d"].clone() for u in us_]))
    _, _, us = _train("torch", hook=hook)
    first = dict(p=[w.clone() for w in ws0], d=[torch.zeros_like(w) for w in ws0])
    assert _floored_coordinates_moved(us, [first] + snaps) >= 3


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("scale", [1e-3, 1e3, 2.0**-10, 2.0**10])
def test_default_rule_is_invariant_to_loss_scale(backend, scale):
    """Multiplying the loss by s multiplies g, h and hence sqrt(D) and dscale by s: the
    step does not change (eps = 0, which would otherwise set an absolute scale)."""
    ref, opt, us = _reference(backend)
    _assert_fallback_exercised(ref, opt, us)
    got, _, _ = _train(backend, loss_scale=scale)
    _assert_same(got, ref, exact=math.log2(scale).is_integer())


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("a", [1e-3, 1e3, 2.0**-10, 2.0**10])
def test_default_rule_is_invariant_to_parameter_scale(backend, a):
    """Reparametrise w = a * u: g_u = a g_w and h_u = H_u v = a^2 H_w v, so sqrt(D) and
    dscale scale by a^2, the step in u is the step in w divided by a, and a * u follows
    w's trajectory.  (One a for all tensors: with a different a per tensor the
    Hessian's off-diagonal blocks between tensors scale differently, which changes
    E[(Hv)^2] itself; that is a property of the equilibration estimate, not of the
    fallback, and the original rule shares it.)"""
    ref, opt, us = _reference(backend)
    _assert_fallback_exercised(ref, opt, us)
    got, _, _ = _train(backend, param_scale=[a] * 5)
    _assert_same(got, ref, exact=math.log2(a).is_integer())


@pytest.mark.parametrize("backend", _backends())
def test_invariance_tests_can_fail(backend):
    """Control: with eps = 1e-4 (the default) the trajectory does depend on the loss
    scale, in the original rule and in the default one alike (eps is an absolute
    curvature scale).  The comparisons above are sensitive enough to see it."""
    for exact in (False, True):
        ref, _, _ = _train(backend, eps=1e-4, exact=exact)
        got, _, _ = _train(backend, eps=1e-4, exact=exact, loss_scale=1e-3)
        diff = max(float((x - y).abs().max()) for x, y in zip(got[-1], ref[-1]))
        assert diff > 1e-6, (exact, diff)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("scale", [2.0**-20, 2.0**10])
def test_with_eps_rescaled_as_sqrt_d_the_default_eps_keeps_the_invariance(backend, scale):
    """What the README's Learning rates table says: with eps = 1e-4, multiplying the
    loss by s and eps by s gives the same trajectory (bit for bit for a power of two)."""
    ref, _, _ = _train(backend, eps=1e-4)
    got, _, _ = _train(backend, eps=1e-4 * scale, loss_scale=scale)
    _assert_same(got, ref, exact=True)


def test_invariance_test_catches_a_fallback_that_does_not_scale(monkeypatch):
    """Mutation control: replace dscale by a fixed 1.0 (an absolute floor, which does
    not scale with the loss) in the "torch" backend's element rule; the loss-scale
    comparison must then fail."""
    import esgdm.backends.torch_impl as torch_impl
    if not hasattr(torch_impl, "step_elements"):
        pytest.skip("the torch backend no longer calls rule.step_elements by that name")
    real = torch_impl.step_elements

    def fixed_floor(*args, **kw):
        kw["dscale"], kw["terms"] = 1.0, None  # the floor terms then follow dscale
        return real(*args, **kw)

    monkeypatch.setattr(torch_impl, "step_elements", fixed_floor)
    ref, _, _ = _train("torch")
    got, _, _ = _train("torch", loss_scale=1e-3)
    with pytest.raises(AssertionError):
        _assert_same(got, ref, exact=False)


# ------------------------------------------------------------ (b) the blow-up

@pytest.mark.parametrize("backend", _backends())
def test_each_step_divides_by_the_floored_denominator(backend):
    """Every step of the default run, recomputed per coordinate from the state before
    and after it: a coordinate moves by step_scale * mhat / denom with

        denom = dscale + eps                          where D == 0 (dscale > 0),
        denom = max(sqrt(D), DSCALE_FLOOR * dscale) + eps   where D > 0,

    dscale being the mean sqrt(D) over D > 0 of the D before the step (what the op
    refreshed after the last D-step), and does not move where D == 0 and dscale == 0.
    So every moving coordinate of a step implies the same step_scale = dp * denom / mhat:
    checked to rtol 1e-9 (float64; lerp and division round at 1e-16).  A backend
    without the floor (or with another one) implies a step_scale at least twice as
    large on the floored coordinates checked here, and fails.  No weight decay, so
    dp is the step alone."""
    eps = 1e-4
    b1 = 0.9
    ws0 = _init()
    snaps = [dict(p=[w.clone() for w in ws0], m=[torch.zeros_like(w) for w in ws0],
                  d=[torch.zeros_like(w) for w in ws0], g=None)]

    def keep(k, opt, us, probe):
        st = [opt.state[u] for u in us]
        snaps.append(dict(p=[u.detach().clone() for u in us], m=[x["exp_avg"].clone() for x in st],
                          d=[x["exp_avg_d"].clone() for x in st],
                          g=[u.grad.detach().clone() for u in us]))

    _train(backend, eps=eps, hook=keep)
    kinds = dict(unobserved=0, floored=0, above=0, frozen=0)
    for k, (before, after) in enumerate(zip(snaps, snaps[1:])):
        implied = []
        for i in range(5):
            d_old, d, g, m = before["d"][i], after["d"][i], after["g"][i], after["m"][i]
            dscale = _dscale(d_old)
            mhat = m + (1 - b1) * (g - m)
            dp = before["p"][i] - after["p"][i]
            root = d.sqrt()
            dfloor = rule.DSCALE_FLOOR * dscale
            denom = torch.where(d == 0, torch.full_like(d, dscale + eps),
                                torch.maximum(root, torch.full_like(d, dfloor)) + eps)
            if dscale == 0:  # no curvature in the tensor yet: unobserved coordinates stay
                assert bool((dp[d == 0] == 0).all()), (k, i)
                kinds["frozen"] += int(((d == 0) & (g != 0)).sum())
            usable = (mhat.abs() > 1e-9 * float(mhat.abs().max())) & ((d > 0) | (dscale > 0))
            implied.append((dp * denom / mhat)[usable])
            moving = usable & (dp != 0)
            kinds["unobserved"] += int((moving & (d == 0)).sum())
            # floored, and by enough that the floor changes the step at least 2x
            kinds["floored"] += int((moving & (d > 0) & (2 * (root + eps) < dfloor + eps)).sum())
            kinds["above"] += int((moving & (root >= dfloor)).sum())
        implied = torch.cat(implied)
        if implied.numel():
            ref = implied.median()
            torch.testing.assert_close(implied, torch.full_like(implied, float(ref)), rtol=1e-9,
                                       atol=0, msg=lambda m: f"step {k}: {m}")  # noqa: B023 (used in this iteration)
    assert kinds["unobserved"] >= 6 and kinds["floored"] >= 3 and kinds["above"] >= 50, kinds
    assert kinds["frozen"] >= 1, kinds


@pytest.mark.parametrize("backend", _backends())
def test_exact_rule_blows_up_where_the_default_stays_bounded(backend):
    """Over the whole run the original rule (g / eps where D == 0, no floor) blows up
    and the default does not; unit 4 (dead on every input) never moves under either."""
    te, _, _ = _train(backend, exact=True, eps=1e-4)
    td, _, _ = _train(backend, exact=False, eps=1e-4)
    max_e = max(float(w.abs().max()) for w in te[-1])
    max_d = max(float(w.abs().max()) for w in td[-1])
    assert not all(math.isfinite(float(w.abs().max())) for w in te[-1]) or max_e > 1e3, max_e
    assert max_d < 10, max_d
    for traj in (te, td):
        assert torch.equal(traj[-1][0][4], traj[0][0][4]) and torch.equal(traj[-1][1][4], traj[0][1][4])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
def test_trajectory_matches_the_independent_reference(backend, exact, monkeypatch):
    """The whole run against tests/reference.py (same sign vectors): exact=True is the
    spec's rule (g / eps where D == 0, no floor), the default its dscale rule with the
    floor at dscale / 16.  float64 throughout: rtol 1e-9 (the exact run's parameters
    grow large, so the comparison is relative)."""
    from helpers import InjectedSigns, ReferenceESGDM

    ws = [w.requires_grad_() for w in _init()]
    rs = [w.detach().clone().requires_grad_() for w in ws]
    inj = InjectedSigns(monkeypatch, ws, rs)
    opt = esgdm.ESGDM(ws, backend=backend, exact=exact, eps=1e-4, **HP)
    ref = ReferenceESGDM(rs, lr=HP["lr"], eps=1e-4, d_warmup=HP["d_warmup"],
                         update_d_every=HP["update_d_every"], signs=inj.ref_signs, exact=exact)
    inj.opt, inj.ref = opt, ref
    probe, other = _data()
    for k in range(STEPS):
        batch = probe if opt.is_d_step() or k % 2 == 0 else other
        assert ref.should_create_graph() == opt.should_create_graph()
        for o, ps in ((opt, ws), (ref, rs)):
            for q in ps:
                q.grad = None
            _loss(ps, batch).backward(create_graph=o.should_create_graph())
            o.step()
        for i, (a, b) in enumerate(zip(ws, rs)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-12, equal_nan=True,
                                       msg=lambda m: f"step {k}, tensor {i}: {m}")  # noqa: B023 (used in this iteration)
    big = max(float(w.detach().abs().max()) for w in ws)
    assert (big > 1e3) == exact, big  # the two rules really differ on this model


# ------------------------------------------------ (b2) the floor, op by op

def _op_kernels():
    """(kernel, why not) for the three kernels that step CPU tensors."""
    out = []
    for name in ("torch", "cpu", "triton"):
        try:
            why = esgdm.backends.get(name).why_not(torch.device("cpu"), torch.float32)
            if name == "triton" and why is None:
                from esgdm.kernels import esgdm_step
                why = None if esgdm_step.INTERPRET else "CPU tensors need TRITON_INTERPRET=1"
        except Exception as e:  # noqa: BLE001 - an unimportable backend is skipped, with the reason
            why = f"{type(e).__name__}: {e}"
        out.append((name, why))
    return out


def _op_backends():
    return [pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=str(why)))
            for name, why in _op_kernels()]


def _floor_case():
    """One plain step of two float32 tensors of 64 elements whose sqrt(D) / dscale runs
    from 1e-4 to 1e2 (and 0 for every eighth): tensor 0 with dscale 0.3, tensor 1 with
    dscale 0 (no curvature seen when it was last refreshed)."""
    gen = torch.Generator().manual_seed(5)
    n = 64
    ratio = torch.logspace(-4, 2, n, dtype=torch.float64)
    ratio[::8] = 0.0
    dscales = (0.3, 0.0)
    ps = [torch.randn(n, generator=gen) for _ in dscales]
    gs = [torch.randn(n, generator=gen) for _ in dscales]
    ms = [torch.randn(n, generator=gen) * 0.3 for _ in dscales]
    ds = [((ratio * 0.3) ** 2).float() for _ in dscales]
    scalars = torch.zeros(2, 4, dtype=torch.float64)
    scalars[:, rule.BIAS] = 0.9 ** 5
    scalars[:, rule.STEPS] = 5.0
    scalars[:, rule.DSCALE] = torch.tensor(dscales, dtype=torch.float64)
    index = torch.tensor([[0, 0], [1, 0]], dtype=torch.int32)
    hparams = torch.tensor([[0.5, 0.9, 0.999, 0.99, 1e-4, 0.0]], dtype=torch.float64)
    return ps, gs, ms, ds, scalars, index, hparams, dscales


def _run_op(kernel, flags):
    ps, gs, ms, ds, scalars, index, hparams, dscales = _floor_case()
    before = [p.clone() for p in ps], [m.clone() for m in ms]
    esgdm.ops.step_impl(ps, gs, ms, ds, None, scalars, index, hparams, None, None, flags, 0, kernel)
    return before, ps, gs, ds, dscales


def _expected(before, gs, ds, dscales, exact):
    """The step by the formula of the rule's docstring, in float64 from the float32
    inputs (independent of esgdm.rule)."""
    (p0, m0) = before
    out = []
    for i, dscale in enumerate(dscales):
        w, eps = 0.1, 1e-4
        step_scale = 0.5 / (1 - 0.9 ** 6 * 0.9)   # bias' = 0.9**6, warm = 0 (a plain step)
        m, g, d, p = m0[i].double(), gs[i].double(), ds[i].double(), p0[i].double()
        m = m + w * (g - m)
        mhat = m + w * (g - m)
        root = d.sqrt()
        if exact:
            denom = root + eps
        else:
            denom = torch.maximum(root, torch.full_like(root, dscale / 16)) + eps
            denom = torch.where(d == 0, torch.full_like(d, dscale + eps), denom)
        q = mhat / denom
        if not exact and dscale == 0:
            q = torch.where(d == 0, torch.zeros_like(q), q)
        out.append(p - step_scale * q)
    return out


def test_the_floor_is_one_sixteenth():
    """The constant is the same in the rule and in the Triton kernel (the C++ one is
    checked by the backends' agreement below) and the tests' expectations use it."""
    assert rule.DSCALE_FLOOR == 1 / 16
    try:
        from esgdm.kernels import esgdm_step
    except Exception:  # noqa: BLE001 - no triton: nothing to compare
        return
    assert esgdm_step.DSCALE_FLOOR == rule.DSCALE_FLOOR


@pytest.mark.parametrize("kernel", _op_backends())
def test_floor_bounds_the_step_of_low_curvature_coordinates(kernel):
    """One step of the op on coordinates with sqrt(D) / dscale from 1e-4 to 1e2: each
    backend moves every coordinate as the formula says (float32 against float64: rtol
    1e-5).  So a coordinate below the floor moves by at most step_scale * |mhat| /
    (dscale / 16), one above it exactly as in the original rule (bit for bit the
    exact=True result, checked next), one with D == 0 by mhat / (dscale + eps), and in
    the tensor with dscale 0 nothing is floored (the original rule where D > 0, no
    step where D == 0)."""
    before, ps, gs, ds, dscales = _run_op(kernel, 0)
    want = _expected(before, gs, ds, dscales, exact=False)
    for i in range(2):
        torch.testing.assert_close(ps[i].double(), want[i], rtol=1e-5, atol=1e-6)
    # the floor matters here: without it the floored coordinates would move far more
    unfloored = _expected(before, gs, ds, dscales, exact=True)[0]
    floored = (ds[0] > 0) & (ds[0].double().sqrt() < 0.3 / 16)
    assert int(floored.sum()) >= 10
    moved_by = (ps[0].double() - before[0][0].double()).abs()[floored]
    would_move = (unfloored - before[0][0].double()).abs()[floored]
    far = (ds[0].double().sqrt() < 0.3 / 16 / 100)[floored]
    assert int(far.sum()) >= 5 and bool((moved_by[far] * 50 < would_move[far]).all())
    bound = 0.5 / (1 - 0.9 ** 7) * (1.0 + 1e-5) / (0.3 / 16)
    mhat_bound = (before[1][0].abs() + gs[0].abs()).double()[floored]  # |mhat| <= |m| + |g|
    assert bool((moved_by <= bound * mhat_bound).all())


@pytest.mark.parametrize("kernel", _op_backends())
def test_exact_has_no_floor_and_the_default_leaves_coordinates_above_it_alone(kernel):
    """exact=True: sqrt(D) + eps everywhere (g / eps where D == 0), as the formula;
    the default's result equals it bit for bit on every coordinate with sqrt(D) at or
    above the floor (D > 0)."""
    before, pe, gs, ds, dscales = _run_op(kernel, rule.FLAG_EXACT)
    want = _expected(before, gs, ds, dscales, exact=True)
    for i in range(2):
        torch.testing.assert_close(pe[i].double(), want[i], rtol=1e-5, atol=1e-6)
    _, pd, _, _, _ = _run_op(kernel, 0)
    for i, dscale in enumerate(dscales):
        above = (ds[i] > 0) & (ds[i].sqrt() >= dscale / 16)
        assert int(above.sum()) >= 20
        assert torch.equal(pd[i][above], pe[i][above])
        if dscale == 0:  # nothing floored where the tensor has no curvature scale
            assert torch.equal(pd[i][ds[i] > 0], pe[i][ds[i] > 0])


def test_backends_agree_on_the_floor():
    """torch, cpu and triton (where available) give the same parameters on the floor
    case in both modes, within rtol 2e-6 (the backends' float32 tolerance elsewhere: the
    final p * decay - step * q may round differently, a few ulps), far below what the
    floor changes (a factor 2 to 1e3 on the floored coordinates)."""
    results = {kernel: {f: _run_op(kernel, f)[1] for f in (0, rule.FLAG_EXACT)}
               for kernel, why in _op_kernels() if why is None}
    assert "torch" in results and len(results) >= 2, sorted(results)
    for kernel, got in results.items():
        for f, ps in got.items():
            for a, b in zip(ps, results["torch"][f]):
                torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6, msg=lambda m: f"{kernel} {f}: {m}")  # noqa: B023 (used in this iteration)


# ------------------------------------- (c) observed curvature: the original rule

def _tanh_model(dtype):
    gen = torch.Generator().manual_seed(11)
    ws = [torch.randn(7, 5, generator=gen) * 0.5, torch.randn(7, generator=gen) * 0.1,
          torch.randn(3, 7, generator=gen) * 0.5, torch.randn(3, generator=gen) * 0.1]
    x = torch.randn(16, 5, generator=gen).to(dtype)
    y = torch.randn(16, 3, generator=gen).to(dtype)
    return [w.to(dtype).requires_grad_() for w in ws], x, y


def _first_hvp_margin(seed: int) -> float:
    """min |Hv| over every coordinate of the tanh model at its first D-step (exact, in
    float64, with the optimizer's signs for ``seed``), relative to the largest |g|."""
    from esgdm.optimizer import draw_signs

    ws, x, y = _tanh_model(torch.float64)
    loss = ((torch.tanh(x @ ws[0].T + ws[1]) @ ws[2].T + ws[3] - y) ** 2).mean()
    gs = torch.autograd.grad(loss, ws, create_graph=True)
    hvs = torch.autograd.grad(gs, ws, grad_outputs=[draw_signs(seed, 0, i, w) for i, w in enumerate(ws)])
    return min(h.abs().min().item() for h in hvs) / max(g.abs().max().item() for g in gs)


@pytest.mark.parametrize("backend", _backends(torch.float32))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_observed_curvature_follows_the_original_rule_bit_for_bit(backend, dtype, hvp):
    """A tanh MLP on dense inputs sees curvature in every coordinate on the first
    D-step, none of it below the floor (checked at the end), so the default rule and
    exact=True must give identical parameters and state after every step (with the
    default eps, stochastic rounding irrelevant for these dtypes).

    The sign seed is chosen so that every coordinate's true |Hv| on that first D-step
    is at least 9% of the largest gradient entry.  With float32 finite differences the
    rounding error of h is about 5e-4 of the gradient, so no h can round to exactly
    zero on any CPU (with seed 99 one coordinate had |Hv| = 1.6e-4: some CPUs' float32
    arithmetic gave h == 0 there, D == 0, and the two rules then rightly differ)."""
    if esgdm.backends.get(backend).why_not(torch.device("cpu"), dtype) is not None:
        pytest.skip(f"{backend} does not take {dtype}")
    seed = 139
    assert _first_hvp_margin(seed) > 0.05  # no coordinate near zero curvature: see above
    results = []
    for exact in (False, True):
        ws, x, y = _tanh_model(dtype)
        opt = esgdm.ESGDM(ws, backend=backend, exact=exact, lr=0.5, d_warmup=3, update_d_every=4,
                          seed=seed, hvp=hvp)
        traj = []
        for k in range(15):
            def closure():
                opt.zero_grad(set_to_none=True)  # noqa: B023 (used in this iteration)
                loss = ((torch.tanh(x @ ws[0].T + ws[1]) @ ws[2].T + ws[3] - y) ** 2).mean()  # noqa: B023 (used in this iteration)
                loss.backward(create_graph=hvp == "autograd" and opt.should_create_graph())  # noqa: B023 (used in this iteration)
                return loss
            if hvp == "autograd":
                closure()
                opt.step()
            else:
                opt.step(closure)
            if k == 0:  # the precondition, checked where it matters: the first D-step
                assert all(bool((opt.state[w]["exp_avg_d"] > 0).all()) for w in ws), \
                    "a coordinate saw no curvature on the first D-step: the test is vacuous"
            traj.append([w.detach().clone() for w in ws] +
                        [opt.state[w][k].clone() for w in ws for k in ("exp_avg", "exp_avg_d")])
        assert all(bool((opt.state[w]["exp_avg_d"] > 0).all()) for w in ws), "some D == 0: vacuous"
        assert not any(bool(_below_floor(opt.state[w]["exp_avg_d"]).any()) for w in ws)
        results.append(traj)
    _assert_same(results[0], results[1], exact=True)


# ------------------------------------------- the benchmark's study of other floors

@pytest.mark.slow
def test_bench_train_floor_override_reproduces_the_built_in_floor(tmp_path, monkeypatch):
    """benchmarks/bench_train.py studies other floors by replacing the "torch" backend's
    one for a run's steps: 'floor0.0625' must give the default's parameters bit for
    bit (both on the torch backend), 'nofloor' others (the mostly-dead MLP has floored
    coordinates within 30 steps), and the backend's floor must be restored."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from esgdm.backends import torch_impl

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "r.json"
    cmd = [sys.executable, "benchmarks/bench_train.py", "--rules", "--smoke", "--device", "cpu",
           "--threads", "1", "--no-progress", "--tasks", "mostlydead", "--hvps", "autograd",
           "--rule-lrs", "1", "--rule-names", "default,floor0.0625,nofloor", "--rule-base",
           "default", "--esgdm-backend", "torch", "--json", str(out), "--markdown",
           str(tmp_path / "r.md")]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["floor0.0625"]["fingerprint"] == runs["default"]["fingerprint"]
    assert runs["nofloor"]["fingerprint"] != runs["default"]["fingerprint"]
    assert runs["default"]["floored_frac"] > 0
    assert "same as default" in (tmp_path / "r.md").read_text()
    # in this process: the override is undone when its block ends, even on an error
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    import bench_train
    with pytest.raises(RuntimeError), bench_train._FloorOverride(0.5):
        assert torch_impl.DSCALE_FLOOR == 0.5
        raise RuntimeError
    assert torch_impl.DSCALE_FLOOR == rule.DSCALE_FLOOR
