"""ESGD-M with DDP or FSDP2 on CPU processes (gloo), and what each costs.

    torchrun --nproc-per-node 2 examples/data_parallel.py --mode fsdp2
    torchrun --nproc-per-node 2 examples/data_parallel.py --mode ddp
    python examples/data_parallel.py --mode single        # the same batch in one process

Curvature comes from finite differences (``hvp="finite_difference"``; neither wrapper
can run a double backward), so each step hands the optimizer a closure.  The sign
vectors are keyed by (seed, step, parameter, element index), so every mode probes the
same directions: the three print the same losses up to rounding.  Rank 0 prints the
optimizer state held per rank and the median step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import esgdm


def build(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(32, width), torch.nn.GELU()]
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("fsdp2", "ddp", "single"), default="fsdp2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    args = parser.parse_args()

    distributed = args.mode != "single"
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    model = build(args.width, args.depth)
    if args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        net = model
    elif args.mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    else:
        net = model
    opt = esgdm.ESGDM(model.parameters(), lr=0.1, hvp="finite_difference", seed=1)

    # A fixed random "teacher" labels fresh inputs each step; each rank takes its slice
    # of the global batch.
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(32, 10, generator=g)
    per_rank = args.batch // world

    times, losses = [], []
    for _step in range(args.steps):
        xs = torch.randn(args.batch, 32, generator=g)
        ys = (xs @ teacher).argmax(dim=1)
        x, y = xs[rank * per_rank:(rank + 1) * per_rank], ys[rank * per_rank:(rank + 1) * per_rank]

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)  # noqa: B023 (called in this iteration)
            loss.backward()
            return loss

        start = time.perf_counter()
        loss = opt.step(closure)
        times.append(time.perf_counter() - start)
        if distributed:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))

    state_bytes = sum(b.nbytes() for b in opt.buckets())
    if rank == 0:
        plain = [t for i, t in enumerate(times) if i >= opt.d_warmup and i % opt.update_d_every]
        print(f"mode={args.mode} world={world} params={sum(p.numel() for p in model.parameters())}")
        print(f"loss: first {losses[0]:.4f} last {losses[-1]:.4f}")
        print(f"optimizer state on rank 0: {state_bytes / 2**20:.2f} MiB")
        print(f"median step (forward+backward+update, plain steps): {statistics.median(plain) * 1e3:.1f} ms")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
