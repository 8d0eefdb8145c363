"""``esgdm.ESGDM``: the ESGD-M optimizer as a ``torch.optim.Optimizer``.

This class owns the torch.optim surface (param groups, hooks, ``state_dict``, copies)
and the D-step schedule, and delegates the rest: argument checks to
:mod:`esgdm.hyperparams`, the flat state, its views and every check before a write to
the bucket store (:mod:`esgdm.store`), the Hessian-vector products, signs and seed to
:mod:`esgdm.curvature`, the checkpoint format to :mod:`esgdm.checkpoint`.  Every
bucket is stepped by one call of the ``esgdm::step_`` operator (:mod:`esgdm.ops`).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from esgdm import backends, checkpoint, traced
from esgdm.buckets import Bucket, local
from esgdm.checkpoint import check_count, check_seed
from esgdm.curvature import Curvature, default_seed, draw_signs, state_init_call
from esgdm.guards import GENERATORS, drain_at_exit, in_process_group
from esgdm.hvp import trainer_hint
from esgdm.hyperparams import (
    HVP_MODES,
    backend_for_switches,
    check_curvature_options,
    check_group,
    check_param,
    check_state_dtype,
    flag,
)
from esgdm.rule import FLAG_EXACT, FLAG_STOCHASTIC_ROUNDING, seed32
from esgdm.store import BucketStore, all_params


class ESGDM(Optimizer):
    r"""ESGD-M: equilibrated SGD with Nesterov momentum and an Adamax-style curvature estimate.

    Every few steps (a *D-step*) ESGD-M takes a Hessian-vector product ``h = H v``
    with a Rademacher vector ``v`` and keeps ``D = max(b2 * D, h * h)`` as a
    per-coordinate estimate of ``diag(H^2)``; every step divides a Nesterov-momentum
    step by ``sqrt(D) + eps``.  The learning rate is invariant to rescaling the loss
    or the parameters (while ``eps`` is small against ``sqrt(D)``).  The exact rule is
    in :mod:`esgdm.rule`.

    On a D-step the gradients must carry a graph (``hvp="autograd"``), so call::

        loss.backward(create_graph=opt.should_create_graph())
        opt.step()

    or give ``step`` a closure and use ``hvp="finite_difference"`` (or ``"auto"``).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor): step size (default 1.0; start near 0.5).  A one-element
            tensor lr is checked once, then read on the device by the kernels, never by
            the host (so are tensor betas, lr_warmup, eps and weight_decay).
        betas (tuple[float, float]): momentum decay and the inf-norm decay of the
            curvature estimate (default (0.9, 0.999)).
        lr_warmup (float): exponential warmup; the step size on a parameter's k-th
            D-step is ``lr * (1 - lr_warmup**k)``; 0 disables it (default 0.99).
        eps (float): added to ``sqrt(D)`` (default 1e-4).  The learning rate is
            invariant to rescaling the loss or the parameters while ``eps`` is small
            against ``sqrt(D)`` (exactly, with ``eps`` rescaled as ``sqrt(D)`` is).
        weight_decay (float): decoupled weight decay, scaled by the current step size
            (default 0).
        update_d_every (int): curvature refresh period in steps (default 10).
        d_warmup (int): the first ``d_warmup`` steps always refresh curvature (default 20;
            at least 1: the first step needs curvature).
        backend (str, optional): ``"auto" | "triton" | "cuda" | "cpu" | "torch"``;
            defaults to ``$ESGDM_BACKEND`` or ``"auto"``.
        generator (torch.Generator, optional): where the optimizer's seed is drawn from
            (default: derived from ``torch.initial_seed()``, which ``torch.manual_seed``
            sets; the global generator is never drawn from).
        seed (int, optional): the seed of the sign vectors and stochastic rounding, an
            integer in ``[0, 2**64)`` (every bit counts; overrides ``generator``).  Saved
            in ``state_dict()``.
        hvp (str): how D-steps get ``H v``: ``"autograd"`` (default; the backward pass
            needs ``create_graph=True``), ``"finite_difference"`` (needs
            ``step(closure)``; no double backward) or ``"auto"`` (autograd when the
            gradients carry a graph, else finite differences with a closure; falls back
            to finite differences, warning once, when an op has no double backward).
        fd_scheme (str): ``"forward"`` (default; one extra gradient per D-step) or
            ``"central"`` (two extra gradients, more accurate).
        fd_radius (float, optional): the finite-difference step ``r``.
        exact (bool): compute the original ESGD-M rule bit for bit: coordinates whose
            curvature was never observed (``D == 0``) step by ``g / eps`` (so every
            group's ``eps`` must be > 0).  By default they use the tensor's mean observed
            curvature instead (see README).
        stochastic_rounding (bool, optional): round 16-bit parameters stochastically
            when writing them back (default: True unless ``exact``).
        state_dtype (torch.dtype, optional): ``torch.float32`` (default),
            ``torch.bfloat16`` or ``torch.uint8`` (8-bit blocks, for tensors of at least
            4096 elements) for ``exp_avg`` and ``exp_avg_d``; math stays float32.
        capturable (bool): allow capturing ``step()`` in a CUDA graph: the step then
            refuses host uploads during capture (set hyper-parameters before
            capturing; change lr through a tensor lr).  The step never syncs with the
            host either way.
        maximize (bool): maximize the objective: the gradient's sign is flipped, the
            curvature estimate (built from ``h * h``) is not (default False; can be set
            per parameter group).
        differentiable (bool): only False: the step cannot be differentiated through
            (True raises ValueError).
        foreach, fused (bool, optional): torch.optim's implementation switches.
            ``fused=True`` asks for a fused kernel (any backend but ``"torch"``),
            ``fused=False`` or ``foreach=False`` for the unfused per-tensor step (the
            ``"torch"`` backend), ``foreach=True`` for a multi-tensor one (any backend
            but ``"torch"``); None leaves the choice to ``backend``.  Both True, or a
            ``backend=`` that contradicts them, raises ValueError.

    Complex parameters are stepped as their real view (``torch.view_as_real``), the
    Hessian-vector product and the sign vector included, as the built-in optimizers
    do; their ``exp_avg`` and ``exp_avg_d`` are shown as complex tensors (views of the
    real state; ``state_dtype=torch.bfloat16`` is refused for them).

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
        backend: str | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        hvp: str = "autograd",
        fd_scheme: str = "forward",
        fd_radius: float | None = None,
        exact: bool = False,
        stochastic_rounding: bool | None = None,
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        defaults = dict(lr=lr, betas=betas, lr_warmup=lr_warmup, eps=eps, weight_decay=weight_decay,
                        maximize=maximize, differentiable=differentiable)
        exact = bool(flag("exact", exact))
        stochastic_rounding = flag("stochastic_rounding", stochastic_rounding, none_ok=True)
        capturable = bool(flag("capturable", capturable))
        check_group(defaults, exact=exact)
        self.update_d_every = check_count("update_d_every", update_d_every)
        self.d_warmup = check_count("d_warmup", d_warmup)
        self.backend = backend_for_switches(backend, foreach, fused)
        self.foreach, self.fused = foreach, fused
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator: {generator!r} (must be a torch.Generator)")
        if seed is not None:
            seed = check_seed(seed)
        check_curvature_options(hvp, fd_scheme, fd_radius)
        check_state_dtype(state_dtype)
        self.hvp, self.fd_scheme, self.fd_radius = hvp, fd_scheme, fd_radius
        self.exact = exact
        self.stochastic_rounding = (not exact) if stochastic_rounding is None else stochastic_rounding
        self.state_dtype = state_dtype
        self.capturable = capturable
        shared = seed is not None  # else the ranks of a distributed run agree on it at first use
        if seed is None:
            if generator is not None:
                seed = int(torch.randint(0, 2**62, (), generator=generator).item())
            else:
                seed = default_seed()
        self._curvature = Curvature(seed, shared)
        self._schedule = _Schedule()
        self._store = BucketStore()
        self._serial = traced.number(self)  # (what a traced step asks esgdm.traced about)
        super().__init__(params, defaults)
        self._store.watch_state(self)
        if in_process_group():  # torch's abort at exit after collectives (esgdm.guards)
            drain_at_exit()

    @property
    def seed(self) -> int:
        """The seed of the sign vectors and of stochastic rounding (saved in ``state_dict()``)."""
        return self._curvature.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._curvature.seed = value

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
            check_group(group, f" in param group {n_before}", exact=self.exact)
            ids = [id(p) for p in group["params"]]
            if len(set(ids)) != len(ids) or seen.intersection(ids):
                raise ValueError(f"param group {n_before} repeats a parameter (the same tensor passed "
                                 "twice would be stepped twice): pass each parameter once")
            for p in group["params"]:
                check_param(p, self.state_dtype)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        self._store.hparam_tables_for = None

    @torch.compiler.disable
    def should_create_graph(self) -> bool:
        """Whether the next ``step()`` takes a Hessian-vector product by double backward,
        so the backward pass before it needs ``create_graph=True``::

            loss.backward(create_graph=opt.should_create_graph())

        False with ``hvp="finite_difference"``, which needs no graph, and with
        ``hvp="auto"`` after it fell back to finite differences.

        Under ``torch.compile`` it runs eagerly (a graph break): traced, its answer would
        make the compiled code guard on the step counters and compile again every step.
        """
        if self._curvature.uses_finite_differences(self.hvp):
            return False
        return self._d_step_next()

    @torch.compiler.disable
    def is_d_step(self) -> bool:
        """Whether the next ``step()`` refreshes the curvature estimate (eager under
        ``torch.compile``, as :meth:`should_create_graph`)."""
        return self._d_step_next()

    def _d_step_next(self) -> bool:
        """:meth:`is_d_step`, traced inside a compiled step (its counters are symbolic there)."""
        self._settle()
        return self.steps < self.d_warmup or self.steps_since_d >= self.update_d_every

    def buckets(self) -> tuple[Bucket, ...]:
        """The (device, dtype) buckets of the current parameters, for reading (their
        ``nbytes()``, dtypes, views): a tuple, brought up to date with the parameters
        first as the next ``step()`` would (a moved or re-typed parameter's state moves
        along; no value changes)."""
        return tuple(self._store.sync(self))

    def backend_for(self, bucket: Bucket) -> backends.Backend:
        """The backend that steps ``bucket`` (one of :meth:`buckets`)."""
        return self._store.backend_for(bucket)

    # -------------------------------------------------------------------- step

    def _flags(self) -> int:
        return (FLAG_EXACT if self.exact else 0) | (FLAG_STOCHASTIC_ROUNDING if self.stochastic_rounding else 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
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

        Under ``torch.compile``, a step whose parameters are all on the CPU runs eagerly
        (a graph break) unless the compilation demands one graph (``fullgraph=True``):
        there a trace would only add guards and wrappers around the same kernel call.
        """
        if closure is None:
            # (torch.compiler.is_compiling itself, not esgdm.ops.is_compiling: after a
            # graph break Dynamo compiles the helpers an eager frame calls, and a compiled
            # helper answers True)
            if torch.compiler.is_compiling() and not traced.ask(self._serial, "_leaves_trace"):
                return self._step(None)  # traced, one graph
            return self._step_untraced()
        return self._step_with_closure(closure)

    def _leaves_trace(self) -> bool:
        """Whether a traced :meth:`step` should run eagerly instead (asked once per trace,
        through :func:`esgdm.traced.ask`): every parameter on the CPU, where a trace adds
        guards and wrappers around the same one-call kernel and no CUDA graph can replay
        it, and a compilation that allows a graph break."""
        return (traced.CPU_STEPS_LEAVE_GRAPH
                and all(local(p).device.type == "cpu" for p in all_params(self.param_groups))
                and not traced.one_graph_demanded())

    @torch.compiler.disable
    def _step_untraced(self):
        # Also the eager step: after a graph break inside step(), Dynamo runs step()'s
        # frame eagerly but would still compile every function it calls, one frame each.
        return self._step(None)

    @torch.compiler.disable
    def _step_with_closure(self, closure: Callable[[], Any]):
        # The closure draws from torch's process-wide generators, and a finite-difference
        # D-step rewinds them for its probe: order the closures of all threads (esgdm.guards).
        with GENERATORS.hold(exclusive=self.hvp != "autograd" and self._d_step_next()):
            return self._step(closure)

    def _step(self, closure: Callable[[], Any] | None):
        """The body of :meth:`step`."""
        d_step = self._d_step_next()
        store = self._store
        loss, rng = self._curvature.evaluate(self, closure, d_step)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if not d_step and store.plan_step(self, grad_scale, found_inf):
            self._count_step(False, found_inf)  # (the usual plain step, tensor work in C++)
            return loss

        buckets = store.sync(self)
        store.sync_user_state(self, buckets)
        hparams = store.device_hparams(self, buckets)
        work = []  # (bucket, active indices, grads): every check runs before any write
        for b in buckets:
            idx, grads = store.gather(self, b)
            if grads:
                work.append((b, idx, grads))
        hvps_by_bucket: list[list[Tensor] | None] = [None] * len(work)
        if d_step and closure is None and work and state_init_call(self, work):
            # torch.distributed.checkpoint creates optimizer state by stepping with zero
            # gradients (and lr 0): show fresh state and change nothing else.
            for b, idx, _ in work:
                for i in (range(len(b)) if idx is None else idx):
                    store.expose_state(self, b, i)
            return loss
        if d_step and self.hvp == "finite_difference" and closure is None and work:
            raise RuntimeError(
                "hvp='finite_difference' needs opt.step(closure) on D-steps: a closure that "
                "zeroes the gradients, computes the loss on the batch and calls loss.backward()."
                + trainer_hint())
        if d_step and work:
            computed = self._curvature.hvps(self, work, closure, rng)
            for k, ((b, idx, _), hvps) in enumerate(zip(work, computed)):
                if b.any_dtensor:
                    hvps = [local(h) for h in hvps]
                store.check_like(self, b, idx, hvps, "Hessian-vector product")
                hvps_by_bucket[k] = store.match_layout(b, idx, hvps)

        # Everything that can fail on bad input has run; from here on we write.
        flags, seed = self._flags(), seed32(self.seed)
        flips = [bool(g.get("maximize", False)) for g in self.param_groups]
        ascend = flips if any(flips) else None
        for (b, idx, grads), hvps in zip(work, hvps_by_bucket):
            if ascend is not None:  # maximize: the gradient flips sign; D = max(.., h*h) needs no flip
                grads = [g.neg() if ascend[b.group_index[i]] else g
                         for i, g in zip(range(len(b)) if idx is None else idx, grads)]
            backend, note = store.backend_choice[b.key]
            if note is not None:
                backends.warn_once(note)
            store.apply(b, backend, idx, grads, hvps, hparams[b.device], grad_scale, found_inf, flags, seed)
            store.expose_stepped(self, b, idx)  # first gradient of some tensor: show its state
        store.watch.dirty = False  # our own writes to opt.state above
        self._count_step(d_step, found_inf)
        store.make_plan(self)
        return loss

    # ---------------------------------------------------------------- schedule

    def _count_step(self, d_step: bool, found_inf: Tensor | None) -> None:
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

    # ------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """The optimizer state, with a ``global_state`` entry as the original ``esgd.ESGD``."""
        self._settle()
        self._store.sync(self)
        global_state = {
            "update_d_every": self.update_d_every,
            "d_warmup": self.d_warmup,
            "steps": self.steps,
            "steps_since_d": self.steps_since_d,
            "seed": self.seed,
            "state_dtype": str(self.state_dtype or torch.float32).replace("torch.", ""),
        }
        out = {"global_state": global_state, **super().state_dict()}
        # Plain dicts (weights_only loads); an entry that is not a parameter's passes through.
        out["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in out["state"].items()}
        for entry in out["state"].values():  # 8-bit codes: the order their blocks were written in
            if isinstance(entry, dict) and checkpoint.KEY_QSCALE in entry:
                entry[checkpoint.KEY_CODE_STRIDES] = list(entry[checkpoint.KEY_EXP_AVG].stride())
        for group in out["param_groups"]:  # torch.distributed.checkpoint keeps only these
            group[checkpoint.GROUP_KEY] = dict(global_state)
        return out

    def _check_loaded_group(self, group: dict, where: str) -> None:
        check_group(group, where, exact=self.exact)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint written by :meth:`state_dict` or by the original ``esgd.ESGD``.

        State is copied into this optimizer's buffers (any device, any state dtype);
        everything is checked before anything changes.
        """
        for hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        loaded = checkpoint.validate(state_dict, self.param_groups, self._check_loaded_group, self.state_dtype)
        self._store.sync(self)  # raises (before any write) if the parameters cannot be bucketed

        # All checked: now write.
        for group, new in zip(self.param_groups, loaded["groups"]):
            group.clear()
            group.update(new)
            for key in ("maximize", "differentiable"):  # checkpoints from before these existed
                group.setdefault(key, False)
        counters = loaded["counters"]
        seed = counters.pop("seed")
        self._schedule = _Schedule(counters.pop("steps"), counters.pop("steps_since_d"))
        self.__dict__.update(counters)
        if seed is not None:
            self._curvature.seed, self._curvature.seed_shared = seed, True
        self._store.hparam_tables_for = None
        self.state.clear()
        self.state.update(loaded["other"])  # entries that are not a parameter's, as torch.optim
        self._store.load_state(self, loaded["state"])

        for hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            hook(self)

    # -------------------------------------------------------------- copies

    def __getstate__(self) -> dict:
        # The store holds views and device tables: a copy builds its own from ``state``.
        self._settle()
        self._store.sync(self)
        state = dict(self.__dict__)
        state["state"] = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
                          if isinstance(s, dict) else copy.deepcopy(s) for p, s in self.state.items()}
        state["_store"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._store = BucketStore()
        self._serial = traced.number(self)
        self._store.watch_state(self)
        self._store.watch.dirty = True


class _Schedule:
    """The host counters of the D-step schedule.  A plain object, not attributes of the
    optimizer: torch.compile replays writes to it after a compiled step (writes to
    Optimizer attributes made inside a compiled step() are dropped)."""

    def __init__(self, steps: int = 0, since_d: int = 0):
        self.steps = steps
        self.since_d = since_d
        self.pending_inf: tuple | None = None  # (found_inf, steps, since_d) to settle


#: The name of the original implementation's class.
ESGD = ESGDM

__all__ = ["ESGD", "ESGDM", "HVP_MODES", "check_group", "draw_signs"]
