"""Bad input is refused before anything changes; state edits, copies and randomness behave."""

from __future__ import annotations

import copy
import io
import pickle
import re

import numpy as np
import pytest
import torch
from helpers import assert_state_unchanged, cpu_backends, rel_err, state_snapshot
from test_errors import assert_unchanged, snapshot

import esgdm


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


def test_swapped_parameter_object_is_stepped_on_the_general_path():
    """A parameter object replaced in its group's list by another of the same shape and
    dtype (the general path, which compares one key of objects and layouts per step):
    the new one is stepped with fresh state, the old one no more."""
    torch.manual_seed(0)
    a, b, c = (torch.randn(5, requires_grad=True) for _ in range(3))
    opt = esgdm.ESGDM([a, b], backend="torch", seed=1)
    _steps(opt, [a, b], 2)
    opt.param_groups[0]["params"][1] = c
    before_b, before_c = b.detach().clone(), c.detach().clone()
    _steps(opt, [a, c], 1)
    assert torch.equal(b, before_b) and not torch.equal(c, before_c)
    assert b not in opt.state and "exp_avg" in opt.state[c]


def test_params_key_sees_objects_groups_and_layouts():
    """esgdm._C.params_key: equal for the same objects and layouts, different when an
    object, the grouping, a data pointer, the strides or the dtype change; None for a
    tensor subclass that dispatches to Python."""
    from esgdm.backends import cpp_impl

    if cpp_impl._C is None or not hasattr(cpp_impl._C, "params_key"):
        pytest.skip("esgdm._C (with params_key) is not built")
    key = cpp_impl._C.params_key
    a, b = torch.zeros(4, 6), torch.zeros(6)
    base = key([[a, b]])
    assert key([[a, b]]) == base
    assert key([[a.detach(), b]]) != base              # another object, the same memory
    assert key([[a.clone(), b]]) != base               # another object and memory
    assert key([[a], [b]]) != base                     # other groups
    assert key([[b, a]]) != base                       # other order
    a.data = a.data.t().contiguous().t()               # same object, other strides
    relaid = key([[a, b]])
    assert relaid != base
    a.data = a.data.double()
    assert key([[a, b]]) not in (base, relaid)         # other dtype

    class Wrapper(torch.Tensor):
        @staticmethod
        def __new__(cls, inner):
            return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError

    assert key([[b, Wrapper(b)]]) is None


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
            opt.zero_grad(set_to_none=True)  # noqa: B023 (called in this iteration)
            loss = (p ** 4).sum()  # noqa: B023 (called in this iteration)
            loss.backward(create_graph=opt.should_create_graph() and mode != "auto-closure")  # noqa: B023 (called in this iteration)
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


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
@pytest.mark.parametrize("key,value", [("exp_avg_bias_corr", 0.5), ("lr_warmup_cumprod", torch.tensor(0.25)),
                                       ("step", 7)])
def test_assigning_a_state_scalar_is_applied(backend, key, value):
    """``opt.state[p][key] = value`` for a scalar: the run goes on as one loaded from a
    checkpoint holding that value (before, the step ignored the edit while ``opt.state``
    and ``state_dict()`` kept showing it)."""
    runs = []
    for how in ("assign", "load"):
        torch.manual_seed(5)
        ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
        opt = esgdm.ESGDM(ps, lr=0.3, backend=backend, seed=1, d_warmup=2, update_d_every=3)
        _quadratic_run(opt, ps, 3)
        if how == "assign":
            opt.state[ps[0]][key] = value
        else:
            sd = copy.deepcopy(opt.state_dict())
            sd["state"][0][key] = value
            opt.load_state_dict(sd)
        _quadratic_run(opt, ps, 4)
        runs.append((ps, opt))
    (a, opt_a), (b, opt_b) = runs
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert float(opt_a.state[a[0]][key]) == float(opt_b.state[b[0]][key])
    assert float(opt_a.state_dict()["state"][0]["step"]) == float(opt_b.state_dict()["state"][0]["step"])


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
@pytest.mark.parametrize("edit,message", [
    (lambda st, ps: st[ps[1]].__setitem__("step", torch.tensor(-1.0)),
     "opt.state[p]['step'] of the parameter of shape (5,) must be a whole number >= 0, got -1.0"),
    (lambda st, ps: st[ps[1]].__setitem__("exp_avg_bias_corr", 2.0),
     "opt.state[p]['exp_avg_bias_corr'] of the parameter of shape (5,) must be in [0, 1], got 2.0"),
    (lambda st, ps: st.__setitem__(ps[1], "x"),
     "opt.state[p] of the parameter of shape (5,) must be a dict (or empty, to reset it), got str"),
])
def test_a_bad_state_edit_is_refused_and_no_edit_is_written(backend, edit, message):
    """A bad edit of ``opt.state`` raises at the next step naming it, and a good edit of
    another parameter's state made beside it is not written either."""
    torch.manual_seed(6)
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = esgdm.ESGDM(ps, lr=0.3, backend=backend, d_warmup=2, update_d_every=3)
    _quadratic_run(opt, ps, 3)
    bucket_scalars = [b.scalars.clone() for b in opt._store.buckets]
    before = state_snapshot(opt, ps)
    opt.state[ps[0]]["exp_avg_bias_corr"] = 0.5  # a good edit, listed first
    edit(opt.state, ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.step()
    assert all(torch.equal(b.scalars, old) for b, old in zip(opt._store.buckets, bucket_scalars))
    assert opt.steps == before[2][0] and all(torch.equal(p.detach(), old) for p, old in zip(ps, before[0]))


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
    (lambda sd: sd.__setitem__("state", {str(k): v for k, v in sd["state"].items()}),
     "keys its state by the text '0', its param groups list the id 0"),
    (lambda sd: sd["state"].__setitem__(1, None), "state of parameter id 1 must be a dict .*got NoneType"),
    (lambda sd: sd["state"].__setitem__(1, torch.zeros(3)), "state of parameter id 1 must be a dict .*got Tensor"),
    (lambda sd: sd["param_groups"][0].__setitem__("params", [0, 0]),
     r"lists parameter id 0 twice \(in param groups 0 and 0\)"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", torch.full((4,), 1e300, dtype=torch.float64)),
     r"'exp_avg' of parameter id 0 holds 1e\+300 \(element 0\): every value must be finite in torch.float32"),
    (lambda sd: sd["state"][1].__setitem__("exp_avg_d", torch.full((2, 3), 1e39, dtype=torch.float64)),
     r"'exp_avg_d' of parameter id 1 holds 1e\+39 \(element 0\): every value must be finite and >= 0 in"),
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


# ------------------------------------------------------------ issue 18: refusals and seams

def _backends(dtype=torch.float32):
    return cpu_backends(dtype)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_tensor_lr_with_a_bad_value_is_refused_wherever_it_is_given(bad):
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=f"Invalid lr in param group 0: {bad}"):
        esgdm.ESGDM([{"params": [p], "lr": torch.tensor(bad)}], lr=0.5)
    opt = esgdm.ESGDM([p], lr=torch.tensor(0.5))
    with pytest.raises(ValueError, match=f"Invalid lr in param group 1: {bad}"):
        opt.add_param_group({"params": [q], "lr": torch.tensor(bad, dtype=torch.float64)})
    assert len(opt.param_groups) == 1


def _quadratic_run(opt, params, steps):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = sum((p * p).sum() + p.pow(4).sum() for p in params)
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
@pytest.mark.parametrize("key,bad,error,message", [
    ("maximize", "no", TypeError, "Invalid maximize in param group 0: 'no'"),
    ("differentiable", True, ValueError, "differentiable=True is not supported in param group 0"),
    ("lr", torch.tensor(float("nan")), ValueError, "Invalid lr in param group 0: nan"),
    ("lr", torch.tensor(-1.0), ValueError, "Invalid lr in param group 0: -1.0"),
    ("betas", None, ValueError, "Invalid betas in param group 0: None"),
    ("betas", (torch.tensor(1.5), 0.999), ValueError, "Invalid beta parameter at index 0 in param group 0: 1.5"),
    ("eps", np.float64(-1.0), ValueError, "Invalid eps in param group 0: -1.0"),
])
def test_an_edit_of_param_groups_is_checked_like_the_constructors_arguments(backend, key, bad, error, message):
    """``opt.param_groups[0][key] = bad`` between steps: the next step refuses it as
    the constructor would, and changes nothing (before, a string maximize was taken as
    true and ascended, differentiable=True and a new tensor lr of nan were stepped)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = esgdm.ESGDM(params, lr=0.3, backend=backend, d_warmup=2, update_d_every=3)
    _quadratic_run(opt, params, 3)
    opt.param_groups[0][key] = bad
    for p in params:
        p.grad = torch.ones_like(p)
    before = state_snapshot(opt, params)
    with pytest.raises(error, match=re.escape(message)):
        opt.step()
    assert_state_unchanged(before, state_snapshot(opt, params))


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
def test_numpy_and_tensor_hyper_parameters_may_replace_each_other(backend):
    """A group's lr switched between a numpy scalar, a tensor and a float (and numpy
    betas): each step uses the value given, as a run with floats does (before, comparing
    the numpy scalar with the tensor's key raised numpy's "truth value is ambiguous")."""
    torch.manual_seed(1)
    base = [torch.randn(4, 3), torch.randn(5)]
    runs = []
    for kind in ("float", "mixed"):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        opt = esgdm.ESGDM(params, lr=0.3, backend=backend, seed=2, d_warmup=2, update_d_every=3)
        lrs = [0.3, 0.2, 0.1, 0.25, 0.15]
        given = {"float": lrs,
                 "mixed": [np.float32(0.3), torch.tensor(0.2, dtype=torch.float64), np.float64(0.1),
                           0.25, torch.tensor(0.15, dtype=torch.float64)]}[kind]
        for lr in given:
            opt.param_groups[0]["lr"] = lr
            if kind == "mixed":
                opt.param_groups[0]["betas"] = (np.float64(0.9), np.float64(0.999))
            _quadratic_run(opt, params, 2)
        runs.append(params)
    # np.float32(0.3) is not 0.3: compare that run's first steps to float(np.float32(0.3))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
def test_tensor_betas_eps_and_weight_decay_step_like_floats(backend):
    """One-element tensors for betas, lr_warmup, eps and weight_decay (torch.optim
    accepts tensor betas): the same steps as floats, bit for bit, and an in-place change
    of a tensor value is followed, as for a tensor lr."""
    torch.manual_seed(3)
    base = [torch.randn(4, 3), torch.randn(5)]
    f64 = dict(dtype=torch.float64)
    values = dict(betas=(0.8, 0.99), lr_warmup=0.9, eps=1e-6, weight_decay=0.01)
    tensors = dict(betas=(torch.tensor(0.8, **f64), torch.tensor([0.99], **f64)),
                   lr_warmup=torch.tensor(0.9, **f64), eps=torch.tensor(1e-6, **f64),
                   weight_decay=torch.tensor(0.01, **f64))
    runs = []
    for kwargs in (values, tensors):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        opt = esgdm.ESGDM(params, lr=0.3, backend=backend, seed=2, d_warmup=2, update_d_every=3, **kwargs)
        _quadratic_run(opt, params, 4)
        if kwargs is tensors:
            tensors["weight_decay"].fill_(0.05)
            tensors["betas"][0].fill_(0.7)
        else:
            opt.param_groups[0]["weight_decay"] = 0.05
            opt.param_groups[0]["betas"] = (0.7, 0.99)
        _quadratic_run(opt, params, 4)
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="a tensor beta parameter at index 1 must hold one floating-point value"):
        esgdm.ESGDM([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, torch.tensor([0.9, 0.99])))


@pytest.mark.parametrize("name,value", [
    ("exact", "no"), ("exact", 1), ("exact", None), ("capturable", "yes"), ("capturable", 0),
    ("stochastic_rounding", "false"), ("stochastic_rounding", 1.0),
])
def test_flags_must_be_bools(name, value):
    with pytest.raises(TypeError, match=f"Invalid {name}: {value!r} \\(must be True or False"):
        esgdm.ESGDM([torch.zeros(2, requires_grad=True)], **{name: value})


def test_flags_keep_their_defaults_and_bool_values():
    p = torch.zeros(2, requires_grad=True)
    opt = esgdm.ESGDM([p], exact=True, stochastic_rounding=None, capturable=False)
    assert (opt.exact, opt.stochastic_rounding, opt.capturable) == (True, False, False)
    assert esgdm.ESGDM([p], stochastic_rounding=False).stochastic_rounding is False


def test_default_seed_leaves_the_global_rng_alone():
    """Switching from AdamW must not change data order or dropout masks; the seed
    follows torch.manual_seed, so a seeded script is reproducible."""
    seeds = []
    for torch_seed in (0, 0, 1):
        torch.manual_seed(torch_seed)
        before = torch.get_rng_state()
        seeds.append(esgdm.ESGDM([torch.zeros(2, requires_grad=True)]).seed)
        assert torch.equal(torch.get_rng_state(), before)
    assert seeds[0] == seeds[1] != seeds[2] and all(0 <= s < 2**63 for s in seeds)
    # an explicit generator still decides the seed
    a = esgdm.ESGDM([torch.zeros(2, requires_grad=True)], generator=torch.Generator().manual_seed(5))
    b = esgdm.ESGDM([torch.zeros(2, requires_grad=True)], generator=torch.Generator().manual_seed(5))
    assert a.seed == b.seed


def _old_stream_key(seed, step, key):
    """The sign key as it was computed from the low 32 bits only (for seeds < 2**32)."""
    from esgdm.rule import mix32_int
    from esgdm.signs import SIGN_SALT
    m = 0xFFFFFFFF
    return mix32_int(mix32_int(mix32_int((seed ^ SIGN_SALT) & m) ^ (key & m)) ^ (step & m))


def test_every_bit_of_the_seed_keys_the_signs():
    from esgdm.signs import rademacher, stream_key

    def signs(seed):
        return rademacher(seed, 3, 1, (4000,), dtype=torch.float32, device="cpu")

    base = signs(1)
    for high in (1 + 2**32, 1 + 2**40, 1 + 2**63):
        assert 0.4 < (signs(high) != base).float().mean().item() < 0.6, high
    # seeds below 2**32 keep the signs they always had
    for seed in (0, 1, 12345, 2**31 + 7, 2**32 - 1):
        for step, key in ((0, 0), (7, 3), (2**33 + 1, 2**40)):
            assert stream_key(seed, step, key) == _old_stream_key(seed, step, key)


def test_seeds_that_differ_above_bit_32_train_differently():
    """The signs (D) and the stochastic rounding of bf16 parameters both follow the
    high bits; a seed below 2**32 hands the op the seed itself."""
    from esgdm.rule import seed32

    assert [seed32(s) for s in (0, 7, 2**32 - 1)] == [0, 7, 2**32 - 1]
    results = []
    for seed in (1, 1 + 2**40):
        torch.manual_seed(0)
        w = torch.randn(64, requires_grad=True)
        b = torch.randn(256, dtype=torch.bfloat16, requires_grad=True)
        opt = esgdm.ESGDM([w, b], backend="torch", seed=seed, lr=0.3)
        _steps(opt, [w, b], 1, loss=lambda ps: (ps[0] @ ps[0]) ** 2 + (ps[1].float() ** 4).sum())
        results.append((opt.state[w]["exp_avg_d"].clone(), b.detach().clone()))
    (da, ba), (db, bb) = results
    assert not torch.equal(da, db)
    assert not torch.equal(ba, bb)
    for bad in (2**64, -1, 1.5):
        with pytest.raises(ValueError, match="Invalid seed"):
            esgdm.ESGDM([torch.zeros(2, requires_grad=True)], seed=bad)
    assert esgdm.ESGDM([torch.zeros(2, requires_grad=True)], seed=2**64 - 1).seed == 2**64 - 1


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
def test_an_overflowing_square_is_dropped_on_every_backend(backend):
    """h = 1e20 (float32: h * h = inf) is dropped like inf or NaN: D <- b2 * D there.
    Expected values are computed here by hand (beta2 = 0.5, D = 4 before)."""
    from esgdm import ops, rule

    h = torch.tensor([1e20, -1e20, 1e19, 2e19, float("inf"), float("nan"), 3.0, 0.0])
    n = h.numel()
    p, g = torch.ones(n), torch.full((n,), 0.1)
    m, d = torch.zeros(n), torch.full((n,), 4.0)
    scalars = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    index = torch.tensor([[0, 0]], dtype=torch.int32)
    hparams = torch.tensor([[0.1, 0.9, 0.5, 0.9, 1e-4, 0.0]], dtype=torch.float64)
    ops.step_([p], [g], [m], [d], [h], scalars, index, hparams, None, None, rule.FLAG_EXACT, 0, backend)
    want = torch.tensor([2.0, 2.0, 1e19 * 1e19, 2.0, 2.0, 2.0, 9.0, 2.0])  # 2e19**2 overflows
    assert torch.equal(d, want), d
    assert torch.isfinite(p).all()
    if esgdm.backends.get(backend).why_not(torch.device("cpu"), torch.float64) is None:
        h64 = torch.tensor([1e160, 1e150, float("nan"), 3.0], dtype=torch.float64)
        d64 = torch.full((4,), 4.0, dtype=torch.float64)
        ops.step_([torch.ones(4, dtype=torch.float64)], [torch.full((4,), 0.1, dtype=torch.float64)],
                  [torch.zeros(4, dtype=torch.float64)], [d64], [h64], scalars, index, hparams, None, None,
                  rule.FLAG_EXACT, 0, backend)
        assert torch.equal(d64, torch.tensor([2.0, 1e150 * 1e150, 2.0, 9.0], dtype=torch.float64)), d64


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
def test_a_curvature_spike_beyond_float32_does_not_freeze_the_coordinate(backend):
    """One D-step sees h = 1e20 for x[0] (the loss gains 0.5e20 * (x - x_now)**2: no
    gradient, only curvature).  Before, D became inf there for good and x[0] never
    moved again; now the observation is dropped and x[0] keeps converging."""
    x = torch.tensor([2.0, 2.0], requires_grad=True)
    opt = esgdm.ESGDM([x], backend=backend, lr=0.5, seed=1, d_warmup=3, update_d_every=2)
    for k in range(40):
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * (x ** 2).sum()
        if k == 1:
            loss = loss + 0.5e20 * ((x[0] - x[0].detach()) ** 2)
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()
    assert torch.isfinite(opt.state[x]["exp_avg_d"]).all()
    # x[0] follows its twin x[1] (one dropped observation of 1 apart) from 2.0 to ~0.14
    assert abs(x[0].item()) < 0.5 and abs(x[0].item() - x[1].item()) < 1e-3


def test_eps_zero_with_exact_is_refused_everywhere():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid eps: 0.0 with exact=True"):
        esgdm.ESGDM([p], eps=0.0, exact=True)
    with pytest.raises(ValueError, match="Invalid eps in param group 0: 0.0 with exact=True"):
        esgdm.ESGDM([{"params": [p], "eps": 0}], exact=True)
    opt = esgdm.ESGDM([p], exact=True, backend="torch")
    with pytest.raises(ValueError, match="Invalid eps in param group 1: 0.0 with exact=True"):
        opt.add_param_group({"params": [q], "eps": 0.0})
    assert len(opt.param_groups) == 1
    # edited between steps: refused before anything changes
    _steps(opt, [p], 2)
    opt.zero_grad(set_to_none=True)
    _quartic([p]).backward(create_graph=opt.should_create_graph())
    opt.param_groups[0]["eps"] = 0.0
    before = snapshot(opt, [p])
    with pytest.raises(ValueError, match="Invalid eps in param group 0: 0.0 with exact=True"):
        opt.step()
    assert_unchanged(before, opt, [p])
    # a checkpoint of a default-rule run with eps=0 does not load into an exact one
    free = esgdm.ESGDM([q], eps=0.0, backend="torch")
    exact = esgdm.ESGDM([q], exact=True, backend="torch")
    with pytest.raises(ValueError, match="Invalid eps in loaded param group 0: 0.0 with exact=True"):
        exact.load_state_dict(free.state_dict())


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
def test_eps_zero_is_safe_in_the_default_rule(backend):
    """Where D == 0 the default rule never divides by eps: no inf written."""
    w = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    opt = esgdm.ESGDM([w], eps=0.0, backend=backend, lr=0.5, d_warmup=2, update_d_every=100)
    for k in range(4):  # w[2] has no curvature on the D-steps, then a gradient
        opt.zero_grad(set_to_none=True)
        ((w[:2] ** 4).sum() + (3 * w[2] if k >= 2 else 0)).backward(create_graph=opt.should_create_graph())
        opt.step()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("hvp", ["autograd", "auto", "finite_difference"])
def test_zero_gradients_without_graph_are_not_a_silent_skip(hvp):
    """A user's D-step with zero gradients that carry no graph used to return early
    (no weight decay, not counted, nothing said): it now asks for the graph or the
    closure like any D-step, and changes nothing."""
    p = torch.ones(3, requires_grad=True)
    opt = esgdm.ESGDM([p], weight_decay=0.5, lr=0.5, backend="torch", hvp=hvp)
    p.grad = torch.zeros(3)
    before = snapshot(opt, [p])
    with pytest.raises(RuntimeError, match="create_graph|closure"):
        opt.step()
    assert_unchanged(before, opt, [p])
    assert not opt.state


def test_zero_gradient_plain_step_decays_and_counts():
    p = torch.ones(3, requires_grad=True)
    opt = esgdm.ESGDM([p], weight_decay=0.5, lr=0.5, backend="torch", seed=1)
    _steps(opt, [p], 25, loss=lambda ps: (ps[0] ** 2).sum())
    p.grad = torch.zeros(3)
    value, steps = p.detach().clone(), opt.steps
    opt.step()  # a plain step
    assert opt.steps == steps + 1
    assert not torch.equal(p.detach(), value)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_distributed_checkpoint_state_initialisation_still_works(tensor_lr):
    """torch.distributed.checkpoint's _init_optim_state steps once with zero gradients
    and lr set to 0 to create state: that call shows fresh state and changes nothing."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    p = torch.ones(3, requires_grad=True)
    lr = torch.tensor(0.5) if tensor_lr else 0.5
    opt = esgdm.ESGDM([p], weight_decay=0.5, lr=lr, backend="torch", seed=2)
    _init_optim_state(opt)
    assert torch.equal(p.detach(), torch.ones(3)) and opt.steps == 0
    assert float(opt.state[p]["exp_avg_bias_corr"]) == 1.0 and p.grad is None
    assert float(opt.param_groups[0]["lr"]) == 0.5
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].shape == (3,)
    _steps(opt, [p], 2)
    assert opt.steps == 2


@pytest.mark.parametrize("backend,wrapped", [("torch", False), ("cpu", False), ("torch", True)])
def test_unscale_before_an_autograd_d_step_matches_the_run_without_scaler(backend, wrapped):
    """scaler.unscale_(opt) (to clip, say) divides the gradients in place, but the
    double-backward graph still differentiates the scaled ones.  h is divided by the
    scale, so the run equals the run without a scaler; the scale is a power of two,
    so bit for bit.  ``wrapped``: opt.step patched by a wrapper, as accelerate does."""
    if backend == "cpu" and esgdm.backends.get("cpu").why_not(torch.device("cpu"), torch.float32):
        pytest.skip("cpu backend unavailable")
    results = []
    for use_scaler in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
        opt = esgdm.ESGDM(net.parameters(), lr=0.3, backend=backend, seed=3, d_warmup=4, update_d_every=2)
        if wrapped:
            opt.step = lambda *args, _inner=opt.step, **kwargs: _inner(*args, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if use_scaler else None
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):
            x = torch.randn(16, 5, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss = net(x).pow(2).mean()
            if scaler is None:
                loss.backward(create_graph=opt.should_create_graph())
                opt.step()
            else:
                scaler.scale(loss).backward(create_graph=opt.should_create_graph())
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
        results.append(([p.detach().clone() for p in net.parameters()],
                        [opt.state[p]["exp_avg_d"].clone() for p in net.parameters()]))
    (pa, da), (pb, db) = results
    for a, b in zip(da, db):
        assert torch.equal(a, b)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hvp", ["autograd", "auto"])
def test_d_step_where_only_empty_tensors_have_gradients_is_counted(hvp):
    """An empty tensor's gradient carries no graph and there is nothing to observe: the
    D-step runs (and counts) without asking for one.  (It used to pass for the state
    initialisation of torch.distributed.checkpoint and be skipped.)"""
    e = torch.zeros(0, 2, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    opt = esgdm.ESGDM([e, w], backend="torch", hvp=hvp)
    e.grad = torch.zeros(0, 2)
    opt.step()
    assert opt.steps == 1 and float(opt.state[e]["step"]) == 1.0 and w not in opt.state


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_assigned_state_beyond_the_state_dtypes_range_is_refused(backend, state_dtype):
    """``opt.state[p]["exp_avg"] = float64 values finite there but not in the dtype the
    state is kept in`` (float32, or bfloat16): refused, naming the dtype (before, stored
    as inf, and the parameters went NaN at the next step)."""
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = esgdm.ESGDM(ps, lr=0.3, backend=backend, state_dtype=state_dtype, d_warmup=2, update_d_every=3)
    _quadratic_run(opt, ps, 3)
    big = 1e300 if state_dtype is None else 3.4e38  # (finite in float32; beyond bfloat16's 3.39e38)
    opt.state[ps[1]]["exp_avg"] = torch.full((5,), big, dtype=torch.float64)
    for p in ps:
        p.grad = torch.ones_like(p)
    before = state_snapshot(opt, ps)
    kept = "torch.float32" if state_dtype is None else "torch.bfloat16"
    with pytest.raises(ValueError, match=f"every value must be finite in {kept}, the dtype this state is kept in"):
        opt.step()
    assert opt.steps == before[2][0] and all(torch.equal(p.detach(), old) for p, old in zip(ps, before[0]))


# ------------------------------------------------------------ parameters that share memory

def _brute_force_shared(tensors):
    """Pairs of tensors with a common byte, from every element's bytes."""
    def bytes_of(t):
        base = t.untyped_storage().data_ptr()
        first = t.storage_offset()
        span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
        offs = torch.as_strided(torch.arange(first + span), t.shape, t.stride(), first).reshape(-1)
        return {(base, int(o) * t.element_size() + k) for o in offs for k in range(t.element_size())}
    sets = [bytes_of(t) if t.numel() else set() for t in tensors]
    return {(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets)) if sets[i] & sets[j]}


def test_shared_memory_agrees_with_a_byte_by_byte_check():
    from esgdm.buckets import shared_memory
    base = torch.zeros(6, 8)
    other = torch.zeros(10)
    cases = [
        [base[:, ::2], base[:, 1::2]],            # interleaved, disjoint
        [base[:, ::2], base[:, 2::4]],            # interleaved, shared
        [base[:3], base[3:]],                     # neighbours
        [base[:3], base[2:4]],                    # overlapping rows
        [base.t(), other],                        # other storage
        [base.t(), base[2]],                      # dense but transposed, meeting a row
        [base[:3].t(), base[3:].t()],             # dense, transposed, neighbours
        [base[0], base[1:], base[0, 3:5]],        # a third inside the first
        [base[:, :4], base[:, 4:], base[1]],      # the third meets both
        [base.view(torch.int32)[0, :2], base[0, 1:3]],  # another dtype on the same bytes
        [base[0, :0], base[0]],                   # empty
        [base[:2, 1::3], base[2:, :]],            # strided, disjoint rows
    ]
    for tensors in cases:
        got = shared_memory(tensors)
        want = _brute_force_shared(tensors)
        assert (got is None) == (not want), (tensors, got, want)
        if got is not None:
            assert got in want


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
@pytest.mark.parametrize("how", ["constructed", "rebound"])
def test_parameters_that_share_memory_are_refused(backend, how):
    """A parameter made from another's memory (``Parameter(a.data[0])``, or ``b.data =
    a.data[0]`` between steps): refused, naming both, with nothing changed (before, both
    were stepped over the same memory, and the backends disagreed)."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 8))
    b = torch.nn.Parameter(a.data[0] if how == "constructed" else torch.randn(8))
    opt = esgdm.ESGDM([a, b], lr=0.3, backend=backend, d_warmup=1, update_d_every=100)
    if how == "rebound":
        _quadratic_run(opt, [a, b], 2)
        b.data = a.data[0]
    a.grad, b.grad = torch.ones(8, 8), torch.ones(8)
    before = state_snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=re.escape("parameters 0 and 1 (in optimizer order; shapes (8, 8) and (8,)) "
                                                   "share memory")):
        opt.step()
    assert_state_unchanged(before, state_snapshot(opt, [a, b]))
    # interleaved slices of one buffer share no element: stepped like separate tensors
    buf = torch.randn(4, 6)
    c, d = torch.nn.Parameter(buf[:, ::2]), torch.nn.Parameter(buf[:, 1::2])
    c2, d2 = (torch.nn.Parameter(t.detach().clone()) for t in (c, d))
    for ps in ([c, d], [c2, d2]):
        _quadratic_run(esgdm.ESGDM(ps, lr=0.3, backend=backend, seed=1, d_warmup=1, update_d_every=2), ps, 3)
    assert torch.equal(c, c2) and torch.equal(d, d2)
