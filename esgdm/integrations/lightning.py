"""ESGD-M in Lightning: the helpers the README's recipes use.

Automatic optimization, finite differences (Lightning passes ``optimizer.step`` a
closure that runs ``training_step`` and ``backward``; the optimizer calls it again
at θ + r·v on D-steps)::

    def configure_optimizers(self):
        return esgdm.ESGDM(self.parameters(), lr=0.5, hvp="finite_difference")

Automatic optimization, autograd (keep the graph on D-steps; works with
``accumulate_grad_batches``: every micro-batch's backward keeps its graph)::

    def backward(self, loss, *args, **kwargs):
        esgdm.integrations.lightning.backward(self, loss, *args, **kwargs)

Manual optimization, autograd::

    self.automatic_optimization = False            # in __init__

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = ...
        esgdm.integrations.lightning.manual_backward(self, loss, opt)
        opt.step()

Limits of the finite-difference recipe, which :class:`ESGDMCallback` checks at
``fit`` start: with ``accumulate_grad_batches > 1`` Lightning's closure re-runs only
the last micro-batch, so the probe gradient would not match the accumulated one (use
the autograd recipes); with 16-bit mixed precision (a ``GradScaler``) Lightning steps
without a closure (use ``"bf16-mixed"`` or autograd).  ``gradient_clip_val`` clips the
probe's gradient as well: the curvature is then that of the clipped gradient, which
ESGD-M's invariance to the gradient's scale undoes on D-steps.  For clipping that
scales only the update, clip in the manual recipe (``self.clip_gradients``).

On a D-step the finite-difference recipe runs Lightning's closure once more at
θ + r·v (twice more with ``fd_scheme="central"``): ``training_step``, ``backward`` and
the ``on_before_optimizer_step`` hooks run again.  With :class:`ESGDMCallback`,
``self.log``/``self.log_dict`` inside those re-runs are dropped and the step's output
(``on_train_batch_end``'s ``outputs``) is the one at θ; guard other side effects of
``training_step`` with ``if not esgdm.integrations.lightning.is_probing(self)``.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Iterator
from typing import Any, Callable

from torch import Tensor

from esgdm.integrations import quiet_create_graph, restore_step, unwrap_optimizer

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the older package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError("esgdm.integrations.lightning needs lightning: pip install 'esgdm[lightning]'") from e

__all__ = ["ESGDMCallback", "backward", "check_trainer", "is_probing", "manual_backward"]


def _esgdm_of(module: Any, optimizer: Any = None):
    if optimizer is None:
        optimizers = module.optimizers(use_pl_optimizer=False)
        optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
        found = [o for o in map(unwrap_optimizer, optimizers) if o is not None]
        if len(found) != 1:
            raise ValueError(f"expected one esgdm.ESGDM among the module's optimizers, found {len(found)}; "
                             "pass the optimizer explicitly")
        return found[0]
    opt = unwrap_optimizer(optimizer)
    if opt is None:
        raise TypeError(f"expected an esgdm.ESGDM (or a wrapper around one), got {type(optimizer).__name__}")
    return opt


def backward(module: Any, loss: Tensor, *args: Any, optimizer: Any = None, **kwargs: Any) -> None:
    """The body of ``LightningModule.backward`` for ESGD-M with autograd curvature:
    ``loss.backward(create_graph=True)`` on the steps that need it (and torch's
    reference-cycle warning silenced for that call only)."""
    opt = _esgdm_of(module, optimizer)
    if opt.should_create_graph():
        kwargs["create_graph"] = True
        with quiet_create_graph():
            pl.LightningModule.backward(module, loss, *args, **kwargs)
    else:
        pl.LightningModule.backward(module, loss, *args, **kwargs)


def manual_backward(module: Any, loss: Tensor, optimizer: Any = None, *args: Any, **kwargs: Any) -> None:
    """``module.manual_backward(loss, create_graph=opt.should_create_graph())``, quietly."""
    opt = _esgdm_of(module, optimizer)
    if opt.should_create_graph():
        kwargs["create_graph"] = True
        with quiet_create_graph():
            module.manual_backward(loss, *args, **kwargs)
    else:
        module.manual_backward(loss, *args, **kwargs)


def check_trainer(trainer: Any, module: Any) -> None:
    """Raises if the finite-difference recipe cannot work under ``trainer``'s settings."""
    if not module.automatic_optimization:
        return
    optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
    for opt in optimizers:
        if opt is None or opt.hvp == "autograd":
            continue
        overrides_backward = type(module).backward is not pl.LightningModule.backward
        if trainer.accumulate_grad_batches > 1 and not (opt.hvp == "auto" and overrides_backward):
            raise ValueError(
                f"ESGD-M with hvp={opt.hvp!r} and accumulate_grad_batches={trainer.accumulate_grad_batches}: "
                "Lightning's closure re-runs only the last micro-batch, so finite differences would "
                "compare different gradients. Use hvp='autograd' with a LightningModule.backward that calls "
                "esgdm.integrations.lightning.backward(self, loss), or manual optimization")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            raise ValueError(
                f"ESGD-M with hvp={opt.hvp!r} under 16-bit mixed precision: Lightning steps a GradScaler "
                "without a closure, so there are no finite differences. Use precision='bf16-mixed' or "
                "hvp='autograd' with esgdm.integrations.lightning.backward")


def is_probing(module: Any) -> bool:
    """Whether ``training_step`` is running for ESGD-M's finite-difference probe (the
    closure re-run at θ + r·v on a D-step) rather than for the step itself.

    Set while :class:`ESGDMCallback` is among the trainer's callbacks; False otherwise.
    """
    return bool(getattr(module, "_esgdm_probing", False))


def _drop(*_args: Any, **_kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _probing(module: Any) -> Iterator[None]:
    """Marks ``module`` as probing and drops its ``log``/``log_dict`` calls meanwhile."""
    module._esgdm_probing = True
    module.log = module.log_dict = _drop  # instance attributes shadow the methods
    try:
        yield
    finally:
        for name in ("log", "log_dict", "_esgdm_probing"):
            module.__dict__.pop(name, None)


class _ProbeAwareClosure:
    """Lightning's closure for ``opt.step``: the first call is the step's own, later
    calls are probes (logging dropped, the closure's recorded result kept from the
    first call, so Lightning reports the step at θ)."""

    def __init__(self, closure: Callable[[], Any], module: Any):
        self.closure, self.module, self.calls = closure, module, 0
        # Lightning's closure object (it records each call's result) sits inside a partial
        self.recorders = [a for a in getattr(closure, "args", ()) if hasattr(a, "_result")]

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls == 1:
            return self.closure()
        kept = [r._result for r in self.recorders]
        try:
            with _probing(self.module):
                return self.closure()
        finally:
            for r, result in zip(self.recorders, kept):
                r._result = result


def _no_module() -> None:
    return None


def _hooked_step(opt: Any, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
    module_ref, previous = opt.__dict__["_esgdm_pl_hook"]
    module = module_ref()
    if closure is not None and module is not None:
        closure = _ProbeAwareClosure(closure, module)
    return previous(**kwargs) if closure is None else previous(closure, **kwargs)


def _install(opt: Any, module: Any) -> None:
    hook = opt.__dict__.get("_esgdm_pl_hook")
    if hook is not None:
        opt._esgdm_pl_hook = (weakref.ref(module), hook[1])
        return
    opt._esgdm_pl_hook = (weakref.ref(module), opt.step)  # the step as it was (an LR scheduler's wrapper, ...)
    opt.step = types.MethodType(_hooked_step, opt)


def _uninstall(opt: Any) -> None:
    hook = opt.__dict__.get("_esgdm_pl_hook")
    if hook is None:
        return
    step = opt.__dict__.get("step")
    if not (isinstance(step, types.MethodType) and step.__func__ is _hooked_step):
        opt._esgdm_pl_hook = (_no_module, hook[1])  # wrapped over since: stay in the chain, passing through
        return
    del opt._esgdm_pl_hook
    restore_step(opt, hook[1])


class ESGDMCallback(pl.Callback):
    """Checks at ``fit`` start that the ESGD-M recipe in use works with the trainer's
    settings (see :func:`check_trainer`), and makes the finite-difference probe's
    re-run of ``training_step`` log nothing (see :func:`is_probing`)."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        check_trainer(trainer, pl_module)
        if pl_module.automatic_optimization:
            for opt in map(unwrap_optimizer, trainer.optimizers):
                if opt is not None and opt.hvp != "autograd":
                    _install(opt, pl_module)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for opt in map(unwrap_optimizer, trainer.optimizers):
            if opt is not None:
                _uninstall(opt)
