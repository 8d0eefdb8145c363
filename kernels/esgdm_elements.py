"""The element-wise ESGD-M rule in Triton: what one lane does to one element.

:func:`_update` is :mod:`esgdm.rule`'s per-element rule (``grad_scale`` division, the
NaN policy, ``FLAG_EXACT`` or the ``dscale`` rule where ``D == 0``, the floor on
``sqrt(D)``); :func:`_step_block` loads, updates and stores one tile of a tensor with
float32/bf16 state, :func:`_step_block8` the same with 8-bit state (:mod:`esgdm.quant`:
decode, :func:`_update` unchanged, encode with each 256-element block's new scale); the
stochastic rounding of 16-bit parameters (:func:`_stochastic_round`, the counter hash
:func:`_mix32`) and the exact (``*_rn``) division and square root live here too.

The multi-tensor kernel that walks a bucket and calls these per tile, and its launch,
are :mod:`esgdm_step` (``kernels/esgdm_step.py``).  Like it, this module does not import
the package: the copies of the package's constants below are checked by
tests/test_one_definition.py.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

#: 8-bit state (esgdm.quant, which the kernel module does not import; the copies are
#: checked by tests/test_one_definition.py): blocks of QUANT_BLOCK elements, scale
#: columns, code levels.
QUANT_BLOCK = 256
QUANT_M_SCALE, QUANT_D_SCALE = 0, 1
QUANT_M_LEVELS, QUANT_M_ZERO, QUANT_D_LEVELS = 127, 128, 255
#: What decoding multiplies by: 1 / 127 and 1 / 255 rounded to float32 (quant.INV_*).
QUANT_INV_M_LEVELS, QUANT_INV_D_LEVELS = float.fromhex("0x1.020408p-7"), float.fromhex("0x1.010102p-8")
#: encode_m's pre-scale of a block whose max |m| is below TINY or above HUGE
#: (quant.TINY, HUGE, PRESCALE).
QUANT_TINY, QUANT_HUGE, QUANT_PRESCALE = 2.0 ** -126, 2.0 ** 126, 2.0 ** 24
_QB = tl.constexpr(QUANT_BLOCK)
_QM_SCALE, _QD_SCALE = tl.constexpr(QUANT_M_SCALE), tl.constexpr(QUANT_D_SCALE)
_QM_LEVELS, _QM_ZERO, _QD_LEVELS = (
    tl.constexpr(float(c)) for c in (QUANT_M_LEVELS, QUANT_M_ZERO, QUANT_D_LEVELS))
_QM_INV, _QD_INV, _Q_TINY, _Q_HUGE, _Q_PRESCALE, _Q_UNSCALE = (
    tl.constexpr(c) for c in (QUANT_INV_M_LEVELS, QUANT_INV_D_LEVELS, QUANT_TINY, QUANT_HUGE,
                              QUANT_PRESCALE, 1.0 / QUANT_PRESCALE))

#: Bits of ``flags`` (the same values as esgdm.rule's FLAG_*; the kernel module does
#: not import the package so that it stays usable on its own).
FLAG_EXACT = 1
FLAG_STOCHASTIC_ROUNDING = 2

#: esgdm.rule.DSCALE_FLOOR: without FLAG_EXACT, sqrt(D) is floored at DSCALE_FLOOR *
#: dscale.  A power of two, so that the product is exact in float32.
DSCALE_FLOOR = 0.0625
_DSCALE_FLOOR = tl.constexpr(DSCALE_FLOOR)  # the kernels' copy (a global must be constexpr)

#: Precise (IEEE round-to-nearest) sqrt and division exist in Triton >= 3.0.
PRECISE = hasattr(tl, "sqrt_rn") and hasattr(tl, "div_rn")

#: Stored-p rounding modes (constexpr ROUNDING of the kernel).
ROUND_NEAREST, ROUND_STOCHASTIC_BF16, ROUND_STOCHASTIC_FP16 = 0, 1, 2


# ------------------------------------------------------------------- device code

@triton.jit
def _lerp(a, b, w):
    """``torch.lerp(a, b, w)`` as torch computes it (so the backends agree to rounding):
    ``a + w*(b - a)`` for ``w < 0.5``, else ``b - (1 - w)*(b - a)``."""
    small = w < 0.5
    return tl.where(small, a, b) + tl.where(small, w, w - 1.0) * (b - a)


@triton.jit
def _div(a, b, PRECISE_MATH: tl.constexpr):
    if PRECISE_MATH:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _isfinite(x):
    """float32 ``x`` is neither infinite nor NaN (exponent bits not all ones)."""
    return (x.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000


@triton.jit
def _mix32(x):
    """The 32-bit integer hash of esgdm.rule.mix32 on uint32 values (wrapping products)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _bf16_nearest(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), still as float32.

    Used only where the conversion itself truncates (the interpreter)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _store_nearest(ptr, x, mask, EMULATE_BF16: tl.constexpr):
    """Stores float32 ``x`` at ``ptr`` rounded to nearest in the pointer's dtype."""
    if EMULATE_BF16:
        if ptr.dtype.element_ty == tl.bfloat16:
            x = _bf16_nearest(x)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stochastic_round(x, r, ROUNDING: tl.constexpr):
    """float32 ``x`` rounded with random bits ``r`` (uint32) as esgdm.rule.stochastic_round
    says; the result is float32 and exactly representable in the parameter dtype."""
    bits = x.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    if ROUNDING == 1:  # bfloat16: add 16 random bits below the kept ones, then cut
        y = ((bits + (r >> 16)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:  # float16: round q = x / ulp up with probability frac(q)
        e = tl.maximum(((bits >> 23) & 0xFF).to(tl.int32) - 127, -14)
        ulp = ((e + (127 - 10)) << 23).to(tl.float32, bitcast=True)  # 2**(e - 10)
        q = tl.div_rn(x, ulp)  # exact: ulp is a power of two
        f = tl.floor(q)
        u = (r >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
        y = (f + tl.where(u < q - f, 1.0, 0.0)) * ulp
    return tl.where(finite, y, x)


@triton.jit
def _store_param(p_ptr, p_new, mask, idx, key, ROUNDING: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Stores the new parameters: rounded to nearest, or stochastically (16-bit)."""
    if ROUNDING == 0:
        _store_nearest(p_ptr, p_new, mask, EMULATE_BF16)
    else:
        r = _mix32(key ^ idx)
        p_new = _stochastic_round(p_new, r, ROUNDING)
        tl.store(p_ptr, p_new.to(p_ptr.dtype.element_ty), mask=mask)  # exact conversion


@triton.jit
def _sqrt(x, PRECISE_MATH: tl.constexpr):
    if PRECISE_MATH:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _rint(x, INTERPRETED: tl.constexpr):
    """rint (half to even) of float32 ``0 <= x < 2**22``.  Compiled: libdevice's rint
    (``cvt.rni``); ``(x + 2**23) - 2**23`` would be exact too, but the compiler fuses
    ``a * b + 2**23`` into one fma, which rounds once.  Interpreted (numpy float32,
    nothing fused, no libdevice): that sum."""
    if INTERPRETED:
        return (x + 8388608.0) - 8388608.0
    else:
        return libdevice.rint(x)


@triton.jit
def _decode_m(code, s):
    """esgdm.quant.decode_m: q = code - 128, a = |q| * INV_M_LEVELS,
    m = sign(q) * (s * (a*a)*(a*a))."""
    q = code.to(tl.float32) - _QM_ZERO
    a = tl.abs(q) * _QM_INV
    m = s * ((a * a) * (a * a))
    return tl.where(code < 128, -m, m)  # q < 0


@triton.jit
def _decode_root(code, s):
    """esgdm.quant.decode_d's r = sqrt(D) as stored: t = code * INV_D_LEVELS,
    r = s * (t*t)*(t*t)."""
    t = code.to(tl.float32) * _QD_INV
    return s * ((t * t) * (t * t))


@triton.jit
def _encode_m(m, s, INTERPRETED: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """esgdm.quant.encode_m of the ``[n, 256]`` tile ``m`` with its blocks' scales ``s``
    (max |m|, ``[n]``): uint8 codes.  One division per block: ``inv = 1 / (s * k)``,
    ``k`` the pre-scale of a scale outside [2**-126, 2**126] (2**24 below, 2**-24 above,
    else 1)."""
    live = s > 0.0
    k = tl.where(s < _Q_TINY, _Q_PRESCALE, tl.where(s > _Q_HUGE, _Q_UNSCALE, 1.0))
    inv = _div(1.0, tl.where(live, s * k, 1.0), PRECISE_MATH)
    u = (tl.abs(m) * k[:, None]) * inv[:, None]
    q = tl.where(live[:, None],
                 _rint(_QM_LEVELS * _sqrt(_sqrt(u, PRECISE_MATH), PRECISE_MATH), INTERPRETED), 0.0)
    return (tl.where(m < 0.0, -q, q) + _QM_ZERO).to(tl.uint8)  # -q + 128 is 128 - q


@triton.jit
def _encode_root(r, s, INTERPRETED: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """esgdm.quant.encode_d of the ``[n, 256]`` tile ``r = sqrt(D)`` with its blocks'
    scales ``s`` (max sqrt(D), ``[n]``): uint8 codes, at least 1 where D > 0 (r > 0), 0
    where D == 0.  One division per block: ``inv = 1 / s``."""
    inv = _div(1.0, tl.where(s > 0.0, s, 1.0), PRECISE_MATH)
    c = _rint(_QD_LEVELS * _sqrt(_sqrt(r * inv[:, None], PRECISE_MATH), PRECISE_MATH), INTERPRETED)
    c = tl.where(r > 0.0, tl.maximum(c, 1.0), 0.0)
    return c.to(tl.uint8)


@triton.jit
def _block_max(x, mask):
    """Per row of the ``[n, 256]`` tile ``x`` (values >= 0 or NaN, masked lanes left out):
    the max, as an integer max of the bits (the order of non-negative floats; a NaN wins,
    as in torch's amax)."""
    bits = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    if mask is not None:
        bits = tl.where(mask, bits, 0)
    return tl.max(bits, axis=1).to(tl.float32, bitcast=True)


@triton.jit
def _update(p, g, m, d, h, S, w, beta2, eps, step_scale, decay, dscale, dscale_eps, dfloor,
            D_STEP: tl.constexpr, EXACT: tl.constexpr, HAS_GS: tl.constexpr,
            PRECISE_MATH: tl.constexpr):
    """The element-wise rule of esgdm.rule in float32; returns (p, m, d) new.

    ``w = 1 - beta1``; ``step_scale = alpha / c``; ``decay = 1 - weight_decay * alpha``;
    ``dscale_eps = dscale + eps`` (rounded once, from float64); ``dfloor = DSCALE_FLOOR
    * dscale``, the least ``sqrt(D)`` where ``D > 0`` (unused with EXACT).  Elements whose
    scaled gradient is not finite come back unchanged.  The old ``m`` and ``d`` are replaced by
    the new ones as soon as those exist (an element left alone keeps its old value
    there; what the rest of its arithmetic gives is discarded), so no old value stays
    live through the rest of the arithmetic: fewer registers.
    """
    g = g.to(tl.float32)
    if HAS_GS:
        g = _div(g, S, PRECISE_MATH)
    ok = _isfinite(g)
    g = tl.where(ok, g, 0.0)
    m = m.to(tl.float32)
    m = tl.where(ok, _lerp(m, g, w), m)  # m <- b1*m + (1-b1)*g
    d = d.to(tl.float32)
    if D_STEP:
        h = h.to(tl.float32)
        if HAS_GS:
            h = _div(h, S, PRECISE_MATH)
        h2 = h * h
        h2 = tl.where(_isfinite(h2), h2, 0.0)  # h NaN or inf, or h * h overflowing: dropped
        d = tl.where(ok, tl.maximum(d * beta2, h2, propagate_nan=tl.PropagateNan.ALL), d)
    mhat = _lerp(m, g, w)  # Nesterov look-ahead
    if PRECISE_MATH:
        root = tl.sqrt_rn(d)
    else:
        root = tl.sqrt(d)
    if not EXACT:
        # observed curvature far below the tensor's scale: floored (NaN stays NaN)
        root = tl.maximum(root, dfloor, propagate_nan=tl.PropagateNan.ALL)
    denom = root + eps
    if not EXACT:
        # curvature never observed here (D == 0): precondition by dscale (one division
        # for both cases), or do not move where dscale is 0 too
        denom = tl.where(d == 0, dscale_eps, denom)
    q = _div(mhat, denom, PRECISE_MATH)
    if not EXACT:
        q = tl.where(d == 0, tl.where(dscale > 0, q, 0.0), q)
    p = p.to(tl.float32)
    p = tl.where(ok, p * decay - step_scale * q, p)  # decoupled weight decay, then the step
    return p, m, d


@triton.jit
def _step_block(p_ptr, g_ptr, h_ptr, m_ptr, d_ptr, mask, idx, key, S, w, beta2, eps,
                step_scale, decay, dscale, dscale_eps, dfloor,
                D_STEP: tl.constexpr, EXACT: tl.constexpr, HAS_GS: tl.constexpr,
                ROUNDING: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """Loads one block, applies :func:`_update`, stores it (``mask`` None: full block).

    ``idx`` (uint32) are the elements' indices in their tensor (low 32 bits), ``key`` the
    tensor's stochastic-rounding key; both unused when rounding to nearest."""
    p = tl.load(p_ptr, mask=mask)
    g = tl.load(g_ptr, mask=mask)
    m = tl.load(m_ptr, mask=mask)
    d = tl.load(d_ptr, mask=mask)
    h = g  # unused on plain steps
    if D_STEP:
        h = tl.load(h_ptr, mask=mask)
    p_new, m_new, d_new = _update(p, g, m, d, h, S, w, beta2, eps, step_scale, decay, dscale,
                                  dscale_eps, dfloor, D_STEP, EXACT, HAS_GS, PRECISE_MATH)
    _store_nearest(m_ptr, m_new, mask, EMULATE_BF16)
    if D_STEP:
        _store_nearest(d_ptr, d_new, mask, EMULATE_BF16)
    _store_param(p_ptr, p_new, mask, idx, key, ROUNDING, EMULATE_BF16)


@triton.jit
def _step_block8(p_ptr, g_ptr, h_ptr, m_ptr, d_ptr, qs_ptr, mask, bmask, idx, key, S, w, beta2,
                 eps, step_scale, decay, dscale, dscale_eps, dfloor,
                 D_STEP: tl.constexpr, EXACT: tl.constexpr, HAS_GS: tl.constexpr,
                 ROUNDING: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """:func:`_step_block` for 8-bit state, on a ``[n, 256]`` tile of whole quantization
    blocks: ``m_ptr``/``d_ptr`` point at codes, ``qs_ptr`` (``[n]``) at each block's row of
    the qscale table; ``mask`` (elements) and ``bmask`` (blocks) are None on a full tile.
    ``EMULATE_BF16`` is set exactly when the kernel is interpreted."""
    p = tl.load(p_ptr, mask=mask)
    g = tl.load(g_ptr, mask=mask)
    m = _decode_m(tl.load(m_ptr, mask=mask), tl.load(qs_ptr + _QM_SCALE, mask=bmask)[:, None])
    r = _decode_root(tl.load(d_ptr, mask=mask), tl.load(qs_ptr + _QD_SCALE, mask=bmask)[:, None])
    h = g  # unused on plain steps
    if D_STEP:
        h = tl.load(h_ptr, mask=mask)
    p_new, m_new, d_new = _update(p, g, m, r * r, h, S, w, beta2, eps, step_scale, decay, dscale,
                                  dscale_eps, dfloor, D_STEP, EXACT, HAS_GS, PRECISE_MATH)
    _store_param(p_ptr, p_new, mask, idx, key, ROUNDING, EMULATE_BF16)
    m_scale = _block_max(m_new, mask)
    tl.store(m_ptr, _encode_m(m_new, m_scale, EMULATE_BF16, PRECISE_MATH), mask=mask)
    tl.store(qs_ptr + _QM_SCALE, m_scale, mask=bmask)
    if D_STEP:
        r_new = _sqrt(d_new, PRECISE_MATH)
        d_scale = _block_max(r_new, mask)
        tl.store(d_ptr, _encode_root(r_new, d_scale, EMULATE_BF16, PRECISE_MATH), mask=mask)
        tl.store(qs_ptr + _QD_SCALE, d_scale, mask=bmask)
