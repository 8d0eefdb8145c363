"""Device-resident optimizer state for a set of parameters that share a device and a dtype.

A :class:`Bucket` owns

* two flat, contiguous buffers, ``exp_avg`` (the momentum ``m``) and ``exp_avg_d`` (the
  curvature estimate ``D``), in the bucket's state dtype.  Each parameter owns the
  slice ``[offset, offset + numel)``; every slice starts on a 16-byte boundary so that
  kernels can use 128-bit loads.  The per-parameter state that ``state_dict()`` shows
  is made of views into these buffers: one copy of the state, never two;
* ``scalars``, float64 ``[n, 4]`` on the bucket's device: each tensor's ``bias``,
  ``warm``, ``steps`` and ``dscale`` (:data:`esgdm.rule.SCALAR_COLUMNS`), advanced by the
  kernels themselves, so a step reads nothing back to the host;
* the cached int32 ``index`` tables (slot, group row) of the active sets seen so far.

Nothing here decides the schedule or runs a kernel.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from esgdm import quant, traced
from esgdm.dtypes import state_dtype_for
from esgdm.rule import BIAS, DSCALE, SCALAR_COLUMNS, STEPS, WARM, curvature_scale

try:  # torch >= 2.5 (FSDP2's sharded parameters)
    from torch.distributed.tensor import DTensor as _DTensor

    DTensor: Any = _DTensor
except ImportError:  # pragma: no cover - older torch or a build without distributed
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors) -> bool:
    """Whether some of ``tensors`` is a DTensor: by their types, at C speed (a Python
    call per tensor cost 0.1 ms per thousand tensors on every step)."""
    return DTensor is not None and any(issubclass(t, DTensor) for t in set(map(type, tensors)))


def local(t: Tensor) -> Tensor:
    """What this process holds of ``t``: a DTensor's local shard (same storage), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def real_view(t: Tensor) -> Tensor:
    """A complex tensor as its real view (``torch.view_as_real``: a trailing dimension
    of 2, same storage), any other tensor as itself.  Complex parameters are stepped,
    probed and stored as this view, as the built-in torch optimizers do."""
    return torch.view_as_real(t) if t.is_complex() else t

#: Every tensor's slice of a flat buffer starts on a multiple of this many bytes.
ALIGN_BYTES = 16


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


def overlaps(p: Tensor) -> bool:
    """Whether two elements of ``p`` share memory (an expanded tensor, stride 0).  An
    empty tensor has no elements to share (torch gives some of them stride-0 dims)."""
    return p.numel() > 0 and any(st == 0 and n > 1 for n, st in zip(p.shape, p.stride()))


def _span(t: Tensor) -> int:
    """Elements from ``t``'s first to one past its last (strides are never negative)."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))


def _element_bytes(t: Tensor) -> Tensor:
    """The sorted addresses of ``t``'s elements, relative to its storage."""
    first = t.storage_offset()
    offsets = torch.as_strided(torch.arange(first + _span(t)), t.shape, t.stride(), first)
    return (offsets.reshape(-1) * t.element_size()).sort().values


def _starts_inside(a: Tensor, a_bytes: Tensor, b_bytes: Tensor) -> bool:
    """Whether an element of b starts inside an element of a (addresses as above)."""
    idx = torch.searchsorted(a_bytes, b_bytes, right=True) - 1
    return bool(((idx >= 0) & (b_bytes < a_bytes[idx.clamp(min=0)] + a.element_size())).any())


def _share_elements(a: Tensor, b: Tensor) -> bool:
    if is_dense(a) and is_dense(b):
        return True  # (each fills its byte range, and the ranges meet)
    a_bytes, b_bytes = _element_bytes(a), _element_bytes(b)
    return _starts_inside(a, a_bytes, b_bytes) or _starts_inside(b, b_bytes, a_bytes)


def shared_memory(tensors: Sequence[Tensor]) -> tuple[int, int] | None:
    """The indices of two of ``tensors`` whose elements share memory, or None.  Byte
    ranges first (a sweep over them, sorted); where two ranges meet and one of the
    tensors is strided (two interleaved slices may share nothing), the elements."""
    spans = []
    for k, t in enumerate(tensors):
        if t.numel() == 0 or t.device.type == "meta":
            continue
        begin = int(t.storage_offset()) * t.element_size()
        spans.append((t.untyped_storage().data_ptr(), begin, begin + int(_span(t)) * t.element_size(), k))
    spans.sort()
    active: list[tuple[int, int, int, int]] = []  # the spans that may still meet the next one
    for span in spans:
        storage, begin, _, k = span
        active = [a for a in active if a[0] == storage and a[2] > begin]
        for _, _, _, j in active:
            if _share_elements(tensors[j], tensors[k]):
                return (min(j, k), max(j, k))
        active.append(span)
    return None


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


def state_strides(p: Tensor) -> tuple[int, ...]:
    """Strides of ``p``'s state: ``p``'s own when ``p`` is dense (so the kernels walk both
    as flat arrays), else contiguous.  Empty tensors always get contiguous strides."""
    if p.numel() == 0 or not is_dense(p):
        return contiguous_strides(p.shape)
    return tuple(p.stride())


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class Bucket:
    """Parameters of one (device, dtype) with their state in flat device buffers.

    Args:
        params: the parameters, in optimizer order (group by group).
        group_index: for each parameter, the index of its param group.
        state_dtype: the ``state_dtype=`` asked for (:func:`esgdm.dtypes.state_dtype_for`
            gives ``m`` and ``D``'s dtype; :func:`build_buckets` has put only tensors
            large enough for it here).

    With 8-bit state (``torch.uint8``, :mod:`esgdm.quant`) ``exp_avg``/``exp_avg_d`` hold
    codes and a third flat buffer, ``qscale`` (float32 ``[blocks, 2]``), the block
    scales; ``qscale_views[i]`` is tensor ``i``'s ``[n_blocks(numel), 2]`` rows.
    """

    def __init__(self, params: Sequence[Tensor], group_index: Sequence[int],
                 state_dtype: torch.dtype | None = None):
        if not params:
            raise ValueError("a bucket needs at least one parameter")
        self.params = list(params)
        #: Whether some parameter is a DTensor (FSDP2): then the kernels step each one's
        #: local shard, and the state is exposed as DTensors sharded like the parameter.
        self.dtensor = [is_dtensor(p) for p in self.params]
        self.any_dtensor = any(self.dtensor)
        #: Which parameters are complex: the kernels step their real views.
        self.complex = [p.is_complex() for p in self.params]
        self.any_complex = any(self.complex)
        #: The tensors the kernels step: the parameters, or their local shards (real views).
        self.tensors = ([real_view(local(p)) for p in self.params] if self.any_dtensor or self.any_complex
                        else self.params)
        p0 = self.tensors[0]
        self.device = p0.device
        self.dtype = p0.dtype
        self.device_index = p0.get_device()  # -1 on the CPU
        self.state_dtype = state_dtype_for(self.dtype, state_dtype)
        self.group_index = [int(g) for g in group_index]
        self.numels = [t.numel() for t in self.tensors]
        self.shapes = [t.shape for t in self.tensors]
        # Parameters that are not dense (a strided slice of something) are stepped
        # through a dense copy; everything else is stepped in place.
        # (An empty tensor counts as dense only with the contiguous strides its state gets.)
        self.dense = [is_dense(t) if t.numel() else t.stride() == contiguous_strides(t.shape)
                      for t in self.tensors]
        self.all_dense = all(self.dense)
        #: Strides of each tensor's state, and of its gradient as the kernels see it.
        self.strides = [state_strides(t) for t in self.tensors]

        align = ALIGN_BYTES // self.state_dtype.itemsize
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += _round_up(n, align)
        self.total = total

        self.exp_avg = torch.zeros(total, dtype=self.state_dtype, device=self.device)
        self.exp_avg_d = torch.zeros(total, dtype=self.state_dtype, device=self.device)
        self.quantized = self.state_dtype == torch.uint8
        self.qscale_views: list[Tensor] | None = None
        #: 8-bit state: each tensor's first row of ``qscale`` (else None).
        self.qscale_starts: list[int] | None = None
        if self.quantized:
            self.exp_avg.fill_(quant.M_ZERO)  # the code of m = 0
            blocks = [quant.n_blocks(n) for n in self.numels]
            self.qscale = torch.zeros((sum(blocks), 2), dtype=torch.float32, device=self.device)
            starts = [0]
            for nb in blocks[:-1]:
                starts.append(starts[-1] + nb)
            self.qscale_starts = starts
            self.qscale_views = [self.qscale[s:s + nb] for s, nb in zip(starts, blocks)]
        self.scalars = torch.zeros((len(self.params), len(SCALAR_COLUMNS)), dtype=torch.float64,
                                   device=self.device)
        self.scalars[:, BIAS] = 1.0
        self.scalars[:, WARM] = 1.0
        #: Which tensors' state the optimizer shows (those that have had a gradient).
        self.exposed = [False] * len(self.params)
        self.all_exposed = False
        self.exp_avg_views = [self.view(self.exp_avg, i) for i in range(len(self.params))]
        self.exp_avg_d_views = [self.view(self.exp_avg_d, i) for i in range(len(self.params))]
        self._index_cache: dict[tuple | None, Tensor] = {}
        #: Its number in :mod:`esgdm.traced` ("" until :meth:`enroll`): a traced step asks
        #: the layout questions below through it, one guard for all entries.
        self.serial = ""
        if not _compiling():
            self.enroll()

    def __len__(self) -> int:
        return len(self.params)

    def enroll(self) -> None:
        """Numbers the bucket in :mod:`esgdm.traced` and records it as its buffers' owner
        (:func:`own_state_views`), once; outside traced code (a bucket built inside a
        traced step is enrolled by the next eager step that finds it current)."""
        if not self.serial:
            self.serial = traced.number(self)
            _OWNERS[id(self.exp_avg)] = self

    # The layout questions of a traced step (esgdm.store asks them through esgdm.traced;
    # idx: the active tensors, None: all).  The shapes and strides are plain tuples of ints.

    def _select(self, values: Sequence, idx: Sequence[int] | None) -> list:
        return list(values) if idx is None else [values[i] for i in idx]

    def shapes_are(self, idx: Sequence[int] | None, shapes: Sequence[tuple[int, ...]]) -> bool:
        """Whether tensors ``idx`` have ``shapes``."""
        return [tuple(s) for s in self._select(self.shapes, idx)] == list(shapes)

    def strides_are(self, idx: Sequence[int] | None, strides: Sequence[tuple[int, ...]]) -> bool:
        """Whether the state of tensors ``idx`` has ``strides``."""
        return self._select(self.strides, idx) == list(strides)

    def offsets_of(self, idx: Sequence[int] | None) -> tuple[list[int], list[int] | None]:
        """Offsets of tensors ``idx`` in the flat buffers, and (8-bit state) their first
        rows of ``qscale``."""
        starts = self.qscale_starts
        return self._select(self.offsets, idx), None if starts is None else self._select(starts, idx)

    @property
    def key(self) -> tuple[torch.device, torch.dtype, torch.dtype]:
        return (self.device, self.dtype, self.state_dtype)

    def view(self, flat: Tensor, i: int) -> Tensor:
        """Tensor ``i``'s slice of ``flat``, shaped (and strided) like the parameter
        (like its local shard, for a DTensor)."""
        t = self.tensors[i]
        return flat.as_strided(t.shape, self.strides[i], flat.storage_offset() + self.offsets[i])

    def exposed_view(self, view: Tensor, i: int) -> Tensor:
        """``view`` as the user sees state: a DTensor sharded like parameter ``i`` if
        that is a DTensor (so a sharded optimizer's state dict is a sharded state dict),
        a complex view for a complex parameter (as torch.optim keeps complex state)."""
        if self.complex[i]:
            view = torch.view_as_complex(view)
        if not self.dtensor[i]:
            return view
        p = self.params[i]
        return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,  # type: ignore[attr-defined]
                                  shape=p.shape, stride=p.stride())

    def scalar(self, i: int, column: int) -> Tensor:
        """Tensor ``i``'s ``column`` of :attr:`scalars` as a 0-d view."""
        return self.scalars[i, column]

    def index(self, idx: Sequence[int] | None) -> Tensor:
        """The int32 ``[n, 2]`` (slot, group row) table for the active tensors ``idx``
        (None: all), built and uploaded once per active set, then reused."""
        key = None if idx is None else tuple(idx)
        table = self._index_cache.get(key)
        if table is None:
            slots = range(len(self.params)) if idx is None else idx
            rows = [[s, self.group_index[s]] for s in slots]
            host = torch.tensor(rows, dtype=torch.int32)
            table = host.reshape(-1, 2).to(self.device)
            if rows:
                note_index_bounds(table, max(r[0] for r in rows), max(r[1] for r in rows))
            if len(self._index_cache) > 8:  # active sets rarely vary; keep a few
                self._index_cache.pop(next(iter(self._index_cache)))
            self._index_cache[key] = table
        return table

    def load(self, i: int, exp_avg: Tensor, exp_avg_d: Tensor, qscale: Tensor | None = None) -> None:
        """Writes tensor ``i``'s ``m`` and ``D`` from checked values in either format
        (float, or 8-bit codes with their ``qscale``), converting to this bucket's:
        8-bit codes laid out as this bucket's are copied as they are (a checkpoint
        round-trips exactly), others decoded (in their own memory order) and encoded."""
        m_view, d_view = self.exp_avg_views[i], self.exp_avg_d_views[i]
        if exp_avg.dtype == torch.uint8:
            assert qscale is not None
            exp_avg, exp_avg_d, qscale = (t.to(self.device) for t in (exp_avg, exp_avg_d, qscale))
            if self.quantized and exp_avg.stride() == m_view.stride() and exp_avg_d.stride() == d_view.stride():
                assert self.qscale_views is not None
                m_view.copy_(exp_avg)
                d_view.copy_(exp_avg_d)
                self.qscale_views[i].copy_(qscale)
                return
            exp_avg, exp_avg_d = quant.dequantize(exp_avg, exp_avg_d, qscale)
        if not self.quantized:
            m_view.copy_(exp_avg)
            d_view.copy_(exp_avg_d)
            return
        assert self.qscale_views is not None
        m = torch.empty_like(m_view, dtype=torch.float32).copy_(exp_avg)  # the codes' layout
        d = torch.empty_like(d_view, dtype=torch.float32).copy_(exp_avg_d)
        quant.quantize_into(m, d, m_view, d_view, self.qscale_views[i])

    def curvature_scale(self, idx: Sequence[int]) -> Tensor:
        """float64 ``[len(idx)]``: the curvature scale ``dscale`` of tensors ``idx`` from
        their stored ``D`` (:func:`esgdm.rule.curvature_scale`)."""
        if self.qscale_views is not None:
            return quant.curvature_scale([self.exp_avg_d_views[i] for i in idx],
                                         [self.qscale_views[i] for i in idx])
        return curvature_scale([self.exp_avg_d_views[i] for i in idx])

    def reset_state(self, i: int | None = None) -> None:
        """Zeroes tensor ``i``'s state (every tensor's when None)."""
        targets = range(len(self)) if i is None else [i]
        for j in targets:
            self.exp_avg_views[j].fill_(quant.M_ZERO if self.quantized else 0)
            self.exp_avg_d_views[j].zero_()
            if self.qscale_views is not None:
                self.qscale_views[j].zero_()
        rows = slice(None) if i is None else slice(i, i + 1)
        self.scalars[rows, BIAS] = 1.0
        self.scalars[rows, WARM] = 1.0
        self.scalars[rows, STEPS] = 0.0
        self.scalars[rows, DSCALE] = 0.0

    def nbytes(self) -> int:
        """Bytes of optimizer state held (m, D, 8-bit state's block scales and the
        per-tensor scalars)."""
        scales = self.qscale.numel() * 4 if self.quantized else 0
        return 2 * self.total * self.state_dtype.itemsize + scales + self.scalars.numel() * 8

    def __repr__(self) -> str:
        return (
            f"Bucket(device={self.device}, dtype={self.dtype}, state={self.state_dtype}, "
            f"tensors={len(self)}, elements={sum(self.numels)}, "
            f"state={self.nbytes() / 2**20:.1f} MiB)"
        )


# Index tables whose values are known on the host (built by Bucket.index, or read once
# by esgdm.ops): ``esgdm::step_`` then checks their bounds without reading the device.
_INDEX_BOUNDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


def note_index_bounds(table: Tensor, max_slot: int, max_group: int) -> None:
    """Records that every entry of the int32 ``[n, 2]`` ``table`` is >= 0, its slots at
    most ``max_slot`` and its groups at most ``max_group`` (until it is written to)."""
    if _compiling():
        return  # a traced table is not the tensor the operator will see
    try:
        _INDEX_BOUNDS[table] = (table._version, max_slot, max_group)
    except RuntimeError:  # an inference tensor has no version counter: not recorded
        pass


def index_bounds(table: Tensor) -> tuple[int, int] | None:
    """``(max_slot, max_group)`` of a table recorded by :func:`note_index_bounds` and not
    written to since, else None."""
    known = _INDEX_BOUNDS.get(table)
    if known is None:
        return None
    try:
        version = table._version
    except RuntimeError:  # pragma: no cover - never recorded
        return None
    return known[1:] if known[0] == version else None


#: The bucket that owns each ``exp_avg`` buffer, by the buffer's id (see own_state_views).
_OWNERS: weakref.WeakValueDictionary[int, Bucket] = weakref.WeakValueDictionary()


def own_state_views(params: Sequence[Tensor], exp_avg: Tensor, exp_avg_d: Tensor,
                    offsets: Sequence[int]) -> tuple[list[Tensor], list[Tensor]] | None:
    """The state views a bucket already holds, when ``exp_avg`` and ``exp_avg_d`` are its
    float buffers and ``params`` are laid out at ``offsets`` as its tensors are: what
    ``esgdm::step_flat_`` would cut again on every compiled step (about 1 us a view).
    None otherwise."""
    b = _OWNERS.get(id(exp_avg))
    if (b is None or b.exp_avg is not exp_avg or b.exp_avg_d is not exp_avg_d or b.quantized
            or not b.all_dense or not params or params[0].device != b.device or list(offsets) != b.offsets
            or list(map(Tensor.stride, params)) != b.strides or list(map(_shape_of, params)) != b.shapes):
        return None
    return b.exp_avg_views, b.exp_avg_d_views


_shape_of = operator.attrgetter("shape")


def build_buckets(param_groups: Sequence[dict], state_dtype: torch.dtype | None = None) -> list[Bucket]:
    """Groups every parameter of ``param_groups`` into buckets by (device, dtype, state
    dtype): with ``state_dtype=torch.uint8`` the tensors too small for 8-bit state
    (:data:`esgdm.dtypes.STATE_OPTIONS`) and FSDP2 shards (below) get buckets of their own.
    Complex parameters too: their state is shown as complex views of the flat buffers,
    and ``torch.save`` refuses a storage seen as two dtypes (and the real buckets keep
    the C++ plan, which steps no complex views)."""
    members: dict[tuple, tuple[list[Tensor], list[int]]] = {}
    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            t = real_view(local(p))
            asked = state_dtype
            if asked == torch.uint8 and is_dtensor(p):
                # The block scales of a shard are not a tensor torch.distributed.checkpoint
                # could save and reshard (their number follows the local shard's size, not
                # the parameter's shape): FSDP2 shards keep float32 state.
                asked = None
            key = (t.device, t.dtype, state_dtype_for(t.dtype, asked, t.numel()), p.is_complex())
            params, groups = members.setdefault(key, ([], []))
            params.append(p)
            groups.append(gi)
    return [Bucket(params, groups, key[2]) for key, (params, groups) in members.items()]


def bytes_moved(numel: int, d_step: bool, param_bytes: int = 4, state_bytes: int = 4) -> int:
    """Bytes the fused step moves for ``numel`` elements.

    Plain step: read p, g, m, D and write p, m.  D-step: also read h and write D.
    With fp32 everything this is 24 and 32 bytes per element; bf16 parameters with
    bf16 state move 12 and 16.
    """
    per_elem = 3 * param_bytes + 3 * state_bytes  # p (r+w), g (r); m (r+w), D (r)
    if d_step:
        per_elem += param_bytes + state_bytes  # h (r), D (w)
    return numel * per_elem


__all__ = [
    "ALIGN_BYTES", "Bucket", "build_buckets", "bytes_moved", "index_bounds", "is_dense", "is_dtensor",
    "local", "note_index_bounds", "overlaps", "own_state_views", "real_view", "same_layout", "shared_memory",
    "state_strides",
]
