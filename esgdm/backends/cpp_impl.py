"""The ``"cpu"`` and ``"cuda"`` backends: the compiled extension ``esgdm._C``.

``esgdm._C.step`` (sources under ``csrc/``) is the kernel behind the ``esgdm::step_``
operator (:mod:`esgdm.ops`) for these two backends: a one-pass CPU kernel, parallel
over ATen's threads, and, when the extension was built with CUDA, a multi-tensor-apply
CUDA kernel that steps a whole bucket in one launch (plus one tiny launch that advances
the per-tensor scalars), reading everything it needs -- the per-tensor scalars,
``grad_scale``, ``found_inf`` -- from device memory and its address table from a cache,
so that it neither synchronises with the host nor copies anything to the device in
steady state (a CUDA graph can capture it).  Both share the rule of
:mod:`esgdm.rule`, written once in ``csrc/esgdm_update.h``.  The extension defines no
dispatcher operator of its own.

This module always imports.  If the extension is missing (not built, or built against
another torch) both backends say so through :meth:`Backend.why_not`, so that ``auto``
warns once and uses the next backend, and asking for them by name raises.  Which
devices and dtypes they step is their rows of the capability table
(:mod:`esgdm.backends.capabilities`).
"""

from __future__ import annotations

import importlib

import torch

from esgdm.backends import BuiltinBackend

EXTENSION = "esgdm._C"

_SEED_MASK = 0xFFFFFFFF


def load_extension(name: str = EXTENSION):
    """Imports the extension; returns ``(module, None)`` or ``(None, reason)``."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            return None, f"{name} failed to load ({type(e).__name__}: {e})"
        return None, (
            f"{name} was not built (install with `pip install --no-build-isolation -e .` "
            "after installing torch; ESGDM_BUILD_EXTENSION=0 skips it on purpose)"
        )
    except (ImportError, OSError) as e:
        return None, (
            f"{name} failed to load ({type(e).__name__}: {e}); it was probably built against "
            f"another torch than {torch.__version__}: reinstall esgdm to rebuild it"
        )
    if not callable(getattr(module, "step", None)):
        return None, (f"{name} is out of date (it has no step function): reinstall esgdm "
                      "to rebuild it")
    return module, None


_C, LOAD_ERROR = load_extension()


def build_info() -> dict | None:
    """What the extension was compiled with (``None`` if it is not loaded)."""
    return None if _C is None else dict(_C.build_info())


def cuda_archs(info: dict | None = None) -> list[str]:
    """Architectures in the extension, e.g. ``['sm_75', 'sm_80', 'sm_90', 'compute_90']``."""
    info = build_info() if info is None else info
    if not info or not info.get("cuda"):
        return []
    return [a for a in info.get("cuda_archs", "").split("+") if a]


def runs_on(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether a kernel built for ``archs`` can run on a GPU of ``capability``.

    A cubin ``sm_XY`` runs on devices of the same major version and a minor version of
    at least Y (``sm_XYa`` only on XY itself); PTX ``compute_XY`` is compiled by the
    driver for any device of capability XY or newer.
    """
    major, minor = capability
    for arch in archs:
        kind, _, num = arch.partition("_")
        specific = num.endswith(("a", "f"))
        digits = num.rstrip("af")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm":
            if a_major == major and (a_minor == minor if specific else a_minor <= minor):
                return True
        elif kind == "compute" and not specific and (a_major, a_minor) <= (major, minor):
            return True
    return False


def _step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
          grad_scale, found_inf, flags, seed, qscales=None) -> None:
    # Only the low 32 bits of the seed key the rounding: masked here so that any
    # Python int fits the extension's int64 argument.
    # With uint8 state (8-bit, esgdm.quant) qscales holds the block scales.
    _C.step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
            grad_scale, found_inf, int(flags), int(seed) & _SEED_MASK,
            None if qscales is None else list(qscales))


class _CompiledBackend(BuiltinBackend):
    steps_in_plan = True  # (esgdm._C.StepPlan calls the same kernels)

    def unavailable(self, device: torch.device) -> str | None:
        return LOAD_ERROR if _C is None else None

    def step(self, params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
             grad_scale, found_inf, flags, seed, qscales=None):
        """The bucket's step (:class:`esgdm.backends.Backend`).  With uint8
        ``exp_avgs``/``exp_avg_ds`` (8-bit state, :mod:`esgdm.quant`) ``qscales`` holds
        each tensor's float32 ``[n_blocks, 2]`` block scales, updated in place (D's on
        D-steps only); the op refreshes ``dscale`` from the codes afterwards."""
        _step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
              grad_scale, found_inf, flags, seed, qscales)


class CpuBackend(_CompiledBackend):
    """One pass per tensor on CPU, parallel over ``torch.get_num_threads()`` threads."""

    name = "cpu"

    def describe(self):
        info = build_info()
        if info is None:
            return LOAD_ERROR
        threads = "OpenMP" if info["openmp"] else "one thread (built without OpenMP)"
        return (f"{EXTENSION} C++ kernel: {info['cpu_isa']}, {threads}, "
                f"compiled by {info['compiler']}")


if _C is not None and hasattr(torch.ops.esgdm, "step_flat_cpu_"):  # (defined by the extension)
    from esgdm import ops as _ops

    _ops.register_fake_of(_ops.FLAT_CPU_OP_NAME)
    CpuBackend.plain_flat_op = _ops.FLAT_CPU_OP_NAME


class CudaBackend(_CompiledBackend):
    """Multi-tensor apply: one CUDA kernel launch per bucket, on the current stream."""

    name = "cuda"

    def unavailable(self, device):
        reason = super().unavailable(device)
        if reason is not None:
            return reason
        info = build_info() or {}
        if not info.get("cuda"):
            return (f"{EXTENSION} was built without its CUDA kernel (it needs a CUDA build of "
                    "torch and nvcc at install time, and ESGDM_BUILD_CUDA not set to 0)")
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        capability = torch.cuda.get_device_capability(device)
        archs = cuda_archs(info)
        if not runs_on(archs, capability):
            return (f"{EXTENSION} was built for {', '.join(archs)}, which cannot run on this "
                    f"sm_{capability[0]}{capability[1]} GPU: reinstall with "
                    f"TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}")
        return None

    def describe(self):
        info = build_info()
        if info is None:
            return LOAD_ERROR
        if not info["cuda"]:
            return f"{EXTENSION} was built without its CUDA kernel"
        return (f"{EXTENSION} CUDA kernel for {', '.join(cuda_archs(info))} "
                f"(CUDA {info['cuda_version']})")


CPU_BACKEND = CpuBackend()
CUDA_BACKEND = CudaBackend()

__all__ = ["CPU_BACKEND", "CUDA_BACKEND", "build_info", "cuda_archs", "load_extension", "runs_on"]
