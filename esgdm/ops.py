"""``torch.library`` operators of the ``esgdm`` namespace defined from Python.

``torch.ops.esgdm.triton_step_`` wraps one launch of the fused Triton kernel
(:mod:`esgdm.kernels.esgdm_step`) so that ``torch.compile`` can trace a training
step around ``opt.step()``: the schema declares which lists are written, and a fake
(meta) implementation lets the compiler trace it without running it.  The C++
extension owns the namespace (``TORCH_LIBRARY(esgdm, m)`` defines
``esgdm::fused_step_`` with the same argument list, :data:`STEP_SCHEMA`); this module
only adds a fragment to it, so it can be imported before or after the extension.

Implementations: CUDA (compiled kernel) and CPU (the Triton interpreter, only when
``TRITON_INTERPRET=1`` was set before the kernel module was imported; otherwise the
CPU implementation raises a RuntimeError that says so).  The kernel module is
imported on first use, not here.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from esgdm.buckets import is_dense, same_layout

#: Argument list shared by ``esgdm::triton_step_`` and the C++ ``esgdm::fused_step_``.
#: ``scalars`` is the float64 CPU ``[n, 5]`` table of :mod:`esgdm.rule`.
STEP_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_ds, "
    "Tensor[]? hvps, Tensor scalars) -> ()"
)

NAMESPACE = "esgdm"
TRITON_STEP = "triton_step_"

#: Parameter dtypes the Triton kernel steps (its state is float32).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # noqa: the C++ side owns the DEF


def check_step_args(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                    exp_avg_ds: Sequence[Tensor], hvps: Optional[Sequence[Tensor]], scalars: Tensor,
                    dtypes: Sequence[torch.dtype] = TRITON_DTYPES) -> None:
    """Raises ValueError naming the first argument that breaks the backend contract
    (see :mod:`esgdm.backends`): list lengths, dtypes, devices, shapes, density and
    layout, and the scalar table's shape and dtype.

    The common case (everything fine) is checked list-wise, which costs a few
    attribute reads per tensor; only a failure walks the tensors one by one to name
    the culprit.
    """
    n = len(params)
    lengths = {"grads": len(grads), "exp_avgs": len(exp_avgs), "exp_avg_ds": len(exp_avg_ds)}
    if hvps is not None:
        lengths["hvps"] = len(hvps)
    for name, length in lengths.items():
        if length != n:
            raise ValueError(f"esgdm step: {name} has {length} tensors, params has {n}")
    if scalars.dtype != torch.float64 or scalars.device.type != "cpu" or tuple(scalars.shape) != (n, 5):
        raise ValueError(f"esgdm step: scalars must be a float64 CPU tensor of shape ({n}, 5), got "
                         f"{scalars.dtype} on {scalars.device} with shape {tuple(scalars.shape)}")
    if n == 0:
        return
    dtype = params[0].dtype
    if dtype not in dtypes:
        raise ValueError(f"esgdm step: parameters of dtype {dtype} are not supported here "
                         f"(supported: {', '.join(str(d) for d in dtypes)})")
    lists = {"params": (params, dtype), "grads": (grads, dtype), "exp_avgs": (exp_avgs, torch.float32),
             "exp_avg_ds": (exp_avg_ds, torch.float32)}
    if hvps is not None:
        lists["hvps"] = (hvps, dtype)
    device = params[0].get_device()
    shapes = [t.shape for t in params]
    strides = list(map(Tensor.stride, params))
    ok = all(map(Tensor.is_contiguous, params)) or all(map(is_dense, params))
    for tensors, want in lists.values():
        if not ok:
            break
        ok = ({t.dtype for t in tensors} == {want}
              and set(map(Tensor.get_device, tensors)) == {device}
              and (tensors is params or ([t.shape for t in tensors] == shapes
                                         and list(map(Tensor.stride, tensors)) == strides)))
    if not ok:
        _name_culprit(params, lists, device)


def _name_culprit(params, lists, device) -> None:
    """Walks the tensors one by one and raises for the first one that is wrong."""
    for i, p in enumerate(params):
        for name, (tensors, want) in lists.items():
            t = tensors[i]
            if t.dtype != want:
                raise ValueError(f"esgdm step: {name}[{i}] has dtype {t.dtype}, expected {want}")
            if t.get_device() != device:
                raise ValueError(f"esgdm step: {name}[{i}] is on {t.device}, params[0] on {params[0].device}")
            if t.shape != p.shape:
                raise ValueError(f"esgdm step: {name}[{i}] has shape {tuple(t.shape)}, "
                                 f"params[{i}] has shape {tuple(p.shape)}")
            if not same_layout(t, p.shape, p.stride()):
                raise ValueError(f"esgdm step: {name}[{i}] has strides {t.stride()}, "
                                 f"params[{i}] has strides {p.stride()}")
        if not is_dense(p):
            raise ValueError(f"esgdm step: params[{i}] (shape {tuple(p.shape)}, strides {p.stride()}) "
                             "is not dense; step a dense copy instead")


def _kernels():
    from esgdm.kernels import esgdm_step  # imported on first use (TRITON_INTERPRET is read then)

    return esgdm_step


def _triton_step_cuda(params, grads, exp_avgs, exp_avg_ds, hvps, scalars) -> None:
    check_step_args(params, grads, exp_avgs, exp_avg_ds, hvps, scalars)
    _kernels().fused_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars)


def _triton_step_cpu(params, grads, exp_avgs, exp_avg_ds, hvps, scalars) -> None:
    check_step_args(params, grads, exp_avgs, exp_avg_ds, hvps, scalars)
    k = _kernels()
    if not k.INTERPRET:
        raise RuntimeError(
            "esgdm::triton_step_ got CPU tensors, which the Triton kernel steps only in the "
            "Triton interpreter: set TRITON_INTERPRET=1 before esgdm's Triton kernels are imported"
        )
    k.fused_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars)


def _triton_step_fake(params, grads, exp_avgs, exp_avg_ds, hvps, scalars) -> None:
    # In-place on its inputs and returns nothing: there is nothing to compute here.
    return None


def _register() -> None:
    if hasattr(getattr(torch.ops, NAMESPACE), TRITON_STEP):
        return  # defined already (this module was reloaded)
    _lib.define(TRITON_STEP + STEP_SCHEMA)
    _lib.impl(TRITON_STEP, _triton_step_cuda, "CUDA")
    _lib.impl(TRITON_STEP, _triton_step_cpu, "CPU")
    qualname = f"{NAMESPACE}::{TRITON_STEP}"
    register_fake = getattr(torch.library, "register_fake", None)
    if register_fake is not None:  # torch >= 2.4
        register_fake(qualname, _triton_step_fake, lib=_lib)
    else:
        torch.library.impl_abstract(qualname, _triton_step_fake, lib=_lib)


_register()


def triton_step_(params, grads, exp_avgs, exp_avg_ds, hvps, scalars) -> None:
    """Calls ``torch.ops.esgdm.triton_step_`` (one fused kernel launch, in place)."""
    torch.ops.esgdm.triton_step_(params, grads, exp_avgs, exp_avg_ds, hvps, scalars)


__all__ = ["NAMESPACE", "STEP_SCHEMA", "TRITON_DTYPES", "TRITON_STEP", "check_step_args", "triton_step_"]
