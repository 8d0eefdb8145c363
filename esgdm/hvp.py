"""Hessian-vector products with Rademacher probe vectors.

On a D-step ESGD-M needs ``h = H v`` for a random sign vector ``v``; the square of
``h`` is an unbiased estimate of ``diag(H^2)`` (the ``E[v v^T] = I`` property of
Rademacher vectors), and under a diagonal Hessian it is exact whatever the signs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from esgdm.buckets import local  # a DTensor's local shard (same storage), else the tensor
from esgdm.buckets import real_view  # a complex tensor's real view, else the tensor

CREATE_GRAPH_HINT = (
    "ESGD-M needs a Hessian-vector product on this step, so the backward pass must "
    "keep its graph: call loss.backward(create_graph=opt.should_create_graph()) "
    "before opt.step()"
)


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
)


def no_double_backward(error: BaseException) -> bool:
    """Whether ``error`` says that some op of the model has no double backward."""
    text = str(error)
    return isinstance(error, (RuntimeError, NotImplementedError)) and any(
        frag in text for frag in _NO_DOUBLE_BACKWARD)


def autograd_hvp(
    params: Sequence[Tensor], grads: Sequence[Tensor], signs: Sequence[Tensor],
    fd_available: bool = False,
) -> list[Tensor]:
    """``d/dθ Σ_p <g_p, v_p>`` in one autograd call over every parameter.

    A complex parameter is taken as its real view: its sign vector and its HVP are
    shaped like ``torch.view_as_real(p)`` (its gradient may be given either way).
    A parameter that the gradients do not depend on, or whose gradient has no graph
    (the loss is linear in it), gets a zero HVP.  The graph is retained: two
    optimizers over disjoint parts of one loss both differentiate it (it is freed
    with the gradients, at the next ``zero_grad``).
    """
    check_graphs(params, grads, fd_available)
    grads = [real_view(g) for g in grads]  # <real view of g, v>: a real scalar to differentiate
    with_graph = [k for k, g in enumerate(grads) if g.grad_fn is not None]
    hvps: list = [None] * len(params)
    with torch.enable_grad():
        found = torch.autograd.grad([grads[k] for k in with_graph], list(params),
                                    grad_outputs=[signs[k] for k in with_graph],
                                    allow_unused=True, retain_graph=True)
    for k, h in enumerate(found):
        hvps[k] = h
    return [torch.zeros_like(real_view(p)) if h is None else real_view(h) for p, h in zip(params, hvps)]


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
# dtype's and the autocast dtype's.  How the autocast state is learnt:
#   * ComputePrecision, a context manager around the main evaluation of the
#     closure: it reads the state when entered and, through a global forward
#     pre-hook, at every nn.Module call inside, and keeps the least precise
#     autocast dtype seen per device type (so autocast entered inside a model's
#     forward is seen too).  The optimizer hands it to finite_difference_hvp.
#   * As a fallback, finite_difference_hvp reads the state itself when called and
#     records it during each probe evaluation in the same way.  If a probe computes
#     in lower precision than the radius assumed, the probe is redone with the
#     radius for that precision when the sign vectors are still at hand (always for
#     the central scheme, and for the forward scheme when no ComputePrecision was
#     given), otherwise a warning is given once.
# Only nn.Module calls (and autocast already on when the step starts) are seen: a
# closure that turns autocast on and computes its loss without any module should
# pass the radius explicitly (fd_radius(..., u=unit_roundoff(torch.bfloat16))).
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


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        import warnings

        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of a floating dtype: 2^-24 for fp32, 2^-8 for bf16."""
    return torch.finfo(dtype).eps / 2


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` right now, None when it is off.

    Works with the device-type API of torch >= 2.4 (``torch.is_autocast_enabled(dt)``,
    ``torch.get_autocast_dtype(dt)``) and with the older per-device functions.
    """
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no argument, and it means CUDA
        if device_type == "cpu":
            enabled = torch.is_autocast_cpu_enabled()
        elif device_type == "cuda":
            enabled = torch.is_autocast_enabled()
        else:
            return None
    except RuntimeError:  # a device type autocast does not know
        return None
    if not enabled:
        return None
    getter = getattr(torch, "get_autocast_dtype", None)
    if getter is not None:
        return getter(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def _autocast_eligible(dtype: torch.dtype) -> bool:
    """Whether autocast may run ops on tensors of ``dtype`` in a lower precision."""
    return dtype.is_floating_point and dtype != torch.float64


def _device_type(t: Tensor) -> str:
    return t.device.type


class ComputePrecision:
    """Learns the precision a closure computes in, for the finite-difference radius.

    Use it around the main evaluation of the closure::

        with ComputePrecision() as precision:
            loss = closure()
        hvps = finite_difference_hvp(..., precision=precision)

    It records the autocast state when entered and at every ``nn.Module`` call
    inside (a global forward pre-hook), keeping per device type the least precise
    autocast dtype seen.  :meth:`unit_roundoff` then gives the ``u`` to size the
    radius with.  Reusable; each ``with`` adds to what was seen.
    """

    def __init__(self, device_types: Sequence[str] = ("cpu", "cuda")):
        self.device_types = tuple(dict.fromkeys(device_types))
        self.dtypes: dict[str, torch.dtype] = {}  # device type -> least precise autocast dtype
        self._handles: list = []  # one per open ``with`` (it may be nested)

    def record(self, *_args) -> None:
        """Reads the autocast state now (also the forward pre-hook's body)."""
        for device_type in self.device_types:
            dtype = autocast_dtype(device_type)
            if dtype is None or not dtype.is_floating_point:
                continue
            old = self.dtypes.get(device_type)
            if old is None or unit_roundoff(dtype) > unit_roundoff(old):
                self.dtypes[device_type] = dtype

    def merge(self, other: "ComputePrecision") -> None:
        for device_type, dtype in other.dtypes.items():
            old = self.dtypes.get(device_type)
            if old is None or unit_roundoff(dtype) > unit_roundoff(old):
                self.dtypes[device_type] = dtype

    def __enter__(self) -> "ComputePrecision":
        self.record()
        self._handles.append(torch.nn.modules.module.register_module_forward_pre_hook(self.record))
        return self

    def __exit__(self, *exc) -> bool:
        self._handles.pop().remove()
        return False

    def __getstate__(self) -> dict:  # picklable (an optimizer may hold one): no hook handles
        return {"device_types": self.device_types, "dtypes": dict(self.dtypes), "_handles": []}

    def unit_roundoff(self, params: Sequence[Tensor]) -> float:
        """``u`` for finite differences over ``params``: the largest unit roundoff of
        their dtypes and, for autocast-eligible ones, of the autocast dtype seen on
        their device type."""
        u = 0.0
        for p in params:
            u = max(u, unit_roundoff(p.dtype))
            if _autocast_eligible(p.dtype):
                dtype = self.dtypes.get(_device_type(p))
                if dtype is not None:
                    u = max(u, unit_roundoff(dtype))
        return u if u > 0 else unit_roundoff(torch.float32)


def _local_and_reduction(p: Tensor):
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
                    norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in ts]
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


def _all_reduce(value: Tensor, key) -> Tensor:
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
        local, key = _local_and_reduction(p)
        groups.setdefault((local.device, key), []).append(local)
    if not groups:
        return 0.0
    keys = list(groups)
    sums = [_all_reduce(_sums_of_squares(groups[k], robust=False), k[1]) for k in keys]
    values = torch.stack([s.to("cpu") for s in sums]).tolist()
    total = 0.0
    for k, value in zip(keys, values):
        if not (value < float("inf")):  # Inf, NaN (or an overflow): finite entries only
            # the condition holds on every rank alike: the value was all-reduced
            both = _all_reduce(_sums_of_squares(groups[k], robust=True), k[1]).tolist()
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


def _probe_grads(
    params: Sequence[Tensor], closure, rng: RngSnapshot, precision: ComputePrecision | None = None
) -> list[Tensor]:
    """Runs ``closure`` (which must call backward) and returns fresh gradients.

    The gradients of the main evaluation have been moved out of ``.grad`` by the
    caller, so whatever zeroing the closure does, it cannot touch them.  The
    precision the closure computes in is recorded into ``precision`` if given.
    """
    for p in params:
        p.grad = None
    after = RngSnapshot()
    rng.restore()  # the probe sees the same dropout masks as the main evaluation
    # Inside an enclosing autocast region, autocast caches its low-precision copies
    # of the parameters (keyed by tensor, blind to in-place changes): drop them, or
    # the probe would compute with the copies of θ and see no perturbation at all.
    torch.clear_autocast_cache()
    try:
        with torch.enable_grad(), BufferGuard():
            if precision is None:
                closure()
            else:
                with precision:
                    closure()
    finally:
        after.restore()
    return [real_view(torch.zeros_like(p) if p.grad is None else p.grad) for p in params]


def finite_difference_hvp(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    signs: Sequence[Tensor],
    closure,
    rng: RngSnapshot,
    scheme: str = "forward",
    radius: float | None = None,
    precision: ComputePrecision | None = None,
) -> list[Tensor]:
    """``H v`` from gradient differences, without double backward.

    Args:
        params: the parameters with a gradient (plain tensors or DTensors, e.g.
            FSDP2's; always the parameters themselves, whose ``.grad`` the closure
            sets, not views of them); ``grads`` their gradients at θ.
        signs: the Rademacher vectors ``v``, shaped like ``params`` (for a DTensor
            parameter: a DTensor like it, or its local shard's part of ``v``; for a
            complex parameter: like its real view, which is what is perturbed, and
            what its HVP, the radius's ``||θ||`` and ``n`` are taken over).
        closure: re-evaluates the loss on the same batch and calls ``backward()``.
        rng: the random-number state from before the main evaluation.
        scheme: ``"forward"`` (one extra gradient) or ``"central"`` (two).
        radius: the step ``r``; by default :func:`fd_radius`, with the compute
            precision from ``precision`` and from what the probe itself sees.
        precision: a :class:`ComputePrecision` that was around the main evaluation.

    Returns the HVPs as the closure's gradients come (DTensors for DTensor
    parameters).  With DTensor parameters every rank must call it alike (the radius
    is all-reduced).  On return (and if the closure raises) every parameter holds
    exactly its value at θ and its ``.grad`` is the gradient at θ again.
    """
    if scheme not in FD_SCHEMES:
        raise ValueError(f"Invalid finite-difference scheme: {scheme!r}; choose one of {FD_SCHEMES}")
    params, grads = list(params), list(grads)
    reals = [real_view(p) for p in params]  # what is perturbed (complex: as the real view)
    seen = ComputePrecision(device_types=("cpu", "cuda", *(_device_type(p) for p in params)))
    seen.record()  # the autocast state around this call
    if precision is not None:
        seen.merge(precision)
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
    with torch.no_grad():
        backup = torch._foreach_mul(shards, 1.0)  # θ, bit for bit
    try:
        while True:
            with torch.no_grad():
                torch._foreach_add_(shards, [local(v) for v in signs], alpha=r)
            if not keep_signs:
                signs = None  # not needed any more: free it before the probe runs
            plus = _probe_grads(params, closure, rng, seen)
            if radius is not None or seen.unit_roundoff(reals) <= u:
                break
            u = seen.unit_roundoff(reals)  # the probe computes less precisely than assumed
            if signs is None:
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
            signs = None
            base, step = grads, r
        else:
            with torch.no_grad():
                torch._foreach_copy_(shards, backup)
                torch._foreach_add_(shards, [local(v) for v in signs], alpha=-r)
            signs = None
            base, step = _probe_grads(params, closure, rng, seen), 2 * r
        with torch.no_grad():
            hvps = [h.detach() for h in plus]
            out = [local(h) for h in hvps]  # the same storage as hvps
            torch._foreach_sub_(out, [real_view(local(b.detach())) for b in base])
            torch._foreach_div_(out, step)
        return hvps
    finally:
        with torch.no_grad():
            torch._foreach_copy_(shards, backup)
        torch.clear_autocast_cache()  # no cached copy of a perturbed parameter outlives the probe
        for p, g in zip(params, grads):
            p.grad = g


__all__ = [
    "CREATE_GRAPH_HINT", "FD_SCHEMES", "BufferGuard", "RngSnapshot", "autograd_hvp", "check_graphs",
    "fd_radius", "finite_difference_hvp",
    "ComputePrecision", "autocast_dtype", "param_norm", "unit_roundoff",
]
