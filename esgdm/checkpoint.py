"""Checkpoint glue: ``state_dict`` in the original ``esgd.ESGD`` format, checked before any write.

Per-parameter state keys are the original's (``exp_avg``, ``exp_avg_d``,
``exp_avg_bias_corr``, ``lr_warmup_cumprod``) plus ``step`` (the steps the parameter
took, which keys stochastic rounding); the top level holds ``global_state`` with the
original's counters plus this implementation's ``seed`` and ``state_dtype``.
Checkpoints of the original (no ``step``, no ``seed``) load too.

Values are checked against what a run can produce: ``exp_avg`` finite, ``exp_avg_d``
finite and ``>= 0``, ``exp_avg_bias_corr`` (``beta1**k``) and ``lr_warmup_cumprod``
(``lr_warmup**j``) in ``[0, 1]`` (both reach 0: ``beta1 = 0``, or ``0.9**k`` underflowing
after some 7,000 steps), ``step`` a whole number ``>= 0``, the counters integers, the
seed an integer in ``[0, 2**64)``, the state dtype one the optimizer keeps.

:func:`validate` turns a state dict into plain values (or raises ``ValueError``
naming the bad entry) without touching the optimizer, so that a failed load changes
nothing; the optimizer then writes them.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from esgdm import dtypes, quant
from esgdm.buckets import is_dense, local, real_view

#: The keys of one parameter's state (``opt.state[p]``), as the original ``esgd.ESGD``
#: names them, plus ``step``.  (The columns of the device table that holds the three
#: scalars are :data:`esgdm.rule.BIAS`, :data:`~esgdm.rule.WARM`, :data:`~esgdm.rule.STEPS`.)
KEY_EXP_AVG, KEY_EXP_AVG_D, KEY_BIAS, KEY_WARM, KEY_STEP = (
    "exp_avg", "exp_avg_d", "exp_avg_bias_corr", "lr_warmup_cumprod", "step")
#: The keys every saved parameter state must have (``step`` may be missing: the original's).
REQUIRED_KEYS = (KEY_EXP_AVG, KEY_EXP_AVG_D, KEY_BIAS, KEY_WARM)
#: 8-bit state (``state_dtype=torch.uint8``): ``exp_avg``/``exp_avg_d`` hold uint8 codes and
#: this key the float32 ``[blocks, 2]`` block scales (:mod:`esgdm.quant`).
KEY_QSCALE = "qscale"
#: ...and (in ``state_dict()``, not ``opt.state``) the strides of the codes when they were
#: written: blocks follow the codes' memory order, so codes that a tool lays out again
#: (``.contiguous()``) are put back in that order before they are read.
KEY_CODE_STRIDES = "code_strides"

#: Seeds are 64-bit: every bit keys the signs (:mod:`esgdm.signs`).
SEED_LIMIT = 2**64

#: What ``global_state["state_dtype"]`` may say (``state_dict`` writes one of these).
STATE_DTYPE_NAMES = tuple(dtypes.name(d) for d in dtypes.STATE_OPTIONS)

#: Each saved param group carries a copy of ``global_state`` under this key, because
#: torch.distributed.checkpoint keeps only ``state`` and ``param_groups``.
GROUP_KEY = "esgdm_global_state"


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (bools, floats and strings are refused)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {minimum})")
    return int(value)


def check_seed(value: Any, name: str = "seed") -> int:
    """An integer in ``[0, 2**64)``."""
    value = check_count(name, value, 0)
    if value >= SEED_LIMIT:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer in [0, 2**64))")
    return value


def scalar(name: str, value: Any) -> float:
    """A finite real number from a float, an int or a one-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value, got a tensor of shape {tuple(value.shape)}")
        if value.is_meta:
            raise ValueError(f"{name} is a tensor on the meta device (it holds no value)")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def state_tensor(name: str, value: Any, shape, complex_state: bool = False) -> Tensor:
    """A state tensor of ``shape``: floating point, or complex for a complex parameter
    (``complex_state``), whose state is shown as complex as in torch.optim."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.is_meta:
        raise ValueError(f"{name} is a tensor on the meta device (it holds no values)")
    if complex_state and not value.is_complex():
        raise ValueError(f"{name} must be complex like its parameter, got {value.dtype}")
    if not complex_state and not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(value.shape)}, the parameter has shape {tuple(shape)}")
    return value


def code_strides(name: str, value: Any, shape) -> tuple[int, ...]:
    """:data:`KEY_CODE_STRIDES`: the strides of a dense layout of ``shape``."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in value):
        raise ValueError(f"{name} must be a list of integer strides, got {value!r}")
    if len(value) != len(shape) or min(value, default=0) < 0 \
            or not is_dense(torch.empty_strided(tuple(shape), tuple(value), device="meta")):
        raise ValueError(f"{name} {list(value)} is not a dense layout of shape {tuple(shape)}")
    return tuple(value)


def _laid_out(codes: Any, shape, strides: tuple[int, ...]) -> Any:
    """``codes`` with ``strides`` (a copy where they differ; anything else as it is, for
    :func:`quantized_state` to name)."""
    if not isinstance(codes, Tensor) or tuple(codes.shape) != tuple(shape) or codes.stride() == strides:
        return codes
    return torch.empty_strided(codes.shape, strides, dtype=codes.dtype, device=codes.device).copy_(codes)


def quantized_state(name: str, exp_avg: Any, exp_avg_d: Any, qscale: Any, shape) -> None:
    """8-bit state as :mod:`esgdm.quant` writes it: uint8 codes of ``shape``, dense (the
    blocks follow their memory order), no m code 0 (outside the code), and float32
    ``[n_blocks, 2]`` scales, finite and ``>= 0``."""
    numel = math.prod(shape)
    for key, codes in ((KEY_EXP_AVG, exp_avg), (KEY_EXP_AVG_D, exp_avg_d)):
        if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
            got = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"{name.format(repr(key))} must be uint8 codes like "
                             f"{name.format(repr(KEY_EXP_AVG))}, got {got}")
        if codes.is_meta:
            raise ValueError(f"{name.format(repr(key))} is a tensor on the meta device (it holds no values)")
        if tuple(codes.shape) != tuple(shape):
            raise ValueError(f"{name.format(repr(key))} has shape {tuple(codes.shape)}, the parameter "
                             f"has shape {tuple(shape)}")
        if not is_dense(codes):
            raise ValueError(f"{name.format(repr(key))} is not dense (strides {codes.stride()}): 8-bit "
                             "codes are blocks of consecutive memory")
    if not bool((local(exp_avg) != 0).all()):
        raise ValueError(f"{name.format(repr(KEY_EXP_AVG))} holds code 0, which the 8-bit m code never "
                         "writes (it is 128 +- 127)")
    want = (quant.n_blocks(numel), 2)
    if not isinstance(qscale, Tensor) or qscale.dtype != torch.float32 or tuple(qscale.shape) != want:
        got = (f"{qscale.dtype} of shape {tuple(qscale.shape)}" if isinstance(qscale, Tensor)
               else type(qscale).__name__)
        raise ValueError(f"{name.format(repr(KEY_QSCALE))} must be float32 of shape {want} (one row per "
                         f"{quant.BLOCK} elements), got {got}")
    check_values(name.format(repr(KEY_QSCALE)), qscale, nonnegative=True)


def state_entry(name: str, entry: dict, shape, complex_state: bool, kept_in: torch.dtype | None = None) -> dict:
    """One parameter's ``exp_avg``/``exp_avg_d`` (and ``qscale``), checked: float
    state, or 8-bit codes with their scales.  ``name``: a format string for the key;
    ``kept_in``: the float dtype the optimizer keeps (or computes) this state in, where
    every value must be finite too (1e300 in float64 is inf in float32)."""
    exp_avg, exp_avg_d = entry[KEY_EXP_AVG], entry[KEY_EXP_AVG_D]
    if isinstance(exp_avg, Tensor) and exp_avg.dtype == torch.uint8:
        if KEY_QSCALE not in entry:
            raise ValueError(f"{name.format(repr(KEY_EXP_AVG))} holds 8-bit codes but there is no "
                             f"{KEY_QSCALE!r} with their block scales")
        if KEY_CODE_STRIDES in entry:  # laid out again since it was saved: back to the written order
            strides = code_strides(name.format(repr(KEY_CODE_STRIDES)), entry[KEY_CODE_STRIDES], shape)
            exp_avg, exp_avg_d = (_laid_out(t, shape, strides) for t in (exp_avg, exp_avg_d))
        quantized_state(name, exp_avg, exp_avg_d, entry[KEY_QSCALE], shape)
        return {KEY_EXP_AVG: exp_avg, KEY_EXP_AVG_D: exp_avg_d, KEY_QSCALE: entry[KEY_QSCALE]}
    exp_avg = state_tensor(name.format(repr(KEY_EXP_AVG)), exp_avg, shape, complex_state)
    exp_avg_d = state_tensor(name.format(repr(KEY_EXP_AVG_D)), exp_avg_d, shape, complex_state)
    check_values(name.format(repr(KEY_EXP_AVG)), exp_avg, nonnegative=False, kept_in=kept_in)
    check_values(name.format(repr(KEY_EXP_AVG_D)), exp_avg_d, nonnegative=True, kept_in=kept_in)
    return {KEY_EXP_AVG: exp_avg, KEY_EXP_AVG_D: exp_avg_d}


def _first_bad(t: Tensor, ok: Tensor) -> str:
    """``t``'s first element where ``ok`` is False, with its index, for a message."""
    flat = ok.reshape(-1)
    i = int((~flat).nonzero()[0, 0])
    return f"{t.reshape(-1)[i].item()!r} (element {i})"


def check_values(name: str, value: Tensor, nonnegative: bool, kept_in: torch.dtype | None = None) -> None:
    """Refuses NaN and +-inf, and negative values when ``nonnegative`` (one host read:
    loading is not a step), and values that overflow ``kept_in``, the dtype the state
    is kept in.  A DTensor's local shard is what this process checks."""
    value = local(value)
    if value.is_complex():  # a complex parameter's state: its real view holds the values
        value = torch.view_as_real(value)
    ok = torch.isfinite(value)
    narrower = (kept_in is not None and kept_in != value.dtype
                and torch.finfo(kept_in).max < torch.finfo(value.dtype).max)
    if narrower:
        ok &= torch.isfinite(value.to(kept_in))
    if nonnegative:
        ok &= value >= 0
    if not bool(ok.all()):
        want = "finite and >= 0" if nonnegative else "finite"
        where = f" in {kept_in}, the dtype this state is kept in" if narrower else ""
        raise ValueError(f"{name} holds {_first_bad(value, ok)}: every value must be {want}{where}")


def in_unit_interval(name: str, value: Any) -> float:
    """A :func:`scalar` in ``[0, 1]``."""
    value = scalar(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def step_count(name: str, value: Any) -> float:
    """A :func:`scalar` that is a whole number ``>= 0`` (held as a float)."""
    value = scalar(name, value)
    if value < 0 or value != math.floor(value):
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    return value


def state_scalars(where: Callable[[str], str], entry: dict) -> dict:
    """One parameter's bias correction, warmup product and step count, checked (a
    missing step, as in the original's checkpoints, is 0).  ``where(key)``: the
    name of ``key`` in messages."""
    return {
        KEY_BIAS: in_unit_interval(where(repr(KEY_BIAS)), entry[KEY_BIAS]),
        KEY_WARM: in_unit_interval(where(repr(KEY_WARM)), entry[KEY_WARM]),
        KEY_STEP: step_count(where(repr(KEY_STEP)), entry.get(KEY_STEP, 0.0)),
    }


def check_state_dtype(value: Any) -> None:
    if value is None:
        return  # checkpoints of the original do not say
    name = str(value).replace("torch.", "")
    if not isinstance(value, (str, torch.dtype)) or name not in STATE_DTYPE_NAMES:
        raise ValueError(f"Invalid state_dtype: {value!r} (a checkpoint holds "
                         f"{' or '.join(map(repr, STATE_DTYPE_NAMES))})")


def kept_in(p: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """The float dtype parameter ``p``'s state is kept (8-bit state: computed) in."""
    dtype = dtypes.state_dtype_for(real_view(local(p)).dtype, state_dtype, p.numel())
    return torch.float32 if dtype == torch.uint8 else dtype


def validate(state_dict: dict, param_groups: list, check_group, state_dtype: torch.dtype | None = None) -> dict:
    """Everything :meth:`ESGDM.load_state_dict` needs, checked; raises ``ValueError``.
    ``state_dtype``: the optimizer's (what its state is kept in, for the values' range).

    Returns ``{"counters": {...}, "groups": [...], "state": {param: {...}}, "other": {...}}``
    (``other``: the state entries whose key is not a parameter id, passed through).
    """
    if not isinstance(state_dict, dict):
        raise ValueError(f"loaded state dict is not a dict: {type(state_dict).__name__}")
    glob = state_dict.get("global_state")
    if glob is None:  # a checkpoint that went through torch.distributed.checkpoint
        groups = state_dict.get("param_groups") or [{}]
        glob = groups[0].get(GROUP_KEY) if isinstance(groups[0], dict) else None
    if not isinstance(glob, dict):
        raise ValueError("loaded state dict is not an ESGD-M checkpoint: missing 'global_state'")
    try:
        counters: dict[str, Any] = {
            "update_d_every": check_count("update_d_every", glob["update_d_every"]),
            "d_warmup": check_count("d_warmup", glob["d_warmup"]),
            "steps": check_count("steps", glob["steps"], 0),
            "steps_since_d": check_count("steps_since_d", glob["steps_since_d"], 0),
        }
    except KeyError as e:
        raise ValueError(f"loaded state dict is not an ESGD-M checkpoint: missing {e}") from None
    seed = glob.get("seed", glob.get("sign_seed"))
    counters["seed"] = None if seed is None else check_seed(seed)
    check_state_dtype(glob.get("state_dtype"))
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"loaded state dict is not an ESGD-M checkpoint: missing {key!r}")

    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                         f"the optimizer has {len(param_groups)}")
    id_to_param: dict[Any, Tensor] = {}
    group_of: dict[Any, int] = {}
    groups = []
    for gi, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"param group {gi} has {len(group['params'])} parameters, "
                             f"the loaded state dict has {len(saved['params'])}")
        for pid in saved["params"]:
            if pid in group_of:  # two parameters would get one state, and one of them none
                raise ValueError(f"loaded state dict lists parameter id {pid!r} twice (in param groups "
                                 f"{group_of[pid]} and {gi}): each id must name one parameter")
            group_of[pid] = gi
        id_to_param.update(zip(saved["params"], group["params"]))
        new = {k: copy.deepcopy(v) for k, v in saved.items() if k not in ("params", GROUP_KEY)}
        new["params"] = group["params"]
        if "param_names" in group and "param_names" not in new:  # as torch.optim: saved names win,
            new["param_names"] = group["param_names"]               # else this optimizer's stay
        check_group(new, f" in loaded param group {gi}")
        groups.append(new)

    names = {n for g in (*param_groups, *saved_groups) for n in g.get("param_names", ())}
    per_param, other = {}, {}
    as_text = {str(pid): pid for pid in id_to_param}
    for key, entry in state_dict["state"].items():
        if key not in id_to_param and (not isinstance(key, int) or isinstance(key, bool)):
            if isinstance(key, str) and key in names:  # keyed by name: it would load nothing
                raise ValueError(f"loaded state dict keys its state by parameter name ({key!r}), "
                                 "its param groups do not: the keys must be what 'params' lists")
            if isinstance(key, str) and key in as_text:  # e.g. a JSON round trip: it would load nothing
                raise ValueError(f"loaded state dict keys its state by the text {key!r}, its param groups "
                                 f"list the id {as_text[key]!r}: the keys must be what 'params' lists "
                                 "(convert them back)")
            other[key] = entry  # not a parameter's: passed through, as torch.optim does
            continue
        if key not in id_to_param:
            raise ValueError(f"loaded state dict has state for unknown parameter id {key!r}")
        p = id_to_param[key]
        if not isinstance(entry, dict):
            raise ValueError(f"state of parameter id {key!r} must be a dict (empty for no state), "
                             f"got {type(entry).__name__}")
        if not entry:
            continue  # a parameter whose state was reset
        missing = [k for k in REQUIRED_KEYS if k not in entry]
        if missing:
            raise ValueError(f"state of parameter id {key!r} lacks {missing}")
        name = f"state {{}} of parameter id {key!r}"
        per_param[p] = {
            **state_entry(name, entry, p.shape, p.is_complex(), kept_in(p, state_dtype)),
            **state_scalars(name.format, entry),
        }
    return {"counters": counters, "groups": groups, "state": per_param, "other": other}


__all__ = ["GROUP_KEY", "KEY_BIAS", "KEY_CODE_STRIDES", "KEY_EXP_AVG", "KEY_EXP_AVG_D", "KEY_QSCALE", "KEY_STEP",
           "KEY_WARM", "REQUIRED_KEYS", "SEED_LIMIT", "STATE_DTYPE_NAMES", "check_count", "check_seed", "check_values",
           "quantized_state", "scalar", "state_entry", "state_scalars", "validate"]
