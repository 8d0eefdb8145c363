"""The plain-step short cut (``esgdm._C.StepPlan``, :meth:`esgdm.store.BucketStore.plan_step`):
same numbers as the general path, and every case it cannot take goes back to the general
path with nothing written.

The general path is the reference here (``store.USE_PLAN = False``); it is itself compared
with the independent reference optimizer in tests/test_optimizer.py and friends.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import requires_cuda

import esgdm
from esgdm import store as store_mod
from esgdm.backends import cpp_impl

pytestmark = pytest.mark.skipif(
    cpp_impl._C is None or not hasattr(cpp_impl._C, "StepPlan"),
    reason="esgdm._C (with StepPlan) is not built")

SHAPES = [(7, 5), (300,), (1,), (0,), (33, 3, 2), (5000,)]


def _params(dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES]


def _grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=g) * scale).to(device=p.device, dtype=p.dtype) for p in params]


def _hvps(params, step):
    g = torch.Generator().manual_seed(900 + step)
    return [torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype) for p in params]


class _FixedHvp:
    """D-steps take these HVPs (the curvature machinery is not what is tested here)."""

    def __init__(self, opt, params):
        self.params, self.step = params, 0
        opt._curvature.hvps = self.hvps  # type: ignore[method-assign]

    def hvps(self, opt, work, closure, rng):
        hs = _hvps(self.params, self.step)
        by_id = {id(p): h for p, h in zip(self.params, hs)}
        return [[by_id[id(b.params[i])] for i in (range(len(b)) if idx is None else idx)]
                for b, idx, _ in work]


def _spy_on_plan(opt) -> list[bool]:
    """The list, filled as the optimizer steps, of whether each call of ``plan_step``
    stepped (True) or left the step to the general path (False)."""
    used: list[bool] = []
    real = opt._store.plan_step

    def spy(*a):
        stepped = real(*a)
        used.append(stepped)
        return stepped

    opt._store.plan_step = spy
    return used


def _run(monkeypatch, use_plan, dtype, steps=7, groups=False, scaler_scale=None, device="cpu", backend=None,
         **kw):
    monkeypatch.setattr(store_mod, "USE_PLAN", use_plan)
    params = _params(dtype, device=device)
    if groups:
        spec = [{"params": params[:3]}, {"params": params[3:], "lr": 0.03, "weight_decay": 0.1}]
    else:
        spec = params
    backend = backend or ("cpu" if device == "cpu" else "cuda")
    opt = esgdm.ESGDM(spec, lr=0.1, update_d_every=3, d_warmup=2, backend=backend, seed=3, **kw)
    fixed = _FixedHvp(opt, params)
    used = _spy_on_plan(opt)
    for step in range(steps):
        fixed.step = step
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        if scaler_scale is not None:
            opt.grad_scale = torch.tensor(scaler_scale, device=device)
            opt.found_inf = torch.tensor(1.0 if step == 4 else 0.0, device=device)
            for p in params:
                p.grad = (p.grad.float() * scaler_scale).to(dtype)
        opt.step()
    return params, opt, used


def _state(params, opt):
    out = [p.detach().clone() for p in params]
    for p in params:
        for v in opt.state[p].values():
            out.append(v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(v))
    return out


CASES = [
    (torch.float32, {}),
    (torch.float32, {"state_dtype": torch.bfloat16}),
    (torch.float32, {"state_dtype": torch.uint8}),
    (torch.bfloat16, {}),
    (torch.bfloat16, {"stochastic_rounding": False}),
    (torch.float16, {}),
    (torch.float64, {}),
    (torch.float32, {"exact": True}),
]


def _plan_against_general_path(monkeypatch, dtype, kw, **run) -> tuple:
    """Runs :func:`_run` through the plan and through the general path alone, asserts
    the same bits, and returns the planned run's optimizer and its plan_step outcomes."""
    p_plan, opt_plan, used = _run(monkeypatch, True, dtype, **run, **kw)
    p_ref, opt_ref, used_ref = _run(monkeypatch, False, dtype, **run, **kw)
    assert not any(used_ref) and len(used_ref) == len(used)
    for a, b in zip(_state(p_plan, opt_plan), _state(p_ref, opt_ref)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    return opt_plan, used


# steps 0, 1 (warm-up) and 4 are D-steps (general path, which builds the plan); the plain
# steps 2, 3, 5 and 6 take the plan.  With a GradScaler, step 4 finds an inf and does not
# count, so step 5 is the D-step: plain steps 2, 3 and 6.
PLAIN_STEPS, PLAIN_STEPS_WITH_SKIP = 4, 3


@pytest.mark.parametrize("dtype,kw", CASES)
@pytest.mark.parametrize("groups", [False, True])
def test_plan_matches_general_path(monkeypatch, dtype, kw, groups):
    _, used = _plan_against_general_path(monkeypatch, dtype, kw, groups=groups)
    assert used == [True] * PLAIN_STEPS


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype,kw", CASES[:5])
def test_plan_matches_general_path_on_a_gpu(monkeypatch, dtype, kw, backend):
    """The same on CUDA tensors, GradScaler included: the "cuda" kernel run by the plan,
    and the "triton" kernel launched over the table the plan writes (from pinned memory)."""
    if esgdm.backends.get(backend).why_not(torch.device("cuda"), dtype) is not None:
        pytest.skip(f"the {backend} backend cannot run here")
    opt, used = _plan_against_general_path(monkeypatch, dtype, kw, groups=True, scaler_scale=256.0, device="cuda",
                                           backend=backend)
    assert used == [True] * PLAIN_STEPS_WITH_SKIP
    assert len(opt._store.plan_launchers) == (len(opt._store.buckets) if backend == "triton" else 0)


def _triton_steps_cpu_tensors() -> bool:
    return esgdm.backends.get("triton").why_not(torch.device("cpu"), torch.float32) is None


requires_triton_interpreter = pytest.mark.skipif(
    not _triton_steps_cpu_tensors(), reason="the triton backend steps CPU tensors only in Triton's interpreter")


@requires_triton_interpreter
@pytest.mark.parametrize("dtype,kw", [c for c in CASES if c[0] != torch.float64])
def test_plan_launches_the_triton_kernel_like_the_general_path(monkeypatch, dtype, kw):
    """A bucket of the "triton" backend: the plan checks and gathers, writes the
    gradients' addresses into the launcher's own table, and the launch steps it with the
    general path's bits (groups, GradScaler with a skipped step)."""
    opt, used = _plan_against_general_path(monkeypatch, dtype, kw, groups=True, scaler_scale=64.0,
                                           backend="triton")
    assert used == [True] * PLAIN_STEPS_WITH_SKIP
    assert len(opt._store.plan_launchers) == len(opt._store.buckets)  # (8-bit state: two buckets)


@requires_triton_interpreter
def test_plan_launch_table_follows_moved_and_reused_gradients(monkeypatch):
    """The launch table is uploaded only when a gradient's address changed: gradients
    written in place (the same addresses every step), then gradients in new memory
    while the old stays alive (every address new), then back to the first memory."""
    results = []
    for use_plan in (True, False):
        params, grads, opt, used = _views_of_one_buffer_stepped_once(monkeypatch, use_plan, "triton")
        other = torch.empty_like(grads)
        for step in range(6):
            flat = torch.cat([g.flatten() for g in _grads(params, step)])
            buffer = other if step in (2, 3) else grads
            buffer.copy_(flat)
            at = 0
            for p in params:
                p.grad = buffer[at:at + p.numel()].view(p.shape)
                at += p.numel()
            opt.step()
        assert used == [use_plan] * 6
        results.append(_state(params, opt))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@requires_triton_interpreter
def test_plan_with_a_launch_lets_go_of_the_gradients_even_when_the_launch_fails(monkeypatch):
    from esgdm.kernels import esgdm_step

    params, opt = _ready(backend="triton")
    assert opt._store.plan is not None and opt._store.plan.launches == 1
    ref = weakref.ref(params[5].grad)
    opt.step()  # through the plan
    params[5].grad = None
    gc.collect()
    assert ref() is None

    params[5].grad = torch.ones_like(params[5])
    ref = weakref.ref(params[5].grad)

    def fail(*args, **kwargs):
        raise RuntimeError("launch failed")
    monkeypatch.setattr(esgdm_step, "launch", fail)
    with pytest.raises(RuntimeError, match="launch failed"):
        opt.step()
    params[5].grad = None
    gc.collect()
    assert ref() is None
    assert not opt._store.plan_lock.locked()


def test_plan_with_grad_scaler_and_skipped_step(monkeypatch):
    p_plan, opt_plan, used = _run(monkeypatch, True, torch.float32, scaler_scale=1024.0)
    p_ref, opt_ref, _ = _run(monkeypatch, False, torch.float32, scaler_scale=1024.0)
    assert any(used)
    for a, b in zip(_state(p_plan, opt_plan), _state(p_ref, opt_ref)):
        assert torch.equal(a, b)
    assert opt_plan.steps == opt_ref.steps == 6  # step 4 found an inf


def _ready(dtype=torch.float32, backend="cpu", **kw):
    """An optimizer whose next plain step can take the plan."""
    params = _params(dtype)
    opt = esgdm.ESGDM(params, lr=0.1, update_d_every=100, d_warmup=1, backend=backend, seed=1, **kw)
    fixed = _FixedHvp(opt, params)
    for step in range(2):
        fixed.step = step
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    assert (opt._store.plan is not None) == store_mod.USE_PLAN
    return params, opt


def _snapshot(params, opt):
    return [t.clone() for t in _state(params, opt)] + [opt._store.buckets[0].scalars.clone()]


def _unchanged(before, params, opt):
    after = _snapshot(params, opt)
    return all(torch.equal(a, b) for a, b in zip(before, after))


def test_wrong_shape_gradient_refused_and_nothing_written():
    params, opt = _ready()
    params[1].grad.data = torch.randn(299)  # a parameter of 300 elements (torch checks only `.grad =`)
    before = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match=r"gradient of parameter 1 in group 0 has shape \(299,\)"):
        opt.step()
    assert _unchanged(before, params, opt)


def test_wrong_dtype_gradient_refused():
    params, opt = _ready()
    params[4].grad.data = params[4].grad.double()
    before = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match="gradient of parameter 4 in group 0 has dtype torch.float64"):
        opt.step()
    assert _unchanged(before, params, opt)


def test_bad_grad_scale_refused_before_any_write():
    params, opt = _ready()
    opt.grad_scale = torch.tensor(2.0, dtype=torch.float64)
    before = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match="grad_scale"):
        opt.step()
    assert _unchanged(before, params, opt)


def test_missing_gradient_steps_the_rest(monkeypatch):
    """A parameter without a gradient: the general path steps the others (same numbers)."""
    results = []
    for use_plan in (True, False):
        monkeypatch.setattr(store_mod, "USE_PLAN", use_plan)
        params, opt = _ready()
        params[2].grad = None
        opt.step()
        results.append(_state(params, opt))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_strided_gradient_stepped_like_general_path(monkeypatch):
    """A gradient with other strides than its parameter (a transposed copy)."""
    results = []
    for use_plan in (True, False):
        monkeypatch.setattr(store_mod, "USE_PLAN", use_plan)
        params, opt = _ready()
        params[0].grad = params[0].grad.t().contiguous().t()
        opt.step()
        results.append(_state(params, opt))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_parameter_data_replaced_is_followed():
    params, opt = _ready()
    new = torch.randn(7, 5)
    params[0].data = new.clone()  # same shape, new memory: the state follows
    for p, g in zip(params, _grads(params, 9)):
        p.grad = g
    opt.step()
    assert not torch.equal(params[0].detach(), new)  # stepped in its new memory
    assert opt._store.plan is not None  # rebuilt for the new layout


def test_parameter_swapped_in_group_list_is_followed():
    params, opt = _ready()
    other = torch.randn(300, requires_grad=True)
    opt.param_groups[0]["params"][1] = other
    other.grad = torch.randn(300)
    params[1].grad = None
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), before)  # no longer a parameter of opt
    assert params[1] not in opt.state
    assert opt.state[other]["exp_avg"].abs().sum() > 0  # stepped (fresh state: D unobserved)


def test_add_param_group_is_stepped():
    params, opt = _ready()
    extra = torch.randn(10, requires_grad=True)
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.randn(10)
    kept = extra.detach().clone()
    opt.step()
    # stepped: its m moved; its D is not observed yet, so the rule leaves it in place
    assert opt.state[extra]["exp_avg"].abs().sum() > 0
    assert torch.equal(extra.detach(), kept)


def test_maximize_takes_general_path(monkeypatch):
    results = []
    for use_plan in (True, False):
        monkeypatch.setattr(store_mod, "USE_PLAN", use_plan)
        params, opt = _ready()
        for g in opt.param_groups:
            g["maximize"] = True
        opt.step()
        results.append(_state(params, opt))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_state_reset_by_user_is_followed(monkeypatch):
    results = []
    for use_plan in (True, False):
        monkeypatch.setattr(store_mod, "USE_PLAN", use_plan)
        params, opt = _ready()
        opt.state[params[1]] = {}
        opt.step()
        results.append(_state(params, opt))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_plan_keeps_no_gradient_alive():
    params, opt = _ready()
    ref = weakref.ref(params[5].grad)
    opt.step()
    params[5].grad = None
    gc.collect()
    assert ref() is None


def _views_of_one_buffer(seed=0):
    """Parameters and gradients as views of one parameter buffer and one gradient buffer
    (as trainers that keep contiguous buffers have them)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(torch.Size(s).numel()) for s in SHAPES]
    data = torch.randn(sum(sizes), generator=g)
    grads = torch.randn(sum(sizes), generator=g)
    params, at = [], 0
    for s, n in zip(SHAPES, sizes):
        p = torch.nn.Parameter(data[at:at + n].view(s))
        p.grad = grads[at:at + n].view(s)
        params.append(p)
        at += n
    return params, grads


def _views_of_one_buffer_stepped_once(monkeypatch, use_plan: bool, backend: str) -> tuple:
    """:func:`_views_of_one_buffer` after a first step (a D-step: the general path, which
    builds the plan), with the spy on later plan_step calls: (params, grads, opt, used)."""
    monkeypatch.setattr(store_mod, "USE_PLAN", use_plan)
    params, grads = _views_of_one_buffer()
    opt = esgdm.ESGDM(params, lr=0.1, update_d_every=100, d_warmup=1, backend=backend, seed=1)
    _FixedHvp(opt, params)
    opt.step()
    return params, grads, opt, _spy_on_plan(opt)


def test_gradients_that_are_views_of_one_buffer(monkeypatch):
    """The plan steps them (holding the buffer once) with the general path's numbers,
    and lets go of the buffer after the call."""
    from torch.multiprocessing.reductions import StorageWeakRef

    results = []
    for use_plan in (True, False):
        params, grads, opt, used = _views_of_one_buffer_stepped_once(monkeypatch, use_plan, "cpu")
        for step in range(3):
            grads.copy_(torch.cat([g.flatten() for g in _grads(params, step)]))
            opt.step()
        assert used == [use_plan] * 3
        results.append(_state(params, opt))
        if use_plan:
            buffer = StorageWeakRef(grads.untyped_storage())
            for p in params:
                p.grad = None
            del grads
            gc.collect()
            assert buffer.expired()
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------- esgdm::step_flat_ on the C++ kernel

def _flat_inputs(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += (p.numel() + 3) // 4 * 4
    m = torch.randn(total, generator=g) * 0.1
    d = torch.rand(total, generator=g) * 0.01
    n = len(params)
    scalars = torch.tensor([[0.9 ** 3, 0.5, 3.0, 0.05]] * n, dtype=torch.float64)
    index = torch.tensor([[i, 0] for i in range(n)], dtype=torch.int32)
    hparams = torch.tensor([[0.1, 0.9, 0.999, 0.99, 1e-4, 0.01]], dtype=torch.float64)
    return params, grads, m, d, offsets, scalars, index, hparams


def test_step_flat_on_the_cpu_kernel_matches_step_on_views():
    """esgdm::step_flat_ with kernel "cpu" (views cut and checked in C++) gives the bits of
    esgdm::step_ on the views cut in Python."""
    shapes = [(7, 5), (300,), (1,), (0,), (33, 3, 2)]
    a = _flat_inputs(shapes)
    b = _flat_inputs(shapes)
    params, grads, m, d, offsets, scalars, index, hparams = a
    torch.ops.esgdm.step_flat_(params, grads, m, d, offsets, None, scalars, index, hparams,
                               None, None, 0, 5, "cpu")
    params2, grads2, m2, d2, offsets2, scalars2, index2, hparams2 = b
    views_m = esgdm.ops.state_views(params2, m2, offsets2)
    views_d = esgdm.ops.state_views(params2, d2, offsets2)
    torch.ops.esgdm.step_(params2, grads2, views_m, views_d, None, scalars2, index2, hparams2,
                          None, None, 0, 5, "cpu")
    for x, y in zip(params + [m, d, scalars], params2 + [m2, d2, scalars2]):
        assert torch.equal(x, y)


def test_step_flat_cpu_operator_matches_step_flat_and_refuses_before_writing():
    """esgdm::step_flat_cpu_ (the C++ kernel a compiled plain step of the "cpu" backend
    calls) gives the bits of esgdm::step_flat_ with kernel "cpu", and refuses an index
    row outside scalars or hparams, or state outside the flat buffers, by name, with
    nothing written (no Python kernel checks the index before it here)."""
    if cpp_impl.CpuBackend.plain_flat_op is None:
        pytest.skip("esgdm._C has no esgdm::step_flat_cpu_")
    shapes = [(7, 5), (300,), (1,), (0,), (33, 3, 2)]
    a, b = _flat_inputs(shapes), _flat_inputs(shapes)
    torch.ops.esgdm.step_flat_cpu_(*a[:5], *a[5:], None, None, 0, 5)
    params, grads, m, d, offsets, scalars, index, hparams = b
    torch.ops.esgdm.step_flat_(params, grads, m, d, offsets, None, scalars, index, hparams, None, None, 0, 5, "cpu")
    for x, y in zip(a[0] + [a[2], a[3], a[5]], params + [m, d, scalars]):
        assert torch.equal(x, y)
    for column, value, match in ((0, 99, r"index\[1, 0\] = 99 is not a row of scalars \(5 rows\)"),
                                 (1, -1, r"index\[1, 1\] = -1 is not a row of hparams \(1 rows\)")):
        params, grads, m, d, offsets, scalars, index, hparams = _flat_inputs(shapes)
        index[1, column] = value
        before = [t.clone() for t in params + [m, d, scalars]]
        with pytest.raises(RuntimeError, match=match):
            torch.ops.esgdm.step_flat_cpu_(params, grads, m, d, offsets, scalars, index, hparams, None, None, 0, 5)
        assert all(torch.equal(x, y) for x, y in zip(before, params + [m, d, scalars]))
    params, grads, m, d, offsets, scalars, index, hparams = _flat_inputs(shapes)
    offsets[4] = m.numel() - 10  # a parameter of 198 elements
    before = [t.clone() for t in params + [m, d, scalars]]
    with pytest.raises(RuntimeError, match=r"offsets\[4\] = .* outside the flat buffers"):
        torch.ops.esgdm.step_flat_cpu_(params, grads, m, d, offsets, scalars, index, hparams, None, None, 0, 5)
    assert all(torch.equal(x, y) for x, y in zip(before, params + [m, d, scalars]))


def test_step_flat_uses_a_buckets_own_views_only_for_its_own_layout():
    """esgdm::step_flat_ on the "torch" backend (what a compiled step calls) steps a
    bucket's buffers through the views the bucket holds, instead of cutting them anew,
    only when the offsets and the parameters' layouts are the bucket's; other offsets
    (here the tensors packed in reverse order) are cut and stepped as given."""
    params = _params(torch.float32)
    opt = esgdm.ESGDM(params, lr=0.1, update_d_every=100, d_warmup=1, backend="torch", seed=1)
    fixed = _FixedHvp(opt, params)
    for step in range(2):  # a D-step, then a plain one
        fixed.step = step
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    b = opt._store.buckets[0]
    hparams = opt._store.hparam_tables[b.device]
    assert esgdm.buckets.own_state_views(b.tensors, b.exp_avg, b.exp_avg_d, b.offsets) == \
        (b.exp_avg_views, b.exp_avg_d_views)
    reverse, total = [0] * len(b), 0
    for i in reversed(range(len(b))):
        reverse[i] = total
        total += -(-b.tensors[i].numel() // 4) * 4
    assert total <= b.exp_avg.numel() and reverse != b.offsets
    for offsets in (list(b.offsets), reverse):
        grads = [torch.randn_like(t) for t in b.tensors]
        work = [t.detach().clone() for t in b.tensors]
        m, d, scalars = b.exp_avg.clone(), b.exp_avg_d.clone(), b.scalars.clone()
        # the reference: the same step on copies, through views cut here
        torch.ops.esgdm.step_(work, grads, esgdm.ops.state_views(work, m, offsets),
                              esgdm.ops.state_views(work, d, offsets), None, scalars, b.index(None),
                              hparams, None, None, 0, 5, "torch")
        with torch.no_grad():
            torch.ops.esgdm.step_flat_(b.tensors, grads, b.exp_avg, b.exp_avg_d, offsets, None, b.scalars,
                                       b.index(None), hparams, None, None, 0, 5, "torch")
        for x, y in zip(list(b.tensors) + [b.exp_avg, b.exp_avg_d, b.scalars], work + [m, d, scalars]):
            assert torch.equal(x, y)
    assert esgdm.buckets.own_state_views(b.tensors, b.exp_avg, b.exp_avg_d, reverse) is None
    assert esgdm.buckets.own_state_views(b.tensors, b.exp_avg.clone(), b.exp_avg_d, b.offsets) is None


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)])
def test_step_flat_state_pointers_match_views_for_any_dense_layout(dtype, state_dtype):
    """esgdm._C.step_flat reads each parameter's state at its offset with the
    parameter's own (dense) layout, as the views would: transposed and permuted
    parameters, empty ones, and offsets with gaps, against esgdm._C.step on the views."""
    g = torch.Generator().manual_seed(5)
    base = [torch.randn(5, 7, generator=g).t(), torch.randn(3, 4, 2, generator=g).permute(2, 0, 1),
            torch.randn(9, generator=g), torch.randn(0, 3, generator=g), torch.randn(2, 6, generator=g)]
    params = [p.to(dtype) for p in base]
    grads = [torch.empty_strided(p.shape, p.stride(), dtype=dtype).copy_(torch.randn(p.shape, generator=g))
             for p in params]
    offsets, total = [], 3
    for p in params:
        offsets.append(total)
        total += p.numel() + 5
    m = (torch.randn(total, generator=g) * 0.1).to(state_dtype)
    d = (torch.rand(total, generator=g) * 0.01).to(state_dtype)
    n = len(params)
    scalars = torch.tensor([[0.9 ** 3, 0.5, 3.0, 0.05]] * n, dtype=torch.float64)
    index = torch.tensor([[i, 0] for i in range(n)], dtype=torch.int32)
    hparams = torch.tensor([[0.1, 0.9, 0.999, 0.99, 1e-4, 0.01]], dtype=torch.float64)
    flat = [t.clone() for t in (*params, m, d, scalars)]
    views = [t.clone() for t in (*params, m, d, scalars)]
    ext = cpp_impl._C
    ext.step_flat(flat[:n], grads, flat[n], flat[n + 1], offsets, flat[n + 2], index, hparams, None, None, 0, 9)
    ext.step(views[:n], grads, esgdm.ops.state_views(views[:n], views[n], offsets),
             esgdm.ops.state_views(views[:n], views[n + 1], offsets), None, views[n + 2], index, hparams,
             None, None, 0, 9)
    for x, y in zip(flat, views):
        assert torch.equal(x, y)
    assert not torch.equal(flat[n], m)  # (it stepped)


@pytest.mark.parametrize("bad,match", [
    ("negative_offset", r"offsets\[2\] = -1 puts the state"),
    ("past_the_end", r"offsets\[4\] = 40 puts the state of a parameter of shape \[4\] outside the flat buffers of 43"),
    ("strided_param", r"params\[1\] .* is not dense"),
    ("state_dtype", "exp_avgs\\[0\\] has dtype Half; state"),
    ("uint8_state", "uint8 state needs its block scales"),
    ("grads_len", "got 5 params but 4 grads"),
    ("grad_dtype", r"grads\[3\] has dtype Double"),
])
def test_step_flat_checks_in_cpp_before_any_write(bad, match):
    """What esgdm._C.step_flat refuses itself (the operator's Python checks aside), with
    nothing written."""
    params, grads, m, d, offsets, scalars, index, hparams = _flat_inputs([(7, 5), (300,), (1,), (0,), (4,)])
    m, d = m[:43].clone(), d[:43].clone()
    offsets = [0, 36, 0, 0, 36]  # (within 43 elements: states may overlap here, bits aside)
    if bad == "negative_offset":
        offsets[2] = -1
    elif bad == "past_the_end":
        offsets[4] = 40
    elif bad == "strided_param":
        params[1], grads[1] = torch.randn(8)[::2], torch.randn(4)
    elif bad in ("state_dtype", "uint8_state"):
        kind = torch.float16 if bad == "state_dtype" else torch.uint8
        m, d = m.to(kind), d.to(kind)
    elif bad == "grads_len":
        grads = grads[:4]
    else:
        grads[3] = grads[3].double()
    if bad != "strided_param":
        params[1], grads[1] = params[1][:6], grads[1][:6]  # (to fit the 43 elements)
    before = [t.clone() for t in params + [m, d, scalars]]
    with pytest.raises(RuntimeError, match=match):
        cpp_impl._C.step_flat(params, grads, m, d, offsets, scalars, index, hparams, None, None, 0, 5)
    assert all(torch.equal(x, y) for x, y in zip(before, params + [m, d, scalars]))


@pytest.mark.parametrize("bad,match", [
    ("offset", r"offsets\[1\] = 1000 puts the state of a parameter of shape \[300\] outside"),
    ("grad_shape", r"grads\[1\] has shape \[299\]"),
    ("offsets_len", "offsets has 4 entries, params has 5"),
])
def test_step_flat_on_the_cpu_kernel_refuses_bad_input(bad, match):
    params, grads, m, d, offsets, scalars, index, hparams = _flat_inputs([(7, 5), (300,), (1,), (0,), (4,)])
    if bad == "offset":
        offsets[1] = 1000
    elif bad == "grad_shape":
        grads[1] = torch.randn(299)
    else:
        offsets = offsets[:4]
    before = [t.clone() for t in params + [m, d, scalars]]
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.ops.esgdm.step_flat_(params, grads, m, d, offsets, None, scalars, index, hparams,
                                   None, None, 0, 5, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(before, params + [m, d, scalars]))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=requires_triton_interpreter)])
def test_plan_steps_from_two_threads_take_turns(backend):
    """StepPlan.step holds the gradients it gathered for the length of one call: calls
    from two threads take turns (each a whole step), as many steps as calls, the same
    result as the same calls made one after the other.  With a launch bucket ("triton"),
    through the store: its step, launch and release are one turn."""
    import threading

    results = []
    for threads in (1, 2):
        params, opt = _ready(backend=backend)
        store = opt._store
        hparams = store.device_hparams(opt, store.buckets)
        args = ([g["params"] for g in opt.param_groups], [hparams[b.device] for b in store.buckets],
                None, None, opt._flags(), 7)
        statuses = []

        def run(k, plan=store.plan, args=args, statuses=statuses, opt=opt):
            for _ in range(k):
                if backend == "cpu":
                    statuses.append(plan.step(*args))
                else:
                    statuses.append(0 if opt._store.plan_step(opt, None, None) else -1)
        calls = 40 if backend == "cpu" else 6
        workers = [threading.Thread(target=run, args=(calls // threads,)) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert statuses == [0] * calls
        results.append([p.detach().clone() for p in params] + [store.buckets[0].scalars.clone()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_gradient_without_storage_goes_the_general_path():
    """A gradient that is a wrapper without memory of its own (here a DTensor of the
    parameter's shape) is refused, naming the parameter, and nothing is written (the
    plan and then the kernel read it without the GIL before: a crash)."""
    pytest.importorskip("torch.distributed.tensor")
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh
    created = _single_process_group(dist)
    try:
        params, opt = _ready()
        mesh = init_device_mesh("cpu", (1,))
        params[1].grad = DTensor.from_local(torch.randn(300), mesh, [Replicate()])
        before = _snapshot(params, opt)
        with pytest.raises(RuntimeError, match="gradient of parameter 1 in group 0"):
            opt.step()
        assert _unchanged(before, params, opt)
    finally:
        if created:
            dist.destroy_process_group()


def test_the_cpu_kernel_refuses_a_tensor_subclass_without_memory():
    """esgdm._C.step asked to read a DTensor (no memory of its own; its sizes are
    Python's) refuses it by name instead of reading it without the GIL (a crash before)."""
    pytest.importorskip("torch.distributed.tensor")
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh
    created = _single_process_group(dist)
    try:
        mesh = init_device_mesh("cpu", (1,))
        params, grads, m, d, offsets, scalars, index, hparams = _flat_inputs([(7, 5), (300,)])
        grads[1] = DTensor.from_local(grads[1], mesh, [Replicate()])
        views_m = esgdm.ops.state_views(params, m, offsets)
        views_d = esgdm.ops.state_views(params, d, offsets)
        with pytest.raises(RuntimeError, match=r"grads\[1\] is a tensor subclass without memory"):
            cpp_impl._C.step(params, grads, views_m, views_d, None, scalars, index, hparams, None, None, 0, 0)
    finally:
        if created:
            dist.destroy_process_group()


def _single_process_group(dist) -> bool:
    """A one-process gloo group for DTensors, if none is there (True: made here)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


@pytest.mark.parametrize("which", ["params", "grads"])
def test_step_flat_refuses_a_tensor_subclass_without_memory(which):
    """esgdm._C.step_flat with a DTensor parameter or gradient refuses it by name before
    asking it anything (the C++ code runs without the GIL: its sizes may be Python's)."""
    pytest.importorskip("torch.distributed.tensor")
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh
    created = _single_process_group(dist)
    try:
        mesh = init_device_mesh("cpu", (1,))
        params, grads, m, d, offsets, scalars, index, hparams = _flat_inputs([(7, 5), (300,)])
        lists = {"params": params, "grads": grads}
        lists[which][1] = DTensor.from_local(lists[which][1], mesh, [Replicate()])
        before = [t.clone() for t in [params[0], m, d, scalars]]
        with pytest.raises(RuntimeError, match=rf"{which}\[1\] is a tensor subclass without memory"):
            cpp_impl._C.step_flat(params, grads, m, d, offsets, scalars, index, hparams, None, None, 0, 0)
        assert all(torch.equal(x, y) for x, y in zip(before, [params[0], m, d, scalars]))
    finally:
        if created:
            dist.destroy_process_group()
