"""Resident memory of ESGD-M's optimizer state: float32, bfloat16 and 8-bit state.

For each state dtype, in a fresh process: ``--params`` float32 parameters in tensors of
``--tensor`` elements with their gradients, the process's resident set size (``VmRSS``)
before and after the optimizer allocates its state (``opt.buckets()``), then one step
(finite differences, a linear loss) to show that the state is what the step uses.
Also the bytes the buckets hold (``sum(b.nbytes() for b in opt.buckets())``), per
parameter.  CPU tensors (resident memory is what the kernel's pages take).

    python benchmarks/bench_state_memory.py                       # 256M parameters
    python benchmarks/bench_state_memory.py --params 16M --tensor 1M
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

STATES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


def _count(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(state: str, params: int, tensor: int) -> dict:
    import esgdm

    torch.set_num_threads(2)
    n = params // tensor
    ps = [torch.nn.Parameter(torch.randn(tensor)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = esgdm.ESGDM(ps, lr=1e-3, state_dtype=STATES[state], hvp="finite_difference")

    def closure():  # a linear loss: its gradient is what is set, its curvature 0
        for p in ps:
            p.grad = torch.full_like(p, 1e-3)
        return torch.zeros(())

    before = rss_bytes()
    opt.buckets()  # allocates the state
    after = rss_bytes()
    opt.step(closure)
    held = sum(b.nbytes() for b in opt.buckets())
    return dict(state=state, params=n * tensor, rss_state=after - before, held=held,
                backend="+".join(sorted({opt.backend_for(b).name for b in opt.buckets()})))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="256M")
    ap.add_argument("--tensor", default="8M", help="elements per tensor")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    params, tensor = _count(args.params), _count(args.tensor)
    if args.one:
        print(json.dumps(measure(args.one, params, tensor)))
        return
    print(f"{params / 2**20:.0f}M float32 parameters in {params // tensor} tensors of {tensor / 2**20:g}M, "
          f"torch {torch.__version__}\n")
    print("| state | held by the buckets | bytes / parameter | resident memory of the state (VmRSS after - before) |")
    print("|:--|--:|--:|--:|")
    env = dict(os.environ)
    for state in STATES:
        out = subprocess.run([sys.executable, __file__, "--params", args.params, "--tensor", args.tensor,
                              "--one", state], capture_output=True, text=True, env=env, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {state} ({r['backend']}) | {r['held'] / 2**20:,.0f} MiB | {r['held'] / r['params']:.3f} | "
              f"{r['rss_state'] / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
