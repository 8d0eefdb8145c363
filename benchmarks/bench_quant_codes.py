"""Which 8-bit code and block size for ESGD-M's state?  Measured on real optimizer state.

Trains the ``bench_train.py`` tasks with float32 state, takes the state ``m`` and ``D``
of every tensor of at least 4096 elements at a few points of the run, and measures how
far each candidate 8-bit code moves the quantity the step is made of,
``q = mhat / denom`` (the default rule: ``denom = max(sqrt(D), dscale / 16) + eps``,
``mhat`` as on a plain step with a zero gradient, i.e. ``m``): the relative L2 error
``|q8 - q| / |q|`` over all elements, and the share of elements whose ``q`` moves by
more than 10%.  Candidates:

* ``m``: linear (``round(127 * m / s)``), square-root companding (esgdm's), cube-root
  companding; ``s`` the block's max ``|m|``;
* ``sqrt(D)``: linear, square-root, fourth-root (esgdm's) companding and a logarithmic
  code (16 codes per octave below the block's max); code 0 kept for ``D == 0``;
* block sizes 64, 256, 2048 (bytes per parameter ``2 + 8 / block``).

    python benchmarks/bench_quant_codes.py                     # convnet + charlm, ~3 min
    python benchmarks/bench_quant_codes.py --tasks autoencoder,convnet,charlm --steps 400
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train  # noqa: E402
from benchutil import machine, markdown_table  # noqa: E402

import esgdm  # noqa: E402
from esgdm.rule import DSCALE_FLOOR  # noqa: E402


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-x.numel()) % block
    return torch.cat([x.reshape(-1), x.new_zeros(pad)]).view(-1, block)


def _unblock(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(-1)[:n]


def m_code(name: str, m: torch.Tensor, block: int) -> torch.Tensor:
    """m through an 8-bit code and back (float32, blockwise absmax)."""
    x = _blocks(m, block)
    s = x.abs().amax(1, keepdim=True)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    u = x.abs() / safe
    power = {"linear": 1, "sqrt": 2, "cbrt": 3, "root4": 4}[name]
    q = torch.round(127 * u ** (1 / power)) / 127
    return _unblock(torch.sign(x) * s * q ** power, m.numel())


def d_code(name: str, d: torch.Tensor, block: int) -> torch.Tensor:
    """D through an 8-bit code of sqrt(D) and back; code 0 iff D == 0."""
    r = _blocks(d, block).sqrt()
    s = r.amax(1, keepdim=True)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    u = r / safe
    if name == "log":  # 16 codes per octave below the max, codes 1..255
        c = torch.clamp(torch.round(255 + 16 * torch.log2(u.clamp(min=1e-30))), min=1)
        back = s * torch.exp2((c - 255) / 16)
    else:
        power = {"linear": 1, "sqrt": 2, "root4": 4}[name]
        c = torch.clamp(torch.round(255 * u ** (1 / power)), min=1)
        back = s * (c / 255) ** power
    back = torch.where(r > 0, back, torch.zeros_like(back))
    return _unblock(back * back, d.numel())


def direction(m: torch.Tensor, d: torch.Tensor, dscale: float, eps: float) -> torch.Tensor:
    root = torch.maximum(d.sqrt(), torch.tensor(DSCALE_FLOOR * dscale))
    q = m / (root + eps)
    return torch.where(d == 0, m / (dscale + eps) if dscale > 0 else torch.zeros_like(q), q)


def snapshots(task, steps: int, lr: float, every: int, seed: int) -> list[list[tuple]]:
    torch.manual_seed(seed)
    model = task.make_model()
    opt = esgdm.ESGDM(model.parameters(), lr=lr, backend="cpu", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    shots = []
    for step in range(1, steps + 1):
        bench_train.train_step(opt, model, task, task.batch(gen), None)
        if step % every == 0:
            shot = []
            for p in model.parameters():
                st = opt.state[p]
                if p.numel() >= 4096 and "exp_avg" in st:
                    d = st["exp_avg_d"].float().reshape(-1)
                    pos = d[d > 0]
                    dscale = float(pos.sqrt().mean()) if pos.numel() else 0.0
                    shot.append((st["exp_avg"].float().reshape(-1).clone(), d.clone(), dscale))
            shots.append(shot)
    return shots


def study(shots, m_names, d_names, blocks, eps: float = 1e-8):
    rows = []
    for block in blocks:
        for mn in m_names:
            for dn in d_names:
                num = den = 0.0
                moved = total = 0
                for shot in shots:
                    for m, d, dscale in shot:
                        q = direction(m, d, dscale, eps)
                        q8 = direction(m_code(mn, m, block), d_code(dn, d, block), dscale, eps)
                        num += float(((q8 - q) ** 2).sum())
                        den += float((q ** 2).sum())
                        big = q.abs() > 1e-3 * q.abs().max()
                        moved += int((((q8 - q).abs() > 0.1 * q.abs()) & big).sum())
                        total += int(big.sum())
                rows.append([block, f"{2 + 8 / block:.3f}", mn, dn, f"{(num / max(den, 1e-300)) ** 0.5:.4f}",
                             f"{moved / max(total, 1):.2e}"])
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="convnet,charlm")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", default="64,256,2048")
    ap.add_argument("--text-bytes", type=int, default=300_000)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    device = torch.device("cpu")
    tasks = {t.name: t for t in bench_train.digits_tasks(device, 1.0)}
    if "charlm" in args.tasks:
        lm_args = bench_train.build_parser().parse_args(["--text-bytes", str(args.text_bytes)])
        tasks["charlm"] = bench_train.charlm_task(device, 1.0, lm_args)
    print(machine(device))
    for name in args.tasks.split(","):
        task = tasks[name]
        lr = bench_train.LR_GRIDS[name]["ESGD-M"][1]
        shots = snapshots(task, args.steps, lr, args.every, args.seed)
        rows = study(shots, ("linear", "sqrt", "cbrt", "root4"), ("sqrt", "root4", "log"),
                     [int(b) for b in args.blocks.split(",")])
        print(f"\n### {name}: lr {lr}, {args.steps} steps, state at every {args.every}th step\n")
        print(markdown_table(["block", "B/param", "m code", "sqrt(D) code", "rel. L2 error of q",
                              "share of q moved >10%"], rows))


if __name__ == "__main__":
    main()
