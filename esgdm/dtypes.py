"""The dtype table: for each parameter dtype, the optimizer state it may keep and the
dtype the rule computes in.  The one place these facts are written.

* :data:`PARAM_DTYPES`: one row per parameter dtype ESGDM steps: the math dtype, the
  default state dtype, and whether the compact state dtypes apply to it (float64
  parameters keep float64 state whatever is asked: compact state would throw their
  precision away).
* :data:`STATE_OPTIONS`: the state dtypes ``ESGDM(state_dtype=...)`` accepts, each with
  the smallest tensor it applies to (smaller tensors keep their row's default) and
  whether a complex parameter can show it (as a complex tensor).

A new state dtype is one new entry of :data:`STATE_OPTIONS` (e.g. 8-bit state for
tensors of at least 4096 elements: ``torch.uint8: StateOption(min_numel=4096,
complex_ok=False)``); the backends that step it list it in their row of
:data:`esgdm.backends.capabilities.CAPABILITIES`.  :func:`state_dtype_for` (the
buckets), the operator's checks (:mod:`esgdm.ops`), the optimizer's ``state_dtype=``
check (:mod:`esgdm.hyperparams`), the checkpoint format and the capability table all
read this module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from esgdm import quant


class ParamRow(NamedTuple):
    """What one parameter dtype gets."""

    math: torch.dtype  # what the element-wise rule computes in
    default_state: torch.dtype  # exp_avg/exp_avg_d when no state dtype is asked for
    compact_state: bool  # whether the STATE_OPTIONS apply (else default_state only)


class StateOption(NamedTuple):
    """One state dtype that ``state_dtype=`` may ask for."""

    min_numel: int  # tensors with fewer elements keep their row's default state
    complex_ok: bool  # a complex parameter can show it as complex state


#: One row per parameter dtype that ESGDM steps.
PARAM_DTYPES: dict[torch.dtype, ParamRow] = {
    torch.float32: ParamRow(math=torch.float32, default_state=torch.float32, compact_state=True),
    torch.bfloat16: ParamRow(math=torch.float32, default_state=torch.float32, compact_state=True),
    torch.float16: ParamRow(math=torch.float32, default_state=torch.float32, compact_state=True),
    torch.float64: ParamRow(math=torch.float64, default_state=torch.float64, compact_state=False),
}

#: The state dtypes ``ESGDM(state_dtype=...)`` accepts (float32 is the default).
STATE_OPTIONS: dict[torch.dtype, StateOption] = {
    torch.float32: StateOption(min_numel=0, complex_ok=True),
    torch.bfloat16: StateOption(min_numel=0, complex_ok=False),
    # 8-bit blockwise state (esgdm.quant): codes plus one float32 scale per 256 elements;
    # smaller tensors keep float32 state, their scales would cost more than they save
    torch.uint8: StateOption(min_numel=quant.MIN_NUMEL, complex_ok=False),
}

# A floating dtype without a row (a float8 parameter) is refused by every backend; its
# bucket is built first, with the state a float32 parameter would get.
_OTHER = PARAM_DTYPES[torch.float32]


def row(param_dtype: torch.dtype) -> ParamRow:
    return PARAM_DTYPES.get(param_dtype, _OTHER)


def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the rule computes in for ``param_dtype`` parameters."""
    return row(param_dtype).math


def state_dtypes(param_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """Every state dtype ``param_dtype`` parameters may have (the default first)."""
    r = row(param_dtype)
    if not r.compact_state:
        return (r.default_state,)
    return (r.default_state, *(d for d in STATE_OPTIONS if d != r.default_state))


def state_dtype_for(param_dtype: torch.dtype, requested: torch.dtype | None = None,
                    numel: int | None = None) -> torch.dtype:
    """The state dtype of a ``param_dtype`` tensor (of ``numel`` elements, None: any
    size) when ``state_dtype=requested``: the one asked for where it applies, else the
    row's default (float32 by default, float64 for float64 parameters)."""
    r = row(param_dtype)
    if requested is None or not r.compact_state:
        return r.default_state
    if numel is not None and numel < STATE_OPTIONS[requested].min_numel:
        return r.default_state
    return requested


def name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``."""
    return str(dtype).replace("torch.", "")


def names(dtypes) -> str:
    """``"float32, bfloat16 and float16"``."""
    listed = [name(d) for d in dtypes]
    return ", ".join(listed[:-1]) + " and " + listed[-1] if len(listed) > 1 else "".join(listed)


__all__ = ["PARAM_DTYPES", "STATE_OPTIONS", "ParamRow", "StateOption", "math_dtype", "name", "names",
           "row", "state_dtype_for", "state_dtypes"]
