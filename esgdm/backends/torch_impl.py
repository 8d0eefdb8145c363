"""The ``"torch"`` backend: the rule of :mod:`esgdm.rule` in plain PyTorch ops.

It runs wherever PyTorch does (any device, fp32/bf16/fp16/fp64 parameters, fp32 or
bf16 state) and is the portable fallback.  Everything stays on the device: the
per-tensor scalars are derived with tensor ops (:func:`esgdm.rule.derive`), a set
``found_inf`` selects the old values back instead of branching on the host, and
nothing is read back, so it too can be captured in a CUDA graph.  It is not fast: a
dozen ops per tensor; the fused kernels do it in one pass.
"""

from __future__ import annotations

import torch

from esgdm.backends import Backend
from esgdm.quant import step_through_float32
from esgdm.rule import (
    BIAS,
    DSCALE_FLOOR,
    FLAG_EXACT,
    FLAG_STOCHASTIC_ROUNDING,
    STEPS,
    WARM,
    derive,
    random_bits,
    stochastic_round,
    update_elements,
)

_SR_DTYPES = (torch.bfloat16, torch.float16)

#: Elements per piece: 256K (1 MiB of fp32) keeps a piece's temporaries near the caches.
CHUNK = 1 << 18


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
    # Per-tensor scalars as 0-d tensors in the math dtype (rounded from float64 once).
    per = {k: co[k].to(math).unbind() for k in ("w", "beta2", "eps", "step_scale", "decay", "dscale")}
    exact = bool(flags & FLAG_EXACT)
    sr = bool(flags & FLAG_STOCHASTIC_ROUNDING) and p_dtype in _SR_DTYPES
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    gs = None if grad_scale is None else grad_scale.reshape(()).to(math)
    slots = co["slot"].unbind() if sr else None
    steps = co["steps"].unbind() if sr else None
    for i in range(n):
        flats = [_flat(params[i]), _flat(grads[i]), _flat(exp_avgs[i]), _flat(exp_avg_ds[i])]
        if d_step:
            flats.append(_flat(hvps[i]))
        total = flats[0].numel()
        # Pieces of at most CHUNK elements: the temporaries stay small enough to be
        # reused from the allocator's cache and to stay warm in the CPU's caches.
        for start in range(0, total, CHUNK):
            p, g, m, d, *hs = (t[start:start + CHUNK] for t in flats)
            h = hs[0].to(math) if d_step else None
            p_new, m_new, d_new = update_elements(
                p.to(math), g.to(math), m.to(math), d.to(math), h,
                w=per["w"][i], beta2=per["beta2"][i], eps=per["eps"][i],
                step_scale=per["step_scale"][i], decay=per["decay"][i], dscale=per["dscale"][i],
                exact=exact, grad_scale=gs,
                floor=DSCALE_FLOOR)  # looked up per call: benchmarks/bench_train.py studies others
            if slots is not None and steps is not None:  # stochastic rounding
                r = random_bits(seed, slots[i], steps[i], p.numel(), p.device, start=start)
                p_new = stochastic_round(p_new, p_dtype, r)
            else:
                p_new = p_new.to(p_dtype)
            m_new = m_new.to(m.dtype)
            if skip is not None:  # found_inf: keep the old values, decided on the device
                p_new = torch.where(skip, p, p_new)
                m_new = torch.where(skip, m, m_new)
                d_new = torch.where(skip, d, d_new.to(d.dtype))
            p.copy_(p_new)
            m.copy_(m_new)
            if d_step:
                d.copy_(d_new)
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
             grad_scale, found_inf, flags, seed, qscales=None):
        if qscales is not None:  # 8-bit state: decoded to float32 around the same step
            step_through_float32(torch_step, params, grads, exp_avgs, exp_avg_ds, qscales, hvps, scalars,
                                 index, hparams, grad_scale, found_inf, flags, seed)
            return
        torch_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
                   grad_scale, found_inf, flags, seed)

    def describe(self):
        return "PyTorch ops, one tensor at a time; runs on every device"


BACKEND = TorchBackend()
