"""The ``"triton"`` backend: one fused multi-tensor Triton kernel launch per bucket.

:meth:`TritonBackend.step` is the kernel behind the ``esgdm::step_`` operator
(:mod:`esgdm.ops` checks the arguments, and ``torch.compile`` traces that operator); it
calls :func:`esgdm.kernels.esgdm_step.fused_step`, which steps the whole bucket and
advances its per-tensor scalars in one launch, without reading anything back.

Where it runs: CUDA tensors whenever Triton imports (``"auto"`` picks it first there);
CPU tensors only in the Triton interpreter, i.e. when ``TRITON_INTERPRET=1`` was set
before the kernel module was imported (that is how CI tests it).  Parameter dtypes:
float32, bfloat16, float16, with float32, bfloat16 or 8-bit (uint8 codes and block
scales, :mod:`esgdm.quant`) state (arithmetic in float32).
"""

from __future__ import annotations

import torch

from esgdm import quant
from esgdm.backends import Backend
from esgdm.rule import FLAG_EXACT

#: Oldest CUDA compute capability Triton generates code for.
MIN_CAPABILITY = (7, 0)

#: Parameter and state dtypes the kernel handles (kept here too so that why_not does
#: not have to import Triton to refuse a dtype; the kernel module holds the same lists).
#: uint8: 8-bit state (esgdm.quant), with ``qscales``.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)


def _triton_error() -> str | None:
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


def _names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


class TritonBackend(Backend):
    name = "triton"

    def why_not(self, device: torch.device, dtype: torch.dtype,
                state_dtype: torch.dtype | None = None) -> str | None:
        device = torch.device(device)
        if dtype not in DTYPES:
            return f"the Triton kernel steps {_names(DTYPES)} parameters, not {dtype}"
        if state_dtype is not None and state_dtype not in STATE_DTYPES:
            return f"the Triton kernel keeps {_names(STATE_DTYPES)} state, not {state_dtype}"
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

    def step(self, params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
             grad_scale, found_inf, flags, seed, qscales=None):
        """The bucket's step (:class:`esgdm.backends.Backend`).  With uint8
        ``exp_avgs``/``exp_avg_ds`` (8-bit state, :mod:`esgdm.quant`) ``qscales`` holds
        each tensor's float32 ``[n_blocks, 2]`` block scales, and a D-step also refreshes
        the tensors' ``dscale`` from the codes (:func:`esgdm.quant.update_dscale`): the
        op must not refresh it from ``exp_avg_ds`` again."""
        if not params:
            return
        from esgdm.kernels import esgdm_step

        esgdm_step.fused_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
                              grad_scale, found_inf, flags, seed, qscales=qscales)
        if qscales is not None and hvps is not None and not int(flags) & FLAG_EXACT:
            quant.update_dscale(scalars, index[:, 0].long(), exp_avg_ds, qscales, found_inf)

    def describe(self) -> str:
        error = _triton_error()
        if error is not None:
            return error
        import triton

        from esgdm.kernels import esgdm_step

        mode = "interpreter (TRITON_INTERPRET=1)" if esgdm_step.INTERPRET else "compiled"
        config = esgdm_step.CONFIGS[torch.float32]
        return (f"Triton {triton.__version__}, {mode}; one fused kernel per bucket "
                f"(elements and per-tensor scalars), BLOCK={config['BLOCK']}, "
                f"num_warps={config['num_warps']}")


BACKEND = TritonBackend()
