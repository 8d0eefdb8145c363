"""The baseline: ESGD-M as a per-parameter Python loop, the way the original was built.

The original ``esgd.ESGD`` walks the parameters one by one and runs a handful of
small in-place PyTorch ops on each, so a step launches several kernels per tensor.
This module rebuilds that shape of implementation from the update rule (esgdm/rule.py) so
the benchmarks can show what the fused backends save.  It is a correct ESGD-M (the
smoke test checks it against ``tests/reference.py`` and the ``"torch"`` backend);
unlike the original it keeps its state in float32 for low-precision parameters, as
the spec asks, so it upcasts each bf16 tensor on the way in and rounds on the way out.

Two entry points:

* :class:`LoopESGDM`, a whole ``torch.optim.Optimizer`` (HVP and schedule included);
* :func:`loop_step`, the element-wise part only, with the backend contract of
  ``esgdm.backends`` (aligned lists plus the ``[n, 5]`` scalar table), so that the
  kernel-level benchmark rows time the same work for every implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer


def update_one(p: Tensor, g: Tensor, m: Tensor, d: Tensor, h: Tensor | None,
               beta1: float, beta2: float, eps: float, step_scale: float, decay: float) -> None:
    """The element-wise rule on one tensor, in small in-place ops (one launch each).

    ``m`` and ``d`` are the float32 (or float64) state; ``p``, ``g`` and ``h`` may be
    in a lower precision and are widened here.
    """
    work = m.dtype
    g = g.to(work)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    if h is not None:
        h = h.to(work)
        torch.maximum(d.mul_(beta2), h * h, out=d)
    mhat = torch.lerp(m, g, 1 - beta1)  # Nesterov look-ahead
    denom = d.sqrt().add_(eps)
    x = p if p.dtype == work else p.to(work)
    if decay != 1.0:
        x.mul_(decay)
    x.addcdiv_(mhat, denom, value=-step_scale)
    if x is not p:
        p.copy_(x)


def loop_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_ds: Sequence[Tensor], hvps: Sequence[Tensor] | None,
              scalars: Tensor) -> None:
    """One element-wise step over aligned lists, one tensor at a time.

    Same contract as ``esgdm.backends.get(name).step``; columns of ``scalars`` are
    ``beta1, beta2, eps, step_scale, decay``.
    """
    rows = scalars.tolist()
    for i, (p, g, m, d) in enumerate(zip(params, grads, exp_avgs, exp_avg_ds)):
        b1, b2, eps, scale, decay = rows[i]
        update_one(p, g, m, d, None if hvps is None else hvps[i], b1, b2, eps, scale, decay)


def rademacher(p: Tensor) -> Tensor:
    """+1/-1 with probability 1/2 each, shaped like ``p``."""
    return torch.randint(0, 2, p.shape, device=p.device).to(p.dtype).mul_(2).sub_(1)


class LoopESGDM(Optimizer):
    """ESGD-M with per-parameter state tensors and a per-parameter update loop.

    Hyper-parameters and the D-step schedule are those of ``esgdm.ESGDM`` (and of the
    spec).  State keys are the original implementation's: ``exp_avg``, ``exp_avg_d``,
    ``exp_avg_bias_corr``, ``lr_warmup_cumprod``.

    Args:
        signs: optional ``callable(param) -> tensor`` of Rademacher entries, so a
            test can feed the same probe vectors to two implementations.
    """

    def __init__(self, params, lr=1.0, betas=(0.9, 0.999), lr_warmup=0.99, eps=1e-4,
                 weight_decay=0.0, update_d_every=10, d_warmup=20,
                 signs: Callable[[Tensor], Tensor] | None = None):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid lr: {lr!r} (must be >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] <= 1.0):
            raise ValueError(f"Invalid betas: {betas!r}")
        if not 0.0 <= lr_warmup < 1.0:
            raise ValueError(f"Invalid lr_warmup: {lr_warmup!r} (must be in [0, 1))")
        if update_d_every < 1 or d_warmup < 1:
            raise ValueError(f"Invalid update_d_every/d_warmup: {update_d_every!r}/{d_warmup!r}")
        defaults = dict(lr=lr, betas=betas, lr_warmup=lr_warmup, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.update_d_every = update_d_every
        self.d_warmup = d_warmup
        self.steps = 0
        self.steps_since_d = 0
        self.signs = signs or rademacher

    def should_create_graph(self) -> bool:
        return self.steps < self.d_warmup or self.steps_since_d >= self.update_d_every

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        d_step = self.should_create_graph()
        active = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        hvps = {}
        if d_step and active:
            vs = [self.signs(p) for p in active]
            with torch.enable_grad():
                hs = torch.autograd.grad([p.grad for p in active], active, grad_outputs=vs,
                                         allow_unused=True)
            hvps = {p: (torch.zeros_like(p) if h is None else h) for p, h in zip(active, hs)}
            self.steps_since_d = 0

        for group in self.param_groups:
            lr = float(group["lr"])
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    work = torch.float64 if p.dtype == torch.float64 else torch.float32
                    state["exp_avg"] = torch.zeros(p.shape, dtype=work, device=p.device)
                    state["exp_avg_d"] = torch.zeros(p.shape, dtype=work, device=p.device)
                    state["exp_avg_bias_corr"] = 1.0
                    state["lr_warmup_cumprod"] = 1.0
                state["exp_avg_bias_corr"] *= b1
                if d_step:
                    state["lr_warmup_cumprod"] *= group["lr_warmup"]
                alpha = lr * (1 - state["lr_warmup_cumprod"])
                c = 1 - state["exp_avg_bias_corr"] * b1
                update_one(p, p.grad.detach(), state["exp_avg"], state["exp_avg_d"],
                           hvps.get(p), b1, b2, group["eps"], alpha / c,
                           1 - group["weight_decay"] * alpha)
        self.steps += 1
        self.steps_since_d += 1
        return loss


__all__ = ["LoopESGDM", "loop_step", "rademacher", "update_one"]
