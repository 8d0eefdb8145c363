"""What curvature costs: autograd (double backward) against finite differences.

A small character-level transformer language model, trained on Python's own standard
library source (on disk wherever Python is), with fused attention
(``F.scaled_dot_product_attention``).  For each method this measures, in a fresh
process so that peak memory is its own:

* time per step (median over repeats) and peak memory, for: a plain ESGD-M step, a D-step
  with ``hvp="autograd"`` (which needs
  the math attention backend: fused attention has no double backward), a D-step with
  ``hvp="finite_difference"`` (forward and central), and a ``torch.optim.AdamW`` step;
* the training loss after a fixed number of steps with each method.

Peak memory is given two ways: the high-water mark of the torch allocations made
during one step, above what was allocated when it began (from the profiler's memory
events: exact, and what the optimizer controls), and the process's peak resident
set above its baseline (what the operating system saw, allocator caching included).

    python benchmarks/bench_hvp.py            # the full run (a few minutes on 2 cores)
    python benchmarks/bench_hvp.py --quick    # smaller model and fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import esgdm
import esgdm.curvature

SIGNS_AS_TENSORS = "esgdm D-step, finite difference, signs as tensors"

METHODS = {
    # name: (optimizer, ESGDM keyword arguments, step kind, attention backend)
    "adamw": ("adamw", {}, "plain", "default"),
    "esgdm plain step": ("esgdm", {}, "plain", "default"),
    "esgdm D-step, autograd": ("esgdm", {"hvp": "autograd"}, "d", "math"),
    "esgdm D-step, finite difference": ("esgdm", {"hvp": "finite_difference"}, "d", "default"),
    "esgdm D-step, central difference": (
        "esgdm", {"hvp": "finite_difference", "fd_scheme": "central"}, "d", "default"),
    # the probe's signs drawn as tensors and added by torch._foreach_add_, as before
    # esgdm._C.add_signs_ (which draws them as it adds them, on CPU tensors)
    SIGNS_AS_TENSORS: ("esgdm", {"hvp": "finite_difference"}, "d", "default"),
}

SIZES = {
    "full": dict(dim=128, layers=4, heads=4, ctx=128, batch=32, steps=150, repeats=5),
    "quick": dict(dim=64, layers=2, heads=4, ctx=64, batch=16, steps=40, repeats=3),
    "smoke": dict(dim=32, layers=1, heads=2, ctx=16, batch=4, steps=4, repeats=1),
}


def corpus(max_chars: int = 400_000) -> str:
    """Concatenated sources of the standard library's top-level modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


class Block(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.norm2(x))


class CharLM(torch.nn.Module):
    def __init__(self, vocab, dim, layers, heads, ctx):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(ctx, dim) * 0.02)
        self.blocks = torch.nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, idx):
        return self.head(self.norm(self.blocks(self.embed(idx) + self.pos[: idx.shape[1]])))


def attention_context(kind: str):
    if kind == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def peak_step_allocation(step) -> int:
    """Bytes: high-water mark of torch's CPU allocations during ``step()``, above the
    amount allocated when it began (from the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def run_method(name: str, size: str, lr: float, adamw_lr: float, seed: int = 0) -> dict:
    """Times one method's steps and trains with it (run inside a fresh process)."""
    cfg = SIZES[size]
    kind, kwargs, step_kind, attention = METHODS[name]
    if name == SIGNS_AS_TENSORS:
        esgdm.curvature.USE_ADD_SIGNS = False
    text = corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    gen = torch.Generator().manual_seed(seed)

    def batch():
        starts = torch.randint(0, len(data) - cfg["ctx"] - 1, (cfg["batch"],), generator=gen)
        x = torch.stack([data[s:s + cfg["ctx"]] for s in starts])
        y = torch.stack([data[s + 1:s + cfg["ctx"] + 1] for s in starts])
        return x, y

    torch.manual_seed(seed)
    model = CharLM(len(chars), cfg["dim"], cfg["layers"], cfg["heads"], cfg["ctx"])
    n_params = sum(p.numel() for p in model.parameters())

    def make_opt(schedule: bool):
        if kind == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=adamw_lr, foreach=True)
        if schedule:  # the optimizer's own D-step schedule, for training
            return esgdm.ESGDM(model.parameters(), lr=lr, **kwargs)
        # forced schedule, for timing one kind of step: every step a D-step, or none
        if step_kind == "d":
            return esgdm.ESGDM(model.parameters(), lr=lr, update_d_every=1, **kwargs)
        opt = esgdm.ESGDM(model.parameters(), lr=lr, d_warmup=1, update_d_every=10**9, **kwargs)
        opt.steps = 1  # start past the D warmup: plain steps only
        return opt

    def one_step(opt, x, y):
        def closure():
            opt.zero_grad(set_to_none=True)
            with attention_context(attention):
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                create_graph = isinstance(opt, esgdm.ESGDM) and opt.should_create_graph()
                loss.backward(create_graph=create_graph)
            return loss

        if isinstance(opt, esgdm.ESGDM) and opt.hvp == "finite_difference":
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        if isinstance(opt, esgdm.ESGDM) and opt.hvp == "autograd":
            opt.zero_grad(set_to_none=True)  # frees the double-backward graph
        return loss.item()

    # 1. peak memory and time of this kind of step, from a clean baseline
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_opt(schedule=False)
    x, y = batch()
    base = rss_bytes()
    times = []
    for _ in range(cfg["repeats"] + 1):
        t0 = time.perf_counter()
        one_step(opt, x, y)
        times.append(time.perf_counter() - t0)
    peak = peak_rss_bytes() - base
    ms = 1000 * statistics.median(times[1:])  # the first includes lazy set-up
    alloc = peak_step_allocation(lambda: one_step(opt, x, y))

    row = dict(method=name, params=n_params, ms_per_step=ms, peak_mib=peak / 2**20,
               alloc_mib=alloc / 2**20,
               final_loss=float("nan"), nonfinite=0, train_s=float("nan"), steps=0)
    if name == "esgdm plain step":
        return row  # plain steps alone are not a way to train; the D-step rows are

    # 2. training loss after a fixed number of steps, with the real schedule
    model.load_state_dict(initial)
    opt = make_opt(schedule=True)
    losses, t0 = [], time.perf_counter()
    for _ in range(cfg["steps"]):
        losses.append(one_step(opt, *batch()))
    wall = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    row.update(final_loss=sum(tail) / len(tail), train_s=wall, steps=cfg["steps"],
               nonfinite=sum(not torch.isfinite(torch.tensor(v)).item() for v in losses))
    return row


def markdown(rows, plain_ms, plain_peak, plain_alloc) -> str:
    out = ["| method | ms/step | × plain step | peak alloc in step MiB | × plain | "
           "peak RSS above baseline MiB | × plain | loss after training | non-finite losses | "
           "train wall s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        trained = r["steps"] > 0
        out.append(
            f"| {r['method']} | {r['ms_per_step']:.1f} | {r['ms_per_step'] / plain_ms:.2f} | "
            f"{r['alloc_mib']:.1f} | {r['alloc_mib'] / plain_alloc:.2f} | "
            f"{r['peak_mib']:.1f} | {r['peak_mib'] / plain_peak:.2f} | "
            + (f"{r['final_loss']:.3f} | {r['nonfinite']} | {r['train_s']:.1f} |" if trained else "- | - | - |")
        )
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer steps")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI")
    parser.add_argument("--lr", type=float, default=0.5, help="ESGD-M learning rate")
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--markdown", help="write the table, with the machine and command, here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.one:
        print(json.dumps(run_method(args.one, size, args.lr, args.adamw_lr)))
        return []

    cfg = SIZES[size]
    print(f"char transformer LM: dim {cfg['dim']}, {cfg['layers']} layers, context {cfg['ctx']}, "
          f"batch {cfg['batch']}; {cfg['steps']} training steps per method; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    for name in METHODS:
        cmd = [sys.executable, __file__, "--one", name, "--lr", str(args.lr), "--adamw-lr", str(args.adamw_lr)]
        cmd += ["--smoke"] if args.smoke else ["--quick"] if args.quick else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  {name:34s} {r['ms_per_step']:8.1f} ms/step  alloc {r['alloc_mib']:7.1f} MiB  "
              f"RSS {r['peak_mib']:7.1f} MiB  "
              f"loss {r['final_loss']:.3f} after {r['steps']} steps", flush=True)
    plain = next(r for r in rows if r["method"] == "esgdm plain step")
    print(f"\nmodel: {rows[0]['params']:,} parameters\n")
    table = markdown(rows, plain["ms_per_step"], plain["peak_mib"], plain["alloc_mib"])
    print(table)
    if args.markdown:
        import platform

        command = " ".join(["python", "benchmarks/bench_hvp.py"] + sys.argv[1:])
        Path(args.markdown).write_text(
            f"Machine: {os.cpu_count()}-core {platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}  \nCommand: `{command}`  \n"
            f"Model: char transformer LM, dim {cfg['dim']}, {cfg['layers']} layers, context {cfg['ctx']}, "
            f"batch {cfg['batch']}, {rows[0]['params']:,} parameters; {cfg['steps']} training steps per "
            f"method. Each method runs in its own process.\n\n{table}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
