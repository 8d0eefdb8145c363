"""8-bit optimizer state (``state_dtype=torch.uint8``) through the optimizer: which tensors
get it, what it costs, checkpoints in both directions, bad checkpoints refused, training.

The kernels themselves are compared with :func:`esgdm.quant.reference_step` in
tests/test_quant_kernels.py; the quantizer with its own definition in tests/test_quant.py.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import esgdm
from esgdm import quant


def _why_not(name: str) -> str | None:
    try:
        return esgdm.backends.why_not(name, torch.device("cpu"), torch.float32, torch.uint8)
    except Exception as e:  # noqa: BLE001 - an unimportable backend is skipped, with the reason
        return f"{type(e).__name__}: {e}"


#: The backends that keep 8-bit state for CPU tensors here (Triton: in its interpreter).
NAMES = ("torch", "cpu", "triton")
AVAILABLE = [name for name in NAMES if _why_not(name) is None]
BACKENDS = [pytest.param(n, marks=pytest.mark.skipif(_why_not(n) is not None, reason=str(_why_not(n))))
            for n in NAMES]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)


def _train(model, opt, steps: int, data=None) -> list[float]:
    x, y = data or _data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=opt.should_create_graph())
        opt.step()
        losses.append(loss.item())
    return losses


def _opt(model, backend, **kw):
    kw = dict(lr=0.2, update_d_every=2, d_warmup=1, seed=5, **kw)
    return esgdm.ESGDM(model.parameters(), backend=backend, **kw)


def test_which_tensors_get_8bit_state_and_what_it_costs():
    big = torch.nn.Parameter(torch.randn(64, 1000))        # 64000 elements: 8-bit
    edge = torch.nn.Parameter(torch.randn(quant.MIN_NUMEL))  # exactly the threshold: 8-bit
    small = torch.nn.Parameter(torch.randn(quant.MIN_NUMEL - 1))  # float32
    wide = torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))  # float64 keeps float64
    opt = esgdm.ESGDM([big, edge, small, wide], lr=0.1, state_dtype=torch.uint8, backend="torch")
    sum((p.double() ** 3).sum() for p in (big, edge, small, wide)).backward(create_graph=True)
    opt.step()
    kinds = {p: opt.state[p]["exp_avg"].dtype for p in (big, edge, small, wide)}
    assert kinds == {big: torch.uint8, edge: torch.uint8, small: torch.float32, wide: torch.float64}
    assert opt.state[big]["qscale"].shape == (quant.n_blocks(big.numel()), 2)
    assert "qscale" not in opt.state[small]
    (b8,) = [b for b in opt.buckets() if b.state_dtype == torch.uint8]
    elements = sum(b8.numels)
    per_param = (b8.nbytes() - b8.scalars.numel() * 8) / elements
    assert per_param <= 2.1  # 2 codes + 8 bytes of scales per 256 elements


def test_complex_parameters_refuse_8bit_state():
    with pytest.raises(ValueError, match="complex"):
        esgdm.ESGDM([torch.nn.Parameter(torch.randn(5000, dtype=torch.complex64))], state_dtype=torch.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_with_8bit_state_tracks_float32_state(backend):
    """Same model, data and signs: the 8-bit run's losses stay within a few percent of
    the float32-state run's, and both learn."""
    runs = {}
    for state in (None, torch.uint8):
        model = _model()
        runs[state] = _train(model, _opt(model, backend, state_dtype=state), 40)
    fp32, q8 = runs[None], runs[torch.uint8]
    assert fp32[-1] < 0.8 * fp32[0] and q8[-1] < 0.8 * q8[0]
    assert abs(q8[-1] - fp32[-1]) <= 0.05 * fp32[-1]


def test_backends_agree_on_8bit_state():
    if len(AVAILABLE) < 2:
        pytest.skip("one backend keeps 8-bit state for CPU tensors here")
    params = {}
    for backend in AVAILABLE:
        model = _model()
        _train(model, _opt(model, backend, state_dtype=torch.uint8), 6)
        params[backend] = [p.detach().clone() for p in model.parameters()]
    first, *others = AVAILABLE
    for other in others:
        for a, b in zip(params[first], params[other]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _trained(state_dtype, steps=5, backend="torch"):
    model = _model()
    opt = _opt(model, backend, state_dtype=state_dtype)
    _train(model, opt, steps)
    return model, opt


def test_checkpoint_round_trips_exactly_and_keeps_stepping_the_same():
    model, opt = _trained(torch.uint8)
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    opt2 = _opt(twin, "torch", state_dtype=torch.uint8)
    opt2.load_state_dict(saved)
    for k, entry in saved["state"].items():
        for key, value in entry.items():
            got = opt2.state_dict()["state"][k][key]
            assert torch.equal(torch.as_tensor(got), torch.as_tensor(value)), key
    _train(model, opt, 3)
    _train(twin, opt2, 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_8bit_checkpoint_loads_into_float32_state_by_decoding():
    _, opt = _trained(torch.uint8)
    saved = opt.state_dict()
    model = _model()
    opt32 = _opt(model, "torch")
    opt32.load_state_dict(saved)
    entry = saved["state"][0]
    m, d = quant.dequantize(entry["exp_avg"], entry["exp_avg_d"], entry["qscale"])
    p0 = next(model.parameters())
    assert opt32.state[p0]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt32.state[p0]["exp_avg"], m)
    assert torch.equal(opt32.state[p0]["exp_avg_d"], d)
    assert "qscale" not in opt32.state[p0]


def test_float32_checkpoint_loads_into_8bit_state_by_encoding():
    _, opt = _trained(None)
    saved = opt.state_dict()
    model = _model()
    opt8 = _opt(model, "torch", state_dtype=torch.uint8)
    opt8.load_state_dict(saved)
    p0 = next(model.parameters())
    m_codes, m_scale = quant.encode_m(saved["state"][0]["exp_avg"].reshape(-1))
    d_codes, d_scale = quant.encode_d(saved["state"][0]["exp_avg_d"].reshape(-1))
    st = opt8.state[p0]
    assert torch.equal(st["exp_avg"].reshape(-1), m_codes) and torch.equal(st["exp_avg_d"].reshape(-1), d_codes)
    assert torch.equal(st["qscale"][:, quant.M_SCALE], m_scale)
    assert torch.equal(st["qscale"][:, quant.D_SCALE], d_scale)


def _corrupt(entry, what):
    entry = dict(entry)
    if what == "no qscale":
        del entry["qscale"]
    elif what == "qscale shape":
        entry["qscale"] = entry["qscale"][:-1].clone()
    elif what == "qscale nan":
        q = entry["qscale"].clone()
        q[0, 1] = float("nan")
        entry["qscale"] = q
    elif what == "qscale negative":
        q = entry["qscale"].clone()
        q[1, 0] = -1.0
        entry["qscale"] = q
    elif what == "m code 0":
        c = entry["exp_avg"].clone()
        c.view(-1)[7] = 0
        entry["exp_avg"] = c
    elif what == "mixed formats":
        entry["exp_avg_d"] = torch.zeros(entry["exp_avg_d"].shape)
    elif what == "not dense":  # (with code_strides, codes in any layout are put back in the written one)
        entry["exp_avg"] = torch.full((entry["exp_avg"].shape[0], 2 * entry["exp_avg"].shape[1]), 128,
                                      dtype=torch.uint8)[:, ::2]
        del entry["code_strides"]
    return entry


@pytest.mark.parametrize("what", ["no qscale", "qscale shape", "qscale nan", "qscale negative", "m code 0",
                                  "mixed formats", "not dense"])
def test_corrupt_8bit_checkpoints_are_refused_and_change_nothing(what):
    _, source = _trained(torch.uint8)
    saved = copy.deepcopy(source.state_dict())
    saved["state"][0] = _corrupt(saved["state"][0], what)
    model, opt = _trained(torch.uint8, steps=2)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="state .* of parameter id 0"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    for k, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(after["state"][k][key]), torch.as_tensor(value))


def test_resetting_a_parameters_8bit_state():
    model, opt = _trained(torch.uint8)
    p0 = next(model.parameters())
    opt.state[p0] = {}
    p0.grad = torch.zeros_like(p0)
    for p in list(model.parameters())[1:]:
        p.grad = None
    opt.step()  # zero gradient after a reset: m stays 0, D unobserved
    st = opt.state[p0]
    assert bool((st["exp_avg"] == quant.M_ZERO).all()) and bool((st["exp_avg_d"] == 0).all())


def test_assigning_float_state_to_an_8bit_parameter_encodes_it():
    model, opt = _trained(torch.uint8)
    p0 = next(model.parameters())
    m = torch.randn(p0.shape)
    opt.state[p0]["exp_avg"] = m
    opt.state[p0]["exp_avg_d"] = torch.rand(p0.shape)
    opt.state[p0].pop("qscale")
    for p in model.parameters():
        p.grad = None
    opt.step()  # no gradients: nothing steps, the edit is taken in
    got = quant.decode_m(opt.state[p0]["exp_avg"].reshape(-1), opt.state[p0]["qscale"][:, 0])
    torch.testing.assert_close(got, m.reshape(-1), atol=0.1 * float(m.abs().max()), rtol=0.1)


def _transposed_weight_model(seed: int = 0) -> torch.nn.Module:
    """The first layer's weight column-major (``Parameter(w.t())``): its codes are too."""
    model = _model(seed)
    lin = model[0]
    lin.weight = torch.nn.Parameter(lin.weight.detach().t().contiguous().t())
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_codes_laid_out_again_after_saving_load_as_saved(backend):
    """A checkpoint whose codes a tool made contiguous (``.contiguous()``, as safetensors
    and converters do) loads the state that was saved, and the run goes on bit for bit
    as from the checkpoint as written: ``code_strides`` says in which order the codes'
    blocks were written (before, the codes were read in their new memory order: other
    values, silently)."""
    runs = []
    for relaid in (False, True):
        model = _transposed_weight_model()
        opt = _opt(model, backend, state_dtype=torch.uint8)
        _train(model, opt, 3)
        w = model[0].weight
        assert opt.state[w]["exp_avg"].dtype == torch.uint8 and not opt.state[w]["exp_avg"].is_contiguous()
        sd = copy.deepcopy(opt.state_dict())
        saved = quant.dequantize(*(sd["state"][0][k] for k in ("exp_avg", "exp_avg_d", "qscale")))
        if relaid:
            sd["state"][0] = {k: v.contiguous() if isinstance(v, torch.Tensor) else v
                              for k, v in sd["state"][0].items()}
        fresh = _transposed_weight_model(seed=3)
        fresh.load_state_dict(model.state_dict())
        opt2 = _opt(fresh, backend, state_dtype=torch.uint8)
        opt2.load_state_dict(sd)
        w2 = fresh[0].weight
        loaded = quant.dequantize(*(opt2.state[w2][k] for k in ("exp_avg", "exp_avg_d", "qscale")))
        assert all(torch.equal(a, b) for a, b in zip(saved, loaded))
        _train(fresh, opt2, 3)
        runs.append([p.detach().clone() for p in fresh.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("strides,message", [
    ([1], "is not a dense layout of shape (128, 64)"),
    ([1, 1], "is not a dense layout of shape (128, 64)"),
    ([64, -1], "is not a dense layout of shape (128, 64)"),
    ("1,128", "must be a list of integer strides"),
    ([1.0, 128.0], "must be a list of integer strides"),
])
def test_bad_code_strides_are_refused(strides, message):
    model = _transposed_weight_model()
    opt = _opt(model, "torch", state_dtype=torch.uint8)
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["code_strides"] = strides
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert all(torch.equal(before["state"][0][k], after["state"][0][k]) for k in ("exp_avg", "exp_avg_d", "qscale"))
