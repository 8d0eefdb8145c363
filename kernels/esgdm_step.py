"""The fused ESGD-M step (:mod:`esgdm.rule`) as one multi-tensor Triton kernel per bucket.

One launch steps every tensor of a bucket and advances their per-tensor scalars; the
host decides only which work runs (plain step or D-step, the flags), never numbers,
and reads nothing back from the device.

Programs
--------
Program ``pid`` steps ``BLOCK`` consecutive elements of one tensor.  Which tensor and
which block of it comes from a *block table* (``int32 [n_programs, 2]``: tensor index,
block index in the tensor) that depends only on the tensors' sizes and is built once per
layout.  A tensor of ``numel`` elements has ``max(1, ceil(numel / BLOCK))`` programs:
an empty tensor gets one, so its scalars advance like everybody else's.  ``BLOCK`` is
chosen per bucket layout (:func:`choose_config`): the dtype's :data:`CONFIGS`, or the
smaller :data:`SMALL_CONFIG` for buckets of many small tensors, where a large block would
run mostly masked lanes.

Where the tensors are comes from an *address table*, ``int64 [n_tensors, ROW]``::

    column 0..4   addresses of p, g, h, m, D   (h = g's address on a plain step: never read)
    column 5      numel
    column 6      address of the tensor's qscale table (8-bit state; 0 otherwise)

cached on the device per bucket and refreshed (one small host-to-device copy from pinned
memory) only when one of the addresses or sizes changed -- gradients' addresses usually
repeat from step to step because the caching allocator hands the same blocks back.  So
in steady state a step uploads nothing and the launch can be captured in a CUDA graph.

Per tensor (each program, in float64): the tensor's slot and group come from ``index``,
its old ``bias, warm, steps, dscale`` from its row of ``scalars``, the hyper-parameters
from its group's row of ``hparams``; the coefficients of :func:`esgdm.rule.derive` are
computed in float64 and rounded to float32 once.

Per element (float32): :func:`_update` (``kernels/esgdm_elements.py``, with the other
per-element helpers) is the element-wise rule of :mod:`esgdm.rule`
(``grad_scale`` division, NaN policy, ``FLAG_EXACT`` or the ``dscale`` rule where
``D == 0``), then ``p`` is stored rounded to nearest or, for 16-bit parameters with
``FLAG_STOCHASTIC_ROUNDING``, stochastically with the counter hash of the rule
(:func:`_mix32`, uint32 arithmetic).  ``m`` and ``D`` are float32 or bfloat16 in memory,
float32 in registers, stored rounded to nearest.

``found_inf`` is read on the device: nonzero, and every program returns before writing
anything (elements, scalars, tickets).

8-bit state
-----------
With uint8 ``m``/``D`` (:mod:`esgdm.quant`: codes per element, a float32 ``[n_blocks, 2]``
scale table per tensor, blocks of 256 consecutive elements) the kernel is instantiated
with ``QUANT``: a program's ``BLOCK`` elements are ``BLOCK // 256`` whole quantization
blocks (every ``BLOCK`` is a multiple of 256 and programs start at multiples of
``BLOCK``), addressed as a ``[BLOCK // 256, 256]`` tile.  :func:`_step_block8` decodes
the tile's m and D with their blocks' scales, runs :func:`_update` unchanged, takes each
block's new max ``|m|`` (and max ``sqrt(D)`` on a D-step) with ``tl.max(axis=1)``, then
encodes and stores the codes and the scales in the same pass.  A plain step only reads
the D codes and scales.

Advancing the scalars without a race
------------------------------------
Every program of a tensor must read the *old* ``bias, warm, steps``; the new ones are
written, in the same launch, by the last program of the tensor to finish.  Each program,
after its element work, takes a ticket: ``tl.atomic_add(tickets + t, 1, sem="acq_rel")``
on a per-tensor int32 counter (zero between launches; one buffer per cached bucket).
The program that draws ``n_programs(t) - 1`` knows every other program of ``t`` has
read the scalars (their loads are ordered before their release); it reads the old row
again (so nothing float64 stays live in registers through the element work), writes the
new ``bias, warm, steps`` and resets the counter to zero for the next launch.  A barrier
before the atomic makes sure all warps of the program have done their loads.  With
``found_inf`` set no program takes a ticket, so the counters stay at zero.

Memory access
-------------
A block whose five addresses are 16-byte aligned and that is full (not the tail of its
tensor) takes the *fast path*: the compiler is told about the alignment and the mask is
dropped, so fp32 loads and stores become 128-bit (``ld.global.v4``).  Everything else
(tails, unaligned views, empty tensors) takes the masked path, correct for any address.
A block's start inside its tensor is a 64-bit scalar added to the base address once per
program; per-element offsets are 32-bit (``< BLOCK``), so tensors of more than 2**31
elements work without 64-bit vector arithmetic.

``TRITON_INTERPRET=1`` must be set before this module is imported for the kernel to
run on CPU tensors (the Triton interpreter); :data:`INTERPRET` records which mode the
kernel was built in.  The interpreter converts float32 to bfloat16 by truncation, so in
that mode the kernel rounds bfloat16 stores to nearest itself (bit arithmetic, the same
result a GPU's conversion gives).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch
import triton
import triton.language as tl

try:
    from . import esgdm_elements as _elements
except ImportError:  # loaded as a top-level module (kernels/ itself on sys.path)
    import esgdm_elements as _elements  # type: ignore[no-redef]

# The per-element rule's constants and functions, which are this module's too (the kernel
# below calls them; the tests and ptx_report read the constants here).
_DSCALE_FLOOR = _elements._DSCALE_FLOOR
_QB = _elements._QB
DSCALE_FLOOR = _elements.DSCALE_FLOOR
FLAG_EXACT = _elements.FLAG_EXACT
FLAG_STOCHASTIC_ROUNDING = _elements.FLAG_STOCHASTIC_ROUNDING
PRECISE = _elements.PRECISE
QUANT_BLOCK = _elements.QUANT_BLOCK
QUANT_D_LEVELS = _elements.QUANT_D_LEVELS
QUANT_D_SCALE = _elements.QUANT_D_SCALE
QUANT_HUGE = _elements.QUANT_HUGE
QUANT_INV_D_LEVELS = _elements.QUANT_INV_D_LEVELS
QUANT_INV_M_LEVELS = _elements.QUANT_INV_M_LEVELS
QUANT_M_LEVELS = _elements.QUANT_M_LEVELS
QUANT_M_SCALE = _elements.QUANT_M_SCALE
QUANT_M_ZERO = _elements.QUANT_M_ZERO
QUANT_PRESCALE = _elements.QUANT_PRESCALE
QUANT_TINY = _elements.QUANT_TINY
ROUND_NEAREST = _elements.ROUND_NEAREST
ROUND_STOCHASTIC_BF16 = _elements.ROUND_STOCHASTIC_BF16
ROUND_STOCHASTIC_FP16 = _elements.ROUND_STOCHASTIC_FP16
_mix32 = _elements._mix32
_step_block = _elements._step_block
_step_block8 = _elements._step_block8
_update = _elements._update

#: int64 columns of one row of the address table.
ROW = 7
P_COL, G_COL, H_COL, M_COL, D_COL, NUMEL_COL, QS_COL = range(ROW)

#: Parameter dtypes the kernel steps, and the state dtypes it supports for them
#: (uint8: 8-bit codes with per-block scales, esgdm.quant).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)


#: Columns of ``scalars`` and ``hparams``, in the order of esgdm.rule.SCALAR_COLUMNS and
#: HPARAM_COLUMNS (tests/test_one_definition.py checks that the copies agree).
BIAS, WARM, STEPS, DSCALE = range(4)
LR, BETA1, BETA2, LR_WARMUP, EPS, WEIGHT_DECAY = range(6)
N_SCALAR_COLUMNS = 4
N_HPARAM_COLUMNS = 6
# The kernels' copies (a global read inside a kernel must be a constexpr).
_BIAS, _WARM, _STEPS, _DSCALE = (tl.constexpr(c) for c in (BIAS, WARM, STEPS, DSCALE))
_LR, _BETA1, _BETA2, _LR_WARMUP, _EPS, _WEIGHT_DECAY = (
    tl.constexpr(c) for c in (LR, BETA1, BETA2, LR_WARMUP, EPS, WEIGHT_DECAY))

#: Launch configuration per parameter dtype: elements per program and warps.
#: 4 warps with 4 (fp32) or 8 (16-bit) elements per thread and array: one 128-bit
#: vector of each parameter-dtype array.  Measured on an H200 (Triton 3.6, CUDA graph
#: replay, fp32 D-step): 4096 tensors of 256 elements 17 us with 512/4 against 32 us
#: with 1024/4 and 83 us with the former 2048/8; 64 tensors of 2**18 elements 146 us
#: (3.7 TB/s) against 150 and 171 us.  For bf16 parameters with bf16 state 1024/4 kept
#: 128-bit accesses and was best on plain steps (73 us against 92 with 512/4).
#: benchmarks/ptx_report.py gives registers and spills of every variant.
CONFIGS = {
    torch.float32: dict(BLOCK=512, num_warps=4),
    torch.bfloat16: dict(BLOCK=1024, num_warps=4),
    torch.float16: dict(BLOCK=1024, num_warps=4),
}

#: For buckets of small tensors: masked lanes cost about as much as real ones (the
#: whole program runs), so programs of 256 elements on 2 warps, which waste fewer
#: lanes on tensors of a few hundred elements: 4096 tensors of 256 elements took 9-11
#: us against 17 (fp32, 512/4) and 26-38 us (bf16, 1024/4) on an H200.  On large
#: tensors they were 10-35 % slower than CONFIGS.  :func:`choose_config` picks one of
#: the two per bucket layout, once.
SMALL_CONFIG = dict(BLOCK=256, num_warps=2)

#: SMALL_CONFIG is chosen when CONFIGS would run this many times more lanes.
SMALL_CONFIG_GAIN = 1.25

@triton.jit
def _program(pid, blocks_ptr, table_ptr, index_ptr, scalars_ptr, hparams_ptr, grad_scale_ptr,
             tickets_ptr, p_ref, s_ref, seed,
             ROW_: tl.constexpr, NS: tl.constexpr, NH: tl.constexpr, BLOCK: tl.constexpr,
             D_STEP: tl.constexpr, EXACT: tl.constexpr, HAS_GS: tl.constexpr,
             ROUNDING: tl.constexpr, HINTS: tl.constexpr, EMULATE_BF16: tl.constexpr,
             PRECISE_MATH: tl.constexpr, QUANT: tl.constexpr):
    """One program's work once ``found_inf`` said go (see the module docstring)."""
    t = tl.load(blocks_ptr + 2 * pid)
    chunk = tl.load(blocks_ptr + 2 * pid + 1)
    row = table_ptr + t * ROW_
    p_addr = tl.load(row + 0)
    g_addr = tl.load(row + 1)
    h_addr = tl.load(row + 2)
    m_addr = tl.load(row + 3)
    d_addr = tl.load(row + 4)
    numel = tl.load(row + 5)
    qs_addr = tl.load(row + 6)  # 0 unless QUANT

    # ---- per tensor, float64: the coefficients of esgdm.rule.derive, rounded to float32
    slot = tl.load(index_ptr + 2 * t)
    group = tl.load(index_ptr + 2 * t + 1)
    srow = scalars_ptr + slot.to(tl.int64) * NS
    hrow = hparams_ptr + group.to(tl.int64) * NH
    beta1 = tl.load(hrow + _BETA1)
    bias_new = tl.load(srow + _BIAS) * beta1
    warm_new = tl.load(srow + _WARM)
    if D_STEP:
        warm_new = warm_new * tl.load(hrow + _LR_WARMUP)  # only D-steps advance the warmup
    alpha = tl.load(hrow + _LR) * (1.0 - warm_new)
    c = 1.0 - bias_new * beta1
    step_scale = (alpha / c).to(tl.float32)
    decay = (1.0 - tl.load(hrow + _WEIGHT_DECAY) * alpha).to(tl.float32)
    w = (1.0 - beta1).to(tl.float32)
    beta2 = tl.load(hrow + _BETA2).to(tl.float32)
    eps = tl.load(hrow + _EPS).to(tl.float32)
    dscale = tl.load(srow + _DSCALE).to(tl.float32)
    # dscale + eps as the reference divides by it: the float32 values added in float64
    dscale_eps = (dscale.to(tl.float64) + eps.to(tl.float64)).to(tl.float32)
    dfloor = dscale * _DSCALE_FLOOR  # exact: a power of two
    S = w  # unused without grad_scale
    if HAS_GS:
        S = tl.load(grad_scale_ptr).to(tl.float32)
    key = slot.to(tl.uint32, bitcast=True)  # unused when rounding to nearest
    if ROUNDING != 0:
        steps32 = ((tl.load(srow + _STEPS) + 1.0).to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
        key = _mix32(_mix32(_mix32(seed.to(tl.uint32, bitcast=True)) ^ key) ^ steps32)
    n_programs = tl.maximum((numel + (BLOCK - 1)) // BLOCK, 1).to(tl.int32)

    # ---- per element
    start = chunk.to(tl.int64) * BLOCK  # 64-bit: tensors may exceed 2**31 elements
    remaining = numel - start
    idx0 = (start & 0xFFFFFFFF).to(tl.uint32)
    p_type = p_ref.dtype
    s_type = s_ref.dtype
    if D_STEP:
        misaligned = (p_addr | g_addr | h_addr | m_addr | d_addr) & 15
    else:
        misaligned = (p_addr | g_addr | m_addr | d_addr) & 15
    fast = (misaligned == 0) & (remaining >= BLOCK) & HINTS
    if fast:
        # Full block, 16-byte aligned.  The pointers are made here (not shared with the
        # other path) so the alignment hints apply to this path only.
        offs = tl.arange(0, BLOCK)
        p_ptr = tl.multiple_of(p_addr.to(p_type), 16) + start
        g_ptr = tl.multiple_of(g_addr.to(p_type), 16) + start
        h_ptr = tl.multiple_of(h_addr.to(p_type), 16) + start
        m_ptr = tl.multiple_of(m_addr.to(s_type), 16) + start
        d_ptr = tl.multiple_of(d_addr.to(s_type), 16) + start
        if QUANT:
            rows = tl.arange(0, BLOCK // _QB)
            offs2 = rows[:, None] * _QB + tl.arange(0, _QB)[None, :]
            qs_ptr = qs_addr.to(tl.pointer_type(tl.float32)) + (start // _QB + rows) * 2
            _step_block8(p_ptr + offs2, g_ptr + offs2, h_ptr + offs2, m_ptr + offs2, d_ptr + offs2,
                         qs_ptr, None, None, idx0 + offs2.to(tl.uint32), key, S, w, beta2, eps,
                         step_scale, decay, dscale, dscale_eps, dfloor, D_STEP, EXACT, HAS_GS,
                         ROUNDING, EMULATE_BF16, PRECISE_MATH)
        else:
            _step_block(p_ptr + offs, g_ptr + offs, h_ptr + offs, m_ptr + offs, d_ptr + offs, None,
                        idx0 + offs.to(tl.uint32), key, S, w, beta2, eps, step_scale, decay, dscale,
                        dscale_eps, dfloor, D_STEP, EXACT, HAS_GS, ROUNDING, EMULATE_BF16,
                        PRECISE_MATH)
    elif remaining > 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < tl.minimum(remaining, BLOCK).to(tl.int32)
        p_ptr = p_addr.to(p_type) + start
        g_ptr = g_addr.to(p_type) + start
        h_ptr = h_addr.to(p_type) + start
        m_ptr = m_addr.to(s_type) + start
        d_ptr = d_addr.to(s_type) + start
        if QUANT:
            rows = tl.arange(0, BLOCK // _QB)
            offs2 = rows[:, None] * _QB + tl.arange(0, _QB)[None, :]
            n_left = tl.minimum(remaining, BLOCK).to(tl.int32)
            qs_ptr = qs_addr.to(tl.pointer_type(tl.float32)) + (start // _QB + rows) * 2
            _step_block8(p_ptr + offs2, g_ptr + offs2, h_ptr + offs2, m_ptr + offs2, d_ptr + offs2,
                         qs_ptr, offs2 < n_left, rows * _QB < n_left, idx0 + offs2.to(tl.uint32),
                         key, S, w, beta2, eps, step_scale, decay, dscale, dscale_eps, dfloor,
                         D_STEP, EXACT, HAS_GS, ROUNDING, EMULATE_BF16, PRECISE_MATH)
        else:
            _step_block(p_ptr + offs, g_ptr + offs, h_ptr + offs, m_ptr + offs, d_ptr + offs, mask,
                        idx0 + offs.to(tl.uint32), key, S, w, beta2, eps, step_scale, decay, dscale,
                        dscale_eps, dfloor, D_STEP, EXACT, HAS_GS, ROUNDING, EMULATE_BF16,
                        PRECISE_MATH)

    # ---- the last program of the tensor advances its scalars
    tl.debug_barrier()  # every warp of this program has read the old scalars
    ticket = tl.atomic_add(tickets_ptr + t, 1, sem="acq_rel")
    if ticket == n_programs - 1:
        # Every other program of the tensor is done with the old row, nobody else writes
        # it: read it again (nothing float64 stays live through the element work).
        slot = tl.load(index_ptr + 2 * t)
        group = tl.load(index_ptr + 2 * t + 1)
        srow = scalars_ptr + slot.to(tl.int64) * NS
        hrow = hparams_ptr + group.to(tl.int64) * NH
        tl.store(srow + _BIAS, tl.load(srow + _BIAS) * tl.load(hrow + _BETA1))
        if D_STEP:
            tl.store(srow + _WARM, tl.load(srow + _WARM) * tl.load(hrow + _LR_WARMUP))
        tl.store(srow + _STEPS, tl.load(srow + _STEPS) + 1.0)
        tl.store(tickets_ptr + t, 0)  # ready for the next launch


@triton.jit(do_not_specialize=["p_ref", "s_ref", "seed"])
def esgdm_step_kernel(
    blocks_ptr,      # int32 [n_programs, 2]: (tensor index, block index within the tensor)
    table_ptr,       # int64 [n_tensors, ROW]: addresses and numel (module docstring)
    index_ptr,       # int32 [n_tensors, 2]: slot in scalars, row in hparams
    scalars_ptr,     # float64 [n_slots, 4]: bias, warm, steps, dscale (advanced in place)
    hparams_ptr,     # float64 [n_groups, 6]: lr, beta1, beta2, lr_warmup, eps, weight_decay
    grad_scale_ptr,  # float32 [1] (any pointer when HAS_GS is off)
    found_inf_ptr,   # float32 [1] (any pointer when HAS_FI is off)
    tickets_ptr,     # int32 [n_tensors], zero between launches
    p_ref,           # any tensor of the parameter dtype; only its type is used
    s_ref,           # any tensor of the state dtype; only its type is used
    seed,            # int32: the low 32 bits of the op's seed
    ROW_: tl.constexpr,
    NS: tl.constexpr,
    NH: tl.constexpr,
    BLOCK: tl.constexpr,
    D_STEP: tl.constexpr,
    EXACT: tl.constexpr,
    HAS_GS: tl.constexpr,
    HAS_FI: tl.constexpr,
    ROUNDING: tl.constexpr,
    HINTS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    PRECISE_MATH: tl.constexpr,
    QUANT: tl.constexpr = False,  # uint8 state (8-bit, esgdm.quant); BLOCK a multiple of 256
):
    pid = tl.program_id(0)
    go = True
    if HAS_FI:
        go = tl.load(found_inf_ptr) == 0  # nonzero (NaN included): write nothing at all
    if go:
        _program(pid, blocks_ptr, table_ptr, index_ptr, scalars_ptr, hparams_ptr, grad_scale_ptr,
                 tickets_ptr, p_ref, s_ref, seed, ROW_, NS, NH, BLOCK, D_STEP, EXACT, HAS_GS,
                 ROUNDING, HINTS, EMULATE_BF16, PRECISE_MATH, QUANT)


#: Whether the kernel was built for the Triton interpreter (which runs on CPU tensors).
INTERPRET = not isinstance(esgdm_step_kernel, triton.runtime.JITFunction)


# ----------------------------------------------------------------------- host side

_MAX_CACHED = 16
_BLOCK_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_ADDRESSES: OrderedDict[tuple, _Addresses] = OrderedDict()
_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel


def block_table_host(numels: Sequence[int], block: int) -> np.ndarray:
    """``int32 [n_programs, 2]``: for each program, (tensor index, block index in it).

    A tensor of ``n`` elements gets ``max(1, ceil(n / block))`` programs (an empty tensor
    one, which only advances its scalars).  Raises if a tensor needs 2**31 blocks or more.
    """
    counts = np.maximum(-(-np.asarray(numels, dtype=np.int64) // block), 1)
    if counts.size and int(counts.max()) >= 2**31:
        raise ValueError(f"a tensor of {max(numels)} elements needs too many blocks of {block}")
    total = int(counts.sum())
    tensor = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    chunk = (np.arange(total, dtype=np.int64) - starts).astype(np.int32)
    return np.stack([tensor, chunk], axis=1)


def lanes(numels: Sequence[int], block: int) -> int:
    """Elements the programs of a launch run, masked ones included."""
    counts = np.maximum(-(-np.asarray(numels, dtype=np.int64) // block), 1)
    return int(counts.sum()) * block


def choose_config(numels: Sequence[int], dtype: torch.dtype) -> dict:
    """The launch configuration for a bucket of tensors of ``numels`` elements:
    :data:`CONFIGS` unless :data:`SMALL_CONFIG` runs :data:`SMALL_CONFIG_GAIN` times
    fewer lanes (buckets of many small tensors)."""
    config = CONFIGS[dtype]
    if not len(numels) or config["BLOCK"] <= SMALL_CONFIG["BLOCK"]:
        return config
    if lanes(numels, config["BLOCK"]) >= SMALL_CONFIG_GAIN * lanes(numels, SMALL_CONFIG["BLOCK"]):
        return SMALL_CONFIG
    return config


def _cache_put(cache: OrderedDict, key, value):
    cache[key] = value
    if len(cache) > _MAX_CACHED:
        cache.popitem(last=False)
    return value


def block_table(numels: tuple, block: int, device: torch.device) -> torch.Tensor:
    """The cached device copy of :func:`block_table_host` for one layout."""
    key = (numels, block, device)
    table = _BLOCK_TABLES.get(key)
    if table is None:
        table = _cache_put(_BLOCK_TABLES, key, torch.from_numpy(block_table_host(numels, block)).to(device))
    else:
        _BLOCK_TABLES.move_to_end(key)
    return table


class _Addresses:
    """One bucket's device tables: what the kernel needs besides the op's arguments."""

    __slots__ = ("ptrs", "numels", "table", "host", "blocks", "tickets", "block", "num_warps")

    def __init__(self, ptrs, numels, table, host, blocks, tickets, block, num_warps):
        self.ptrs = ptrs            # the data_ptrs the table holds (a tuple or an int64 array)
        self.numels = numels        # the tuple of sizes it holds
        self.table = table          # int64 [n, ROW] on the device
        self.host = host            # the pinned buffer it was copied from (kept alive)
        self.blocks = blocks        # the layout's block table on the device
        self.tickets = tickets      # int32 [n] on the device, zero between launches
        self.block = block          # elements per program
        self.num_warps = num_warps  # warps per program


def address_table_host(ptrs: Sequence[int], numels: Sequence[int], d_step: bool,
                       quant: bool = False) -> np.ndarray:
    """``int64 [n, ROW]`` from the addresses ``ptrs`` (``p..., g..., [h...,] m..., D...``,
    then ``qscale...`` with ``quant``)."""
    n = len(numels)
    k = (5 if d_step else 4) + int(quant)
    cols = np.asarray(ptrs, dtype=np.uint64).view(np.int64).reshape(k, n)
    last = k - 1 if quant else k  # one past D's column
    out = np.empty((n, ROW), dtype=np.int64)
    out[:, P_COL] = cols[0]
    out[:, G_COL] = cols[1]
    out[:, H_COL] = cols[2] if d_step else cols[1]  # a plain step never reads h
    out[:, M_COL] = cols[last - 2]
    out[:, D_COL] = cols[last - 1]
    out[:, NUMEL_COL] = numels
    out[:, QS_COL] = cols[k - 1] if quant else 0
    return out


def _data_ptrs_op():
    """esgdm._C.data_ptrs where the package's extension is there and has it, else None
    (these kernels also run without it)."""
    try:
        from esgdm.backends.cpp_impl import _C
    except Exception:  # noqa: BLE001 - an optimisation only
        return None
    return getattr(_C, "data_ptrs", None)


def _pointers(lists) -> tuple[tuple[int, ...] | np.ndarray, tuple[int, ...] | np.ndarray]:
    """``(ptrs, numels)`` of the op's lists: as a ``int64 [len(lists) + 1, n]`` array from
    one C++ call where the extension has it (at thousands of tensors a Python call per
    tensor cost the host about 1 ms per step), else as tuples."""
    op = _data_ptrs_op()
    if op is not None:
        both = op(lists).numpy()
        return both[:-1].reshape(-1), both[-1]
    return tuple(map(_data_ptr, chain.from_iterable(lists))), tuple(map(_numel, lists[0]))


def _same(a, b) -> bool:
    return np.array_equal(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else a == b


def _addresses(params, grads, exp_avgs, exp_avg_ds, hvps, block: int | None,
               num_warps: int | None, device, qscales=None) -> _Addresses:
    """The bucket's cached tables, refreshed if an address or a size changed.

    ``block``/``num_warps`` None: chosen by :func:`choose_config` when the entry is made
    (a layout change makes a new entry)."""
    d_step = hvps is not None
    quant = qscales is not None
    lists = (params, grads, hvps, exp_avgs, exp_avg_ds) if d_step else (params, grads, exp_avgs, exp_avg_ds)
    if quant:
        lists = (*lists, qscales)
    ptrs, numels = _pointers(lists)
    # one entry per bucket (told apart by its first parameter), step kind and state kind
    key = (device, block, num_warps, d_step, quant, len(params), int(ptrs[0]))
    entry = _ADDRESSES.get(key)
    if entry is not None and _same(entry.ptrs, ptrs) and _same(entry.numels, numels):
        return entry
    host = torch.from_numpy(address_table_host(ptrs, numels, d_step, quant))
    if entry is not None and _same(entry.numels, numels):
        if device.type == "cuda":
            host = _pinned(host)
            entry.table.copy_(host, non_blocking=True)  # stream-ordered after earlier launches
        else:
            entry.table = host
        entry.ptrs, entry.host = ptrs, host
        _ADDRESSES.move_to_end(key)
        return entry
    return _cache_put(_ADDRESSES, key, _new_entry(ptrs, numels, host, params[0].dtype, block, num_warps,
                                                  device))


def _pinned(host: torch.Tensor) -> torch.Tensor:
    """A fresh pinned copy of ``host`` to upload from (an earlier copy may still read the
    last one)."""
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    return pinned.copy_(host)


def _new_entry(ptrs, numels, host: torch.Tensor, dtype: torch.dtype, block: int | None,
               num_warps: int | None, device) -> _Addresses:
    """A bucket's tables for one layout: ``host`` (:func:`address_table_host`) on the
    device, the block table, the tickets and the launch configuration."""
    if device.type == "cuda":
        host = _pinned(host)
        table = host.to(device, non_blocking=True)
    else:
        table = host
    numels = tuple(int(x) for x in numels)  # (the block table is cached by sizes)
    config = choose_config(numels, dtype) if block is None else CONFIGS[dtype]
    block = config["BLOCK"] if block is None else block
    num_warps = config["num_warps"] if num_warps is None else num_warps
    blocks = block_table(numels, block, device)
    tickets = torch.zeros(len(numels), dtype=torch.int32, device=device)
    return _Addresses(ptrs, numels, table, host, blocks, tickets, block, num_warps)


def plain_step_tables(params, exp_avgs, exp_avg_ds, qscales=None) -> tuple[_Addresses, torch.Tensor]:
    """A bucket's own tables for plain steps whose gradients' addresses somebody else
    writes into the table (``esgdm._C.StepPlan``, columns :data:`G_COL` and
    :data:`H_COL`), and a CPU copy of the table to write them into.  Not cached here:
    :func:`fused_step`'s tables for the same bucket compare what they hold with the
    gradients of each call, and must not be written behind their back.  The gradient
    columns hold 0 until then."""
    lists = (params, params, exp_avgs, exp_avg_ds) + (() if qscales is None else (qscales,))
    ptrs, numels = _pointers(lists)
    host = address_table_host(ptrs, numels, False, qscales is not None)
    host[:, [G_COL, H_COL]] = 0
    device = params[0].device
    _check_device(device)
    entry = _new_entry(None, numels, torch.from_numpy(host), params[0].dtype, None, None, device)
    # (on a CPU, in the interpreter, the table is its own host copy)
    return entry, entry.table if device.type == "cpu" else torch.from_numpy(host)


def launch(blocks: torch.Tensor, table: torch.Tensor, tickets: torch.Tensor, p_ref: torch.Tensor,
           s_ref: torch.Tensor, index: torch.Tensor, scalars: torch.Tensor, hparams: torch.Tensor,
           grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, d_step: bool,
           flags: int = 0, seed: int = 0, block: int | None = None,
           num_warps: int | None = None, hints: bool = True) -> None:
    """Launches the kernel over prepared tables (one launch; nothing if no programs).
    uint8 ``s_ref``: 8-bit state, the table's qscale column filled in."""
    n_programs = blocks.shape[0]
    if n_programs == 0:
        return
    config = CONFIGS[p_ref.dtype]
    block = config["BLOCK"] if block is None else block
    num_warps = config["num_warps"] if num_warps is None else num_warps
    rounding = ROUND_NEAREST
    if flags & FLAG_STOCHASTIC_ROUNDING:
        if p_ref.dtype == torch.bfloat16:
            rounding = ROUND_STOCHASTIC_BF16
        elif p_ref.dtype == torch.float16:
            rounding = ROUND_STOCHASTIC_FP16
    seed32 = int(seed) & 0xFFFFFFFF
    if seed32 >= 2**31:
        seed32 -= 2**32  # passed as int32; the kernel reads the bits as uint32
    quant = s_ref.dtype == torch.uint8
    if quant and block % QUANT_BLOCK:
        raise ValueError(f"8-bit state needs programs of a multiple of {QUANT_BLOCK} elements, "
                         f"not {block}")
    esgdm_step_kernel[(n_programs,)](
        blocks, table, index, scalars, hparams,
        scalars if grad_scale is None else grad_scale,
        scalars if found_inf is None else found_inf,
        tickets, p_ref, s_ref, seed32,
        ROW_=ROW, NS=N_SCALAR_COLUMNS, NH=N_HPARAM_COLUMNS, BLOCK=block, D_STEP=bool(d_step),
        EXACT=bool(flags & FLAG_EXACT), HAS_GS=grad_scale is not None, HAS_FI=found_inf is not None,
        ROUNDING=rounding, HINTS=bool(hints), EMULATE_BF16=INTERPRET, PRECISE_MATH=PRECISE,
        QUANT=quant, num_warps=num_warps,
    )


def _check_device(device: torch.device) -> None:
    if device.type != ("cpu" if INTERPRET else "cuda"):
        raise RuntimeError(
            f"the esgdm Triton kernel got tensors on {device}: " + (
                "it was imported in interpreter mode (TRITON_INTERPRET=1), which steps CPU tensors only"
                if INTERPRET else
                "CPU tensors run only in the Triton interpreter: set TRITON_INTERPRET=1 before "
                "esgdm's Triton kernels are imported"))


def fused_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars: torch.Tensor, index: torch.Tensor,
               hparams: torch.Tensor, grad_scale: torch.Tensor | None = None,
               found_inf: torch.Tensor | None = None, flags: int = 0, seed: int = 0,
               block: int | None = None, num_warps: int | None = None, hints: bool = True,
               qscales=None) -> None:
    """One ESGD-M step of a bucket (the contract of :mod:`esgdm.backends`), one launch.

    Updates ``params``, ``exp_avgs`` (and ``exp_avg_ds`` on a D-step, ``hvps`` given) in
    place and advances the ``bias, warm, steps`` columns of the tensors' rows of
    ``scalars``; ``dscale`` is only read.  Reads nothing back to the host.  ``block``,
    ``num_warps`` and ``hints`` override the launch configuration, which is otherwise
    :func:`choose_config`'s (tests use small blocks to reach the fast path).

    8-bit state (:mod:`esgdm.quant`): ``exp_avgs``/``exp_avg_ds`` uint8 codes and
    ``qscales`` each tensor's float32 ``[ceil(numel / 256), 2]`` block scales (contiguous),
    updated in place (D's on D-steps only); ``block`` then a multiple of 256.
    """
    if not params:
        return
    p_ref = params[0]
    if p_ref.dtype not in DTYPES or exp_avgs[0].dtype not in STATE_DTYPES:
        raise TypeError(f"the esgdm Triton kernel steps {', '.join(map(str, DTYPES))} parameters with "
                        f"{' or '.join(map(str, STATE_DTYPES))} state, not {p_ref.dtype} with "
                        f"{exp_avgs[0].dtype} state")
    if (exp_avgs[0].dtype == torch.uint8) != (qscales is not None):
        raise TypeError("uint8 state (8-bit) comes with its block scales (qscales), and only it")
    device = p_ref.device
    _check_device(device)
    entry = _addresses(params, grads, exp_avgs, exp_avg_ds, hvps, block, num_warps, device, qscales)
    with on_device(device):
        launch(entry.blocks, entry.table, entry.tickets, p_ref, exp_avgs[0], index, scalars, hparams,
               grad_scale, found_inf, hvps is not None, flags, seed, entry.block, entry.num_warps, hints)


def on_device(device: torch.device):
    """A context in which Triton launches on ``device``: Triton launches on the current
    CUDA device, so another one is made current for the launch."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def clear_caches() -> None:
    """Forgets every cached block and address table (tests; freeing device memory)."""
    _BLOCK_TABLES.clear()
    _ADDRESSES.clear()


__all__ = ["CONFIGS", "DSCALE_FLOOR", "DTYPES", "FLAG_EXACT", "FLAG_STOCHASTIC_ROUNDING", "INTERPRET",
           "QUANT_BLOCK", "ROW", "SMALL_CONFIG", "STATE_DTYPES", "address_table_host", "block_table",
           "block_table_host", "choose_config", "clear_caches", "esgdm_step_kernel", "fused_step", "lanes",
           "launch", "on_device", "plain_step_tables"]
