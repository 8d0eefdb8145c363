"""The ``"torch"`` backend: the element-wise step in plain PyTorch foreach ops.

It runs wherever PyTorch does (any device, any floating dtype) and is the reference
the fused kernels are tested against.  The rule is the one in :mod:`esgdm.rule`;
here it costs five passes over memory on a plain step (six with weight decay):
``lerp_`` into ``m``, the look-ahead ``mhat``, ``sqrt(D)``, ``+ eps``, and one
``addcdiv_`` into ``p``.  Tensors are processed in chunks so that the two
temporaries never exceed :data:`CHUNK_ELEMENTS` elements each.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from esgdm.backends import Backend
from esgdm.rule import BETA1, BETA2, EPS, SCALAR_COLUMNS, STEP_SCALE, DECAY

#: Upper bound on the elements held by each temporary (mhat, denominator) at once.
CHUNK_ELEMENTS = 1 << 25


def _chunks(sizes: Sequence[int], limit: int = CHUNK_ELEMENTS):
    """Splits ``range(len(sizes))`` into runs whose sizes add up to at most ``limit``
    (a single tensor larger than ``limit`` gets a run of its own)."""
    start, total = 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > limit:
            yield range(start, i)
            start, total = i, 0
        total += n
    if start < len(sizes):
        yield range(start, len(sizes))


def _step_same_betas(ps, gs, ms, ds, hs, beta1, beta2, eps, scales, decays):
    """The element-wise rule for tensors that share (beta1, beta2, eps)."""
    torch._foreach_lerp_(ms, gs, 1 - beta1)  # m <- b1*m + (1-b1)*g
    if hs is not None:
        h2 = torch._foreach_mul(hs, hs)
        torch._foreach_mul_(ds, beta2)
        torch._foreach_maximum_(ds, h2)  # D <- max(b2*D, h*h)
        del h2
    mhat = torch._foreach_lerp(ms, gs, 1 - beta1)  # Nesterov look-ahead
    denom = torch._foreach_sqrt(ds)
    torch._foreach_add_(denom, eps)
    if any(d != 1.0 for d in decays):
        torch._foreach_mul_(ps, decays)  # decoupled weight decay
    torch._foreach_addcdiv_(ps, mhat, denom, [-s for s in scales])


def torch_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_ds: Sequence[Tensor],
    hvps: Optional[Sequence[Tensor]],
    scalars: Tensor,
) -> None:
    """One ESGD-M step over aligned lists (see :mod:`esgdm.backends` for the contract)."""
    if not params:
        return
    assert scalars.shape == (len(params), len(SCALAR_COLUMNS)), scalars.shape
    rows = scalars.tolist()
    state_dtype = exp_avgs[0].dtype
    # Tensors sharing (beta1, beta2, eps) -- usually all of them -- go through foreach
    # together; the per-tensor step size and decay ride along as scalar lists.
    by_betas: dict[tuple[float, float, float], list[int]] = {}
    for i, row in enumerate(rows):
        by_betas.setdefault((row[BETA1], row[BETA2], row[EPS]), []).append(i)
    for (beta1, beta2, eps), members in by_betas.items():
        for run in _chunks([params[i].numel() for i in members]):
            idx = [members[j] for j in run]
            ps = [params[i] for i in idx]
            low_precision = ps[0].dtype != state_dtype
            if low_precision:  # fp32 math on copies, rounded back once at the end
                work = [p.to(state_dtype) for p in ps]
                gs = [grads[i].to(state_dtype) for i in idx]
                hs = None if hvps is None else [hvps[i].to(state_dtype) for i in idx]
            else:
                work = ps
                gs = [grads[i] for i in idx]
                hs = None if hvps is None else [hvps[i] for i in idx]
            _step_same_betas(
                work, gs, [exp_avgs[i] for i in idx], [exp_avg_ds[i] for i in idx], hs,
                beta1, beta2, eps,
                [rows[i][STEP_SCALE] for i in idx], [rows[i][DECAY] for i in idx],
            )
            if low_precision:
                for p, w in zip(ps, work):
                    p.copy_(w)


class TorchBackend(Backend):
    name = "torch"

    def why_not(self, device, dtype):
        if not dtype.is_floating_point:
            return f"parameters must be floating point, got {dtype}"
        return None

    def step(self, params, grads, exp_avgs, exp_avg_ds, hvps, scalars):
        torch_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars)

    def describe(self):
        return "PyTorch foreach ops; runs on every device"


BACKEND = TorchBackend()
