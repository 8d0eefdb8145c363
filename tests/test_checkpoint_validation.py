"""load_state_dict refuses values no run can produce, naming the entry and the value,
and changes nothing; every value a run can produce still loads.

What a run produces: ``exp_avg`` finite (a non-finite gradient leaves its element
alone), ``exp_avg_d`` finite and >= 0 (a square, or a dropped observation),
``exp_avg_bias_corr = beta1**k`` and ``lr_warmup_cumprod = lr_warmup**j`` in [0, 1]
(0 with ``beta1 = 0`` or ``lr_warmup = 0``, and ``0.9**k`` underflows to 0 after some
7,000 steps), ``step`` a whole number >= 0, integer counters, a 64-bit seed, and the
state dtype ``float32`` or ``bfloat16``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import cpu_backends
from test_errors import assert_unchanged, snapshot

import esgdm
from esgdm.checkpoint import GROUP_KEY


def _train(backend, steps=3, **kwargs):
    ps = [torch.randn(4, requires_grad=True), torch.randn(2, 3, requires_grad=True)]
    opt = esgdm.ESGDM(ps, lr=0.5, backend=backend, seed=4, **kwargs)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        sum((p ** 4).sum() + (p ** 2).sum() for p in ps).backward(create_graph=opt.should_create_graph())
        opt.step()
    return opt, ps


@pytest.fixture(params=cpu_backends())
def trained(request):
    torch.manual_seed(0)
    return _train(request.param)


def _set_state(pid, key, value):
    def corrupt(sd):
        sd["state"][pid][key] = value(sd["state"][pid][key]) if callable(value) else value
    return corrupt


def _poke(index, value):
    """A copy of the tensor with element ``index`` (flat) set to ``value``."""
    def edit(t):
        t = t.clone()
        t.view(-1)[index] = value
        return t
    return edit


def _set_global(key, value):
    def corrupt(sd):
        sd["global_state"][key] = value
    return corrupt


def _through_dcp(key, value):
    """A checkpoint that went through torch.distributed.checkpoint: the counters live
    in the param groups only."""
    def corrupt(sd):
        del sd["global_state"]
        sd["param_groups"][0][GROUP_KEY][key] = value
    return corrupt


def _group_lr(value):
    def corrupt(sd):
        sd["param_groups"][0]["lr"] = value
    return corrupt


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("corrupt,match", [
    (_set_state(0, "exp_avg", _poke(2, NAN)), r"state 'exp_avg' of parameter id 0 holds nan \(element 2\)"),
    (_set_state(1, "exp_avg", _poke(5, -INF)), r"state 'exp_avg' of parameter id 1 holds -inf \(element 5\)"),
    (_set_state(0, "exp_avg_d", _poke(1, INF)), r"state 'exp_avg_d' of parameter id 0 holds inf \(element 1\)"),
    (_set_state(1, "exp_avg_d", _poke(0, NAN)), r"state 'exp_avg_d' of parameter id 1 holds nan \(element 0\)"),
    (_set_state(0, "exp_avg_d", _poke(3, -0.5)),
     r"state 'exp_avg_d' of parameter id 0 holds -0.5 \(element 3\).*>= 0"),
    (_set_state(0, "exp_avg_bias_corr", 1.5),
     r"state 'exp_avg_bias_corr' of parameter id 0 must be in \[0, 1\], got 1.5"),
    (_set_state(0, "exp_avg_bias_corr", torch.tensor(-0.1, dtype=torch.float64)),
     r"'exp_avg_bias_corr' of parameter id 0 must be in \[0, 1\], got -0.1"),
    (_set_state(1, "lr_warmup_cumprod", 5),
     r"state 'lr_warmup_cumprod' of parameter id 1 must be in \[0, 1\], got 5.0"),
    (_set_state(1, "lr_warmup_cumprod", -1e-3),
     r"'lr_warmup_cumprod' of parameter id 1 must be in \[0, 1\], got -0.001"),
    (_set_state(0, "step", -3), r"state 'step' of parameter id 0 must be a whole number >= 0, got -3.0"),
    (_set_state(0, "step", torch.tensor(2.5, dtype=torch.float64)),
     r"state 'step' of parameter id 0 must be a whole number >= 0, got 2.5"),
    (_set_global("state_dtype", "float16"), r"Invalid state_dtype: 'float16'"),
    (_set_global("state_dtype", 32), r"Invalid state_dtype: 32"),
    (_set_global("steps", -1), r"Invalid steps: -1"),
    (_set_global("steps_since_d", 1.5), r"Invalid steps_since_d: 1.5"),
    (_set_global("d_warmup", "20"), r"Invalid d_warmup: '20'"),
    (_set_global("seed", 2**64), r"Invalid seed: 18446744073709551616 \(must be an integer in \[0, 2\*\*64\)\)"),
    (_set_global("seed", -5), r"Invalid seed: -5"),
    (_set_global("seed", 3.0), r"Invalid seed: 3.0"),
    (_through_dcp("steps", -2), r"Invalid steps: -2"),
    (_through_dcp("seed", 2**70), r"Invalid seed: 1180591620717411303424"),
    (_through_dcp("state_dtype", "float64"), r"Invalid state_dtype: 'float64'"),
    (_group_lr(torch.tensor(NAN)), r"Invalid lr in loaded param group 0: nan"),
    (_group_lr(torch.tensor(-1.0)), r"Invalid lr in loaded param group 0: -1.0"),
])
def test_impossible_checkpoint_values_are_refused_and_nothing_changes(trained, corrupt, match):
    opt, ps = trained
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(before, opt, ps)
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("backend", cpu_backends())
def test_values_real_runs_produce_load(backend):
    """beta1 = 0 and lr_warmup = 0 drive bias and warm to exactly 0; with the default
    beta1 0.9**k underflows to 0 (and passes through subnormals) after ~7,000 steps;
    fresh state has 1.0; D is 0 where nothing was observed; seeds use all 64 bits."""
    torch.manual_seed(0)
    opt, ps = _train(backend, steps=2, betas=(0.0, 0.999), lr_warmup=0.0)
    sd = opt.state_dict()
    assert float(sd["state"][0]["exp_avg_bias_corr"]) == 0.0
    assert float(sd["state"][0]["lr_warmup_cumprod"]) == 0.0
    opt.load_state_dict(copy.deepcopy(sd))

    opt, ps = _train(backend, steps=2)
    for bias, warm, step, seed in ((5e-324, 1.0, 7000, 2**64 - 1), (0.0, 0.0, 7500.0, 0),
                                   (1.0, 1.0, 0, 2**32)):
        sd = copy.deepcopy(opt.state_dict())
        sd["state"][0].update(exp_avg_bias_corr=bias, lr_warmup_cumprod=warm,
                              step=torch.tensor(step, dtype=torch.float64))
        sd["state"][1]["exp_avg_d"] = torch.zeros(2, 3)
        sd["state"][1]["exp_avg"] = -sd["state"][1]["exp_avg"]
        sd["global_state"].update(seed=seed, state_dtype="bfloat16")
        opt.load_state_dict(sd)
        assert float(opt.state[ps[0]]["exp_avg_bias_corr"]) == bias
        assert float(opt.state[ps[0]]["step"]) == step and opt.seed == seed
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.steps, opt.steps_since_d = opt.d_warmup, 1
    opt.step()  # and steps on: a plain step with what was loaded
    assert all(torch.isfinite(p).all() for p in ps)


def test_state_dtype_may_be_absent_or_a_dtype():
    opt, _ = _train("torch", steps=2)
    sd = copy.deepcopy(opt.state_dict())
    del sd["global_state"]["state_dtype"]  # as in the original's checkpoints
    opt.load_state_dict(sd)
    sd["global_state"]["state_dtype"] = torch.bfloat16
    opt.load_state_dict(sd)
