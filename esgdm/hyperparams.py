"""The hyper-parameter checks of :class:`esgdm.ESGDM`: every argument and group value.

Each check raises ``ValueError`` (``TypeError`` for a value of the wrong type) with the
bad value in the message, before anything changes.  Nothing here holds state.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from esgdm import backends, dtypes
from esgdm.buckets import overlaps
from esgdm.hvp import FD_SCHEMES

#: How D-steps get ``H v`` (``ESGDM(hvp=...)``).
HVP_MODES = ("autograd", "finite_difference", "auto")


def check_lr(lr: Any, where: str) -> None:
    value = real("lr", lr, where, "(must be a float or a one-element tensor)")
    if value is not None and not (0.0 <= value and math.isfinite(value)):
        raise ValueError(f"Invalid lr{where}: {value!r} (must be finite and >= 0)")


def flag(name: str, value: Any, none_ok: bool = False) -> bool | None:
    """A bool (or None where that means "default"): strings and numbers are refused, not
    coerced (``exact="no"`` is truthy)."""
    if isinstance(value, bool) or (none_ok and value is None):
        return value
    raise TypeError(f"Invalid {name}: {value!r} (must be True or False"
                    f"{' or None' if none_ok else ''})")


def real(name: str, value: Any, where: str, must: str = "(must be a float)") -> float | None:
    """A real hyper-parameter's value: a number, or a one-element floating-point tensor
    (as torch.optim allows), whose value is read here, when the optimizer first meets
    that tensor; steps copy it on the device and never read it.  None for a meta
    tensor, which holds no value."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise ValueError(f"Invalid {name}{where}: a tensor {name} must hold one floating-point value, "
                             f"got {value.dtype} of shape {tuple(value.shape)}")
        return None if value.is_meta else value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}{where}: {value!r} {must}")
    return float(value)


def check_flags(group: dict, where: str) -> None:
    """``maximize`` and ``differentiable``, optional in a group (absent means False)."""
    for name in ("maximize", "differentiable"):
        value = group.get(name, False)
        if not isinstance(value, bool):
            raise TypeError(f"Invalid {name}{where}: {value!r} (must be True or False)")
    if group.get("differentiable", False):
        raise ValueError(f"differentiable=True is not supported{where}: the ESGD-M step runs in-place fused "
                         "kernels (and a Hessian-vector product) that autograd cannot differentiate through; "
                         "use differentiable=False")


def check_switch(name: str, value: Any) -> bool | None:
    """``foreach``/``fused``: None or a bool, as in torch.optim."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r} (must be None, True or False)")
    return value


def backend_for_switches(backend: str | None, foreach: bool | None, fused: bool | None) -> str:
    """The backend name that ``backend=``, ``foreach=`` and ``fused=`` ask for together.

    As in torch.optim: ``fused=True`` asks for a fused kernel (every backend but
    ``"torch"``); ``fused=False``, and ``foreach=False`` unless ``fused=True``, ask for
    the per-tensor implementation, which is the ``"torch"`` backend; ``foreach=True``
    asks for a multi-tensor step, which every backend but ``"torch"`` is.  An explicit
    ``backend=`` that contradicts them raises; ``$ESGDM_BACKEND`` gives way to them.
    """
    fused, foreach = check_switch("fused", fused), check_switch("foreach", foreach)
    if fused and foreach:
        raise ValueError("fused=True and foreach=True cannot both hold: pick one (ESGDM's fused "
                         "kernels are also multi-tensor, so fused=True alone covers both)")
    per_tensor = fused is False or (foreach is False and not fused)
    if backend is None:
        name = backends.check_name(backends.default_name())
        if per_tensor:
            return "torch"
        return "auto" if name == "torch" and (fused or foreach) else name
    name = backends.check_name(backend)
    if per_tensor and name not in ("auto", "torch"):
        switch = "fused=False" if fused is False else "foreach=False"
        raise ValueError(f"{switch} asks for the unfused per-tensor step, the 'torch' backend, but "
                         f"backend={name!r} is a fused kernel: drop one of them")
    if name == "torch" and (fused or foreach):
        switch = "fused=True" if fused else "foreach=True"
        raise ValueError(f"{switch} asks for a fused multi-tensor kernel, but backend='torch' steps one "
                         "tensor at a time: drop one of them")
    return "torch" if per_tensor else name


def check_group(group: dict, where: str = "", exact: bool = False) -> None:
    """Raises ValueError (TypeError for a wrong type) naming the first invalid
    hyper-parameter of ``group``.  ``exact``: the optimizer computes the original rule,
    which divides by ``eps`` where ``D == 0``, so ``eps`` must be > 0."""
    missing = [k for k in ("lr", "betas", "lr_warmup", "eps", "weight_decay") if k not in group]
    if missing:
        raise ValueError(f"Missing hyper-parameters{where}: {', '.join(missing)}")
    check_lr(group["lr"], where)
    betas = group["betas"]
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas{where}: {betas!r} (must be a pair of floats)") from None
    # (None: a meta tensor, whose value cannot be checked)
    b1, b2 = real("beta parameter at index 0", b1, where), real("beta parameter at index 1", b2, where)
    if b1 is not None and not 0.0 <= b1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0{where}: {b1!r} (must be in [0, 1))")
    if b2 is not None and not 0.0 <= b2 <= 1.0:
        raise ValueError(f"Invalid beta parameter at index 1{where}: {b2!r} (must be in [0, 1])")
    w = real("lr_warmup", group["lr_warmup"], where)
    if w is not None and not 0.0 <= w < 1.0:
        raise ValueError(f"Invalid lr_warmup{where}: {w!r} (must be in [0, 1))")
    eps = real("eps", group["eps"], where)
    if eps is not None and not (0.0 <= eps and math.isfinite(eps)):
        raise ValueError(f"Invalid eps{where}: {eps!r} (must be finite and >= 0)")
    if exact and eps == 0:
        raise ValueError(f"Invalid eps{where}: 0.0 with exact=True (the original rule divides by "
                         "sqrt(D) + eps, and D is 0 until curvature is observed): use eps > 0, "
                         "or exact=False, whose rule never divides by zero")
    wd = real("weight_decay", group["weight_decay"], where)
    if wd is not None and not (0.0 <= wd and math.isfinite(wd)):
        raise ValueError(f"Invalid weight_decay{where}: {wd!r} (must be finite and >= 0)")
    check_flags(group, where)


def check_curvature_options(hvp: str, fd_scheme: str, fd_radius: float | None) -> None:
    """``hvp=``, ``fd_scheme=`` and ``fd_radius=`` of the constructor."""
    if hvp not in HVP_MODES:
        raise ValueError(f"Invalid hvp: {hvp!r}; choose one of {', '.join(map(repr, HVP_MODES))}")
    if fd_scheme not in FD_SCHEMES:
        raise ValueError(f"Invalid fd_scheme: {fd_scheme!r}; choose one of {', '.join(FD_SCHEMES)}")
    if fd_radius is not None and not (isinstance(fd_radius, numbers.Real) and fd_radius > 0
                                      and math.isfinite(fd_radius)):
        raise ValueError(f"Invalid fd_radius: {fd_radius!r} (must be finite and > 0)")


def check_state_dtype(state_dtype: Any) -> None:
    """``state_dtype=``: None or a state dtype of :data:`esgdm.dtypes.STATE_OPTIONS`."""
    if state_dtype is not None and state_dtype not in dtypes.STATE_OPTIONS:
        names = " or ".join(map(str, dtypes.STATE_OPTIONS))
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (choose {names})")


def check_param(p: Tensor, state_dtype: torch.dtype | None) -> None:
    """A parameter ESGDM can step, with the state dtype asked for."""
    if not (p.dtype.is_floating_point or p.is_complex()):
        raise ValueError("ESGDM optimizes floating-point parameters only (complex ones as their "
                         f"real view), got one of dtype {p.dtype}")
    if p.is_complex() and state_dtype is not None and not dtypes.STATE_OPTIONS[state_dtype].complex_ok:
        name = str(state_dtype).replace("torch.", "")
        raise ValueError(f"a complex parameter ({p.dtype}) cannot have state_dtype={state_dtype}: "
                         f"its state is shown as complex, and torch has no {name} complex dtype")
    if overlaps(p):
        raise ValueError(f"a parameter of shape {tuple(p.shape)} has strides {p.stride()}: "
                         "its elements share memory (an expanded tensor), which an optimizer "
                         "cannot step; pass a tensor that owns its elements (p.contiguous())")


__all__ = [
    "HVP_MODES", "backend_for_switches", "check_curvature_options", "check_flags", "check_group",
    "check_lr", "check_param", "check_state_dtype", "check_switch", "flag", "real",
]
