"""The fused ESGD-M step as one multi-tensor Triton kernel per bucket.

One launch updates every tensor of a bucket.  Program ``pid`` steps ``BLOCK``
consecutive elements of one tensor; which tensor and which block of it is read from
a *block table* (``int32 [n_blocks, 2]``: tensor index, block index in the tensor)
that depends only on the tensors' sizes and is built once per layout and cached.

What changes from step to step travels in one small *tensor table* per launch,
``int64 [n_tensors, ROW]``, uploaded in one host-to-device copy::

    column 0..4   addresses of p, g, h, m, D   (h is 0 on a plain step)
    column 5      numel
    column 6..8   five float32 packed in pairs: w = 1 - beta1, beta2, eps,
                  step_scale = alpha / c, decay = 1 - weight_decay * alpha

so gradients and HVPs are read where they are (no copy into a flat buffer).  Only the
block table is cached: the p, m, D addresses are re-read each step because checking a
cached copy would cost the host as much as reading them, and a parameter may have
moved (``p.data = ...``, or the dense copy stepped for a strided parameter).  The
kernel reads ``p, g, m, D`` (and ``h`` on D-steps) and writes ``p, m`` (and ``D`` on
D-steps) exactly once; all arithmetic is float32 in registers.

Memory access: a block of a tensor whose five addresses are all 16-byte aligned and
that is full (not the tail of the tensor) takes the *fast path*, where the compiler is
told about the alignment and drops the mask, so fp32 loads and stores become 128-bit
(``ld.global.v4``).  Everything else (tails, unaligned views) takes the masked
element-wise path, which is correct for any address.

Offsets: the start of a block inside its tensor is a 64-bit scalar added to a 64-bit
base address once per program; the per-element offsets are 32-bit (``< BLOCK``), so
tensors of more than 2**31 elements work without 64-bit vector arithmetic.

``TRITON_INTERPRET=1`` must be set before this module is imported for the kernel to
run on CPU tensors (the Triton interpreter); :data:`INTERPRET` records which mode the
kernel was built in.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

#: int64 columns of one row of the per-launch tensor table.
ROW = 9
P_COL, G_COL, H_COL, M_COL, D_COL, NUMEL_COL = range(6)
#: float32 index (in a row viewed as float32) of the first packed scalar.
FLOAT_COL = 12
#: The packed float32 scalars, in order.
FLOAT_NAMES = ("w", "beta2", "eps", "step_scale", "decay")

#: Parameter dtypes the kernel handles (state is always float32).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Launch configuration per parameter dtype: elements per program and warps.
#: 2048 elements on 8 warps is 8 elements per thread and array: two 128-bit fp32
#: vectors (one for 16-bit parameters).  ptxas gives it 64 registers (80 on D-steps)
#: on sm_90 and no spills, so 3-4 programs (96-128 KiB of loads) are in flight per
#: SM; 4096 elements per program needed 128-160 registers, allowing only 1-2.
#: Figures from benchmarks/ptx_report.py.
CONFIGS = {
    torch.float32: dict(BLOCK=2048, num_warps=8),
    torch.bfloat16: dict(BLOCK=2048, num_warps=8),
    torch.float16: dict(BLOCK=2048, num_warps=8),
}

#: Precise (IEEE round-to-nearest) sqrt and division exist in Triton >= 3.0.
PRECISE = hasattr(tl, "sqrt_rn") and hasattr(tl, "div_rn")


@triton.jit
def _lerp(a, b, w):
    """``torch.lerp(a, b, w)`` as torch computes it (so the backends agree to rounding):
    ``a + w*(b - a)`` for ``w < 0.5``, else ``b - (1 - w)*(b - a)``."""
    small = w < 0.5
    return tl.where(small, a, b) + tl.where(small, w, w - 1.0) * (b - a)


@triton.jit
def _update(p, g, m, d, h, w, beta2, eps, step_scale, decay, D_STEP: tl.constexpr,
            PRECISE_MATH: tl.constexpr):
    """The element-wise rule of esgdm.rule, in float32; returns (p, m, d).

    ``w = 1 - beta1``; ``step_scale = alpha / c``; ``decay = 1 - weight_decay * alpha``.
    """
    p = p.to(tl.float32)
    g = g.to(tl.float32)
    m = _lerp(m, g, w)  # m <- b1*m + (1-b1)*g
    if D_STEP:
        h = h.to(tl.float32)
        d = tl.maximum(d * beta2, h * h)  # Adamax-style inf norm of squared HVPs
    mhat = _lerp(m, g, w)  # Nesterov look-ahead
    if PRECISE_MATH:
        q = tl.div_rn(mhat, tl.sqrt_rn(d) + eps)
    else:
        q = mhat / (tl.sqrt(d) + eps)
    p = p * decay - step_scale * q  # decoupled weight decay, then the step
    return p, m, d


@triton.jit
def _step_block(p_ptr, g_ptr, h_ptr, m_ptr, d_ptr, mask, w, beta2, eps, step_scale, decay,
                D_STEP: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """Loads one block, applies :func:`_update`, stores it (``mask`` None: full block)."""
    p = tl.load(p_ptr, mask=mask)
    g = tl.load(g_ptr, mask=mask)
    m = tl.load(m_ptr, mask=mask)
    d = tl.load(d_ptr, mask=mask)
    h = p  # unused on plain steps
    if D_STEP:
        h = tl.load(h_ptr, mask=mask)
    p_new, m, d = _update(p, g, m, d, h, w, beta2, eps, step_scale, decay, D_STEP, PRECISE_MATH)
    tl.store(p_ptr, p_new.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr, m, mask=mask)
    if D_STEP:
        tl.store(d_ptr, d, mask=mask)


@triton.jit(do_not_specialize=["p_ref"])
def esgdm_step_kernel(
    blocks_ptr,   # int32 [n_blocks, 2]: (tensor index, block index within the tensor)
    table_ptr,    # int64 [n_tensors, ROW]: addresses and numel (see module docstring)
    ftable_ptr,   # the same memory viewed as float32: the packed scalars
    p_ref,        # any tensor of the parameter dtype; only its type is used
    ROW_: tl.constexpr,
    FLOAT_COL_: tl.constexpr,
    BLOCK: tl.constexpr,
    D_STEP: tl.constexpr,
    HINTS: tl.constexpr,
    PRECISE_MATH: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + 2 * pid)
    chunk = tl.load(blocks_ptr + 2 * pid + 1)
    row = table_ptr + t * ROW_
    p_addr = tl.load(row + 0)
    g_addr = tl.load(row + 1)
    m_addr = tl.load(row + 3)
    d_addr = tl.load(row + 4)
    numel = tl.load(row + 5)
    frow = ftable_ptr + t * (2 * ROW_) + FLOAT_COL_
    w = tl.load(frow + 0)
    beta2 = tl.load(frow + 1)
    eps = tl.load(frow + 2)
    step_scale = tl.load(frow + 3)
    decay = tl.load(frow + 4)
    if D_STEP:
        h_addr = tl.load(row + 2)
        misaligned = (p_addr | g_addr | h_addr | m_addr | d_addr) & 15
    else:
        h_addr = g_addr  # never read
        misaligned = (p_addr | g_addr | m_addr | d_addr) & 15

    start = chunk.to(tl.int64) * BLOCK  # 64-bit: tensors may exceed 2**31 elements
    remaining = numel - start
    p_type = p_ref.dtype
    f_type = ftable_ptr.dtype
    fast = (misaligned == 0) & (remaining >= BLOCK) & HINTS
    if fast:
        # Fast path: full block, 16-byte aligned.  The pointers are created here (not
        # shared with the other path) so the alignment hints apply to this path only;
        # each path has its own element offsets (32-bit) so each gets its own layout.
        offs = tl.arange(0, BLOCK)
        p_ptr = tl.multiple_of(p_addr.to(p_type), 16) + start
        g_ptr = tl.multiple_of(g_addr.to(p_type), 16) + start
        h_ptr = tl.multiple_of(h_addr.to(p_type), 16) + start
        m_ptr = tl.multiple_of(m_addr.to(f_type), 16) + start
        d_ptr = tl.multiple_of(d_addr.to(f_type), 16) + start
        _step_block(p_ptr + offs, g_ptr + offs, h_ptr + offs, m_ptr + offs, d_ptr + offs,
                    None, w, beta2, eps, step_scale, decay, D_STEP, PRECISE_MATH)
    else:
        offs = tl.arange(0, BLOCK)
        n = tl.minimum(remaining, BLOCK).to(tl.int32)
        mask = offs < n
        p_ptr = p_addr.to(p_type) + start
        g_ptr = g_addr.to(p_type) + start
        h_ptr = h_addr.to(p_type) + start
        m_ptr = m_addr.to(f_type) + start
        d_ptr = d_addr.to(f_type) + start
        _step_block(p_ptr + offs, g_ptr + offs, h_ptr + offs, m_ptr + offs, d_ptr + offs,
                    mask, w, beta2, eps, step_scale, decay, D_STEP, PRECISE_MATH)


#: Whether the kernel was built for the Triton interpreter (which runs on CPU tensors).
INTERPRET = not isinstance(esgdm_step_kernel, triton.runtime.JITFunction)


# ----------------------------------------------------------------------- host side

_BLOCK_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_MAX_CACHED = 16


def block_table_host(numels: Sequence[int], block: int) -> np.ndarray:
    """``int32 [n_blocks, 2]``: for each program, (tensor index, block index in it).

    Empty tensors get no program.  Raises if a tensor needs 2**31 blocks or more.
    """
    counts = np.array([-(-int(n) // block) for n in numels], dtype=np.int64)
    total = int(counts.sum())
    if counts.size and int(counts.max()) >= 2**31:
        raise ValueError(f"a tensor of {max(numels)} elements needs too many blocks of {block}")
    tensor = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    chunk = (np.arange(total, dtype=np.int64) - starts).astype(np.int32)
    return np.stack([tensor, chunk], axis=1)


def block_table(numels: tuple, block: int, device: torch.device) -> torch.Tensor:
    """The cached device copy of :func:`block_table_host` for one layout."""
    key = (numels, block, device)
    table = _BLOCK_TABLES.get(key)
    if table is None:
        host = torch.from_numpy(block_table_host(numels, block))
        table = host.to(device)
        _BLOCK_TABLES[key] = table
        if len(_BLOCK_TABLES) > _MAX_CACHED:
            _BLOCK_TABLES.popitem(last=False)
    else:
        _BLOCK_TABLES.move_to_end(key)
    return table


def fill_table(out: np.ndarray, params, grads, exp_avgs, exp_avg_ds, hvps,
               scalars: np.ndarray, numels: Optional[Sequence[int]] = None) -> None:
    """Writes the per-launch tensor table (see module docstring) into ``out``."""
    out[:, P_COL] = [t.data_ptr() for t in params]
    out[:, G_COL] = [t.data_ptr() for t in grads]
    out[:, H_COL] = 0 if hvps is None else [t.data_ptr() for t in hvps]
    out[:, M_COL] = [t.data_ptr() for t in exp_avgs]
    out[:, D_COL] = [t.data_ptr() for t in exp_avg_ds]
    out[:, NUMEL_COL] = [t.numel() for t in params] if numels is None else numels
    floats = out.view(np.float32)[:, FLOAT_COL:FLOAT_COL + len(FLOAT_NAMES)]
    # columns of esgdm.rule.SCALAR_COLUMNS: beta1, beta2, eps, step_scale, decay
    floats[:, 0] = 1.0 - scalars[:, 0]  # lerp weight, computed in float64 like torch
    floats[:, 1:] = scalars[:, 1:]


def launch_tables(blocks: torch.Tensor, table: torch.Tensor, p_ref: torch.Tensor,
                  d_step: bool, block: Optional[int] = None, num_warps: Optional[int] = None,
                  hints: bool = True) -> None:
    """Launches the kernel over prepared tables (one launch; nothing if no blocks)."""
    n_blocks = blocks.shape[0]
    if n_blocks == 0:
        return
    config = CONFIGS[p_ref.dtype]
    block = config["BLOCK"] if block is None else block
    num_warps = config["num_warps"] if num_warps is None else num_warps
    esgdm_step_kernel[(n_blocks,)](
        blocks, table, table.view(torch.float32), p_ref,
        ROW_=ROW, FLOAT_COL_=FLOAT_COL, BLOCK=block, D_STEP=bool(d_step), HINTS=bool(hints),
        PRECISE_MATH=PRECISE, num_warps=num_warps,
    )


def fused_step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars: torch.Tensor,
               block: Optional[int] = None, hints: bool = True) -> None:
    """One ESGD-M step over a bucket's aligned lists, in one kernel launch.

    The lists follow the contract of :mod:`esgdm.backends`; ``scalars`` is the float64
    CPU ``[n, 5]`` table of :mod:`esgdm.rule`.  ``block`` and ``hints`` override the
    launch configuration (tests use small blocks to reach the fast path).
    """
    n = len(params)
    if n == 0:
        return
    p_ref = params[0]
    device = p_ref.device
    if device.type != ("cpu" if INTERPRET else "cuda"):
        raise RuntimeError(
            f"the esgdm Triton kernel got tensors on {device}: " + (
                "it was imported in interpreter mode (TRITON_INTERPRET=1), which steps CPU tensors only"
                if INTERPRET else
                "CPU tensors run only in the Triton interpreter: set TRITON_INTERPRET=1 before "
                "esgdm's Triton kernels are imported"))
    block = CONFIGS[p_ref.dtype]["BLOCK"] if block is None else block
    numels = tuple(t.numel() for t in params)
    blocks = block_table(numels, block, device)
    on_gpu = device.type == "cuda"
    host = torch.empty((n, ROW), dtype=torch.int64, pin_memory=on_gpu and not INTERPRET)
    fill_table(host.numpy(), params, grads, exp_avgs, exp_avg_ds, hvps,
               scalars.numpy() if scalars.dtype == torch.float64 else scalars.double().numpy(),
               numels)
    table = host.to(device, non_blocking=True) if on_gpu else host
    if on_gpu and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):  # Triton launches on the current device
            launch_tables(blocks, table, p_ref, hvps is not None, block=block, hints=hints)
    else:
        launch_tables(blocks, table, p_ref, hvps is not None, block=block, hints=hints)


__all__ = ["CONFIGS", "DTYPES", "INTERPRET", "ROW", "block_table", "block_table_host",
           "esgdm_step_kernel", "fill_table", "fused_step", "launch_tables"]
