"""The ``"torch"`` backend: the rule of :mod:`esgdm.rule` in plain PyTorch ops.

It runs wherever PyTorch does (any device, fp32/bf16/fp16/fp64 parameters, fp32 or
bf16 state) and is the portable fallback.  Everything stays on the device: the
per-tensor scalars are derived with tensor ops (:func:`esgdm.rule.derive`), a set
``found_inf`` turns every gradient into NaN (:func:`esgdm.rule.grad_divisor`), so the
rule's own selects keep the old values, and nothing is read back, so it too can be
captured in a CUDA graph.

The element-wise work is :func:`esgdm.rule.step_elements`, the reference's own code,
run piece by piece: pieces of :data:`CHUNK` elements on a CPU (their intermediates
stay in the caches, so memory sees each of ``p``, ``g``, ``m``, ``D`` read once and
``p``, ``m`` written once), in a few buffers allocated once per call and reused by
every piece, with every operation writing into a buffer or into the state itself
(``out=``): no temporary is allocated per operation.
"""

from __future__ import annotations

import torch

from esgdm.backends import Backend
from esgdm.rule import (
    BIAS,
    DSCALE_FLOOR,
    FLAG_EXACT,
    FLAG_STOCHASTIC_ROUNDING,
    STEPS,
    WARM,
    derive,
    floor_terms,
    grad_divisor,
    random_bits,
    step_elements,
    stochastic_round,
)

_SR_DTYPES = (torch.bfloat16, torch.float16)

#: Elements per piece at most on a CPU: 1M (4 MiB of fp32); a tensor is cut into equal
#: pieces.  Each operation on a piece costs about 2 us of host time, so pieces must not
#: be small, and the intermediates of a piece this size still stay in the caches.
CHUNK = 1 << 20
#: Elements per piece elsewhere: large enough that each operation is one big launch.
DEVICE_CHUNK = 1 << 24


def _flat(t):
    """``t``'s memory as a 1-D view (``t`` is dense): element k = memory offset k."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def torch_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
               grad_scale, found_inf, flags, seed) -> None:
    """One ESGD-M step over aligned lists (see :mod:`esgdm.backends` for the contract)."""
    n = len(params)
    if n == 0:
        return
    d_step = hvps is not None
    new_rows, co = derive(scalars, index, hparams, d_step)
    p_dtype = params[0].dtype
    math = torch.float64 if p_dtype == torch.float64 else torch.float32
    exact = bool(flags & FLAG_EXACT)
    # Per-tensor scalars as 0-d tensors in the math dtype (rounded from float64 once).
    dscale = co["dscale"].to(math)
    per = {k: co[k].to(math).unbind() for k in ("w", "beta2", "eps", "step_scale", "decay")}
    per["dscale"] = dscale.unbind()
    if not exact:  # DSCALE_FLOOR looked up per call: benchmarks/bench_train.py studies others
        terms = list(zip(*(t.unbind() for t in floor_terms(dscale, DSCALE_FLOOR))))
    sr = bool(flags & FLAG_STOCHASTIC_ROUNDING) and p_dtype in _SR_DTYPES
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    divisor = grad_divisor(grad_scale, found_inf, math)
    slots = co["slot"].unbind() if sr else None
    steps = co["steps"].unbind() if sr else None

    device = params[0].device
    chunk = min(CHUNK if device.type == "cpu" else DEVICE_CHUNK, max(p.numel() for p in params))
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def scratch(name: str, dtype: torch.dtype, size: int = 0) -> torch.Tensor:
        buf = buffers.get((name, dtype))
        if buf is None:
            buf = buffers[name, dtype] = torch.empty(chunk, dtype=dtype, device=device)
        return buf[:size]

    for i in range(n):
        flats = [_flat(params[i]), _flat(grads[i]), _flat(exp_avgs[i]), _flat(exp_avg_ds[i])]
        if d_step:
            flats.append(_flat(hvps[i]))
        total = flats[0].numel()
        piece = max(1, -(-total // -(-total // chunk))) if total else 1  # equal, at most chunk
        for start in range(0, total, piece):
            p, g, m, d, *hs = (t[start:start + piece] for t in flats)
            size = p.numel()
            p_new = step_elements(
                p, g, m, d, hs[0] if d_step else None,
                w=per["w"][i], beta2=per["beta2"][i], eps=per["eps"][i],
                step_scale=per["step_scale"][i], decay=per["decay"][i], dscale=per["dscale"][i],
                exact=exact, divisor=divisor, terms=None if exact else terms[i], math=math,
                out_p=None if sr else p, out_m=m, out_d=d if d_step else None,
                scratch=lambda name, dtype, size=size: scratch(name, dtype, size))
            if slots is not None and steps is not None:  # stochastic rounding
                r = random_bits(seed, slots[i], steps[i], size, device, start=start)
                rounded = stochastic_round(p_new, p_dtype, r)
                if skip is not None:  # rounding may change an old value's zero sign: keep p
                    rounded = torch.where(skip, p, rounded)
                p.copy_(rounded)
    slot = co["slot"]
    rows = new_rows[:, [BIAS, WARM, STEPS]]
    if skip is not None:
        rows = torch.where(skip, scalars[slot][:, [BIAS, WARM, STEPS]], rows)
    scalars[slot, BIAS] = rows[:, 0]
    scalars[slot, WARM] = rows[:, 1]
    scalars[slot, STEPS] = rows[:, 2]


class TorchBackend(Backend):
    name = "torch"

    def why_not(self, device, dtype):
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            return f"it steps float32, float64, bfloat16 and float16 parameters, not {dtype}"
        return None

    def step(self, params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
             grad_scale, found_inf, flags, seed):
        torch_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
                   grad_scale, found_inf, flags, seed)

    def describe(self):
        return "PyTorch ops, piece by piece in reused buffers; runs on every device"


BACKEND = TorchBackend()
