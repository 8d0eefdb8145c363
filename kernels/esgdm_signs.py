"""The finite-difference probe's perturbation ``t += alpha * v`` on a GPU, with the
Rademacher signs ``v`` of :mod:`esgdm.signs` drawn inside one Triton launch per dtype
(never materialised), each tensor first copied to its backup in the same pass.

The CUDA counterpart of ``esgdm._C.add_signs_`` (CPU tensors).  Drawn as tensors, the
signs of one D-step cost a dozen small launches and two passes over a parameter-sized
buffer per tensor; here every tensor of one dtype is one launch that reads each element
once and writes it (and its backup) once.

Element ``k`` of tensor ``i`` gets the sign of ``mix32((starts[i] + k) mod 2**32 ^
keys[i])`` (its top bit set: -1, else +1), as :func:`esgdm.signs.rademacher`, and is
rounded once as CUDA's ``torch._foreach_add_(t, v, alpha=alpha)`` rounds it: computed
in float32 (float64 for float64 tensors) with ``alpha`` in that type, then stored in the
tensor's dtype.  Programs and tables as in :mod:`esgdm.kernels.esgdm_step`: a block table
(tensor, block) per layout, and an address table ``int64 [n, ROW]`` (tensor, backup,
numel, key, start) built per call (once per D-step).  A full block whose tensor and backup
are 16-byte aligned loads and stores 128 bits at a time; tails and unaligned views take
the masked path.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (tests); the interpreter
converts float32 to bfloat16 by truncation, so bfloat16 is compared on a GPU only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

try:
    from . import esgdm_elements as _elements
    from . import esgdm_step as _step
except ImportError:  # loaded as a top-level module (kernels/ itself on sys.path)
    import esgdm_elements as _elements  # type: ignore[no-redef]
    import esgdm_step as _step  # type: ignore[no-redef]

_mix32 = _elements._mix32

#: Whether the kernel was built for the Triton interpreter (CPU tensors).
INTERPRET = _step.INTERPRET

#: int64 columns of one row of the address table.
ROW = 5
T_COL, BACKUP_COL, NUMEL_COL, KEY_COL, START_COL = range(ROW)

#: Dtypes the kernel perturbs, and the type each is computed in.
MATH_DTYPES = {torch.float32: torch.float32, torch.bfloat16: torch.float32,
               torch.float16: torch.float32, torch.float64: torch.float64}

#: Elements per program and warps (one pass of loads and stores: no tuning needed beyond
#: 128-bit accesses for every dtype).
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def add_signs_kernel(blocks_ptr, table_ptr, alpha_ptr, t_ref, ROW_: tl.constexpr, BLOCK_: tl.constexpr,
                     BACKUP: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + 2 * pid)
    chunk = tl.load(blocks_ptr + 2 * pid + 1)
    row = table_ptr + t * ROW_
    t_addr = tl.load(row + 0)
    b_addr = tl.load(row + 1)  # 0 without backups
    numel = tl.load(row + 2)
    key = (tl.load(row + 3) & 0xFFFFFFFF).to(tl.uint32)
    first = tl.load(row + 4)
    start = chunk.to(tl.int64) * BLOCK_  # 64-bit: tensors may exceed 2**31 elements
    offs = tl.arange(0, BLOCK_)
    index = ((first + start + offs) & 0xFFFFFFFF).to(tl.uint32)  # the element's low 32 bits
    h = _mix32(index ^ key)
    alpha = tl.load(alpha_ptr)  # in the math type
    v = tl.where((h >> 31) != 0, -alpha, alpha)  # alpha * (+-1), exactly
    if (((t_addr | b_addr) & 15) == 0) & (numel - start >= BLOCK_):
        # A full block, 16-byte aligned: the compiler is told, and the accesses are
        # 128-bit without a mask (the pointers made here, so the hints apply here only).
        ptr = tl.multiple_of(t_addr.to(t_ref.dtype), 16) + start + offs
        old = tl.load(ptr)
        if BACKUP:
            tl.store(tl.multiple_of(b_addr.to(t_ref.dtype), 16) + start + offs, old)
        tl.store(ptr, (old.to(alpha.dtype) + v).to(old.dtype))
    else:  # a tail, or an unaligned view
        mask = offs < numel - start
        ptr = t_addr.to(t_ref.dtype) + start + offs
        old = tl.load(ptr, mask=mask)
        if BACKUP:
            tl.store(b_addr.to(t_ref.dtype) + start + offs, old, mask=mask)
        tl.store(ptr, (old.to(alpha.dtype) + v).to(old.dtype), mask=mask)


def _check(tensors: Sequence[torch.Tensor], keys: Sequence[int], starts: Sequence[int],
           backups: Sequence[torch.Tensor] | None) -> None:
    n = len(tensors)
    if len(keys) != n or len(starts) != n or (backups is not None and len(backups) != n):
        raise ValueError(f"add_signs_: got {n} tensors, {len(keys)} keys, {len(starts)} starts"
                         + ("" if backups is None else f" and {len(backups)} backups"))
    for i, t in enumerate(tensors):
        _step._check_device(t.device)
        if t.dtype not in MATH_DTYPES or not t.is_contiguous() or t.is_neg() or t.is_conj():
            raise ValueError(f"add_signs_: tensors[{i}] must be a contiguous float32, float64, "
                             f"bfloat16 or float16 tensor, got {t.dtype} of strides {t.stride()}")
        if t.device != tensors[0].device:
            raise ValueError(f"add_signs_: tensors[{i}] is on {t.device}, tensors[0] on {tensors[0].device}")
        if backups is not None:
            b = backups[i]
            if (b.dtype != t.dtype or b.device != t.device or b.numel() != t.numel() or not b.is_contiguous()
                    or b.is_neg()):
                raise ValueError(f"add_signs_: backups[{i}] must be a contiguous tensor like tensors[{i}]")


def add_signs_(tensors: Sequence[torch.Tensor], keys: Sequence[int], starts: Sequence[int], alpha: float,
               backups: Sequence[torch.Tensor] | None = None) -> None:
    """``tensors[i] += alpha * v_i`` (``v_i`` the signs under the 32-bit ``keys[i]``, element
    ``k``'s index ``starts[i] + k``); with ``backups``, each tensor is first copied there in
    the same pass.  Everything is checked before anything is written.  One launch per
    dtype; contiguous CUDA tensors (CPU tensors in the interpreter)."""
    _check(tensors, keys, starts, backups)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, which in by_dtype.items():
        device = tensors[which[0]].device
        lists = ([tensors[i] for i in which],) + (() if backups is None else ([backups[i] for i in which],))
        ptrs, sizes = _step._pointers(lists)  # (one C++ call where the extension has it)
        addresses = np.asarray(ptrs, dtype=np.uint64).view(np.int64).reshape(len(lists), len(which))
        numels = tuple(int(x) for x in sizes)
        table = np.empty((len(which), ROW), dtype=np.int64)
        table[:, T_COL] = addresses[0]
        table[:, BACKUP_COL] = addresses[1] if backups is not None else 0
        table[:, NUMEL_COL] = numels
        table[:, KEY_COL] = [int(keys[i]) & 0xFFFFFFFF for i in which]
        table[:, START_COL] = [int(starts[i]) for i in which]
        blocks = _step.block_table(numels, BLOCK, device)
        alpha_t = torch.tensor([alpha], dtype=MATH_DTYPES[dtype]).to(device)
        with _step.on_device(device):
            add_signs_kernel[(blocks.shape[0],)](blocks, torch.from_numpy(table).to(device), alpha_t,
                                                 tensors[which[0]], ROW_=ROW, BLOCK_=BLOCK,
                                                 BACKUP=backups is not None, num_warps=NUM_WARPS)


__all__ = ["BLOCK", "INTERPRET", "MATH_DTYPES", "ROW", "add_signs_", "add_signs_kernel"]
