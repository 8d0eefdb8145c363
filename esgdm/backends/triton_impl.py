"""The ``"triton"`` backend: one fused multi-tensor Triton kernel launch per bucket.

The step goes through the ``torch.ops.esgdm.triton_step_`` operator (:mod:`esgdm.ops`)
so that ``torch.compile`` sees one opaque, in-place op; the operator launches the
kernel of :mod:`esgdm.kernels.esgdm_step`.

Where it runs: CUDA tensors whenever Triton imports (``"auto"`` picks it first there);
CPU tensors only in the Triton interpreter, i.e. when ``TRITON_INTERPRET=1`` was set
before the kernel module was imported (that is how CI tests it).  Parameter dtypes:
float32, bfloat16, float16 (state and arithmetic in float32).
"""

from __future__ import annotations

from typing import Optional

import torch

from esgdm.backends import Backend
from esgdm.ops import TRITON_DTYPES

#: Oldest CUDA compute capability Triton generates code for.
MIN_CAPABILITY = (7, 0)


def _is_compiling() -> bool:
    """True while torch.compile (Dynamo) traces this call."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return bool(getattr(torch._dynamo, "is_compiling", lambda: False)())


def _triton_error() -> Optional[str]:
    """None if Triton and the kernel module import, else why not (one clause)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means no Triton
        return f"Triton is not importable ({type(e).__name__}: {e})"
    try:
        from esgdm.kernels import esgdm_step  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"the Triton kernel module failed to import ({type(e).__name__}: {e})"
    return None


class TritonBackend(Backend):
    name = "triton"

    def why_not(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        device = torch.device(device)
        if dtype not in TRITON_DTYPES:
            return (f"the Triton kernel steps float32, bfloat16 and float16 parameters, "
                    f"not {dtype}")
        if device.type not in ("cuda", "cpu"):
            return f"the Triton kernel runs on CUDA devices, not {device.type}"
        error = _triton_error()
        if error is not None:
            return error
        from esgdm.kernels import esgdm_step

        if device.type == "cpu":
            if not esgdm_step.INTERPRET:
                return ("CPU tensors run only in the Triton interpreter, and TRITON_INTERPRET=1 "
                        "was not set before esgdm's Triton kernels were imported")
            return None
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if esgdm_step.INTERPRET:
            return ("esgdm's Triton kernels were imported in interpreter mode (TRITON_INTERPRET=1), "
                    "which steps CPU tensors only")
        if torch.version.hip is None:
            capability = torch.cuda.get_device_capability(device)
            if capability < MIN_CAPABILITY:
                return (f"{torch.cuda.get_device_name(device)} has compute capability "
                        f"{capability[0]}.{capability[1]}; Triton needs "
                        f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
        return None

    def step(self, params, grads, exp_avgs, exp_avg_ds, hvps, scalars):
        if not params:
            return
        if _is_compiling():
            # torch.compile traces the operator (schema + fake implementation).
            torch.ops.esgdm.triton_step_(params, grads, exp_avgs, exp_avg_ds, hvps, scalars)
        else:
            # Eager: the front-end has already arranged the inputs as the backend contract
            # says, so skip the dispatcher's boxing of five tensor lists and the operator's
            # per-tensor checks (together ~1 ms per step for 200 tensors on a slow host).
            from esgdm.kernels import esgdm_step

            esgdm_step.fused_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars)

    def describe(self) -> str:
        error = _triton_error()
        if error is not None:
            return error
        import triton
        from esgdm.kernels import esgdm_step

        mode = "interpreter (TRITON_INTERPRET=1)" if esgdm_step.INTERPRET else "compiled"
        config = esgdm_step.CONFIGS[torch.float32]
        return (f"Triton {triton.__version__}, {mode}; one fused kernel per bucket, "
                f"BLOCK={config['BLOCK']}, num_warps={config['num_warps']}")


# Importing esgdm.ops defines torch.ops.esgdm.triton_step_.
import esgdm.ops  # noqa: E402,F401

BACKEND = TritonBackend()
