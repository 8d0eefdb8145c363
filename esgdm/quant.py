"""8-bit blockwise optimizer state: the one reference quantizer every backend follows.

With ``state_dtype=torch.uint8`` a parameter of at least :data:`MIN_NUMEL` elements
keeps ``m`` (``exp_avg``) and ``D`` (``exp_avg_d``) as one byte per element, in blocks
of :data:`BLOCK` consecutive elements of the tensor's memory (element ``k`` = memory
offset ``k``, as the kernels walk a dense tensor; the last block may be short), and
one float32 scale per block for each of the two: 2 + 8/256 = 2.03 bytes per parameter
against 8 for float32 state.  Smaller tensors keep float32 state (their scales would
cost more than they save, and they are a small share of any large model).

Per tensor the scales are one contiguous float32 tensor ``qscale`` of shape
``[n_blocks, 2]``: column :data:`M_SCALE` is the block's ``max |m|``, column
:data:`D_SCALE` the block's ``max sqrt(D)``.

The two codes are the same fourth-root companding (all arithmetic in float32, every
operation correctly rounded, so that every backend computes the same bytes; ``rint``
rounds half to even; chosen against linear, square-root, cube-root and logarithmic
codes and block sizes 64 to 2048 by ``benchmarks/bench_quant_codes.py``: it keeps the
small coordinates of a block, whose step ``m / sqrt(D)`` can still be large, within a
few percent).  Decoding multiplies by the float32 reciprocals of the levels,
:data:`INV_M_LEVELS` = ``float32(1/127)`` and :data:`INV_D_LEVELS` = ``float32(1/255)``;
encoding divides once per block, ``inv = 1 / s``, and multiplies every element by it::

    m (signed: code 128 + q, q in -127..127)
        per block  k = 2**24 if s < 2**-126, 2**-24 if s > 2**126, else 1;  inv = 1 / (s * k)
        encode     u = (|m| * k) * inv;  q = rint(127 * sqrt(sqrt(u)));  code = 128 + sign(m) * q
        decode     a = |code - 128| * INV_M_LEVELS;  m = sign(code - 128) * (s * ((a * a) * (a * a)))
    D (>= 0, a running max of h*h with a wide range: the code is for r = sqrt(D), and
       code 0 is kept for D == 0, "never observed")
        per block  inv = 1 / s
        encode     r = sqrt(D);  u = r * inv;  c = rint(255 * sqrt(sqrt(u)));  c = max(c, 1) if D > 0
        decode     t = c * INV_D_LEVELS;  r = s * ((t * t) * (t * t));  D = r * r

with ``s`` the block's scale (``max |m|``, ``max sqrt(D)``); a block whose scale is 0
(or NaN) stores code 128 (m) or 0 (D) everywhere (its ``inv`` is taken as 1, unused).
``k`` keeps ``1 / s`` a normal float32 where ``max |m|`` is not in ``[2**-126, 2**126]``:
below, ``1 / s`` overflows (from ``2**-128``; ``m`` decaying with ``beta1`` on coordinates
that get no gradient passes through the subnormal range), above, it is subnormal and
loses bits (``s * (1 / s)`` could round the block max to code 128 +- 128).  Both factors
are powers of two, exact where it matters (``|m| * 2**-24`` rounds only below
``2**-102``, ``2**-228`` of the block max: code 0 either way), and ``k == 1`` between,
so ``u = |m| * inv`` on every block of ordinary values.  ``D``'s scale needs none: a
positive float32 ``D`` is at least ``2**-149`` and at most ``2**128``, so ``s`` is in
``[2**-74.5, 2**64]``.

The largest element of a block round-trips exactly: ``s * inv`` is ``1`` or ``1 -
2**-24`` (one rounding each way), whose fourth root times 127 or 255 rounds to the top
code, and ``127 * INV_M_LEVELS == 255 * INV_D_LEVELS == 1`` exactly, so the top code
decodes to ``s``.  Relative resolution: about 3% of ``s`` at the top of either code,
10% at 1e-3 of ``s``; only values below about ``4e-9 s`` (m, rounded to 0) or
``2.4e-10 s`` (``sqrt(D)``, rounded up to the smallest code, never to 0, so an observed
coordinate stays observed) leave the code's range.  The uniform decay ``D <- beta2 *
D`` (and ``m <- beta1 * m``) moves the block scale, not the codes, so it is not lost to
rounding.

Why multiplications: a step with 8-bit state is compute-bound on a CPU (it moves 15-20
bytes per element against 24-32 with float32 state), and an IEEE division costs several
multiplications there; with one division per element for each code it had five per
element on a plain step, now the rule's two.

A step with 8-bit state is: decode a block, run the element-wise rule of
:mod:`esgdm.rule` in float32 unchanged, encode ``m`` (every step) and ``D`` (D-steps
only; a plain step only reads it).  :func:`reference_step` is that, in torch ops, for
tests; the fused kernels do it in one pass over memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Elements per quantization block (a multiple of every kernel's tile, so that a tile
#: holds whole blocks).
BLOCK = 256
#: Tensors with fewer elements keep float32 state under ``state_dtype=torch.uint8``.
MIN_NUMEL = 4096
#: Columns of a tensor's ``qscale`` table.
M_SCALE, D_SCALE = 0, 1
#: Code levels: m uses 128 +- 127, D uses 0..255.
M_LEVELS, M_ZERO, D_LEVELS = 127, 128, 255
#: What decoding multiplies by: ``1 / M_LEVELS`` and ``1 / D_LEVELS`` rounded to float32
#: (``0x1.020408p-7``, ``0x1.010102p-8``); ``M_LEVELS * INV_M_LEVELS`` and ``D_LEVELS *
#: INV_D_LEVELS`` are exactly 1 in float32, so the top codes decode to the block scale.
INV_M_LEVELS = float(torch.tensor(1.0, dtype=torch.float32) / M_LEVELS)
INV_D_LEVELS = float(torch.tensor(1.0, dtype=torch.float32) / D_LEVELS)
#: encode_m's pre-scale ``k``: a block whose ``max |m|`` is below TINY (2**-126, the
#: least normal float32: subnormal) or above HUGE (2**126) has ``|m|`` and its scale
#: multiplied by PRESCALE (2**24) or 1 / PRESCALE before ``1 / s``, which would overflow
#: or be subnormal; 1 elsewhere.
TINY, HUGE, PRESCALE = 2.0 ** -126, 2.0 ** 126, 2.0 ** 24

_F32 = torch.float32


def n_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def _blocks(x: Tensor) -> tuple[Tensor, int]:
    """A flat tensor padded with zeros to whole blocks, as ``[n_blocks, BLOCK]``."""
    n = x.numel()
    pad = n_blocks(n) * BLOCK - n
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, BLOCK), n


def _rint(x: Tensor) -> Tensor:
    return torch.round(x)  # half to even, as rint / (x + 2**23) - 2**23 for 0 <= x < 2**22


def encode_m(m: Tensor) -> tuple[Tensor, Tensor]:
    """Flat float32 ``m`` -> (uint8 codes ``[numel]``, float32 scales ``[n_blocks]``)."""
    x, n = _blocks(m.to(_F32).reshape(-1))
    s = x.abs().amax(dim=1, keepdim=True)
    k = torch.where(s < TINY, torch.full_like(s, PRESCALE),
                    torch.where(s > HUGE, torch.full_like(s, 1.0 / PRESCALE), torch.ones_like(s)))
    inv = 1.0 / torch.where(s > 0, s * k, torch.ones_like(s))  # one division per block
    q = _rint(M_LEVELS * torch.sqrt(torch.sqrt((x.abs() * k) * inv)))
    q = torch.where(s > 0, q, torch.zeros_like(q))
    code = torch.where(x < 0, M_ZERO - q, M_ZERO + q)
    return code.to(torch.uint8).reshape(-1)[:n], s.reshape(-1)


def decode_m(codes: Tensor, scales: Tensor) -> Tensor:
    """Flat uint8 codes and their block scales -> flat float32 ``m``."""
    c, n = _blocks(codes.reshape(-1).to(_F32))
    q = c - M_ZERO
    a = q.abs() * INV_M_LEVELS
    m = scales.to(_F32).reshape(-1, 1) * ((a * a) * (a * a))
    return torch.where(q < 0, -m, m).reshape(-1)[:n]


def encode_d(d: Tensor) -> tuple[Tensor, Tensor]:
    """Flat float32 ``D`` (>= 0) -> (uint8 codes ``[numel]``, float32 ``max sqrt(D)``
    per block ``[n_blocks]``)."""
    x, n = _blocks(d.to(_F32).reshape(-1))
    r = torch.sqrt(x)
    s = r.amax(dim=1, keepdim=True)
    inv = 1.0 / torch.where(s > 0, s, torch.ones_like(s))  # one division per block
    c = _rint(D_LEVELS * torch.sqrt(torch.sqrt(r * inv)))
    c = torch.where(x > 0, torch.clamp(c, min=1.0), torch.zeros_like(c))
    return c.to(torch.uint8).reshape(-1)[:n], s.reshape(-1)


def decode_d(codes: Tensor, scales: Tensor) -> Tensor:
    """Flat uint8 codes and their block scales -> flat float32 ``D``."""
    c, n = _blocks(codes.reshape(-1).to(_F32))
    t = c * INV_D_LEVELS
    r = scales.to(_F32).reshape(-1, 1) * ((t * t) * (t * t))
    return (r * r).reshape(-1)[:n]


# --------------------------------------------------------- tensors in memory order

def _memory(t: Tensor) -> Tensor:
    """A dense tensor's elements in memory order, as a flat view."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def dequantize(m_codes: Tensor, d_codes: Tensor, qscale: Tensor) -> tuple[Tensor, Tensor]:
    """One tensor's 8-bit state -> float32 ``(m, D)`` with the codes' shape and strides."""
    m = torch.empty_like(m_codes, dtype=_F32)
    d = torch.empty_like(d_codes, dtype=_F32)
    _memory(m).copy_(decode_m(_memory(m_codes), qscale[:, M_SCALE]))
    _memory(d).copy_(decode_d(_memory(d_codes), qscale[:, D_SCALE]))
    return m, d


def quantize_into(m: Tensor | None, d: Tensor | None, m_codes: Tensor, d_codes: Tensor,
                  qscale: Tensor) -> None:
    """Encodes float32 ``m`` and/or ``D`` (same layout as the codes) into the codes and
    ``qscale`` in place; ``None`` leaves that half alone."""
    if m is not None:
        codes, s = encode_m(_memory(m) if m.dtype == _F32 else _memory(m.to(_F32)))
        _memory(m_codes).copy_(codes)
        qscale[:, M_SCALE] = s
    if d is not None:
        codes, s = encode_d(_memory(d) if d.dtype == _F32 else _memory(d.to(_F32)))
        _memory(d_codes).copy_(codes)
        qscale[:, D_SCALE] = s


def new_qscale(numel: int, device=None) -> Tensor:
    return torch.zeros(n_blocks(numel), 2, dtype=_F32, device=device)


#: Elements per piece in :func:`curvature_scale` (a multiple of :data:`BLOCK`): its
#: float32 temporaries stay a few MiB whatever the tensor's size.
_PIECE = 1 << 20


def curvature_scale(d_codes: Sequence[Tensor], qscales: Sequence[Tensor]) -> Tensor:
    """float64 ``[n]``: mean of ``sqrt(D)`` over each tensor's coordinates with ``D > 0``
    (0 where there are none), read from 8-bit state: the decoded ``r`` (not
    ``sqrt(r * r)``), summed per block as ``s * sum(t**4)`` in float32, then over blocks
    in float64.  Pieces of :data:`_PIECE` elements; no host read."""
    out = []
    for codes, qs in zip(d_codes, qscales):
        flat = _memory(codes)
        n = flat.numel()
        total = torch.zeros((), dtype=torch.float64, device=flat.device)
        for start in range(0, n, _PIECE):
            t = flat[start:start + _PIECE].to(_F32) * INV_D_LEVELS  # decode_d's t
            t4, _ = _blocks((t * t) * (t * t))
            first = start // BLOCK
            scale = qs[first:first + t4.shape[0], D_SCALE]
            total = total + (scale * t4.sum(dim=1)).double().sum()
        count = torch.count_nonzero(flat).double()
        out.append(torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)))
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def step_through_float32(step, params, grads, m_codes, d_codes, qscales, hvps, scalars, index,
                         hparams, grad_scale, found_inf, flags, seed) -> None:
    """8-bit state for a kernel that steps float32 state (the "torch" backend): decode
    every tensor's state to float32, run ``step`` (a backend's step function, same
    arguments as :meth:`esgdm.backends.Backend.step`) on it, encode the result.  One
    float32 copy of the call's state is alive meanwhile.  A set ``found_inf`` keeps the
    old codes and scales, chosen on the device (no host read)."""
    states = [dequantize(mc, dc, qs) for mc, dc, qs in zip(m_codes, d_codes, qscales)]
    ms, ds = [s[0] for s in states], [s[1] for s in states]
    step(params, grads, ms, ds, hvps, scalars, index, hparams, grad_scale, found_inf, flags, seed)
    d_step = hvps is not None
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    for m, d, mc, dc, qs in zip(ms, ds, m_codes, d_codes, qscales):
        if skip is None:
            quantize_into(m, d if d_step else None, mc, dc, qs)
            continue
        new_mc, new_dc, new_qs = mc.clone(), dc.clone(), qs.clone()
        quantize_into(m, d if d_step else None, new_mc, new_dc, new_qs)
        mc.copy_(torch.where(skip, mc, new_mc))
        qs.copy_(torch.where(skip, qs, new_qs))
        if d_step:
            dc.copy_(torch.where(skip, dc, new_dc))


def update_dscale(scalars: Tensor, slot: Tensor, d_codes: Sequence[Tensor], qscales: Sequence[Tensor],
                  found_inf: Tensor | None = None) -> None:
    """Writes each stepped tensor's :func:`curvature_scale` into ``scalars[:, DSCALE]``
    (:func:`esgdm.rule.update_dscale` for 8-bit state; unchanged where ``found_inf`` is
    nonzero).  No host read."""
    from esgdm import rule

    if not d_codes:
        return
    new = curvature_scale(d_codes, qscales).to(scalars.device)
    if found_inf is not None:
        new = torch.where(found_inf.to(scalars.device) != 0, scalars[slot, rule.DSCALE], new)
    scalars[slot, rule.DSCALE] = new


def reference_step(params: Sequence[Tensor], grads: Sequence[Tensor], m_codes: Sequence[Tensor],
                   d_codes: Sequence[Tensor], qscales: Sequence[Tensor], hvps: Sequence[Tensor] | None,
                   scalars: Tensor, index: Tensor, hparams: Tensor, grad_scale: Tensor | None,
                   found_inf: Tensor | None, flags: int, seed: int) -> None:
    """The op with 8-bit state, readably: decode, :func:`esgdm.rule.reference_step` on
    float32 state, encode ``m`` (and ``D`` on a D-step), then the curvature scale from
    the stored ``D``.  For tests (reads host values)."""
    from esgdm import rule

    if not params or (found_inf is not None and float(found_inf) != 0):
        return
    states = [dequantize(mc, dc, qs) for mc, dc, qs in zip(m_codes, d_codes, qscales)]
    ms, ds = [s[0] for s in states], [s[1] for s in states]
    rule.reference_step(params, grads, ms, ds, hvps, scalars, index, hparams, grad_scale, None,
                        flags, seed)
    d_step = hvps is not None
    for m, d, mc, dc, qs in zip(ms, ds, m_codes, d_codes, qscales):
        quantize_into(m, d if d_step else None, mc, dc, qs)
    if d_step and not flags & rule.FLAG_EXACT:
        update_dscale(scalars, index[:, 0].long(), d_codes, qscales)


__all__ = [
    "BLOCK", "D_LEVELS", "D_SCALE", "INV_D_LEVELS", "INV_M_LEVELS", "MIN_NUMEL", "M_LEVELS", "M_SCALE",
    "M_ZERO", "HUGE", "PRESCALE", "TINY", "curvature_scale",
    "decode_d", "decode_m", "dequantize", "encode_d", "encode_m", "n_blocks", "new_qscale",
    "quantize_into", "reference_step", "step_through_float32", "update_dscale",
]
