"""Shared test utilities: losses with known structure and trajectory comparison."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import ReferenceESGDM

import esgdm
import esgdm.curvature


def cpu_backends(dtype=torch.float32, names=("torch", "cpu", "triton")) -> list:
    """pytest params for each backend in ``names`` on CPU tensors of ``dtype``, skipped
    with the backend's own reason where it cannot run (or cannot be imported)."""
    out = []
    for name in names:
        try:
            why = esgdm.backends.get(name).why_not(torch.device("cpu"), dtype)
        except Exception as e:  # noqa: BLE001 - an unimportable backend is skipped, with the reason
            why = f"{type(e).__name__}: {e}"
        out.append(pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference of ``a`` from ``b`` (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom else (a - b).norm().item()


def separable_loss(params, coeffs):
    """Sum of functions of single coordinates: its Hessian is diagonal, so the squared
    HVP equals the squared Hessian diagonal whatever the signs drawn."""
    total = 0.0
    for p, (a, b, c) in zip(params, coeffs):
        x = p.float()
        total = total + (a * x.pow(4) + b * x.pow(2) + c * torch.sin(3 * x)).sum()
    return total


def make_coeffs(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(p.shape, generator=g) * 0.5 + 0.1,
         torch.rand(p.shape, generator=g) + 0.5,
         torch.randn(p.shape, generator=g))
        for p in params
    ]


def clone_params(params, requires_grad=True):
    return [p.detach().clone().requires_grad_(requires_grad) for p in params]


def signs_for(step: int, index: int, like: torch.Tensor) -> torch.Tensor:
    """A deterministic Rademacher tensor for (step, parameter index)."""
    g = torch.Generator().manual_seed(1000 * step + index + 7)
    v = torch.randint(0, 2, like.shape, generator=g).to(like.dtype) * 2 - 1
    return v.to(like.device)


class InjectedSigns:
    """Makes ``esgdm.ESGDM`` and the reference draw the same sign vectors.

    Patches :func:`esgdm.curvature.draw_signs` (the only place the package draws them)
    so that each parameter gets ``signs_for(step, its index in optimizer order)``.
    """

    def __init__(self, monkeypatch, opt_params, ref_params):
        self.opt_index = {id(p): i for i, p in enumerate(opt_params)}
        self.ref_index = {id(p): i for i, p in enumerate(ref_params)}
        self.opt = None
        self.ref = None
        injector = self

        def fake_signs(seed, step, key, p):
            return signs_for(step, injector.opt_index[id(p)], p)

        monkeypatch.setattr(esgdm.curvature, "draw_signs", fake_signs)

    def ref_signs(self, p):
        return signs_for(self.ref.steps, self.ref_index[id(p)], p)


def run_both(opt, ref, opt_params, ref_params, loss_fn, steps, before_step=None, drop_grads=None):
    """Runs ``steps`` iterations of ``loss_fn`` through both optimizers.

    ``before_step(t)`` runs first at each step (e.g. to set learning rates);
    ``drop_grads(t)`` returns the indices of parameters whose gradient is removed
    after the backward pass of step ``t`` (a parameter that misses its gradient).
    """
    for t in range(steps):
        if before_step is not None:
            before_step(t)
        for o, ps in ((opt, opt_params), (ref, ref_params)):
            for p in ps:
                p.grad = None
            loss = loss_fn(ps, t)
            loss.backward(create_graph=o.should_create_graph())
            for i in (drop_grads(t) if drop_grads else ()):
                ps[i].grad = None
            o.step()


__all__ = [
    "InjectedSigns", "ReferenceESGDM", "assert_state_unchanged", "clone_params", "esgdm", "make_coeffs", "rel_err",
    "run_both", "separable_loss", "signs_for", "state_snapshot",
]


def state_snapshot(opt, params) -> tuple:
    """What a refused step must leave alone: the parameters, each one's ``opt.state``
    tensors (read there, not through ``state_dict()``, which a refused edit still in
    ``opt.state`` may fail or differ), and the step counters."""
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)} for p in params],
            (opt.steps, opt.steps_since_d))


def assert_state_unchanged(before: tuple, after: tuple) -> None:
    (p0, s0, n0), (p1, s1, n1) = before, after
    assert all(torch.equal(x, y) for x, y in zip(p0, p1)), "a parameter changed"
    for old, new in zip(s0, s1):
        assert old.keys() == new.keys()
        for k in old:
            assert torch.equal(old[k], new[k]), k
    assert n0 == n1, "the step counters changed"


def clone_fields(obj):
    """A copy of ``obj`` (a plain record of tensors and lists of tensors) whose tensors
    are clones; other fields are shared."""
    other = type(obj).__new__(type(obj))
    for name, value in vars(obj).items():
        if isinstance(value, list):
            value = [t.clone() for t in value]  # clone keeps a dense layout's strides
        elif isinstance(value, torch.Tensor):
            value = value.clone()
        setattr(other, name, value)
    return other


def outputs_under_avx2(tmp_path, module: str, function: str):
    """What ``tests/<module>.<function>()`` returns when run in a subprocess with
    ``ATEN_CPU_CAPABILITY=avx2``: the C++ kernel's AVX2 loops, for comparing with the
    AVX-512 ones this process runs (the caller checks that it does)."""
    root = Path(__file__).resolve().parent.parent
    script = (f"import sys, torch; sys.path[:0] = [{str(root)!r}, {str(root / 'tests')!r}]\n"
              "from esgdm.backends import cpp_impl\n"
              "assert 'AVX-512' not in cpp_impl._C.build_info()['cpu_isa']\n"
              f"import {module} as t\n"
              f"torch.save(t.{function}(), {str(tmp_path / 'avx2.pt')!r})\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "avx2.pt")
