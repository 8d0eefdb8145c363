"""The ESGD-M update rule, in one place: what every backend computes.

For every parameter ``p`` with gradient ``g`` (and, on a D-step, Hessian-vector
product ``h``), with its group's hyper-parameters::

    m     <- b1 * m + (1 - b1) * g
    bias  <- bias * b1
    if D-step:
        D    <- max(b2 * D, h * h)          # Adamax-style inf norm of squared HVPs
        warm <- warm * lr_warmup            # only D-steps advance the warmup
    alpha <- lr * (1 - warm)                # warmup-scaled step size
    mhat  <- m + (1 - b1) * (g - m)         # Nesterov look-ahead
    c     <- 1 - bias * b1                  # momentum bias correction
    p     <- p * (1 - weight_decay * alpha) # decoupled weight decay
    p     <- p - (alpha / c) * mhat / (sqrt(D) + eps)

This module is the contract of the ``esgdm::step_`` operator (:mod:`esgdm.ops`) and
holds the reference implementation (:func:`reference_step`) that the "torch" backend
runs and every fused kernel is tested against:

* ``kernels/esgdm_elements.py`` -- the rule in Triton, called per tile by the fused
  multi-tensor kernel of ``kernels/esgdm_step.py`` (``"triton"``)
* ``csrc/esgdm_update.h``    -- shared by the C++ CPU and CUDA kernels (``"cpu"``, ``"cuda"``)

Everything below lives on the parameters' device; the host decides only *which* work
runs (is this a D-step, which tensors have a gradient), never numbers.

Per-tensor state: ``scalars``, float64 ``[n_slots, 4]`` (:data:`SCALAR_COLUMNS`)
-------------------------------------------------------------------------------
``bias`` (``b1**k``), ``warm`` (``lr_warmup**j``), ``steps`` (steps this tensor took,
an integer held in float64) and ``dscale`` (the tensor's curvature scale, below).  A
call steps the tensors listed in ``index`` (int32 ``[n, 2]``: row ``i`` holds the
slot of tensor ``i`` in ``scalars`` and its group's row in ``hparams``) and advances
their rows in place.  ``hparams`` is float64 ``[n_groups, 6]`` (:data:`HPARAM_COLUMNS`).

Per tensor, in float64 (found_inf set: nothing at all changes, see below)::

    bias'  = bias * b1
    warm'  = warm * lr_warmup   on a D-step, else warm
    steps' = steps + 1
    alpha  = lr * (1 - warm')
    c      = 1 - bias' * b1
    step_scale = alpha / c            -> float32
    decay      = 1 - weight_decay * alpha   -> float32
    w          = 1 - b1               -> float32 (lerp weight)
    beta2, eps                        -> float32

Per element, in float32 (float64 for float64 parameters); ``S`` is ``grad_scale``
(1 when absent)::

    g = g_raw / S                      # the division, not a multiply by 1/S
    if g is not finite: the element is left alone (p, m, D unchanged)
    m = lerp(m, g, w)                  # torch.lerp's formula (see step_elements)
    if D-step:
        h  = h_raw / S
        h2 = h * h if h * h is finite else 0   # a non-finite observation is dropped
                                           # (h NaN, inf, or so large that h * h overflows)
        D  = nan_max(beta2 * D, h2)
    mhat  = lerp(m, g, w)
    denom = sqrt(D) + eps
    if not EXACT:
        denom = max(sqrt(D), DSCALE_FLOOR * dscale) + eps   # curvature far below the tensor's
        if D == 0:                                         # curvature never observed here
            denom = dscale + eps, or the step is 0 where dscale == 0
    p = p * decay - step_scale * (mhat / denom)
    store p: round to nearest, or stochastically (16-bit p with STOCHASTIC_ROUNDING)

``FLAG_EXACT`` computes section-2 ESGD-M bit for bit (``D == 0`` divides by ``eps``).
Without it, coordinates whose curvature was never observed (``D == 0``: e.g. weights
into ReLU units that were dead on every probe) are preconditioned by ``dscale``, the
mean of ``sqrt(D)`` over the tensor's observed coordinates as of its last D-step
(computed by the op after the kernel on D-steps; 0 until some curvature is seen, when
such coordinates do not move), and observed coordinates divide by at least
``DSCALE_FLOOR * dscale``: a unit that fired on one probe image has a ``sqrt(D)``
hundreds of times below its tensor's and would otherwise take steps that large once
it wakes up.  Coordinates at or above the floor divide by ``sqrt(D) + eps`` exactly
as in the original rule.  ``dscale`` scales like ``sqrt(D)``, so the rule stays
invariant to rescaling the loss and the parameters.  :data:`DSCALE_FLOOR` is a power
of two, so ``DSCALE_FLOOR * dscale`` is exact in every precision and every backend
computes the same floor: ``dfloor = DSCALE_FLOOR * dscale`` with ``dscale`` rounded to
the math dtype first.

``found_inf`` (float32 scalar tensor, nonzero = skip): nothing is written, counters
and per-tensor scalars included, exactly as if the step had not been called.

Stochastic rounding (``FLAG_STOCHASTIC_ROUNDING``, 16-bit parameters only): the
float32 result ``x`` is rounded to one of its two neighbours in the parameter dtype
with probabilities that make the expected value ``x``.  The random bits are a
counter-based hash, identical on every backend::

    key  = mix32(mix32(mix32(seed32) ^ slot32) ^ steps32')   # steps' = new step count
    r    = mix32(key ^ index32)                              # index: element index in the tensor
    bf16: bits(x) + (r >> 16), low 16 bits cleared            (x finite)
    fp16: ulp = 2**(max(exponent(x), -14) - 10);  q = x / ulp
          x' = (floor(q) + (u < q - floor(q))) * ulp,  u = (r >> 8) * 2**-24   (x finite)

with ``mix32`` the 32-bit integer hash :func:`mix32` and ``seed32`` the low 32 bits of
the op's ``seed``.  Non-finite ``x`` rounds to nearest.  (The optimizer hands the op
:func:`seed32` of its 64-bit seed, so every bit of that seed keys the rounding.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from esgdm.dtypes import math_dtype

#: Columns of the per-tensor scalar state.
SCALAR_COLUMNS = ("bias", "warm", "steps", "dscale")
BIAS, WARM, STEPS, DSCALE = range(len(SCALAR_COLUMNS))

#: Columns of the per-group hyper-parameter table.
HPARAM_COLUMNS = ("lr", "beta1", "beta2", "lr_warmup", "eps", "weight_decay")
LR, BETA1, BETA2, LR_WARMUP, EPS, WEIGHT_DECAY = range(len(HPARAM_COLUMNS))

#: The floor on ``sqrt(D)`` relative to the tensor's curvature scale ``dscale`` (the
#: default rule; ``exact=True`` has none).  A power of two, so that the floor is exact
#: in every precision.  Chosen by measurement: benchmarks/RESULTS.md, section 2c.
DSCALE_FLOOR = 2.0 ** -4

#: Bits of the op's ``flags`` argument.
FLAG_EXACT = 1
FLAG_STOCHASTIC_ROUNDING = 2

#: Constants of mix32 ("lowbias32", a well-mixing 32-bit integer hash).
MIX_M1 = 0x7FEB352D
MIX_M2 = 0x846CA68B
MASK32 = 0xFFFFFFFF


# ------------------------------------------------------------------ per tensor

def derive(scalars: Tensor, index: Tensor, hparams: Tensor, d_step: bool):
    """Per-tensor quantities of one step (float64, on the device; nothing written).

    Returns ``(new_rows, coeffs)``: ``new_rows`` float64 ``[n, 4]`` are the advanced
    rows of ``scalars`` for the tensors of ``index``; ``coeffs`` is a dict of float64
    ``[n]`` tensors ``w, beta2, eps, step_scale, decay, dscale, steps``.
    """
    slot, group = index[:, 0].long(), index[:, 1].long()
    rows = scalars[slot]
    hp = hparams[group]
    b1 = hp[:, BETA1]
    bias = rows[:, BIAS] * b1
    warm = rows[:, WARM] * hp[:, LR_WARMUP] if d_step else rows[:, WARM]
    steps = rows[:, STEPS] + 1
    alpha = hp[:, LR] * (1 - warm)
    c = 1 - bias * b1
    new_rows = torch.stack([bias, warm, steps, rows[:, DSCALE]], dim=1)
    coeffs = dict(w=1 - b1, beta2=hp[:, BETA2], eps=hp[:, EPS], step_scale=alpha / c,
                  decay=1 - hp[:, WEIGHT_DECAY] * alpha, dscale=rows[:, DSCALE], steps=steps,
                  slot=slot)
    return new_rows, coeffs


# ------------------------------------------------------------------ per element

def _bits(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of a float dtype's width (float32 -> int32, float64 -> int64)."""
    return torch.int64 if dtype == torch.float64 else torch.int32


def floor_terms(dscale: Tensor, floor: float = DSCALE_FLOOR) -> tuple[Tensor, Tensor, Tensor]:
    """The per-tensor constants of the default rule, from ``dscale`` (0-d or one entry
    per tensor, in the math dtype), as :func:`step_elements` uses them:

    * ``dfloor``: the bits (an integer tensor) of ``floor * dscale`` (exact: ``floor``
      is a power of two), the floor on ``sqrt(D)``;
    * ``flip``: ``dfloor``'s bits XOR ``dscale``'s: XORed into ``dfloor`` where
      ``D == 0``, it makes the floor ``dscale`` there (``sqrt(0)`` then gives way to it);
    * ``unobserved``: the value of ``D`` whose step is 0: 0 where ``dscale`` is not
      positive, NaN elsewhere (no ``D`` equals it).
    """
    bits = _bits(dscale.dtype)
    dfloor = (dscale * floor).view(bits)
    flip = dfloor ^ dscale.view(bits)
    unobserved = torch.where(dscale > 0, torch.full_like(dscale, float("nan")), torch.zeros_like(dscale))
    return dfloor, flip, unobserved


def grad_divisor(grad_scale: Tensor | None, found_inf: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """What ``g`` (and ``h``) are divided by, a 0-d tensor in the math dtype (``None``:
    no division): ``grad_scale`` (1 when absent), NaN when ``found_inf`` is set, which
    makes every ``g`` non-finite, so that :func:`step_elements` leaves every element
    alone: what skipping the step means, decided on the device."""
    if found_inf is None:
        return None if grad_scale is None else grad_scale.reshape(()).to(dtype)
    scale = (torch.ones((), dtype=dtype, device=found_inf.device) if grad_scale is None
             else grad_scale.reshape(()).to(dtype))
    return torch.where(found_inf.reshape(()) != 0, torch.full_like(scale, float("nan")), scale)


def step_elements(p: Tensor, g: Tensor, m: Tensor, d: Tensor, h: Tensor | None, *,
                  w, beta2, eps, step_scale, decay, dscale, exact: bool,
                  divisor: Tensor | None = None, floor: float = DSCALE_FLOOR,
                  terms: tuple[Tensor, Tensor, Tensor] | None = None,
                  math: torch.dtype | None = None, out_p: Tensor | None = None,
                  out_m: Tensor | None = None, out_d: Tensor | None = None,
                  scratch: Callable[[str, torch.dtype], Tensor] | None = None,
                  finish: Callable[..., Tensor] | None = None) -> Tensor:
    """The element-wise rule, written once: :func:`update_elements` (the reference) and
    the "torch" backend both run it.

    ``p``, ``g``, ``h`` and ``m``, ``d`` are the tensors as stored (any of the dtypes
    of the op, same shape and strides); the math runs in ``math`` (default float32,
    float64 for float64 ``p``).  Each arithmetic operation rounds once, in the order
    of the module docstring, so the results do not depend on how the work is cut up.
    Writes the new ``m`` into ``out_m`` and, on a D-step, the new ``D`` into
    ``out_d`` (either may be ``m``/``d`` themselves); the new ``p`` goes into ``out_p``
    (it may be ``p``), or stays in the math dtype when ``out_p`` is None (for
    stochastic rounding).  Returns the new ``p``.

    The scalars are Python floats or 0-d tensors, already rounded to the math dtype;
    ``divisor`` is what ``g`` and ``h`` are divided by (:func:`grad_divisor`);
    ``terms``: :func:`floor_terms` of ``dscale`` and ``floor``, when the caller has them.
    ``scratch(name, dtype)`` gives a buffer shaped like ``p`` (each name one buffer;
    asking twice for a name may give the same memory): a caller stepping many pieces
    hands out the same few buffers every time; by default each is new.

    Two stages: this function computes the new ``m``, ``D``, ``mhat`` and ``sqrt(D)``
    with torch's own ``lerp`` and ``sqrt`` kernels and hands them to ``finish`` (default
    :func:`finish_elements`: everything else, which the backend may run as one compiled
    kernel).  ``torch.lerp(a, b, w)`` is ``a + w*(b - a)`` for ``|w| < 0.5``, else
    ``b - (1 - w)*(b - a)``, with a fused multiply-add on a CPU, and torch's CPU
    ``sqrt`` need not round correctly: a compiled kernel computes neither to the bit,
    the fused backends reproduce them.
    """
    if math is None:
        math = torch.float64 if p.dtype == torch.float64 else torch.float32
    if scratch is None:
        def scratch(name: str, dtype: torch.dtype) -> Tensor:
            return torch.empty_like(p, dtype=dtype)

    def as_math(x: Tensor, name: str) -> Tensor:
        if x.dtype == math:
            return x
        buf = scratch(name, math)
        buf.copy_(x)
        return buf

    G = as_math(g, "g")
    if divisor is not None:
        G = torch.div(G, divisor, out=scratch("g", math))
    M = as_math(m, "m")
    m_new = torch.lerp(M, G, w, out=scratch("m_new", math))
    D = as_math(d, "d")
    d_new = D
    if h is not None:
        H = as_math(h, "h")
        if divisor is not None:
            H = torch.div(H, divisor, out=scratch("h", math))
        # NaN or inf where h is, and where a finite h's square overflows: then dropped
        h2 = torch.mul(H, H, out=scratch("h", math))
        torch.nan_to_num(h2, 0.0, 0.0, 0.0, out=h2)
        d_new = torch.mul(D, beta2, out=scratch("d_new", math))
        torch.maximum(d_new, h2, out=d_new)
    mhat = torch.lerp(m_new, G, w, out=scratch("a", math))
    root = torch.sqrt(d_new, out=scratch("b", math))
    if not exact and terms is None:
        terms = floor_terms(torch.as_tensor(dscale, dtype=math, device=root.device), floor)
    return (finish or finish_elements)(
        as_math(p, "p"), G, M, D, m_new, d_new if h is not None else None, mhat, root,
        eps=eps, step_scale=step_scale, decay=decay, terms=None if exact else terms,
        out_p=out_p, out_m=out_m, out_d=out_d, scratch=scratch)


def finish_elements(p: Tensor, g: Tensor, m: Tensor, d: Tensor, m_new: Tensor, d_new: Tensor | None,
                    mhat: Tensor, root: Tensor, *, eps, step_scale, decay,
                    terms: tuple[Tensor, Tensor, Tensor] | None, out_p: Tensor | None,
                    out_m: Tensor | None, out_d: Tensor | None,
                    scratch: Callable[[str, torch.dtype], Tensor]) -> Tensor:
    """The second stage of :func:`step_elements`: from the math-dtype ``p``, ``g``
    (divided), ``m``, ``d`` and the new ``m``, ``D`` (None on a plain step), ``mhat``
    and ``sqrt(D)``, the denominator (floored and, where ``D == 0``, ``dscale``:
    ``terms`` from :func:`floor_terms`, None in the exact rule), the new ``p``, and
    the stores.  It writes only into ``scratch`` buffers and the outputs, never into
    its inputs (the buffers of the first stage are reused through ``scratch`` under
    their own names), so that it can also run compiled, as one kernel.

    The choices between values (an element whose ``g`` is not finite keeps its old
    ``p``, ``m``, ``D``; where ``D == 0`` the floor is ``dscale``, or the step 0) are
    made on the values' bits, with 0/1 integer masks: ``old ^ ((new ^ old) * mask)``
    is ``new`` where the mask is 1 and ``old`` where it is 0, NaNs and signed zeros
    included, in a few cheap integer operations (a CPU compares into bytes and selects
    on them several times slower).  Every value computed from a non-finite ``g`` is
    discarded by those selects, so nothing needs to zero it first.
    """
    math = p.dtype
    bits = _bits(math)
    d_now = d if d_new is None else d_new
    ok = torch.lt(torch.abs(g, out=scratch("c", math)), float("inf"), out=scratch("ok", bits))  # 1: finite
    keep = None
    if terms is not None:  # observed curvature far below the tensor's scale: floored
        dfloor, flip, unobserved = terms
        # the floor: dfloor, or dscale where D == 0 (curvature never observed here),
        # which then divides by dscale + eps (sqrt(0) = 0 is below it)
        lower = torch.eq(d_now, 0, out=scratch("lower", bits))
        torch.mul(lower, flip, out=lower)
        torch.bitwise_xor(lower, dfloor, out=lower)
        root = torch.maximum(root, lower.view(math), out=scratch("b", math))  # exact: a power of two
        keep = torch.ne(d_now, unobserved, out=lower)  # 0: D == 0 and dscale not positive
    denom = torch.add(root, eps, out=scratch("b", math))
    q = torch.div(mhat, denom, out=scratch("a", math))
    if keep is not None:  # ... no step at all there
        q_bits = q.view(bits)
        torch.mul(q_bits, keep, out=q_bits)
    step = torch.mul(step_scale, q, out=q)
    p_new = torch.mul(p, decay, out=denom)
    torch.sub(p_new, step, out=p_new)
    if out_m is not None:
        _store(ok, m_new, m, out_m, scratch("m_new", math))
    if d_new is not None and out_d is not None:
        _store(ok, d_new, d, out_d, scratch("d_new", math))
    return _store(ok, p_new, p, out_p, p_new)


def _store(ok: Tensor, new: Tensor, old: Tensor, out: Tensor | None, work: Tensor) -> Tensor:
    """``out = new where ok == 1, else old``, selected on the bits and rounded to
    ``out``'s dtype; ``work``: a buffer to compute in (it may be ``new``'s own); ``out``
    None: the result stays in ``work``, which is returned."""
    nb, ob, wb = new.view(ok.dtype), old.view(ok.dtype), work.view(ok.dtype)
    torch.bitwise_xor(nb, ob, out=wb)
    torch.mul(wb, ok, out=wb)
    if out is None or out.dtype != new.dtype:
        torch.bitwise_xor(ob, wb, out=wb)
        if out is None:
            return work
        out.copy_(work)
        return out
    torch.bitwise_xor(ob, wb, out=out.view(ok.dtype))
    return out


def update_elements(p: Tensor, g: Tensor, m: Tensor, d: Tensor, h: Tensor | None, *,
                    w, beta2, eps, step_scale, decay, dscale, exact: bool,
                    grad_scale: Tensor | None = None, floor: float = DSCALE_FLOOR):
    """The element-wise rule on float32 (or float64) tensors; returns ``(p, m, d)`` new
    (:func:`step_elements` into new tensors).

    The scalars are Python floats or 0-d tensors, already rounded to the math dtype.
    ``floor``: :data:`DSCALE_FLOOR` (a parameter only so that benchmarks can study
    other values with the "torch" backend; the fused kernels have it built in).
    """
    math = p.dtype
    m_new, d_new = torch.empty_like(m, dtype=math), torch.empty_like(d, dtype=math)
    p_new = step_elements(p, g, m, d, h, w=w, beta2=beta2, eps=eps, step_scale=step_scale,
                          decay=decay, dscale=dscale, exact=exact,
                          divisor=None if grad_scale is None else grad_scale.reshape(()).to(math),
                          floor=floor, math=math, out_p=torch.empty_like(p), out_m=m_new,
                          out_d=d_new)
    return p_new, m_new, (d_new if h is not None else d.to(math, copy=True))


# ------------------------------------------------------------- random rounding

def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & MASK32


def mix32(x: Tensor) -> Tensor:
    """The 32-bit integer hash every backend uses for stochastic rounding, on int64
    tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_M1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_M2)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """:func:`mix32` of one Python int."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_M1) & MASK32
    x ^= x >> 15
    x = (x * MIX_M2) & MASK32
    return x ^ (x >> 16)


def seed32(seed: int) -> int:
    """A seed of up to 64 bits folded to the 32 bits the hashes are keyed with: the low
    word XOR :func:`mix32` of the high word.  A seed below ``2**32`` is its own fold
    (``mix32(0) == 0``), and for a given low word every high word gives another key."""
    return (seed ^ mix32_int(seed >> 32)) & MASK32


def random_bits(seed: int, slot, steps, numel: int, device=None, start: int = 0) -> Tensor:
    """int64 tensor of the 32-bit random numbers ``r`` of one tensor's elements.

    ``slot`` and ``steps`` (the tensor's new step count) are ints or 0-d tensors on the
    device (then nothing is read back to the host).  ``start``: the first element's
    index, for a piece of a tensor."""
    key: Tensor | int
    if isinstance(slot, Tensor) or isinstance(steps, Tensor):
        slot_t = torch.as_tensor(slot, device=device).long() & MASK32
        steps_t = torch.as_tensor(steps, device=device).long() & MASK32
        key = mix32(mix32(mix32_int(seed) ^ slot_t) ^ steps_t)
    else:
        key = mix32_int(mix32_int(mix32_int(seed) ^ (slot & MASK32)) ^ (steps & MASK32))
    idx = torch.arange(start, start + numel, dtype=torch.int64, device=device) & MASK32
    return mix32(idx ^ key)


def stochastic_round(x: Tensor, dtype: torch.dtype, r: Tensor) -> Tensor:
    """Rounds float32 ``x`` to ``dtype`` (bf16 or fp16) with random bits ``r`` (int64)."""
    x = x.float()
    finite = torch.isfinite(x)
    if dtype == torch.bfloat16:
        bits = x.view(torch.int32).long() & MASK32
        bits = ((bits + (r >> 16)) & 0xFFFF0000) & MASK32
        bits = torch.where(bits >= 2**31, bits - 2**32, bits).int()
        y = bits.view(torch.float32)
    elif dtype == torch.float16:
        expo = (x.view(torch.int32).long() >> 23) & 0xFF
        e = torch.clamp(expo - 127, min=-14)
        ulp = torch.pow(2.0, (e - 10).float())
        q = x / ulp
        f = torch.floor(q)
        u = (r >> 8).float() * 2.0**-24
        y = (f + (u < q - f).float()) * ulp
    else:
        raise ValueError(f"stochastic rounding is for bfloat16 and float16, not {dtype}")
    return torch.where(finite, y, x).to(dtype)


# ------------------------------------------------------------------ reference

def reference_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                   exp_avg_ds: Sequence[Tensor], hvps: Sequence[Tensor] | None,
                   scalars: Tensor, index: Tensor, hparams: Tensor,
                   grad_scale: Tensor | None, found_inf: Tensor | None,
                   flags: int, seed: int) -> None:
    """The whole op, one tensor at a time in torch ops: the readable reference.

    Reads host values of the scalars (``.tolist()``): for tests, not for speed.
    """
    n = len(params)
    if n == 0 or (found_inf is not None and float(found_inf) != 0):
        return
    new_rows, co = derive(scalars, index, hparams, hvps is not None)
    exact = bool(flags & FLAG_EXACT)
    sr = bool(flags & FLAG_STOCHASTIC_ROUNDING)
    for i in range(n):
        p = params[i]
        math = math_dtype(p.dtype)

        def f(name, i=i, math=math):  # a per-tensor scalar rounded to the math dtype, as a float
            return torch.tensor(co[name][i].item(), dtype=torch.float64).to(math).item()

        gs = None if grad_scale is None else grad_scale.to(math)
        pn, mn, dn = update_elements(
            p.to(math), grads[i].to(math), exp_avgs[i].to(math), exp_avg_ds[i].to(math),
            None if hvps is None else hvps[i].to(math),
            w=f("w"), beta2=f("beta2"), eps=f("eps"), step_scale=f("step_scale"), decay=f("decay"),
            dscale=f("dscale"), exact=exact, grad_scale=gs)
        if sr and p.dtype in (torch.bfloat16, torch.float16):
            r = random_bits(seed, int(co["slot"][i]), int(co["steps"][i]), p.numel(), p.device)
            # element index = offset in the tensor's memory (dense tensors): walk pn in
            # p's memory order, round, and put each value back where it came from
            laid_out = torch.empty_like(p, dtype=pn.dtype).copy_(pn)
            flat = laid_out.as_strided((p.numel(),), (1,), laid_out.storage_offset())
            rounded = stochastic_round(flat, p.dtype, r)
            p.copy_(_from_memory_order(rounded, p))
        else:
            p.copy_(pn)
        exp_avgs[i].copy_(mn)
        if hvps is not None:
            exp_avg_ds[i].copy_(dn)
    scalars[co["slot"]] = new_rows
    if hvps is not None and not exact:
        update_dscale(scalars, co["slot"], exp_avg_ds)


def _from_memory_order(flat: Tensor, like: Tensor) -> Tensor:
    """Inverse of walking ``like``'s memory: element ``k`` of ``flat`` goes to the
    element stored at offset ``k`` (``like`` dense; contiguous is the identity)."""
    if like.is_contiguous():
        return flat.view(like.shape)
    out = torch.empty_like(like)
    out.as_strided((like.numel(),), (1,)).copy_(flat)
    return out


def curvature_scale(exp_avg_ds: Sequence[Tensor]) -> Tensor:
    """float64 ``[n]``: mean of ``sqrt(D)`` over each tensor's coordinates with ``D > 0``
    (0 where there are none), from two foreach reductions and no host read."""
    if not exp_avg_ds:
        return torch.zeros(0, dtype=torch.float64)
    ds = list(exp_avg_ds)
    root_sum = torch.stack(torch._foreach_norm(ds, 0.5)).double()  # (sum sqrt D)^2
    count = torch.stack(torch._foreach_norm(ds, 0)).double()       # #(D != 0)
    return torch.where(count > 0, root_sum.sqrt() / count.clamp(min=1), torch.zeros_like(count))


def update_dscale(scalars: Tensor, slot: Tensor, exp_avg_ds: Sequence[Tensor],
                  found_inf: Tensor | None = None) -> None:
    """Writes each stepped tensor's :func:`curvature_scale` into ``scalars[:, DSCALE]``."""
    new = curvature_scale(exp_avg_ds).to(scalars.device)
    if found_inf is not None:
        new = torch.where(found_inf.to(scalars.device) != 0, scalars[slot, DSCALE], new)
    scalars[slot, DSCALE] = new


__all__ = [
    "BETA1", "BETA2", "BIAS", "DSCALE", "DSCALE_FLOOR", "EPS", "FLAG_EXACT", "FLAG_STOCHASTIC_ROUNDING",
    "HPARAM_COLUMNS", "LR", "LR_WARMUP", "SCALAR_COLUMNS", "STEPS", "WARM", "WEIGHT_DECAY",
    "curvature_scale", "derive", "finish_elements", "floor_terms", "grad_divisor", "mix32", "mix32_int",
    "random_bits", "reference_step", "seed32", "step_elements", "stochastic_round", "update_dscale",
    "update_elements",
]
