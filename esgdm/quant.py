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
few percent)::

    m (signed: code 128 + q, q in -127..127)
        encode  u = |m| / s;  q = rint(127 * sqrt(sqrt(u)));  code = 128 + sign(m) * q
        decode  a = |code - 128| / 127;  m = sign(code - 128) * (s * ((a * a) * (a * a)))
    D (>= 0, a running max of h*h with a wide range: the code is for r = sqrt(D), and
       code 0 is kept for D == 0, "never observed")
        encode  r = sqrt(D);  u = r / s;  c = rint(255 * sqrt(sqrt(u)));  c = max(c, 1) if D > 0
        decode  t = c / 255;  r = s * ((t * t) * (t * t));  D = r * r

with ``s`` the block's scale (``max |m|``, ``max sqrt(D)``); a block whose scale is 0
stores code 128 (m) or 0 (D) everywhere.  The largest element of a block round-trips
exactly (code 128 +- 127 / 255 decodes to ``s``).  Relative resolution: about 3% of
``s`` at the top of either code, 10% at 1e-3 of ``s``; only values below about
``4e-9 s`` (m, rounded to 0) or ``2.4e-10 s`` (``sqrt(D)``, rounded up to the
smallest code, never to 0, so an observed coordinate stays observed) leave the code's
range.  The uniform decay ``D <- beta2 * D`` (and ``m <- beta1 * m``) moves the block
scale, not the codes, so it is not lost to rounding.

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
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = _rint(M_LEVELS * torch.sqrt(torch.sqrt(x.abs() / safe)))
    q = torch.where(s > 0, q, torch.zeros_like(q))
    code = torch.where(x < 0, M_ZERO - q, M_ZERO + q)
    return code.to(torch.uint8).reshape(-1)[:n], s.reshape(-1)


def decode_m(codes: Tensor, scales: Tensor) -> Tensor:
    """Flat uint8 codes and their block scales -> flat float32 ``m``."""
    c, n = _blocks(codes.reshape(-1).to(_F32))
    q = c - M_ZERO
    a = q.abs() / M_LEVELS
    m = scales.to(_F32).reshape(-1, 1) * ((a * a) * (a * a))
    return torch.where(q < 0, -m, m).reshape(-1)[:n]


def encode_d(d: Tensor) -> tuple[Tensor, Tensor]:
    """Flat float32 ``D`` (>= 0) -> (uint8 codes ``[numel]``, float32 ``max sqrt(D)``
    per block ``[n_blocks]``)."""
    x, n = _blocks(d.to(_F32).reshape(-1))
    r = torch.sqrt(x)
    s = r.amax(dim=1, keepdim=True)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    c = _rint(D_LEVELS * torch.sqrt(torch.sqrt(r / safe)))
    c = torch.where(x > 0, torch.clamp(c, min=1.0), torch.zeros_like(c))
    return c.to(torch.uint8).reshape(-1)[:n], s.reshape(-1)


def decode_d(codes: Tensor, scales: Tensor) -> Tensor:
    """Flat uint8 codes and their block scales -> flat float32 ``D``."""
    c, n = _blocks(codes.reshape(-1).to(_F32))
    t = c / D_LEVELS
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
            t = flat[start:start + _PIECE].to(_F32) / D_LEVELS
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
    "BLOCK", "D_LEVELS", "D_SCALE", "MIN_NUMEL", "M_LEVELS", "M_SCALE", "M_ZERO", "curvature_scale",
    "decode_d", "decode_m", "dequantize", "encode_d", "encode_m", "n_blocks", "new_qscale",
    "quantize_into", "reference_step", "step_through_float32", "update_dscale",
]
