"""The portable "torch" backend against torch.optim's AdamW, interleaved (issue 19, item 2).

One workload (default: 24 fp32 tensors of 640K elements, 15.7M in all), every
competitor stepping its own copy of the same parameters in one process, repeats
interleaved (A, B, C, ..., then A, B, C, ... again, the order rotated each round) and
the median reported, so a noisy neighbour slows all of them alike:

* ``esgdm/torch plain``: ``ESGDM(..., backend="torch").step()`` without curvature refresh
  (what 9 steps in 10 cost), and ``esgdm/torch dstep``: the backend's D-step kernel
  alone (``backends.get("torch").step`` with the HVPs given);
* ``esgdm/torch eager plain``: the same step with the compiled second stage switched
  off (``torch_impl.COMPILE_DEVICES = ()``), what a device without a compiler runs;
* ``esgdm/<name> plain`` and ``dstep`` for the other backends of ``--backends`` (default
  ``cpu``, the fused C++ kernel, for scale; any registered backend name works);
  ``--torch-at REV`` adds ``torch_before``: the "torch" backend and the rule it calls as
  they were at git revision ``REV`` (loaded with ``git show``), for before/after figures
  from one run;
* ``AdamW/foreach`` and ``AdamW/fused``: ``torch.optim.AdamW`` (the target of the
  issue: the torch backend's plain step no slower than ``foreach``);
* ``copy``: ``dst.copy_(src)`` over as many bytes as an fp32 plain ESGD-M step moves
  (24 B per element), the bandwidth every row is compared with.

``--count`` also counts, for one call of each ESGD-M row, the kernels that walk the
elements ("passes": elements walked / elements of the workload, under a
``TorchDispatchMode``; a call of the compiled second stage counts as one kernel over its
piece) and the bytes their inputs and outputs hold, against the 24 bytes per element
of an fp32 plain step.

    python benchmarks/bench_portable.py                    # the issue's case, 2 threads
    python benchmarks/bench_portable.py --count --repeats 15
    python benchmarks/bench_portable.py --tensors 4096 --numel 256 --only 'torch|foreach'
    python benchmarks/bench_portable.py --torch-at 94f165c     # against the backend of a commit
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import esgdm  # noqa: E402
from esgdm import backends  # noqa: E402
from esgdm.backends import torch_impl  # noqa: E402

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-4
NEVER = 10**9


def _params(n, numel, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(numel, generator=gen).to(dtype).requires_grad_() for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(numel, generator=gen).to(dtype)
    return ps


def register_torch_at(rev: str) -> str:
    """Registers the "torch" backend of git revision ``rev`` (its ``torch_impl.py`` and
    the ``rule.py`` it imports, as they were there) as backend ``torch_before``."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

    def source(path):
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True,
                              check=True).stdout
    rule = types.ModuleType("esgdm_rule_before")
    exec(compile(source("esgdm/rule.py"), f"esgdm/rule.py@{rev}", "exec"), rule.__dict__)
    sys.modules[rule.__name__] = rule  # what the old backend's import finds
    impl = types.ModuleType("esgdm_torch_impl_before")
    code = source("esgdm/backends/torch_impl.py").replace("from esgdm.rule import", f"from {rule.__name__} import")
    exec(compile(code, f"esgdm/backends/torch_impl.py@{rev}", "exec"), impl.__dict__)
    backend = impl.BACKEND.__class__()
    backend.name = "torch_before"
    backends.register(backend)
    return backend.name


class _Eager:
    """Calls ``fn`` with the "torch" backend's compiled second stage switched off."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        saved, finishes = torch_impl.COMPILE_DEVICES, dict(torch_impl._finishes)
        torch_impl.COMPILE_DEVICES = ()
        torch_impl._finishes.clear()
        try:
            return self.fn()
        finally:
            torch_impl.COMPILE_DEVICES = saved
            torch_impl._finishes.clear()
            torch_impl._finishes.update(finishes)


def competitors(args):
    """``{name: (step callable, bytes per element)}``."""
    n, numel, dtype = args.tensors, args.numel, args.dtype
    out = {}

    def esgdm_opt(backend):
        ps = _params(n, numel, dtype, 0)
        opt = esgdm.ESGDM(ps, lr=LR, betas=BETAS, eps=EPS, d_warmup=1, update_d_every=NEVER,
                          backend=backend)
        loss = sum((p.float() * p.float()).sum() for p in ps) * 0.5  # the first step is a D-step
        grads = torch.autograd.grad(loss, ps, create_graph=True)
        saved = [p.grad for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        for p, g in zip(ps, saved):
            p.grad = g
        return opt

    hvps = [torch.randn(numel).to(dtype) for _ in range(n)]

    def dstep_of(name, opt):
        """The backend's D-step alone, HVPs given, on ``opt``'s bucket."""
        b = opt.buckets()[0]
        hp = opt._store.device_hparams(opt, list(opt.buckets()))[b.device]
        backend, grads = backends.get(name), [p.grad for p in b.tensors]

        @torch.no_grad()
        def dstep():
            backend.step(b.tensors, grads, b.exp_avg_views, b.exp_avg_d_views, hvps, b.scalars,
                         b.index(None), hp, None, None, 0, 0)
        return dstep

    opt_torch = esgdm_opt("torch")
    out["esgdm/torch plain"] = (opt_torch.step, 24)
    out["esgdm/torch eager plain"] = (_Eager(esgdm_opt("torch").step), 24)
    out["esgdm/torch dstep"] = (dstep_of("torch", opt_torch), 32)
    for name in filter(None, (s.strip() for s in args.backends.split(","))):
        reason = backends.get(name).why_not(torch.device("cpu"), dtype)
        if reason is None:
            opt = esgdm_opt(name)
            out[f"esgdm/{name} plain"] = (opt.step, 24)
            out[f"esgdm/{name} dstep"] = (dstep_of(name, opt), 32)
        else:
            print(f"(no esgdm/{name}: {reason})")
    for impl in ("foreach", "fused"):
        ps = _params(n, numel, dtype, 0)
        opt = torch.optim.AdamW(ps, lr=LR, betas=BETAS, **{impl: True})
        opt.step()
        out[f"AdamW/{impl}"] = (opt.step, 28)
    src = torch.full((n * numel * 3,), 1e-3)  # 24 bytes per element: 3 fp32 read + 3 written
    dst = torch.zeros_like(src)
    out["copy"] = (lambda: dst.copy_(src), 24)
    if args.only:
        out = {k: v for k, v in out.items() if re.search(args.only, k)}
    return out


class _Counter(TorchDispatchMode):
    """Sums, over the kernels of a call (views excluded), the elements each walks (its
    largest tensor, or a foreach op's largest list) and the bytes of all its inputs and
    outputs: ``passes`` = elements walked / elements of the workload.  Kernels that an
    operation runs inside itself (``lt(..., out=int_tensor)`` compares into bytes, then
    copies) are not seen."""

    def __init__(self):
        super().__init__()
        self.elements, self.bytes, self.ops = 0, 0, {}

    def record(self, name, elements, nbytes):
        self.elements += elements
        self.bytes += nbytes
        self.ops[name] = self.ops.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rets = func._schema.returns
        if rets and rets[0].alias_info is not None and not rets[0].alias_info.is_write:
            return out  # a view: no memory touched

        def sizes(tree):
            flat = []
            for x in (list(tree.values()) if isinstance(tree, dict) else
                      list(tree) if isinstance(tree, (list, tuple)) else [tree]):
                if isinstance(x, torch.Tensor):
                    flat.append((x.numel(), x.nbytes))
                elif isinstance(x, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in x):
                    ts = [t for t in x if isinstance(t, torch.Tensor)]
                    flat.append((sum(t.numel() for t in ts), sum(t.nbytes for t in ts)))
            return flat
        touched = sizes(args) + sizes(kwargs or {}) + sizes(out)
        if touched:
            self.record(str(func).replace("aten.", "").replace(".default", ""),
                        max(n for n, _ in touched), sum(b for _, b in touched))
        return out


def count(name, fn, args):
    """Prints the passes of one call of ``fn`` (a call of the compiled second stage,
    which the dispatch mode cannot see into, is one pass over its piece: it reads its
    inputs and writes p, m (and D) once)."""
    c = _Counter()
    saved = dict(torch_impl._finishes)

    def counted(finish):
        def call(p, g, m, d, m_new, d_new, mhat, root, **kw):
            with _disable_current_modes():
                result = finish(p, g, m, d, m_new, d_new, mhat, root, **kw)
            reads = [p, g, m, d, m_new, mhat, root] + ([] if d_new is None else [d_new])
            writes = [p, m] + ([] if d_new is None else [d])
            c.record("compiled finish", p.numel(), sum(t.nbytes for t in reads + writes))
            return result
        return call
    torch_impl._finishes.update({k: counted(v) for k, v in saved.items() if v is not None})
    try:
        with c:
            fn()
    finally:
        torch_impl._finishes.clear()
        torch_impl._finishes.update(saved)
    total = args.tensors * args.numel
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(c.ops.items(), key=lambda kv: -kv[1]))
    print(f"  {name:24s} {c.elements / total:5.1f} passes, {c.bytes / total:6.1f} B/element ({ops})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=24)
    ap.add_argument("--numel", type=int, default=640 * 1024, help="elements per tensor (default 640K)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--backends", default="cpu", help="other esgdm backends to time (comma-separated)")
    ap.add_argument("--torch-at", metavar="REV", help="also time the torch backend of git revision REV")
    ap.add_argument("--repeats", type=int, default=11, help="interleaved rounds")
    ap.add_argument("--inner", type=int, default=3, help="calls per timed sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="regex: keep only competitors whose name matches")
    ap.add_argument("--count", action="store_true", help="count the passes of the esgdm torch rows")
    args = ap.parse_args(argv)
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.torch_at:
        args.backends = ",".join([register_torch_at(args.torch_at)] + [args.backends])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.tensors} x {args.numel} {args.dtype} elements, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load {load:.2f} (1 min) before")
    comps = competitors(args)
    for fn, _ in comps.values():  # warm-up (and the compiled stage's one-time compile)
        fn()
    if args.count:
        print("passes over the elements per call (kernels walking them; see --help):")
        for name, (fn, _) in comps.items():
            if name.startswith("esgdm/torch"):
                count(name, fn, args)
    names = list(comps)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            fn = comps[k][0]
            t0 = time.perf_counter()
            for _ in range(args.inner):
                fn()
            samples[k].append((time.perf_counter() - t0) * 1e3 / args.inner)
    total = args.tensors * args.numel
    ref = statistics.median(samples["AdamW/foreach"]) if "AdamW/foreach" in samples else None
    print(f"{'competitor':26s} {'median ms':>10s} {'min ms':>8s} {'GB/s':>7s} {'/ foreach':>9s}")
    for k in names:
        med, lo = statistics.median(samples[k]), min(samples[k])
        gbs = comps[k][1] * total / med / 1e6
        rel = f"{med / ref:9.2f}" if ref else ""
        print(f"{k:26s} {med:10.2f} {lo:8.2f} {gbs:7.1f} {rel}")
    load2 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load {load2:.2f} (1 min) after")


if __name__ == "__main__":
    main()
