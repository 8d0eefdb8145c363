"""The backend seam: what runs where is each backend's own answer (``why_not``).

A backend registered from outside the package with ``esgdm.backends.register`` steps
parameters end to end (optimizer, operator), and its reasons for refusing reach the
user.  The operator has an implementation for every device type torch steps tensors on;
which kernel runs there is the backends' call, so the portable ``torch`` backend reaches
devices with no fused kernel (MPS, XPU, ...).
"""

from __future__ import annotations

import pytest
import torch

import esgdm
from esgdm import backends
from esgdm.backends.torch_impl import torch_step


class Recording(backends.Backend):
    """Steps float32 with the torch backend's code and counts its calls."""

    name = "recording"

    def __init__(self, refuse: str | None = None):
        self.calls = 0
        self.refuse = refuse

    def why_not(self, device, dtype):
        if self.refuse is not None:
            return self.refuse
        return None if dtype == torch.float32 else f"it steps float32 only, not {dtype}"

    def step(self, *args):
        self.calls += 1
        torch_step(*args)


@pytest.fixture
def registered():
    made = []

    def register(backend):
        backends.register(backend)
        made.append(backend.name)
        return backend

    yield register
    for name in made:
        backends._loaded.pop(name, None)
        backends._LOCATIONS.pop(name, None)


def _train(opt, p, steps=3):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (p ** 4).sum().backward(create_graph=opt.should_create_graph())
        opt.step()


def test_a_registered_backend_steps_end_to_end(registered):
    mine = registered(Recording())
    p = torch.nn.Parameter(torch.linspace(-1, 1, 9))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = esgdm.ESGDM([p], lr=0.5, backend="recording", seed=3)
    _train(opt, p)
    _train(esgdm.ESGDM([ref], lr=0.5, backend="torch", seed=3), ref)
    assert mine.calls == 3
    assert torch.equal(p, ref)  # the same code as the torch backend: the same numbers


def test_its_refusal_reaches_the_user(registered):
    registered(Recording())
    q = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = esgdm.ESGDM([q], lr=0.5, backend="recording")
    (q ** 4).sum().backward(create_graph=True)
    with pytest.raises(esgdm.BackendUnavailableError, match="it steps float32 only, not torch.float64"):
        opt.step()
    assert torch.equal(q, torch.ones(4, dtype=torch.float64))


def test_the_operator_runs_a_registered_kernel_and_asks_again_after_a_replacement(registered):
    mine = registered(Recording())
    p = torch.nn.Parameter(torch.ones(5))
    opt = esgdm.ESGDM([p], lr=0.5, backend="recording", d_warmup=1, update_d_every=100)
    _train(opt, p, 2)
    assert mine.calls == 2
    before = p.detach().clone()
    registered(Recording(refuse="switched off for this test"))
    opt.zero_grad(set_to_none=True)
    (p ** 4).sum().backward()
    with pytest.raises(Exception, match="switched off for this test"):
        opt.step()
    assert torch.equal(p, before)


def test_registration_checks_what_it_is_given():
    with pytest.raises(TypeError, match="Backend"):
        backends.register(object())
    nameless = Recording()
    nameless.name = "auto"
    with pytest.raises(ValueError, match="name of its own"):
        backends.register(nameless)


def test_an_unknown_kernel_is_named_by_the_operator():
    p, g = torch.ones(3), torch.ones(3)
    m, d = torch.zeros(3), torch.zeros(3)
    scalars = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    index = torch.tensor([[0, 0]], dtype=torch.int32)
    hparams = torch.tensor([[0.5, 0.9, 0.999, 0.99, 1e-4, 0.0]], dtype=torch.float64)
    with pytest.raises(Exception, match="nonesuch"):
        torch.ops.esgdm.step_([p], [g], [m], [d], None, scalars, index, hparams, None, None, 0, 0, "nonesuch")
    assert torch.equal(p, torch.ones(3))


@pytest.mark.parametrize("key", ["CPU", "CUDA", "MPS", "XPU", "PrivateUse1"])
def test_the_operator_has_an_implementation_for_every_device_type(key):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("esgdm::step_", key)


@pytest.mark.parametrize("device_type", ["mps", "xpu", "privateuseone"])
def test_devices_without_a_fused_kernel_get_the_portable_backend(device_type):
    device = torch.device(device_type)
    assert backends.candidates(device) == ("torch",)
    assert backends.get("torch").why_not(device, torch.float32) is None
    backend, _ = backends.resolve("auto", device, torch.float32)
    assert backend.name == "torch"


def test_a_backend_registered_under_a_built_in_name_steps_every_step():
    """Registering a backend as "cpu" replaces the compiled one for plain steps too: the
    optimizer's C++ step plan (which runs the compiled kernels itself) must not step its
    buckets behind the registered backend's back."""
    saved = (backends._loaded.get("cpu"), dict(backends._generation))
    mine = Recording()
    mine.name = "cpu"
    backends.register(mine)
    try:
        p = torch.nn.Parameter(torch.linspace(-1, 1, 9))
        opt = esgdm.ESGDM([p], lr=0.5, backend="cpu", d_warmup=1, update_d_every=100, seed=3)
        _train(opt, p, 4)
        assert mine.calls == 4
        assert esgdm.backends.get("cpu") is mine and opt._store.plan is None
    finally:
        backends._loaded["cpu"] = saved[0]
        if saved[0] is None:
            backends._loaded.pop("cpu")
        backends._generation.clear()
        backends._generation.update(saved[1])
