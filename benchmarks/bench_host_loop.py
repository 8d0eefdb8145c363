"""The host cost of one plain step, to a tenth of a microsecond: plain steps back to back.

A small step (default one fp32 tensor of 1024 elements, gradient set once) is all
front-end: the checks, the tables, the operator call.  Each sample times ``--inner``
steps; the best of ``--repeats`` samples is printed, with ``AdamW(fused=True)`` on the
same parameters for scale, the two interleaved.  For a before/after figure run it with
each version's package first on ``PYTHONPATH``, alternating:

    python benchmarks/bench_host_loop.py
    PYTHONPATH=<other checkout> python benchmarks/bench_host_loop.py
    python benchmarks/bench_host_loop.py --tensors 256 --backend torch
"""

from __future__ import annotations

import argparse
import time

import torch

import esgdm


def step_us(step, inner: int) -> float:
    """One sample: the mean time of ``inner`` steps back to back, in microseconds."""
    t = time.perf_counter()
    for _ in range(inner):
        step()
    return (time.perf_counter() - t) / inner * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=1)
    ap.add_argument("--numel", type=int, default=1024, help="elements per tensor")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--inner", type=int, default=2000, help="steps per sample")
    ap.add_argument("--repeats", type=int, default=15, help="samples per competitor, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = [torch.randn(args.numel) for _ in range(args.tensors)]
    grads = [torch.randn(args.numel) for _ in range(args.tensors)]

    ours = [torch.nn.Parameter(t.clone()) for t in base]
    opt = esgdm.ESGDM(ours, lr=0.1, backend=args.backend, d_warmup=1, update_d_every=10**9)
    sum(p.pow(4).sum() for p in ours).backward(create_graph=True)
    opt.step()  # the one D-step: every later step is plain
    theirs = [torch.nn.Parameter(t.clone()) for t in base]
    adamw = torch.optim.AdamW(theirs, lr=1e-3, fused=True)
    for ps in (ours, theirs):
        for p, g in zip(ps, grads):
            p.grad = g.clone()

    competitors = {f"ESGDM({args.backend})": opt.step, "AdamW(fused=True)": adamw.step}
    for step in competitors.values():  # warm-up
        step_us(step, args.inner)
    results: dict[str, list[float]] = {name: [] for name in competitors}
    for _ in range(args.repeats):
        for name, step in competitors.items():
            results[name].append(step_us(step, args.inner))
    print(f"{args.tensors} x {args.numel} fp32, {args.threads} threads, esgdm from {esgdm.__file__}")
    for name, samples in results.items():
        print(f"{name:20s} best {min(samples):8.2f} us   median {sorted(samples)[len(samples) // 2]:8.2f} us")


if __name__ == "__main__":
    main()
