"""ESGD-M in Hugging Face ``transformers.Trainer``: :class:`ESGDMTrainer`.

``transformers.Trainer`` calls ``backward()`` without ``create_graph`` and steps the
optimizer without a closure, so neither way ESGD-M takes curvature works with it.
:class:`ESGDMTrainer` is a drop-in subclass that does both::

    from esgdm.integrations.transformers import ESGDMTrainer

    trainer = ESGDMTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                           optimizer_cls_and_kwargs=(esgdm.ESGDM, {"lr": 0.5, "hvp": "auto"}))
    trainer.train()

On a D-step (a step that takes a Hessian-vector product ``H v``):

* **autograd** (``opt.should_create_graph()`` is true): every micro-batch's backward
  runs with ``create_graph=True`` (the gradient that ``H v`` differentiates is the sum
  over the accumulated micro-batches, so each one must carry its graph);
* **finite differences** (``hvp="finite_difference"``, or ``hvp="auto"`` when the
  gradients carry no graph or the double backward failed): the step gets a closure.
  The micro-batches' gradients at θ come from the ordinary training loop; the probe
  at θ + r·v re-runs every micro-batch of the step with the random-number state each
  one saw (so dropout draws the same masks), then puts the probe gradient in the
  units of the gradient the optimizer holds (undoing the loss scale of fp16 training,
  and the clipping: ``max_grad_norm`` scales the gradient of the update, not the
  curvature, exactly as in autograd mode).

Gradient accumulation, ``max_grad_norm``, bf16 autocast and the learning-rate
scheduler all behave as with ``Trainer``.  With fp16 (a ``GradScaler``) the trainer
gives the curvature steps to finite differences (``hvp="auto"`` or
``"finite_difference"``): the scaler unscales the gradients in place before the step,
which an autograd graph cannot follow.

Optimizer choice.  ``TrainingArguments(optim=...)`` takes only the names transformers
knows, so ESGD-M is chosen in one of three ways:

* ``ESGDMTrainer(..., optimizer_cls_and_kwargs=(esgdm.ESGDM, {"lr": 0.5}))`` --
  transformers' own hook: the Trainer builds the two parameter groups (weight decay
  ``args.weight_decay`` on weights, none on biases and norms);
* nothing: ``ESGDMTrainer`` then builds that same ESGD-M with ``lr=args.learning_rate``,
  ``weight_decay=args.weight_decay`` and the keywords in ``args.optim_args``
  (``"hvp=finite_difference,update_d_every=10,beta1=0.9,beta2=0.999"``);
* ``optimizers=(esgdm.ESGDM(groups, lr=0.5), None)``: any optimizer you built.

With an optimizer that is not ESGD-M, ``ESGDMTrainer`` behaves as ``Trainer`` (but
applies FSDP2 on CPU processes too, see below).

Learning-rate warm-up.  ESGD-M's own warm-up counts only D-steps: with the defaults
(``lr_warmup=0.99``, ``d_warmup=20``, ``update_d_every=10``) the step size is 18% of
``lr`` after 20 steps and 25% after 100, so a fine-tuning run of a few hundred steps
may barely move.  For short runs pass ``lr_warmup=0.9`` (65% after 10 D-steps) or 0.

Several processes (DDP, FSDP).  Neither can run a double backward: take curvature by
finite differences (``hvp="finite_difference"``, or ``"auto"``, which turns to them
before the first backward, warning once; ``"autograd"`` raises).  accelerate applies
FSDP only on accelerator devices; on CPU processes ``ESGDMTrainer`` applies the FSDP2
that ``fsdp=...``, ``fsdp_config={"fsdp_version": 2}`` asks for.  transformers scales
each process's loss by the number of processes when the model's ``forward`` takes
``**kwargs``; for a model that averages over its own rows (sequence classification)
set ``average_tokens_across_devices=False``, or it trains on a larger loss, which
ESGD-M, unlike AdamW, notices through ``eps``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import types
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "esgdm.integrations.transformers needs transformers and accelerate: "
        "pip install 'esgdm[transformers]'"
    ) from e

from esgdm.buckets import is_dtensor
from esgdm.guards import RngSnapshot
from esgdm.integrations import quiet_create_graph, restore_step, unwrap_optimizer
from esgdm.optimizer import ESGDM
from esgdm.precision import ComputePrecision

__all__ = ["ESGDMTrainer", "esgdm_kwargs_from_args"]

#: TrainingArguments' default learning rate: an AdamW value, far too small for ESGD-M.
_TRAINING_ARGS_DEFAULT_LR = 5e-5


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low == "none":
            return None
        return text


def esgdm_kwargs_from_args(args: Any) -> dict:
    """The :class:`esgdm.ESGDM` keywords for ``TrainingArguments`` ``args``.

    ``lr`` is ``args.learning_rate``; ``weight_decay`` is set per parameter group by the
    Trainer; ``args.optim_args`` (``"key=value,key=value"``) adds any ESGDM keyword,
    with ``beta1``/``beta2`` for ``betas`` and ``state_dtype=bfloat16`` for a dtype.
    """
    kwargs: dict[str, Any] = {"lr": float(args.learning_rate)}
    text = getattr(args, "optim_args", None) or ""
    betas = [0.9, 0.999]
    betas_given = False
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"optim_args: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        if key in ("beta1", "beta2"):
            betas[key == "beta2"] = float(value)
            betas_given = True
        elif key == "state_dtype":
            kwargs[key] = getattr(torch, value.replace("torch.", ""))
        elif key in ("lr", "weight_decay"):
            raise ValueError(f"optim_args: set {key} through TrainingArguments "
                             f"({'learning_rate' if key == 'lr' else 'weight_decay'}=...)")
        else:
            kwargs[key] = _literal(value)
    if betas_given:
        kwargs["betas"] = tuple(betas)
    return kwargs


@dataclasses.dataclass
class _MicroBatch:
    inputs: Any
    args: tuple
    kwargs: dict
    rng: RngSnapshot


@dataclasses.dataclass
class _Plan:
    """What a finite-difference D-step needs to re-run its micro-batches."""

    step: int
    model: Any = None
    micro: list = dataclasses.field(default_factory=list)
    losses: list = dataclasses.field(default_factory=list)
    raw_norm: Tensor | None = None  # norm of the accumulated gradients, as backward left them
    precision: ComputePrecision = dataclasses.field(default_factory=ComputePrecision)


def _hooked_step(opt: ESGDM, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
    """``opt.step`` while an :class:`ESGDMTrainer` trains: adds the finite-difference
    closure on the steps that need one (the Trainer calls ``step()`` without any)."""
    hook = opt.__dict__.get("_esgdm_trainer_hook")
    if closure is None and hook is not None:
        trainer = hook[0]()
        if trainer is not None:
            closure = trainer._esgdm_closure(opt)
    previous = hook[1] if hook is not None else types.MethodType(type(opt).step, opt)
    if closure is None:
        return previous(**kwargs)
    return previous(closure, **kwargs)


def _replay_precision(precision: ComputePrecision) -> None:
    """Shows what ``precision`` saw to the ComputePrecision watching the closure (as
    ESGDM.step does)."""
    precision.replay()


class ESGDMTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with :class:`esgdm.ESGDM` in both
    Hessian-vector-product modes, in one process or several (see the module docstring).

    Mind ESGD-M's warm-up in short runs: it counts D-steps only, so with the default
    ``lr_warmup=0.99`` the step size stays under a quarter of ``lr`` for 100 steps;
    fine-tuning for a few hundred steps, pass ``lr_warmup=0.9`` (or 0).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._esgdm_plan: _Plan | None = None
        self._esgdm_probing = False
        self._esgdm_checked: weakref.ref | None = None  # the model the double-backward check ran on

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self._esgdm_fsdp_on_cpu()

    def _esgdm_fsdp_on_cpu(self) -> None:
        """Applies the FSDP2 that ``fsdp=...`` asked for on CPU processes too.

        accelerate turns FSDP on only for accelerator devices: on CPU (gloo) it drops the
        plugin and the Trainer trains plain DDP, silently.  FSDP2 (``fully_shard``) works
        on CPU, so hand accelerate the plugin it dropped; FSDP1 is refused there."""
        plugin_args = getattr(self.args, "fsdp_plugin_args", None)
        state = self.accelerator.state
        if plugin_args is None or getattr(state, "fsdp_plugin", None) is not None:
            return
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        if state.distributed_type != DistributedType.MULTI_CPU:
            return
        if int(plugin_args.get("fsdp_version", 1)) != 2:
            raise ValueError("ESGDMTrainer: accelerate applies FSDP1 only on GPUs; on CPU processes use FSDP2: "
                             "fsdp_config={'fsdp_version': 2}")
        plugin = FullyShardedDataParallelPlugin(**plugin_args)
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True

    # ----------------------------------------------------------- optimizer

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        """ESGD-M, configured from ``args`` (see :func:`esgdm_kwargs_from_args`)."""
        kwargs = esgdm_kwargs_from_args(args)
        if kwargs["lr"] == _TRAINING_ARGS_DEFAULT_LR:
            warnings.warn(
                f"ESGDMTrainer: learning_rate is TrainingArguments' default {_TRAINING_ARGS_DEFAULT_LR}, "
                "an AdamW value; ESGD-M's step sizes are around 0.1-1 (e.g. learning_rate=0.5)",
                UserWarning, stacklevel=2)
        return ESGDM, kwargs

    def create_optimizer(self, model: Any = None) -> Any:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        opt = unwrap_optimizer(optimizer)
        if opt is not None:
            self._esgdm_install(opt)
        return optimizer

    def _esgdm(self) -> ESGDM | None:
        return unwrap_optimizer(self.optimizer)

    def _esgdm_install(self, opt: Any) -> None:  # (an ESGDM, given attributes of ours)
        """Routes ``opt.step`` through :func:`_hooked_step` (once; chains whatever
        wrapper -- an LR scheduler's, accelerate's -- was there before)."""
        hook = opt.__dict__.get("_esgdm_trainer_hook")
        if hook is not None:
            if hook[0]() is self:
                return
            opt._esgdm_trainer_hook = (weakref.ref(self), hook[1])  # a new trainer, same optimizer
            return
        if self.accelerator.scaler is not None and opt.hvp == "autograd":
            raise ValueError(
                "ESGDMTrainer: fp16 training unscales the gradients in place before the step, which "
                "a double-backward graph cannot follow; use esgdm.ESGDM(..., hvp='auto') or "
                "hvp='finite_difference' (the trainer passes the closure), or bf16")
        previous = opt.step  # bound method, or a wrapper an LR scheduler installed
        opt._esgdm_trainer_hook = (weakref.ref(self), previous)
        opt.step = types.MethodType(_hooked_step, opt)

    def _esgdm_uninstall(self) -> None:
        """Takes the step hook off again (after ``train()``), where it is still on top."""
        opt: Any = self._esgdm()
        hook = None if opt is None else opt.__dict__.get("_esgdm_trainer_hook")
        if hook is None or hook[0]() is not self:
            return
        del opt._esgdm_trainer_hook  # from now on _hooked_step, if still called, adds nothing
        step = opt.__dict__.get("step")
        if isinstance(step, types.MethodType) and step.__func__ is _hooked_step:
            restore_step(opt, hook[1])

    # ------------------------------------------------------------ training

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            self._esgdm_plan = None
            self._esgdm_uninstall()

    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Tensor:
        opt = self._esgdm()
        if opt is None or self._esgdm_probing:
            return super().training_step(model, inputs, *args, **kwargs)
        self._esgdm_install(opt)
        self._esgdm_check_double_backward(opt, model)
        d_step = opt.is_d_step()
        scaler = self.accelerator.scaler
        create_graph = d_step and opt.should_create_graph() and scaler is None
        plan = None
        if d_step and opt.hvp != "autograd":
            plan = self._esgdm_plan
            if plan is None or plan.step != opt.steps:
                plan = self._esgdm_plan = _Plan(step=opt.steps)
            plan.model = model
            saved = dict(inputs) if isinstance(inputs, dict) else inputs
            plan.micro.append(_MicroBatch(saved, args, dict(kwargs), RngSnapshot()))
        with contextlib.ExitStack() as stack:
            if plan is not None:  # what the forward computes in (autocast) sizes the probe's radius
                stack.enter_context(plan.precision)
            if create_graph:
                stack.enter_context(self._esgdm_backward_kwargs(create_graph=True))
                stack.enter_context(quiet_create_graph())
            loss = super().training_step(model, inputs, *args, **kwargs)
        if plan is not None:
            plan.losses.append(loss.detach())
            plan.raw_norm = _total_norm([p.grad for p in _params(opt)])
        return loss

    def _esgdm_check_double_backward(self, opt: ESGDM, model: Any) -> None:
        """Before the first backward through ``model`` (the wrapped one): where a
        wrapper cannot run a double backward (DDP, FSDP), ``hvp="autograd"`` raises
        naming what works, and ``hvp="auto"`` turns to finite differences, warning once."""
        if self._esgdm_checked is not None and self._esgdm_checked() is model:
            return
        why = _no_double_backward(model)
        if why is not None and opt.hvp == "autograd":
            raise ValueError(
                f"ESGDMTrainer: {why} cannot run the double backward that hvp='autograd' needs; construct "
                "esgdm.ESGDM(..., hvp='finite_difference') or hvp='auto' (the trainer passes the closure)")
        if why is not None and opt.hvp == "auto" and not opt._curvature.fd_fallback:
            warnings.warn(f"esgdm: {why} cannot run a double backward; hvp='auto' takes Hessian-vector "
                          "products by finite differences from now on", RuntimeWarning, stacklevel=3)
            opt._curvature.fd_fallback = True
        self._esgdm_checked = weakref.ref(model)

    @contextlib.contextmanager
    def _esgdm_backward_kwargs(self, **extra: Any):
        """Adds ``extra`` to the keywords of ``self.accelerator.backward`` (the call
        ``Trainer.training_step`` makes) for the duration of the block."""
        acc = self.accelerator
        had_own = "backward" in acc.__dict__
        own = acc.__dict__.get("backward")
        original = acc.backward

        def backward(loss, **kwargs):
            return original(loss, **{**kwargs, **extra})

        acc.backward = backward
        try:
            yield
        finally:
            if had_own:
                acc.backward = own
            else:
                del acc.backward

    def _esgdm_closure(self, opt: ESGDM) -> Callable[[], Any] | None:
        """The closure of a finite-difference D-step, or None on other steps."""
        plan = self._esgdm_plan
        if plan is None or plan.step != opt.steps or not opt.is_d_step() or not plan.micro:
            self._esgdm_plan = None
            return None
        self._esgdm_plan = None
        params = _params(opt)
        base = [p.grad for p in params]  # the gradients the optimizer steps with
        unscale, clip = self._esgdm_units(opt, plan, base)
        calls = [0]

        def closure():
            calls[0] += 1
            total = torch.stack([loss.float() for loss in plan.losses]).sum()
            if calls[0] == 1:
                # The training loop has computed the gradients at θ already; show the
                # optimizer what precision it computed them in (it watches the saved tensors).
                _replay_precision(plan.precision)
                return total
            self._esgdm_probe(plan)
            _match_units(params, base, unscale, clip)
            return total

        return closure

    def _esgdm_probe(self, plan: _Plan) -> None:
        """Accumulates the gradients of the step's micro-batches at the current
        parameters, each under the random-number state it was first run with."""
        self._esgdm_probing = True
        try:
            last = len(plan.micro) - 1
            for i, mb in enumerate(plan.micro):
                mb.rng.restore()
                sync = contextlib.nullcontext() if i == last else self.accelerator.no_sync(plan.model)
                with sync:
                    super().training_step(plan.model, mb.inputs, *mb.args, **mb.kwargs)
        finally:
            self._esgdm_probing = False

    def _esgdm_units(self, opt: ESGDM, plan: _Plan, base: list) -> tuple[float, Tensor | None]:
        """``(u, c)``: the step's gradient is ``u * c * raw``, with ``raw`` what the
        backward passes accumulated, ``u`` the GradScaler's unscaling (``1/S`` once
        unscaled, else 1) and ``c`` the clipping factor (1 without clipping: measured as
        a ratio of norms, so whatever clipped -- ``max_grad_norm`` in any transformers
        version, a callback -- is accounted for; None when there is nothing to measure)."""
        unscale = 1.0
        scaler = self.accelerator.scaler
        if scaler is not None and _unscaled(scaler, opt):
            unscale = 1.0 / float(scaler.get_scale())
        ratio = _total_norm(base)
        if plan.raw_norm is None or ratio is None:
            return unscale, None
        factor = torch.where(plan.raw_norm > 0, ratio / plan.raw_norm.to(ratio.device), torch.ones_like(ratio))
        clip = factor / unscale
        return unscale, clip


def _no_double_backward(model: Any) -> str | None:
    """What about the (wrapped) ``model`` rules out a double backward, or None."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # torch without distributed support
        return None
    if isinstance(model, DistributedDataParallel):
        return "DistributedDataParallel"
    if isinstance(model, FullyShardedDataParallel):
        return "FSDP"
    if any(is_dtensor(p) for p in model.parameters()):
        return "FSDP2 (sharded DTensor parameters)"
    return None


def _params(opt: ESGDM) -> list:
    return [p for group in opt.param_groups for p in group["params"]]


def _total_norm(tensors: list) -> Tensor | None:
    """The 2-norm of all of ``tensors`` (None entries skipped), float64, on the device."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return None
    device = tensors[0].device
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=torch.float64) for n in norms]))


def _unscaled(scaler: Any, opt: ESGDM) -> bool:
    """Whether ``scaler`` has unscaled ``opt``'s gradients in place this step (what
    transformers' Trainer does before every step); assumed so if it cannot be told."""
    try:
        from torch.amp.grad_scaler import OptState

        return scaler._per_optimizer_states[id(opt)]["stage"] is OptState.UNSCALED
    except (ImportError, AttributeError, KeyError, TypeError):
        return True


@torch.no_grad()
def _match_units(params: list, base: list, unscale: float, clip: Tensor | None) -> None:
    """Puts the probe gradients in the units of the step's gradients.

    The step holds ``u * c * g`` (see :meth:`ESGDMTrainer._esgdm_units`); the probe
    accumulated ``g'`` in the backward's units.  The finite difference must see
    ``u * (g' - g)``, the change of the loss's gradient (not of the clipped one, as in
    autograd mode), so the probe gradient becomes ``u * g' + (1 - 1/c) * (u * c * g)``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if unscale != 1.0 and grads:
        torch._foreach_mul_(grads, unscale)
    if clip is None:
        return
    factor = 1.0 - 1.0 / clip
    for p, b in zip(params, base):
        if p.grad is not None and b is not None:
            p.grad.add_(b.detach() * factor.to(device=b.device, dtype=b.dtype))
