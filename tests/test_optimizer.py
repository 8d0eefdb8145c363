"""esgdm.ESGDM against the per-parameter reference of tests/reference.py."""

import functools
import io
import math

import pytest
import torch
from helpers import InjectedSigns, ReferenceESGDM, clone_params, make_coeffs, rel_err, run_both, separable_loss

import esgdm
from esgdm.buckets import ALIGN_BYTES

# ESGDM runs its default rule here (not exact=True): so does the reference.
ReferenceESGDM = functools.partial(ReferenceESGDM, exact=False)

RTOL_FP32 = 2e-5  # after 90 steps (issue 2)
STEPS = 90


def shapes_params(shapes, dtype=torch.float32, scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(dtype).requires_grad_() for s in shapes]


ODD_SHAPES = [(7,), (3, 5), (1,), (2, 3, 4), (33,), (128, 3), ()]


def assert_params_close(opt_params, ref_params, rtol=RTOL_FP32):
    for i, (p, r) in enumerate(zip(opt_params, ref_params)):
        assert p.shape == r.shape
        err = rel_err(p, r)
        assert err <= rtol, f"parameter {i} {tuple(p.shape)}: relative error {err:.3g} > {rtol}"
        torch.testing.assert_close(p.detach(), r.detach(), rtol=rtol, atol=rtol * r.abs().max().item())


def test_separable_loss_matches_reference_over_90_steps():
    ps = shapes_params(ODD_SHAPES)
    rs = clone_params(ps)
    coeffs = make_coeffs(ps)
    opt = esgdm.ESGDM(ps, lr=0.3, backend="torch")
    ref = ReferenceESGDM(rs, lr=0.3)
    run_both(opt, ref, ps, rs, lambda params, t: separable_loss(params, coeffs), STEPS)
    assert opt.steps == ref.steps == STEPS
    assert_params_close(ps, rs)
    # The state too, not only the parameters.
    for p, r in zip(ps, rs):
        st, rst = opt.state[p], ref.state[r]
        assert rel_err(st["exp_avg"], rst["m"]) <= RTOL_FP32
        assert rel_err(st["exp_avg_d"], rst["D"]) <= RTOL_FP32
        assert float(st["exp_avg_bias_corr"]) == pytest.approx(rst["bias"], rel=1e-12)
        assert float(st["lr_warmup_cumprod"]) == pytest.approx(rst["warm"], rel=1e-12)


def test_param_groups_with_different_hyperparameters():
    ps = shapes_params([(5,), (4, 3), (9,), (2, 2), (6,)])
    rs = clone_params(ps)
    coeffs = make_coeffs(ps)
    overrides = [
        dict(lr=0.5, betas=(0.8, 0.99), weight_decay=0.1),
        dict(lr=0.1, lr_warmup=0.0, eps=1e-3),
        dict(betas=(0.0, 1.0), lr_warmup=0.9, weight_decay=0.01),
    ]
    split = [ps[:2], ps[2:4], ps[4:]]
    rsplit = [rs[:2], rs[2:4], rs[4:]]
    opt = esgdm.ESGDM([{"params": s, **o} for s, o in zip(split, overrides)], lr=0.3,
                      update_d_every=3, d_warmup=5, backend="torch")
    ref = ReferenceESGDM([{"params": s, **o} for s, o in zip(rsplit, overrides)], lr=0.3,
                         update_d_every=3, d_warmup=5)
    run_both(opt, ref, ps, rs, lambda params, t: separable_loss(params, coeffs), STEPS)
    assert_params_close(ps, rs)


def test_mlp_with_injected_signs(monkeypatch):
    """A dense (non-diagonal) Hessian: both sides must draw the same sign vectors."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    ps = list(model.parameters())
    rs = clone_params(ps)
    x, y = torch.randn(32, 6), torch.randn(32, 3)

    def loss_fn(params, t):
        w1, b1, w2, b2 = params
        out = torch.tanh(x @ w1.T + b1) @ w2.T + b2
        return ((out - y) ** 2).mean()

    inj = InjectedSigns(monkeypatch, ps, rs)
    opt = esgdm.ESGDM(ps, lr=0.5, weight_decay=0.01, update_d_every=4, d_warmup=6, backend="torch")
    ref = ReferenceESGDM(rs, lr=0.5, weight_decay=0.01, update_d_every=4, d_warmup=6,
                         signs=inj.ref_signs)
    inj.opt, inj.ref = opt, ref
    run_both(opt, ref, ps, rs, loss_fn, STEPS)
    assert_params_close(ps, rs)
    # With a dense Hessian the signs matter: other signs give another trajectory, so
    # the agreement above is not an accident of the loss.
    torch.manual_seed(3)
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    qs = clone_params(list(fresh.parameters()))
    other = ReferenceESGDM(qs, lr=0.5, weight_decay=0.01, update_d_every=4, d_warmup=6)
    for t in range(STEPS):
        for q in qs:
            q.grad = None
        loss_fn(qs, t).backward(create_graph=other.should_create_graph())
        other.step()
    assert max(rel_err(q, r) for q, r in zip(qs, rs)) > 100 * RTOL_FP32


def test_parameter_missing_gradients_moves_nothing():
    ps = shapes_params([(4,), (3, 3), (5,)])
    rs = clone_params(ps)
    coeffs = make_coeffs(ps)
    opt = esgdm.ESGDM(ps, lr=0.4, update_d_every=3, d_warmup=4, backend="torch")
    ref = ReferenceESGDM(rs, lr=0.4, update_d_every=3, d_warmup=4)

    def drop(t):
        # parameter 1 misses its gradient on steps 0-2 and every third step after;
        # parameter 2 misses it on D-steps 20..29
        out = []
        if t < 3 or t % 3 == 0:
            out.append(1)
        if 20 <= t < 30:
            out.append(2)
        return out

    before = {}

    def snapshot(t):
        if t == 1:
            before["p1"] = ps[1].detach().clone()

    run_both(opt, ref, ps, rs, lambda params, t: separable_loss(params, coeffs), STEPS,
             before_step=snapshot, drop_grads=drop)
    assert_params_close(ps, rs)
    assert float(opt.state[ps[1]]["exp_avg_bias_corr"]) == pytest.approx(ref.state[rs[1]]["bias"])


def test_parameter_without_gradient_has_no_state_and_stays_put():
    ps = shapes_params([(4,), (3,)])
    frozen = ps[1].detach().clone()
    opt = esgdm.ESGDM(ps, lr=0.5, backend="torch")
    for _ in range(5):
        opt.zero_grad()
        (ps[0] ** 2).sum().backward(create_graph=opt.should_create_graph())
        opt.step()
    assert ps[1] not in opt.state
    assert torch.equal(ps[1].detach(), frozen)
    assert 0 in opt.state_dict()["state"] and 1 not in opt.state_dict()["state"]


def test_lr_scheduler_matches_manual_schedule():
    ps = shapes_params(ODD_SHAPES[:4])
    rs = clone_params(ps)
    coeffs = make_coeffs(ps)
    opt = esgdm.ESGDM(ps, lr=0.5, backend="torch")
    ref = ReferenceESGDM(rs, lr=0.5)
    factor = lambda t: 0.97 ** t  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def before(t):
        if t:
            sched.step()
        ref.param_groups[0]["lr"] = 0.5 * factor(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"])

    run_both(opt, ref, ps, rs, lambda params, t: separable_loss(params, coeffs), STEPS, before_step=before)
    assert_params_close(ps, rs)


def test_tensor_lr_is_accepted():
    ps = shapes_params([(5,)])
    rs = clone_params(ps)
    coeffs = make_coeffs(ps)
    opt = esgdm.ESGDM(ps, lr=torch.tensor(0.3), backend="torch")
    ref = ReferenceESGDM(rs, lr=0.3)
    run_both(opt, ref, ps, rs, lambda params, t: separable_loss(params, coeffs), 30)
    assert_params_close(ps, rs)


def test_should_create_graph_schedule():
    p = torch.zeros(2, requires_grad=True)
    opt = esgdm.ESGDM([p], update_d_every=4, d_warmup=3, backend="torch")
    seen = []
    for _ in range(20):
        d = opt.should_create_graph()
        seen.append(d)
        p.grad = None
        ((p - 1) ** 2).sum().backward(create_graph=d)
        opt.step()
    # steps 0,1,2 (warmup), then every 4th step after the last D-step
    expected = [t < 3 or (t - 2) % 4 == 0 for t in range(20)]
    assert seen == expected


def test_step_closure_returns_loss_and_hooks_run():
    p = torch.ones(3, requires_grad=True)
    opt = esgdm.ESGDM([p], lr=0.5, backend="torch")
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward(create_graph=opt.should_create_graph())
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(3.0)
    assert calls == ["pre", "post"]
    assert not torch.equal(p.detach(), torch.ones(3))


def test_gradient_accumulation_equals_full_batch():
    """Micro-batches accumulated with create_graph give the full-batch trajectory."""
    torch.manual_seed(5)
    x, y = torch.randn(16, 4), torch.randn(16)
    w = torch.randn(4, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()

    def loss_on(wt, xb, yb):  # a sum over samples, so micro-batch losses add up
        return ((torch.tanh(xb * wt).sum(1) - yb) ** 2).sum() + len(xb) / 16 * (wt ** 4).sum()

    # Same generator seed on both sides: the same sign vectors, so the HVPs must agree
    # (the HVP of a sum of micro-batch losses is the sum of their HVPs).
    opt = esgdm.ESGDM([w], lr=0.2, backend="torch", generator=torch.Generator().manual_seed(0))
    ref = esgdm.ESGDM([w_ref], lr=0.2, backend="torch", generator=torch.Generator().manual_seed(0))
    for _ in range(25):
        opt.zero_grad()
        for k in range(4):
            loss_on(w, x[4 * k:4 * k + 4], y[4 * k:4 * k + 4]).backward(create_graph=opt.should_create_graph())
        opt.step()
        ref.zero_grad()
        loss_on(w_ref, x, y).backward(create_graph=ref.should_create_graph())
        ref.step()
    assert rel_err(w, w_ref) < RTOL_FP32
    assert rel_err(opt.state[w]["exp_avg_d"], ref.state[w_ref]["exp_avg_d"]) < RTOL_FP32


def test_non_dense_transposed_and_channels_last_parameters():
    base = torch.randn(6, 8, dtype=torch.float64)
    strided = base.float()[:, ::2].requires_grad_()      # not dense
    transposed = torch.randn(5, 7).t().requires_grad_()  # dense, permuted
    cl = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    ps = [strided, transposed, cl]
    assert not strided.is_contiguous() and not transposed.is_contiguous()
    rs = clone_params(ps)
    coeffs = make_coeffs(ps)
    opt = esgdm.ESGDM(ps, lr=0.3, update_d_every=3, backend="torch")
    ref = ReferenceESGDM(rs, lr=0.3, update_d_every=3)
    run_both(opt, ref, ps, rs, lambda params, t: separable_loss(params, coeffs), 40)
    assert_params_close(ps, rs)
    # state views have the parameter's layout
    assert opt.state[transposed]["exp_avg"].stride() == transposed.stride()
    assert opt.state[cl]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10),
                                        (torch.float64, 1e-12)])
def test_low_and_high_precision_parameters(dtype, rtol):
    """State and math are float32 (float64 for float64); the parameter is rounded once per step."""
    ps = shapes_params([(17,), (3, 4)], dtype=dtype)
    rs = clone_params(ps)
    coeffs = make_coeffs(ps)
    opt = esgdm.ESGDM(ps, lr=0.3, backend="torch")
    ref = ReferenceESGDM(rs, lr=0.3)
    run_both(opt, ref, ps, rs, lambda params, t: separable_loss(params, coeffs), 10)
    for p, r in zip(ps, rs):
        assert p.dtype == dtype
        assert opt.state[p]["exp_avg"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(p.detach().double(), r.detach().double(), rtol=2 * rtol, atol=2 * rtol)


# ------------------------------------------------------------------ buckets


def test_buckets_group_by_device_and_dtype_with_aligned_views():
    ps = [torch.randn(3, requires_grad=True), torch.randn(5, dtype=torch.float64, requires_grad=True),
          torch.randn(7, requires_grad=True), torch.randn(2, 2, dtype=torch.bfloat16, requires_grad=True)]
    opt = esgdm.ESGDM([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.1}], backend="torch")
    buckets = opt.buckets()
    assert sorted(str(b.dtype) for b in buckets) == ["torch.bfloat16", "torch.float32", "torch.float64"]
    fp32 = next(b for b in buckets if b.dtype == torch.float32)
    assert fp32.params == [ps[0], ps[2]]
    assert fp32.group_index == [0, 1]
    for b in buckets:
        for i, view in enumerate(b.exp_avg_views):
            assert view.data_ptr() % ALIGN_BYTES == 0
            assert view.untyped_storage().data_ptr() == b.exp_avg.untyped_storage().data_ptr()
            assert view.shape == b.params[i].shape
    # state seen through the optimizer is the bucket memory itself
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.steps = opt.d_warmup = 1  # plain step, no HVP needed
    opt.step()
    view = opt.state[ps[2]]["exp_avg"]
    assert view.data_ptr() == fp32.exp_avg_views[1].data_ptr()
    assert torch.allclose(view, torch.full_like(view, 0.1))


def test_signs_are_rademacher_and_keyed_by_seed_step_parameter_and_index():
    from esgdm.signs import rademacher

    v = rademacher(7, 3, 1, (100, 100), dtype=torch.float32, device="cpu")
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(v.mean().item()) < 0.05  # +1 and -1 equally likely
    # Same key, same signs; any other seed, step or parameter key, other signs.
    assert torch.equal(v, rademacher(7, 3, 1, (100, 100), dtype=torch.float32, device="cpu"))
    for other in ((8, 3, 1), (7, 4, 1), (7, 3, 2)):
        w = rademacher(*other, (100, 100), dtype=torch.float32, device="cpu")
        assert 0.4 < (v != w).float().mean().item() < 0.6
    # A shard of rows [30, 70) draws exactly the full tensor's rows: sharding-invariant.
    shard = rademacher(7, 3, 1, (40, 100), dtype=torch.float32, device="cpu", start=30 * 100)
    assert torch.equal(shard, v[30:70])


def test_d_steps_do_not_touch_the_global_rng():
    p = torch.randn(50, requires_grad=True)
    opt = esgdm.ESGDM([p], backend="torch")
    torch.manual_seed(123)
    for _ in range(3):
        opt.zero_grad()
        (p ** 4).sum().backward(create_graph=opt.should_create_graph())
        opt.step()
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_adding_a_param_group_keeps_existing_state():
    a = torch.randn(4, requires_grad=True)
    opt = esgdm.ESGDM([a], lr=0.3, backend="torch")
    for _ in range(3):
        a.grad = None
        (a ** 2).sum().backward(create_graph=opt.should_create_graph())
        opt.step()
    m_before = opt.state[a]["exp_avg"].clone()
    b = torch.randn(5, requires_grad=True)
    opt.add_param_group({"params": [b], "lr": 0.1})
    assert len(opt.buckets()) == 1 and len(opt.buckets()[0]) == 2
    assert torch.equal(opt.state[a]["exp_avg"], m_before)
    a.grad = b.grad = None
    ((a ** 2).sum() + (b ** 2).sum()).backward(create_graph=opt.should_create_graph())
    opt.step()
    assert b in opt.state


# -------------------------------------------------------------- checkpoints


def _train(opt, ps, coeffs, steps):
    for _ in range(steps):
        for p in ps:
            p.grad = None
        separable_loss(ps, coeffs).backward(create_graph=opt.should_create_graph())
        opt.step()


def test_checkpoint_round_trip_continues_identically():
    ps = shapes_params(ODD_SHAPES)
    coeffs = make_coeffs(ps)
    kwargs = dict(lr=0.3, weight_decay=0.01, update_d_every=4, d_warmup=6, backend="torch")
    opt = esgdm.ESGDM(ps, **kwargs)
    _train(opt, ps, coeffs, 13)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps], "opt": opt.state_dict()}, buf)

    _train(opt, ps, coeffs, 20)  # the uninterrupted run
    buf.seek(0)
    ckpt = torch.load(buf)
    qs = [t.clone().requires_grad_() for t in ckpt["params"]]
    fresh = esgdm.ESGDM(qs, **kwargs)
    fresh.load_state_dict(ckpt["opt"])
    assert (fresh.steps, fresh.steps_since_d) == (13, ckpt["opt"]["global_state"]["steps_since_d"])
    _train(fresh, qs, coeffs, 20)
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())


def test_loads_checkpoint_of_the_original_esgd():
    """The original kept exp_avg/exp_avg_d in the parameter dtype and Python floats."""
    ps = shapes_params([(5,), (2, 3)])
    rs = clone_params(ps)
    coeffs = make_coeffs(ps)
    ref = ReferenceESGDM(rs, lr=0.3, update_d_every=5, d_warmup=7)
    for _ in range(9):
        for r in rs:
            r.grad = None
        separable_loss(rs, coeffs).backward(create_graph=ref.should_create_graph())
        ref.step()
    original = {
        "global_state": {"update_d_every": 5, "d_warmup": 7, "steps": ref.steps,
                         "steps_since_d": ref.steps_since_d},
        "state": {i: {"exp_avg_bias_corr": ref.state[r]["bias"], "exp_avg": ref.state[r]["m"].clone(),
                      "exp_avg_d": ref.state[r]["D"].clone(), "lr_warmup_cumprod": ref.state[r]["warm"]}
                  for i, r in enumerate(rs)},
        "param_groups": [{"lr": 0.3, "betas": (0.9, 0.999), "lr_warmup": 0.99, "eps": 1e-4,
                          "weight_decay": 0.0, "params": [0, 1]}],
    }
    qs = clone_params(rs)
    opt = esgdm.ESGDM(qs, backend="torch")  # defaults differ: the checkpoint wins
    opt.load_state_dict(original)
    assert (opt.update_d_every, opt.d_warmup, opt.steps) == (5, 7, 9)
    assert opt.param_groups[0]["lr"] == 0.3
    run_both(opt, ref, qs, rs, lambda params, t: separable_loss(params, coeffs), 30)
    assert_params_close(qs, rs)


# --------------------------------------------------------------- estimator


def test_squared_hvp_estimates_diag_of_h_squared():
    """On a quadratic with a dense Hessian A, E[(A v)^2] = diag(A^2) for Rademacher v.

    With beta2 = 0 and lr = 0 the optimizer's D after each D-step is exactly the
    current squared HVP, so averaging D over steps averages independent draws: a
    Gaussian or a stale v would give a different mean.
    """
    n = 12
    g = torch.Generator().manual_seed(0)
    b = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = (b @ b.T / n + torch.eye(n, dtype=torch.float64)).float()
    x = torch.randn(n, requires_grad=True)
    opt = esgdm.ESGDM([x], lr=0.0, betas=(0.9, 0.0), update_d_every=1, backend="torch",
                      generator=torch.Generator().manual_seed(1))
    draws = 4000
    total = torch.zeros(n, dtype=torch.float64)
    largest = torch.zeros(n, dtype=torch.float64)
    seen = set()
    for _ in range(draws):
        x.grad = None
        (0.5 * x @ A @ x).backward(create_graph=opt.should_create_graph())
        opt.step()
        d = opt.state[x]["exp_avg_d"]
        total += d.double()
        largest = torch.maximum(largest, d.double())
        seen.add(tuple(d.tolist()[:3]))
    mean = total / draws
    target = torch.diag(A.double() @ A.double())
    # Var[(Av)_i^2] <= 2 (sum_j A_ij^2)^2, so the standard error is <= sqrt(2/draws) * target.
    assert torch.all((mean - target).abs() <= 5 * math.sqrt(2 / draws) * target)
    assert len(seen) > 100  # a fresh draw every step
    # A Gaussian v has the same mean square; the largest draw tells them apart:
    # for Rademacher v, |(Av)_i| <= sum_j |A_ij| always, which a Gaussian v breaks
    # many times in 4000 draws of 12 coordinates.
    assert torch.all(largest.sqrt() <= A.double().abs().sum(1) * (1 + 1e-5))


def test_parameters_converted_in_place_move_their_state():
    """model.to(dtype) swaps p.data and keeps the Parameter: the buckets follow."""
    model = torch.nn.Linear(3, 2)
    opt = esgdm.ESGDM(model.parameters(), lr=0.3, backend="torch")
    x = torch.randn(5, 3)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward(create_graph=opt.should_create_graph())
        opt.step()
    m_before = opt.state[model.weight]["exp_avg"].clone()
    model.to(torch.float64)
    assert opt.buckets()[0].dtype == torch.float64
    assert torch.equal(opt.state[model.weight]["exp_avg"], m_before.double())
    opt.zero_grad()
    model(x.double()).pow(2).sum().backward(create_graph=opt.should_create_graph())
    opt.step()
    assert model.weight.dtype == torch.float64 and opt.steps == 4
