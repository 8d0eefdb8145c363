"""Bad input is refused before anything changes; state edits, copies and randomness behave."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import esgdm
from helpers import rel_err
from test_errors import assert_unchanged, snapshot


def _quartic(ps):
    return sum((p.float() ** 4).sum() + (p.float() ** 2).sum() for p in ps)


def _steps(opt, ps, n, loss=_quartic):
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        loss(ps).backward(create_graph=opt.should_create_graph())
        opt.step()


# ------------------------------------------------------------ arguments

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lr=float("inf")), ValueError, "Invalid lr: inf"),
    (dict(lr="0.1"), TypeError, "Invalid lr: '0.1'"),
    (dict(weight_decay=float("nan")), ValueError, "Invalid weight_decay: nan"),
    (dict(weight_decay=float("inf")), ValueError, "Invalid weight_decay: inf"),
    (dict(eps=float("inf")), ValueError, "Invalid eps: inf"),
    (dict(generator="x"), TypeError, "Invalid generator: 'x'"),
    (dict(hvp="newton"), ValueError, "Invalid hvp: 'newton'"),
    (dict(state_dtype=torch.float16), ValueError, "Invalid state_dtype"),
    (dict(lr=torch.tensor(float("nan"))), ValueError, "Invalid lr: nan"),
    (dict(seed=-1), ValueError, "Invalid seed: -1"),
])
def test_invalid_arguments_name_the_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        esgdm.ESGDM([torch.zeros(2, requires_grad=True)], **kwargs)


def test_the_same_tensor_twice_is_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="repeats a parameter"):
        esgdm.ESGDM([p, p])
    opt = esgdm.ESGDM([p])
    with pytest.raises(ValueError, match="repeats a parameter|more than one parameter group"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_expanded_parameter_is_refused_before_any_bucket_is_stepped():
    """An expanded parameter in a second bucket used to raise after the first bucket had
    been stepped, so a retry stepped it twice."""
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = esgdm.ESGDM([a, b], backend="torch")
    _steps(opt, [a, b], 2)
    before = snapshot(opt, [a, b])
    b.data = torch.randn(1, dtype=torch.float64).expand(3)
    opt.zero_grad(set_to_none=True)
    _quartic([a, b]).backward(create_graph=opt.should_create_graph())
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    b.data = before[0][1].clone()
    assert_unchanged(before, opt, [a, b])


def test_shape_change_through_data_is_refused_before_writing():
    a = torch.randn(4, requires_grad=True)
    opt = esgdm.ESGDM([a], backend="torch")
    _steps(opt, [a], 2)
    state = opt.state[a]["exp_avg"].clone()
    a.data = torch.randn(2, 2)
    opt.zero_grad(set_to_none=True)
    _quartic([a]).backward(create_graph=opt.should_create_graph())
    with pytest.raises(ValueError, match=r"changed shape from \(4,\) to \(2, 2\)"):
        opt.step()
    assert torch.equal(opt.state[a]["exp_avg"], state)


@pytest.mark.parametrize("numel", [10, 300_000])  # small, and above the old 2**18 run size
def test_layout_change_is_followed(numel):
    """p.data = t with the same shape and other strides (channels_last): the state
    follows each element, and training continues as if nothing had happened."""
    side = int(round((numel / 2) ** 0.5)) or 1
    shape = (1, 2, side, side)
    results = []
    for relayout in (False, True):
        torch.manual_seed(0)
        p = torch.randn(shape, requires_grad=True)
        opt = esgdm.ESGDM([p], backend="torch", seed=1)
        _steps(opt, [p], 3)
        if relayout:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        _steps(opt, [p], 3)
        results.append(p.detach().contiguous())
    assert torch.equal(results[0], results[1])


def test_zero_element_parameter_with_odd_strides_steps():
    p = torch.zeros(2, 0, 1, requires_grad=True)
    q = torch.randn(3, requires_grad=True)
    opt = esgdm.ESGDM([p, q], backend="torch")
    for _ in range(3):
        opt.zero_grad()
        ((q ** 2).sum() + p.sum()).backward(create_graph=opt.should_create_graph())
        opt.step()
    assert opt.state[p]["exp_avg"].shape == (2, 0, 1)


# ------------------------------------------------------------ curvature

def test_gradient_without_graph_next_to_others_has_zero_hvp():
    """A loss linear in one parameter: its gradient has no grad_fn even with
    create_graph=True.  That is not a missing create_graph: its HVP is zero."""
    w = torch.randn(5, requires_grad=True)
    bias = torch.randn(1, requires_grad=True)
    opt = esgdm.ESGDM([w, bias], backend="torch", exact=True)
    opt.zero_grad()
    ((w ** 4).sum() + 3 * bias.sum()).backward(create_graph=True)
    assert bias.grad.grad_fn is None
    opt.step()
    assert torch.equal(opt.state[bias]["exp_avg_d"], torch.zeros(1))
    assert (opt.state[w]["exp_avg_d"] > 0).all()


def test_missing_graph_everywhere_names_both_ways_out():
    w = torch.randn(5, requires_grad=True)
    opt = esgdm.ESGDM([w], backend="torch")
    (w ** 4).sum().backward()
    with pytest.raises(RuntimeError, match=r"create_graph=opt.should_create_graph\(\)") as e:
        opt.step()
    assert "hvp='finite_difference'" in str(e.value)


def test_two_optimizers_over_disjoint_parts_of_one_loss():
    torch.manual_seed(0)
    backbone = torch.nn.Linear(4, 8)
    head = torch.nn.Linear(8, 1)
    opt_a = esgdm.ESGDM(backbone.parameters(), backend="torch")
    opt_b = esgdm.ESGDM(head.parameters(), backend="torch")
    x = torch.randn(16, 4)
    for _ in range(3):
        opt_a.zero_grad(set_to_none=True)
        opt_b.zero_grad(set_to_none=True)
        loss = head(torch.tanh(backbone(x))).pow(2).mean()
        loss.backward(create_graph=opt_a.should_create_graph())
        opt_a.step()
        opt_b.step()
    assert all((opt_b.state[p]["exp_avg_d"] > 0).any() for p in head.parameters())


def test_hvp_auto_uses_autograd_with_a_graph_and_finite_differences_without():
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    results = {}
    for mode in ("autograd", "finite_difference", "auto-graph", "auto-closure"):
        p = w.detach().clone().requires_grad_(True)
        opt = esgdm.ESGDM([p], backend="torch", seed=3, exact=True,
                          hvp="auto" if mode.startswith("auto") else mode)

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = (p ** 4).sum()
            loss.backward(create_graph=opt.should_create_graph() and mode != "auto-closure")
            return loss

        for _ in range(3):
            if mode in ("autograd", "auto-graph"):
                closure()
                opt.step()
            else:
                opt.step(closure)
        results[mode] = opt.state[p]["exp_avg_d"].clone()
    assert torch.equal(results["auto-graph"], results["autograd"])
    assert rel_err(results["auto-closure"], results["autograd"]) < 1e-6
    assert torch.equal(results["auto-closure"], results["finite_difference"])


def test_hvp_auto_falls_back_to_finite_differences_when_double_backward_fails():
    """CPU scaled_dot_product_attention has no double backward: hvp='auto' warns once
    and takes finite differences from then on."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    k = torch.randn(1, 2, 8, 4)
    opt = esgdm.ESGDM([q], backend="torch", hvp="auto")

    def closure():
        opt.zero_grad(set_to_none=True)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, k)
        loss = (out ** 2).sum()
        loss.backward(create_graph=opt.should_create_graph())
        return loss

    with pytest.warns(RuntimeWarning, match="finite differences from now on"):
        opt.step(closure)
    assert not opt.should_create_graph()
    opt.step(closure)
    assert (opt.state[q]["exp_avg_d"] > 0).any()
    plain = esgdm.ESGDM([q], backend="torch", hvp="auto")
    plain.zero_grad()
    (torch.nn.functional.scaled_dot_product_attention(q, k, k) ** 2).sum().backward(create_graph=True)
    with pytest.raises(RuntimeError, match=r"derivative for.*hvp='auto'.*opt.step\(closure\)"):
        plain.step()  # no closure: nothing to fall back to; the error says what to write


# ------------------------------------------------------------ state edits

def test_resetting_a_parameters_state_through_opt_state():
    p = torch.randn(4, requires_grad=True)
    q = torch.randn(3, requires_grad=True)
    opt = esgdm.ESGDM([p, q], backend="torch", seed=1)
    _steps(opt, [p, q], 3)
    fresh = esgdm.ESGDM([torch.empty(4, requires_grad=True)], backend="torch")
    opt.state[p] = {}
    _steps(opt, [p, q], 1)
    assert float(opt.state[p]["exp_avg_bias_corr"]) == pytest.approx(0.9)
    assert float(opt.state[q]["exp_avg_bias_corr"]) == pytest.approx(0.9 ** 4)
    sd = opt.state_dict()  # the next checkpoint loads
    opt.load_state_dict(sd)
    del fresh


def test_assigning_a_state_tensor_is_applied():
    p = torch.randn(4, requires_grad=True)
    opt = esgdm.ESGDM([p], backend="torch")
    _steps(opt, [p], 2)
    opt.state[p]["exp_avg"] = torch.full((4,), 7.0)
    opt.zero_grad(set_to_none=True)
    (p ** 2 * 0).sum().backward(create_graph=opt.should_create_graph())
    opt.step()  # g = 0: m <- 0.9 * m
    assert torch.allclose(opt.state[p]["exp_avg"], torch.full((4,), 6.3))


# ------------------------------------------------------------ checkpoints

def _trained():
    ps = [torch.randn(4, requires_grad=True), torch.randn(2, 3, requires_grad=True)]
    opt = esgdm.ESGDM(ps, lr=0.5, backend="torch", seed=4)
    _steps(opt, ps, 3)
    return opt, ps


@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd["state"][0].__setitem__("exp_avg_bias_corr", torch.ones(3)), "must hold one value"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg_bias_corr", "x"), "must be a number"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(4, device="meta")), "meta device"),
    (lambda sd: sd["global_state"].__setitem__("steps", 2.5), "Invalid steps: 2.5"),
    (lambda sd: sd["global_state"].__setitem__("steps", "3"), "Invalid steps: '3'"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", float("nan")), "Invalid lr in loaded param group 0: nan"),
    (lambda sd: sd["state"][1].__setitem__("exp_avg_d", torch.zeros(3, 2)), "has shape"),
])
def test_bad_checkpoint_is_refused_before_anything_changes(corrupt, match):
    opt, ps = _trained()
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(before, opt, ps)


def test_restored_run_continues_bit_for_bit_including_signs():
    results = []
    for restore in (False, True):
        torch.manual_seed(0)
        ps = [torch.randn(6, requires_grad=True), torch.randn(3, 2, requires_grad=True)]
        loss = lambda qs: sum((torch.sin(q) * q ** 2).sum() for q in qs) + (qs[0][:3] @ qs[1][:, 0]).sum()  # noqa: E731
        opt = esgdm.ESGDM(ps, backend="torch")
        _steps(opt, ps, 12, loss)
        if restore:
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "ps": [p.detach() for p in ps]}, buf)
            buf.seek(0)
            saved = torch.load(buf)
            torch.manual_seed(999)  # the signs must not depend on the global RNG
            ps = [p.clone().requires_grad_(True) for p in saved["ps"]]
            opt = esgdm.ESGDM(ps, backend="torch")
            opt.load_state_dict(saved["opt"])
        _steps(opt, ps, 15, loss)
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_are_working_optimizers(how):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = esgdm.ESGDM(net.parameters(), backend="torch", seed=2)
    x = torch.randn(8, 3)
    loss = lambda m: m(x).pow(2).sum()  # noqa: E731

    def train(m, o, n):
        for _ in range(n):
            o.zero_grad(set_to_none=True)
            loss(m).backward(create_graph=o.should_create_graph())
            o.step()

    train(net, opt, 3)
    pair = (net, opt)
    if how == "deepcopy":
        net2, opt2 = copy.deepcopy(pair)
    elif how == "pickle":
        net2, opt2 = pickle.loads(pickle.dumps(pair))
    else:
        buf = io.BytesIO()
        torch.save(pair, buf)
        buf.seek(0)
        net2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.param_groups[0]["params"][0] is net2.weight
    train(net, opt, 4)
    train(net2, opt2, 4)
    assert torch.equal(net.weight, net2.weight)
    assert torch.equal(net.bias, net2.bias)
