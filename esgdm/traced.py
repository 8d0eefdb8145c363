"""Facts a compiled step reads as constants, with one guard each instead of one per entry.

Under ``torch.compile`` every Python value the traced step reads becomes a guard that
Dynamo checks on every call.  A bucket's per-tensor shapes, strides and offsets, and the
parameter layout the buckets were built for, are tuples that Dynamo compares entry by
entry: about 25 guards per tensor, more than half of all the guards of a compiled step.

Those facts never change once an object is built.  Such an object takes a serial number
here (:func:`number`, never reused); the traced step reads that number (one guard: a
rebuilt object has a new one) and asks its questions through :func:`ask`, whose answer
Dynamo takes as a constant of the trace without guarding it
(``torch._dynamo.assume_constant_result``; its arguments must be constants, which
strings and tuples of ints are, on every torch this package supports).  The number is a
string: Dynamo makes an int that changed between traces a symbolic one, which is no
constant.

A plain step whose parameters are all on the CPU is not traced at all unless the
compilation demands one graph (:func:`one_graph_demanded`): there the kernel is one
opaque call and no CUDA graph can replay it, so a trace only adds Dynamo's guards and
Inductor's wrapper around the same call (about 3x the eager step at 148 tensors, 9x at
1,024).  The step leaves the graph and runs eagerly instead (see
``esgdm.ESGDM._leaves_trace``).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

try:
    from torch._dynamo import assume_constant_result as _assume_constant_result
except ImportError:  # pragma: no cover - a torch without Dynamo: nothing is traced
    def _assume_constant_result(fn):
        return fn

_OBJECTS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_SERIALS = itertools.count(1)


def number(obj: Any) -> str:
    """A new serial number for ``obj`` (held weakly), never empty.  Call it outside traced code."""
    serial = f"#{next(_SERIALS)}"
    _OBJECTS[serial] = obj
    return serial


@_assume_constant_result
def ask(serial: str, name: str, *args: Any) -> Any:
    """``obj.name(*args)`` of the object numbered ``serial``; traced, it runs once, when
    the step is traced, and its answer is part of the trace."""
    return getattr(_OBJECTS[serial], name)(*args)


# Whether a step of CPU parameters leaves the graph when the compilation allows it (tests
# switch it off to trace on the CPU what a GPU's compiled step traces).
CPU_STEPS_LEAVE_GRAPH = True


def one_graph_demanded() -> bool:
    """Whether the trace in progress must not break (``fullgraph=True``, ``torch.export``,
    ``torch._dynamo.error_on_graph_break(True)``); True whenever that cannot be told.
    Dynamo's translator is private, so every read is guarded."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        demanded = bool(getattr(tx, "one_graph", True) or getattr(tx, "error_on_graph_break", False))
        try:
            from torch._dynamo.utils import _get_error_on_graph_break
        except ImportError:  # pragma: no cover - older Dynamo: the translator's flags only
            return demanded
        return demanded or bool(_get_error_on_graph_break())
    except Exception:  # pragma: no cover - not tracing, or another Dynamo
        return True


__all__ = ["CPU_STEPS_LEAVE_GRAPH", "ask", "number", "one_graph_demanded"]
