"""``esgdm.ESGDM``: the ESGD-M optimizer as a ``torch.optim.Optimizer``.

This class owns the torch.optim surface (param groups, argument checks, hooks) and the
D-step schedule; the rule is :mod:`esgdm.rule`, the state lives in
:mod:`esgdm.buckets`, curvature comes from :mod:`esgdm.hvp` with signs from
:mod:`esgdm.signs`, checkpoints go through :mod:`esgdm.checkpoint`, and every bucket
is stepped by one call of the ``esgdm::step_`` operator (:mod:`esgdm.ops`).
"""

from __future__ import annotations

import collections
import copy
import math
import numbers
import operator
import sys
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from esgdm import backends, checkpoint, ops
from esgdm.buckets import STATE_DTYPES, Bucket, build_buckets, is_dtensor, local, real_view, same_layout
from esgdm.checkpoint import BIAS, EXP_AVG, EXP_AVG_D, STEP, WARM, check_count, check_seed
from esgdm.hvp import (
    FD_SCHEMES,
    GENERATORS,
    BufferGuard,
    ComputePrecision,
    ModuleTrees,
    RngSnapshot,
    autograd_hvp,
    create_graph_failed,
    finite_difference_hvp,
    no_double_backward,
    warn_user,
)
from esgdm.rule import (
    BIAS as BIAS_COL,
)
from esgdm.rule import (
    DSCALE,
    FLAG_EXACT,
    FLAG_STOCHASTIC_ROUNDING,
    HPARAM_COLUMNS,
    STEPS,
    curvature_scale,
    seed32,
)
from esgdm.rule import (
    WARM as WARM_COL,
)
from esgdm.signs import rademacher

HVP_MODES = ("autograd", "finite_difference", "auto")

_grad_of = operator.attrgetter("grad")
_dtype_of = operator.attrgetter("dtype")
_device_of = operator.attrgetter("device")
_shape_of = operator.attrgetter("shape")
_layout_of = operator.attrgetter("layout")
_STRIDED = {torch.strided}
# Device-type tests cheaper than building each tensor's torch.device (with get_device).
_ON_DEVICE_TYPE = {"cpu": operator.attrgetter("is_cpu"), "cuda": operator.attrgetter("is_cuda")}


def _check_lr(lr: Any, where: str) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.dtype.is_floating_point:
            raise ValueError(f"Invalid lr{where}: a tensor lr must hold one floating-point value, "
                             f"got {lr.dtype} of shape {tuple(lr.shape)}")
        return  # its value lives on the device: read once, when it is given (_check_lr_value)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"Invalid lr{where}: {lr!r} (must be a float or a one-element tensor)")
    if not (0.0 <= float(lr) and math.isfinite(lr)):
        raise ValueError(f"Invalid lr{where}: {lr!r} (must be finite and >= 0)")


def _default_seed() -> int:
    """A seed derived from ``torch.initial_seed()`` (what ``torch.manual_seed`` set, or
    what torch drew from the OS at start-up) without drawing from the generator: the
    user's data order and dropout masks stay as they were, and a script that seeds torch
    gets the same optimizer seed every run.  splitmix64, kept to 63 bits (an int64)."""
    m = 2**64 - 1
    x = (torch.initial_seed() + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return (x ^ (x >> 31)) >> 1


def _check_lr_value(lr: Any, where: str) -> None:
    """A tensor lr's value, read once when it is given (construction, add_param_group,
    load_state_dict); steps never read it."""
    if isinstance(lr, Tensor) and not lr.is_meta:
        value = lr.item()
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"Invalid lr{where}: {value!r} (must be finite and >= 0)")


def _flag(name: str, value: Any, none_ok: bool = False) -> bool | None:
    """A bool (or None where that means "default"): strings and numbers are refused, not
    coerced (``exact="no"`` is truthy)."""
    if isinstance(value, bool) or (none_ok and value is None):
        return value
    raise TypeError(f"Invalid {name}: {value!r} (must be True or False"
                    f"{' or None' if none_ok else ''})")


def _real(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}{where}: {value!r} (must be a float)")
    return float(value)


def _check_flags(group: dict, where: str) -> None:
    """``maximize`` and ``differentiable``, optional in a group (absent means False)."""
    for name in ("maximize", "differentiable"):
        value = group.get(name, False)
        if not isinstance(value, bool):
            raise TypeError(f"Invalid {name}{where}: {value!r} (must be True or False)")
    if group.get("differentiable", False):
        raise ValueError(f"differentiable=True is not supported{where}: the ESGD-M step runs in-place fused "
                         "kernels (and a Hessian-vector product) that autograd cannot differentiate through; "
                         "use differentiable=False")


def _check_switch(name: str, value: Any) -> bool | None:
    """``foreach``/``fused``: None or a bool, as in torch.optim."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r} (must be None, True or False)")
    return value


def _backend_for_switches(backend: str | None, foreach: bool | None, fused: bool | None) -> str:
    """The backend name that ``backend=``, ``foreach=`` and ``fused=`` ask for together.

    As in torch.optim: ``fused=True`` asks for a fused kernel (every backend but
    ``"torch"``); ``fused=False``, and ``foreach=False`` unless ``fused=True``, ask for
    the per-tensor implementation, which is the ``"torch"`` backend; ``foreach=True``
    asks for a multi-tensor step, which every backend but ``"torch"`` is.  An explicit
    ``backend=`` that contradicts them raises; ``$ESGDM_BACKEND`` gives way to them.
    """
    fused, foreach = _check_switch("fused", fused), _check_switch("foreach", foreach)
    if fused and foreach:
        raise ValueError("fused=True and foreach=True cannot both hold: pick one (ESGDM's fused "
                         "kernels are also multi-tensor, so fused=True alone covers both)")
    per_tensor = fused is False or (foreach is False and not fused)
    if backend is None:
        name = backends.check_name(backends.default_name())
        if per_tensor:
            return "torch"
        return "auto" if name == "torch" and (fused or foreach) else name
    name = backends.check_name(backend)
    if per_tensor and name not in ("auto", "torch"):
        flag = "fused=False" if fused is False else "foreach=False"
        raise ValueError(f"{flag} asks for the unfused per-tensor step, the 'torch' backend, but "
                         f"backend={name!r} is a fused kernel: drop one of them")
    if name == "torch" and (fused or foreach):
        flag = "fused=True" if fused else "foreach=True"
        raise ValueError(f"{flag} asks for a fused multi-tensor kernel, but backend='torch' steps one "
                         "tensor at a time: drop one of them")
    return "torch" if per_tensor else name


def check_group(group: dict, where: str = "", exact: bool = False) -> None:
    """Raises ValueError (TypeError for a wrong type) naming the first invalid
    hyper-parameter of ``group``.  ``exact``: the optimizer computes the original rule,
    which divides by ``eps`` where ``D == 0``, so ``eps`` must be > 0."""
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
    if exact and eps == 0:
        raise ValueError(f"Invalid eps{where}: 0.0 with exact=True (the original rule divides by "
                         "sqrt(D) + eps, and D is 0 until curvature is observed): use eps > 0, "
                         "or exact=False, whose rule never divides by zero")
    wd = _real("weight_decay", group["weight_decay"], where)
    if not (0.0 <= wd and math.isfinite(wd)):
        raise ValueError(f"Invalid weight_decay{where}: {wd!r} (must be finite and >= 0)")
    _check_flags(group, where)


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
        state_dtype (torch.dtype, optional): ``torch.float32`` (default) or
            ``torch.bfloat16`` for ``exp_avg`` and ``exp_avg_d``; math stays float32.
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
        exact = bool(_flag("exact", exact))
        stochastic_rounding = _flag("stochastic_rounding", stochastic_rounding, none_ok=True)
        capturable = bool(_flag("capturable", capturable))
        check_group(defaults, exact=exact)
        _check_lr_value(lr, "")  # construction may read it; steps never do
        self.update_d_every = check_count("update_d_every", update_d_every)
        self.d_warmup = check_count("d_warmup", d_warmup)
        self.backend = _backend_for_switches(backend, foreach, fused)
        self.foreach, self.fused = foreach, fused
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator: {generator!r} (must be a torch.Generator)")
        if seed is not None:
            seed = check_seed(seed)
        if hvp not in HVP_MODES:
            raise ValueError(f"Invalid hvp: {hvp!r}; choose one of {', '.join(map(repr, HVP_MODES))}")
        if fd_scheme not in FD_SCHEMES:
            raise ValueError(f"Invalid fd_scheme: {fd_scheme!r}; choose one of {', '.join(FD_SCHEMES)}")
        if fd_radius is not None and not (isinstance(fd_radius, numbers.Real) and fd_radius > 0
                                          and math.isfinite(fd_radius)):
            raise ValueError(f"Invalid fd_radius: {fd_radius!r} (must be finite and > 0)")
        if state_dtype is not None and state_dtype not in STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {state_dtype!r} (choose torch.float32 or torch.bfloat16)")
        self.hvp, self.fd_scheme, self.fd_radius = hvp, fd_scheme, fd_radius
        self.exact = exact
        self.stochastic_rounding = (not exact) if stochastic_rounding is None else stochastic_rounding
        self.state_dtype = state_dtype
        self.capturable = capturable
        if seed is None:
            if generator is not None:
                seed = int(torch.randint(0, 2**62, (), generator=generator).item())
            else:
                seed = _default_seed()
            self._seed_shared = False  # ranks of a distributed run agree on it at first use
        else:
            self._seed_shared = True
        self.seed = seed
        self._precision: ComputePrecision | None = None
        self._schedule = _Schedule()
        self._fd_fallback = False
        self._evaluated = False  # a D-step's main evaluation succeeded (see _evaluate)
        self._watch_saves = True  # False once torch.func refused saved-tensor hooks
        self._module_trees = ModuleTrees()  # whose buffers the probe restores
        self._buckets: list[Bucket] = []
        self._meta_signature: tuple | None = None
        self._any_dtensor = False
        self._signature: tuple | None = None
        self._chosen: dict[tuple, tuple] = {}
        self._param_keys: dict[int, int] = {}
        self._hparams: dict[torch.device, Tensor] = {}
        self._hparam_key: tuple | None = None
        super().__init__(params, defaults)
        self._watch_state()

    def _watch_state(self) -> None:
        """Makes ``self.state`` (and each entry) flag user edits (see :class:`_Watch`)."""
        self._watch = _Watch()
        state = _WatchedState(self._watch)
        for p, entry in dict(self.state).items():
            wrap = entry and isinstance(entry, dict)  # (an entry that is not a parameter's may be anything)
            dict.__setitem__(state, p, _WatchedEntry(self._watch, entry) if wrap else entry)
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
            check_group(group, f" in param group {n_before}", exact=self.exact)
            _check_lr_value(group["lr"], f" in param group {n_before}")
            ids = [id(p) for p in group["params"]]
            if len(set(ids)) != len(ids) or seen.intersection(ids):
                raise ValueError(f"param group {n_before} repeats a parameter (the same tensor passed "
                                 "twice would be stepped twice): pass each parameter once")
            for p in group["params"]:
                if not (p.dtype.is_floating_point or p.is_complex()):
                    raise ValueError("ESGDM optimizes floating-point parameters only (complex ones as their "
                                     f"real view), got one of dtype {p.dtype}")
                if p.is_complex() and self.state_dtype == torch.bfloat16:
                    raise ValueError(f"a complex parameter ({p.dtype}) cannot have state_dtype=torch.bfloat16: "
                                     "its state is shown as complex, and torch has no bfloat16 complex dtype")
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
            t = local(p)
            if t.layout != torch.strided or t.is_neg():
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is now "
                                 + (f"a {t.layout} tensor" if t.layout != torch.strided else "a negated view")
                                 + ": only plain strided tensors can be stepped")
            if _overlaps(p):
                raise ValueError(f"a parameter of shape {tuple(p.shape)} now has strides {p.stride()}: "
                                 "its elements share memory (an expanded tensor), which cannot be stepped")
            b, i = old.get(id(p), (None, 0))
            if b is not None and p in self.state and self.state[p]:
                if tuple(b.exp_avg_views[i].shape) != tuple(real_view(local(p)).shape):
                    raise ValueError(
                        f"a parameter changed shape from {tuple(b.exp_avg_views[i].shape)} to "
                        f"{tuple(real_view(local(p)).shape)} (p.data = ... with another shape): its optimizer "
                        "state cannot follow; reset it with opt.state[p] = {} first")
        new = build_buckets(self.param_groups, self.state_dtype)
        chosen = {b.key: self._resolve(b) for b in new}
        # Nothing above mutated anything; now move the existing state across (entries
        # whose key is not a parameter, which torch.optim passes through, stay as they are).
        ours = {id(p) for b in self._buckets for p in b.params} | {id(p) for p in self._all_params()}
        saved = {p: self._read_state(p) for p in list(self.state)
                 if isinstance(p, Tensor) and id(p) in ours and self.state[p]}
        for key in [k for k in self.state if isinstance(k, Tensor) and id(k) in ours]:
            del self.state[key]
        self._buckets, self._signature, self._chosen = new, layout, chosen
        self._meta_signature = self._meta_layout()
        self._param_keys = {id(p): k for k, p in enumerate(self._all_params())}
        self._hparam_key = None
        for b in new:
            for i, p in enumerate(b.params):
                if p in saved:
                    self._write_state(b, i, saved[p])
        return self._buckets

    def _resolve(self, b: Bucket) -> tuple:
        """The backend for bucket ``b`` (and its note); with ``fused=True``, a fused one."""
        backend, note = backends.resolve(self.backend, b.device, b.dtype)
        if getattr(self, "fused", None) and backend.name == "torch":
            raise backends.BackendUnavailableError(
                f"fused=True, but no fused esgdm kernel can step {b.dtype} parameters on {b.device}"
                + (f" ({note})" if note else "") + ": construct ESGDM without fused=True")
        return backend, note

    def backend_for(self, bucket: Bucket) -> backends.Backend:
        return self._chosen[bucket.key][0]

    def _read_state(self, p: Tensor) -> dict:
        """One parameter's state as the user sees it (what was assigned wins)."""
        return {k: local(v) if isinstance(v, Tensor) else v for k, v in self.state[p].items()}

    def _write_state(self, b: Bucket, i: int, saved: dict) -> None:
        """Copies one parameter's state into bucket ``b`` and exposes it as views."""
        b.exp_avg_views[i].copy_(real_view(_shard_of(saved[EXP_AVG], b.params[i])))
        b.exp_avg_d_views[i].copy_(real_view(_shard_of(saved[EXP_AVG_D], b.params[i])))
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
                as_shown = torch.view_as_complex if b.complex[i] else (lambda t: t)
                merged = {EXP_AVG: as_shown(b.exp_avg_views[i]), EXP_AVG_D: as_shown(b.exp_avg_d_views[i]),
                          BIAS: b.scalar(i, BIAS_COL), WARM: b.scalar(i, WARM_COL),
                          STEP: b.scalar(i, STEPS), **entry}
                shape = b.tensors[i].shape[:-1] if b.complex[i] else b.tensors[i].shape
                for key in (EXP_AVG, EXP_AVG_D):
                    merged[key] = local(merged[key])
                    checkpoint.state_tensor(f"opt.state[p][{key!r}]", merged[key], shape,
                                            complex_state=b.complex[i])
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
                check_group(group, f" in param group {gi}", exact=self.exact)
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

    def _gather(self, b: Bucket) -> tuple[list[int] | None, list[Tensor]]:
        """Indices (None: all) and gradients of the tensors of ``b`` that have one, checked
        (:meth:`_check_like`) and laid out like their state.  Raises before anything is
        written."""
        if _FRONTEND is not None and not b.any_dtensor and not b.any_complex and not ops._is_compiling():
            grads, _present, like, bad = _FRONTEND.gather_checked_grads(b.params)
            if like and b.all_dense:
                return None, grads  # every gradient there, checked and laid out like its state
            if bad >= 0:
                self._refuse(b, bad, grads[bad], "gradient")
            checked = True
        else:
            grads = [p.grad for p in b.params] if ops._is_compiling() else list(map(_grad_of, b.params))
            checked = False
        if b.any_dtensor:
            grads = [None if g is None else local(g) for g in grads]
        idx = None
        if any(g is None for g in grads):
            idx = [i for i, g in enumerate(grads) if g is not None]
            grads = [grads[i] for i in idx]
        if b.any_complex:  # stepped as the real view, like the parameter
            with torch.enable_grad():  # (a view that keeps the gradient's graph, for the HVP)
                grads = [real_view(g) if isinstance(g, Tensor) and g.layout == torch.strided else g
                         for g in grads]
        if not checked:
            self._check_like(b, idx, grads, "gradient")
        return idx, self._match_layout(b, idx, grads)

    def _check_like(self, b: Bucket, idx: list[int] | None, tensors: list[Tensor], what: str) -> None:
        """Raises, naming the parameter, unless each of ``tensors`` (the ``what`` of
        bucket ``b``'s tensors ``idx``, None: all) is a plain strided tensor with its
        parameter's dtype, device and shape: what the kernels may read as such (any
        strides: :meth:`_match_layout` copies what is not laid out like the state)."""
        shapes = b.shapes if idx is None else [b.shapes[i] for i in idx]
        if ops._is_compiling():
            # No attrgetter maps, nor is_neg(), under Dynamo; the compiled operator's
            # dispatcher resolves negated views (and its implementation checks again).
            ok = all(isinstance(t, Tensor) and t.layout == torch.strided and t.dtype == b.dtype
                     and t.device == b.device and t.shape == s for t, s in zip(tensors, shapes))
        else:  # list-wise, at C speed
            on_device = _ON_DEVICE_TYPE.get(b.device.type)
            try:
                ok = (set(map(_layout_of, tensors)) <= _STRIDED and set(map(_dtype_of, tensors)) <= {b.dtype}
                      and set(map(Tensor.get_device, tensors)) <= {b.device_index}
                      and (all(map(on_device, tensors)) if on_device is not None
                           else set(map(_device_of, tensors)) <= {b.device})
                      and list(map(_shape_of, tensors)) == shapes and not any(map(Tensor.is_neg, tensors)))
            except (AttributeError, TypeError):  # not a tensor: named below
                ok = False
        if not ok:
            for k, t in enumerate(tensors):
                self._refuse(b, k if idx is None else idx[k], t, what)

    def _refuse(self, b: Bucket, i: int, t: Any, what: str) -> None:
        """Raises naming parameter ``i`` of bucket ``b`` (by group and index) if ``t``
        cannot be read as its ``what``; returns if it can."""
        p = b.tensors[i]
        problem = None
        if not isinstance(t, Tensor):
            problem = f"is a {type(t).__name__}, not a tensor"
        elif t.layout != torch.strided:
            problem = (f"is sparse ({t.layout}): ESGDM does not support sparse gradients"
                       if t.is_sparse else f"has layout {t.layout}, not torch.strided")
        elif t.dtype != p.dtype:
            problem = f"has dtype {t.dtype}, parameter has dtype {p.dtype}"
        elif t.device != p.device:
            problem = f"is on {t.device}, parameter is on {p.device}"
        elif t.shape != p.shape:
            problem = f"has shape {tuple(t.shape)}, parameter has shape {tuple(p.shape)}"
        elif t.is_neg():
            problem = "is a negated view (is_neg()): its memory holds the opposite values; pass t.resolve_neg()"
        if problem is not None:
            raise RuntimeError(f"{what} of {self._describe(b.params[i])} {problem}")

    def _describe(self, p: Tensor) -> str:
        """``"parameter 2 in group 0"``: where ``p`` is in the param groups (error paths)."""
        for gi, group in enumerate(self.param_groups):
            for k, q in enumerate(group["params"]):
                if q is p:
                    return f"parameter {k} in group {gi}"
        return f"a parameter of shape {tuple(p.shape)}"  # pragma: no cover - buckets follow the groups

    @staticmethod
    def _match_layout(b: Bucket, idx: list[int] | None, tensors: list[Tensor]) -> list[Tensor]:
        """``tensors`` (checked: their parameters' shapes) with the strides of their
        parameters' state (copied where not)."""
        want = b.strides if idx is None else [b.strides[i] for i in idx]
        if list(map(Tensor.stride, tensors)) == list(want):
            return tensors  # the usual case, checked at C speed
        out = []
        for k, (t, st) in enumerate(zip(tensors, want)):
            p = b.tensors[k if idx is None else idx[k]]
            if not same_layout(t, p.shape, st):
                with torch.set_grad_enabled(t.requires_grad):  # a D-step differentiates the copy
                    t = torch.empty_strided(p.shape, st, dtype=t.dtype, device=t.device).copy_(t)
            out.append(t)
        return out

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

    def _evaluate(self, closure: Callable[[], Any] | None, d_step: bool):
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
        precision = ComputePrecision(watch_saves=self._watch_saves) if fd_possible else None
        self._precision = precision
        guard = None
        if fd_possible and not self._evaluated:
            guard = BufferGuard(self._module_trees(self._all_params()))
            guard.snapshot()
        with torch.enable_grad():
            while True:
                try:
                    if precision is None:
                        return closure(), rng
                    with precision:  # what the closure computes in sizes the probe
                        loss = closure()
                    self._evaluated = True
                    return loss, rng
                except RuntimeError as e:
                    if guard is None or precision is None or rng is None:
                        raise
                    if precision.refused_by(e):
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

    def _step(self, closure: Callable[[], Any] | None):
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
        hvps_by_bucket: list[list[Tensor] | None] = [None] * len(work)
        if d_step and closure is None and work and _state_init_call(self, work):
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
            computed = self._hvps(work, closure, rng)
            for k, ((b, idx, _), hvps) in enumerate(zip(work, computed)):
                if b.any_dtensor:
                    hvps = [local(h) for h in hvps]
                self._check_like(b, idx, hvps, "Hessian-vector product")
                hvps_by_bucket[k] = self._match_layout(b, idx, hvps)

        # Everything that can fail on bad input has run; from here on we write.
        flags = self._flags()
        flips = [bool(g.get("maximize", False)) for g in self.param_groups]
        ascend = flips if any(flips) else None
        for (b, idx, grads), hvps in zip(work, hvps_by_bucket):
            if ascend is not None:  # maximize: the gradient flips sign; D = max(.., h*h) needs no flip
                grads = [g.neg() if ascend[b.group_index[i]] else g
                         for i, g in zip(range(len(b)) if idx is None else idx, grads)]
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
        ops.step_(params, grads, exp_avgs, exp_avg_ds, hvps, b.scalars, b.index(idx), hparams,
                  grad_scale, found_inf, flags, seed32(self.seed), kernel, _checked=True)
        for p, work in writeback:
            p.copy_(work)
        if hvps is not None and b.any_dtensor and not flags & FLAG_EXACT:
            _global_curvature_scale(b, idx, exp_avg_ds, found_inf)

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
        if not any(map(Tensor.numel, grads)):  # only empty tensors: nothing to observe, no
            return [[torch.zeros_like(g) for g in gs] for _, _, gs in work]  # graph needed
        use_fd = self.hvp == "finite_difference" or (self.hvp == "auto" and self._fd_fallback)
        if not use_fd and self._any_dtensor:
            if self.hvp == "auto" and closure is not None:
                use_fd = True
            else:
                raise RuntimeError(
                    "sharded (DTensor, e.g. FSDP2 fully_shard) parameters cannot take a double backward: "
                    "construct ESGDM(..., hvp='finite_difference') and call opt.step(closure) with a "
                    "closure that zeroes the gradients, computes the loss and calls loss.backward()")
        if not use_fd and not any(g.grad_fn is not None for g in grads):
            if closure is None or self.hvp == "autograd":
                raise RuntimeError(self._no_graph_message())
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
            else:
                hvps = _undo_unscaled_scale(self, hvps)
        out, start = [], 0
        for _, _, gs in work:
            out.append(hvps[start:start + len(gs)])
            start += len(gs)
        return out

    def _no_graph_message(self) -> str:
        """One line for the plain ``loss.backward(); opt.step()`` loop on a D-step."""
        other = ("pass a closure, opt.step(closure), to take it by finite differences" if self.hvp == "auto"
                 else "construct ESGDM(..., hvp='finite_difference') and call opt.step(closure)")
        return (f"write loss.backward(create_graph=opt.should_create_graph()) instead of loss.backward() "
                f"before opt.step() (or {other}): step {self.steps} is a curvature step (the first "
                f"d_warmup={self.d_warmup} steps and every update_d_every={self.update_d_every}-th step "
                "take a Hessian-vector product by double backward) and no gradient carries a graph")

    def _fd_hvps(self, params, grads, closure, rng) -> list[Tensor]:
        if closure is None:
            raise RuntimeError("finite-difference curvature needs opt.step(closure) on D-steps")
        if any(p.is_meta for p in params):  # no values to difference: shape-only, like the rest
            if not all(p.is_meta for p in params):
                raise RuntimeError("finite-difference curvature cannot mix meta parameters (no values) "
                                   "with parameters that hold values in one step")
            return [torch.empty_like(real_view(p)) for p in params]
        idle = [p for b in self._buckets for p in b.params if p.grad is None]
        # The probe restores each .grad: give it the parameters' own (DTensors under FSDP2,
        # complex tensors for complex parameters).
        grads = [p.grad.detach() if is_dtensor(p) or p.is_complex() else g.detach()
                 for p, g in zip(params, grads)]
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
        # Plain dicts (weights_only loads); an entry that is not a parameter's passes through.
        out["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in out["state"].items()}
        for group in out["param_groups"]:  # torch.distributed.checkpoint keeps only these
            group[checkpoint.GROUP_KEY] = dict(global_state)
        return out

    def _check_loaded_group(self, group: dict, where: str) -> None:
        check_group(group, where, exact=self.exact)
        _check_lr_value(group["lr"], where)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint written by :meth:`state_dict` or by the original ``esgd.ESGD``.

        State is copied into this optimizer's buffers (any device, any state dtype);
        everything is checked before anything changes.
        """
        for hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        loaded = checkpoint.validate(state_dict, self.param_groups, self._check_loaded_group)
        self.buckets()  # raises (before any write) if the parameters cannot be bucketed

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
            self.seed, self._seed_shared = seed, True
        self._hparam_key = None
        self.state.clear()
        self.state.update(loaded["other"])  # entries that are not a parameter's, as torch.optim
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
                          if isinstance(s, dict) else copy.deepcopy(s) for p, s in self.state.items()}
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

    def __reduce__(self):  # copies are plain dicts (the optimizer re-wraps them)
        return (dict, (dict(self),))


class _WatchedState(collections.defaultdict):
    """``opt.state``: a ``defaultdict(dict)`` whose edits flag a :class:`_Watch`."""

    def __init__(self, watch: _Watch, *args):
        super().__init__(dict, *args)
        self._watch = watch

    def __reduce__(self):  # copies are plain defaultdicts (the optimizer re-wraps them)
        return (collections.defaultdict, (dict, dict(self)))


def _flagging(base: type, name: str) -> Callable:
    """``base.name`` that first flags the owner's :class:`_Watch` (an edit happened)."""
    def method(self, *args, **kwargs):
        self._watch.dirty = True
        return getattr(base, name)(self, *args, **kwargs)
    method.__name__ = name
    return method


for _name in ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update", "setdefault"):
    setattr(_WatchedEntry, _name, _flagging(dict, _name))
    setattr(_WatchedState, _name, _flagging(collections.defaultdict, _name))
del _name


class _Schedule:
    """The host counters of the D-step schedule.  A plain object, not attributes of the
    optimizer: torch.compile replays writes to it after a compiled step (writes to
    Optimizer attributes made inside a compiled step() are dropped)."""

    def __init__(self, steps: int = 0, since_d: int = 0):
        self.steps = steps
        self.since_d = since_d
        self.pending_inf: tuple | None = None  # (found_inf, steps, since_d) to settle


def draw_signs(seed: int, step: int, key: int, p: Tensor) -> Tensor:
    """The signs of parameter ``p`` (optimizer-order index ``key``) at ``step``: those of
    its real view for a complex ``p`` (the signs a real parameter of that shape gets)."""
    p = real_view(p)
    return rademacher(seed, step, key, p.shape, dtype=p.dtype, device=p.device)


def _frontend_helpers():
    """esgdm._C's C++ helpers for the per-step bookkeeping, if the extension has them."""
    try:
        from esgdm.backends.cpp_impl import _C
    except Exception:  # noqa: BLE001 - the helpers are an optimisation only
        return None
    # gather_checked_grads: an extension built before it existed is not used at all.
    return _C if _C is not None and hasattr(_C, "layout_key") and hasattr(_C, "gather_checked_grads") else None


_FRONTEND = _frontend_helpers()


def _state_init_call(opt: ESGDM, work) -> bool:
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


def _scale_of_unscaling_scaler(opt: ESGDM) -> Tensor | None:
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


def _undo_unscaled_scale(opt: ESGDM, hvps: list[Tensor]) -> list[Tensor]:
    """Autograd Hessian-vector products in the units of the gradients ``opt`` holds.

    ``scaler.unscale_(opt)`` divides the gradients in place, but the double-backward
    graph still differentiates the scaled ones: its ``h`` is ``scale`` times too large.
    Divided here (on the device, nothing read back); without an unscaling scaler the
    kernels divide ``g`` and ``h`` by ``grad_scale`` themselves."""
    scale = _scale_of_unscaling_scaler(opt)
    if scale is None:
        return hvps
    return [h / scale.to(h.device).reshape(()) for h in hvps]  # (h may be a view: not in place)


def _is_view(exposed: Any, view: Tensor) -> bool:
    """Whether ``exposed`` is how :meth:`ESGDM._expose_state` showed ``view`` (itself, a
    DTensor around it, or, for a complex parameter, its complex view)."""
    if exposed is view or (is_dtensor(exposed) and exposed._local_tensor is view):
        return True
    if isinstance(exposed, Tensor) and exposed.is_complex() and not is_dtensor(exposed):
        real = torch.view_as_real(exposed)
        return (real.data_ptr() == view.data_ptr() and real.shape == view.shape
                and real.stride() == view.stride() and real.dtype == view.dtype)
    return False


def _shard_of(value: Any, p: Any) -> Tensor:
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


def _global_curvature_scale(b: Bucket, idx: list[int] | None, exp_avg_ds: list[Tensor],
                            found_inf: Tensor | None) -> None:
    """Rewrites the curvature scale (``dscale``, the mean of ``sqrt(D)`` over the
    coordinates with ``D > 0``) of bucket ``b``'s sharded tensors as that of the whole
    tensor: the operator saw only this rank's shard.  The default rule's floor depends
    on it everywhere, so without this FSDP2 would not step as one process does.  Every
    rank calls it alike (it all-reduces over the mesh dimensions a tensor is sharded on)."""
    from esgdm.hvp import _all_reduce, _local_and_reduction

    for i, d in zip(range(len(b)) if idx is None else idx, exp_avg_ds):
        p = b.params[i]
        if not is_dtensor(p):
            continue
        _, key = _local_and_reduction(p)
        if key is None:
            continue  # replicated: the shard is the whole tensor
        sums = torch.stack([d.double().sqrt().sum(), (d != 0).sum().double()])
        _all_reduce(sums, key)
        new = torch.where(sums[1] > 0, sums[0] / sums[1].clamp(min=1), torch.zeros_like(sums[0]))
        if found_inf is not None:
            new = torch.where(found_inf.to(new.device) != 0, b.scalars[i, DSCALE], new)
        b.scalars[i, DSCALE] = new


def _local_block(full: Tensor, p: Any) -> Tensor:
    """The block of the whole tensor ``full`` that DTensor ``p``'s local shard holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def _shard_signs(seed: int, step: int, key: int, p: Any) -> Tensor:
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
