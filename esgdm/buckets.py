"""Flat optimizer state for a set of parameters that share a device and a dtype.

A :class:`Bucket` owns two flat, contiguous buffers, ``exp_avg`` (the momentum ``m``)
and ``exp_avg_d`` (the curvature estimate ``D``), plus two host-side float64 vectors
with the per-parameter scalars ``bias`` and ``warm``.  Each parameter owns the slice
``[offset, offset + numel)`` of the flat buffers, and every slice starts on a
16-byte boundary so that kernels can use 128-bit loads.  The per-parameter state that
``state_dict()`` shows is made of views into these buffers, so there is one copy of
the state, never two.

A later data-parallel version can shard a bucket by handing each rank a contiguous
range of tensors (and therefore of the flat buffers); nothing here assumes that one
process owns the whole bucket except :meth:`Bucket.signs`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

#: Every tensor's slice of a flat buffer starts on a multiple of this many bytes.
ALIGN_BYTES = 16


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Optimizer state is float32 at least (float64 parameters keep float64 state)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers exactly ``numel`` consecutive elements in some dim order.

    Such a tensor (contiguous, transposed, channels-last, ...) can be walked as a flat
    array, and a view with the same strides into a flat buffer lines up element for
    element with it.
    """
    expected = 1
    for size, stride in sorted(
        ((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda x: x[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(t: Tensor, shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether ``t`` has ``shape`` and ``strides``, ignoring the strides of dimensions of
    size 1 (they never move the address)."""
    return tuple(t.shape) == tuple(shape) and all(
        a == b or n <= 1 for n, a, b in zip(shape, t.stride(), strides)
    )


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class Bucket:
    """Parameters of one (device, dtype) with their state in flat buffers.

    Args:
        params: the parameters, in optimizer order (group by group).
        group_index: for each parameter, the index of its param group.
    """

    def __init__(self, params: Sequence[Tensor], group_index: Sequence[int]):
        if not params:
            raise ValueError("a bucket needs at least one parameter")
        self.params = list(params)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.device_index = self.params[0].get_device()  # -1 on the CPU
        self.state_dtype = state_dtype_for(self.dtype)
        self.group_index = np.asarray(list(group_index), dtype=np.int64)
        self.numels = [p.numel() for p in self.params]
        # Parameters that are not dense (a strided slice of something) are stepped
        # through a dense copy; everything else is stepped in place.
        self.dense = [is_dense(p) for p in self.params]
        self.all_dense = all(self.dense)
        #: Strides of each tensor's state, and of its gradient as the kernels see it.
        self.strides = [
            tuple(p.stride()) if dense else contiguous_strides(p.shape)
            for p, dense in zip(self.params, self.dense)
        ]

        align = ALIGN_BYTES // self.state_dtype.itemsize
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += _round_up(n, align)
        self.total = total

        self.exp_avg = torch.zeros(total, dtype=self.state_dtype, device=self.device)
        self.exp_avg_d = torch.zeros(total, dtype=self.state_dtype, device=self.device)
        # Per-parameter scalars live on the host in float64 (the spec computes them there),
        # in numpy arrays (cheap to update every step) that torch tensors share, so that
        # state_dict() can show each parameter's value as a 0-d tensor view.
        self.bias_np = np.ones(len(self.params))
        self.warm_np = np.ones(len(self.params))
        self.bias = torch.from_numpy(self.bias_np)
        self.warm = torch.from_numpy(self.warm_np)
        #: Which tensors' state the optimizer shows (those that have had a gradient).
        self.exposed = [False] * len(self.params)
        self.all_exposed = False
        self.exp_avg_views = [self.view(self.exp_avg, i) for i in range(len(self.params))]
        self.exp_avg_d_views = [self.view(self.exp_avg_d, i) for i in range(len(self.params))]

    def __len__(self) -> int:
        return len(self.params)

    @property
    def key(self) -> tuple[torch.device, torch.dtype]:
        return (self.device, self.dtype)

    def view(self, flat: Tensor, i: int) -> Tensor:
        """Tensor ``i``'s slice of ``flat``, shaped (and strided) like the parameter."""
        p = self.params[i]
        return flat.as_strided(p.shape, self.strides[i], flat.storage_offset() + self.offsets[i])

    def signs(self, generator: torch.Generator | None = None) -> list[Tensor]:
        """Rademacher (+1/-1) vectors for every tensor, drawn with one RNG call.

        The draw fills one flat buffer in the parameters' dtype; the returned
        tensors are views into it, laid out like the parameters.
        """
        gen_device = generator.device if generator is not None else self.device
        flat = torch.empty(self.total, dtype=self.dtype, device=gen_device)
        flat.random_(0, 2, generator=generator)  # 0 or 1, equally likely (4x faster than bernoulli_ on CPU)
        flat = flat.to(self.device).mul_(2).sub_(1)
        return [self.view(flat, i) for i in range(len(self.params))]

    def nbytes(self) -> int:
        return 2 * self.total * self.state_dtype.itemsize

    def __repr__(self) -> str:
        return (
            f"Bucket(device={self.device}, dtype={self.dtype}, tensors={len(self)}, "
            f"elements={sum(self.numels)}, state={self.nbytes() / 2**20:.1f} MiB)"
        )


def build_buckets(param_groups: Sequence[dict]) -> list[Bucket]:
    """Groups every parameter of ``param_groups`` into buckets by (device, dtype)."""
    members: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {}
    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            params, groups = members.setdefault((p.device, p.dtype), ([], []))
            params.append(p)
            groups.append(gi)
    return [Bucket(params, groups) for params, groups in members.values()]


def bytes_moved(numel: int, d_step: bool, param_bytes: int = 4, state_bytes: int = 4) -> int:
    """Bytes the fused step moves for ``numel`` elements (spec section 4).

    Plain step: read p, g, m, D and write p, m.  D-step: also read h and write D.
    With fp32 everything this is 24 and 32 bytes per element.
    """
    per_elem = 3 * param_bytes + 3 * state_bytes  # p (r+w), g (r); m (r+w), D (r)
    if d_step:
        per_elem += param_bytes + state_bytes  # h (r), D (w)
    return numel * per_elem


__all__ = [
    "ALIGN_BYTES", "Bucket", "build_buckets", "bytes_moved", "is_dense", "same_layout",
    "state_dtype_for",
]
