"""The ``"torch"`` backend: the rule of :mod:`esgdm.rule` in plain PyTorch ops.

It runs wherever PyTorch does (any device, fp32/bf16/fp16/fp64 parameters, fp32 or
bf16 state) and is the portable fallback.  Everything stays on the device: the
per-tensor scalars are derived with tensor ops (:func:`esgdm.rule.derive`), a set
``found_inf`` turns every gradient into NaN (:func:`esgdm.rule.grad_divisor`), so the
rule's own selects keep the old values, and nothing is read back, so it too can be
captured in a CUDA graph.

The element-wise work is :func:`esgdm.rule.step_elements`, the reference's own code,
run piece by piece (pieces of at most :data:`CHUNK` elements on a CPU, whose
intermediates stay in the caches, so that memory sees each of ``p``, ``g``, ``m``,
``D`` read once and ``p``, ``m`` written once), in a few buffers allocated once per
call and reused by every piece, with every operation writing into a buffer or into
the state itself (``out=``): no temporary is allocated per operation.

That is about 22 operations per piece on a plain step.  On the devices of
:data:`COMPILE_DEVICES` (the CPU) the second stage of the rule
(:func:`esgdm.rule.finish_elements`: all but the two ``lerp`` and the ``sqrt``, whose
roundings only torch's own kernels reproduce) runs instead as one kernel compiled by
``torch.compile`` from the same code, once a probe on edge values has shown that
kernel to give the eager operations' results (:func:`compiled_finish`): 4 passes per
piece.  Without a working compiler everything stays eager.
"""

from __future__ import annotations

import functools
import os
import threading

import torch

from esgdm.backends import Backend
from esgdm.quant import step_through_float32
from esgdm.rule import (
    BIAS,
    DSCALE_FLOOR,
    FLAG_EXACT,
    FLAG_STOCHASTIC_ROUNDING,
    STEPS,
    WARM,
    derive,
    finish_elements,
    floor_terms,
    grad_divisor,
    random_bits,
    step_elements,
    stochastic_round,
)

_SR_DTYPES = (torch.bfloat16, torch.float16)

#: Elements per piece at most on a CPU: 1M (4 MiB of fp32); a tensor is cut into equal
#: pieces.  Each eager operation on a piece costs about 2 us of host time, so pieces
#: must not be small, and the intermediates of a piece this size still stay in the caches.
CHUNK = 1 << 20
#: Elements per piece elsewhere: large enough that each operation is one big launch
#: (the buffers, about six of them, 8 MiB each in fp32, exist during a call).
DEVICE_CHUNK = 1 << 21

#: Tensors smaller than this are stepped in groups of up to a piece's size: one set of
#: operations for all of them (a per-tensor set costs about 50 us of host time).
GROUP_BELOW = 1 << 16

#: Device types on which :func:`compiled_finish` may be used (an empty tuple: never;
#: ``ESGDM_TORCH_COMPILE=0`` in the environment empties it).
COMPILE_DEVICES: tuple[str, ...] = () if os.environ.get("ESGDM_TORCH_COMPILE", "1").strip() == "0" else ("cpu",)
#: Pieces smaller than this run eagerly (a compiled call costs more host time, and
#: sizes 0 and 1 would each compile once more).
COMPILE_MIN = 1 << 14


def _flat(t):
    """``t``'s memory as a 1-D view (``t`` is dense): element k = memory offset k."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _joined(ts, sizes, total):
    """``(flat, is_view)``: the elements of dense tensors ``ts`` (of ``sizes``), in order,
    as one flat tensor: a view when they lie back to back in one storage (the
    optimizer's state does), else a copy."""
    first = ts[0]
    itemsize, start = first.element_size(), first.storage_offset()
    if (start + total) * itemsize <= first.untyped_storage().nbytes():
        ptr = first.data_ptr()
        for t, size in zip(ts, sizes):
            if t.data_ptr() != ptr:
                break
            ptr += size * itemsize
        else:
            return first.as_strided((total,), (1,), start), True
    return torch.cat([_flat(t) for t in ts]), False


def torch_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
               grad_scale, found_inf, flags, seed) -> None:
    """One ESGD-M step over aligned lists (see :mod:`esgdm.backends` for the contract)."""
    n = len(params)
    if n == 0:
        return
    d_step = hvps is not None
    new_rows, co = derive(scalars, index, hparams, d_step)
    p_dtype = params[0].dtype
    math = torch.float64 if p_dtype == torch.float64 else torch.float32
    exact = bool(flags & FLAG_EXACT)
    # Per-tensor scalars in the math dtype (rounded from float64 once), one entry per tensor.
    vec = {k: co[k].to(math) for k in ("w", "beta2", "eps", "step_scale", "decay", "dscale")}
    if not exact:  # DSCALE_FLOOR looked up per call: benchmarks/bench_train.py studies others
        vec["dfloor"], vec["flip"], vec["unobserved"] = floor_terms(vec["dscale"], DSCALE_FLOOR)
    sr = bool(flags & FLAG_STOCHASTIC_ROUNDING) and p_dtype in _SR_DTYPES
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    divisor = grad_divisor(grad_scale, found_inf, math)

    device = params[0].device
    numels = [p.numel() for p in params]
    chunk = min(CHUNK if device.type == "cpu" else DEVICE_CHUNK, sum(numels))
    compiled = None
    if p_dtype == math and exp_avgs[0].dtype == math and chunk >= COMPILE_MIN:
        compiled = compiled_finish(device, math, exact, d_step)
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def scratch(name: str, dtype: torch.dtype, size: int = 0) -> torch.Tensor:
        buf = buffers.get((name, dtype))
        if buf is None:
            buf = buffers[name, dtype] = torch.empty(chunk, dtype=dtype, device=device)
        return buf[:size]

    def step_tensor(i: int) -> None:
        """Tensor ``i``, in equal pieces of at most ``chunk`` elements."""
        flats = [_flat(params[i]), _flat(grads[i]), _flat(exp_avgs[i]), _flat(exp_avg_ds[i])]
        if d_step:
            flats.append(_flat(hvps[i]))
        total = numels[i]
        piece = max(1, -(-total // -(-total // chunk))) if total else 1
        one = {k: v[i] for k, v in vec.items()}
        for start in range(0, total, piece):
            p, g, m, d, *hs = (t[start:start + piece] for t in flats)
            size = p.numel()
            p_new = step_elements(
                p, g, m, d, hs[0] if d_step else None, w=one["w"], beta2=one["beta2"], eps=one["eps"],
                step_scale=one["step_scale"], decay=one["decay"], dscale=one["dscale"], exact=exact,
                divisor=divisor, terms=None if exact else (one["dfloor"], one["flip"], one["unobserved"]),
                math=math, out_p=None if sr else p, out_m=m, out_d=d if d_step else None,
                scratch=functools.partial(scratch, size=size),
                finish=compiled if compiled is not None and size >= COMPILE_MIN else None)
            if sr:
                r = random_bits(seed, co["slot"][i], co["steps"][i], size, device, start=start)
                rounded = stochastic_round(p_new, p_dtype, r)
                if skip is not None:  # rounding may change an old value's zero sign: keep p
                    rounded = torch.where(skip, p, rounded)
                p.copy_(rounded)

    def step_group(lo: int, hi: int) -> None:
        """Small tensors ``lo`` to ``hi - 1`` as one: their elements joined (state that
        lies back to back is stepped where it is).  Tensors of one size are stepped as
        the rows of a ``[k, size]`` matrix with each scalar a ``[k, 1]`` column that
        broadcasts; tensors of several sizes have every scalar repeated per element."""
        sizes = numels[lo:hi]
        total = sum(sizes)
        rows = (hi - lo, sizes[0]) if min(sizes) == max(sizes) else None
        if rows is not None:
            def each(v):
                return v[lo:hi].unsqueeze(1)

            def shaped(t):
                return t.view(rows)
        else:
            repeats = torch.tensor(sizes, device=device)

            def each(v):
                return torch.repeat_interleave(v[lo:hi], repeats, output_size=total)

            def shaped(t):
                return t
        lists = [params[lo:hi], grads[lo:hi], exp_avgs[lo:hi], exp_avg_ds[lo:hi]]
        joined = [_joined(ts, sizes, total) for ts in lists + ([hvps[lo:hi]] if d_step else [])]
        p, g, m, d = (shaped(t) for t, _ in joined[:4])
        step_elements(
            p, g, m, d, shaped(joined[4][0]) if d_step else None, w=each(vec["w"]),
            beta2=each(vec["beta2"]) if d_step else None, eps=each(vec["eps"]),
            step_scale=each(vec["step_scale"]), decay=each(vec["decay"]), dscale=None, exact=exact,
            divisor=divisor, terms=None if exact else tuple(each(vec[k]) for k in ("dfloor", "flip", "unobserved")),
            math=math, out_p=p, out_m=m, out_d=d if d_step else None,
            scratch=lambda name, dtype: shaped(scratch(name, dtype, total)))
        for k in (0, 2, 3) if d_step else (0, 2):  # copies go back: p, m (and D)
            flat, is_view = joined[k]
            if not is_view:
                torch._foreach_copy_([_flat(t) for t in lists[k]], list(flat.split(sizes)))

    # Tensors below GROUP_BELOW elements go in groups (not under stochastic rounding,
    # whose random bits are per tensor, nor while a CUDA graph is captured: the group
    # sizes are copied to the device); the others alone.
    group = not sr and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    small = min(GROUP_BELOW, chunk + 1) if group else 0
    i = 0
    while i < n:
        if 0 < numels[i] < small:
            # a run of one size as a matrix, else a run of small tensors of any sizes
            lo, total, size = i, 0, numels[i]
            while i < n and numels[i] == size and total + size <= chunk:
                total += size
                i += 1
            if i - lo == 1:
                while i < n and 0 < numels[i] < small and total + numels[i] <= chunk \
                        and not (i + 1 < n and numels[i + 1] == numels[i]):
                    total += numels[i]
                    i += 1
            step_group(lo, i)
        else:
            step_tensor(i)
            i += 1
    slot = co["slot"]
    rows = new_rows[:, [BIAS, WARM, STEPS]]
    if skip is not None:
        rows = torch.where(skip, scalars[slot][:, [BIAS, WARM, STEPS]], rows)
    scalars[slot, BIAS] = rows[:, 0]
    scalars[slot, WARM] = rows[:, 1]
    scalars[slot, STEPS] = rows[:, 2]


# ------------------------------------------------------- the compiled second stage

def _finish_in_place(p, g, m, d, m_new, d_new, mhat, root, eps, step_scale, decay,
                     dfloor, flip, unobserved):
    """:func:`esgdm.rule.finish_elements` writing ``p``, ``m`` (and ``D`` when
    ``d_new`` is given) in place, every intermediate a new tensor: what
    ``torch.compile`` traces (into one kernel that reads the inputs once)."""
    finish_elements(p, g, m, d, m_new, d_new, mhat, root, eps=eps, step_scale=step_scale, decay=decay,
                    terms=None if dfloor is None else (dfloor, flip, unobserved), out_p=p, out_m=m,
                    out_d=None if d_new is None else d,
                    scratch=lambda name, dtype: torch.empty_like(p, dtype=dtype))


_compile_lock = threading.Lock()
_compiled_fn = None
#: (device type, dtype, exact, d_step) -> the finish to use (None: stay eager).
_finishes: dict[tuple, object] = {}


def compiled_finish(device: torch.device, dtype: torch.dtype, exact: bool, d_step: bool):
    """A drop-in for :func:`esgdm.rule.finish_elements` (``finish=`` of
    :func:`esgdm.rule.step_elements`) that runs it compiled, for pieces whose ``p``,
    ``m``, ``D`` are in the math dtype and stepped in place; None where that is not to
    be used: a device type not in :data:`COMPILE_DEVICES`, or no working compiler, or a
    compiled kernel that the probe (:func:`_agrees`) found to differ from the eager
    operations (anything but the sign and payload of a NaN).  Decided once per
    process and combination, then remembered."""
    key = (device.type, dtype, exact, d_step)
    if key in _finishes:
        return _finishes[key]
    with _compile_lock:
        if key not in _finishes:
            _finishes[key] = _make_finish(device, dtype, exact, d_step)
    return _finishes[key]


def _make_finish(device, dtype, exact, d_step):
    global _compiled_fn
    key = (device.type, dtype, exact, d_step)
    if device.type not in COMPILE_DEVICES:
        return None
    try:
        if _compiled_fn is None:
            # one worker: no process pool started behind the user's back
            _compiled_fn = torch.compile(_finish_in_place, dynamic=True, options={"compile_threads": 1})
        fn = _compiled_fn

        def finish(p, g, m, d, m_new, d_new, mhat, root, *, eps, step_scale, decay, terms,
                   out_p, out_m, out_d, scratch):
            kw = dict(eps=eps, step_scale=step_scale, decay=decay, terms=terms, out_p=out_p,
                      out_m=out_m, out_d=out_d, scratch=scratch)
            if out_p is not p or out_m is not m or (d_new is not None and out_d is not d):
                return finish_elements(p, g, m, d, m_new, d_new, mhat, root, **kw)  # not in place
            dfloor, flip, unobserved = (None, None, None) if terms is None else terms
            try:
                fn(p, g, m, d, m_new, d_new, mhat, root, eps, step_scale, decay, dfloor, flip, unobserved)
            except Exception:  # noqa: BLE001 - a recompilation that failed (before any write)
                _finishes[key] = None
                return finish_elements(p, g, m, d, m_new, d_new, mhat, root, **kw)
            return p

        if not _agrees(finish, device, dtype, exact, d_step):
            return None
    except Exception:  # noqa: BLE001 - no compiler, an unsupported platform: stay eager
        return None
    return finish


def _agrees(finish, device, dtype, exact, d_step) -> bool:
    """Whether ``finish`` gives :func:`esgdm.rule.finish_elements`'s results on a probe
    of random and edge values (zeros of both signs, infinities, NaNs, subnormals, the
    largest finite values; ``D == 0`` and a zero ``dscale`` included), NaNs compared as
    NaNs."""
    gen = torch.Generator().manual_seed(0)
    n = COMPILE_MIN + 7  # not a multiple of any vector width
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45,
                          3e38, -3e38, 1.0], dtype=torch.float64)

    def values(scale=1.0, nonneg=False):  # (no host reads: a probe may run anywhere)
        x = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        edge = edges[torch.randint(0, len(edges), (n,), generator=gen)]
        x = torch.where(torch.rand(n, generator=gen) < 0.1, edge, x)
        return (x.abs() if nonneg else x).to(dtype).to(device)

    p, g, m, m_new, mhat = values(), values(), values(0.1), values(0.1), values()
    d = values(0.1, nonneg=True) ** 2
    d[::3] = 0
    d_new = values(0.1, nonneg=True) ** 2 if d_step else None
    if d_new is not None:
        d_new[::4] = 0
    root = (d if d_new is None else d_new).sqrt()

    def scalar(x):
        return torch.tensor(x, dtype=dtype, device=device)

    for dscale in (0.3, 0.0):
        terms = None if exact else floor_terms(scalar(dscale))
        kw = dict(eps=scalar(1e-4), step_scale=scalar(0.0123), decay=scalar(0.999), terms=terms)
        want = [t.clone() for t in (p, m, d)]
        finish_elements(want[0], g, want[1], want[2], m_new, d_new, mhat, root, out_p=want[0],
                        out_m=want[1], out_d=None if d_new is None else want[2],
                        scratch=lambda name, dt: torch.empty_like(p, dtype=dt), **kw)
        got = [t.clone() for t in (p, m, d)]
        finish(got[0], g, got[1], got[2], m_new, d_new, mhat, root, out_p=got[0], out_m=got[1],
               out_d=None if d_new is None else got[2], scratch=None, **kw)
        for x, y in zip(want, got):
            nan = x.isnan()
            if not torch.equal(nan, y.isnan()) or not torch.equal(x[~nan].view(torch.uint8),
                                                                   y[~nan].view(torch.uint8)):
                return False
    return True


class TorchBackend(Backend):
    name = "torch"

    def why_not(self, device, dtype):
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            return f"it steps float32, float64, bfloat16 and float16 parameters, not {dtype}"
        return None

    def step(self, params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
             grad_scale, found_inf, flags, seed, qscales=None):
        if qscales is not None:  # 8-bit state: decoded to float32 around the same step
            step_through_float32(torch_step, params, grads, exp_avgs, exp_avg_ds, qscales, hvps, scalars,
                                 index, hparams, grad_scale, found_inf, flags, seed)
            return
        torch_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
                   grad_scale, found_inf, flags, seed)

    def describe(self):
        where = ", ".join(COMPILE_DEVICES) or "no device"
        return f"PyTorch ops, piece by piece in reused buffers (second stage compiled on {where}); runs everywhere"


BACKEND = TorchBackend()
