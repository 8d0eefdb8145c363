"""The precision a closure computes in, for sizing the finite-difference radius.

:class:`ComputePrecision` is entered around the main evaluation of a closure and
learns the least precise dtype the evaluation computed in on each device type
(autocast, and the dtypes of the tensors saved for backward); :func:`unit_roundoff`
turns a dtype into the ``u`` of :func:`esgdm.hvp.fd_radius`.  See the comment on
finite differences in :mod:`esgdm.hvp` for why the radius needs it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

_thread = threading.local()  # per-thread state (the ComputePrecision objects open)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of a floating dtype: 2^-24 for fp32, 2^-8 for bf16."""
    return torch.finfo(dtype).eps / 2


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` right now, None when it is off.

    Works with the device-type API of torch >= 2.4 (``torch.is_autocast_enabled(dt)``,
    ``torch.get_autocast_dtype(dt)``) and with the older per-device functions.
    """
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no argument, and it means CUDA
        if device_type == "cpu":
            enabled = torch.is_autocast_cpu_enabled()
        elif device_type == "cuda":
            enabled = torch.is_autocast_enabled()
        else:
            return None
    except RuntimeError:  # a device type autocast does not know
        return None
    if not enabled:
        return None
    getter = getattr(torch, "get_autocast_dtype", None)
    if getter is not None:
        return getter(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def _autocast_eligible(dtype: torch.dtype) -> bool:
    """Whether autocast may run ops on tensors of ``dtype`` in a lower precision."""
    return dtype.is_floating_point and dtype != torch.float64


def _device_type(t: Tensor) -> str:
    return t.device.type


def _open_precisions() -> list:
    """The ComputePrecision objects open (entered, not yet left) in this thread."""
    stack = getattr(_thread, "precisions", None)
    if stack is None:
        stack = _thread.precisions = []
    return stack


def _outer_saved_tensor_hooks():
    """The saved-tensor hooks active now: None when there are none, False when this
    torch cannot tell (then none of ours are installed, so as not to hide them)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False
    try:
        return top(False)
    except TypeError:  # torch before the ignore_is_tracing argument
        return top()


def _unpack(t: Tensor) -> Tensor:
    return t


class ComputePrecision:
    """Learns the precision a closure computes in, for the finite-difference radius.

    Use it around the main evaluation of the closure::

        with ComputePrecision() as precision:
            loss = closure()
        hvps = finite_difference_hvp(..., precision=precision)

    It records the autocast state when entered and, through saved-tensor hooks
    (thread-local, so other threads and torch.compile never see them), the dtype of
    every floating tensor below float32 saved for backward inside, keeping per device
    type the least precise dtype seen.  :meth:`unit_roundoff` then gives the ``u`` to size the
    radius with.  Reusable; each ``with`` adds to what was seen.

    ``watch_saves=False`` (or :meth:`refused_by` having seen torch.func refuse the
    hooks) leaves the saved tensors alone: only the autocast state at entry counts.
    """

    def __init__(self, device_types: Sequence[str] = ("cpu", "cuda"), watch_saves: bool = True):
        self.device_types = tuple(dict.fromkeys(device_types))
        self.dtypes: dict[str, torch.dtype] = {}  # device type -> least precise compute dtype
        self.watch_saves = watch_saves
        self._hooks: list = []  # one per open ``with`` (it may be nested): the hooks pushed, or None

    def _note(self, device_type: str, dtype: torch.dtype) -> None:
        old = self.dtypes.get(device_type)
        if old is None or unit_roundoff(dtype) > unit_roundoff(old):
            self.dtypes[device_type] = dtype

    def record(self, *_args) -> None:
        """Reads the autocast state now."""
        for device_type in self.device_types:
            dtype = autocast_dtype(device_type)
            if dtype is not None and dtype.is_floating_point:
                self._note(device_type, dtype)

    def merge(self, other: ComputePrecision) -> None:
        for device_type, dtype in other.dtypes.items():
            self._note(device_type, dtype)

    def replay(self) -> None:
        """Adds what this one saw to every ComputePrecision open in this thread (for a
        closure whose gradients were computed before the optimizer asked for them)."""
        for open_one in _open_precisions():
            if open_one is not self:
                open_one.merge(self)

    def _hooks_for(self, outer):
        outer_pack = outer[0] if outer else None

        def pack(t):
            if t.is_floating_point() and t.dtype.itemsize < 4:  # lower than float32: 16 bits or less
                self._note(t.device.type, t.dtype)
            return t.detach() if outer_pack is None else outer_pack(t)

        return torch.autograd.graph.saved_tensors_hooks(pack, outer[1] if outer else _unpack)

    def __enter__(self) -> ComputePrecision:
        self.record()
        hooks = None
        if self.watch_saves:
            outer = _outer_saved_tensor_hooks()
            if outer is not False:
                hooks = self._hooks_for(outer)
                try:
                    hooks.__enter__()
                except RuntimeError:  # hooks are disabled here (inside a torch.func transform)
                    hooks = None
        self._hooks.append(hooks)
        _open_precisions().append(self)
        return self

    def __exit__(self, *exc) -> Literal[False]:
        stack = _open_precisions()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is self:
                del stack[i]
                break
        hooks = self._hooks.pop()
        if hooks is not None:
            hooks.__exit__(*exc)
        return False

    def refused_by(self, error: BaseException) -> bool:
        """Whether ``error`` is torch.func refusing saved-tensor hooks while these were
        on; if so they stay off from now on (the caller reruns the evaluation)."""
        if self.watch_saves and isinstance(error, RuntimeError) and "saved tensor hooks" in str(error):
            self.watch_saves = False
            return True
        return False

    def __getstate__(self) -> dict:  # picklable (an optimizer may hold one): no open hooks
        return {"device_types": self.device_types, "dtypes": dict(self.dtypes),
                "watch_saves": self.watch_saves, "_hooks": []}

    def unit_roundoff(self, params: Sequence[Tensor]) -> float:
        """``u`` for finite differences over ``params``: the largest unit roundoff of
        their dtypes and, for autocast-eligible ones, of the compute dtype seen on
        their device type."""
        u = 0.0
        for p in params:
            u = max(u, unit_roundoff(p.dtype))
            if _autocast_eligible(p.dtype):
                dtype = self.dtypes.get(_device_type(p))
                if dtype is not None:
                    u = max(u, unit_roundoff(dtype))
        return u if u > 0 else unit_roundoff(torch.float32)


__all__ = ["ComputePrecision", "autocast_dtype", "unit_roundoff"]
