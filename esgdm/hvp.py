"""Hessian-vector products with Rademacher probe vectors.

On a D-step ESGD-M needs ``h = H v`` for a random sign vector ``v``; the square of
``h`` is an unbiased estimate of ``diag(H^2)`` (the ``E[v v^T] = I`` property of
Rademacher vectors), and under a diagonal Hessian it is exact whatever the signs.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor

from esgdm.buckets import (
    local,  # a DTensor's local shard (same storage), else the tensor
    real_view,  # a complex tensor's real view, else the tensor
)

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


def create_graph_failed(error: BaseException) -> bool:
    """Whether ``error``, raised by ``backward(create_graph=True)`` itself, says that this
    model cannot keep a graph of its gradients (a torch.compile'd backward with donated
    buffers), or that an op has no double backward."""
    return no_double_backward(error) or (
        isinstance(error, RuntimeError) and "donated buffer" in str(error))


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
_thread = threading.local()  # per-thread state (the ComputePrecision objects open)


_INTERNAL = tuple(os.path.dirname(str(m.__file__)) + os.sep for m in (torch, sys.modules[__package__]))


def warn_user(message: str, category: type = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside esgdm and torch."""
    import warnings

    level, frame = 1, sys._getframe(1)
    frame_or_none: Any = frame
    while frame_or_none is not None and frame_or_none.f_code.co_filename.startswith(_INTERNAL):
        frame_or_none, level = frame_or_none.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _warn_once(key: str, message: str) -> None:
    with _warn_lock:  # once, even when two threads get here together
        if key in _warned:
            return
        _warned.add(key)
    import warnings

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


def _open_precisions() -> list:
    """The ComputePrecision objects open (entered, not yet left) in this thread."""
    stack = getattr(_thread, "precisions", None)
    if stack is None:
        stack = _thread.precisions = []
    return stack


def _outer_saved_tensor_hooks():
    """The saved-tensor hooks active now: None when there are none, False when this
    torch cannot tell (then none of ours are installed, so as not to hide them)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False
    try:
        return top(False)
    except TypeError:  # torch before the ignore_is_tracing argument
        return top()


def _unpack(t: Tensor) -> Tensor:
    return t


class ComputePrecision:
    """Learns the precision a closure computes in, for the finite-difference radius.

    Use it around the main evaluation of the closure::

        with ComputePrecision() as precision:
            loss = closure()
        hvps = finite_difference_hvp(..., precision=precision)

    It records the autocast state when entered and, through saved-tensor hooks
    (thread-local, so other threads and torch.compile never see them), the dtype of
    every floating tensor below float32 saved for backward inside, keeping per device
    type the least precise dtype seen.  :meth:`unit_roundoff` then gives the ``u`` to size the
    radius with.  Reusable; each ``with`` adds to what was seen.

    ``watch_saves=False`` (or :meth:`refused_by` having seen torch.func refuse the
    hooks) leaves the saved tensors alone: only the autocast state at entry counts.
    """

    def __init__(self, device_types: Sequence[str] = ("cpu", "cuda"), watch_saves: bool = True):
        self.device_types = tuple(dict.fromkeys(device_types))
        self.dtypes: dict[str, torch.dtype] = {}  # device type -> least precise compute dtype
        self.watch_saves = watch_saves
        self._hooks: list = []  # one per open ``with`` (it may be nested): the hooks pushed, or None

    def _note(self, device_type: str, dtype: torch.dtype) -> None:
        old = self.dtypes.get(device_type)
        if old is None or unit_roundoff(dtype) > unit_roundoff(old):
            self.dtypes[device_type] = dtype

    def record(self, *_args) -> None:
        """Reads the autocast state now."""
        for device_type in self.device_types:
            dtype = autocast_dtype(device_type)
            if dtype is not None and dtype.is_floating_point:
                self._note(device_type, dtype)

    def merge(self, other: ComputePrecision) -> None:
        for device_type, dtype in other.dtypes.items():
            self._note(device_type, dtype)

    def replay(self) -> None:
        """Adds what this one saw to every ComputePrecision open in this thread (for a
        closure whose gradients were computed before the optimizer asked for them)."""
        for open_one in _open_precisions():
            if open_one is not self:
                open_one.merge(self)

    def _hooks_for(self, outer):
        outer_pack = outer[0] if outer else None

        def pack(t):
            if t.is_floating_point() and t.dtype.itemsize < 4:  # lower than float32: 16 bits or less
                self._note(t.device.type, t.dtype)
            return t.detach() if outer_pack is None else outer_pack(t)

        return torch.autograd.graph.saved_tensors_hooks(pack, outer[1] if outer else _unpack)

    def __enter__(self) -> ComputePrecision:
        self.record()
        hooks = None
        if self.watch_saves:
            outer = _outer_saved_tensor_hooks()
            if outer is not False:
                hooks = self._hooks_for(outer)
                try:
                    hooks.__enter__()
                except RuntimeError:  # hooks are disabled here (inside a torch.func transform)
                    hooks = None
        self._hooks.append(hooks)
        _open_precisions().append(self)
        return self

    def __exit__(self, *exc) -> Literal[False]:
        stack = _open_precisions()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is self:
                del stack[i]
                break
        hooks = self._hooks.pop()
        if hooks is not None:
            hooks.__exit__(*exc)
        return False

    def refused_by(self, error: BaseException) -> bool:
        """Whether ``error`` is torch.func refusing saved-tensor hooks while these were
        on; if so they stay off from now on (the caller reruns the evaluation)."""
        if self.watch_saves and isinstance(error, RuntimeError) and "saved tensor hooks" in str(error):
            self.watch_saves = False
            return True
        return False

    def __getstate__(self) -> dict:  # picklable (an optimizer may hold one): no open hooks
        return {"device_types": self.device_types, "dtypes": dict(self.dtypes),
                "watch_saves": self.watch_saves, "_hooks": []}

    def unit_roundoff(self, params: Sequence[Tensor]) -> float:
        """``u`` for finite differences over ``params``: the largest unit roundoff of
        their dtypes and, for autocast-eligible ones, of the compute dtype seen on
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


# --------------------------------------------------------------------------
# Threads and torch.compile.
#
# Nothing of the probe is visible outside the thread that runs it, except
# through torch's own generators, which are process-wide:
#   * The compute precision is learnt through saved-tensor hooks, which are
#     thread-local (above), not through global nn.Module hooks: those ran for the
#     modules of every thread, and Dynamo traced them into compiled models (and
#     failed: "... is already tracked for mutation").
#   * Buffers (BatchNorm running statistics, ...) are put back from outside the
#     model: the buffers of every module of the module trees that hold the
#     parameters are copied before the probe and copied back after it (all of them:
#     eager BatchNorm updates its running statistics without bumping their version
#     counters, so versions cannot tell which moved).  The trees are found by
#     scanning the live nn.Module objects once (module_trees; the optimizer caches
#     the roots per parameter set and walks them again at each probe).  Compiled
#     models update the same buffer tensors in place, so they are covered too; a
#     global forward hook saw only eager module calls.  Trade-off: a
#     buffer outside those trees (a loss module with a buffer and no parameters) is
#     not restored, and a model put in a common container with another thread's
#     model shares a tree with it, whose buffers the probe then copies back too
#     (give each thread its own root module).
#   * Random numbers.  The probe must draw what the main evaluation drew (dropout
#     masks), and torch's CPU generator and each CUDA device's generator are shared
#     by all threads: there is no per-thread random state to fork.  So:
#       - The generators are left alone when the main evaluation drew nothing (the
#         states before and after it are equal): models without randomness never
#         see a generator move or rewind.
#       - Otherwise the probe rewinds them to the state before the main evaluation
#         and puts back the state after it (torch.random.fork_rng semantics: the
#         probe's draws never advance the stream).  While it runs, a thread that
#         draws from the same generator would get replayed numbers and shift the
#         probe's masks, so ESGDM orders the evaluations of its closures with
#         GENERATORS, a reader-writer lock: a D-step that may rewind holds it
#         exclusively from before the main evaluation to after the probe, every
#         other closure evaluation holds it shared.  Optimizers in different
#         threads thus never see each other's rewinds, and every probe replays
#         exactly the draws of its own main evaluation.  Draws made outside
#         ESGDM.step (a forward before a closure-less step, data sampling) are
#         ordered only if that code holds the lock shared
#         (``with GENERATORS.hold(exclusive=False): ...``); otherwise they may fall
#         inside a D-step: they then get replayed numbers, shift the probe's masks,
#         and (as the states before and after the main evaluation differ) make the
#         probe rewind even for a model that draws nothing.  Which thread gets
#         which numbers of a shared generator depends on timing anyway, with any
#         optimizer, so runs with dropout in several threads are not reproducible
#         draw for draw; models that draw nothing (or draw from generators of their
#         own) give in threads exactly the numbers of a run one after the other.
#         Measured (the setting of tests/test_threads.py, 10 runs of two threads
#         training with nn.Dropout, 12 steps each): without the lock every run had
#         probes whose masks differed from their main evaluation's (54 of 120
#         D-steps), with it none (0 of 120).
#       - No lock is taken in a distributed run (more than one rank): ranks that
#         are threads of one process would wait for each other inside their closures.
# --------------------------------------------------------------------------


class RngSnapshot:
    """The CPU and CUDA random-number states, to replay them for the probe."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    def same(self, other: RngSnapshot) -> bool:
        """Whether both hold the same states (nothing drew in between)."""
        if not torch.equal(self.cpu, other.cpu) or (self.cuda is None) != (other.cuda is None):
            return False
        if self.cuda is None or other.cuda is None:
            return True  # both None (checked above)
        return len(self.cuda) == len(other.cuda) and all(torch.equal(a, b) for a, b in zip(self.cuda, other.cuda))


class _GeneratorLock:
    """A reader-writer lock over the evaluations of ESGDM closures (see above):
    shared for those that keep the generators' streams, exclusive for a D-step that
    may rewind them.  Re-entrant per thread (a closure may step another optimizer:
    the inner step runs under the outer hold); writers go first."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._depth = threading.local()

    @contextmanager
    def hold(self, exclusive: bool):
        depth = getattr(self._depth, "n", 0)
        if depth or _distributed():
            self._depth.n = depth + 1
            try:
                yield
            finally:
                self._depth.n = depth
            return
        with self._cond:
            if exclusive:
                self._writers_waiting += 1
                try:
                    while self._writer or self._readers:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer = True
            else:
                while self._writer or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._depth.n = 1
        try:
            yield
        finally:
            self._depth.n = 0
            with self._cond:
                if exclusive:
                    self._writer = False
                else:
                    self._readers -= 1
                self._cond.notify_all()


# At exit of a multi-process run over gloo, torch 2.14 can abort ("terminate called
# without an active exception", SIGABRT) after training finished, with any optimizer
# (measured with torch.optim.SGD and esgdm not imported: 2 of 12 runs of FSDP2 on two
# processes).  A collective issued during backward (FSDP2's reduce-scatter, DDP's
# all-reduce) keeps a copy of the thread-local state, which holds a Python object
# (the contextvars.Context that autograd stashes there for the backward); when the
# interpreter's final garbage collection frees the last reference to such a work,
# gloo's worker thread must take the GIL to release that object, Python ends the
# thread instead (it is finalizing), and the unwinding through a noexcept destructor
# calls std::terminate.  esgdm's own code starts no threads: its CPU kernel runs on
# ATen's OpenMP pool and its C++ helpers keep no state.  The way around: collect
# those objects before finalization starts, while other threads may still take the
# GIL, and let gloo's threads release them (0 of 24 runs aborted with this; the sleep
# is a bound, the threads need microseconds once scheduled).
_exit_drain: list[bool] = []


def _drain_before_exit() -> None:
    gc.collect()
    time.sleep(0.1)


def _drain_at_exit() -> None:
    """Registers :func:`_drain_before_exit` once (see above)."""
    with _warn_lock:
        if not _exit_drain:
            _exit_drain.append(True)
            atexit.register(_drain_before_exit)


def _distributed() -> bool:
    """Whether this process is one of several ranks (which may be threads of one process)."""
    dist = getattr(torch, "distributed", None)
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


#: Orders the closure evaluations of every ESGDM optimizer of this process.
GENERATORS = _GeneratorLock()


def module_trees(params: Sequence[Tensor]) -> list[torch.nn.Module]:
    """Every module of the module trees that hold one of ``params``: the modules that
    own one, all their ancestors, and everything below the topmost ones.

    Parameters know nothing of their modules, so this scans the live nn.Module
    objects once (0.08 s among 350k live objects, measured); callers cache it.
    """
    ids = {id(p) for p in params}
    owners: list = []
    parents: dict = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.nn.Module):
            continue
        own = getattr(obj, "_parameters", None)
        children = getattr(obj, "_modules", None)
        if own and any(id(p) in ids for p in own.values()):
            owners.append(obj)
        if children:
            for child in children.values():
                if child is not None:
                    parents.setdefault(id(child), []).append(obj)
    roots, seen, todo = [], set(), owners
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        up = parents.get(id(m))
        if up:
            todo.extend(up)
        else:
            roots.append(m)
    return _below(roots)


def _below(roots: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """Every module of the trees under ``roots``, each once, roots first."""
    out, seen = [], set()
    for root in roots:
        for m in root.modules():
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


class ModuleTrees:
    """:func:`module_trees`, cached per parameter set (the roots are kept weakly and
    walked again on each call, so modules added below them are seen)."""

    def __init__(self):
        self._key: tuple | None = None
        self._roots: list = []

    def __call__(self, params: Sequence[Tensor]) -> list[torch.nn.Module]:
        key = tuple(map(id, params))
        roots = [r() for r in self._roots]
        if key != self._key or any(r is None for r in roots):
            modules = module_trees(params)
            below = {id(c) for m in modules for c in m.children()}
            roots = [m for m in modules if id(m) not in below]
            self._key, self._roots = key, [weakref.ref(r) for r in roots]
            return modules
        return _below(roots)

    def __getstate__(self) -> dict:  # copies find their own modules again
        return {"_key": None, "_roots": []}


def _inference(t: Tensor) -> bool:
    try:
        return t.is_inference()
    except (AttributeError, RuntimeError):
        return False


class BufferGuard:
    """Puts back every buffer of ``modules`` that changes inside the guard.

    The probe's forward pass would otherwise move BatchNorm running statistics (and
    any other buffer) a second time.  Entering copies the buffers; leaving copies
    them all back (version counters cannot tell: eager BatchNorm updates its running
    statistics without bumping them) and puts back a buffer that was replaced.
    Nothing is installed anywhere, so other threads and torch.compile see nothing.
    """

    def __init__(self, modules: Sequence[torch.nn.Module]):
        self.modules = list(modules)
        self.saved: list = []

    def snapshot(self) -> None:
        copies: dict[int, Tensor] = {}  # a buffer shared by two modules is copied once
        saved = []
        with torch.no_grad():
            for module in self.modules:
                for name, buf in module._buffers.items():
                    if buf is None:
                        continue
                    if _inference(buf):
                        continue  # cannot be changed in place outside inference mode
                    if id(buf) not in copies:
                        copies[id(buf)] = buf.detach().clone()
                    saved.append((module, name, buf, copies[id(buf)]))
        self.saved = saved

    def restore(self) -> None:
        done = set()
        with torch.no_grad():
            for module, name, original, value in self.saved:
                if module._buffers.get(name) is not original:
                    module._buffers[name] = original  # undo a replacement
                if id(original) not in done:
                    done.add(id(original))
                    original.copy_(value)

    def __enter__(self) -> BufferGuard:
        self.snapshot()
        return self

    def __exit__(self, *exc) -> Literal[False]:
        self.restore()
        return False


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
    signs: Sequence[Tensor],
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
        signs: the Rademacher vectors ``v``, shaped like ``params`` (for a DTensor
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
    held: list[Tensor] | None = list(signs)  # dropped (None) as soon as no longer needed
    del signs  # (held is then the only reference: dropping it frees the signs)
    reals = [real_view(p) for p in params]  # what is perturbed (complex: as the real view)
    seen = ComputePrecision(device_types=("cpu", "cuda", *(_device_type(p) for p in params)),
                            watch_saves=precision is None or precision.watch_saves)
    seen.record()  # the autocast state around this call
    if precision is not None:
        seen.merge(precision)
    if modules is None:
        modules = module_trees(params)
    if _distributed():
        _drain_at_exit()
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
                assert held is not None  # kept while a redo may need them (keep_signs)
                torch._foreach_add_(shards, [local(v) for v in held], alpha=r)
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
                assert held is not None  # the central scheme keeps them
                torch._foreach_add_(shards, [local(v) for v in held], alpha=-r)
            held = None
            base, step = _probe_grads(params, closure, rng, seen, modules), 2 * r
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
    "CREATE_GRAPH_HINT", "FD_SCHEMES", "GENERATORS", "BufferGuard", "ModuleTrees", "RngSnapshot",
    "autograd_hvp", "check_graphs", "create_graph_failed", "fd_radius", "finite_difference_hvp",
    "ComputePrecision", "autocast_dtype", "module_trees", "param_norm", "unit_roundoff", "warn_user",
]
