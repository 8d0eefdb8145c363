"""Low precision through the optimizer: stochastic rounding of 16-bit weights, bf16 state."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import rel_err

import esgdm

BACKENDS = ["cpu", "torch"]


def _skip_unless(backend, dtype=torch.float32):
    reason = esgdm.backends.get(backend).why_not(torch.device("cpu"), dtype)
    if reason is not None:
        pytest.skip(reason)


def _drift(dtype, backend, stochastic_rounding, steps=1000):
    """A constant-ish gradient too small for round-to-nearest to ever apply in bf16:
    loss = sum(p + p^2 / 2) from p = 1, so each step moves p by about 2 * lr = 1e-4,
    while half an ulp of bf16 at 1 is 2**-9 ~ 2e-3."""
    p = torch.ones(64, dtype=dtype, requires_grad=True)
    opt = esgdm.ESGDM([p], lr=5e-5, lr_warmup=0.0, d_warmup=1, update_d_every=10, backend=backend,
                      stochastic_rounding=stochastic_rounding, seed=3)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        x = p.float()
        (x + 0.5 * x * x).sum().backward(create_graph=opt.should_create_graph())
        opt.step()
    return 1.0 - p.detach().double().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_lets_tiny_updates_add_up(backend):
    _skip_unless(backend, torch.bfloat16)
    fp32 = _drift(torch.float32, backend, stochastic_rounding=False)
    nearest = _drift(torch.bfloat16, backend, stochastic_rounding=False)
    stochastic = _drift(torch.bfloat16, backend, stochastic_rounding=True)
    assert fp32 > 0.05
    assert nearest == 0.0  # round-to-nearest never applies an update below half an ulp
    assert abs(stochastic - fp32) < 0.1 * fp32


def _mlp_run(backend, state_dtype, steps=30):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    opt = esgdm.ESGDM(net.parameters(), lr=0.3, backend=backend, state_dtype=state_dtype, seed=1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward(create_graph=opt.should_create_graph())
        opt.step()
    return net, opt


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_state_follows_fp32_state(backend):
    _skip_unless(backend)
    ref, ref_opt = _mlp_run(backend, None)
    net, opt = _mlp_run(backend, torch.bfloat16)
    assert opt.state[net[0].weight]["exp_avg"].dtype == torch.bfloat16
    for a, b in zip(net.parameters(), ref.parameters()):
        assert rel_err(a, b) < 2e-2  # bf16 keeps 8 bits of m and D
    fp32_bytes = sum(b.nbytes() for b in ref_opt.buckets())
    bf16_bytes = sum(b.nbytes() for b in opt.buckets())
    assert bf16_bytes < 0.55 * fp32_bytes


@pytest.mark.parametrize("save_dtype,load_dtype", [(None, torch.bfloat16), (torch.bfloat16, None),
                                                   (torch.bfloat16, torch.bfloat16)])
def test_checkpoints_load_across_state_dtypes(save_dtype, load_dtype):
    net, opt = _mlp_run("torch", save_dtype, steps=5)
    sd = opt.state_dict()
    assert sd["global_state"]["state_dtype"] == ("bfloat16" if save_dtype else "float32")
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = esgdm.ESGDM(net.parameters(), lr=0.3, backend="torch", state_dtype=load_dtype)
    fresh.load_state_dict(torch.load(buf))
    for p in net.parameters():
        got, want = fresh.state[p]["exp_avg_d"], opt.state[p]["exp_avg_d"]
        assert got.dtype == (load_dtype or torch.float32)
        assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=0)
        assert float(fresh.state[p]["exp_avg_bias_corr"]) == float(opt.state[p]["exp_avg_bias_corr"])
