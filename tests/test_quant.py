"""The reference 8-bit quantizer itself (esgdm.quant): what every kernel is held to.

Codes (esgdm/quant.py's docstring): m = 128 + sign(m) * rint(127 * (|m| / s) ** (1/4)),
D by r = sqrt(D): c = rint(255 * (r / s) ** (1/4)), at least 1 where D > 0, 0 iff D == 0;
s the block's max |m| or max sqrt(D), blocks of 256 elements in memory order.  In float32
``|m| / s`` is ``|m| * inv`` with ``inv = 1 / s`` once per block (``s`` pre-scaled by
2**24 where it is subnormal), and decoding multiplies by float32(1/127) and float32(1/255).
"""

from __future__ import annotations

import pytest
import torch

from esgdm import quant, rule

B = quant.BLOCK


def _values(n, seed=0, spread=8.0):
    """Values spanning ``spread`` decades, both signs."""
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** (-spread * torch.rand(n, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (sign * mag * 3.0).float()


def _block_scales(x: torch.Tensor) -> torch.Tensor:
    """Each element's block max |x| (float64), the last block short."""
    n = x.numel()
    pad = quant.n_blocks(n) * B - n
    blocks = torch.cat([x.abs().double(), torch.zeros(pad, dtype=torch.float64)]).view(-1, B)
    return blocks.amax(dim=1).repeat_interleave(B)[:n]


# ------------------------------------------------------------------ constants

F32 = torch.float32


def _f32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F32)


def test_inverse_levels_are_the_float32_reciprocals():
    """Decoding multiplies by 1/127 and 1/255 correctly rounded to float32, and the top
    codes decode to the scale itself: 127 * INV_M_LEVELS == 255 * INV_D_LEVELS == 1."""
    from fractions import Fraction

    for levels, inv in ((quant.M_LEVELS, quant.INV_M_LEVELS), (quant.D_LEVELS, quant.INV_D_LEVELS)):
        assert float(_f32(inv)) == inv  # a float32 value
        # the nearest float32 to 1 / levels: within half a unit in its last place
        ulp = Fraction(2) ** (int(torch.tensor(inv).frexp().exponent) - 1 - 23)
        assert abs(Fraction(inv) - Fraction(1, levels)) <= ulp / 2
        assert float(_f32(levels) * _f32(inv)) == 1.0
    assert quant.TINY == float(torch.finfo(F32).tiny)
    assert (quant.HUGE, quant.PRESCALE) == (2.0 ** 126, 2.0 ** 24)


def _scales(n=200_000, seed=0) -> torch.Tensor:
    """Positive finite float32 scales: every exponent, subnormal ones too, random
    mantissas, and the edges (least subnormal, least normal, 1, around HUGE, the
    largest float)."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(1, 0x7F800000, (n,), generator=g, dtype=torch.int64)
    edges = torch.tensor([1, 2, 0x007FFFFF, 0x00800000, 0x00800001, 0x3F7FFFFF, 0x3F800000,
                          0x7E800000, 0x7E800001, 0x7F7FFFFF], dtype=torch.int64)
    return torch.cat([bits, edges]).to(torch.int32).view(F32)


def _prescale(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s < quant.TINY, _f32(quant.PRESCALE),
                       torch.where(s > quant.HUGE, _f32(1.0 / quant.PRESCALE), _f32(1.0)))


def test_block_max_encodes_to_the_top_code_whatever_the_scale():
    """``s * (1 / s)`` may be 1 - 2**-24 rather than 1; the fourth root times the levels
    still rounds to 127 / 255, so the block's largest element keeps the top code and
    round-trips exactly.  For m with every positive finite float32 scale, pre-scaled
    where 1 / s alone would overflow (below 2**-128) or be subnormal (above 2**126, where
    s * (1 / s) strays from 1 by far more); for D with every scale sqrt(D) can have."""
    s = _scales()
    plain = s * (1.0 / s)
    assert ((plain - 1.0).abs() > 2.0 ** -23).any()  # what the pre-scale is for
    k = _prescale(s)
    inv = 1.0 / (s * k)
    assert (inv >= quant.TINY).all() and torch.isfinite(inv).all()
    u = (s * k) * inv
    assert (u <= 1.0).all() and (u >= 1.0 - 2.0 ** -24).all()
    assert (u < 1.0).any()  # the case this test is about does occur
    for levels in (quant.M_LEVELS, quant.D_LEVELS):
        assert torch.round(levels * torch.sqrt(torch.sqrt(u))).eq(levels).all()
    # through the quantizer, one block per scale: the max first, every other block negative
    pick = torch.cat([s[:4086], s[-10:]])
    blocks = pick.repeat_interleave(B).view(-1, B) * torch.linspace(1.0, 0.0, B)
    blocks[::2] = -blocks[::2]
    codes, got = quant.encode_m(blocks.reshape(-1))
    assert torch.equal(got, pick)
    top = codes.view(-1, B)[:, 0]
    assert top[::2].eq(1).all() and top[1::2].eq(255).all()
    assert codes.view(-1, B)[:, -1].eq(quant.M_ZERO).all()  # the block's zero
    back = quant.decode_m(codes, got).view(-1, B)
    assert torch.equal(back[:, 0], blocks[:, 0])
    d = (s.double() ** 2).float()  # positive finite D, one per block: sqrt(D) is the scale
    d = d[(d > 0) & torch.isfinite(d)][:4096]
    dcodes, dgot = quant.encode_d(d.repeat_interleave(B))
    assert (dgot >= 2.0 ** -75).all() and (dgot <= 2.0 ** 64).all()  # 1 / s normal: no pre-scale
    assert dcodes.eq(255).all()
    assert torch.equal(quant.decode_d(dcodes, dgot), (dgot * dgot).repeat_interleave(B))


@pytest.mark.parametrize("shift", [2.0 ** -140, 2.0 ** -133, 2.0 ** -128, 2.0 ** 125])
def test_extreme_m_blocks_keep_their_codes(shift):
    """A block whose max |m| is subnormal (m decaying on coordinates without gradient),
    or above 2**126, is coded as the same block scaled by 2**24 or 2**-24 would be: the
    same codes as ordinary values, its own scale."""
    m = _values(4 * B, seed=11)
    codes, _ = quant.encode_m(m)
    x = m * shift  # exact while normal; subnormal values round
    xc, xs = quant.encode_m(x)
    assert torch.equal(xs, x.abs().view(-1, B).amax(dim=1))
    assert ((xs < quant.TINY) | (xs > quant.HUGE)).all()
    lead = x.abs() >= 2.0 ** -143  # rounded by at most 1/128 of themselves
    assert (xc.int() - codes.int())[lead].abs().le(1).all()
    if shift > 1:
        assert torch.equal(xc, codes)  # nothing rounded
    k = quant.PRESCALE if shift < 1 else 1.0 / quant.PRESCALE
    assert torch.equal(quant.encode_m(x * k)[0], xc)  # what the pre-scale does
    back = quant.decode_m(xc, xs).view(-1, B)
    top = x.abs().view(-1, B).argmax(dim=1)
    assert torch.equal(back.gather(1, top[:, None]), x.view(-1, B).gather(1, top[:, None]))


# ------------------------------------------------------------------ m


@pytest.mark.parametrize("n", [1, 255, 256, 257, 4097, 5000])
def test_m_round_trip_error_and_block_max(n):
    m = _values(n, seed=n)
    codes, s = quant.encode_m(m)
    assert codes.dtype == torch.uint8 and codes.shape == (n,) and s.shape == (quant.n_blocks(n),)
    assert s.dtype == torch.float32
    back = quant.decode_m(codes, s).double()
    x = m.double()
    scale = _block_scales(m)
    # the scale is the block max, and the block's largest element comes back exactly
    assert torch.equal(s.double(), scale[::B])
    top = x.abs() == scale
    assert torch.equal(back[top], x[top])
    assert torch.equal(codes[top & (x > 0)], torch.full_like(codes[top & (x > 0)], 255))
    assert torch.equal(codes[top & (x < 0)], torch.full_like(codes[top & (x < 0)], 1))
    # signs kept (or 0), error within half a code step of the fourth-root companding:
    # |m - m'| <= s * 4 a^3 * (0.5 / 127), a = (|m| / s) ** (1/4) + half a step
    assert ((back * x) >= 0).all()
    a = (x.abs() / scale) ** 0.25 + 0.5 / quant.M_LEVELS
    bound = scale * 4 * a ** 3 * (0.5 / quant.M_LEVELS) * (1 + 1e-5) + scale * 1e-7
    assert ((back - x).abs() <= bound).all()
    # in particular |m - m'| <= 2 s / 127 everywhere
    assert ((back - x).abs() <= scale * 2.0 / quant.M_LEVELS * 1.001).all()


def test_m_codes_are_monotone_and_symmetric():
    m = torch.linspace(-1.0, 1.0, B)  # one block, s = 1
    codes, s = quant.encode_m(m)
    assert float(s) == 1.0
    assert (codes[1:].int() >= codes[:-1].int()).all()
    assert int(codes[0]) == 1 and int(codes[-1]) == 255
    neg, _ = quant.encode_m(-m)
    assert torch.equal(neg.int(), 256 - codes.int())
    tiny = torch.zeros(B)
    tiny[0], tiny[1], tiny[2] = 1.0, 1e-10, -1e-10  # below the code's range: 0
    c, _ = quant.encode_m(tiny)
    assert c[1:].eq(quant.M_ZERO).all()


def test_m_zero_block_and_zero_elements():
    m = torch.zeros(2 * B + 5)
    m[B + 3] = -0.5  # the second block has one element, the others are all zero
    codes, s = quant.encode_m(m)
    assert s.tolist() == [0.0, 0.5, 0.0]
    assert codes[:B].eq(quant.M_ZERO).all() and codes[2 * B:].eq(quant.M_ZERO).all()
    back = quant.decode_m(codes, s)
    assert torch.equal(back, m)


# ------------------------------------------------------------------ D


@pytest.mark.parametrize("n", [1, 256, 257, 4097, 5000])
def test_d_round_trip_error_and_block_max(n):
    g = torch.Generator().manual_seed(n)
    d = (_values(n, seed=n + 1, spread=12.0).abs() * (torch.rand(n, generator=g) > 0.2)).float()
    codes, s = quant.encode_d(d)
    r = d.double().sqrt()
    scale = _block_scales(d.sqrt())
    assert torch.equal(s.double(), scale[::B])
    # D == 0 exactly where the code is 0
    assert torch.equal(codes == 0, d == 0)
    back_d = quant.decode_d(codes, s).double()
    assert torch.equal(back_d == 0, d == 0)
    t = codes.double() / quant.D_LEVELS
    back_r = scale * (t * t) ** 2
    # the block's largest sqrt(D) comes back exactly (as the scale)
    top = d.sqrt().double() == scale
    assert torch.equal(back_r[top & (d > 0)], scale[top & (d > 0)])
    assert codes[top & (d > 0)].eq(255).all()
    # relative error of sqrt(D) within half a code step, wherever the code is not the
    # clamp at 1: the true (r / s) ** (1/4) is within 0.5 / 255 of c / 255, so r' / r is
    # at most (c / (c - 0.5)) ** 4 (about 1 + 2 / c: 0.8% * 255 / c, "about 1%" at the top)
    c = codes.double()
    live = c >= 2
    rel = (back_r - r).abs() / r.clamp(min=1e-300)
    assert (rel[live] <= (c[live] / (c[live] - 0.5)) ** 4 - 1 + 1e-6).all()
    wide = c >= 16
    assert (rel[wide] <= 0.01 * 255 / c[wide]).all()
    # code 1: sqrt(D) at most 1.5 steps up the scale, never lost
    ones = c == 1
    assert (r[ones] <= scale[ones] * (1.5 / 255) ** 4).all()


def test_d_codes_are_monotone_and_tiny_d_stays_observed():
    r = torch.linspace(0.0, 1.0, B)
    codes, s = quant.encode_d(r * r)
    assert float(s) == 1.0 and int(codes[0]) == 0 and int(codes[-1]) == 255
    assert (codes[1:].int() >= codes[:-1].int()).all()
    d = torch.zeros(B)
    d[0], d[1] = 1.0, 1e-30  # sqrt 1e-15 of the block's largest: below the code, kept at 1
    codes, _ = quant.encode_d(d)
    assert int(codes[1]) == 1 and codes[2:].eq(0).all()


def test_d_zero_block():
    d = torch.zeros(B + 10)
    codes, s = quant.encode_d(d)
    assert s.tolist() == [0.0, 0.0] and codes.eq(0).all()
    assert torch.equal(quant.decode_d(codes, s), d)


# ------------------------------------------------------------------ both


@pytest.mark.parametrize("n", [300, 4096, 5000])
def test_decode_encode_is_idempotent(n):
    """Decoded values encode to the same codes and scales (the block max is kept)."""
    m = _values(n, seed=3)
    d = _values(n, seed=4, spread=12.0).abs() * (torch.arange(n) % 5 != 0)
    mc, ms = quant.encode_m(m)
    dc, ds = quant.encode_d(d)
    mc2, ms2 = quant.encode_m(quant.decode_m(mc, ms))
    dc2, ds2 = quant.encode_d(quant.decode_d(dc, ds))
    assert torch.equal(mc2, mc) and torch.equal(ms2, ms)
    assert torch.equal(dc2, dc) and torch.equal(ds2, ds)


def test_tensors_are_coded_in_memory_order():
    """A transposed (dense) tensor: blocks are runs of its memory, not of its index."""
    m = torch.randn(70, 61).t()  # (61, 70), memory order = the (70, 61) tensor's
    d = torch.rand(70, 61).t()
    mc = torch.empty_like(m, dtype=torch.uint8)
    dc = torch.empty_like(d, dtype=torch.uint8)
    qs = quant.new_qscale(m.numel())
    quant.quantize_into(m, d, mc, dc, qs)
    assert mc.stride() == m.stride()
    flat_m = m.t().reshape(-1)  # memory order
    codes, s = quant.encode_m(flat_m)
    assert torch.equal(mc.t().reshape(-1), codes) and torch.equal(qs[:, quant.M_SCALE], s)
    m2, d2 = quant.dequantize(mc, dc, qs)
    assert m2.stride() == m.stride() and d2.stride() == d.stride()
    assert torch.equal(m2.t().reshape(-1), quant.decode_m(codes, s))
    qs2 = qs.clone()
    quant.quantize_into(m2, None, mc.clone(), dc, qs2)  # None: D left alone
    assert torch.equal(qs2, qs)


def test_curvature_scale_and_update_dscale():
    d = torch.rand(5000) * (torch.rand(5000) > 0.5)
    dc = torch.empty(5000, dtype=torch.uint8)
    mc = torch.empty(5000, dtype=torch.uint8)
    qs = quant.new_qscale(5000)
    quant.quantize_into(torch.zeros(5000), d, mc, dc, qs)
    none = torch.zeros(300, dtype=torch.uint8)  # never observed: 0
    got = quant.curvature_scale([dc, none], [qs, quant.new_qscale(300)])
    r = quant.decode_d(dc, qs[:, quant.D_SCALE]).double().sqrt()
    want = r[dc != 0].mean()
    assert got.dtype == torch.float64 and got[1] == 0
    torch.testing.assert_close(got[0], want, rtol=1e-6, atol=0)
    scalars = torch.zeros(4, 4, dtype=torch.float64)
    scalars[:, rule.DSCALE] = 7.0
    slot = torch.tensor([2, 0])
    quant.update_dscale(scalars, slot, [dc, none], [qs, quant.new_qscale(300)], torch.ones(1))
    assert scalars[:, rule.DSCALE].eq(7.0).all()  # found_inf: unchanged
    quant.update_dscale(scalars, slot, [dc, none], [qs, quant.new_qscale(300)], torch.zeros(1))
    assert scalars[2, rule.DSCALE] == got[0] and scalars[0, rule.DSCALE] == 0
    assert scalars[1, rule.DSCALE] == 7.0 and scalars[3, rule.DSCALE] == 7.0
