"""What one optimizer step costs: esgdm's backends against torch.optim, interleaved.

Every competitor steps the same parameters in the same process, and the repeats are
interleaved (competitor A, B, C, ..., then A, B, C, ... again, the order rotated each
round), so a slow-down from a noisy neighbour lands on all of them alike.

Competitors (whatever can run here; the rest are listed with the reason):

* ESGD-M through ``esgdm.ESGDM(..., backend=name)`` for every available backend:
  ``plain`` (a step without curvature refresh, what 9 steps in 10 cost) and
  ``dstep+hvp`` (a D-step: Rademacher draw, Hessian-vector product and update);
* the same backends called directly (``esgdm.backends.get(name).step``):
  ``plain_kernel`` and ``dstep_kernel`` (HVP excluded, the HVPs are given);
* the ``"torch"`` rule under ``torch.compile`` (kernel level; see :func:`compiled_rule`);
* ``loop``: a per-parameter Python loop like the original implementation
  (``baseline_loop.py``), at both levels;
* ``torch.optim.AdamW`` (foreach, fused) and ``torch.optim.SGD`` with momentum
  (foreach, fused);
* ``copy``: a device-to-device copy moving as many bytes as an fp32 plain ESGD-M step,
  the bandwidth every row is compared with (``% copy``), and ``add_``, an in-place
  add over the same bytes (``% add_``; on a CPU it is the faster of the two, because
  a copy also reads every destination line before writing it).

Sweeps: total size (1M-64M on CPU, 1M-1B on GPU), tensor count (``few``: 4 tensors;
``transformer``: GPT-2 small's 148 shapes scaled in width; ``many``: 4096 equal small
tensors) and dtype (fp32, bf16).  Configurations too big for memory all at once are
measured in groups, each with its own copy rows.

The HVP in ``dstep+hvp`` is that of a separable quadratic (``0.5 * sum(p * p)``), the
cheapest HVP there is, so those rows show the optimizer's own share of a D-step; in a
real network the HVP costs about one more backward pass (see ``bench_train.py``).

GB/s counts each optimizer's minimal memory traffic per element: ESGD-M by
``esgdm.buckets.bytes_moved`` (24 B plain, 32 B D-step in fp32), AdamW
``3 * param + 4 * state`` bytes, SGD with momentum ``3 * param + 2 * state`` bytes.

    python benchmarks/bench_step.py                 # default sweep for the device
    python benchmarks/bench_step.py --quick         # < 2 min on 2 CPU cores
    python benchmarks/bench_step.py --json out.json --plot step.png --markdown step.md
    python benchmarks/bench_step.py --render out.json --markdown step.md   # no measuring
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baseline_loop import LoopESGDM, loop_step  # noqa: E402
from benchutil import (  # noqa: E402
    Clock,
    dtype_name,
    fmt,
    fmt_size,
    free_bytes,
    machine,
    markdown_table,
    parse_dtypes,
    parse_size,
    pick_device,
    save_png,
    sync,
)

import esgdm  # noqa: E402
from esgdm import backends  # noqa: E402
from esgdm.buckets import Bucket, bytes_moved  # noqa: E402

LR = 1e-3            # small enough that repeated steps on fixed gradients stay finite
BETAS = (0.9, 0.999)
EPS = 1e-4
NEVER = 10**12       # update_d_every that never comes round
STEP_KINDS = ("plain", "plain_kernel", "dstep_kernel", "dstep+hvp")


# --------------------------------------------------------------------------- shapes

def gpt2_shapes(d: int, layers: int = 12) -> list[tuple[int, ...]]:
    """The parameter shapes of GPT-2 small (148 tensors) at width ``d`` (768 in GPT-2),
    with vocabulary and context scaled in proportion."""
    vocab, ctx = round(50257 / 768 * d), round(1024 / 768 * d)
    per_layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                 (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d)] + per_layer * layers + [(d,), (d,)]


def shapes_for(kind: str, numel: int, many: int) -> list[tuple[int, ...]]:
    """Tensor shapes adding up to about ``numel`` elements.

    few: 4 equal tensors.  transformer: GPT-2 small's 148 shapes at the width that
    fits (big matrices next to many small vectors).  many: ``many`` equal small tensors.
    mixed: 60 tensors whose sizes grow geometrically over three decades (the issues'
    "about 60 tensors of mixed sizes" setting).
    """
    if kind == "few":
        return [(max(1, numel // 4),)] * 4
    if kind == "mixed":
        weights = [10 ** (3 * k / 59) for k in range(60)]
        scale = numel / sum(weights)
        return [(max(1, round(w * scale)),) for w in weights]
    if kind == "many":
        return [(max(1, numel // many),)] * many
    if kind == "transformer":
        lo, hi = 1, 1 << 16
        while lo < hi:  # largest width whose total does not exceed numel
            mid = (lo + hi + 1) // 2
            if sum(math.prod(s) for s in gpt2_shapes(mid)) <= numel:
                lo = mid
            else:
                hi = mid - 1
        return gpt2_shapes(lo)
    raise SystemExit(f"unknown shape set {kind!r}; choose from few, transformer, many, mixed")


# ------------------------------------------------------------------- the work setup

class Workload:
    """Parameters, gradients and HVPs that every competitor of one configuration shares."""

    def __init__(self, shapes, dtype, device, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)  # drawn where they live
        self.device, self.dtype, self.shapes = device, dtype, shapes

        def rand(shape):
            return torch.randn(shape, generator=gen, device=device).to(dtype)

        self.params = [rand(s).requires_grad_() for s in shapes]
        self.grads = [rand(s) for s in shapes]
        self.hvps = [rand(s) for s in shapes]
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.numel = sum(p.numel() for p in self.params)
        self._kernel_state: Bucket | None = None

    @property
    def pbytes(self) -> int:
        return self.params[0].element_size()

    def kernel_state(self) -> Bucket:
        """Flat fp32 ``m``/``D`` laid out exactly as ESGDM's buckets, shared by every
        kernel-level row (their values only need to stay finite)."""
        if self._kernel_state is None:
            b = Bucket(self.params, [0] * len(self.params))
            b.exp_avg_d.fill_(1.0)
            self._kernel_state = b
        return self._kernel_state

    def scalars(self) -> torch.Tensor:
        """The per-tensor table of the per-parameter loop baseline (beta1, beta2, eps,
        step_scale, decay)."""
        row = [BETAS[0], BETAS[1], EPS, LR, 1.0]
        return torch.tensor([row] * len(self.params), dtype=torch.float64)

    def op_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scalars, index, hparams)`` of the ``esgdm::step_`` op for the kernel rows:
        the bucket's device-resident per-tensor state and one group's hyper-parameters."""
        b = self.kernel_state()
        hparams = torch.tensor([[LR, BETAS[0], BETAS[1], 0.99, EPS, 0.0]], dtype=torch.float64,
                               device=self.device)
        return b.scalars, b.index(None), hparams

    def install_graph_grads(self) -> None:
        """Sets every ``p.grad`` to the gradient of ``0.5 * sum(p * p)`` with its graph."""
        with torch.enable_grad():
            loss = sum((p * p).sum() for p in self.params) * 0.5
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
        for p, g in zip(self.params, grads):
            p.grad = g

    def restore_grads(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def base_bytes(self) -> int:
        return self.numel * (3 * self.pbytes + 8)


# --------------------------------------------------------------------- competitors

@dataclass
class Row:
    """One line of results: a callable to time and what it stands for."""
    optimizer: str
    impl: str
    step_kind: str
    bytes_per_elem: int
    run: Callable[[], object]
    prepare: Callable[[], object] | None = None  # untimed, before each call
    finish: Callable[[], object] | None = None   # untimed, after each call
    samples: list = field(default_factory=list)
    inner: int = 1
    extra: dict = field(default_factory=dict)


class Family:
    """Rows that share one setup (one optimizer instance, one compiled function)."""
    name = "?"

    def __init__(self, w: Workload):
        self.w = w
        self.rows: list[Row] = []

    def est_bytes(self) -> int:
        return 0

    def setup(self) -> None:
        """Allocates state and builds :attr:`rows` (raising skips the family)."""

    def teardown(self) -> None:
        self.rows = []


def esgdm_bytes(w: Workload, d_step: bool, state_bytes: int = 4) -> int:
    return bytes_moved(1, d_step, param_bytes=w.pbytes, state_bytes=state_bytes)


class EsgdmOpt(Family):
    """``esgdm.ESGDM(params, backend=name)``: rows ``plain`` and ``dstep+hvp`` (with
    ``state_dtype``, the impl is labelled ``name+<dtype> state``)."""

    def __init__(self, w, backend, state_dtype: torch.dtype | None = None, nearest: bool = False):
        super().__init__(w)
        self.backend, self.state_dtype, self.nearest = backend, state_dtype, nearest
        self.impl = backend if state_dtype is None else f"{backend}+{dtype_name(state_dtype)} state"
        if nearest:  # 16-bit parameters rounded to nearest (as torch.optim does), not stochastically
            self.impl += "+nearest"
        self.name = f"ESGD-M/{self.impl}"

    def est_bytes(self):
        # state + on a D-step: graph grads, signs, HVPs, h*h temporaries
        return self.w.numel * (8 + 4 * self.w.pbytes + 8)

    def setup(self):
        w = self.w
        self.opt = esgdm.ESGDM(w.params, lr=LR, betas=BETAS, eps=EPS, d_warmup=1,
                               update_d_every=NEVER, backend=self.backend, state_dtype=self.state_dtype,
                               **({"stochastic_rounding": False} if self.nearest else {}))
        w.install_graph_grads()  # the first step is a D-step
        self.opt.step()
        w.restore_grads()

        def force_d_step():
            w.install_graph_grads()
            self.opt.steps_since_d = self.opt.update_d_every

        sb = 4 if self.state_dtype is None else self.state_dtype.itemsize
        self.rows = [
            Row("ESGD-M", self.impl, "plain", esgdm_bytes(w, False, sb), self.opt.step),
            Row("ESGD-M", self.impl, "dstep+hvp", esgdm_bytes(w, True, sb), self.opt.step,
                prepare=force_d_step, finish=w.restore_grads),
        ]

    def teardown(self):
        super().teardown()
        self.opt = None


class EsgdmKernel(Family):
    """``esgdm.backends.get(name).step`` alone: ``plain_kernel`` and ``dstep_kernel``."""

    def __init__(self, w, backend):
        super().__init__(w)
        self.backend = backend
        self.name = f"ESGD-M/{backend} kernel"

    def est_bytes(self):
        return self.w.numel * 8  # temporaries of the slowest (torch) backend, roughly

    def setup(self):
        w, b = self.w, backends.get(self.backend)
        st = w.kernel_state()
        ms, ds = st.exp_avg_views, st.exp_avg_d_views
        sc, index, hp = w.op_tables()
        self.rows = [
            Row("ESGD-M", self.backend, "plain_kernel", esgdm_bytes(w, False),
                lambda: b.step(w.params, w.grads, ms, ds, None, sc, index, hp, None, None, 0, 0)),
            Row("ESGD-M", self.backend, "dstep_kernel", esgdm_bytes(w, True),
                lambda: b.step(w.params, w.grads, ms, ds, w.hvps, sc, index, hp, None, None, 0, 0)),
        ]


def compiled_rule(ps, gs, ms, ds, hs, scales, decays, beta1: float, beta2: float, eps: float):
    """The element-wise ESGD-M rule, one tensor at a time, for ``torch.compile``.

    Same arithmetic as the ``"torch"`` backend.  The difference is that the per-tensor
    step sizes and decays come in as 1-D tensors: the backend passes them as Python
    floats, which torch.compile specialises on, so compiling the backend as it is
    recompiles on every step (its step size changes every step).
    """
    for i in range(len(ps)):
        p, m, d = ps[i], ms[i], ds[i]
        g = gs[i].to(m.dtype)
        m.lerp_(g, 1 - beta1)
        if hs is not None:
            h = hs[i].to(m.dtype)
            d.copy_(torch.maximum(d * beta2, h * h))
        mhat = torch.lerp(m, g, 1 - beta1)
        x = p.to(m.dtype) * decays[i] - scales[i] * mhat / (d.sqrt() + eps)
        p.copy_(x)


class CompiledTorch(Family):
    """:func:`compiled_rule` under ``torch.compile``: ``plain_kernel`` and ``dstep_kernel``."""
    name = "ESGD-M/torch+compile"

    def est_bytes(self):
        return self.w.numel * 8

    def setup(self):
        w = self.w
        st = w.kernel_state()
        ms, ds = st.exp_avg_views, st.exp_avg_d_views
        n = len(w.params)
        scales = torch.full((n,), LR, device=w.device)
        decays = torch.ones(n, device=w.device)
        # A fresh, static compile per configuration: what a user with fixed shapes gets,
        # and no silent fallback to eager when the recompile limit is reached.
        torch._dynamo.reset()
        fn = torch.compile(compiled_rule, dynamic=False)
        self.rows = []
        for kind, hs in (("plain_kernel", None), ("dstep_kernel", w.hvps)):
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(2):
                    fn(w.params, w.grads, ms, ds, hs, scales, decays, BETAS[0], BETAS[1], EPS)
            sync(w.device)
            row = Row("ESGD-M", "torch+compile", kind, esgdm_bytes(w, hs is not None),
                      lambda hs=hs: fn(w.params, w.grads, ms, ds, hs, scales, decays,
                                       BETAS[0], BETAS[1], EPS))
            # compile + 2 calls; inductor's on-disk cache can serve a graph seen before
            row.extra["compile_s"] = round(time.perf_counter() - t0, 1)
            self.rows.append(row)


class LoopOpt(Family):
    """The per-parameter loop baseline: ``plain``, ``dstep+hvp`` (LoopESGDM) and
    ``dstep_kernel`` (:func:`loop_step`)."""
    name = "ESGD-M/loop"

    def est_bytes(self):
        biggest = max(p.numel() for p in self.w.params)
        return self.w.numel * (8 + 4 * self.w.pbytes) + biggest * 16

    def setup(self):
        w = self.w
        self.opt = LoopESGDM(w.params, lr=LR, betas=BETAS, eps=EPS, d_warmup=1,
                             update_d_every=NEVER)
        w.install_graph_grads()
        self.opt.step()
        w.restore_grads()
        st = w.kernel_state()
        ms, ds, sc = st.exp_avg_views, st.exp_avg_d_views, w.scalars()

        def force_d_step():
            w.install_graph_grads()
            self.opt.steps_since_d = self.opt.update_d_every

        self.rows = [
            Row("ESGD-M", "loop", "plain", esgdm_bytes(w, False), self.opt.step),
            Row("ESGD-M", "loop", "dstep_kernel", esgdm_bytes(w, True),
                lambda: loop_step(w.params, w.grads, ms, ds, w.hvps, sc)),
            Row("ESGD-M", "loop", "dstep+hvp", esgdm_bytes(w, True), self.opt.step,
                prepare=force_d_step, finish=w.restore_grads),
        ]

    def teardown(self):
        super().teardown()
        self.opt = None


class TorchOptim(Family):
    """A ``torch.optim`` optimizer in one implementation (``foreach=True``/``fused=True``)."""

    def __init__(self, w, cls, impl, state_tensors, **kwargs):
        super().__init__(w)
        self.cls, self.impl, self.kwargs = cls, impl, kwargs
        self.state_tensors = state_tensors
        self.name = f"{cls.__name__}/{impl}"

    def est_bytes(self):
        return self.w.numel * self.w.pbytes * (self.state_tensors + 2)

    def setup(self):
        self.opt = self.cls(self.w.params, lr=LR, **{self.impl: True}, **self.kwargs)
        self.opt.step()  # creates the state
        pb = self.w.pbytes
        traffic = 3 * pb + 2 * self.state_tensors * pb  # state has the parameters' dtype
        self.rows = [Row(self.cls.__name__, self.impl, "plain", traffic, self.opt.step)]

    def teardown(self):
        super().teardown()
        self.opt = None


class Copy(Family):
    """The reference bandwidths, over buffers as large as an fp32 plain ESGD-M step moves
    (capped): ``copy`` is ``dst.copy_(src)`` (8 bytes counted per element, the spec's
    device-to-device copy) and ``add_`` is ``a.add_(b)`` (12 bytes counted: read a and
    b, write a).  On a CPU a copy also reads every destination line before writing it
    (write-allocate), traffic that is not counted, so an optimizer step, which only
    writes lines it has just read, can beat the copy; ``add_`` has the step's pattern.
    """
    name = "copy"

    def __init__(self, w, cap_bytes):
        super().__init__(w)
        self.n = max(1, min(bytes_moved(w.numel, False) // 2, cap_bytes) // 4)

    def est_bytes(self):
        return 8 * self.n

    def setup(self):
        src = torch.full((self.n,), 1e-3, device=self.w.device)
        dst = torch.zeros_like(src)
        # bytes per element of the workload, so GB/s comes out of the same formula
        per = self.n / self.w.numel
        self.rows = [Row("copy", "copy", "copy", 8 * per, lambda: dst.copy_(src)),
                     Row("copy", "add_", "add_", 12 * per, lambda: dst.add_(src))]


# ----------------------------------------------------------------------- the sweep

def available_backends(device, dtype, notes: dict) -> list[str]:
    """Every esgdm backend that can step ``dtype`` on ``device``; reasons for the rest."""
    names = []
    for name in backends.BACKEND_NAMES:
        if name == "auto":
            continue
        reason = backends.get(name).why_not(device, dtype)
        if reason is None:
            names.append(name)
        else:
            notes.setdefault(f"esgdm backend {name!r} skipped for {dtype_name(dtype)} on {device.type}",
                             reason)
    return names


def families_for(w: Workload, args, notes: dict) -> list[Family]:
    fams: list[Family] = []
    for name in available_backends(w.device, w.dtype, notes):
        fams.append(EsgdmOpt(w, name))
        if w.dtype == torch.bfloat16 and name != "torch":  # compact state for 16-bit weights
            fams.append(EsgdmOpt(w, name, state_dtype=torch.bfloat16))
            # what AdamW(fused=True) does with bf16 weights: bf16 state, rounded to nearest
            fams.append(EsgdmOpt(w, name, state_dtype=torch.bfloat16, nearest=True))
        fams.append(EsgdmKernel(w, name))
    if args.compile == "off":
        notes.setdefault("torch.compile rows skipped", args.compile_off_reason)
    elif len(w.params) > args.compile_max_tensors:
        notes.setdefault(
            f"torch.compile rows skipped above {args.compile_max_tensors} tensors",
            "compile time grows with the tensor count (on a 2-core CPU 50-70 s per "
            "kernel for GPT-2's 148 tensors, minutes for thousands); "
            "--compile-max-tensors 256 includes the transformer shapes")
    else:
        fams.append(CompiledTorch(w))
    fams.append(LoopOpt(w))
    fams.append(TorchOptim(w, torch.optim.AdamW, "foreach", 2))
    fams.append(TorchOptim(w, torch.optim.AdamW, "fused", 2))
    fams.append(TorchOptim(w, torch.optim.SGD, "foreach", 1, momentum=0.9))
    fams.append(TorchOptim(w, torch.optim.SGD, "fused", 1, momentum=0.9))
    if args.only:
        keep = re.compile(args.only)
        fams = [f for f in fams if keep.search(f.name)]
    cap = 1 << 30 if w.device.type == "cuda" else 256 << 20
    fams.append(Copy(w, cap))  # always: every %copy needs it
    return fams


def split_by_memory(fams: list[Family], budget: int) -> list[list[Family]]:
    """Groups of families that fit in ``budget`` bytes together, each with the copy.

    Families of one group are set up together and interleaved; a configuration too big
    for everything at once is measured group by group (each with its own copy row)."""
    copy = fams[-1]
    groups, cur, used = [], [], copy.est_bytes()
    for f in fams[:-1]:
        if cur and used + f.est_bytes() > budget:
            groups.append(cur + [copy])
            cur, used = [], copy.est_bytes()
        cur.append(f)
        used += f.est_bytes()
    groups.append(cur + [copy])
    return groups


def measure(row: Row, clock: Clock, n: int) -> float:
    """Milliseconds per call of ``row.run`` (``prepare``/``finish`` are not timed)."""
    with torch.no_grad():
        if row.prepare is None:
            return clock.ms(row.run, n)
        total = 0.0
        for _ in range(n):
            row.prepare()
            total += clock.ms(row.run, 1)
            row.finish()
        return total / n


def run_config(shape_set, numel_target, dtype, device, args, notes, progress) -> list[dict]:
    shapes = shapes_for(shape_set, numel_target, args.many)
    w = Workload(shapes, dtype, device)
    clock = Clock(device)
    fams = families_for(w, args, notes)
    budget = int(0.6 * free_bytes(device)) - w.base_bytes()
    groups = split_by_memory(fams, budget)
    if len(groups) > 1:
        notes.setdefault(f"{shape_set} {fmt_size(w.numel)} {dtype_name(dtype)}",
                         f"measured in {len(groups)} groups to fit in memory")
    results = []
    for gi, group in enumerate(groups):
        rows: list[Row] = []
        for fam in group:
            try:
                fam.setup()
            except Exception as e:  # noqa: BLE001 - an implementation that cannot run is a skip
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                notes.setdefault(f"{fam.name} skipped for {dtype_name(dtype)} on {device.type}",
                                 f"{type(e).__name__}: {msg}")
                fam.teardown()
                continue
            rows += fam.rows
        if w.numel > args.hvp_max:
            notes.setdefault(f"dstep+hvp rows skipped above {fmt_size(args.hvp_max)} elements",
                             "their cost grows linearly and is dominated by the HVP and the "
                             "random signs (raise --hvp-max to include them)")
            rows = [r for r in rows if r.step_kind != "dstep+hvp"]
        # warm up, then pick how many calls make one sample
        for row in rows:
            if row.prepare is None:
                measure(row, clock, 1)
            t = measure(row, clock, 1)
            row.inner = max(1, min(args.max_inner, round(args.target_ms / max(t, 1e-3))))
        for r in range(args.repeats):
            k = r % len(rows)
            for row in rows[k:] + rows[:k]:
                row.samples.append(measure(row, clock, row.inner))
            progress(f"{shape_set} {fmt_size(w.numel)} {dtype_name(dtype)}: round {r + 1}/{args.repeats}")
        copy_gbps, add_gbps = (
            next(r for r in rows if r.impl == impl).bytes_per_elem * w.numel
            / statistics.median(next(r for r in rows if r.impl == impl).samples) / 1e6
            for impl in ("copy", "add_"))
        for row in rows:
            s = sorted(row.samples)
            ms = statistics.median(s)
            q1, q3 = _quantile(s, 0.25), _quantile(s, 0.75)
            gbps = row.bytes_per_elem * w.numel / ms / 1e6
            results.append(dict(
                optimizer=row.optimizer, impl=row.impl, device=device.type,
                dtype=dtype_name(dtype), numel=w.numel, ntensors=len(w.params),
                shape_set=shape_set, step_kind=row.step_kind, ms=ms, ms_p25=q1, ms_p75=q3,
                ms_min=s[0], ms_max=s[-1], spread_pct=100 * (q3 - q1) / ms,
                gbps=gbps, copy_gbps=copy_gbps, pct_copy=100 * gbps / copy_gbps,
                add_gbps=add_gbps, pct_add=100 * gbps / add_gbps,
                bytes_per_elem=row.bytes_per_elem, repeats=len(s), calls_per_sample=row.inner,
                group=gi, **row.extra,
            ))
        for fam in group:
            fam.teardown()
    del w
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _quantile(s: list[float], q: float) -> float:
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ------------------------------------------------------------------------ reporting

def label(r: dict) -> str:
    if r["optimizer"] == "ESGD-M":
        return f"ESGD-M {r['impl']}"
    if r["optimizer"] == "copy":
        return r["impl"]
    return f"{r['optimizer']} {r['impl']}"


def detail_table(rows: list[dict]) -> str:
    """Every row of one configuration, with time relative to AdamW foreach."""
    ref = next((r["ms"] for r in rows if r["optimizer"] == "AdamW" and r["impl"] == "foreach"), None)
    body = []
    for r in rows:
        body.append([
            label(r) + (f" (first calls {r['compile_s']:.1f} s)" if "compile_s" in r else ""),
            r["step_kind"], fmt(r["ms"]), f"{r['spread_pct']:.0f}%", fmt(r["gbps"]),
            f"{r['pct_copy']:.0f}%", f"{r['pct_add']:.0f}%",
            "" if ref is None else f"{r['ms'] / ref:.2f}x",
        ])
    return markdown_table(["implementation", "step", "ms (median)", "IQR", "GB/s", "% copy",
                           "% add_", "vs AdamW foreach"], body, align="llrrrrrr")


def summary_table(results: list[dict], kind: str) -> str:
    """One line per configuration, one column per implementation (median ms)."""
    esgdm_kinds = {"plain": ("plain", "plain_kernel"), "dstep": ("dstep_kernel",),
                   "dstep+hvp": ("dstep+hvp",)}[kind]
    configs, cols = {}, []
    for r in results:
        key = (r["dtype"], r["shape_set"], r["ntensors"], r["numel"])
        if r["optimizer"] == "ESGD-M":
            if r["step_kind"] not in esgdm_kinds:
                continue
        elif kind != "plain" or r["optimizer"] == "copy":
            continue
        name = label(r) + (" (kernel)" if r["step_kind"] == "plain_kernel" else "")
        if name not in cols:
            cols.append(name)
        configs.setdefault(key, {})[name] = r
    body = []
    for (dt, ss, nt, n), row in configs.items():
        copy = next(r for r in results if (r["dtype"], r["shape_set"], r["numel"]) == (dt, ss, n)
                    and r["optimizer"] == "copy")
        best_bw = max(copy["copy_gbps"], copy["add_gbps"])
        floor = bytes_moved(n, kind != "plain", 2 if dt in ("bf16", "fp16") else 4, 4) \
            / best_bw / 1e6
        body.append([dt, f"{ss} ({nt})", fmt_size(n), fmt(floor)]
                    + [fmt(row[c]["ms"]) if c in row else "" for c in cols])
    return markdown_table(["dtype", "tensors", "elements", "floor"] + cols, body,
                          align="lllr" + "r" * len(cols))


def markdown_report(results, meta, notes) -> str:
    out = [f"Machine: {meta['machine']}  ", f"Command: `{meta['command']}`"
           + (f" ({meta['seconds']} s)  " if "seconds" in meta else "  "),
           f"Repeats: {meta['repeats']} interleaved rounds per row; times are medians in ms "
           "per step; IQR is the inter-quartile range over the rounds, relative to the median.", ""]
    out += ["'floor': the spec's byte count for the step (24 B/element plain, 32 B D-step, "
            "fp32; 18 and 24 B with bf16 parameters) over the better of two bandwidths measured "
            "in the same run, a copy (`dst.copy_(src)`) and an in-place add (`a.add_(b)`). "
            "GB/s counts each optimizer's own minimal traffic (ESGD-M as the spec, AdamW "
            "3 param + 4 state, SGD 3 param + 2 state). On a CPU a copy also reads each "
            "destination line before it writes it (uncounted), so a step can exceed 100% of "
            "copy; the in-place add has the step's read-modify-write pattern.", ""]
    for kind, title in (("plain", "Plain step (ms): ESGD-M through ESGDM.step() and its bare "
                                  "kernel ('(kernel)') vs torch.optim"),
                        ("dstep", "D-step kernel (ms), HVP excluded"),
                        ("dstep+hvp", "D-step through ESGDM.step() (ms), including the "
                                      "Rademacher draw and the HVP of a separable quadratic")):
        out += [f"#### {title}", "", summary_table(results, kind), ""]
    if notes:
        out += ["Skipped or adapted:", ""] + [f"* {k}: {v}" for k, v in notes.items()] + [""]
    out += ["<details><summary>Every row</summary>", ""]
    for key in _configs(results):
        rows = [r for r in results if _key(r) == key]
        out += [f"**{key[0]}, {key[1]} ({rows[0]['ntensors']} tensors), {fmt_size(key[2])} elements: "
                f"copy {rows[0]['copy_gbps']:.1f} GB/s, add_ {rows[0]['add_gbps']:.1f} GB/s**", "",
                detail_table(rows), ""]
    out += ["</details>", ""]
    return "\n".join(out)


def _key(r):
    return (r["dtype"], r["shape_set"], r["numel"])


def _configs(results):
    seen = []
    for r in results:
        if _key(r) not in seen:
            seen.append(_key(r))
    return seen


def plot(results, path, meta) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    dtypes = sorted({r["dtype"] for r in results}, key=["fp32", "bf16", "fp16", "fp64"].index)
    sets = [s for s in ("few", "transformer", "many", "mixed") if any(r["shape_set"] == s for r in results)]
    fig, axes = plt.subplots(len(dtypes), len(sets), figsize=(4.2 * len(sets), 3.4 * len(dtypes)),
                             squeeze=False, sharex=True)
    for i, dt in enumerate(dtypes):
        for j, ss in enumerate(sets):
            ax = axes[i][j]
            rs = [r for r in results if r["dtype"] == dt and r["shape_set"] == ss]
            lines: dict[str, list] = {}
            for r in rs:
                if r["optimizer"] == "ESGD-M" and r["step_kind"] != "plain":
                    continue
                lines.setdefault(label(r), []).append((r["numel"], r["gbps"]))
            for name, pts in lines.items():
                pts.sort()
                style = "--" if name in ("copy", "add_") else (
                    "-" if name.startswith("ESGD-M") else ":")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3,
                        label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{dt}, {ss} ({rs[0]['ntensors'] if rs else '?'} tensors)", fontsize=9)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("GB/s (own minimal traffic)")
            if i == len(dtypes) - 1:
                ax.set_xlabel("elements")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Plain optimizer step, bandwidth by byte count - {meta['machine']}", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    ap.add_argument("--sizes", help="total elements, e.g. 1M,4M,16M,64M "
                    "(default 1M..64M on CPU, 1M..1B on GPU)")
    ap.add_argument("--shapes", default="few,transformer,many",
                    help="shape sets: few (4 tensors), transformer (GPT-2 small's 148 shapes), "
                         "many (--many equal tensors), mixed (60 tensors over three decades of size)")
    ap.add_argument("--many", type=int, default=4096, help="tensor count of the 'many' set")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds per row")
    ap.add_argument("--target-ms", type=float, default=25.0,
                    help="calls per sample are chosen so that one sample takes about this long")
    ap.add_argument("--max-inner", type=int, default=50)
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="torch.compile rows (auto: on, except in --quick/--smoke)")
    ap.add_argument("--compile-max-tensors", type=int, default=None,
                    help="no torch.compile rows for more tensors than this (default 8: "
                         "compile time grows with the count, about a minute per kernel for "
                         "148 tensors on a 2-core CPU)")
    ap.add_argument("--hvp-max", default=None,
                    help="no dstep+hvp rows above this many elements (default 16M on CPU, "
                         "no limit on GPU)")
    ap.add_argument("--only", help="regex: keep only competitors whose name matches "
                    "(e.g. 'ESGD-M|AdamW'); the copy row always runs")
    ap.add_argument("--quick", action="store_true", help="small sweep, under 2 minutes on 2 CPU cores")
    ap.add_argument("--smoke", action="store_true", help="tiny sweep that only checks that it runs")
    ap.add_argument("--json", help="write every row as JSON to this path")
    ap.add_argument("--markdown", help="write the tables as markdown to this path")
    ap.add_argument("--plot", help="write a PNG to this path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render", metavar="JSON",
                    help="measure nothing: rewrite --markdown/--plot from a saved --json file")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (on a shared CPU, 1 avoids stalls at every "
                         "parallel region when a neighbour holds the other cores)")
    return ap


def write_outputs(args, results, meta, notes) -> None:
    if args.json and not args.render:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, notes=notes, rows=results), f, indent=1)
    if args.plot:
        plot(results, args.plot, meta)
    if args.markdown:
        text = markdown_report(results, meta, notes)
        if args.plot:
            where = os.path.dirname(os.path.abspath(args.markdown))
            text += f"\n![step cost]({os.path.relpath(os.path.abspath(args.plot), where)})\n"
        with open(args.markdown, "w") as f:
            f.write(text)


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        write_outputs(args, saved["rows"], saved["meta"], saved["notes"])
        return saved["rows"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.smoke:
        sizes, args.shapes, args.many = args.sizes or "64K", "few,many", 64
        args.repeats, args.target_ms = min(args.repeats, 2), 2.0
        args.compile_max_tensors = min(args.compile_max_tensors or 4, 4)
    elif args.quick:
        sizes = args.sizes or "1M,4M"
        args.many = min(args.many, 1024)
        args.repeats, args.target_ms = min(args.repeats, 3), min(args.target_ms, 10.0)
    else:
        sizes = args.sizes or ("1M,8M,64M,256M,1B" if device.type == "cuda" else "1M,4M,16M,64M")
    args.compile_off_reason = "--compile off"
    if args.compile == "auto" and (args.quick or (args.smoke and device.type == "cuda")):
        args.compile = "off"
        args.compile_off_reason = "off in --quick (each shape set compiles for 5-60 s); use --compile on"
    if args.compile_max_tensors is None:
        args.compile_max_tensors = 8
    args.hvp_max = parse_size(args.hvp_max) if args.hvp_max else (
        1 << 62 if device.type == "cuda" else 16 << 20)
    sizes_n = [parse_size(s) for s in sizes.split(",")]
    dtypes = parse_dtypes(args.dtypes)
    shape_sets = [s.strip() for s in args.shapes.split(",") if s.strip()]
    torch.manual_seed(args.seed)

    meta = dict(machine=machine(device), command="python " + " ".join(
        [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))),
        repeats=args.repeats, torch=torch.__version__, esgdm=esgdm.__version__)
    print(f"# bench_step on {meta['machine']}", flush=True)
    notes: dict[str, str] = {}
    results: list[dict] = []
    t_start = time.perf_counter()

    def progress(msg):
        print(f"  [{time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    for dtype in dtypes:
        for ss in shape_sets:
            for n in sizes_n:
                rows = run_config(ss, n, dtype, device, args, notes, progress)
                results += rows
                print(f"\n### {dtype_name(dtype)}, {ss} ({rows[0]['ntensors']} tensors), "
                      f"{fmt_size(rows[0]['numel'])} elements on {device.type}: "
                      f"copy {rows[0]['copy_gbps']:.1f} GB/s, add_ {rows[0]['add_gbps']:.1f} GB/s\n",
                      flush=True)
                print(detail_table(rows), flush=True)
    if notes:
        print("\nSkipped or adapted:")
        for k, v in notes.items():
            print(f"  * {k}: {v}")
    print(f"\nTotal {time.perf_counter() - t_start:.0f} s")
    meta["seconds"] = round(time.perf_counter() - t_start)
    write_outputs(args, results, meta, notes)
    return results


if __name__ == "__main__":
    main()
