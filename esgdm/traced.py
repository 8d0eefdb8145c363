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


__all__ = ["ask", "number"]
