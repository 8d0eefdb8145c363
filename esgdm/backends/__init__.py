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
* ``exp_avgs``/``exp_avg_ds`` are float32 or bfloat16 (float64 for float64
  parameters), the rest are in the parameters' dtype; the fused backends ("triton",
  "cuda", "cpu") also take uint8 codes (8-bit state, :mod:`esgdm.quant`) for float32,
  bfloat16 and float16 parameters, with a trailing ``qscales=`` list of each tensor's
  float32 ``[n_blocks, 2]`` block scales, and then refresh ``dscale`` themselves on
  D-steps (from the codes);
* ``scalars``, ``index``, ``hparams``, ``grad_scale``, ``found_inf`` are on the
  parameters' device (see :mod:`esgdm.ops`).

Backends are loaded lazily.  A backend that cannot run somewhere says why in one
sentence (:meth:`Backend.why_not`); asking for it by name there raises
:class:`BackendUnavailableError` with those reasons, and ``"auto"`` moves to the next
candidate with a one-time warning.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

#: Names accepted by ``ESGDM(backend=...)`` and the ``ESGDM_BACKEND`` variable.
BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "torch")

#: Candidates that ``"auto"`` tries, fastest first, per device type.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
_AUTO_DEFAULT = ("torch",)

#: Where each backend lives: module path and the attribute holding the Backend.
_LOCATIONS = {
    "torch": ("esgdm.backends.torch_impl", "BACKEND"),
    "triton": ("esgdm.backends.triton_impl", "BACKEND"),
    "cuda": ("esgdm.backends.cpp_impl", "CUDA_BACKEND"),
    "cpu": ("esgdm.backends.cpp_impl", "CPU_BACKEND"),
}


class BackendUnavailableError(RuntimeError):
    """Raised when the backend asked for cannot step a bucket; lists every reason."""


class Backend:
    """One implementation of the element-wise step.

    Subclasses set :attr:`name`, implement :meth:`why_not` and :meth:`step`.
    """

    name: str = "?"

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
    ) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """A line for ``python -m esgdm.info`` (build details, versions)."""
        return ""

    def __repr__(self) -> str:
        return f"<esgdm backend {self.name!r}>"


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


def candidates(device: torch.device) -> tuple[str, ...]:
    return AUTO_ORDER.get(device.type, _AUTO_DEFAULT)


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Backend, str | None]:
    """Picks the backend for one bucket.

    Returns ``(backend, note)`` where ``note`` is ``None`` or, for ``"auto"``, a
    sentence saying which faster backends were skipped and why.  Raises
    :class:`BackendUnavailableError` when nothing named can run.
    """
    where = f"{dtype} parameters on {device}"
    if name != "auto":
        backend = get(name)
        reason = backend.why_not(device, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"esgdm backend {name!r} cannot step {where}: {reason}"
            )
        return backend, None
    skipped: list[str] = []
    for cand in candidates(device):
        backend = get(cand)
        reason = backend.why_not(device, dtype)
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
    "AUTO_ORDER", "BACKEND_NAMES", "Backend", "BackendUnavailableError", "candidates",
    "check_name", "default_name", "get", "register", "resolve", "warn_once",
]
