"""The backend seam: named implementations of the fused element-wise step.

Every backend implements one function with one signature (see :class:`Backend`),
the kernel behind the ``esgdm::step_`` operator (:mod:`esgdm.ops`, which has checked
the arguments first): it updates ``params``, ``exp_avgs`` and, on a D-step,
``exp_avg_ds`` in place from ``grads`` (and ``hvps``), and advances the ``bias``,
``warm`` and ``steps`` columns of the stepped tensors' rows of ``scalars``, all as
:mod:`esgdm.rule` says, on the device, without reading anything back to the host:

* all lists have one entry per tensor that has a gradient this step;
* ``params[i]``, ``grads[i]``, ``exp_avgs[i]``, ``exp_avg_ds[i]`` (and ``hvps[i]``)
  have the same shape, the same strides and are dense, so a kernel may walk all of
  them as flat arrays of ``numel`` elements (element ``k`` = memory offset ``k``);
* ``exp_avgs``/``exp_avg_ds`` are in one of the state dtypes that the dtype table
  (:mod:`esgdm.dtypes`) allows for the parameters' dtype and the backend's row of the
  capability table lists; the rest are in the parameters' dtype;
* ``scalars``, ``index``, ``hparams``, ``grad_scale``, ``found_inf`` are on the
  parameters' device (see :mod:`esgdm.ops`).

What each built-in backend steps, where, and why not elsewhere is one table,
:data:`esgdm.backends.capabilities.CAPABILITIES`; :func:`why_not` reads it (then the
backend's own run-time conditions), and so do ``"auto"`` (:func:`candidates`), the
operator's checks and ``python -m esgdm.info``.  A backend registered from outside
(:func:`register`) answers for itself (its :meth:`Backend.why_not`).

Backends are loaded lazily.  A backend that cannot run somewhere says why in one
sentence; asking for it by name there raises :class:`BackendUnavailableError` with
those reasons, and ``"auto"`` moves to the next candidate with a one-time warning.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from esgdm.backends.capabilities import CAPABILITIES, Capability, auto_order

#: Names accepted by ``ESGDM(backend=...)`` and the ``ESGDM_BACKEND`` variable.
BACKEND_NAMES = ("auto", *CAPABILITIES)

#: Where each backend lives: module path and the attribute holding the Backend (a
#: registered backend: no module, it is loaded already).
_LOCATIONS = {name: row.location for name, row in CAPABILITIES.items()}


class BackendUnavailableError(RuntimeError):
    """Raised when the backend asked for cannot step a bucket; lists every reason."""


class Backend:
    """One implementation of the element-wise step.

    Subclasses set :attr:`name`, implement :meth:`why_not` and :meth:`step`.
    """

    name: str = "?"
    #: The state dtypes this backend keeps (a registered backend may add ``torch.uint8``
    #: and take the ``qscales`` of 8-bit state, see :mod:`esgdm.quant`).
    state_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float64)
    #: Whether the optimizer's C++ step plan (``esgdm._C.StepPlan``) runs this backend's
    #: kernel itself on plain steps: esgdm._C's own compiled kernels only.
    steps_in_plan: bool = False
    #: Optional: a ``torch.ops.esgdm`` operator with a C++ kernel that runs this
    #: backend's plain step of float state held in flat buffers (``esgdm::step_flat_``'s
    #: schema without ``hvps``, ``kernel`` and 8-bit state), which a ``torch.compile``'d
    #: plain step calls instead of ``esgdm::step_flat_``, whose kernel is Python's.
    plain_flat_op: str | None = None

    def why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """``None`` if this backend can step ``dtype`` parameters on ``device``,
        else one sentence saying why not."""
        raise NotImplementedError

    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_ds: Sequence[Tensor],
        hvps: Sequence[Tensor] | None,
        scalars: Tensor,
        index: Tensor,
        hparams: Tensor,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        flags: int,
        seed: int,
        qscales: Sequence[Tensor] | None = None,
    ) -> None:
        """Steps one bucket in place (see the module docstring).  ``qscales`` is passed
        only with 8-bit (uint8) state: each tensor's block scales (:mod:`esgdm.quant`)."""
        raise NotImplementedError

    def plain_step_launcher(self, params: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                            exp_avg_ds: Sequence[Tensor], qscales: Sequence[Tensor] | None,
                            scalars: Tensor, index: Tensor) -> Any:
        """Optional: the plain steps of one bucket (every tensor stepped) for the
        optimizer's C++ step plan (``esgdm._C.StepPlan``), which checks and gathers the
        gradients in one C++ pass and writes their addresses into the launcher's address
        table.  An object with ``table`` (int64 ``[n, width]`` on the device), ``host`` (a
        CPU tensor with the same values), ``grad_columns`` (the columns that hold each
        tensor's gradient address; on a plain step ``hvps`` is never read) and
        ``__call__(hparams, grad_scale, found_inf, flags, seed)``, which launches the
        bucket's plain step over that table.  None (the default): the bucket's plain steps
        take the general path, :meth:`step`."""
        return None

    def describe(self) -> str:
        """A line for ``python -m esgdm.info`` (build details, versions)."""
        return ""

    def __repr__(self) -> str:
        return f"<esgdm backend {self.name!r}>"


class BuiltinBackend(Backend):
    """A backend with a row in the capability table: :meth:`why_not` reads the row,
    then :meth:`unavailable`."""

    def why_not(self, device: torch.device, dtype: torch.dtype,
                state_dtype: torch.dtype | None = None) -> str | None:
        reason = CAPABILITIES[self.name].why_not(device, dtype, state_dtype)
        return reason if reason is not None else self.unavailable(torch.device(device))

    def unavailable(self, device: torch.device) -> str | None:
        """What the table cannot say: None if this process can run the backend on
        ``device`` (a device and dtype its row covers), else why not (the extension was
        not built, Triton does not import, no GPU is visible, ...)."""
        return None


class _Missing(Backend):
    """Stands in for a backend whose module could not be imported."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def why_not(self, device, dtype):
        return self.reason


_loaded: dict[str, Backend] = {}


def get(name: str) -> Backend:
    """The backend called ``name`` (loading it on first use)."""
    if name not in _LOCATIONS:
        raise ValueError(
            f"Unknown esgdm backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}"
        )
    if name not in _loaded:
        module, attr = _LOCATIONS[name]
        try:
            _loaded[name] = getattr(importlib.import_module(module), attr)
        except Exception as e:  # noqa: BLE001 - any import failure makes it unavailable
            _loaded[name] = _Missing(name, f"{module} failed to import ({type(e).__name__}: {e})")
    return _loaded[name]


def register(backend: Backend) -> None:
    """Installs (or replaces) a backend under ``backend.name``: ``ESGDM(backend=name)``
    then steps through it, on whatever devices and dtypes its ``why_not`` accepts (its
    reasons reach the user's :class:`BackendUnavailableError`)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register() takes an esgdm.backends.Backend, got {type(backend).__name__}")
    name = str(backend.name).strip().lower()
    if not name or name == "auto" or name == Backend.name:
        raise ValueError(f"a registered backend needs a name of its own, got {backend.name!r}")
    _LOCATIONS.setdefault(name, ("", ""))
    _loaded[name] = backend
    _generation[name] = _generation.get(name, 0) + 1


#: How often each name was (re)registered: callers that remember what a backend
#: accepted key it by this, so a replaced backend is asked again.
_generation: dict[str, int] = {}


def generation(name: str) -> int:
    return _generation.get(name, 0)


def default_name() -> str:
    """The backend name used when none is given: ``$ESGDM_BACKEND`` or ``"auto"``."""
    return os.environ.get("ESGDM_BACKEND", "auto").strip().lower() or "auto"


def check_name(name: str) -> str:
    name = str(name).strip().lower()
    if name not in BACKEND_NAMES and name not in _LOCATIONS:
        raise ValueError(
            f"Invalid backend: {name!r}; choose one of {', '.join(BACKEND_NAMES)}"
        )
    return name


def capability(name: str) -> Capability | None:
    """The capability table's row of backend ``name``; None for a registered one (a
    built-in name registered again included: the new backend answers for itself)."""
    return CAPABILITIES.get(name) if not generation(name) else None


def candidates(device: torch.device) -> tuple[str, ...]:
    """What ``"auto"`` tries on ``device``, fastest first (the capability table's order)."""
    return auto_order(device.type)


def why_not(name: str, device: torch.device, dtype: torch.dtype,
            state_dtype: torch.dtype | None = None) -> str | None:
    """None if backend ``name`` can step ``dtype`` parameters (with ``state_dtype``
    state, None: any) on ``device`` here, else why not: its row of the capability
    table first, then the backend's own run-time conditions.  Raises ValueError for a
    name that is no backend."""
    backend = get(name)
    row = capability(name)
    if row is not None:
        reason = row.why_not(device, dtype, state_dtype)
        if reason is not None:
            return reason
    elif state_dtype is not None and state_dtype not in backend.state_dtypes:
        return f"it keeps {', '.join(map(str, backend.state_dtypes))} state, not {state_dtype}"
    return backend.why_not(device, dtype)


def resolve(name: str, device: torch.device, dtype: torch.dtype,
            state_dtype: torch.dtype | None = None) -> tuple[Backend, str | None]:
    """Picks the backend for one bucket (``dtype`` parameters with ``state_dtype``
    state on ``device``).

    Returns ``(backend, note)`` where ``note`` is ``None`` or, for ``"auto"``, a
    sentence saying which faster backends were skipped and why.  Raises
    :class:`BackendUnavailableError` when nothing named can run.
    """
    where = f"{dtype} parameters on {device}"
    if name != "auto":
        backend = get(name)
        reason = why_not(name, device, dtype, state_dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"esgdm backend {name!r} cannot step {where}: {reason}"
            )
        return backend, None
    skipped: list[str] = []
    for cand in candidates(device):
        backend = get(cand)
        reason = why_not(cand, device, dtype, state_dtype)
        if reason is None:
            note = None
            if skipped:
                note = (f"esgdm: for {where}, backend 'auto' is using {cand!r} because "
                        + "; ".join(skipped))
            return backend, note
        skipped.append(f"{cand!r} cannot run ({reason})")
    raise BackendUnavailableError(
        f"no esgdm backend can step {where}: " + "; ".join(skipped)
    )


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


__all__ = [
    "BACKEND_NAMES", "CAPABILITIES", "Backend", "BackendUnavailableError", "BuiltinBackend", "Capability",
    "candidates", "capability", "check_name", "default_name", "generation", "get", "register", "resolve",
    "warn_once", "why_not",
]
