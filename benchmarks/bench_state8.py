"""8-bit state against float32 state in the fused C++ CPU kernel (the "cpu" backend).

Times one bucket's step through ``esgdm._C.step`` with float32 ``m``/``D`` and with
uint8 codes plus per-block scales (:mod:`esgdm.quant`), on two workloads: one tensor of
16M elements, and 22M elements in 60 tensors of mixed sizes (three decades, as
bench_step.py's "mixed").  Step kinds: the plain step, the D-step kernel, and the D-step
as the op runs it, i.e. with the curvature-scale refresh (``dscale``) after the kernel
(float32: :func:`esgdm.rule.update_dscale`; 8-bit: :func:`esgdm.quant.update_dscale`, read
from the codes).  Every configuration is timed once per round, rounds interleaved, and
the median reported, so that a neighbour's burst on a shared machine hits all alike.

Bytes moved per element (what the kernel must read and write; float32 parameters)::

    float32 state  plain 24 (p g m D in, p m out)    D-step 32 (p g h m D in, p m D out)
    8-bit state    plain 15.05 (p g in, m D codes in, p m codes out, scales)
                   D-step 20.06 (p g h in, codes in and out, p out, scales)

Run::

    python benchmarks/bench_state8.py                 # 2 threads, 9 rounds
    python benchmarks/bench_state8.py --smoke         # small and quick (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this tree's esgdm, not whatever is installed
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

from bench_step import shapes_for  # noqa: E402
from benchutil import fmt_size, machine, parse_size  # noqa: E402

from esgdm import quant, rule  # noqa: E402
from esgdm.backends import cpp_impl  # noqa: E402

HPARAMS = (1e-3, 0.9, 0.999, 0.99, 1e-8, 0.01)  # lr, beta1, beta2, lr_warmup, eps, weight_decay
QSCALE_BYTES = 2 * 4 / quant.BLOCK  # two float32 scales per block of 256 elements


def bytes_per_element(state: str, d_step: bool, p_bytes: int = 4) -> float:
    """What the kernel reads and writes per element (scales included)."""
    streams = (3 if d_step else 2) * p_bytes + p_bytes  # p g (h) in, p out
    if state == "fp32":
        return streams + 4 * (2 + (2 if d_step else 1))  # m D in; m (D) out
    codes = 2 + (2 if d_step else 1)  # m D codes in; m (D) codes out
    scales = QSCALE_BYTES + (QSCALE_BYTES if d_step else QSCALE_BYTES / 2)  # in; out
    return streams + codes + scales


class Bucket:
    """One workload's tensors, with both kinds of state."""

    def __init__(self, shapes, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.numel = sum(int(torch.Size(s).numel()) for s in shapes)
        self.n = len(shapes)
        self.params = [torch.randn(s, generator=g) for s in shapes]
        self.grads = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
        self.hvps = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
        self.m = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
        self.d = [torch.rand(s, generator=g) * 1e-4 for s in shapes]
        self.mc = [torch.empty(s, dtype=torch.uint8) for s in shapes]
        self.dc = [torch.empty(s, dtype=torch.uint8) for s in shapes]
        self.qs = [quant.new_qscale(int(torch.Size(s).numel())) for s in shapes]
        for m, d, mc, dc, qs in zip(self.m, self.d, self.mc, self.dc, self.qs):
            quant.quantize_into(m, d, mc, dc, qs)
        self.scalars = torch.zeros(self.n, 4, dtype=torch.float64)
        self.scalars[:, rule.BIAS] = 0.9 ** 10
        self.scalars[:, rule.WARM] = 0.99 ** 10
        self.scalars[:, rule.STEPS] = 10
        self.scalars[:, rule.DSCALE] = 1e-2
        self.index = torch.stack([torch.arange(self.n), torch.zeros(self.n, dtype=torch.long)], 1).int()
        self.hparams = torch.tensor([HPARAMS], dtype=torch.float64)

    def state_bytes(self, state: str) -> int:
        if state == "fp32":
            return 8 * self.numel
        return 2 * self.numel + sum(q.numel() * 4 for q in self.qs)

    def step(self, state: str, kind: str) -> None:
        """One step; ``kind``: "plain", "dstep" (the kernel) or "dstep+dscale" (as the op)."""
        C = cpp_impl._C
        hvps = None if kind == "plain" else self.hvps
        slot = self.index[:, 0].long()
        if state == "fp32":
            C.step(self.params, self.grads, self.m, self.d, hvps, self.scalars, self.index,
                   self.hparams, None, None, 0, 0)
            if kind == "dstep+dscale":
                rule.update_dscale(self.scalars, slot, self.d)
        else:
            C.step(self.params, self.grads, self.mc, self.dc, hvps, self.scalars, self.index,
                   self.hparams, None, None, 0, 0, self.qs)
            if kind == "dstep+dscale":
                quant.update_dscale(self.scalars, slot, self.dc, self.qs)
        self.scalars[:, rule.BIAS] = 0.9 ** 10  # keep the step sizes where they were
        self.scalars[:, rule.WARM] = 0.99 ** 10


def run(workloads, rounds: int, kinds=("plain", "dstep", "dstep+dscale")):
    configs = [(w, state, kind) for w in workloads for state in ("fp32", "u8") for kind in kinds]
    times: dict = {c: [] for c in configs}
    for bucket in workloads.values():  # warm-up: first touch, thread pool
        for state in ("fp32", "u8"):
            bucket.step(state, "dstep")
    for _ in range(rounds):
        for c in configs:
            w, state, kind = c
            t0 = time.perf_counter()
            workloads[w].step(state, kind)
            times[c].append(time.perf_counter() - t0)
    rows = []
    for (w, state, kind), ts in times.items():
        b = workloads[w]
        ms = statistics.median(ts) * 1e3
        per = bytes_per_element(state, kind != "plain")
        rows.append(dict(workload=w, numel=b.numel, ntensors=b.n, state=state, kind=kind, ms=ms,
                         ms_min=min(ts) * 1e3, bytes_per_element=round(per, 3),
                         gbps=per * b.numel / (ms * 1e-3) / 1e9, state_bytes=b.state_bytes(state)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", default="16M", help="elements of the one-tensor workload")
    parser.add_argument("--mixed", default="22M", help="elements of the 60-tensor workload")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="1M and 2M elements, 3 rounds")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if cpp_impl._C is None:
        raise SystemExit(f"bench_state8: {cpp_impl.LOAD_ERROR}")
    torch.set_num_threads(args.threads)
    one, mixed, rounds = parse_size(args.numel), parse_size(args.mixed), args.rounds
    if args.smoke:
        one, mixed, rounds = 1 << 20, 2 << 20, 3
    workloads = {f"1 x {fmt_size(one)}": Bucket([(one,)]),
                 f"60 x mixed, {fmt_size(mixed)}": Bucket(shapes_for("mixed", mixed, 60), seed=1)}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {machine(torch.device('cpu'))}; load average {load:.2f}; {rounds} interleaved rounds, median")
    print(f"# esgdm._C: {cpp_impl.build_info()['cpu_isa']}")
    rows = run(workloads, rounds)
    print("| workload | step | state | ms (median) | ms (min) | bytes/elem | GB/s | vs fp32 |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    base = {(r["workload"], r["kind"]): r["ms"] for r in rows if r["state"] == "fp32"}
    for r in rows:
        print(f"| {r['workload']} | {r['kind']} | {r['state']} | {r['ms']:.2f} | {r['ms_min']:.2f} | "
              f"{r['bytes_per_element']:.2f} | {r['gbps']:.1f} | "
              f"{r['ms'] / base[(r['workload'], r['kind'])]:.2f}x |")
    for w, b in workloads.items():
        print(f"# {w}: state {b.state_bytes('fp32') / b.numel:.2f} B/param (fp32) vs "
              f"{b.state_bytes('u8') / b.numel:.3f} B/param (8-bit, scales included)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(torch.device("cpu")), load=load, rounds=rounds, rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
