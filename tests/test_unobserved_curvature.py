"""The default rule for curvature that was never observed (``D == 0``).

ESGD-M divides by ``sqrt(D) + eps``; a coordinate whose Hessian-vector product was
exactly zero on every D-step (a weight into a ReLU unit that was dead on the probe
batches, a weight from an input that was zero there) keeps ``D == 0`` and, under the
original rule (``exact=True``), steps by ``g / eps`` once it gets a gradient.  The
default rule preconditions such coordinates by ``dscale``, the tensor's mean observed
``sqrt(D)``, and leaves them alone while the tensor has seen no curvature at all
(see the docstring of :mod:`esgdm.rule`).

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

import esgdm

STEPS = 12
HP = dict(lr=0.5, d_warmup=3, update_d_every=4, seed=1234)


def _backends(dtype=torch.float64):
    out = []
    for name in ("torch", "cpu"):
        try:
            why = esgdm.backends.get(name).why_not(torch.device("cpu"), dtype)
        except Exception as e:  # noqa: BLE001 - an unimportable backend is skipped, with the reason
            why = f"{type(e).__name__}: {e}"
        out.append(pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return out


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
            loss = _loss([u * s for u, s in zip(us, a)], batch, loss_scale)
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


def _assert_same(a, b, exact: bool, rtol=1e-9):
    for k, (xs, ys) in enumerate(zip(a, b)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            if exact:
                assert torch.equal(x, y), f"step {k}, tensor {i}: max diff {(x - y).abs().max():.3e}"
            else:
                torch.testing.assert_close(x, y, rtol=rtol, atol=1e-12 * max(1.0, float(y.abs().max())),
                                           msg=lambda m: f"step {k}, tensor {i}: {m}")


# ------------------------------------------------------------- (a) invariance

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


def test_invariance_test_catches_a_fallback_that_does_not_scale(monkeypatch):
    """Mutation control: replace dscale by a fixed 1.0 (an absolute floor, which does
    not scale with the loss) in the "torch" backend's element rule; the loss-scale
    comparison must then fail."""
    import esgdm.backends.torch_impl as torch_impl
    if not hasattr(torch_impl, "update_elements"):
        pytest.skip("the torch backend no longer calls rule.update_elements by that name")
    real = torch_impl.update_elements

    def fixed_floor(*args, **kw):
        kw["dscale"] = 1.0
        return real(*args, **kw)

    monkeypatch.setattr(torch_impl, "update_elements", fixed_floor)
    ref, _, _ = _train("torch")
    got, _, _ = _train("torch", loss_scale=1e-3)
    with pytest.raises(AssertionError):
        _assert_same(got, ref, exact=False)


# ------------------------------------------------------------ (b) the blow-up

@pytest.mark.parametrize("backend", _backends())
def test_exact_rule_steps_by_g_over_eps_where_the_default_uses_dscale(backend):
    """Until the first non-probe step both rules agree bit for bit (unobserved
    coordinates have g = 0 and m = 0 on the probe batches).  On that step, an
    unobserved coordinate moves by step * mhat / eps under exact=True and by
    step * mhat / (dscale + eps) under the default, dscale being the tensor's mean
    sqrt(D) over its coordinates with D > 0 (computed here from the state)."""
    eps = 1e-4
    snaps = {}

    def keep(name):
        def hook(k, opt, us, probe):
            snaps.setdefault(name, []).append(([st["exp_avg_d"].clone() for st in
                                                (opt.state[u] for u in us)], probe))
        return hook

    te, oe, ue = _train(backend, exact=True, eps=eps, hook=keep("exact"))
    td, od, ud = _train(backend, exact=False, eps=eps, hook=keep("default"))
    first = next(k for k, (_, probe) in enumerate(snaps["default"]) if not probe)
    assert first == 3
    _assert_same(te[:first + 1], td[:first + 1], exact=True)

    ds, _ = snaps["default"][first]
    checked = 0
    for i, d in enumerate(ds):
        unobs = d == 0
        dp_e = te[first + 1][i] - te[first][i]
        dp_d = td[first + 1][i] - td[first][i]
        # observed coordinates: the same update in both rules, bit for bit
        assert torch.equal(te[first + 1][i][~unobs], td[first + 1][i][~unobs])
        pos = d[d > 0]
        dscale = pos.sqrt().mean().item() if pos.numel() else 0.0
        moving = unobs & (dp_e != 0)
        if dscale == 0:  # `rare`: no curvature anywhere in the tensor
            assert i == 4 and bool(moving.any())
            assert bool((dp_d[unobs] == 0).all()), "the default rule moved a tensor without curvature"
            continue
        if not moving.any():
            continue
        torch.testing.assert_close(dp_e[moving] * eps, dp_d[moving] * (dscale + eps), rtol=1e-9, atol=0)
        assert dscale / eps > 100  # the original's steps there are > 100x larger
        checked += int(moving.sum())
    assert checked >= 6

    # and over the whole run: the original blows up, the default does not
    max_e = max(float(w.abs().max()) for w in te[-1])
    max_d = max(float(w.abs().max()) for w in td[-1])
    assert not all(math.isfinite(float(w.abs().max())) for w in te[-1]) or max_e > 1e3, max_e
    assert max_d < 10, max_d
    # unit 4 (dead on every input) never moves under either rule
    for traj in (te, td):
        assert torch.equal(traj[-1][0][4], traj[0][0][4]) and torch.equal(traj[-1][1][4], traj[0][1][4])


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
    D-step, so the default rule and exact=True must give identical parameters and
    state after every step (with the default eps, stochastic rounding irrelevant for
    these dtypes).

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
                opt.zero_grad(set_to_none=True)
                loss = ((torch.tanh(x @ ws[0].T + ws[1]) @ ws[2].T + ws[3] - y) ** 2).mean()
                loss.backward(create_graph=hvp == "autograd" and opt.should_create_graph())
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
        results.append(traj)
    _assert_same(results[0], results[1], exact=True)
