"""Hessian-vector products with Rademacher probe vectors.

On a D-step ESGD-M needs ``h = H v`` for a random sign vector ``v``; the square of
``h`` is an unbiased estimate of ``diag(H^2)`` (the ``E[v v^T] = I`` property of
Rademacher vectors), and under a diagonal Hessian it is exact whatever the signs.

Two ways: :func:`autograd_hvp` (double backward) and :func:`finite_difference_hvp`
(gradient differences, with the radius :func:`fd_radius`).  What the probe must leave
as it found it (random state, buffers, other threads' draws) is :mod:`esgdm.guards`;
the precision a closure computes in, which sizes the radius, is :mod:`esgdm.precision`.
Which one a step uses, and with which signs, is :mod:`esgdm.curvature`'s decision.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from esgdm.buckets import (
    local,  # a DTensor's local shard (same storage), else the tensor
    overlaps,  # whether elements of a tensor share memory (expanded)
    real_view,  # a complex tensor's real view, else the tensor
)
from esgdm.guards import (  # re-exported: the probe's guards have been importable from here
    GENERATORS,
    BufferGuard,
    ModuleTrees,
    RngSnapshot,
    drain_at_exit,
    in_process_group,
    module_trees,
)
from esgdm.precision import ComputePrecision, autocast_dtype, unit_roundoff

CREATE_GRAPH_HINT = (
    "ESGD-M needs a Hessian-vector product on this step, so the backward pass must "
    "keep its graph: call loss.backward(create_graph=opt.should_create_graph()) "
    "before opt.step()"
)


def trainer_hint() -> str:
    """A sentence naming esgdm's integration for each trainer whose package is loaded: in
    a trainer, its loop (not the user's) calls backward and step, so the user cannot write
    what the messages above ask for."""
    found = [what for module, what in (
        ("transformers", "a transformers Trainer, use esgdm.integrations.transformers.ESGDMTrainer"),
        ("lightning", "Lightning, esgdm.integrations.lightning"),
        ("pytorch_lightning", "Lightning, esgdm.integrations.lightning"),
    ) if module in sys.modules]
    return f" With {'; with '.join(dict.fromkeys(found))} (see the README's Trainers)." if found else ""


def check_graphs(params: Sequence[Tensor], grads: Sequence[Tensor], fd_available: bool = False) -> None:
    """Raises if no gradient carries an autograd graph (backward ran without
    create_graph).  A gradient without a graph next to others that have one is
    fine: the loss is linear in that parameter (a critic's last bias, a frozen
    parameter's kept zero gradient), so its HVP is zero."""
    if any(g.grad_fn is not None for g in grads):
        return
    shape = tuple(params[0].shape) if params else ()
    raise RuntimeError(
        f"no gradient carries an autograd graph (e.g. the parameter of shape {shape}). "
        + CREATE_GRAPH_HINT
        + ("" if fd_available else
           "; or construct ESGDM(..., hvp='finite_difference') and call opt.step(closure)")
    )


#: Fragments of the errors autograd raises for an op without a double backward.
_NO_DOUBLE_BACKWARD = (
    "derivative for", "is not implemented", "does not support double backward",
    "double backward", "not differentiable twice", "only supports first-order",
    "differentiate twice",  # @once_differentiable's own error, should autograd ever run it
)

#: Class names of the autograd nodes that raise when a double backward runs them.
#: ``@once_differentiable`` aliases its outputs through ``DelayedError``, whose outputs get an
#: ``Error`` node with edges only to detached copies: no path from it reaches a parameter, so
#: ``autograd.grad`` never runs it and takes what lies behind it as 0 (None).  (torch's
#: ``NotImplemented`` nodes keep their edges to the op's inputs: autograd runs and raises them.)
_RAISING_NODES = frozenset({"Error", "DelayedError"})


def no_double_backward(error: BaseException) -> bool:
    """Whether ``error`` says that some op of the model has no double backward."""
    text = str(error)
    return isinstance(error, (RuntimeError, NotImplementedError)) and any(
        frag in text for frag in _NO_DOUBLE_BACKWARD)


def data_parallel_refused(error: BaseException) -> bool:
    """Whether ``error`` is what ``DistributedDataParallel``'s reducer raises when a
    backward keeps the graph of the gradients it copies into its buckets (in-place on a
    leaf that requires grad).  torch says no more than that, so the message is read only
    while a process group exists."""
    return (isinstance(error, RuntimeError) and "leaf Variable that requires grad is being used in an "
            "in-place operation" in str(error) and in_process_group())


#: What to do when DistributedDataParallel refuses ``backward(create_graph=True)``.
DATA_PARALLEL_HINT = (
    "DistributedDataParallel cannot run backward(create_graph=True) (its reducer copies the "
    "gradients in place), so it has no double backward: take curvature by finite differences, "
    "ESGDM(..., hvp='finite_difference') or hvp='auto' with opt.step(closure), and a closure that "
    "calls loss.backward() without create_graph")


def create_graph_failed(error: BaseException) -> bool:
    """Whether ``error``, raised by ``backward(create_graph=True)`` itself, says that this
    model cannot keep a graph of its gradients (a torch.compile'd backward with donated
    buffers), or that an op has no double backward.  (Not DistributedDataParallel's
    refusal, :func:`data_parallel_refused`: its reducer cannot run another backward
    after it, so the closure cannot be run again.)"""
    return no_double_backward(error) or (
        isinstance(error, RuntimeError) and "donated buffer" in str(error))


def autograd_hvp(
    params: Sequence[Tensor], grads: Sequence[Tensor], signs: Sequence[Tensor],
    fd_available: bool = False, look_for_cuts: bool = False,
) -> list[Tensor]:
    """``d/dθ Σ_p <g_p, v_p>`` in one autograd call over every parameter.

    A complex parameter is taken as its real view: its sign vector and its HVP are
    shaped like ``torch.view_as_real(p)`` (its gradient may be given either way).
    A parameter that the gradients do not depend on, or whose gradient has no graph
    (the loss is linear in it), gets a zero HVP.  Where a parameter whose gradient
    has a graph gets none, and the gradients' graphs hold an op without a double
    backward (``@once_differentiable``: autograd cannot see what lies behind it), it
    raises RuntimeError, as autograd does for such ops (``hvp="auto"`` then falls back
    to finite differences).  ``look_for_cuts``: look for such ops even where every
    parameter got a product (one that hides only part of a parameter's curvature; a
    walk over the whole graph, which the optimizer takes on its first curvature step).
    A parameter's gradient hooks (``p.register_hook``) shaped the gradient once, and
    the graph of ``g`` holds them: they are paused while it is differentiated, so that
    ``h`` is the derivative of the gradient the step uses (as finite differences of it
    are), not that hooked once more.  The graph is retained: two
    optimizers over disjoint parts of one loss both differentiate it (it is freed
    with the gradients, at the next ``zero_grad``).
    """
    check_graphs(params, grads, fd_available)
    grads = [real_view(g) for g in grads]  # <real view of g, v>: a real scalar to differentiate
    with_graph = [k for k, g in enumerate(grads) if g.grad_fn is not None]
    hvps: list = [None] * len(params)
    with torch.enable_grad(), _gradient_hooks_paused(params):
        found = torch.autograd.grad([grads[k] for k in with_graph], list(params),
                                    grad_outputs=[signs[k] for k in with_graph],
                                    allow_unused=True, retain_graph=True)
    for k, h in enumerate(found):
        hvps[k] = h
    # None is 0 when no gradient depends on that parameter, and also when the dependence
    # runs through an op without a double backward (cut): only then look for the cut.
    if look_for_cuts or any(h is None and grads[k].grad_fn is not None for k, h in enumerate(hvps)):
        raise_if_cut([grads[k] for k in with_graph])
    if look_for_cuts:
        warn_if_some_lack_a_graph(params, grads)
    return [torch.zeros_like(real_view(p)) if h is None else real_view(h) for p, h in zip(params, hvps)]


@contextlib.contextmanager
def _gradient_hooks_paused(params: Sequence[Tensor]) -> Iterator[None]:
    """The hooks of ``p.register_hook`` off for the body: autograd runs a leaf's hooks on
    every gradient it computes for it, the Hessian-vector product's too.  torch keeps
    them in ``p._backward_hooks``, which it reads when it runs them."""
    paused = []
    for p in params:
        hooks = getattr(p, "_backward_hooks", None)
        if hooks:
            paused.append((hooks, list(hooks.items())))
            hooks.clear()
    try:
        yield
    finally:
        for hooks, items in paused:
            hooks.update(items)


def graph_cut(grads: Sequence[Tensor]) -> str | None:
    """The name of a node in the graphs of ``grads`` that raises when run (see
    ``_RAISING_NODES``), or None.  Each node is visited once (the walk is linear in
    the size of the graph), iteratively."""
    seen: set[Any] = set()
    stack: list[Any] = [g.grad_fn for g in grads]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in _RAISING_NODES:
            return str(node.name())
        stack.extend(nxt for nxt, _ in node.next_functions)
    return None


def warn_if_some_lack_a_graph(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Warns when some gradients carry no graph while others do.  Autograd takes the
    former's curvature as 0: right for a loss linear in them, wrong where an op without a
    double backward that leaves no node behind (a loss written as an autograd.Function
    whose backward is ``@once_differentiable``) stands between them and the loss."""
    bare = [k for k, g in enumerate(grads) if g.grad_fn is None and g.numel() > 0]
    if bare and len(bare) < sum(g.numel() > 0 for g in grads):
        warn_user(
            f"esgdm: the gradients of {len(bare)} of {len(grads)} parameters (the first of shape "
            f"{tuple(params[bare[0]].shape)}) carry no graph although the others' do: autograd takes their "
            "curvature as 0. That is right if the loss is linear in them; if an op without a double "
            "backward stands between them and the loss (e.g. a loss written as a torch.autograd.Function "
            "whose backward is @once_differentiable), take curvature by finite differences: "
            "hvp='finite_difference', or hvp='auto' with opt.step(closure)")


def raise_if_cut(grads: Sequence[Tensor]) -> None:
    """Raises the RuntimeError autograd would if the graphs of ``grads`` hold an op without
    a double backward, whose part of the Hessian-vector product autograd silently drops."""
    node = graph_cut(grads)
    if node is not None:
        raise RuntimeError(
            f"an operation of the model has no double backward (autograd node {node}, e.g. from a "
            "custom torch.autograd.Function whose backward is marked @once_differentiable): autograd "
            "would take its part of the curvature as 0.\n"  # (the optimizer's messages quote line 1)
            "Take the Hessian-vector product by finite differences: ESGDM(..., hvp='finite_difference') "
            "or hvp='auto', with opt.step(closure).")


# --------------------------------------------------------------------------
# Finite differences: curvature without double backward.
#
# h = (g(θ + r·v) - g(θ)) / r           forward difference (one extra gradient)
# h = (g(θ + r·v) - g(θ - r·v)) / (2r)  central difference (two extra gradients)
#
# Error of the forward difference, per coordinate, relative to |Hv|:
#   truncation  ~ (r/2) |T[v, v]| / |Hv|     (T: third derivative of the loss)
#   rounding    ~ eps_g |g| / (r |Hv|)       (eps_g: relative error of a gradient,
#                                             at least the unit roundoff u of the
#                                             precision the gradient is computed in)
# Balancing the two gives r ∝ sqrt(u); for the central difference the truncation
# term is O(r²) and r ∝ u^(1/3).  We scale r by (1 + ||θ||) / ||v|| so that the
# perturbation r·v is a fixed fraction of the parameters' size (||v|| = sqrt(n)
# for Rademacher v), the usual choice for directional finite differences:
#
#   r = u^(1/2) (1 + ||θ||₂) / ||v||₂    forward
#   r = u^(1/3) (1 + ||θ||₂) / ||v||₂    central
#
# Which u.  The gradient is only as precise as the arithmetic that produced it,
# so u is the unit roundoff of the least precise *compute* dtype, not just of the
# parameters' dtype (2^-24 for fp32, 2^-8 for bf16, 2^-11 for fp16).  The two
# differ under autocast: fp32 parameters whose forward and backward run in bf16
# give gradients with bf16's error, and a radius sized for fp32 (r ~ 1e-5) then
# divides bf16 noise by a tiny step (relative error of h 6 to 9, training stalls
# or diverges).
# Autocast casts float32 (never float64) inputs, so for a float32, fp16 or bf16
# parameter on a device where autocast is on, u is the larger of the parameter
# dtype's and the autocast dtype's.  How the compute precision is learnt:
#   * ComputePrecision, a context manager around the main evaluation of the
#     closure: it reads the autocast state when entered and, through saved-tensor
#     hooks (torch.autograd.graph.saved_tensors_hooks, which are thread-local),
#     the dtype of every floating tensor below float32 that an op saves for
#     backward inside, keeping the least precise one per device type.  Under autocast the matmuls and
#     convolutions save their low-precision inputs, so autocast entered inside
#     the closure or inside a model's forward, compiled or not, is seen too.  The
#     hooks wrap whatever saved-tensor hooks were active (save_on_cpu, ...), so
#     those keep working.  The optimizer hands it to finite_difference_hvp.
#   * As a fallback, finite_difference_hvp reads the state itself when called and
#     records it during each probe evaluation in the same way.  If a probe computes
#     in lower precision than the radius assumed, the probe is redone with the
#     radius for that precision when the sign vectors are still at hand (always for
#     the central scheme, and for the forward scheme when no ComputePrecision was
#     given), otherwise a warning is given once.
# What is not seen: a region whose saved tensors another pair of hooks packs
# (inside torch.utils.checkpoint) and, after torch.func refused the hooks (its
# transforms raise when any are active: the evaluation is then rerun without
# them, once), everything but autocast already on when the step starts.  A closure
# that computes in low precision only there should pass the radius explicitly
# (fd_radius(..., u=unit_roundoff(torch.bfloat16))).
#
# Autocast keeps a cache of its low-precision copies of the parameters for as long
# as the outermost autocast region lasts (keyed by tensor, not by value): when the
# step runs inside such a region, the probe would reuse the copies of θ and see no
# perturbation (h = 0).  The cache is cleared before every probe and after θ is
# restored.
#
# θ + r·v is itself rounded to the parameter dtype (and, under autocast, to the
# compute dtype inside each cast op): the perturbation applied differs from r·v by
# at most half an ulp of θ per coordinate, an error of the same order as the
# rounding term above.  Measured on the test MLP, relative error of h against the
# fp32 autograd HVP: around 1e-3 (forward) for fp32; under CPU bf16 autocast 0.09
# (forward) and 0.025 (central), with this u near the best radius for both schemes;
# under CUDA autocast (H200) 0.10 / 0.03 for bf16 and 0.03 / 0.007 for fp16.
#
# ||θ|| is taken over the finite entries only: one Inf or NaN in a parameter would
# otherwise make the radius Inf/NaN and every h with it (a warning is given once).
# For DTensor parameters (FSDP2's fully_shard, tensor parallelism) ||θ|| and n are
# global: each rank sums the squares of its local shard and the sums are
# all-reduced over the mesh dimensions the tensor is sharded on, so every rank gets
# the radius a single process holding the whole tensors would.  The reduction is
# one stacked computation per device and dtype and a single host read (squares are
# summed in float64, so ||θ|| is exact up to about 1e154).
# --------------------------------------------------------------------------

FD_SCHEMES = ("forward", "central")

_warned: set[str] = set()  # the warnings given once per process
_warn_lock = threading.Lock()


_INTERNAL = tuple(os.path.dirname(str(m.__file__)) + os.sep for m in (torch, sys.modules[__package__]))


def warn_user(message: str, category: type = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside esgdm and torch."""
    import warnings

    level, frame = 1, sys._getframe(1)
    frame_or_none: Any = frame
    while frame_or_none is not None and frame_or_none.f_code.co_filename.startswith(_INTERNAL):
        frame_or_none, level = frame_or_none.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)  # (1 would be this function)


def _warn_once(key: str, message: str) -> None:
    with _warn_lock:  # once, even when two threads get here together
        if key in _warned:
            return
        _warned.add(key)
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)



def local_and_reduction(p: Tensor):
    """(the tensor whose squares this process sums, the reduction key).

    The key is None for a plain tensor, else (mesh, mesh dims to sum over): the
    mesh dimensions on which a DTensor is not replicated.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return p, None
    if not isinstance(p, DTensor):
        return p, None
    if any(pl.is_partial() for pl in p.placements):  # a pending sum: make it whole first
        from torch.distributed.tensor import Replicate

        p = p.redistribute(p.device_mesh, [Replicate() if pl.is_partial() else pl for pl in p.placements])
    dims = tuple(i for i, pl in enumerate(p.placements) if not pl.is_replicate())
    return p.to_local(), ((p.device_mesh, dims) if dims else None)


def _sums_of_squares(tensors: Sequence[Tensor], robust: bool) -> Tensor:
    """Σ x² over ``tensors`` (all on one device), in float64, on that device.

    Fast: one fused norm per dtype.  Robust: finite entries only, scaled per tensor
    so that no finite value overflows; also counts the non-finite entries.
    """
    device = tensors[0].device
    if not robust:
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t.detach())
        parts = []
        for dtype, ts in by_dtype.items():
            if torch.finfo(dtype).bits >= 32:
                norms = torch._foreach_norm(ts, 2)  # (with dtype= it syncs on CUDA, torch 2.11)
            else:  # 16-bit: a float32 result, as a norm over 65504 is Inf in fp16
                try:
                    norms = torch._foreach_norm(ts, 2, dtype=torch.float32)
                except (TypeError, RuntimeError):  # a torch without the dtype argument
                    norms = tuple(torch.linalg.vector_norm(t, dtype=torch.float32) for t in ts)
            parts.append(torch.stack(norms).to(torch.float64).square().sum())
        return torch.stack(parts).sum()
    total = torch.zeros((), dtype=torch.float64, device=device)
    bad = torch.zeros((), dtype=torch.int64, device=device)
    for t in tensors:
        t = t.detach()
        if t.numel() == 0:
            continue
        finite = torch.isfinite(t)
        bad += (~finite).sum()
        x = torch.where(finite, t, 0).to(torch.float64)
        scale = x.abs().amax()
        scale = torch.where(scale > 0, scale, 1.0)
        total += scale.square() * (x / scale).square().sum()
    return torch.stack([total, bad.to(torch.float64)])


def all_reduce(value: Tensor, key) -> Tensor:
    if key is not None:
        import torch.distributed as dist

        mesh, dims = key
        for d in dims:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
    return value


def param_norm(params: Sequence[Tensor]) -> float:
    """``||θ||₂`` over the finite entries of ``params``; global for DTensors.

    With DTensor parameters every rank must call it, with the parameters in the
    same order (it all-reduces over their meshes).  One host read in the usual case;
    a second pass (and warning, once) only when some entry is not finite.
    """
    groups: dict = {}  # (device, reduction key) -> local tensors; insertion order is
    for p in params:   # the parameters' order, the same on every rank
        local, key = local_and_reduction(p)
        groups.setdefault((local.device, key), []).append(local)
    if not groups:
        return 0.0
    keys = list(groups)
    sums = [all_reduce(_sums_of_squares(groups[k], robust=False), k[1]) for k in keys]
    values = torch.stack([s.to("cpu") for s in sums]).tolist()
    total = 0.0
    for k, value in zip(keys, values):
        if not (value < float("inf")):  # Inf, NaN (or an overflow): finite entries only
            # the condition holds on every rank alike: the value was all-reduced
            both = all_reduce(_sums_of_squares(groups[k], robust=True), k[1]).tolist()
            value, bad = both
            if bad:
                _warn_once("nonfinite", (
                    "finite differences: some parameters hold Inf or NaN; the probe radius is "
                    "computed from the finite entries only"))
        total += value
    return total ** 0.5


def fd_radius(
    params: Sequence[Tensor], n_elements: int | None = None, scheme: str = "forward",
    u: float | None = None, theta_norm: float | None = None,
) -> float:
    """The finite-difference step r for perturbing ``params`` along a ±1 vector.

    Args:
        params: the perturbed parameters (DTensors allowed: then ``||θ||`` and the
            default ``n_elements`` are those of the whole tensors, on every rank).
        n_elements: the length of the ±1 vector; by default ``Σ numel``.
        scheme: ``"forward"`` or ``"central"``.
        u: the unit roundoff of the precision the gradients are computed in, e.g.
            from :class:`ComputePrecision`; by default that of the parameters' dtypes
            and of autocast if it is on at the call.
        theta_norm: ``||θ||₂`` if already known (else :func:`param_norm`).
    """
    params = list(params)
    if n_elements is None:
        n_elements = sum(p.numel() for p in params)
    if u is None:
        now = ComputePrecision()
        now.record()
        u = now.unit_roundoff(params)
    if theta_norm is None:
        theta_norm = param_norm(params)
    power = 0.5 if scheme == "forward" else 1.0 / 3.0
    return (u ** power) * (1.0 + theta_norm) / max(n_elements, 1) ** 0.5



def _probe_grads(
    params: Sequence[Tensor], closure, rng: RngSnapshot | None, precision: ComputePrecision,
    modules: Sequence[torch.nn.Module],
) -> list[Tensor]:
    """Runs ``closure`` (which must call backward) and returns fresh gradients.

    The gradients of the main evaluation have been moved out of ``.grad`` by the
    caller, so whatever zeroing the closure does, it cannot touch them.  The
    precision the closure computes in is recorded into ``precision``.  The random
    state of the main evaluation is replayed only if it drew anything.
    """
    after = RngSnapshot()
    replay = rng is not None and not after.same(rng)
    try:
        for attempt in (0, 1):
            for p in params:
                p.grad = None
            if replay and rng is not None:
                rng.restore()  # the probe sees the same dropout masks as the main evaluation
            elif attempt:
                after.restore()
            # Inside an enclosing autocast region, autocast caches its low-precision copies
            # of the parameters (keyed by tensor, blind to in-place changes): drop them, or
            # the probe would compute with the copies of θ and see no perturbation at all.
            torch.clear_autocast_cache()
            try:
                with torch.enable_grad(), BufferGuard(modules), precision:
                    closure()
                break
            except RuntimeError as e:
                if attempt or not precision.refused_by(e):
                    raise
    finally:
        if replay or not RngSnapshot().same(after):
            after.restore()  # the stream goes on as if the probe had not happened
    return [real_view(torch.zeros_like(p) if p.grad is None else p.grad) for p in params]


def finite_difference_hvp(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    signs: Sequence[Tensor] | Any,
    closure,
    rng: RngSnapshot,
    scheme: str = "forward",
    radius: float | None = None,
    precision: ComputePrecision | None = None,
    modules: Sequence[torch.nn.Module] | None = None,
) -> list[Tensor]:
    """``H v`` from gradient differences, without double backward.

    Args:
        params: the parameters with a gradient (plain tensors or DTensors, e.g.
            FSDP2's; always the parameters themselves, whose ``.grad`` the closure
            sets, not views of them); ``grads`` their gradients at θ.
        signs: the Rademacher vectors ``v`` (or an object that adds them itself:
            ``fused(shards)`` and ``add_to(shards, alpha, backups)``, as
            :class:`esgdm.curvature.SignVectors`), shaped like ``params`` (for a DTensor
            parameter: a DTensor like it, or its local shard's part of ``v``; for a
            complex parameter: like its real view, which is what is perturbed, and
            what its HVP, the radius's ``||θ||`` and ``n`` are taken over).
        closure: re-evaluates the loss on the same batch and calls ``backward()``.
        rng: the random-number state from before the main evaluation (replayed
            only if the main evaluation drew random numbers); None: no replay.
        scheme: ``"forward"`` (one extra gradient) or ``"central"`` (two).
        radius: the step ``r``; by default :func:`fd_radius`, with the compute
            precision from ``precision`` and from what the probe itself sees.
        precision: a :class:`ComputePrecision` that was around the main evaluation.
        modules: the modules whose buffers the probe must leave as they were; by
            default :func:`module_trees` of ``params``.

    Returns the HVPs as the closure's gradients come (DTensors for DTensor
    parameters).  With DTensor parameters every rank must call it alike (the radius
    is all-reduced).  On return (and if the closure raises) every parameter holds
    exactly its value at θ and its ``.grad`` is the gradient at θ again.
    """
    if scheme not in FD_SCHEMES:
        raise ValueError(f"Invalid finite-difference scheme: {scheme!r}; choose one of {FD_SCHEMES}")
    params, grads = list(params), list(grads)
    # signs: tensors, or an object that adds alpha * v to the shards itself (add_to,
    # esgdm.curvature.SignVectors: drawn in the same pass, never materialised)
    lazy = hasattr(signs, "add_to")
    held: Any = signs if lazy else list(signs)  # dropped (None) as soon as no longer needed
    del signs  # (held is then the only reference: dropping it frees the signs)
    reals = [real_view(p) for p in params]  # what is perturbed (complex: as the real view)
    seen = ComputePrecision(device_types=("cpu", "cuda", *(p.device.type for p in params)),
                            watch_saves=precision is None or precision.watch_saves)
    seen.record()  # the autocast state around this call
    if precision is not None:
        seen.merge(precision)
    if modules is None:
        modules = module_trees(params)
    if in_process_group():
        drain_at_exit()
    if radius is None:
        theta_norm = param_norm(reals)
        n = sum(p.numel() for p in reals)
        u = seen.unit_roundoff(reals)
        r = fd_radius(reals, n, scheme, u=u, theta_norm=theta_norm)
    else:
        r = radius
    # The forward scheme frees the signs before its probe, unless a redo with a
    # radius for a lower precision than expected may need them.
    keep_signs = scheme == "central" or (radius is None and precision is None)
    shards = [real_view(local(p)) for p in params]  # in-place arithmetic on what this rank holds

    saved = False  # whether backup holds θ (then the finally below restores it)

    def add_signs(alpha: float, backups: list[Tensor] | None = None) -> None:
        """shards += alpha * v, first copying them into backups when given (in the same
        pass where the signs are drawn as they are added: esgdm._C.add_signs_, which
        checks everything before it writes anything)."""
        nonlocal saved
        assert held is not None  # kept while a redo may need them (keep_signs)
        fused = lazy and backups is not None and held.fused(shards)
        if backups is not None and not fused:
            torch._foreach_copy_(backups, shards)
            saved, backups = True, None
        if lazy:
            held.add_to(shards, alpha, backups)
        else:
            torch._foreach_add_(shards, [local(v) for v in held], alpha=alpha)
        if fused:
            saved = True

    with torch.no_grad():
        backup = [torch.empty_like(s) for s in shards]  # θ, bit for bit
    try:
        while True:
            with torch.no_grad():
                add_signs(r, None if saved else backup)
            if not keep_signs:
                held = None  # not needed any more: free it before the probe runs
            plus = _probe_grads(params, closure, rng, seen, modules)
            if radius is not None or seen.unit_roundoff(reals) <= u:
                break
            u = seen.unit_roundoff(reals)  # the probe computes less precisely than assumed
            if held is None:
                _warn_once("precision", (
                    "finite differences: the probe computed in a lower precision (autocast) "
                    "than the main evaluation showed; this step's curvature used a radius "
                    "sized for the higher precision"))
                break
            r = fd_radius(reals, n, scheme, u=u, theta_norm=theta_norm)
            del plus
            with torch.no_grad():
                torch._foreach_copy_(shards, backup)
        if scheme == "forward":
            held = None
            base, step = grads, r
        else:
            with torch.no_grad():
                torch._foreach_copy_(shards, backup)
                add_signs(-r)  # (the central scheme keeps the signs)
            held = None
            base, step = _probe_grads(params, closure, rng, seen, modules), 2 * r
        with torch.no_grad():
            # (a gradient the closure set as an expanded tensor cannot be written in place)
            hvps = [h.detach().clone() if overlaps(local(h)) else h.detach() for h in plus]
            out = [local(h) for h in hvps]  # the same storage as hvps
            torch._foreach_sub_(out, [real_view(local(b.detach())) for b in base])
            torch._foreach_div_(out, step)
        return hvps
    finally:
        if saved:  # (a first add that raised wrote nothing: its checks come first)
            with torch.no_grad():
                torch._foreach_copy_(shards, backup)
        torch.clear_autocast_cache()  # no cached copy of a perturbed parameter outlives the probe
        for p, g in zip(params, grads):
            p.grad = g


__all__ = [
    "CREATE_GRAPH_HINT", "FD_SCHEMES", "GENERATORS", "BufferGuard", "ModuleTrees", "RngSnapshot", "all_reduce",
    "local_and_reduction",
    "DATA_PARALLEL_HINT", "trainer_hint", "autograd_hvp", "check_graphs", "graph_cut", "create_graph_failed",
    "data_parallel_refused", "fd_radius", "finite_difference_hvp",
    "ComputePrecision", "autocast_dtype", "module_trees", "param_norm", "unit_roundoff", "warn_user",
]
