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


# --------------------------------------------------------------------------
# Finite differences: curvature without double backward.
#
# h = (g(θ + r·v) - g(θ)) / r           forward difference (one extra gradient)
# h = (g(θ + r·v) - g(θ - r·v)) / (2r)  central difference (two extra gradients)
#
# Error of the forward difference, per coordinate, relative to |Hv|:
#   truncation  ~ (r/2) |T[v, v]| / |Hv|     (T: third derivative of the loss)
#   rounding    ~ eps_g |g| / (r |Hv|)       (eps_g: relative error of a gradient,
#                                             at least the unit roundoff u of the dtype)
# Balancing the two gives r ∝ sqrt(u); for the central difference the truncation
# term is O(r²) and r ∝ u^(1/3).  We scale r by (1 + ||θ||) / ||v|| so that the
# perturbation r·v is a fixed fraction of the parameters' size (||v|| = sqrt(n)
# for Rademacher v), the usual choice for directional finite differences:
#
#   r = u^(1/2) (1 + ||θ||₂) / ||v||₂    forward
#   r = u^(1/3) (1 + ||θ||₂) / ||v||₂    central
#
# with u the unit roundoff of the least precise parameter dtype (2^-24 for fp32,
# 2^-8 for bf16, 2^-11 for fp16).  θ + r·v is itself rounded to the parameter dtype:
# the perturbation applied differs from r·v by at most half an ulp of θ per
# coordinate, an error of the same order as the rounding term above.  For fp32 that
# is a relative error around 1e-3 on smooth models (measured in the tests); the
# central difference is several times more accurate for one more gradient.
# --------------------------------------------------------------------------

FD_SCHEMES = ("forward", "central")


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def fd_radius(params: Sequence[Tensor], n_elements: int, scheme: str) -> float:
    """The finite-difference step r for perturbing ``params`` along a ±1 vector."""
    u = max(unit_roundoff(p.dtype) for p in params)
    theta_norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float64).cpu() for p in params])
    ).item()
    power = 0.5 if scheme == "forward" else 1.0 / 3.0
    return (u ** power) * (1.0 + theta_norm) / max(n_elements, 1) ** 0.5


class RngSnapshot:
    """The CPU and CUDA random-number states, to replay them for the probe."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class BufferGuard:
    """Restores every buffer of every module that runs forward inside the guard.

    The probe's forward pass would otherwise move BatchNorm running statistics (and
    any other buffer) a second time.  A global forward pre-hook records each module's
    buffers the first time the module runs; leaving the guard puts them back.
    """

    def __init__(self):
        self.saved: dict[int, tuple[torch.nn.Module, list[tuple[str, Tensor, Tensor]]]] = {}

    def _record(self, module, args):
        if id(module) not in self.saved:
            self.saved[id(module)] = (module, [
                (name, buf, buf.detach().clone())
                for name, buf in module._buffers.items() if buf is not None
            ])

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._record)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        with torch.no_grad():
            for module, buffers in self.saved.values():
                for name, original, value in buffers:
                    original.copy_(value)
                    module._buffers[name] = original  # undo a replacement, if any
        return False


def _probe_grads(params: Sequence[Tensor], closure, rng: RngSnapshot) -> list[Tensor]:
    """Runs ``closure`` (which must call backward) and returns fresh gradients.

    The gradients of the main evaluation have been moved out of ``.grad`` by the
    caller, so whatever zeroing the closure does, it cannot touch them.
    """
    for p in params:
        p.grad = None
    after = RngSnapshot()
    rng.restore()  # the probe sees the same dropout masks as the main evaluation
    try:
        with torch.enable_grad(), BufferGuard():
            closure()
    finally:
        after.restore()
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]


def finite_difference_hvp(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    signs: Sequence[Tensor],
    closure,
    rng: RngSnapshot,
    scheme: str = "forward",
    radius: float | None = None,
) -> list[Tensor]:
    """``H v`` from gradient differences, without double backward.

    Args:
        params: the parameters with a gradient; ``grads`` their gradients at θ.
        signs: the Rademacher vectors ``v``, shaped like ``params``.
        closure: re-evaluates the loss on the same batch and calls ``backward()``.
        rng: the random-number state from before the main evaluation.
        scheme: ``"forward"`` (one extra gradient) or ``"central"`` (two).
        radius: the step ``r``; by default :func:`fd_radius`.

    On return (and if the closure raises) every parameter holds exactly its value
    at θ and its ``.grad`` is the gradient at θ again.
    """
    if scheme not in FD_SCHEMES:
        raise ValueError(f"Invalid finite-difference scheme: {scheme!r}; choose one of {FD_SCHEMES}")
    params, grads = list(params), list(grads)
    r = radius if radius is not None else fd_radius(params, sum(p.numel() for p in params), scheme)
    with torch.no_grad():
        backup = torch._foreach_mul(params, 1.0)  # θ, bit for bit
    try:
        with torch.no_grad():
            torch._foreach_add_(params, signs, alpha=r)
        if scheme == "forward":
            signs = None  # not needed any more: free it before the probe runs
        plus = _probe_grads(params, closure, rng)
        if scheme == "forward":
            base, step = grads, r
        else:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)
                torch._foreach_add_(params, signs, alpha=-r)
            base, step = _probe_grads(params, closure, rng), 2 * r
        with torch.no_grad():
            hvps = [h.detach() for h in plus]
            torch._foreach_sub_(hvps, [b.detach() for b in base])
            torch._foreach_div_(hvps, step)
        return hvps
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, backup)
        for p, g in zip(params, grads):
            p.grad = g


__all__ = [
    "CREATE_GRAPH_HINT", "FD_SCHEMES", "BufferGuard", "RngSnapshot", "autograd_hvp", "check_graphs",
    "fd_radius", "finite_difference_hvp",
]
