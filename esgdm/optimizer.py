"""``esgdm.ESGDM``: the ESGD-M optimizer as a ``torch.optim.Optimizer``.

This class owns the torch.optim surface (param groups, argument checks, hooks) and the
D-step schedule; the rule is :mod:`esgdm.rule`, the state lives in
:mod:`esgdm.buckets`, curvature comes from :mod:`esgdm.hvp` with signs from
:mod:`esgdm.signs`, checkpoints go through :mod:`esgdm.checkpoint`, and every bucket
is stepped by one call of the ``esgdm::step_`` operator (:mod:`esgdm.ops`).
"""

from __future__ import annotations

import collections
import math
import numbers
import operator
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from esgdm import backends, checkpoint, ops
from esgdm.buckets import STATE_DTYPES, Bucket, build_buckets, is_dtensor, local, same_layout
from esgdm.checkpoint import BIAS, EXP_AVG, EXP_AVG_D, STEP, WARM, check_count
from esgdm.hvp import (
    FD_SCHEMES, GENERATORS, BufferGuard, ComputePrecision, ModuleTrees, RngSnapshot, autograd_hvp,
    create_graph_failed, finite_difference_hvp, no_double_backward, warn_user,
)
from esgdm.rule import (
    BIAS as BIAS_COL, DSCALE, FLAG_EXACT, FLAG_STOCHASTIC_ROUNDING, HPARAM_COLUMNS, STEPS,
    WARM as WARM_COL, curvature_scale,
)
from esgdm.signs import rademacher

HVP_MODES = ("autograd", "finite_difference", "auto")

_grad_of = operator.attrgetter("grad")
_is_sparse = operator.attrgetter("is_sparse")


def _check_lr(lr: Any, where: str) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.dtype.is_floating_point:
            raise ValueError(f"Invalid lr{where}: a tensor lr must hold one floating-point value, "
                             f"got {lr.dtype} of shape {tuple(lr.shape)}")
        return  # its value lives on the device: checked once, at construction
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"Invalid lr{where}: {lr!r} (must be a float or a one-element tensor)")
    if not (0.0 <= lr and math.isfinite(lr)):
        raise ValueError(f"Invalid lr{where}: {lr!r} (must be finite and >= 0)")


def _real(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}{where}: {value!r} (must be a float)")
    return float(value)


def check_group(group: dict, where: str = "") -> None:
    """Raises ValueError (TypeError for a wrong type) naming the first invalid
    hyper-parameter of ``group``."""
    missing = [k for k in ("lr", "betas", "lr_warmup", "eps", "weight_decay") if k not in group]
    if missing:
        raise ValueError(f"Missing hyper-parameters{where}: {', '.join(missing)}")
    _check_lr(group["lr"], where)
    betas = group["betas"]
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas{where}: {betas!r} (must be a pair of floats)") from None
    b1, b2 = _real("beta parameter at index 0", b1, where), _real("beta parameter at index 1", b2, where)
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0{where}: {b1!r} (must be in [0, 1))")
    if not 0.0 <= b2 <= 1.0:
        raise ValueError(f"Invalid beta parameter at index 1{where}: {b2!r} (must be in [0, 1])")
    w = _real("lr_warmup", group["lr_warmup"], where)
    if not 0.0 <= w < 1.0:
        raise ValueError(f"Invalid lr_warmup{where}: {w!r} (must be in [0, 1))")
    eps = _real("eps", group["eps"], where)
    if not (0.0 <= eps and math.isfinite(eps)):
        raise ValueError(f"Invalid eps{where}: {eps!r} (must be finite and >= 0)")
    wd = _real("weight_decay", group["weight_decay"], where)
    if not (0.0 <= wd and math.isfinite(wd)):
        raise ValueError(f"Invalid weight_decay{where}: {wd!r} (must be finite and >= 0)")


def _hparam_row(group: dict) -> tuple:
    """The group's row of the device hyper-parameter table (a tensor lr contributes 0:
    its value is copied on the device)."""
    lr = group["lr"]
    b1, b2 = group["betas"]
    return (0.0 if isinstance(lr, Tensor) else float(lr), float(b1), float(b2),
            float(group["lr_warmup"]), float(group["eps"]), float(group["weight_decay"]))


def _hparam_key(group: dict) -> tuple:
    lr = group["lr"]
    b1, b2 = group["betas"]
    return (("tensor", id(lr)) if isinstance(lr, Tensor) else lr, b1, b2, group["lr_warmup"],
            group["eps"], group["weight_decay"])


def _overlaps(p: Tensor) -> bool:
    """Whether two elements of ``p`` share memory (an expanded tensor, stride 0).  An
    empty tensor has no elements to share (torch gives some of them stride-0 dims)."""
    return p.numel() > 0 and any(st == 0 and n > 1 for n, st in zip(p.shape, p.stride()))


class ESGDM(Optimizer):
    r"""ESGD-M: equilibrated SGD with Nesterov momentum and an Adamax-style curvature estimate.

    Every few steps (a *D-step*) ESGD-M takes a Hessian-vector product ``h = H v``
    with a Rademacher vector ``v`` and keeps ``D = max(b2 * D, h * h)`` as a
    per-coordinate estimate of ``diag(H^2)``; every step divides a Nesterov-momentum
    step by ``sqrt(D) + eps``.  The learning rate is invariant to rescaling the loss
    or the parameters.  The exact rule is in :mod:`esgdm.rule`.

    On a D-step the gradients must carry a graph (``hvp="autograd"``), so call::

        loss.backward(create_graph=opt.should_create_graph())
        opt.step()

    or give ``step`` a closure and use ``hvp="finite_difference"`` (or ``"auto"``).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or 0-d Tensor): step size (default 1.0; start near 0.5).  A tensor lr
            is read on the device by the kernels, never by the host.
        betas (tuple[float, float]): momentum decay and the inf-norm decay of the
            curvature estimate (default (0.9, 0.999)).
        lr_warmup (float): exponential warmup; the step size on a parameter's k-th
            D-step is ``lr * (1 - lr_warmup**k)``; 0 disables it (default 0.99).
        eps (float): added to ``sqrt(D)`` (default 1e-4).
        weight_decay (float): decoupled weight decay, scaled by the current step size
            (default 0).
        update_d_every (int): curvature refresh period in steps (default 10).
        d_warmup (int): the first ``d_warmup`` steps always refresh curvature (default 20).
        backend (str, optional): ``"auto" | "triton" | "cuda" | "cpu" | "torch"``;
            defaults to ``$ESGDM_BACKEND`` or ``"auto"``.
        generator (torch.Generator, optional): where the optimizer's seed is drawn from
            (default: the global generator, once, at construction).
        seed (int, optional): the seed of the sign vectors and stochastic rounding
            (overrides ``generator``).  Saved in ``state_dict()``.
        hvp (str): how D-steps get ``H v``: ``"autograd"`` (default; the backward pass
            needs ``create_graph=True``), ``"finite_difference"`` (needs
            ``step(closure)``; no double backward) or ``"auto"`` (autograd when the
            gradients carry a graph, else finite differences with a closure; falls back
            to finite differences, warning once, when an op has no double backward).
        fd_scheme (str): ``"forward"`` (default; one extra gradient per D-step) or
            ``"central"`` (two extra gradients, more accurate).
        fd_radius (float, optional): the finite-difference step ``r``.
        exact (bool): compute the original ESGD-M rule bit for bit: coordinates whose
            curvature was never observed (``D == 0``) step by ``g / eps``.  By default
            they use the tensor's mean observed curvature instead (see README).
        stochastic_rounding (bool, optional): round 16-bit parameters stochastically
            when writing them back (default: True unless ``exact``).
        state_dtype (torch.dtype, optional): ``torch.float32`` (default) or
            ``torch.bfloat16`` for ``exp_avg`` and ``exp_avg_d``; math stays float32.
        capturable (bool): allow capturing ``step()`` in a CUDA graph: the step then
            refuses host uploads during capture (set hyper-parameters before
            capturing; change lr through a tensor lr).  The step never syncs with the
            host either way.

    State: each parameter's ``exp_avg`` (``m``) and ``exp_avg_d`` (``D``) are views into
    flat per-(device, dtype) buffers; ``exp_avg_bias_corr`` (``bias``),
    ``lr_warmup_cumprod`` (``warm``) and ``step`` are 0-d float64 tensors on the
    parameter's device.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_warmup: float = 0.99,
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        update_d_every: int = 10,
        d_warmup: int = 20,
        *,
        backend: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        hvp: str = "autograd",
        fd_scheme: str = "forward",
        fd_radius: Optional[float] = None,
        exact: bool = False,
        stochastic_rounding: Optional[bool] = None,
        state_dtype: Optional[torch.dtype] = None,
        capturable: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
    ):
        defaults = dict(lr=lr, betas=betas, lr_warmup=lr_warmup, eps=eps, weight_decay=weight_decay)
        check_group(defaults)
        if isinstance(lr, Tensor) and not lr.is_meta:
            value = lr.item()  # construction may read it; steps never do
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"Invalid lr: {value!r} (must be finite and >= 0)")
        self.update_d_every = check_count("update_d_every", update_d_every)
        self.d_warmup = check_count("d_warmup", d_warmup)
        self.backend = backends.check_name(backend if backend is not None else backends.default_name())
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator: {generator!r} (must be a torch.Generator)")
        if seed is not None:
            seed = check_count("seed", seed, 0)
        if hvp not in HVP_MODES:
            raise ValueError(f"Invalid hvp: {hvp!r}; choose one of {', '.join(map(repr, HVP_MODES))}")
        if fd_scheme not in FD_SCHEMES:
            raise ValueError(f"Invalid fd_scheme: {fd_scheme!r}; choose one of {', '.join(FD_SCHEMES)}")
        if fd_radius is not None and not (isinstance(fd_radius, numbers.Real) and fd_radius > 0
                                          and math.isfinite(fd_radius)):
            raise ValueError(f"Invalid fd_radius: {fd_radius!r} (must be finite and > 0)")
        if state_dtype is not None and state_dtype not in STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {state_dtype!r} (choose torch.float32 or torch.bfloat16)")
        for name, value in (("foreach", foreach), ("fused", fused)):
            if value is False:
                raise ValueError(f"{name}=False is not supported: ESGDM always steps each bucket "
                                 "with one fused kernel (pick a kernel with backend=...)")
        self.hvp, self.fd_scheme, self.fd_radius = hvp, fd_scheme, fd_radius
        self.exact = bool(exact)
        self.stochastic_rounding = (not self.exact) if stochastic_rounding is None else bool(stochastic_rounding)
        self.state_dtype = state_dtype
        self.capturable = bool(capturable)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=generator).item())
            self._seed_shared = False  # ranks of a distributed run agree on it at first use
        else:
            self._seed_shared = True
        self.seed = seed
        self._precision = None
        self._schedule = _Schedule()
        self._fd_fallback = False
        self._evaluated = False  # a D-step's main evaluation succeeded (see _evaluate)
        self._watch_saves = True  # False once torch.func refused saved-tensor hooks
        self._module_trees = ModuleTrees()  # whose buffers the probe restores
        self._buckets: list[Bucket] = []
        self._meta_signature: Optional[tuple] = None
        self._any_dtensor = False
        self._signature: Optional[tuple] = None
        self._chosen: dict[tuple, tuple] = {}
        self._param_keys: dict[int, int] = {}
        self._hparams: dict[torch.device, Tensor] = {}
        self._hparam_key: Optional[tuple] = None
        super().__init__(params, defaults)
        self._watch_state()

    def _watch_state(self) -> None:
        """Makes ``self.state`` (and each entry) flag user edits (see :class:`_Watch`)."""
        self._watch = _Watch()
        state = _WatchedState(self._watch)
        for p, entry in dict(self.state).items():
            dict.__setitem__(state, p, _WatchedEntry(self._watch, entry) if entry else entry)
        self.state = state
        self._state_obj = state

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group; its hyper-parameters are checked and nothing changes on error."""
        n_before = len(self.param_groups)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's duplicate warning: we raise
            super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group(group, f" in param group {n_before}")
            ids = [id(p) for p in group["params"]]
            if len(set(ids)) != len(ids) or seen.intersection(ids):
                raise ValueError(f"param group {n_before} repeats a parameter (the same tensor passed "
                                 "twice would be stepped twice): pass each parameter once")
            for p in group["params"]:
                if not p.dtype.is_floating_point:
                    raise ValueError(f"ESGDM optimizes floating-point parameters only, got one of dtype {p.dtype}")
                if _overlaps(p):
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} has strides {p.stride()}: "
                                     "its elements share memory (an expanded tensor), which an optimizer "
                                     "cannot step; pass a tensor that owns its elements (p.contiguous())")
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        self._hparam_key = None

    def should_create_graph(self) -> bool:
        """Whether the next ``step()`` takes a Hessian-vector product by double backward,
        so the backward pass before it needs ``create_graph=True``::

            loss.backward(create_graph=opt.should_create_graph())

        False with ``hvp="finite_difference"``, which needs no graph, and with
        ``hvp="auto"`` after it fell back to finite differences.
        """
        if self.hvp == "finite_difference" or (self.hvp == "auto" and self._fd_fallback):
            return False
        return self.is_d_step()

    def is_d_step(self) -> bool:
        """Whether the next ``step()`` refreshes the curvature estimate."""
        self._settle()
        return self.steps < self.d_warmup or self.steps_since_d >= self.update_d_every

    # ----------------------------------------------------------------- buckets

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _layout(self) -> tuple:
        """What the buckets were built for: the parameters (and their groups), and where
        each one's data is and how it is laid out (``model.to(...)`` and ``p.data = t``
        keep the Parameter object but move its data: a new dtype, device or shape comes
        with new memory, a new layout with new strides).  Three C-level maps."""
        ids = tuple(tuple(map(id, group["params"])) for group in self.param_groups)
        params = self._all_params()
        if self._any_dtensor:  # FSDP2: what matters is each rank's local shard
            params = [local(p) for p in params]
        elif _FRONTEND is not None:
            return (ids, _FRONTEND.layout_key(params))  # the same, hashed in C++
        return (ids, tuple(map(Tensor.data_ptr, params)), tuple(map(Tensor.stride, params)))

    def _meta_layout(self) -> tuple:
        """The parameters and their metadata (what a compiled step can compare)."""
        ids = tuple(tuple(map(id, group["params"])) for group in self.param_groups)
        params = [local(p) for p in self._all_params()]
        return (ids, tuple(tuple(p.stride()) for p in params), tuple(tuple(p.shape) for p in params),
                tuple(p.dtype for p in params), tuple(str(p.device) for p in params))

    def buckets(self) -> list[Bucket]:
        """The (device, dtype) buckets, rebuilt (moving the state along) when the
        parameters changed.  Raises before changing anything when state cannot follow."""
        self._any_dtensor = any(map(is_dtensor, self._all_params()))
        if ops._is_compiling():
            # Addresses cannot be traced: compare metadata (which Dynamo guards on too).
            meta = self._meta_layout()
            if self._buckets and meta == self._meta_signature:
                return self._buckets
            layout = None
        else:
            layout = self._layout()
            if layout == self._signature:
                return self._buckets
            if self._signature is None and self._buckets and self._meta_layout() == self._meta_signature:
                self._signature = layout  # built inside a compiled step: same parameters
                return self._buckets
        old = {id(p): (b, i) for b in self._buckets for i, p in enumerate(b.params)}
        for p in self._all_params():
            if _overlaps(p):
                raise ValueError(f"a parameter of shape {tuple(p.shape)} now has strides {p.stride()}: "
                                 "its elements share memory (an expanded tensor), which cannot be stepped")
            b, i = old.get(id(p), (None, 0))
            if b is not None and p in self.state and self.state[p]:
                if tuple(b.exp_avg_views[i].shape) != tuple(local(p).shape):
                    raise ValueError(
                        f"a parameter changed shape from {tuple(b.exp_avg_views[i].shape)} to "
                        f"{tuple(local(p).shape)} (p.data = ... with another shape): its optimizer "
                        "state cannot follow; reset it with opt.state[p] = {} first")
        new = build_buckets(self.param_groups, self.state_dtype)
        chosen = {b.key: backends.resolve(self.backend, b.device, b.dtype) for b in new}
        # Nothing above mutated anything; now move the existing state across.
        saved = {p: self._read_state(p) for p in list(self.state) if self.state[p]}
        self.state.clear()
        self._buckets, self._signature, self._chosen = new, layout, chosen
        self._meta_signature = self._meta_layout()
        self._param_keys = {id(p): k for k, p in enumerate(self._all_params())}
        self._hparam_key = None
        for b in new:
            for i, p in enumerate(b.params):
                if p in saved:
                    self._write_state(b, i, saved[p])
        return self._buckets

    def backend_for(self, bucket: Bucket) -> backends.Backend:
        return self._chosen[bucket.key][0]

    def _read_state(self, p: Tensor) -> dict:
        """One parameter's state as the user sees it (what was assigned wins)."""
        return {k: local(v) if isinstance(v, Tensor) else v for k, v in self.state[p].items()}

    def _write_state(self, b: Bucket, i: int, saved: dict) -> None:
        """Copies one parameter's state into bucket ``b`` and exposes it as views."""
        b.exp_avg_views[i].copy_(_shard_of(saved[EXP_AVG], b.params[i]))
        b.exp_avg_d_views[i].copy_(_shard_of(saved[EXP_AVG_D], b.params[i]))
        for col, key in ((BIAS_COL, BIAS), (WARM_COL, WARM), (STEPS, STEP)):
            b.scalars[i, col] = torch.as_tensor(saved.get(key, 0.0), dtype=torch.float64).to(b.device)
        b.scalars[i, DSCALE] = curvature_scale([b.exp_avg_d_views[i]])[0].to(b.device)
        self._expose_state(b, i)

    def _expose_state(self, b: Bucket, i: int) -> None:
        b.exposed[i] = True
        self.state[b.params[i]] = _WatchedEntry(self._watch, {
            EXP_AVG: b.exposed_view(b.exp_avg_views[i], i),
            EXP_AVG_D: b.exposed_view(b.exp_avg_d_views[i], i),
            BIAS: b.scalar(i, BIAS_COL),
            WARM: b.scalar(i, WARM_COL),
            STEP: b.scalar(i, STEPS),
        })

    def _sync_user_state(self, buckets: list[Bucket]) -> None:
        """Follows what users do to ``opt.state`` as with any torch.optim optimizer:
        ``opt.state[p] = {}`` (or deleting it) resets that parameter's state, and
        assigning a new tensor to a state key copies it in."""
        if self.state is not getattr(self, "_state_obj", None):  # opt.state = {...} replaced
            self._watch_state()
            self._watch.dirty = True
        if not self._watch.dirty:
            return  # nothing edited since the last step: O(1)
        for b in buckets:
            for i, p in enumerate(b.params):
                if not b.exposed[i]:
                    continue
                entry = self.state.get(p)
                if entry is not None and len(entry) == 5 and _is_view(entry.get(EXP_AVG), b.exp_avg_views[i]) \
                        and _is_view(entry.get(EXP_AVG_D), b.exp_avg_d_views[i]):
                    continue
                if not entry:  # reset
                    b.reset_state(i)
                    b.exposed[i] = False
                    b.all_exposed = False
                    self.state.pop(p, None)
                    continue
                merged = {EXP_AVG: b.exp_avg_views[i], EXP_AVG_D: b.exp_avg_d_views[i],
                          BIAS: b.scalar(i, BIAS_COL), WARM: b.scalar(i, WARM_COL),
                          STEP: b.scalar(i, STEPS), **entry}
                for key in (EXP_AVG, EXP_AVG_D):
                    merged[key] = local(merged[key])
                    checkpoint.state_tensor(f"opt.state[p][{key!r}]", merged[key], b.tensors[i].shape)
                for key in (BIAS, WARM, STEP):
                    checkpoint.scalar(f"opt.state[p][{key!r}]", merged[key])
                self._write_state(b, i, {k: v.clone() if isinstance(v, Tensor) else v
                                         for k, v in merged.items()})
        self._watch.dirty = False

    # ---------------------------------------------------------- hyper-params

    def _device_hparams(self, buckets: list[Bucket]) -> dict:
        """The float64 ``[n_groups, 6]`` hyper-parameter table on each bucket's device.

        Uploaded only when a group's values changed (an LR scheduler that assigns a
        Python float costs one small non-blocking copy); a tensor lr is copied on the
        device every step, never read by the host."""
        key = tuple(_hparam_key(g) for g in self.param_groups)
        devices = {b.device for b in buckets}
        if key != self._hparam_key or not devices.issubset(self._hparams):
            for gi, group in enumerate(self.param_groups):
                check_group(group, f" in param group {gi}")
            rows = torch.tensor([_hparam_row(g) for g in self.param_groups], dtype=torch.float64)
            rows = rows.reshape(-1, len(HPARAM_COLUMNS))
            if self.capturable and _capturing():
                raise RuntimeError("ESGDM hyper-parameters changed during CUDA graph capture: set them "
                                   "before capturing (use a tensor lr to change lr between replays)")
            for device in devices:
                table = self._hparams.get(device)
                if table is None or table.shape != rows.shape:
                    self._hparams[device] = rows.to(device)
                elif device.type == "cuda":
                    table.copy_(rows.pin_memory(), non_blocking=True)  # same address: graphs see it
                else:
                    table.copy_(rows)
            self._hparam_key = key
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, Tensor):
                for device in devices:
                    self._hparams[device][gi, 0].copy_(lr.reshape(()), non_blocking=True)
        return self._hparams

    # -------------------------------------------------------------------- step

    def _gather(self, b: Bucket) -> tuple[Optional[list[int]], list[Tensor]]:
        """Indices (None: all) and gradients of the tensors of ``b`` that have one, laid
        out like their state.  Raises before anything is written."""
        if _FRONTEND is not None and not b.any_dtensor and not ops._is_compiling():
            grads, present, like = _FRONTEND.gather_grads(b.params)
            if present and like and b.all_dense:
                return None, grads  # every gradient there and laid out like its state
        else:
            grads = [p.grad for p in b.params] if ops._is_compiling() else list(map(_grad_of, b.params))
        if b.any_dtensor:
            grads = [None if g is None else local(g) for g in grads]
        idx = None
        if any(g is None for g in grads):
            idx = [i for i, g in enumerate(grads) if g is not None]
            grads = [grads[i] for i in idx]
        if any(g.is_sparse for g in grads) if ops._is_compiling() else any(map(_is_sparse, grads)):
            k = next(k for k, g in enumerate(grads) if g.is_sparse)
            i = k if idx is None else idx[k]
            raise RuntimeError(
                f"ESGDM does not support sparse gradients (parameter of shape {tuple(b.params[i].shape)})")
        return idx, self._match_layout(b, idx, grads)

    @staticmethod
    def _match_layout(b: Bucket, idx: Optional[list[int]], tensors: list[Tensor]) -> list[Tensor]:
        """``tensors`` with the strides of their parameters' state (copied where not)."""
        want = b.strides if idx is None else [b.strides[i] for i in idx]
        if list(map(Tensor.stride, tensors)) == list(want):
            return tensors  # the usual case, checked at C speed
        out = []
        for k, (t, st) in enumerate(zip(tensors, want)):
            i = k if idx is None else idx[k]
            p = b.tensors[i]
            if tuple(t.shape) != tuple(p.shape):
                raise RuntimeError(f"a gradient has shape {tuple(t.shape)}, its parameter {tuple(p.shape)}")
            if not same_layout(t, p.shape, st):
                t = torch.empty_strided(p.shape, st, dtype=t.dtype, device=t.device).copy_(t)
            out.append(t)
        return out

    def _flags(self) -> int:
        return (FLAG_EXACT if self.exact else 0) | (FLAG_STOCHASTIC_ROUNDING if self.stochastic_rounding else 0)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Performs one optimization step.

        Args:
            closure (callable, optional): re-evaluates the model (zeroing the gradients
                and calling ``backward()``) and returns the loss.  Needed on D-steps
                with ``hvp="finite_difference"``.

        If anything raises before the update is applied (a missing graph, a sparse
        gradient, an invalid hyper-parameter, an unavailable backend, a layout that
        cannot be stepped), parameters, optimizer state and counters are left exactly
        as they were.  With ``torch.amp.GradScaler`` (``scaler.step(opt)``) the kernels
        unscale the gradients and skip the whole step on the device when an inf was found.
        """
        if closure is None:
            return self._step(None)
        return self._step_with_closure(closure)

    @torch.compiler.disable
    def _step_with_closure(self, closure: Callable[[], Any]):
        # The closure draws from torch's process-wide generators, and a finite-difference
        # D-step rewinds them for its probe: order the closures of all threads (esgdm.hvp).
        with GENERATORS.hold(exclusive=self.hvp != "autograd" and self.is_d_step()):
            return self._step(closure)

    def _evaluate(self, closure: Optional[Callable[[], Any]], d_step: bool):
        """The main evaluation of the closure: ``(loss, random state before it)``.

        On a D-step that may take finite differences it records what the probe needs:
        the random state to replay and the precision the closure computes in.  Until one
        such evaluation has succeeded, an evaluation that fails because the model cannot
        keep a graph of its gradients (``hvp="auto"``: a compiled backward refuses
        ``create_graph=True``) or because torch.func refuses saved-tensor hooks is run
        again, with the random state and the buffers as they were before it."""
        if closure is None:
            self._precision = None
            return None, None
        fd_possible = d_step and self.hvp != "autograd"
        rng = RngSnapshot() if fd_possible else None
        self._precision = ComputePrecision(watch_saves=self._watch_saves) if fd_possible else None
        guard = None
        if fd_possible and not self._evaluated:
            guard = BufferGuard(self._module_trees(self._all_params()))
            guard.snapshot()
        with torch.enable_grad():
            while True:
                try:
                    if self._precision is None:
                        return closure(), rng
                    with self._precision:  # what the closure computes in sizes the probe
                        loss = closure()
                    self._evaluated = True
                    return loss, rng
                except RuntimeError as e:
                    if guard is None:
                        raise
                    if self._precision.refused_by(e):
                        self._watch_saves = False
                    elif self.hvp == "auto" and not self._fd_fallback and create_graph_failed(e):
                        self._fall_back(e)
                    else:
                        raise
                rng.restore()
                guard.restore()

    def _fall_back(self, error: BaseException) -> None:
        """``hvp="auto"``: from now on Hessian-vector products come from finite differences."""
        warn_user(f"esgdm: the double backward failed ({str(error).splitlines()[0]}); "
                  "hvp='auto' takes Hessian-vector products by finite differences from now on")
        self._fd_fallback = True

    def _step(self, closure: Optional[Callable[[], Any]]):
        """The body of :meth:`step`."""
        d_step = self.is_d_step()
        loss, rng = self._evaluate(closure, d_step)

        buckets = self.buckets()
        self._sync_user_state(buckets)
        hparams = self._device_hparams(buckets)
        work = []  # (bucket, active indices, grads): every check runs before any write
        for b in buckets:
            idx, grads = self._gather(b)
            if grads:
                work.append((b, idx, grads))
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        hvps_by_bucket: list[Optional[list[Tensor]]] = [None] * len(work)
        if d_step and closure is None and work and _state_init_call(work):
            # torch.distributed.checkpoint creates optimizer state by stepping with zero
            # gradients (and lr 0): show fresh state and change nothing else.
            for b, idx, _ in work:
                for i in (range(len(b)) if idx is None else idx):
                    self._expose_state(b, i)
            return loss
        if d_step and self.hvp == "finite_difference" and closure is None and work:
            raise RuntimeError(
                "hvp='finite_difference' needs opt.step(closure) on D-steps: a closure that "
                "zeroes the gradients, computes the loss on the batch and calls loss.backward()")
        if d_step and work:
            hvps_by_bucket = self._hvps(work, closure, rng)

        # Everything that can fail on bad input has run; from here on we write.
        flags = self._flags()
        for (b, idx, grads), hvps in zip(work, hvps_by_bucket):
            backend, note = self._chosen[b.key]
            if note is not None:
                backends.warn_once(note)
            self._apply(b, backend.name, idx, grads, hvps, hparams[b.device], grad_scale, found_inf, flags)
            if not b.all_exposed:  # first gradient of some tensor: show its state
                for i in (range(len(b)) if idx is None else idx):
                    if not b.exposed[i]:
                        self._expose_state(b, i)
                b.all_exposed = all(b.exposed)
        self._watch.dirty = False  # our own writes to opt.state above
        self._count_step(d_step, found_inf)
        return loss

    def _count_step(self, d_step: bool, found_inf: Optional[Tensor]) -> None:
        """Advances the schedule's counters.  A step that GradScaler found an inf in
        does not count; that is known on the device only, so it is settled lazily, the
        next time the schedule is asked (one read of a value computed long before)."""
        self._settle()
        sched = self._schedule
        if found_inf is not None:
            sched.pending_inf = (found_inf, sched.steps, sched.since_d)
        if d_step:
            sched.since_d = 0
        sched.steps += 1
        sched.since_d += 1

    def _settle(self) -> None:
        pending = self._schedule.pending_inf
        if pending is not None:
            self._schedule.pending_inf = None
            found_inf, steps, since = pending
            if float(found_inf) != 0:
                self._schedule.steps, self._schedule.since_d = steps, since

    @property
    def steps(self) -> int:
        """Calls of ``step()`` so far (a step GradScaler skipped does not count)."""
        self._settle()
        return self._schedule.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._settle()
        self._schedule.steps = value

    @property
    def steps_since_d(self) -> int:
        """Steps since the last D-step."""
        self._settle()
        return self._schedule.since_d

    @steps_since_d.setter
    def steps_since_d(self, value: int) -> None:
        self._settle()
        self._schedule.since_d = value

    def _apply(self, b: Bucket, kernel: str, idx, grads, hvps, hparams, grad_scale, found_inf, flags) -> None:
        """Runs the op on bucket ``b``'s active tensors, laid out as it expects."""
        full = idx is None
        params = b.tensors if full else [b.tensors[i] for i in idx]
        writeback = []
        if not b.all_dense:  # strided slices: step a dense copy, then write it back
            for k, i in enumerate(range(len(b)) if full else idx):
                if not b.dense[i]:
                    params = list(params) if params is b.tensors else params
                    t = params[k]  # (an empty tensor's .contiguous() keeps odd strides)
                    params[k] = t.contiguous() if t.numel() else torch.empty(t.shape, dtype=t.dtype, device=t.device)
                    writeback.append((b.tensors[i], params[k]))
        exp_avgs = b.exp_avg_views if full else [b.exp_avg_views[i] for i in idx]
        exp_avg_ds = b.exp_avg_d_views if full else [b.exp_avg_d_views[i] for i in idx]
        if hvps is not None:
            hvps = self._match_layout(b, idx, [local(h) for h in hvps] if b.any_dtensor else hvps)
        ops.step_(params, grads, exp_avgs, exp_avg_ds, hvps, b.scalars, b.index(idx), hparams,
                  grad_scale, found_inf, flags, self.seed, kernel, _checked=True)
        for p, work in writeback:
            p.copy_(work)

    # --------------------------------------------------------------- curvature

    def _shared_seed(self) -> int:
        """The seed, agreed on by every rank of a distributed run (rank 0's) at first use."""
        if not self._seed_shared:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                seed = [self.seed]
                dist.broadcast_object_list(seed, src=0)
                self.seed = int(seed[0])
            self._seed_shared = True
        return self.seed

    def _signs(self, params: list[Tensor]) -> list[Tensor]:
        """The Rademacher vectors of this step, one per parameter, from the keyed
        generator of :mod:`esgdm.signs` (the global RNG is not touched)."""
        seed = self._shared_seed()
        return [draw_signs(seed, self.steps, self._param_keys[id(p)], p) if not is_dtensor(p)
                else _shard_signs(seed, self.steps, self._param_keys[id(p)], p) for p in params]

    @torch.compiler.disable
    def _hvps(self, work, closure, rng) -> list[list[Tensor]]:
        """Hessian-vector products of every active tensor, split back by bucket.

        Kept out of torch.compile graphs: autograd.grad and the closure break the graph
        anyway, and the sign keys are host integers that must not be traced."""
        params = [b.params[i] for b, idx, _ in work for i in (range(len(b)) if idx is None else idx)]
        grads = [g for _, _, gs in work for g in gs]
        use_fd = self.hvp == "finite_difference" or (self.hvp == "auto" and self._fd_fallback)
        if not use_fd and self._any_dtensor:
            if self.hvp == "auto" and closure is not None:
                use_fd = True
            else:
                raise RuntimeError(
                    "sharded (DTensor, e.g. FSDP2 fully_shard) parameters cannot take a double backward: "
                    "construct ESGDM(..., hvp='finite_difference') and call opt.step(closure) with a "
                    "closure that zeroes the gradients, computes the loss and calls loss.backward()")
        if self.hvp == "auto" and not use_fd and not any(g.grad_fn is not None for g in grads):
            if closure is None:
                raise RuntimeError(
                    "ESGD-M needs a Hessian-vector product on this step and the gradients carry no graph. "
                    "Either call loss.backward(create_graph=opt.should_create_graph()) before "
                    "opt.step(), or pass a closure, opt.step(closure), to take it by finite differences")
            use_fd = True
        if use_fd:
            hvps = self._fd_hvps(params, grads, closure, rng)
        else:
            try:
                hvps = autograd_hvp(params, grads, self._signs(params), fd_available=self.hvp == "auto")
            except RuntimeError as e:
                if not no_double_backward(e):
                    raise
                if not (self.hvp == "auto" and closure is not None):
                    raise RuntimeError(
                        f"the double backward for the Hessian-vector product failed: {str(e).splitlines()[0]} "
                        "Take it by finite differences instead: construct ESGDM(..., hvp='auto') (or "
                        "hvp='finite_difference') and call opt.step(closure) with a closure that zeroes "
                        "the gradients, computes the loss and calls loss.backward()") from e
                self._fall_back(e)
                hvps = self._fd_hvps(params, grads, closure, rng)
        out, start = [], 0
        for _, _, gs in work:
            out.append(hvps[start:start + len(gs)])
            start += len(gs)
        return out

    def _fd_hvps(self, params, grads, closure, rng) -> list[Tensor]:
        if closure is None:
            raise RuntimeError("finite-difference curvature needs opt.step(closure) on D-steps")
        idle = [p for b in self._buckets for p in b.params if p.grad is None]
        # The probe restores each .grad: give it the parameters' own (DTensors under FSDP2).
        grads = [p.grad.detach() if is_dtensor(p) else g.detach() for p, g in zip(params, grads)]
        try:
            return finite_difference_hvp(params, grads, self._signs(params), closure, rng,
                                         self.fd_scheme, self.fd_radius, precision=self._precision,
                                         modules=self._module_trees(self._all_params()))
        finally:
            for p in idle:  # the probe must not leave gradients behind
                p.grad = None

    # ------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """The optimizer state, with a ``global_state`` entry as the original ``esgd.ESGD``."""
        self._settle()
        self.buckets()
        global_state = {
            "update_d_every": self.update_d_every,
            "d_warmup": self.d_warmup,
            "steps": self.steps,
            "steps_since_d": self.steps_since_d,
            "seed": self.seed,
            "state_dtype": str(self.state_dtype or torch.float32).replace("torch.", ""),
        }
        out = {"global_state": global_state, **super().state_dict()}
        out["state"] = {k: dict(v) for k, v in out["state"].items()}  # plain dicts: weights_only loads
        for group in out["param_groups"]:  # torch.distributed.checkpoint keeps only these
            group[checkpoint.GROUP_KEY] = dict(global_state)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint written by :meth:`state_dict` or by the original ``esgd.ESGD``.

        State is copied into this optimizer's buffers (any device, any state dtype);
        everything is checked before anything changes.
        """
        for hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        loaded = checkpoint.validate(state_dict, self.param_groups, check_group)
        self.buckets()  # raises (before any write) if the parameters cannot be bucketed

        # All checked: now write.
        for group, new in zip(self.param_groups, loaded["groups"]):
            group.clear()
            group.update(new)
        counters = loaded["counters"]
        seed = counters.pop("seed")
        self._schedule = _Schedule(counters.pop("steps"), counters.pop("steps_since_d"))
        self.__dict__.update(counters)
        if seed is not None:
            self.seed, self._seed_shared = seed, True
        self._hparam_key = None
        self.state.clear()
        for b in self._buckets:
            b.exposed = [False] * len(b)
            for i, p in enumerate(b.params):
                # The loaded values may be views of this very state (torch.distributed.
                # checkpoint loads in place into what state_dict() returned): copy, then
                # reset only what the checkpoint does not cover.
                if p in loaded["state"]:
                    self._write_state(b, i, loaded["state"][p])
                else:
                    b.reset_state(i)
            b.all_exposed = all(b.exposed)

        for hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            hook(self)

    # -------------------------------------------------------------- copies

    def __getstate__(self) -> dict:
        # Buckets hold views and device tables: rebuilt from ``state`` after a copy.
        self._settle()
        self.buckets()
        state = dict(self.__dict__)
        state["state"] = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
                          for p, s in self.state.items()}
        for key in ("_buckets", "_chosen", "_hparams"):
            state[key] = [] if key == "_buckets" else {}
        state["_signature"] = None
        state["_hparam_key"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._watch_state()
        self._watch.dirty = True


class _Watch:
    """Set when user code edits ``opt.state`` (a parameter's entry replaced, deleted or
    changed), so that a step looks at the state only when something changed."""

    def __init__(self):
        self.dirty = False


class _WatchedEntry(dict):
    """One parameter's state dict: edits flag the optimizer's :class:`_Watch`."""

    __slots__ = ("_watch",)

    def __init__(self, watch: _Watch, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._watch = watch

    def _edit(name):  # noqa: N805 - builds the flagging methods below
        def method(self, *args, **kwargs):
            self._watch.dirty = True
            return getattr(dict, name)(self, *args, **kwargs)
        method.__name__ = name
        return method

    for _name in ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update", "setdefault"):
        locals()[_name] = _edit(_name)
    del _name, _edit

    def __reduce__(self):  # copies are plain dicts (the optimizer re-wraps them)
        return (dict, (dict(self),))


class _WatchedState(collections.defaultdict):
    """``opt.state``: a ``defaultdict(dict)`` whose edits flag a :class:`_Watch`."""

    def __init__(self, watch: _Watch, *args):
        super().__init__(dict, *args)
        self._watch = watch

    def _edit(name):  # noqa: N805
        def method(self, *args, **kwargs):
            self._watch.dirty = True
            return getattr(collections.defaultdict, name)(self, *args, **kwargs)
        method.__name__ = name
        return method

    for _name in ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update", "setdefault"):
        locals()[_name] = _edit(_name)
    del _name, _edit

    def __reduce__(self):  # copies are plain defaultdicts (the optimizer re-wraps them)
        return (collections.defaultdict, (dict, dict(self)))


class _Schedule:
    """The host counters of the D-step schedule.  A plain object, not attributes of the
    optimizer: torch.compile replays writes to it after a compiled step (writes to
    Optimizer attributes made inside a compiled step() are dropped)."""

    def __init__(self, steps: int = 0, since_d: int = 0):
        self.steps = steps
        self.since_d = since_d
        self.pending_inf: Optional[tuple] = None  # (found_inf, steps, since_d) to settle


def draw_signs(seed: int, step: int, key: int, p: Tensor) -> Tensor:
    """The signs of parameter ``p`` (optimizer-order index ``key``) at ``step``."""
    return rademacher(seed, step, key, p.shape, dtype=p.dtype, device=p.device)


def _frontend_helpers():
    """esgdm._C's C++ helpers for the per-step bookkeeping, if the extension has them."""
    try:
        from esgdm.backends.cpp_impl import _C
    except Exception:  # noqa: BLE001 - the helpers are an optimisation only
        return None
    return _C if _C is not None and hasattr(_C, "layout_key") and hasattr(_C, "gather_grads") else None


_FRONTEND = _frontend_helpers()


def _state_init_call(work) -> bool:
    """Whether this D-step is torch.distributed.checkpoint's state initialisation: no
    closure, no gradient with a graph, every gradient zero (read back only here)."""
    grads = [g for _, _, gs in work for g in gs]
    return all(g.grad_fn is None for g in grads) and not any(bool(g.any()) for g in grads)


def _is_view(exposed: Any, view: Tensor) -> bool:
    return exposed is view or (is_dtensor(exposed) and exposed._local_tensor is view)


def _shard_of(value: Tensor, p: Tensor) -> Tensor:
    """What of a state value belongs in ``p``'s local state: a DTensor's local shard
    (sharded like ``p`` when it came from this optimizer), a plain tensor's slice for
    ``p``'s shard when ``p`` is a DTensor and ``value`` is whole, else the value."""
    if is_dtensor(value):
        if is_dtensor(p) and value.placements == p.placements and value.device_mesh == p.device_mesh:
            return value._local_tensor
        value = value.full_tensor()
    if is_dtensor(p) and tuple(value.shape) == tuple(p.shape):
        return _local_block(value, p)
    return value


def _local_block(full: Tensor, p: Tensor) -> Tensor:
    """The block of the whole tensor ``full`` that DTensor ``p``'s local shard holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def _shard_signs(seed: int, step: int, key: int, p: Tensor) -> Tensor:
    """The local shard's part of DTensor ``p``'s signs: exactly the elements an unsharded
    run draws for them (drawn directly when the shard is a run of whole rows)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    device = p._local_tensor.device
    if tuple(shape[1:]) == tuple(p.shape[1:]):  # rows [offset[0], offset[0] + shape[0])
        row = math.prod(p.shape[1:])
        return rademacher(seed, step, key, shape, dtype=p.dtype, device=device, start=offset[0] * row)
    return _local_block(rademacher(seed, step, key, p.shape, dtype=p.dtype, device=device), p).contiguous()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


#: The name of the original implementation's class.
ESGD = ESGDM

__all__ = ["ESGD", "ESGDM", "check_group"]
