"""Where an optimizer's ``h = H v`` comes from: HVP modes and fallback, signs and seed.

:class:`Curvature` holds what one :class:`esgdm.ESGDM` knows about its curvature
steps: the seed of its sign vectors (agreed on by every rank of a distributed run),
whether ``hvp="auto"`` fell back to finite differences, and what the main evaluation
of a closure recorded for the finite-difference probe (random state, compute
precision, buffers).  Its :meth:`Curvature.hvps` takes the Hessian-vector products of
a step's gathered tensors, by double backward (:func:`esgdm.hvp.autograd_hvp`) or by
finite differences (:func:`esgdm.hvp.finite_difference_hvp`), with the signs of
:func:`draw_signs` (:mod:`esgdm.signs`).  The options (``hvp``, ``fd_scheme``,
``fd_radius``) and the schedule stay on the optimizer, which each method is handed.

Also here: ``torch.amp.GradScaler`` glue (an unscaling scaler's scale is undone on
autograd HVPs) and the recognition of torch.distributed.checkpoint's state
initialisation step.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from esgdm.buckets import any_dtensor, is_dtensor, local, real_view
from esgdm.guards import BufferGuard, ModuleTrees, RngSnapshot
from esgdm.hvp import (
    DATA_PARALLEL_HINT,
    autograd_hvp,
    create_graph_failed,
    data_parallel_refused,
    finite_difference_hvp,
    no_double_backward,
    trainer_hint,
    warn_user,
)
from esgdm.precision import ComputePrecision
from esgdm.signs import rademacher, stream_key
from esgdm.store import all_params, local_block

if TYPE_CHECKING:
    from esgdm.optimizer import ESGDM


def default_seed() -> int:
    """A seed derived from ``torch.initial_seed()`` (what ``torch.manual_seed`` set, or
    what torch drew from the OS at start-up) without drawing from the generator: the
    user's data order and dropout masks stay as they were, and a script that seeds torch
    gets the same optimizer seed every run.  splitmix64, kept to 63 bits (an int64)."""
    m = 2**64 - 1
    x = (torch.initial_seed() + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return (x ^ (x >> 31)) >> 1


def draw_signs(seed: int, step: int, key: int, p: Tensor) -> Tensor:
    """The signs of parameter ``p`` (optimizer-order index ``key``) at ``step``: those of
    its real view for a complex ``p`` (the signs a real parameter of that shape gets)."""
    p = real_view(p)
    return rademacher(seed, step, key, p.shape, dtype=p.dtype, device=p.device)


def shard_signs(seed: int, step: int, key: int, p: Any) -> Tensor:
    """The local shard's part of DTensor ``p``'s signs: exactly the elements an unsharded
    run draws for them (drawn directly when the shard is a run of whole rows)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    device = p._local_tensor.device
    if tuple(shape[1:]) == tuple(p.shape[1:]):  # rows [offset[0], offset[0] + shape[0])
        row = math.prod(p.shape[1:])
        return rademacher(seed, step, key, shape, dtype=p.dtype, device=device, start=offset[0] * row)
    return local_block(rademacher(seed, step, key, p.shape, dtype=p.dtype, device=device), p).contiguous()


class SignVectors:
    """The Rademacher vectors of one finite-difference probe, added to the parameters
    where they are drawn when every tensor is a contiguous tensor of a whole parameter,
    all on the CPU (``esgdm._C.add_signs_``) or all on one GPU (the Triton kernel of
    ``esgdm.kernels.esgdm_signs``): one pass, no sign tensor.  Else drawn as tensors
    (:meth:`Curvature.signs`) and added by ``torch._foreach_add_``.  Both add the same
    signs with the same rounding as ``torch._foreach_add_`` on that device
    (tests/test_finite_difference.py, tests/test_triton_signs.py)."""

    def __init__(self, curvature: Curvature, opt: ESGDM, params: list[Tensor]):
        self.curvature, self.opt, self.params = curvature, opt, params
        self.drawn: list[Tensor] | None = None
        seed, keys = curvature.shared_seed(), opt._store.param_keys
        self.keys = [stream_key(seed, opt.steps, keys[id(p)]) for p in params]

    def fused(self, shards: list[Tensor]) -> bool:
        """Whether :meth:`add_to` draws the signs in its pass over ``shards``."""
        return self._fused_op(shards) is not None

    def _fused_op(self, shards: list[Tensor]) -> Callable[..., None] | None:
        op = _add_signs_op(shards)
        if op is None or any_dtensor(self.params) or not all(
                s.dtype in _ADD_SIGNS_DTYPES and s.is_contiguous() and not s.is_neg() for s in shards):
            return None
        return op

    def add_to(self, shards: list[Tensor], alpha: float, backups: list[Tensor] | None = None) -> None:
        """``shards += alpha * v``; with ``backups`` (only where :meth:`fused`), each shard
        is first copied there, in the same pass."""
        op = self._fused_op(shards)
        if op is not None:
            op(shards, self.keys, [0] * len(shards), alpha, backups)
            return
        if backups is not None:
            raise ValueError("SignVectors.add_to: backups only where fused()")
        if self.drawn is None:
            self.drawn = self.curvature.signs(self.opt, self.params)
        torch._foreach_add_(shards, [local(v) for v in self.drawn], alpha=alpha)


#: What the fused sign adds step.
_ADD_SIGNS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _add_signs_op(shards: list[Tensor]) -> Callable[..., None] | None:
    """The op that draws the signs as it adds them to ``shards``, where one can:
    ``esgdm._C.add_signs_`` for CPU tensors, ``esgdm.kernels.esgdm_signs.add_signs_``
    (Triton) for tensors on one CUDA device; else None."""
    if not USE_ADD_SIGNS or not shards:
        return None
    devices = {s.device for s in shards}
    kind = next(iter(devices)).type
    if len(devices) > 1 or kind not in ("cpu", "cuda"):
        return None
    try:  # an optimisation only: any failure means the signs are drawn as tensors
        if kind == "cpu":
            from esgdm.backends.cpp_impl import _C
            return getattr(_C, "add_signs_", None)
        from esgdm.kernels import esgdm_signs
        return None if esgdm_signs.INTERPRET else esgdm_signs.add_signs_
    except Exception:  # noqa: BLE001
        return None


#: Whether finite-difference probes may draw their signs as they add them (the tests
#: compare both ways).
USE_ADD_SIGNS = True


class Curvature:
    """The curvature side of one optimizer (see the module).

    Args:
        seed: the seed of the sign vectors and of stochastic rounding.
        shared: whether every rank already agrees on ``seed`` (it was given, or loaded);
            else rank 0's is broadcast at first use.
    """

    def __init__(self, seed: int, shared: bool):
        self.seed = seed
        self.seed_shared = shared
        self.fd_fallback = False  # hvp="auto" takes finite differences from now on
        self.graph_walked = False  # a double backward's whole graph was searched for cuts (hvp.graph_cut)
        self.evaluated = False  # a D-step's main evaluation succeeded (see evaluate)
        self.watch_saves = True  # False once torch.func refused saved-tensor hooks
        self.module_trees = ModuleTrees()  # whose buffers the probe restores
        self.precision: ComputePrecision | None = None

    def uses_finite_differences(self, hvp: str) -> bool:
        """Whether D-steps take ``h`` by finite differences whatever the gradients carry."""
        return hvp == "finite_difference" or (hvp == "auto" and self.fd_fallback)

    # ------------------------------------------------------------- seed and signs

    def shared_seed(self) -> int:
        """The seed, agreed on by every rank of a distributed run (rank 0's) at first use."""
        if not self.seed_shared:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                seed = [self.seed]
                dist.broadcast_object_list(seed, src=0)
                self.seed = int(seed[0])
            self.seed_shared = True
        return self.seed

    def signs(self, opt: ESGDM, params: list[Tensor]) -> list[Tensor]:
        """The Rademacher vectors of this step, one per parameter, from the keyed
        generator of :mod:`esgdm.signs` (the global RNG is not touched)."""
        seed = self.shared_seed()
        keys = opt._store.param_keys
        return [draw_signs(seed, opt.steps, keys[id(p)], p) if not is_dtensor(p)
                else shard_signs(seed, opt.steps, keys[id(p)], p) for p in params]

    # ----------------------------------------------------------- the main evaluation

    def evaluate(self, opt: ESGDM, closure: Callable[[], Any] | None, d_step: bool):
        """The main evaluation of the closure: ``(loss, random state before it)``.

        On a D-step that may take finite differences it records what the probe needs:
        the random state to replay and the precision the closure computes in.  Until one
        such evaluation has succeeded, an evaluation that fails because the model cannot
        keep a graph of its gradients (``hvp="auto"``: a compiled backward refuses
        ``create_graph=True``) or because torch.func refuses saved-tensor hooks is run
        again, with the random state and the buffers as they were before it."""
        if closure is None:
            self.precision = None
            return None, None
        fd_possible = d_step and opt.hvp != "autograd"
        rng = RngSnapshot() if fd_possible else None
        precision = ComputePrecision(watch_saves=self.watch_saves) if fd_possible else None
        self.precision = precision
        guard = None
        if fd_possible and not self.evaluated:
            guard = BufferGuard(self.module_trees(all_params(opt.param_groups)))
            guard.snapshot()
        with torch.enable_grad():
            while True:
                try:
                    if precision is None:
                        return closure(), rng
                    with precision:  # what the closure computes in sizes the probe
                        loss = closure()
                    self.evaluated = True
                    return loss, rng
                except RuntimeError as e:
                    if d_step and data_parallel_refused(e):  # (its reducer is left mid-backward)
                        raise RuntimeError(f"{DATA_PARALLEL_HINT} (torch: {e})") from e
                    if guard is None or precision is None or rng is None:
                        raise
                    if precision.refused_by(e):
                        self.watch_saves = False
                    elif opt.hvp == "auto" and not self.fd_fallback and create_graph_failed(e):
                        self.fall_back(e)
                    else:
                        raise
                rng.restore()
                guard.restore()

    def fall_back(self, error: BaseException) -> None:
        """``hvp="auto"``: from now on Hessian-vector products come from finite differences."""
        warn_user(f"esgdm: the double backward failed ({str(error).splitlines()[0]}); "
                  "hvp='auto' takes Hessian-vector products by finite differences from now on")
        self.fd_fallback = True

    # --------------------------------------------------------------------- h = H v

    @torch.compiler.disable
    def hvps(self, opt: ESGDM, work, closure, rng) -> list[list[Tensor]]:
        """Hessian-vector products of every active tensor of ``work`` (``(bucket,
        indices, gradients)`` per bucket), split back by bucket.

        Kept out of torch.compile graphs: autograd.grad and the closure break the graph
        anyway, and the sign keys are host integers that must not be traced."""
        params = [b.params[i] for b, idx, _ in work for i in (range(len(b)) if idx is None else idx)]
        grads = [g for _, _, gs in work for g in gs]
        if not any(map(Tensor.numel, grads)):  # only empty tensors: nothing to observe, no
            return [[torch.zeros_like(g) for g in gs] for _, _, gs in work]  # graph needed
        use_fd = self.uses_finite_differences(opt.hvp)
        if not use_fd and opt._store.any_dtensor:
            if opt.hvp == "auto" and closure is not None:
                use_fd = True
            else:
                raise RuntimeError(
                    "sharded (DTensor, e.g. FSDP2 fully_shard) parameters cannot take a double backward: "
                    "construct ESGDM(..., hvp='finite_difference') and call opt.step(closure) with a "
                    "closure that zeroes the gradients, computes the loss and calls loss.backward()")
        if not use_fd and not any(g.grad_fn is not None for g in grads):
            if closure is None or opt.hvp == "autograd":
                raise RuntimeError(self.no_graph_message(opt))
            use_fd = True
        if use_fd:
            hvps = self._fd_hvps(opt, params, grads, closure, rng)
        else:
            try:
                hvps = autograd_hvp(params, grads, self.signs(opt, params), fd_available=opt.hvp == "auto",
                                    look_for_cuts=not self.graph_walked)
            except RuntimeError as e:
                if not no_double_backward(e):
                    raise
                if not (opt.hvp == "auto" and closure is not None):
                    raise RuntimeError(
                        f"the double backward for the Hessian-vector product failed: {str(e).splitlines()[0]} "
                        "Take it by finite differences instead: construct ESGDM(..., hvp='auto') (or "
                        "hvp='finite_difference') and call opt.step(closure) with a closure that zeroes "
                        "the gradients, computes the loss and calls loss.backward()") from e
                self.fall_back(e)
                hvps = self._fd_hvps(opt, params, grads, closure, rng)
            else:
                self.graph_walked = True  # (a model's ops rarely change between steps)
                hvps = undo_unscaled_scale(opt, hvps)
        out, start = [], 0
        for _, _, gs in work:
            out.append(hvps[start:start + len(gs)])
            start += len(gs)
        return out

    @staticmethod
    def no_graph_message(opt: ESGDM) -> str:
        """One line for the plain ``loss.backward(); opt.step()`` loop on a D-step."""
        other = ("pass a closure, opt.step(closure), to take it by finite differences" if opt.hvp == "auto"
                 else "construct ESGDM(..., hvp='finite_difference') and call opt.step(closure)")
        return (f"write loss.backward(create_graph=opt.should_create_graph()) instead of loss.backward() "
                f"before opt.step() (or {other}): step {opt.steps} is a curvature step (the first "
                f"d_warmup={opt.d_warmup} steps and every update_d_every={opt.update_d_every}-th step "
                "take a Hessian-vector product by double backward) and no gradient carries a graph. "
                "If backward already had create_graph=True, the loss is linear in every parameter, or an "
                "op without a double backward (e.g. @once_differentiable) cut the graph: take curvature by "
                "finite differences, hvp='finite_difference' (or hvp='auto') with opt.step(closure)."
                + trainer_hint())

    def _fd_hvps(self, opt: ESGDM, params, grads, closure, rng) -> list[Tensor]:
        if closure is None:
            raise RuntimeError("finite-difference curvature needs opt.step(closure) on D-steps")
        if any(p.is_meta for p in params):  # no values to difference: shape-only, like the rest
            if not all(p.is_meta for p in params):
                raise RuntimeError("finite-difference curvature cannot mix meta parameters (no values) "
                                   "with parameters that hold values in one step")
            return [torch.empty_like(real_view(p)) for p in params]
        idle = [p for b in opt._store.buckets for p in b.params if p.grad is None]
        # The probe restores each .grad: give it the parameters' own (DTensors under FSDP2,
        # complex tensors for complex parameters).
        grads = [p.grad.detach() if is_dtensor(p) or p.is_complex() else g.detach()
                 for p, g in zip(params, grads)]
        try:
            return finite_difference_hvp(params, grads, SignVectors(self, opt, params), closure, rng,
                                         opt.fd_scheme, opt.fd_radius, precision=self.precision,
                                         modules=self.module_trees(all_params(opt.param_groups)))
        finally:
            for p in idle:  # the probe must not leave gradients behind
                p.grad = None


def state_init_call(opt: ESGDM, work) -> bool:
    """Whether this D-step (without a closure) is torch.distributed.checkpoint's state
    initialisation (``_init_optim_state``): no state yet, every group's lr set to 0 (a
    float, or a CPU tensor), every gradient zero and without a graph.  Anything else,
    all-zero gradients of a user's step included, is a real step (which then needs its
    Hessian-vector product like any other).  The cheap tests come first: the gradients
    are read back only when everything else matched."""
    if any(opt.state.values()):
        return False
    for group in opt.param_groups:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.device.type != "cpu" or float(lr) != 0:
                return False
        elif lr != 0:
            return False
    grads = [g for _, _, gs in work for g in gs]
    if any(g.is_meta for g in grads):
        return False  # no values to read: a meta step runs the whole path shape-only
    return all(g.grad_fn is None for g in grads) and not any(bool(g.any()) for g in grads)


def scale_of_unscaling_scaler(opt: ESGDM) -> Tensor | None:
    """The scale of the ``torch.amp.GradScaler`` that unscaled ``opt``'s gradients in
    place (``scaler.unscale_(opt)``) and is now running ``scaler.step(opt)``, or None.

    In that stage the scaler hands the step ``found_inf`` without ``grad_scale``; the
    scaler itself is found up the call stack (``scaler.step`` called this ``step``,
    perhaps through wrappers) and must say that it unscaled this optimizer."""
    if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is None:
        return None
    from torch.amp.grad_scaler import GradScaler, OptState

    frame: Any = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, GradScaler):
            state = owner._per_optimizer_states.get(id(opt))  # .get: a defaultdict
            if state is not None and state.get("stage") is OptState.UNSCALED:
                return owner._scale
            return None
        frame = frame.f_back
    return None


def undo_unscaled_scale(opt: ESGDM, hvps: list[Tensor]) -> list[Tensor]:
    """Autograd Hessian-vector products in the units of the gradients ``opt`` holds.

    ``scaler.unscale_(opt)`` divides the gradients in place, but the double-backward
    graph still differentiates the scaled ones: its ``h`` is ``scale`` times too large.
    Divided here (on the device, nothing read back); without an unscaling scaler the
    kernels divide ``g`` and ``h`` by ``grad_scale`` themselves."""
    scale = scale_of_unscaling_scaler(opt)
    if scale is None:
        return hvps
    return [h / scale.to(h.device).reshape(()) for h in hvps]  # (h may be a view: not in place)


__all__ = ["Curvature", "default_seed", "draw_signs", "scale_of_unscaling_scaler", "shard_signs",
           "state_init_call", "undo_unscaled_scale"]
