"""How often an FSDP2 run over gloo (one process, or several under torchrun) aborts at exit.

torch can end such a run with "terminate called without an active exception" (SIGABRT)
after it finished its work: a collective issued during backward still holds a Python
object when the interpreter finalizes (see ``esgdm/guards.py``, ``_drain_before_exit``).
esgdm collects those objects before finalization wherever a process group exists.  This
script counts aborts over many runs, with that drain and (``--without-drain``) with
esgdm's drain made a no-op: for one process, what esgdm did before it registered the
drain for a group of one rank.

On one process the rate is small and depends on timing: keep both cores busy
(``--jobs 2``); two processes keep them busy by themselves (``--jobs 1``)::

    python benchmarks/exit_abort_rate.py --runs 100 --jobs 2
    python benchmarks/exit_abort_rate.py --runs 100 --jobs 2 --without-drain
    python benchmarks/exit_abort_rate.py --runs 100 --jobs 1 --ranks 2

A run aborts when any of its processes does (torchrun then exits with 1 and prints
the line).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = '''
import os, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

import esgdm
import esgdm.guards

if sys.argv[2] == "without-drain":
    esgdm.guards.drain_at_exit = lambda: None
    esgdm.optimizer.drain_at_exit = lambda: None
    esgdm.hvp.drain_at_exit = lambda: None

if "RANK" in os.environ:  # under torchrun (--ranks 2 and more)
    dist.init_process_group("gloo")
else:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
try:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    fully_shard(model)
    opt = esgdm.ESGDM(model.parameters(), backend="torch", hvp="finite_difference")
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
finally:
    dist.destroy_process_group()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(script: str, drain: str, ranks: int) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    launch = [sys.executable]
    if ranks > 1:  # torchrun, standalone: it binds a free port itself
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([*launch, script, str(free_port()), drain], env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (keep every core busy)")
    ap.add_argument("--ranks", type=int, default=1, help="processes per run (more than one: under torchrun)")
    ap.add_argument("--without-drain", action="store_true", help="make esgdm's exit drain a no-op")
    args = ap.parse_args()
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"esgdm_exit_worker_{os.getpid()}.py"
    script.write_text(WORKER)
    drain = "without-drain" if args.without_drain else "with-drain"
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda _: one_run(str(script), drain, args.ranks), range(args.runs)))
    finally:
        script.unlink()
    aborts = sum(1 for rc, err in results if rc != 0 and "terminate called" in err)
    others = [(rc, err[-800:]) for rc, err in results if rc != 0 and "terminate called" not in err]
    print(f"{drain}: {aborts} of {args.runs} runs of {args.ranks} process(es) aborted at exit "
          f"({args.jobs} at once, {time.perf_counter() - start:.0f} s)")
    for rc, err in others:
        print(f"another failure (exit {rc}):\n{err}")
    if others:
        sys.exit(1)


if __name__ == "__main__":
    main()
