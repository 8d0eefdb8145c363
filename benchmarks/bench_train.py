"""Does training get better with ESGD-M?  Three small real-data tasks against AdamW and SGD.

Everything here runs offline on data that ships with installed packages:

* ``autoencoder``: a deep autoencoder (64-256-128-32-8 and back, tanh) on the
  handwritten digits bundled with scikit-learn (1797 8x8 images), the setting of the
  ESGD paper (a deep MNIST autoencoder) scaled down;
* ``convnet``: a small convolutional classifier on the same digits, each training
  image shifted at random by up to one pixel (so that it cannot just memorise them);
* ``charlm``: a small character-level transformer language model on the source code of
  the Python standard library found on this machine (first ``--text-bytes`` bytes of
  its ``*.py`` files, sorted by name).

Protocol.  Each optimizer gets a three-point learning-rate sweep per task
(:data:`LR_GRIDS`, printed, and in the summary), run with seed 0.  The best rate is
the one with the lowest mean *training* loss over the last tenth of the run (so the
held-out loss that is reported was not used to choose it); it is then re-run with
more seeds and the table gives the mean and spread over seeds.  No weight decay anywhere; SGD uses Nesterov momentum 0.9; AdamW and SGD
use torch's fused implementation where it exists (falling back to the default); ESGD-M
runs with its defaults (including its slow ``lr_warmup=0.99`` warmup, which only
advances on D-steps).  Timings are wall-clock per training step (forward, backward,
HVP where due, update), with evaluation excluded; "amortised" is
``(9 * plain + 1 * D-step) / 10``, ESGD-M's steady state with ``update_d_every=10``.
All runs of a sweep (and then all extra-seed runs) advance in lockstep, one step each
in turn, so that a busy machine slows every optimizer alike and wall times stay
comparable.  Peak memory is measured apart, for each optimizer alone over 25 steps.

    python benchmarks/bench_train.py                   # all tasks, ~15 min on 2 CPU cores
    python benchmarks/bench_train.py --quick           # short runs, 1 seed
    python benchmarks/bench_train.py --tasks charlm --plots benchmarks/results --markdown train.md
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import math
import os
import statistics
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import esgdm  # noqa: E402

from benchutil import (  # noqa: E402
    PeakMemory, fmt, machine, markdown_table, pick_device, save_png, sync,
)

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    def tqdm(it=None, **kw):
        return it if it is not None else _NoBar()


class _NoBar:
    def update(self, *a):
        pass

    def set_postfix_str(self, *a, **k):
        pass

    def close(self):
        pass


warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")


# ------------------------------------------------------------------------------ data

def load_digits(device) -> dict:
    """The 1797 8x8 digits of scikit-learn, pixels in [0, 1]; a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return dict(x_train=x[train].to(device), y_train=y[train].to(device),
                x_test=x[test].to(device), y_test=y[test].to(device))


def load_text(n_bytes: int) -> tuple[bytes, str]:
    """The first ``n_bytes`` bytes of the Python standard library's ``*.py`` files."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise SystemExit(f"no *.py files under {root}: cannot build the charlm corpus")
    chunks, total = [], 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= n_bytes:
            break
    text = b"".join(chunks)[:n_bytes]
    return text, f"{len(text) / 1e6:.2f} MB of {root}/*.py ({len(chunks)} files)"


# ---------------------------------------------------------------------------- models

class Autoencoder(nn.Module):
    """64-256-128-32-8 (linear code) and back, tanh hidden units, sigmoid output."""

    def __init__(self, sizes=(64, 256, 128, 32, 8)):
        super().__init__()
        enc, dec = [], []
        for a, b in zip(sizes[:-1], sizes[1:]):
            enc += [nn.Linear(a, b), nn.Tanh()]
        enc.pop()  # linear code layer
        rev = sizes[::-1]
        for a, b in zip(rev[:-1], rev[1:]):
            dec += [nn.Linear(a, b), nn.Tanh()]
        dec.pop()
        self.net = nn.Sequential(*enc, *dec)

    def forward(self, x):
        return torch.sigmoid(self.net(x))


class ConvNet(nn.Module):
    """conv3x3(16)-GELU-conv3x3(32)-GELU-avgpool2-linear(10) on 1x8x8 images."""

    def __init__(self, c1=16, c2=32):
        super().__init__()
        self.c1 = nn.Conv2d(1, c1, 3, padding=1)
        self.c2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 4 * 4, 10)

    def forward(self, x):
        x = F.gelu(self.c1(x.view(-1, 1, 8, 8)))
        x = F.avg_pool2d(F.gelu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


def causal_attention(q, k, v, mode: str):
    """Causal self-attention on ``[batch, heads, time, head_dim]``.

    ``manual`` is written out so that it has a double backward on every device (what
    ``hvp="autograd"`` needs); ``sdpa-math`` calls ``scaled_dot_product_attention``
    pinned to its math path (also twice differentiable); ``sdpa`` lets PyTorch pick a
    fused kernel (fastest, but usually without double backward: needs an HVP that does
    not differentiate twice).
    """
    if mode == "manual":
        t = q.shape[-2]
        att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        return att @ v
    if mode == "sdpa-math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mode == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(f"unknown attention mode {mode!r}; choose manual, sdpa-math or sdpa")


class Block(nn.Module):
    def __init__(self, d, heads, attention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = causal_attention(q, k, v, self.attention).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharLM(nn.Module):
    """A pre-LayerNorm GPT-style transformer over bytes."""

    def __init__(self, vocab, d=128, heads=4, layers=2, ctx=64, attention="manual"):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, attention) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


# ----------------------------------------------------------------------------- tasks

@dataclass
class Task:
    name: str
    title: str
    make_model: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    evaluate: Callable[[nn.Module], dict]
    steps: int
    eval_every: int
    lrs: dict
    data_note: str
    metric: str = "eval loss"
    extra_metric: Optional[str] = None  # e.g. "test acc"


#: Learning-rate sweeps per task, centred (by a wider 5-point sweep on this machine,
#: 1 seed, see RESULTS.md) on each optimizer's best rate for the default step budget.
LR_GRIDS = {
    "autoencoder": {"ESGD-M": (0.3, 1.0, 3.0), "AdamW": (1e-3, 3e-3, 1e-2), "SGD": (1.0, 3.0, 10.0)},
    "convnet": {"ESGD-M": (0.3, 1.0, 3.0), "AdamW": (3e-3, 1e-2, 3e-2), "SGD": (0.03, 0.1, 0.3)},
    "charlm": {"ESGD-M": (1.0, 3.0, 10.0), "AdamW": (3e-3, 1e-2, 3e-2), "SGD": (0.1, 0.3, 1.0)},
}
OPTIMIZERS = ("ESGD-M", "AdamW", "SGD")


def digits_tasks(device, scale) -> list[Task]:
    data = load_digits(device)
    xtr, ytr, xte, yte = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    bs = 128

    ar = torch.arange(8, device=device)

    def batch(gen):
        idx = torch.randint(0, len(xtr), (bs,), generator=gen).to(device)
        return xtr[idx], ytr[idx]

    def shifted_batch(gen):
        """Images shifted by up to one pixel each way (zero fill): the classifier cannot
        simply memorise 1438 images."""
        x, y = batch(gen)
        padded = F.pad(x.view(-1, 8, 8), (1, 1, 1, 1))
        dy, dx = (torch.randint(0, 3, (2, bs), generator=gen).to(device))
        rows = (dy[:, None] + ar)[:, :, None]
        cols = (dx[:, None] + ar)[:, None, :]
        return padded[torch.arange(bs, device=device)[:, None, None], rows, cols].reshape(bs, 64), y

    def ae_loss(model, b):
        return F.mse_loss(model(b[0]), b[0])

    @torch.no_grad()
    def ae_eval(model):
        return {"train loss": F.mse_loss(model(xtr), xtr).item(),
                "eval loss": F.mse_loss(model(xte), xte).item()}

    def cls_loss(model, b):
        return F.cross_entropy(model(b[0]), b[1])

    @torch.no_grad()
    def cls_eval(model):
        out = model(xte)
        return {"train loss": F.cross_entropy(model(xtr), ytr).item(),
                "eval loss": F.cross_entropy(out, yte).item(),
                "test acc": (out.argmax(1) == yte).float().mean().item()}

    note = f"scikit-learn digits: {len(xtr)} train / {len(xte)} test images, batch {bs}"
    return [
        Task("autoencoder", "Deep autoencoder, sklearn digits (test MSE)", Autoencoder, batch,
             ae_loss, ae_eval, steps=int(2000 * scale), eval_every=max(5, int(50 * scale)),
             lrs=LR_GRIDS["autoencoder"], data_note=note),
        Task("convnet", "Small convnet classifier, sklearn digits (test cross-entropy)", ConvNet,
             shifted_batch, cls_loss, cls_eval, steps=int(1000 * scale),
             eval_every=max(5, int(50 * scale)), lrs=LR_GRIDS["convnet"],
             data_note=note + ", random 1-pixel shifts", extra_metric="test acc"),
    ]


def charlm_task(device, scale, args) -> Task:
    text, note = load_text(args.text_bytes)
    vocab = sorted(set(text))
    lut = torch.zeros(256, dtype=torch.long)
    lut[torch.tensor(vocab)] = torch.arange(len(vocab))
    ids = lut[torch.frombuffer(bytearray(text), dtype=torch.uint8).long()]
    # every tenth 8 KiB block is held out, so both splits mix the same files
    block = 8192
    is_val = (torch.arange(len(ids)) // block) % 10 == 9
    train, val = ids[~is_val].to(device), ids[is_val].to(device)
    ctx, bs = args.ctx, 32

    def windows(src, starts):
        offs = starts[:, None] + torch.arange(ctx + 1, device=starts.device)[None]
        w = src[offs]
        return w[:, :-1], w[:, 1:]

    def batch(gen):
        starts = torch.randint(0, len(train) - ctx - 1, (bs,), generator=gen).to(device)
        return windows(train, starts)

    eval_starts = torch.randint(0, len(val) - ctx - 1, (256,),
                                generator=torch.Generator().manual_seed(99)).to(device)
    eval_batches = [windows(val, eval_starts[i:i + 64]) for i in range(0, 256, 64)]
    train_starts = torch.randint(0, len(train) - ctx - 1, (256,),
                                 generator=torch.Generator().manual_seed(98)).to(device)
    train_batches = [windows(train, train_starts[i:i + 64]) for i in range(0, 256, 64)]

    def loss(model, b):
        logits = model(b[0])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[1].reshape(-1))

    @torch.no_grad()
    def evaluate(model):
        return {"train loss": sum(loss(model, b).item() for b in train_batches) / len(train_batches),
                "eval loss": sum(loss(model, b).item() for b in eval_batches) / len(eval_batches)}

    def make_model():
        return CharLM(len(vocab), d=args.width, heads=4, layers=args.layers, ctx=ctx,
                      attention=args.attention)

    return Task("charlm", "Character-level transformer LM, Python stdlib source (val nats/char)",
                make_model, batch, loss, evaluate, steps=int(500 * scale),
                eval_every=max(5, int(25 * scale)), lrs=LR_GRIDS["charlm"],
                data_note=(f"{note}; vocabulary {len(vocab)} bytes; every 10th 8 KiB block held out; context {ctx}, "
                           f"batch {bs}; {args.layers} layers, width {args.width}, "
                           f"attention {args.attention}"))


# -------------------------------------------------------------------------- training

def make_optimizer(name: str, params, lr: float, args, seed: int = 0, device=None):
    if name == "ESGD-M":
        # its own stream of Rademacher vectors, so that interleaved runs do not share one
        gen = torch.Generator(device=device or "cpu").manual_seed(20_000 + seed)
        kw = dict(lr=lr, backend=args.esgdm_backend, generator=gen)
        if args.esgdm_hvp:
            if "hvp" not in inspect.signature(esgdm.ESGDM).parameters:
                raise SystemExit("--esgdm-hvp given, but this esgdm.ESGDM has no 'hvp' argument")
            kw["hvp"] = args.esgdm_hvp
        return esgdm.ESGDM(params, **kw)
    if name == "AdamW":
        return _fastest(torch.optim.AdamW, params, lr=lr, weight_decay=0.0)
    if name == "SGD":
        return _fastest(torch.optim.SGD, params, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(name)


def describe_impl(opt) -> str:
    """Which implementation stepped: esgdm's backend names, or torch.optim's flavour."""
    if isinstance(opt, esgdm.ESGDM):
        try:
            return "+".join(sorted({opt.backend_for(b).name for b in opt.buckets()}))
        except Exception:  # noqa: BLE001 - only a label
            return ""
    d = opt.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "default"


def _fastest(cls, params, **kw):
    """torch's fused implementation where this torch has one for these parameters,
    else its default (the fair opponent for esgdm's fused kernels)."""
    params = list(params)
    try:
        return cls(params, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):
        return cls(params, **kw)


def train_step(opt, model, task, b, hvp_mode: Optional[str]):
    """One step; returns (loss, whether it was an ESGD-M D-step)."""
    is_esgdm = isinstance(opt, esgdm.ESGDM)
    # is_d_step() where it exists: should_create_graph() is False for finite differences
    d_step = is_esgdm and getattr(opt, "is_d_step", opt.should_create_graph)()
    if is_esgdm and hvp_mode == "finite_difference":
        # closure-based HVP: no double backward; the optimizer calls the closure again
        # at the displaced parameters on D-steps
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, b)
            loss.backward()
            return loss
        return opt.step(closure), d_step
    opt.zero_grad(set_to_none=True)
    loss = task.loss(model, b)
    loss.backward(create_graph=is_esgdm and opt.should_create_graph())
    opt.step()
    return loss, d_step


@dataclass
class Run:
    task: str
    optimizer: str
    lr: float
    seed: int
    steps_done: int = 0
    nonfinite_step: Optional[int] = None
    evals: list = field(default_factory=list)       # (step, train seconds, {metric: value})
    train_losses: list = field(default_factory=list)
    step_ms: list = field(default_factory=list)
    d_steps: list = field(default_factory=list)
    peak_mib: Optional[float] = None
    state_mib: float = 0.0
    impl: str = ""  # ESGD-M: the esgdm backend(s) used; torch.optim: fused/foreach/default

    @property
    def diverged(self) -> bool:
        return self.nonfinite_step is not None

    def tail_train_loss(self) -> float:
        """Mean training loss over the last tenth of the steps (inf if it diverged)."""
        if self.diverged or not self.train_losses:
            return math.inf
        k = max(1, len(self.train_losses) // 10)
        return sum(self.train_losses[-k:]) / k

    def final(self, metric: str) -> float:
        if self.diverged or not self.evals:
            return math.nan
        return self.evals[-1][2][metric]

    def ms(self, which: str) -> float:
        pick = [t for t, d in zip(self.step_ms, self.d_steps)
                if which == "all" or (which == "d") == d]
        return statistics.median(pick) if pick else math.nan

    def total_s(self) -> float:
        return sum(self.step_ms) / 1e3


class Trainer:
    """One training run that advances a step at a time, so several can be interleaved."""

    def __init__(self, task: Task, opt_name: str, lr: float, seed: int, device, args):
        self.task, self.device, self.args = task, device, args
        self.run = Run(task.name, opt_name, lr, seed)
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(10_000 + seed)  # batches
        self.model = task.make_model().to(device)
        self.opt = make_optimizer(opt_name, self.model.parameters(), lr, args, seed, device)
        self.elapsed = 0.0
        self.run.evals.append((0, 0.0, task.evaluate(self.model)))

    @property
    def done(self) -> bool:
        return self.run.diverged or self.run.steps_done >= self.task.steps

    def step(self) -> None:
        run, task = self.run, self.task
        b = task.batch(self.gen)
        sync(self.device)
        t0 = time.perf_counter()
        loss, d_step = train_step(self.opt, self.model, task, b, self.args.esgdm_hvp)
        value = loss.item()  # synchronises
        dt = time.perf_counter() - t0
        self.elapsed += dt
        run.step_ms.append(dt * 1e3)
        run.d_steps.append(d_step)
        run.train_losses.append(value)
        run.steps_done += 1
        if not math.isfinite(value):
            run.nonfinite_step = run.steps_done
        elif run.steps_done % task.eval_every == 0 or run.steps_done == task.steps:
            self.model.eval()
            run.evals.append((run.steps_done, self.elapsed, task.evaluate(self.model)))
            self.model.train()

    def close(self) -> Run:
        self.run.impl = describe_impl(self.opt)
        self.run.state_mib = sum(t.numel() * t.element_size() for st in self.opt.state.values()
                                 for t in st.values() if torch.is_tensor(t)) / 2**20
        self.model = self.opt = None
        return self.run


def lockstep(trainers: list[Trainer], desc: str, args) -> list[Run]:
    """Runs every trainer to the end, one step each in turn (rotating the order), so a
    noisy neighbour slows them all alike and their wall times stay comparable."""
    bar = tqdm(total=sum(t.task.steps for t in trainers), desc=desc,
               disable=args.no_progress or None, dynamic_ncols=True)
    k = 0
    while True:
        live = [t for t in trainers if not t.done]
        if not live:
            break
        k = (k + 1) % len(live)
        for t in live[k:] + live[:k]:
            t.step()
            bar.update(1)
    bar.close()
    return [t.close() for t in trainers]


def peak_memory(task: Task, opt_name: str, lr: float, device, args) -> Optional[float]:
    """Peak memory of a short run alone (model, optimizer state, activations, and the
    double-backward graph of ESGD-M's D-steps: 25 steps include 21 of them)."""
    with PeakMemory(device) as mem:
        t = Trainer(task, opt_name, lr, 0, device, args)
        for _ in range(min(25, task.steps)):
            if t.done:
                break
            t.step()
        t.close()
        del t
    return mem.mib


# ------------------------------------------------------------------------- protocol

def run_task(task: Task, device, args, log) -> dict:
    """Peak memory per optimizer (alone), then the sweep in lockstep, then the extra
    seeds of each optimizer's chosen rate in lockstep."""
    peaks = {o: peak_memory(task, o, task.lrs[o][len(task.lrs[o]) // 2], device, args)
             for o in args.optimizers}

    def report(r):
        log(f"  {task.name:12s} {r.optimizer:7s} lr={r.lr:<7g} seed {r.seed}: "
            f"train(tail) {r.tail_train_loss():.4g}  {task.metric} {r.final(task.metric):.4g}  "
            f"{r.total_s():.1f}s" + (f"  NON-FINITE at step {r.nonfinite_step}" if r.diverged else ""))

    sweep = [Trainer(task, o, lr, 0, device, args) for o in args.optimizers for lr in task.lrs[o]]
    runs = lockstep(sweep, f"{task.name} sweep", args)
    for r in runs:
        report(r)
    best = choose_best(runs, args.optimizers)
    extra = [Trainer(task, o, best[o], seed, device, args)
             for o in args.optimizers for seed in range(1, args.seeds)]
    if extra:
        more = lockstep(extra, f"{task.name} seeds", args)
        for r in more:
            report(r)
        runs += more
    for r in runs:
        r.peak_mib = peaks[r.optimizer]
    return dict(task=task, runs=runs, best=best)


def choose_best(runs: list[Run], optimizers) -> dict[str, float]:
    """Each optimizer's learning rate with the lowest tail training loss (seed 0 runs)."""
    best = {}
    for o in optimizers:
        sweep = [r for r in runs if r.optimizer == o and r.seed == 0]
        if sweep:
            best[o] = min(sweep, key=lambda r: r.tail_train_loss()).lr
    return best


def interp_at(run: Run, t: float, metric: str) -> float:
    """The eval metric at train time ``t`` (linear between evaluations)."""
    pts = [(s, m[metric]) for _, s, m in run.evals]
    if run.diverged or not pts or t > pts[-1][0] + 1e-9:
        return math.nan
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= t <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (t - s0) / (s1 - s0)
    return pts[-1][1]


def mean_sd(values: list[float]) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "diverged"
    m = sum(vals) / len(vals)
    if len(vals) > 1:  # 4 significant digits for the mean, the same decimals for the sd
        d = max(0, 3 - math.floor(math.log10(abs(m)))) if m else 4
        s = f"{m:.{d}f} ± {statistics.stdev(vals):.{d}f}"
    else:
        s = fmt(m, 4)
    if len(vals) < len(values):
        s += f" ({len(values) - len(vals)} diverged)"
    return s


def summary(result: dict, args) -> tuple[str, dict]:
    task, runs, best = result["task"], result["runs"], result["best"]
    metric = task.metric
    picked = {o: [r for r in runs if r.optimizer == o and r.lr == best[o]] for o in args.optimizers}
    # equal-time comparison: the shortest total training time among the chosen runs
    # (that did not diverge), so that every one of them has reached it
    t_eq = min((r.total_s() for rs in picked.values() for r in rs if not r.diverged), default=0.0)
    body = []
    for o in args.optimizers:
        rs, allruns = picked[o], [r for r in runs if r.optimizer == o]
        grid = task.lrs[o]
        edge = " (edge)" if len(grid) > 1 and best[o] in (grid[0], grid[-1]) else ""
        plain, dstep = statistics.median([r.ms("plain") for r in rs]), None
        if o == "ESGD-M":
            dstep = statistics.median([r.ms("d") for r in rs])
        amort = plain if dstep is None else (9 * plain + dstep) / 10
        peaks = [r.peak_mib for r in rs if r.peak_mib is not None]
        impls = sorted({r.impl for r in rs if r.impl})
        row = [
            o + (f" ({', '.join(impls)})" if impls else ""),
            ", ".join(f"{lr:g}" for lr in grid), f"{best[o]:g}{edge}",
            mean_sd([r.tail_train_loss() for r in rs]),
            mean_sd([r.final(metric) for r in rs]),
        ]
        if task.extra_metric:
            row.append(mean_sd([100 * r.final(task.extra_metric) for r in rs]))
        row += [
            mean_sd([interp_at(r, t_eq, metric) for r in rs]),
            fmt(statistics.median([r.total_s() * 1e3 / max(1, r.steps_done) for r in rs])),
            fmt(plain), "" if dstep is None else fmt(dstep), fmt(amort),
            fmt(max(peaks)) if peaks else "n/a",
            f"{sum(r.diverged for r in allruns)}/{len(allruns)}",
        ]
        body.append(row)
    headers = ["optimizer", "lr sweep", "chosen lr", "train loss (last 10%)", f"final {metric}"]
    if task.extra_metric:
        headers.append(f"{task.extra_metric} %")
    headers += [f"{metric} at {t_eq:.1f} s", "ms/step (all)", "plain ms", "D-step ms",
                "amortised ms", "peak MiB", "non-finite runs"]
    return markdown_table(headers, body, align="lll" + "r" * (len(headers) - 3)), dict(t_eq=t_eq)


def plot_task(result: dict, path: str, meta: dict, args) -> None:
    """Training-set and held-out loss against steps and against training time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    task, runs, best = result["task"], result["runs"], result["best"]
    colors = {"ESGD-M": "tab:red", "AdamW": "tab:blue", "SGD": "tab:green"}
    metrics = ("train loss", task.metric)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharex="col")
    for o in args.optimizers:
        c = colors.get(o)
        rs = [r for r in runs if r.optimizer == o and r.lr == best[o]]
        n = min(len(r.evals) for r in rs)
        for row, metric in enumerate(metrics):
            for r in runs:  # the rest of the sweep, thin, against steps only
                if r.optimizer == o and r.lr != best[o] and r.seed == 0:
                    axes[row][0].plot([e[0] for e in r.evals], [e[2][metric] for e in r.evals],
                                      ls=":", lw=0.8, color=c, alpha=0.5)
            for col in (0, 1):
                xs = [statistics.mean(r.evals[i][col] for r in rs) for i in range(n)]
                vals = [[r.evals[i][2][metric] for r in rs] for i in range(n)]
                axes[row][col].plot(
                    xs, [statistics.mean(v) for v in vals], color=c,
                    label=f"{o} lr={best[o]:g}" + (f" ({len(rs)} seeds)" if len(rs) > 1 else ""))
                if len(rs) > 1:
                    axes[row][col].fill_between(xs, [min(v) for v in vals], [max(v) for v in vals],
                                                color=c, alpha=0.2)
    for row, metric in enumerate(metrics):
        for col in (0, 1):
            ax = axes[row][col]
            ax.set_ylabel(metric if metric != "train loss" else "training-set loss", fontsize=8)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2, 3, 5)))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
            ax.tick_params(axis="both", which="both", labelsize=7)
            ax.grid(alpha=0.3, which="both")
    axes[1][0].set_xlabel("step  (dotted: the other learning rates of the sweep, seed 0)", fontsize=8)
    axes[1][1].set_xlabel("training wall time, s (evaluation excluded)", fontsize=8)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{task.title}\n{meta['machine']}", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=72)
    plt.close(fig)


# ------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tasks", default="autoencoder,convnet,charlm")
    ap.add_argument("--optimizers", default="ESGD-M,AdamW,SGD")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds for each optimizer's chosen lr (default 3; 1 with --quick/--smoke)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every task's step count")
    ap.add_argument("--quick", action="store_true", help="a fifth of the steps, 1 seed")
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything (for tests)")
    ap.add_argument("--lrs", help="learning-rate sweeps, e.g. 'ESGD-M=0.3,1,3;AdamW=1e-3,3e-3'")
    ap.add_argument("--esgdm-backend", default="auto")
    ap.add_argument("--esgdm-hvp", default=None,
                    help="passed to ESGDM(hvp=...) when given (e.g. finite_difference)")
    ap.add_argument("--attention", default="manual", choices=("manual", "sdpa-math", "sdpa"))
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--text-bytes", type=int, default=2_000_000)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--plots", help="folder for one PNG per task")
    ap.add_argument("--json", help="write every run (curves included) to this path")
    ap.add_argument("--markdown", help="write the summary tables to this path")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--render", metavar="JSON",
                    help="train nothing: rewrite --markdown/--plots from a saved --json file")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    scale = args.scale
    if args.smoke:
        args.seeds = args.seeds or 1
        args.text_bytes, args.width, args.ctx = min(args.text_bytes, 100_000), min(args.width, 32), 32
    elif args.quick:
        scale, args.seeds = scale * 0.2, args.seeds or 1
        args.text_bytes = min(args.text_bytes, 500_000)
    args.seeds = args.seeds or 3
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    grids = {}
    for part in filter(None, (args.lrs or "").split(";")):
        name, _, values = part.partition("=")
        if name.strip() not in OPTIMIZERS or not values:
            raise SystemExit(f"cannot read --lrs part {part!r}; write e.g. 'AdamW=1e-3,3e-3'")
        grids[name.strip()] = tuple(float(v) for v in values.split(","))
    for o in args.optimizers:
        if o not in OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZERS)}")
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    meta = dict(machine=machine(device), command="python " + " ".join(
        [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))),
        torch=torch.__version__, esgdm=esgdm.__version__, seeds=args.seeds)
    print(f"# bench_train on {meta['machine']}", flush=True)

    def log(msg):
        print(msg, flush=True)

    tasks = []
    if {"autoencoder", "convnet"} & set(wanted):
        tasks += [t for t in digits_tasks(device, scale) if t.name in wanted]
    if "charlm" in wanted:
        tasks.append(charlm_task(device, scale, args))
    tasks.sort(key=lambda t: wanted.index(t.name))
    for t in tasks:
        t.lrs = {**t.lrs, **grids}
    if args.smoke:  # 30 steps: 20 warmup D-steps, then the 1-in-10 schedule; middle lr only
        for t in tasks:
            t.steps, t.eval_every = 30, 10
            t.lrs = {o: (grid[len(grid) // 2],) for o, grid in t.lrs.items()}
    unknown = set(wanted) - {"autoencoder", "convnet", "charlm"}
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}; choose autoencoder, convnet, charlm")

    t_start = time.perf_counter()
    results = []
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        meta = saved["meta"]
        args.seeds = meta.get("seeds", args.seeds)
        runs = [Run(**r) for r in saved["runs"]]
        for task in tasks:
            rs = [r for r in runs if r.task == task.name]
            if not rs:
                continue
            info = meta.get("tasks", {}).get(task.name, {})
            task.steps = info.get("steps", max(r.steps_done for r in rs))
            task.data_note = info.get("data_note", task.data_note)
            task.lrs = {o: tuple(sorted({r.lr for r in rs if r.optimizer == o and r.seed == 0}))
                        for o in args.optimizers}
            results.append(dict(task=task, runs=rs, best=choose_best(rs, args.optimizers)))
    else:
        meta["tasks"] = {}
        for task in tasks:
            log(f"\n## {task.title}: {task.steps} steps; {task.data_note}")
            log("   lr sweeps: " + "; ".join(f"{o} {', '.join(f'{x:g}' for x in task.lrs[o])}"
                                              for o in args.optimizers))
            result = run_task(task, device, args, log)
            log("")
            log(summary(result, args)[0])
            results.append(result)
            meta["tasks"][task.name] = dict(steps=task.steps, data_note=task.data_note)
        meta["seconds"] = round(time.perf_counter() - t_start)
        log(f"\nTotal {meta['seconds']} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, runs=[dict(r.__dict__) for res in results
                                                for r in res["runs"]]), f)
    write_report(results, meta, args, device, log)
    return results


def write_report(results, meta, args, device, log) -> None:
    """The markdown summary (``--markdown``) and one PNG per task (``--plots``)."""
    took = f" ({meta['seconds']} s)" if "seconds" in meta else ""
    out_md = [f"Machine: {meta['machine']}  ", f"Command: `{meta['command']}`{took}  ", ""]
    for result in results:
        task = result["task"]
        table, info = summary(result, args)
        out_md += [f"### {task.title}", "",
                   f"{task.steps} steps, {task.data_note}. Learning rate chosen by training loss "
                   f"over the last 10% of steps (seed 0); {args.seeds} seed(s) at the chosen rate "
                   f"(mean ± sd). '{task.metric} at {info['t_eq']:.1f} s': each optimizer after as "
                   "much training time as the quickest of these runs took in all (all runs "
                   "advanced in lockstep, one step each in turn). Peak memory: "
                   f"{PeakMemory(device).how} over 25 steps of each optimizer alone, model + "
                   "optimizer + activations (+ ESGD-M's double-backward graph).", "", table, ""]
        if args.plots:
            os.makedirs(args.plots, exist_ok=True)
            path = os.path.join(args.plots, f"train_{task.name}_{device.type}.png")
            plot_task(result, path, meta, args)
            where = os.path.dirname(os.path.abspath(args.markdown)) if args.markdown else os.getcwd()
            out_md += [f"![{task.name}]({os.path.relpath(os.path.abspath(path), where)})", ""]
            log(f"plot: {path}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(out_md))


if __name__ == "__main__":
    main()
