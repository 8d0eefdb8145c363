"""Helpers for training loops and trainers that drive :class:`esgdm.ESGDM`.

Nothing here imports an optional framework; the framework-specific parts live in
submodules that import theirs on use:

* :mod:`esgdm.integrations.transformers` -- :class:`~esgdm.integrations.transformers.ESGDMTrainer`,
  a drop-in ``transformers.Trainer`` (``pip install esgdm[transformers]``);
* :mod:`esgdm.integrations.lightning` -- recipes for ``lightning`` (``pip install esgdm[lightning]``).

The helpers below are what a hand-written loop needs:

>>> from esgdm.integrations import backward
>>> loss = loss_fn(model(x), y)
>>> backward(loss, opt)          # create_graph=opt.should_create_graph(), quietly
>>> opt.step()
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from torch import Tensor

__all__ = ["backward", "quiet_create_graph", "restore_step", "unwrap_optimizer", "CREATE_GRAPH_WARNING"]

#: The start of the warning torch gives for ``backward(create_graph=True)`` (a regular
#: expression for :func:`warnings.filterwarnings`).
CREATE_GRAPH_WARNING = r"Using backward\(\) with create_graph=True"


@contextlib.contextmanager
def quiet_create_graph() -> Iterator[None]:
    """Silences torch's "reference cycle" warning for ``backward(create_graph=True)``
    inside the block, and only there.

    torch warns that ``.grad`` then holds a graph that refers back to the parameter, a
    cycle that leaks unless the gradients are reset to ``None``.  An ESGD-M training
    loop breaks it on every step (``zero_grad(set_to_none=True)``, the default), so the
    warning says nothing useful when ESGD-M is why the graph is kept.

    torch gives this warning once per process: a backward run inside this block uses
    up that one warning, so code that later calls ``backward(create_graph=True)`` for
    its own reasons is not warned again.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CREATE_GRAPH_WARNING, category=UserWarning)
        yield


def unwrap_optimizer(optimizer: Any) -> Any | None:
    """The :class:`esgdm.ESGDM` inside ``optimizer``, or None.

    Follows the ``.optimizer`` attribute of the wrappers trainers put around an
    optimizer (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, ...).
    """
    from esgdm.optimizer import ESGDM

    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, ESGDM):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def backward(loss: Tensor, optimizer: Any, **kwargs: Any) -> bool:
    """``loss.backward(create_graph=opt.should_create_graph(), **kwargs)``.

    ``optimizer`` is an :class:`esgdm.ESGDM` or a wrapper around one.  The graph is kept
    only on the steps that take a Hessian-vector product by double backward, and
    torch's reference-cycle warning is silenced for that call only
    (:func:`quiet_create_graph`).  With gradient accumulation, call it on every
    micro-batch: each one's gradient must carry its graph on such a step.

    Returns whether the graph was kept.
    """
    opt = unwrap_optimizer(optimizer)
    if opt is None:
        raise TypeError(f"expected an esgdm.ESGDM (or a wrapper around one), got {type(optimizer).__name__}")
    create_graph = bool(opt.should_create_graph())
    if create_graph:
        with quiet_create_graph():
            loss.backward(create_graph=True, **kwargs)
    else:
        loss.backward(**kwargs)
    return create_graph


def restore_step(opt: Any, previous: Any) -> None:
    """Puts back the ``step`` that a trainer hook wrapped: the class's own method (by
    removing the instance attribute) when that is what it was, else the wrapper (an LR
    scheduler's, accelerate's) that stood there before."""
    class_step = getattr(type(opt), "step", None)
    if getattr(previous, "__self__", None) is opt and getattr(previous, "__func__", None) is class_step:
        delattr(opt, "step")
    else:
        opt.step = previous
