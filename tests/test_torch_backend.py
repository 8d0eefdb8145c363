"""The "torch" backend's own machinery: pieces, reused buffers and the compiled second
stage give the reference rule's numbers bit for bit (issue 19, item 2)."""

from __future__ import annotations

import pytest
import torch

import esgdm
from esgdm import ops, rule
from esgdm.backends import torch_impl

CPU = torch.device("cpu")


@pytest.fixture
def eager_only(monkeypatch):
    """The backend with its compiled second stage switched off (and decided afresh)."""
    monkeypatch.setattr(torch_impl, "COMPILE_DEVICES", ())
    monkeypatch.setattr(torch_impl, "_finishes", {})


def _compiled_or_skip(dtype=torch.float32, exact=False, d_step=False):
    finish = torch_impl.compiled_finish(CPU, dtype, exact, d_step)
    if finish is None:
        pytest.skip("torch.compile is not available here (or its kernel was refused by the probe)")
    return finish


def _op_inputs(numels, dtype, state_dtype, seed):
    """Lists for esgdm::step_ with non-finite gradients, h*h overflows, D == 0 and
    tiny D, zeros of both signs."""
    gen = torch.Generator().manual_seed(seed)

    def r(n, dt, scale=1.0):
        return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dt)
    ps, gs, ms, ds, hs = [], [], [], [], []
    for n in numels:
        p, g, m, h = r(n, dtype), r(n, dtype), r(n, state_dtype, 0.1), r(n, dtype)
        d = r(n, torch.float64, 0.1) ** 2
        d[torch.rand(n, generator=gen) < 0.2] = 0
        d = d.to(state_dtype)
        if n > 8:
            g[1], g[2], g[3], p[4], m[5] = float("nan"), float("inf"), -float("inf"), -0.0, -0.0
            h[6] = float("nan")
            h[7] = 3e38 if dtype != torch.float16 else 6e4
        ps.append(p), gs.append(g), ms.append(m), ds.append(d), hs.append(h)
    n = len(numels)
    scalars = torch.zeros(n + 1, 4, dtype=torch.float64)
    scalars[:, rule.BIAS] = 0.9 ** torch.arange(n + 1)
    scalars[:, rule.WARM] = 0.5
    scalars[:, rule.STEPS] = 3
    scalars[:, rule.DSCALE] = torch.rand(n + 1, generator=gen, dtype=torch.float64) * 0.3
    scalars[1, rule.DSCALE] = 0.0  # one tensor whose curvature was never observed
    index = torch.stack([torch.arange(n) + 1, torch.zeros(n, dtype=torch.long)], 1).int()
    hparams = torch.tensor([[0.01, 0.9, 0.999, 0.99, 1e-4, 0.05]], dtype=torch.float64)
    return ps, gs, ms, ds, hs, scalars, index, hparams


def _step(inputs, d_step, flags, grad_scale=None, found_inf=None, seed=7):
    ps, gs, ms, ds, hs, scalars, index, hparams = [
        [t.clone() for t in x] if isinstance(x, list) else x.clone() for x in inputs]
    ops.step_(ps, gs, ms, ds, hs if d_step else None, scalars, index, hparams,
              grad_scale, found_inf, flags, seed, "torch")
    return ps + ms + ds + [scalars]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.bfloat16), (torch.float64, torch.float64)])
@pytest.mark.parametrize("d_step", [False, True])
def test_pieces_give_the_whole_tensors_numbers(monkeypatch, eager_only, dtype, state_dtype, d_step):
    """Cutting tensors into pieces (and stochastic rounding's element index across
    pieces) changes no bit: one piece per tensor against pieces of 1000 elements."""
    inputs = _op_inputs([5003, 17, 1, 0, 2100], dtype, state_dtype, seed=1)
    gs_, fi = torch.tensor([4.0]), torch.tensor([0.0])
    for flags in (0, rule.FLAG_EXACT | rule.FLAG_STOCHASTIC_ROUNDING):
        whole = _step(inputs, d_step, flags, gs_, fi)
        monkeypatch.setattr(torch_impl, "CHUNK", 1000)
        pieces = _step(inputs, d_step, flags, gs_, fi)
        monkeypatch.setattr(torch_impl, "CHUNK", 1 << 20)
        _same(whole, pieces)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("d_step", [False, True])
def test_compiled_second_stage_gives_the_eager_numbers(monkeypatch, dtype, exact, d_step):
    """The op on tensors large enough for the compiled second stage: the same bits as
    with everything eager (grad_scale, a set and an unset found_inf included)."""
    _compiled_or_skip(dtype, exact, d_step)
    inputs = _op_inputs([torch_impl.COMPILE_MIN * 2 + 5, torch_impl.COMPILE_MIN + 1, 300], dtype, dtype, seed=2)
    flags = rule.FLAG_EXACT if exact else 0
    for gs_, fi in ((None, None), (torch.tensor([8.0]), torch.tensor([0.0])), (None, torch.tensor([1.0]))):
        compiled = _step(inputs, d_step, flags, gs_, fi)
        monkeypatch.setattr(torch_impl, "COMPILE_DEVICES", ())
        monkeypatch.setattr(torch_impl, "_finishes", {})
        eager = _step(inputs, d_step, flags, gs_, fi)
        monkeypatch.undo()
        _same(compiled, eager)


def test_the_probe_refuses_a_kernel_that_differs():
    """The probe compares bits: a second stage whose step is one ulp off is refused,
    the eager one itself accepted."""
    def off_by_one_ulp(p, g, m, d, m_new, d_new, mhat, root, *, step_scale, **kw):
        nudged = torch.nextafter(step_scale, torch.full_like(step_scale, float("inf")))
        return rule.finish_elements(p, g, m, d, m_new, d_new, mhat, root, step_scale=nudged,
                                    **{**kw, "scratch": lambda name, dt: torch.empty_like(p, dtype=dt)})

    def eager(p, g, m, d, m_new, d_new, mhat, root, **kw):
        return rule.finish_elements(p, g, m, d, m_new, d_new, mhat, root,
                                    **{**kw, "scratch": lambda name, dt: torch.empty_like(p, dtype=dt)})
    for exact in (False, True):
        assert torch_impl._agrees(eager, CPU, torch.float32, exact, True)
        assert not torch_impl._agrees(off_by_one_ulp, CPU, torch.float32, exact, True)


def _train(backend_setup, exact):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 320), torch.nn.ReLU(), torch.nn.Linear(320, 4))
    x, y = torch.randn(64, 64), torch.randint(0, 4, (64,))
    opt = esgdm.ESGDM(net.parameters(), lr=0.1, backend="torch", seed=3, d_warmup=2, update_d_every=3,
                      weight_decay=0.01, exact=exact)
    with backend_setup():
        for _ in range(10):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward(create_graph=opt.should_create_graph())
            opt.step()
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [p.detach().clone() for p in net.parameters()] + state


@pytest.mark.parametrize("exact", [False, True])
def test_training_with_the_compiled_stage_is_training_without_it(monkeypatch, exact):
    """A small MLP (one 20K-element weight: compiled pieces) for 10 steps with D-steps:
    parameters and state equal bit for bit with and without the compiled stage."""
    import contextlib
    _compiled_or_skip()
    with_compiled = _train(contextlib.nullcontext, exact)

    @contextlib.contextmanager
    def eager():
        with monkeypatch.context() as mp:
            mp.setattr(torch_impl, "COMPILE_DEVICES", ())
            mp.setattr(torch_impl, "_finishes", {})
            yield
    _same(with_compiled, _train(eager, exact))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("d_step", [False, True])
@pytest.mark.parametrize("numels", [
    [100, 7, 30000, 1, 5, 70000, 12, 0, 3],  # sizes that differ: scalars repeated per element
    [256] * 6 + [7, 7, 300] + [64] * 3 + [1, 1, 90000, 9, 9],  # runs of one size: [k, size] matrices
])
def test_groups_give_the_per_tensor_numbers(monkeypatch, dtype, d_step, numels):
    """Small tensors stepped as one group (joined; scalars repeated per element, or as
    columns of a matrix of tensors of one size) give the bits of stepping them one by
    one, with grad_scale and found_inf, exact or not."""
    inputs = _op_inputs(numels, dtype, dtype, seed=5)
    for flags in (0, rule.FLAG_EXACT):
        for gs_, fi in ((None, None), (torch.tensor([2.0]), torch.tensor([0.0])),
                        (torch.tensor([2.0]), torch.tensor([1.0]))):
            grouped = _step(inputs, d_step, flags, gs_, fi)
            monkeypatch.setattr(torch_impl, "GROUP_BELOW", 0)
            alone = _step(inputs, d_step, flags, gs_, fi)
            monkeypatch.undo()
            _same(grouped, alone)


def test_state_that_lies_back_to_back_is_stepped_in_place():
    """The optimizer's state of a bucket is one buffer: a group steps it through one view
    (no copy); tensors that do not lie back to back are joined in a copy."""
    m = torch.zeros(30)
    views = [m[0:10], m[10:12], m[12:30]]
    flat, is_view = torch_impl._joined(views, [10, 2, 18], 30)
    assert is_view and flat.data_ptr() == m.data_ptr() and flat.numel() == 30
    flat, is_view = torch_impl._joined([m[0:10], m[12:30]], [10, 18], 28)
    assert not is_view
