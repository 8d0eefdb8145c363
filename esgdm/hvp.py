"""Hessian-vector products with Rademacher probe vectors.

On a D-step ESGD-M needs ``h = H v`` for a random sign vector ``v``; the square of
``h`` is an unbiased estimate of ``diag(H^2)`` (the ``E[v v^T] = I`` property of
Rademacher vectors), and under a diagonal Hessian it is exact whatever the signs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

CREATE_GRAPH_HINT = (
    "ESGD-M needs a Hessian-vector product on this step, so the backward pass must "
    "keep its graph: call loss.backward(create_graph=opt.should_create_graph()) "
    "before opt.step()"
)


def check_graphs(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Raises if a gradient carries no autograd graph (backward ran without create_graph)."""
    for p, g in zip(params, grads):
        if g.grad_fn is None:
            raise RuntimeError(
                f"the gradient of a parameter of shape {tuple(p.shape)} has no grad_fn. "
                + CREATE_GRAPH_HINT
            )


def autograd_hvp(
    params: Sequence[Tensor], grads: Sequence[Tensor], signs: Sequence[Tensor]
) -> list[Tensor]:
    """``d/dθ Σ_p <g_p, v_p>`` in one autograd call over every parameter.

    A parameter that the gradients do not depend on gets a zero HVP.
    """
    check_graphs(params, grads)
    with torch.enable_grad():
        hvps = torch.autograd.grad(grads, params, grad_outputs=signs, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, hvps)]


__all__ = ["CREATE_GRAPH_HINT", "autograd_hvp", "check_graphs"]
