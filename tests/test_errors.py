"""Every error path: a clear message, and nothing changed."""

import copy
import warnings

import pytest
import torch

import esgdm
from esgdm import backends
from esgdm.backends import BackendUnavailableError


def snapshot(opt, params):
    """Everything a failed call must leave alone."""
    return (
        [p.detach().clone() for p in params],
        copy.deepcopy({k: v for k, v in opt.state_dict().items() if k != "param_groups"}),
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        (opt.steps, opt.steps_since_d),
    )


def assert_unchanged(before, opt, params):
    now = snapshot(opt, params)
    for a, b in zip(before[0], now[0]):
        assert torch.equal(a, b)
    assert before[3] == now[3]
    assert before[2] == now[2]
    sa, sb = before[1]["state"], now[1]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for key in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][key]), torch.as_tensor(sb[k][key])), key
    assert before[1]["global_state"] == now[1]["global_state"]


def trained(steps=3, **kwargs):
    """An optimizer with some state, and its parameters (with gradients of the last step)."""
    ps = [torch.randn(4, requires_grad=True), torch.randn(2, 3, requires_grad=True)]
    opt = esgdm.ESGDM(ps, lr=0.5, backend="torch", **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        sum((p ** 4).sum() for p in ps).backward(create_graph=opt.should_create_graph())
        opt.step()
    return opt, ps


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-0.1), "Invalid lr: -0.1"),
    (dict(lr=float("nan")), "Invalid lr: nan"),
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, 1.5)), "beta parameter at index 1: 1.5"),
    (dict(betas=(0.9,)), "Invalid betas"),
    (dict(lr_warmup=1.0), "Invalid lr_warmup: 1.0"),
    (dict(eps=-1e-8), "Invalid eps: -1e-08"),
    (dict(weight_decay=-0.1), "Invalid weight_decay: -0.1"),
    (dict(update_d_every=0), "Invalid update_d_every: 0"),
    (dict(update_d_every=2.5), "Invalid update_d_every: 2.5"),
    (dict(d_warmup=True), "Invalid d_warmup: True"),
    (dict(backend="fastest"), "Invalid backend: 'fastest'"),
])
def test_invalid_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        esgdm.ESGDM([torch.zeros(2, requires_grad=True)], **kwargs)


def test_integer_parameters_are_rejected():
    with pytest.raises(ValueError, match="floating-point parameters only"):
        esgdm.ESGDM([torch.zeros(2, dtype=torch.long)])


def test_missing_create_graph_on_a_d_step_changes_nothing():
    opt, ps = trained(steps=3)
    assert opt.should_create_graph()
    opt.zero_grad()
    sum((p ** 4).sum() for p in ps).backward()  # forgot create_graph
    before = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=r"create_graph=opt.should_create_graph\(\)"):
        opt.step()
    assert_unchanged(before, opt, ps)


def test_sparse_gradient_changes_nothing():
    opt, ps = trained()
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt.add_param_group({"params": emb.parameters()})
    opt.zero_grad()
    emb(torch.tensor([1, 2])).sum().backward()
    ps[0].grad = torch.ones_like(ps[0])
    before = snapshot(opt, ps + [emb.weight])
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert_unchanged(before, opt, ps + [emb.weight])


def test_invalid_hyperparameter_set_between_steps_changes_nothing():
    opt, ps = trained(steps=25)  # past the D warmup: a plain step next
    opt.zero_grad()
    sum((p ** 4).sum() for p in ps).backward(create_graph=opt.should_create_graph())
    opt.param_groups[0]["lr"] = -1.0
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match="Invalid lr in param group 0: -1.0"):
        opt.step()
    assert_unchanged(before, opt, ps)


def test_invalid_param_group_is_not_added():
    opt, ps = trained()
    with pytest.raises(ValueError, match="Invalid eps in param group 1: -1"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "eps": -1})
    assert len(opt.param_groups) == 1


def test_unavailable_backend_by_name_says_why_and_changes_nothing():
    p = torch.randn(3, requires_grad=True)
    opt = esgdm.ESGDM([p], backend="cuda")
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' cannot step torch.float32 parameters on cpu: "):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.steps == 0 and not opt.state


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv("ESGDM_BACKEND", "torch")
    assert esgdm.ESGDM([torch.zeros(1, requires_grad=True)]).backend == "torch"
    monkeypatch.setenv("ESGDM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="Invalid backend: 'nonsense'"):
        esgdm.ESGDM([torch.zeros(1, requires_grad=True)])
    # an explicit keyword wins over the variable
    assert esgdm.ESGDM([torch.zeros(1, requires_grad=True)], backend="auto").backend == "auto"


def test_auto_warns_once_when_it_falls_back(monkeypatch):
    class Broken(backends.Backend):
        name = "cpu"

        def why_not(self, device, dtype):
            return "it is broken on purpose"

    monkeypatch.setitem(backends._loaded, "cpu", Broken())
    monkeypatch.setattr(backends, "_warned", set())
    p = torch.randn(3, requires_grad=True)
    opt = esgdm.ESGDM([p], backend="auto")
    with pytest.warns(RuntimeWarning, match=r"using 'torch' because 'cpu' cannot run \(it is broken on purpose\)"):
        p.grad = torch.ones_like(p)
        opt.steps = opt.d_warmup
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # second step: no second warning
    assert opt.backend_for(opt.buckets()[0]).name == "torch"


def test_load_state_dict_with_wrong_shapes_changes_nothing():
    opt, ps = trained()
    bad = opt.state_dict()
    bad = copy.deepcopy(bad)
    bad["state"][1]["exp_avg"] = torch.zeros(5)
    bad["global_state"]["steps"] = 99
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"state 'exp_avg' of parameter id 1 has shape \(5,\)"):
        opt.load_state_dict(bad)
    assert_unchanged(before, opt, ps)


def test_load_state_dict_that_is_not_esgdm_changes_nothing():
    opt, ps = trained()
    adam = torch.optim.Adam(ps)
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match="not an ESGD-M checkpoint: missing 'global_state'"):
        opt.load_state_dict(adam.state_dict())
    assert_unchanged(before, opt, ps)


def test_load_state_dict_with_other_group_sizes_changes_nothing():
    opt, ps = trained()
    other = esgdm.ESGDM([torch.zeros(4, requires_grad=True)])
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match="param group 0 has 2 parameters, the loaded state dict has 1"):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(before, opt, ps)


def test_closure_that_raises_changes_nothing():
    opt, ps = trained()
    before = snapshot(opt, ps)

    def closure():
        raise KeyError("data loader broke")

    with pytest.raises(KeyError, match="data loader broke"):
        opt.step(closure)
    assert_unchanged(before, opt, ps)
