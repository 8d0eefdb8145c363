"""An op without a double backward (``@once_differentiable``) cuts the gradient's graph.

With ``backward(create_graph=True)`` torch gives such an op's outputs an ``Error`` node
whose edges lead only to detached copies, so ``autograd.grad(grads, params)`` never
reaches it and returns None for the parameters behind it.  Taken as a zero HVP, that
left the curvature at 0 and (under the default rule) the parameter still, silently.
A None that is really zero (no gradient depends on the parameter) must stay one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_state_unchanged, cpu_backends, state_snapshot

import esgdm
from esgdm.hvp import autograd_hvp, graph_cut, no_double_backward

BACKENDS = cpu_backends(names=("torch", "cpu"))


class Cube(torch.autograd.Function):
    """x³ with a first-order-only backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.pow(3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


def cube_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # sum(b⁶) (Hessian diagonal 30 b⁴, hidden by the cut) + sum(a⁴) (seen by autograd)
    return Cube.apply(b).pow(2).sum() + a.pow(4).sum()


def gate_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a's gradient Σb³ has a graph without the cut; the dependence on a is in b's gradient
    # (3 Σa b², through the cut), so a's HVP comes back None and b's is partial
    return a.sum() * Cube.apply(b).sum() + b.pow(4).sum()


def smooth_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b.pow(6).sum() + a.pow(4).sum()


def make(backend: str, hvp: str, **kw) -> tuple[torch.nn.Parameter, torch.nn.Parameter, esgdm.ESGDM]:
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, generator=gen))
    b = torch.nn.Parameter(torch.randn(8, generator=gen))
    return a, b, esgdm.ESGDM([a, b], lr=0.1, backend=backend, seed=3, hvp=hvp, **kw)


def test_the_cut_is_an_error_node():
    """What the fix looks for: torch's node, out of reach of the parameter."""
    b = torch.randn(4, requires_grad=True)
    (g,) = torch.autograd.grad(Cube.apply(b).pow(2).sum(), b, create_graph=True)
    assert graph_cut([g]) == "torch::autograd::Error"
    assert torch.autograd.grad(g, b, torch.ones_like(g), allow_unused=True) == (None,)
    with pytest.raises(RuntimeError) as info:  # the error hvp="auto" falls back on
        autograd_hvp([b], [g], [torch.ones_like(g)])
    assert no_double_backward(info.value) and "hvp='finite_difference'" in str(info.value)
    (g,) = torch.autograd.grad(b.pow(6).sum(), b, create_graph=True)
    assert graph_cut([g]) is None


@pytest.mark.parametrize("loss_fn", [cube_loss, gate_loss])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_raises_and_changes_nothing(backend, loss_fn):
    a, b, opt = make(backend, "autograd", d_warmup=1, update_d_every=3)
    for _ in range(3):  # a D-step without the cut (state exists), then two plain steps
        opt.zero_grad(set_to_none=True)
        smooth_loss(a, b).backward(create_graph=opt.should_create_graph())
        opt.step()
    assert opt.should_create_graph()  # step 3 takes curvature
    opt.zero_grad(set_to_none=True)
    loss_fn(a, b).backward(create_graph=True)
    before = state_snapshot(opt, [a, b])
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    assert "no double backward" in message and "once_differentiable" in message, message
    assert "hvp='finite_difference'" in message and "hvp='auto'" in message, message
    assert_state_unchanged(before, state_snapshot(opt, [a, b]))


@pytest.mark.parametrize("loss_fn", [cube_loss, gate_loss])
@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_falls_back_and_trains(backend, loss_fn):
    a, b, opt = make(backend, "auto")
    b0 = b.detach().clone()

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(a, b)
        loss.backward(create_graph=opt.should_create_graph())
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(closure)
    fell_back = [w for w in caught if "double backward failed" in str(w.message)]
    assert len(fell_back) == 1, [str(w.message) for w in caught]
    assert "once_differentiable" in str(fell_back[0].message)
    assert not opt.should_create_graph()  # finite differences from now on
    assert not torch.equal(b.detach(), b0)
    assert (opt.state[b]["exp_avg_d"] > 0).all()
    assert (opt.state[a]["exp_avg_d"] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_real_zero_hvp_still_steps(backend):
    """a's gradient x has a graph (x requires grad) that reaches no parameter of the
    optimizer: its HVP is None and really 0, with no cut to find."""
    a, b, opt = make(backend, "autograd")
    x = torch.randn(6, requires_grad=True)  # an input (or another optimizer's parameter)
    b0 = b.detach().clone()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        ((a * x).sum() + b.pow(4).sum()).backward(create_graph=opt.should_create_graph())
        assert a.grad is not None and a.grad.grad_fn is not None
        opt.step()
    assert opt.steps == 2
    assert torch.equal(opt.state[a]["exp_avg_d"], torch.zeros_like(a))
    assert (opt.state[b]["exp_avg_d"] > 0).all()
    assert not torch.equal(b.detach(), b0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cut_that_hides_part_of_the_curvature_is_found_on_the_first_curvature_step(backend):
    """Cube(b)² + b⁴: autograd returns b's product from the b⁴ term alone (12 b² v
    instead of (30 b⁴ + 12 b²) v), no None to look behind.  The optimizer searches the
    whole graph on its first curvature step, and refuses."""
    a, b, opt = make(backend, "autograd")
    opt.zero_grad(set_to_none=True)
    (Cube.apply(b).pow(2).sum() + b.pow(4).sum() + a.pow(4).sum()).backward(create_graph=True)
    before = state_snapshot(opt, [a, b])
    with pytest.raises(RuntimeError, match="no double backward.*once_differentiable"):
        opt.step()
    assert_state_unchanged(before, state_snapshot(opt, [a, b]))


def test_no_graph_despite_create_graph_says_why():
    """A loss linear in every parameter leaves no graph even with create_graph=True: the
    message says so, and how to take curvature anyway (before, it only told the user to
    pass the create_graph=True already passed)."""
    a, b, opt = make("torch", "autograd")
    opt.zero_grad(set_to_none=True)
    (a.sum() + 2 * b.sum()).backward(create_graph=True)
    with pytest.raises(RuntimeError, match="create_graph=True, the loss is linear in every parameter"):
        opt.step()


@pytest.mark.parametrize("loaded", [(), ("transformers",), ("lightning",), ("transformers", "pytorch_lightning")])
@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_the_d_step_messages_name_the_trainer_integration_when_a_trainer_is_loaded(monkeypatch, loaded, hvp):
    """Inside a trainer, its loop calls backward and step: the one-line D-step errors also
    name esgdm's integration for each trainer package that is loaded, and only then."""
    import sys
    import types

    for name in ("transformers", "lightning", "pytorch_lightning"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in loaded:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    a, b, opt = make("torch", hvp)
    opt.zero_grad(set_to_none=True)
    smooth_loss(a, b).backward()
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    assert ("esgdm.integrations.transformers.ESGDMTrainer" in message) == ("transformers" in loaded), message
    lightning = any("lightning" in name for name in loaded)
    assert ("esgdm.integrations.lightning" in message) == lightning, message
    assert message.count("esgdm.integrations.lightning") <= 1, message


def _hooked_curvature(hvp: str, hooked: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=gen))
    calls = []
    if hooked:
        w.register_hook(lambda g: calls.append(1) or 2 * g)
    opt = esgdm.ESGDM([w], lr=0.5, hvp=hvp, seed=1, backend="torch")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = w.pow(4).sum()
        loss.backward(create_graph=opt.should_create_graph())
        return loss

    opt.step(closure)
    if hooked:  # the hook is still there, and ran on the gradients only
        assert len(calls) == (1 if hvp == "autograd" else 2)
        w.grad = None
        w.pow(2).sum().backward()
        assert torch.equal(w.grad, 4 * w.detach())
    return opt.state[w]["exp_avg_d"]


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_a_gradient_hook_shapes_the_curvature_once(hvp):
    """A hook g -> 2g on a parameter: the step's gradient is 2g, and the curvature both
    modes take is that of the hooked gradient, 2 H v (before, autograd ran the hook
    again on the Hessian-vector product: 4 H v)."""
    ratio = (_hooked_curvature(hvp, True) / _hooked_curvature(hvp, False)).sqrt()
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0), rtol=1e-6, atol=0)


class MSE(torch.autograd.Function):
    """A loss whose backward is first-order only: the gradients it hands back carry no
    graph to it, and leave no node behind to find."""

    @staticmethod
    def forward(ctx, pred, target):
        ctx.save_for_backward(pred, target)
        return (pred - target).pow(2).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        pred, target = ctx.saved_tensors
        return 2 * (pred - target) * g / pred.numel(), None


def test_gradients_without_a_graph_beside_others_warn_once():
    """A once-differentiable loss: the last bias's gradient has no graph (its curvature
    would silently be 0), the weights' have one through the activations.  The first
    autograd D-step warns, naming finite differences; later ones do not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = esgdm.ESGDM(model.parameters(), lr=0.1, backend="torch")
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            MSE.apply(model(x), y).backward(create_graph=opt.should_create_graph())
            opt.step()
    said = [w for w in caught if "carry no graph" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in said]
    text = str(said[0].message)
    assert "1 of 4 parameters (the first of shape (1,))" in text and "hvp='finite_difference'" in text
    # attributed to the line that called step(), not to torch's wrapper around it (before:
    # torch/optim/optimizer.py, one frame short)
    assert said[0].filename == __file__, said[0].filename
    # a loss linear in no parameter, every gradient with a graph: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt2 = esgdm.ESGDM(model.parameters(), lr=0.1, backend="torch")
        opt2.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward(create_graph=True)
        opt2.step()
    assert not [w for w in caught if "carry no graph" in str(w.message)]
