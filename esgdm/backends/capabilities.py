"""The capability table: what each built-in backend steps, where, and why not elsewhere.

One row per built-in backend (:data:`CAPABILITIES`), in the order ``"auto"`` tries
them: the device types it runs on (None: every device type torch steps tensors on),
the device types ``"auto"`` tries it on, the sentence said for any other device, the
parameter dtypes it steps and the state dtypes it keeps (of those the dtype table,
:mod:`esgdm.dtypes`, allows for each parameter dtype), and, for ``python -m
esgdm.info``, what else it needs at run time.  Conditions that only the running
process can answer (the C++ extension was not built, Triton does not import, no GPU
is visible) stay each backend's own check (:meth:`BuiltinBackend.unavailable`); the
table says which devices and dtypes.

Read by :func:`esgdm.backends.why_not` (and so by the operator's checks in
:mod:`esgdm.ops` and by ``"auto"``), :func:`esgdm.backends.candidates`, the built-in
backends' ``why_not`` and ``python -m esgdm.info``.  A backend registered from outside
(:func:`esgdm.backends.register`) has no row: its own ``why_not`` answers for it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from esgdm import dtypes


class Capability(NamedTuple):
    """One backend's row."""

    location: tuple[str, str]  # (module, attribute) that holds the Backend (loaded lazily)
    subject: str  # how its reasons name it ("it", "the Triton kernel")
    devices: tuple[str, ...] | None  # device types it runs on; None: every device type
    auto: tuple[str, ...] | None  # device types on which "auto" tries it; None: every one
    device_reason: str  # why not on another device type ("{device}": its type)
    params: tuple[torch.dtype, ...]  # parameter dtypes it steps
    states: tuple[torch.dtype, ...]  # state dtypes it keeps (where esgdm.dtypes allows them)
    needs: str  # what it needs at run time (for esgdm.info)

    def runs_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def state_dtypes(self, param_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        """The state dtypes it keeps for ``param_dtype`` parameters (none: not stepped)."""
        if param_dtype not in self.params:
            return ()
        return tuple(s for s in dtypes.state_dtypes(param_dtype) if s in self.states)

    def why_not(self, device: torch.device | str, dtype: torch.dtype,
                state_dtype: torch.dtype | None = None) -> str | None:
        """None if the row covers ``dtype`` parameters (with ``state_dtype`` state, None:
        any) on ``device``, else one sentence."""
        device_type = torch.device(device).type
        if not self.runs_on(device_type):
            return self.device_reason.format(device=device_type)
        if dtype not in self.params:
            return f"{self.subject} steps {dtypes.names(self.params)} parameters, not {dtype}"
        if state_dtype is not None and state_dtype not in self.state_dtypes(dtype):
            return (f"{self.subject} keeps {dtypes.names(self.state_dtypes(dtype))} state for "
                    f"{dtypes.name(dtype)} parameters, not {state_dtype}")
        return None


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_ALL_PARAMS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ALL_STATES = (torch.float32, torch.bfloat16, torch.float64)

#: One row per built-in backend, fastest first: the order in which "auto" tries them.
CAPABILITIES: dict[str, Capability] = {
    "triton": Capability(
        location=("esgdm.backends.triton_impl", "BACKEND"),
        subject="the Triton kernel",
        devices=("cuda", "cpu"),  # cpu: only in Triton's interpreter (TRITON_INTERPRET=1)
        auto=("cuda",),
        device_reason="the Triton kernel runs on CUDA devices, not {device}",
        params=_FLOATS,
        states=(torch.float32, torch.bfloat16, torch.uint8),
        needs="Triton, and a CUDA GPU of compute capability 7.0 or newer (CPU tensors only in "
              "Triton's interpreter, TRITON_INTERPRET=1)",
    ),
    "cuda": Capability(
        location=("esgdm.backends.cpp_impl", "CUDA_BACKEND"),
        subject="it",
        devices=("cuda",),
        auto=("cuda",),
        device_reason="it runs on cuda tensors only, not on {device}",
        params=_ALL_PARAMS,
        states=(*_ALL_STATES, torch.uint8),
        needs="the C++ extension esgdm._C built with its CUDA kernel for this GPU's architecture",
    ),
    "cpu": Capability(
        location=("esgdm.backends.cpp_impl", "CPU_BACKEND"),
        subject="it",
        devices=("cpu",),
        auto=("cpu",),
        device_reason="it runs on cpu tensors only, not on {device}",
        params=_ALL_PARAMS,
        states=(*_ALL_STATES, torch.uint8),
        needs="the C++ extension esgdm._C",
    ),
    "torch": Capability(
        location=("esgdm.backends.torch_impl", "BACKEND"),
        subject="it",
        devices=None,  # every device type torch steps tensors on (CPU, CUDA, MPS, XPU, ...)
        auto=None,
        device_reason="",
        params=_ALL_PARAMS,
        states=(*_ALL_STATES, torch.uint8),
        needs="nothing but torch",
    ),
}


def auto_order(device_type: str) -> tuple[str, ...]:
    """The built-in backends ``"auto"`` tries on ``device_type``, fastest first."""
    return tuple(name for name, row in CAPABILITIES.items() if row.auto is None or device_type in row.auto)


__all__ = ["CAPABILITIES", "Capability", "auto_order"]
