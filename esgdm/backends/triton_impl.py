"""The ``"triton"`` backend: one fused multi-tensor Triton kernel launch per bucket.

:meth:`TritonBackend.step` is the kernel behind the ``esgdm::step_`` operator
(:mod:`esgdm.ops` checks the arguments, and ``torch.compile`` traces that operator); it
calls :func:`esgdm.kernels.esgdm_step.fused_step`, which steps the whole bucket and
advances its per-tensor scalars in one launch, without reading anything back.

Where it runs (its row of :mod:`esgdm.backends.capabilities`): CUDA tensors whenever
Triton imports (``"auto"`` picks it first there); CPU tensors only in the Triton
interpreter, i.e. when ``TRITON_INTERPRET=1`` was set before the kernel module was
imported (that is how CI tests it).  Parameter dtypes: float32, bfloat16, float16, with
float32, bfloat16 or 8-bit state (uint8 codes and block scales, :mod:`esgdm.quant`;
arithmetic in float32).
"""

from __future__ import annotations

import torch

from esgdm.backends import BuiltinBackend

#: Oldest CUDA compute capability Triton generates code for.
MIN_CAPABILITY = (7, 0)


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


class TritonBackend(BuiltinBackend):
    name = "triton"

    def unavailable(self, device: torch.device) -> str | None:
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
        each tensor's float32 ``[n_blocks, 2]`` block scales, updated in place (D's on
        D-steps only); the op refreshes ``dscale`` from the codes afterwards."""
        if not params:
            return
        from esgdm.kernels import esgdm_step

        esgdm_step.fused_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
                              grad_scale, found_inf, flags, seed, qscales=qscales)

    def plain_step_launcher(self, params, exp_avgs, exp_avg_ds, qscales, scalars, index):
        """The bucket's plain steps as one launch over its own address table, whose
        gradient columns the step plan fills (:meth:`esgdm.backends.Backend.plain_step_launcher`)."""
        return PlainStepLauncher(params, exp_avgs, exp_avg_ds, qscales, scalars, index)

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


class PlainStepLauncher:
    """One bucket's plain step for ``esgdm._C.StepPlan``: the plan checks the gradients
    and writes their addresses into :attr:`table`; a call launches the kernel over it,
    with the configuration :func:`~esgdm.kernels.esgdm_step.fused_step` would choose (the
    same launch, bit for bit)."""

    def __init__(self, params, exp_avgs, exp_avg_ds, qscales, scalars, index):
        from esgdm.kernels import esgdm_step

        self._kernels = esgdm_step
        self._tables, self.host = esgdm_step.plain_step_tables(params, exp_avgs, exp_avg_ds, qscales)
        self.table = self._tables.table
        self.grad_columns = (esgdm_step.G_COL, esgdm_step.H_COL)
        self._device = params[0].device
        self._refs = (params[0], exp_avgs[0])  # (only their dtypes are read)
        self._scalars, self._index = scalars, index

    def __call__(self, hparams, grad_scale, found_inf, flags: int, seed: int) -> None:
        k, t = self._kernels, self._tables
        with k.on_device(self._device):
            k.launch(t.blocks, t.table, t.tickets, *self._refs, self._index, self._scalars, hparams,
                     grad_scale, found_inf, False, flags, seed, t.block, t.num_warps)


BACKEND = TritonBackend()
