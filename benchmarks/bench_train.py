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
more seeds and the table gives the mean and spread over seeds.  No weight decay anywhere;
SGD uses Nesterov momentum 0.9; AdamW and SGD
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

Four more digits tasks exercise curvature that a probe never observes (Hessian-vector
products exactly zero on every D-step) or observes rarely: ``reluconv`` (ReLU + max
pooling), ``geluconv`` (GELU + max pooling), ``deadmlp`` (a ReLU MLP with many dead
units) and ``mostlydead`` (the same MLP with almost every first-layer unit dead at the
start).  They are not in the default ``--tasks``.

Two ESGD-M-only studies replace the optimizer comparison when asked for:

* ``--rules``: the default unobserved-curvature rule against the original one
  (``exact=True``) at each of ``--rule-lrs`` in each of ``--hvps`` (autograd, and
  finite differences with a closure), ``--seeds`` seeds each: final losses, accuracy,
  non-finite runs, the largest |p|, the share of elements with ``D == 0`` and below the
  floor, and whether each rule's parameters are bitwise equal to ``--rule-base``'s; one
  PNG of loss curves.  ``--rule-names`` also takes ``nofloor`` (the default rule
  without the floor on ``sqrt(D)``, the default before it) and ``floor<x>`` (a floor of
  ``x * dscale``): these run on the "torch" backend with the floor replaced;
* ``--lowprec``: float32 weights, float32 weights with bf16 state, bf16 weights with
  round-to-nearest and with stochastic rounding, and bf16 weights with bf16 state, at
  each task's rate: losses, loss relative to float32 at the same seed, the share of
  elements a step changes, step and ``opt.step()`` times, optimizer-state bytes
  (``sum(b.nbytes() for b in opt.buckets())``); one PNG per task.  It includes 8-bit
  state (``fp32 + 8-bit state``, ``bf16 + 8-bit state, stochastic``);
  ``--lowprec-variants`` picks some variants.

    python benchmarks/bench_train.py --rules --quick --seeds 2 --tasks reluconv,geluconv,deadmlp
    python benchmarks/bench_train.py --rules --quick --tasks deadmlp,mostlydead \
        --rule-names nofloor,floor0.25,floor0.0625 --rule-base nofloor --rule-lrs 0.5,1
    python benchmarks/bench_train.py --lowprec --quick --tasks convnet,charlm
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
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchutil import (  # noqa: E402
    PeakMemory,
    fmt,
    machine,
    markdown_table,
    pick_device,
    save_png,
    sync,
)

import esgdm  # noqa: E402

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


class PoolConvNet(nn.Module):
    """conv3x3(16)-act-maxpool2-conv3x3(32)-act-maxpool2-linear(10) on 1x8x8 images.

    With ReLU, weights into units that were dead on a probe batch, and inputs that max
    pooling discarded there, get a Hessian-vector product of exactly zero: the case
    that the unobserved-curvature rule is for."""

    def __init__(self, act: str = "relu", c1=16, c2=32):
        super().__init__()
        self.act = {"relu": F.relu, "gelu": F.gelu}[act]
        self.c1 = nn.Conv2d(1, c1, 3, padding=1)
        self.c2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(self.act(self.c1(x.view(-1, 1, 8, 8))), 2)
        x = F.max_pool2d(self.act(self.c2(x)), 2)
        return self.fc(x.flatten(1))


class DeadMLP(nn.Module):
    """64-128-128-10 ReLU MLP whose hidden biases start in U(-0.5, 0.1), so that many
    units are dead on every image (with ``torch.manual_seed(0)``: 17% of the first
    layer's and 59% of the second's at initialisation) and others fire on few images:
    their weights see zero curvature on most probe batches and nonzero gradients on
    some steps."""

    def __init__(self, sizes=(64, 128, 128, 10), bias_range=(-0.5, 0.1), first_bias_range=None):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        with torch.no_grad():
            for lin in self.layers[:-1]:
                lin.bias.uniform_(*bias_range)
            if first_bias_range is not None:
                self.layers[0].bias.uniform_(*first_bias_range)

    def forward(self, x):
        for lin in self.layers[:-1]:
            x = F.relu(lin(x))
        return self.layers[-1](x)


def mostly_dead_mlp() -> DeadMLP:
    """The harder variant of :class:`DeadMLP`: first-layer biases in U(-1.5, -0.5), so
    that almost every first-layer unit starts dead (on the 1438 training images, seeds
    0/1/2: 91/90/95% of them never fire and 98/94/95% fire on fewer than 1%); the second
    layer's biases in U(-0.5, 0.1) as in DeadMLP."""
    return DeadMLP(first_bias_range=(-1.5, -0.5))


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
    extra_metric: str | None = None  # e.g. "test acc"


#: Learning-rate sweeps per task, centred (by a wider 5-point sweep on this machine,
#: 1 seed, see RESULTS.md) on each optimizer's best rate for the default step budget.
LR_GRIDS = {
    "autoencoder": {"ESGD-M": (0.3, 1.0, 3.0), "AdamW": (1e-3, 3e-3, 1e-2), "SGD": (1.0, 3.0, 10.0)},
    "convnet": {"ESGD-M": (0.3, 1.0, 3.0), "AdamW": (3e-3, 1e-2, 3e-2), "SGD": (0.03, 0.1, 0.3)},
    "charlm": {"ESGD-M": (1.0, 3.0, 10.0), "AdamW": (3e-3, 1e-2, 3e-2), "SGD": (0.1, 0.3, 1.0)},
    # the four networks with unobserved or rare curvature (not in the default --tasks): a
    # grid around the README's 0.5, and AdamW/SGD grids as for the convnet (not tuned)
    "reluconv": {"ESGD-M": (0.1, 0.3, 1.0), "AdamW": (3e-3, 1e-2, 3e-2), "SGD": (0.03, 0.1, 0.3)},
    "geluconv": {"ESGD-M": (0.1, 0.3, 1.0), "AdamW": (3e-3, 1e-2, 3e-2), "SGD": (0.03, 0.1, 0.3)},
    "deadmlp": {"ESGD-M": (0.1, 0.3, 1.0), "AdamW": (3e-3, 1e-2, 3e-2), "SGD": (0.03, 0.1, 0.3)},
    "mostlydead": {"ESGD-M": (0.1, 0.3, 1.0), "AdamW": (3e-3, 1e-2, 3e-2), "SGD": (0.03, 0.1, 0.3)},
}
TASKS = ("autoencoder", "convnet", "charlm", "reluconv", "geluconv", "deadmlp", "mostlydead")
DIGITS_TASKS = ("autoencoder", "convnet", "reluconv", "geluconv", "deadmlp", "mostlydead")
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

    def cls_loss(model, b):  # logits in float32 whatever the parameters' dtype
        return F.cross_entropy(model(b[0]).float(), b[1])

    @torch.no_grad()
    def cls_eval(model):
        dt = next(model.parameters()).dtype
        out = model(xte.to(dt)).float()
        return {"train loss": F.cross_entropy(model(xtr.to(dt)).float(), ytr).item(),
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
        Task("reluconv", "ReLU + max-pool convnet, sklearn digits (test cross-entropy)",
             lambda: PoolConvNet("relu"), shifted_batch, cls_loss, cls_eval, steps=int(1000 * scale),
             eval_every=max(5, int(50 * scale)), lrs=LR_GRIDS["reluconv"],
             data_note=note + ", random 1-pixel shifts", extra_metric="test acc"),
        Task("geluconv", "GELU + max-pool convnet, sklearn digits (test cross-entropy)",
             lambda: PoolConvNet("gelu"), shifted_batch, cls_loss, cls_eval, steps=int(1000 * scale),
             eval_every=max(5, int(50 * scale)), lrs=LR_GRIDS["geluconv"],
             data_note=note + ", random 1-pixel shifts", extra_metric="test acc"),
        Task("deadmlp", "ReLU MLP with dead units, sklearn digits (test cross-entropy)", DeadMLP,
             batch, cls_loss, cls_eval, steps=int(1000 * scale), eval_every=max(5, int(50 * scale)),
             lrs=LR_GRIDS["deadmlp"], data_note=note, extra_metric="test acc"),
        Task("mostlydead", "ReLU MLP, first layer almost all dead, sklearn digits (test cross-entropy)",
             mostly_dead_mlp, batch, cls_loss, cls_eval, steps=int(1000 * scale),
             eval_every=max(5, int(50 * scale)), lrs=LR_GRIDS["mostlydead"], data_note=note,
             extra_metric="test acc"),
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

    def loss(model, b):  # logits in float32 whatever the parameters' dtype
        logits = model(b[0]).float()
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

@dataclass
class Variant:
    """One configuration of a run beyond (optimizer, lr, seed): extra ``ESGDM``
    keywords, the parameters' dtype, the HVP mode (``None``: ``--esgdm-hvp``) and the
    floor on ``sqrt(D)`` relative to ``dscale`` (``None``: the built-in one)."""
    label: str = ""
    esgdm: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    hvp: str | None = None
    floor: float | None = None


class _FloorOverride:
    """Replaces the "torch" backend's floor on sqrt(D) (``esgdm.rule.DSCALE_FLOOR``,
    looked up on every step) for the duration of a ``with`` block: a study of other
    floors, not a setting of esgdm (the fused kernels have the floor built in, so such
    runs use ``backend="torch"``)."""

    def __init__(self, floor: float | None):
        self.floor = floor

    def __enter__(self):
        if self.floor is not None:
            from esgdm.backends import torch_impl
            self.saved = torch_impl.DSCALE_FLOOR
            torch_impl.DSCALE_FLOOR = self.floor

    def __exit__(self, *exc):
        if self.floor is not None:
            from esgdm.backends import torch_impl
            torch_impl.DSCALE_FLOOR = self.saved


def make_optimizer(name: str, params, lr: float, args, seed: int = 0, device=None,
                   variant: Variant | None = None):
    if name == "ESGD-M":
        # its own stream of Rademacher vectors, so that interleaved runs do not share one
        # (the same seed gives the same vectors whatever the variant)
        gen = torch.Generator(device=device or "cpu").manual_seed(20_000 + seed)
        kw = dict(lr=lr, backend=args.esgdm_backend, generator=gen)
        hvp = (variant.hvp if variant is not None else None) or args.esgdm_hvp
        if hvp:
            if "hvp" not in inspect.signature(esgdm.ESGDM).parameters:
                raise SystemExit("--esgdm-hvp given, but this esgdm.ESGDM has no 'hvp' argument")
            kw["hvp"] = hvp
        if variant is not None:
            kw.update(variant.esgdm)
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


def train_step(opt, model, task, b, hvp_mode: str | None, timer: list | None = None):
    """One step; returns (loss, whether it was an ESGD-M D-step).  With ``timer`` (a
    list), the seconds of ``opt.step()`` alone are appended to it (synchronised; the
    closure-based path does not time it: its step includes the closure)."""
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
    if timer is None:
        opt.step()
    else:
        dev = loss.device
        sync(dev)
        t0 = time.perf_counter()
        opt.step()
        sync(dev)
        timer.append(time.perf_counter() - t0)
    return loss, d_step


@dataclass
class Run:
    task: str
    optimizer: str
    lr: float
    seed: int
    steps_done: int = 0
    nonfinite_step: int | None = None
    evals: list = field(default_factory=list)       # (step, train seconds, {metric: value})
    train_losses: list = field(default_factory=list)
    step_ms: list = field(default_factory=list)
    d_steps: list = field(default_factory=list)
    peak_mib: float | None = None
    state_mib: float = 0.0
    impl: str = ""  # ESGD-M: the esgdm backend(s) used; torch.optim: fused/foreach/default
    # the --rules and --lowprec studies (defaults keep older --json files readable)
    variant: str = ""
    hvp: str = ""
    dtype: str = "float32"
    max_abs_p: float = 0.0           # largest finite |p| at the end (or where it stopped)
    nonfinite_params: int = 0        # parameter elements that were not finite at the end
    unobserved_frac: float = math.nan  # ESGD-M: fraction of elements with D == 0 at the end
    floored_frac: float = math.nan     # ESGD-M: fraction with 0 < sqrt(D) < floor * dscale at the end
    state_bytes: int = 0             # ESGD-M: sum of bucket.nbytes()
    opt_ms: list = field(default_factory=list)   # opt.step() alone, plain steps (--lowprec)
    changed: list = field(default_factory=list)  # (step, fraction of elements a step changed)
    fingerprint: str = ""            # digest of the final parameters' bytes
    n_params: int = 0                # parameter elements of the model

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

    def __init__(self, task: Task, opt_name: str, lr: float, seed: int, device, args,
                 variant: Variant | None = None, time_opt: bool = False):
        self.task, self.device, self.args = task, device, args
        self.variant = variant or Variant()
        self.time_opt = time_opt
        self.run = Run(task.name, opt_name, lr, seed, variant=self.variant.label,
                       hvp=(self.variant.hvp or args.esgdm_hvp or "autograd") if opt_name == "ESGD-M" else "",
                       dtype=str(self.variant.dtype).replace("torch.", ""))
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(10_000 + seed)  # batches
        # the model is built (and initialised) in float32, then cast
        self.model = task.make_model().to(device=device, dtype=self.variant.dtype)
        self.opt = make_optimizer(opt_name, self.model.parameters(), lr, args, seed, device,
                                  self.variant)
        self.elapsed = 0.0
        self.run.evals.append((0, 0.0, task.evaluate(self.model)))

    @property
    def done(self) -> bool:
        return self.run.diverged or self.run.steps_done >= self.task.steps

    def step(self) -> None:
        run, task = self.run, self.task
        b = task.batch(self.gen)
        dt_model = self.variant.dtype
        if dt_model != torch.float32:
            b = tuple(t.to(dt_model) if t.is_floating_point() else t for t in b)
        will_eval = (run.steps_done + 1) % task.eval_every == 0 or run.steps_done + 1 == task.steps
        before = [p.detach().clone() for p in self.model.parameters()] if will_eval else None
        timer = [] if self.time_opt else None
        sync(self.device)
        t0 = time.perf_counter()
        with _FloorOverride(self.variant.floor):
            loss, d_step = train_step(self.opt, self.model, task, b,
                                      self.variant.hvp or self.args.esgdm_hvp, timer)
        value = loss.item()  # synchronises
        dt = time.perf_counter() - t0
        self.elapsed += dt
        run.step_ms.append(dt * 1e3)
        run.d_steps.append(d_step)
        run.train_losses.append(value)
        if timer:
            run.opt_ms.append(timer[0] * 1e3)
        elif self.time_opt:
            run.opt_ms.append(math.nan)
        run.steps_done += 1
        if before is not None:  # how many elements this step changed at all
            changed = sum(int((p.detach() != q).sum()) for p, q in zip(self.model.parameters(), before))
            run.changed.append((run.steps_done, changed / sum(q.numel() for q in before)))
        if not math.isfinite(value):
            run.nonfinite_step = run.steps_done
        elif run.steps_done % task.eval_every == 0 or run.steps_done == task.steps:
            self.model.eval()
            run.evals.append((run.steps_done, self.elapsed, task.evaluate(self.model)))
            self.model.train()

    def close(self) -> Run:
        self.run.impl = describe_impl(self.opt)
        with torch.no_grad():
            ps = [p.detach().float() for p in self.model.parameters()]
            fin = [p[torch.isfinite(p)] for p in ps]
            self.run.max_abs_p = max((float(f.abs().max()) for f in fin if f.numel()), default=0.0)
            self.run.nonfinite_params = sum(p.numel() - f.numel() for p, f in zip(ps, fin))
        self.run.fingerprint = _param_hash(self.model)
        self.run.n_params = sum(p.numel() for p in self.model.parameters())
        if isinstance(self.opt, esgdm.ESGDM):
            ds = [st["exp_avg_d"] for st in self.opt.state.values() if "exp_avg_d" in st]
            n = sum(d.numel() for d in ds)
            if n:
                self.run.unobserved_frac = sum(int((d == 0).sum()) for d in ds) / n
                floor = self.variant.floor or esgdm.rule.DSCALE_FLOOR  # nofloor: the default's
                self.run.floored_frac = sum(int(_below_floor(d, floor).sum()) for d in ds) / n
            self.run.state_bytes = sum(b.nbytes() for b in self.opt.buckets())
        self.run.state_mib = sum(t.numel() * t.element_size() for st in self.opt.state.values()
                                 for t in st.values() if torch.is_tensor(t)) / 2**20
        self.model = self.opt = None
        return self.run


def _below_floor(d: torch.Tensor, floor: float) -> torch.Tensor:
    """Elements with observed curvature below ``floor`` times the tensor's dscale (the
    mean sqrt(D) over D > 0, as after its last D-step)."""
    root = d.double().sqrt()
    seen = root[d > 0]
    dscale = float(seen.mean()) if seen.numel() else 0.0
    return (d > 0) & (root < floor * dscale)


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


def peak_memory(task: Task, opt_name: str, lr: float, device, args) -> float | None:
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


# --------------------------------------------------------------------------- studies
#
# Two ESGD-M-only studies next to the optimizer comparison above:
#
# * ``--rules``: the default unobserved-curvature rule against the original one
#   (``exact=True``) over a learning-rate grid, with both HVP modes;
# * ``--lowprec``: float32 weights against bf16 weights with and without stochastic
#   rounding, and bf16 optimizer state.

RULES = {"default": {}, "exact": {"exact": True}}


def rule_variant(name: str, hvp: str) -> Variant:
    """The Variant of a --rule-names entry: a name of RULES, ``nofloor`` or ``floor<x>``
    (the last two on the "torch" backend, whose floor can be replaced per run)."""
    if name in RULES:
        return Variant(name, dict(RULES[name]), hvp=hvp)
    floor = 0.0 if name == "nofloor" else float(name[len("floor"):])
    return Variant(name, {"backend": "torch"}, hvp=hvp, floor=floor)


def _check_rule_name(name: str) -> bool:
    if name in RULES or name == "nofloor":
        return True
    try:
        return name.startswith("floor") and float(name[len("floor"):]) >= 0
    except ValueError:
        return False
HVP_MODES = ("autograd", "finite_difference")

#: ESGD-M's chosen rate per task in the optimizer comparison (section 2 of RESULTS.md)
LOWPREC_LRS = {"convnet": 1.0, "charlm": 3.0, "autoencoder": 1.0, "reluconv": 0.3,
               "geluconv": 1.0, "deadmlp": 0.3}

#: (label, parameter dtype, extra ESGDM keywords)
LOWPREC_VARIANTS = (
    ("fp32", torch.float32, {}),
    ("fp32 + bf16 state", torch.float32, {"state_dtype": torch.bfloat16}),
    ("bf16, round-to-nearest", torch.bfloat16, {"stochastic_rounding": False}),
    ("bf16, stochastic rounding", torch.bfloat16, {"stochastic_rounding": True}),
    ("bf16 + bf16 state, stochastic", torch.bfloat16,
     {"stochastic_rounding": True, "state_dtype": torch.bfloat16}),
    ("fp32 + 8-bit state", torch.float32, {"state_dtype": torch.uint8}),
    ("bf16 + 8-bit state, stochastic", torch.bfloat16,
     {"stochastic_rounding": True, "state_dtype": torch.uint8}),
)


def _param_hash(model) -> str:
    """A digest of every parameter's bytes: equal digests = bitwise-equal trajectories."""
    import hashlib
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_rules(tasks, device, args, log) -> list[Run]:
    """Every (HVP mode, lr, rule, seed) of each task, in lockstep per task."""
    runs = []
    for task in tasks:
        log(f"\n## {task.title}: {task.steps} steps; rules {', '.join(args.rule_names)}; "
            f"lr {', '.join(f'{x:g}' for x in args.rule_lrs)}; HVP {', '.join(args.hvps)}; "
            f"{args.seeds} seed(s)")
        trainers = [Trainer(task, "ESGD-M", lr, seed, device, args, rule_variant(rule, hvp))
                    for hvp in args.hvps for lr in args.rule_lrs for rule in args.rule_names
                    for seed in range(args.seeds)]
        done = lockstep(trainers, f"{task.name} rules", args)
        for r in done:
            log(f"  {task.name:11s} {r.hvp[:6]:6s} lr={r.lr:<4g} {r.variant:7s} seed {r.seed}: "
                f"train {r.final('train loss'):.4g}  {task.metric} {r.final(task.metric):.4g}  "
                f"max|p| {r.max_abs_p:.3g}  D==0 {100 * r.unobserved_frac:.1f}%  "
                f"floored {100 * r.floored_frac:.2f}%"
                + (f"  NON-FINITE at step {r.nonfinite_step}" if r.diverged else ""))
        runs += done
    return runs


def run_lowprec(tasks, device, args, log) -> list[Run]:
    """Every precision variant x seed of each task at its lr, in lockstep per task."""
    runs = []
    for task in tasks:
        lr = args.lowprec_lrs.get(task.name, LOWPREC_LRS.get(task.name, 1.0))
        log(f"\n## {task.title}: {task.steps} steps at lr {lr:g}; {args.seeds} seed(s)")
        trainers = [Trainer(task, "ESGD-M", lr, seed, device, args,
                            Variant(label, dict(kw), dtype=dt, hvp="autograd"), time_opt=True)
                    for label, dt, kw in LOWPREC_VARIANTS for seed in range(args.seeds)
                    if not args.lowprec_variants or label in args.lowprec_variants.split(",")]
        done = lockstep(trainers, f"{task.name} precision", args)
        for r in done:
            log(f"  {task.name:8s} {r.variant:30s} seed {r.seed}: train {r.final('train loss'):.4g}  "
                f"{task.metric} {r.final(task.metric):.4g}  state {r.state_bytes} B  "
                f"opt.step() {_median([t for t, d in zip(r.opt_ms, r.d_steps) if not d]):.3g} ms"
                + (f"  NON-FINITE at step {r.nonfinite_step}" if r.diverged else ""))
        runs += done
    return runs


def _median(xs) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else math.nan


def _sci(v: float) -> str:
    return "0" if v == 0 else f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.1e}"


def mean_sd_wide(values: list[float]) -> str:
    """:func:`mean_sd`, but values of a blown-up run (>= 1e4) in scientific notation."""
    vals = [v for v in values if math.isfinite(v)]
    if vals and max(abs(v) for v in vals) >= 1e4:
        s = " / ".join(f"{v:.1e}" for v in vals)
        return s + (f" ({len(values) - len(vals)} diverged)" if len(vals) < len(values) else "")
    return mean_sd(values)


def rules_tables(runs: list[Run], tasks, args) -> list[str]:
    out = []
    for task in tasks:
        rs = [r for r in runs if r.task == task.name]
        if not rs:
            continue
        hvps = [h for h in HVP_MODES if any(r.hvp == h for r in rs)]
        lrs = sorted({r.lr for r in rs})
        rules = list(dict.fromkeys(r.variant for r in rs))  # in --rule-names order
        base = args.rule_base
        seeds = len({r.seed for r in rs})
        headers = ["HVP", "lr", "rule", "final train loss", f"final {task.metric}"]
        if task.extra_metric:
            headers.append(f"{task.extra_metric} %")
        headers += ["non-finite runs", "max \\|p\\| (worst seed)", "D = 0 at end %",
                    "below floor at end %", f"same as {base}", "ms/step"]
        body = []
        for h in hvps:
            for lr in lrs:
                for rule in rules:
                    sel = [r for r in rs if r.hvp == h and r.lr == lr and r.variant == rule]
                    if not sel:
                        continue
                    twins = {r.seed: r for r in rs if r.hvp == h and r.lr == lr and r.variant == base}
                    same = [twins[r.seed].fingerprint == r.fingerprint for r in sel if r.seed in twins]
                    row = [h.replace("finite_difference", "finite diff."), f"{lr:g}", rule,
                           mean_sd_wide([r.final("train loss") for r in sel]),
                           mean_sd_wide([r.final(task.metric) for r in sel])]
                    if task.extra_metric:
                        row.append(mean_sd([100 * r.final(task.extra_metric) for r in sel]))
                    worst = max(sel, key=lambda r: (r.nonfinite_params > 0, r.max_abs_p))
                    row += [f"{sum(r.diverged for r in sel)}/{len(sel)}",
                            _sci(worst.max_abs_p) + (f" ({worst.nonfinite_params} non-finite)"
                                                     if worst.nonfinite_params else ""),
                            fmt(100 * statistics.mean(r.unobserved_frac for r in sel)),
                            fmt(100 * statistics.mean(r.floored_frac for r in sel)),
                            "" if rule == base or not same else
                            "yes" if all(same) else "no" if not any(same) else f"{sum(same)}/{len(same)} seeds",
                            fmt(statistics.median([r.ms("all") for r in sel]))]
                    body.append(row)
        out += [f"### {task.title}", "",
                f"{task.steps} steps, {task.data_note}; ESGD-M defaults otherwise "
                f"(`update_d_every=10`, `d_warmup=20`, `eps=1e-4`), {seeds} seed(s) per row "
                "(mean ± sd; 'diverged' where a loss was not finite). Losses on the whole "
                "training set and the held-out set at the end; max |p|: the largest finite "
                "parameter magnitude at the end (or when the loss stopped being finite), worst "
                "seed; 'D = 0 at end': elements whose curvature was never observed; 'below "
                "floor': elements with 0 < sqrt(D) < floor * dscale (the run's floor; the "
                f"default's, {esgdm.rule.DSCALE_FLOOR:g}, for exact and nofloor); 'same as {base}': the "
                f"run's parameters equal the {base} run's bit for bit (same seed).", "",
                markdown_table(headers, body, align="lll" + "r" * (len(headers) - 3)), ""]
    return out


def _log_ticks(ax) -> None:
    """Plain-number labels on a log axis (call after plotting); minor ones only where
    the axis spans less than a decade and a half, so that they do not pile up."""
    import matplotlib.ticker
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 30:
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2, 3, 5)))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    else:
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_rules(runs: list[Run], tasks, path: str, meta: dict) -> None:
    """Training-set loss against steps, seed 0: a row per task, a column per HVP mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in tasks if any(r.task == t.name for r in runs)]
    hvps = [h for h in HVP_MODES if any(r.hvp == h for r in runs)]
    lrs = sorted({r.lr for r in runs})
    colors = dict(zip(lrs, ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")))
    fig, axes = plt.subplots(len(tasks), len(hvps), figsize=(5 * len(hvps), 2.6 * len(tasks)),
                             squeeze=False)
    for i, task in enumerate(tasks):
        for j, h in enumerate(hvps):
            ax = axes[i][j]
            for r in runs:
                if r.task != task.name or r.hvp != h or r.seed != 0:
                    continue
                xs = [e[0] for e in r.evals]
                ys = [min(max(e[2]["train loss"], 1e-4), 1e4) for e in r.evals]
                ls = "-" if r.variant == "default" else "--" if r.variant == "exact" else ":"
                ax.plot(xs, ys, ls=ls, color=colors.get(r.lr), lw=1.2,
                        label=f"{r.variant} lr={r.lr:g}")
                if r.diverged:
                    ax.plot([r.nonfinite_step], [ys[-1]], "x", color=colors.get(r.lr), ms=8)
            ax.set_yscale("log")
            _log_ticks(ax)
            ax.set_title(f"{task.name}, hvp={h}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, which="both")
            if j == 0:
                ax.set_ylabel("training-set loss", fontsize=8)
            if i == len(tasks) - 1:
                ax.set_xlabel("step", fontsize=8)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle("ESGD-M: default rule (solid), exact=True (dashed), others (dotted), seed 0; "
                 "x: loss not finite\n" + meta["machine"], fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=72)
    plt.close(fig)


def lowprec_tables(runs: list[Run], tasks, args) -> list[str]:
    out = []
    for task in tasks:
        rs = [r for r in runs if r.task == task.name]
        if not rs:
            continue
        labels = [v[0] for v in LOWPREC_VARIANTS if any(r.variant == v[0] for r in rs)]
        base = [r for r in rs if r.variant == "fp32"]
        base_loss = statistics.mean(r.final("train loss") for r in base) if base else math.nan
        headers = ["weights, state", "final train loss", f"final {task.metric}"]
        if task.extra_metric:
            headers.append(f"{task.extra_metric} %")
        headers += ["train loss vs fp32: end", "second half", "elements changed by a step, end %",
                    "ms/step (all)",
                    "plain ms", "D-step ms", "opt.step() ms (plain)", "state bytes",
                    "state B/param", "non-finite runs"]
        body = []
        for label in labels:
            sel = [r for r in rs if r.variant == label]
            loss = [r.final("train loss") for r in sel]
            fin = [v for v in loss if math.isfinite(v)]
            rel = (statistics.mean(fin) / base_loss - 1) if fin and base_loss == base_loss else math.nan
            row = [label, mean_sd(loss), mean_sd([r.final(task.metric) for r in sel])]
            if task.extra_metric:
                row.append(mean_sd([100 * r.final(task.extra_metric) for r in sel]))
            nparams = sel[0].n_params or _count_params(task)
            row += ["" if label == "fp32" else f"{100 * rel:+.1f}%",
                    "" if label == "fp32" else _half_ratio(sel, base),
                    fmt(100 * statistics.mean(r.changed[-1][1] for r in sel if r.changed)),
                    fmt(statistics.median([r.ms("all") for r in sel])),
                    fmt(statistics.median([r.ms("plain") for r in sel])),
                    fmt(statistics.median([r.ms("d") for r in sel])),
                    fmt(statistics.median([_median([t for t, d in zip(r.opt_ms, r.d_steps) if not d])
                                           for r in sel])),
                    f"{sel[0].state_bytes:,}",
                    fmt(sel[0].state_bytes / nparams) if nparams else "",
                    f"{sum(r.diverged for r in sel)}/{len(sel)}"]
            body.append(row)
        seeds = len({r.seed for r in rs})
        out += [f"### {task.title}", "",
                f"{task.steps} steps at lr {rs[0].lr:g} (ESGD-M's chosen rate in section 2), "
                f"{task.data_note}; {seeds} seed(s) per row (mean ± sd), `hvp=\"autograd\"`, "
                f"{rs[0].n_params or _count_params(task):,} parameters. Losses in float32 from the model's "
                "logits. 'train loss vs fp32': the training-set loss relative to the fp32 run "
                "of the same seed (same initialisation, batches and probe vectors), at the end and "
                "averaged over the evaluations of the second half of the run. "
                "'elements changed by a step': the share of parameter elements whose "
                "stored value a single step changed, at the last evaluation. 'opt.step() ms': "
                "the optimizer step alone on plain steps (median). State bytes: the sum of "
                "`bucket.nbytes()` (m, D and the per-tensor scalars).", "",
                markdown_table(headers, body, align="l" + "r" * (len(headers) - 1)), ""]
    return out


def _half_ratio(sel: list[Run], base: list[Run]) -> str:
    """Training-set loss over fp32's at the same seed and step, averaged over the
    evaluations of the second half of the run (and over seeds), as a signed percentage:
    the last evaluation alone is noisy."""
    ref = {r.seed: {e[0]: e[2]["train loss"] for e in r.evals} for r in base if not r.diverged}
    ratios = []
    for r in sel:
        if r.diverged or r.seed not in ref:
            continue
        half = r.evals[-1][0] / 2
        ratios += [e[2]["train loss"] / ref[r.seed][e[0]] for e in r.evals
                   if e[0] > half and e[0] in ref[r.seed]]
    return f"{100 * (statistics.mean(ratios) - 1):+.1f}%" if ratios else "n/a"


_NPARAMS: dict = {}


def _count_params(task) -> int:
    if task.name not in _NPARAMS:
        _NPARAMS[task.name] = sum(p.numel() for p in task.make_model().parameters())
    return _NPARAMS[task.name]


def plot_lowprec(runs: list[Run], task, path: str, meta: dict) -> None:
    """Training-set and held-out loss against steps per variant (mean over seeds,
    band: min to max)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in runs if r.task == task.name]
    colors = dict(zip([v[0] for v in LOWPREC_VARIANTS],
                      ("black", "tab:gray", "tab:red", "tab:blue", "tab:green")))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    base = {}
    for r in rs:  # fp32 curve per seed, for the ratio panel
        if r.variant == "fp32" and not r.diverged:
            base[r.seed] = {e[0]: e[2]["train loss"] for e in r.evals}
    for label in colors:
        sel = [r for r in rs if r.variant == label and not r.diverged]
        if not sel:
            continue
        n = min(len(r.evals) for r in sel)
        xs = [sel[0].evals[i][0] for i in range(n)]
        style = dict(color=colors[label], ls="--" if "state" in label else "-", lw=1.2, label=label)
        for ax, metric in zip(axes, ("train loss", task.metric)):
            vals = [[r.evals[i][2][metric] for r in sel] for i in range(n)]
            ax.plot(xs, [statistics.mean(v) for v in vals], **style)
            if len(sel) > 1:
                ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals],
                                color=colors[label], alpha=0.15)
        paired = [r for r in sel if r.seed in base]
        if paired:
            ratio = [statistics.mean(r.evals[i][2]["train loss"] / base[r.seed][r.evals[i][0]]
                                     for r in paired) for i in range(n)]
            axes[2].plot(xs, ratio, **style)
    for ax, metric in zip(axes, ("training-set loss", task.metric)):
        ax.set_yscale("log")
        _log_ticks(ax)
        ax.set_ylabel(metric, fontsize=8)
    axes[2].set_ylabel("training-set loss / fp32's (same seed)", fontsize=8)
    axes[2].axhline(1.0, color="black", lw=0.6)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task.title}: ESGD-M lr {rs[0].lr:g}, weights and state precision "
                 f"(mean of {len({r.seed for r in rs})} seed(s))\n{meta['machine']}", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=72)
    plt.close(fig)


def write_study_report(mode: str, runs: list[Run], tasks, meta: dict, args, device, log) -> None:
    took = f" ({meta['seconds']} s)" if "seconds" in meta else ""
    out_md = [f"Machine: {meta['machine']}  ", f"Command: `{meta['command']}`{took}  ",
              f"esgdm backend: {', '.join(sorted({r.impl for r in runs if r.impl})) or 'n/a'}  ", ""]
    if mode == "rules":
        out_md += rules_tables(runs, tasks, args)
        if args.plots:
            os.makedirs(args.plots, exist_ok=True)
            tag = f"{args.tag}_" if args.tag else ""
            path = os.path.join(args.plots, f"train_rules_{tag}{device.type}.png")
            plot_rules(runs, tasks, path, meta)
            where = os.path.dirname(os.path.abspath(args.markdown)) if args.markdown else os.getcwd()
            out_md += [f"![rules]({os.path.relpath(os.path.abspath(path), where)})", ""]
            log(f"plot: {path}")
    else:
        out_md += lowprec_tables(runs, tasks, args)
        if args.plots:
            os.makedirs(args.plots, exist_ok=True)
            where = os.path.dirname(os.path.abspath(args.markdown)) if args.markdown else os.getcwd()
            for task in tasks:
                if not any(r.task == task.name for r in runs):
                    continue
                tag = f"{args.tag}_" if args.tag else ""
                path = os.path.join(args.plots, f"train_lowprec_{task.name}_{tag}{device.type}.png")
                plot_lowprec(runs, task, path, meta)
                out_md += [f"![{task.name}]({os.path.relpath(os.path.abspath(path), where)})", ""]
                log(f"plot: {path}")
    text = "\n".join(out_md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    else:
        log(text)



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
    ap.add_argument("--steps", default="",
                    help="per-task step counts, 'task=N,...' (after --scale/--quick)")
    ap.add_argument("--tag", default="", help="appended to the study's PNG names (train_rules_<tag>_cpu.png)")
    study = ap.add_argument_group("ESGD-M studies (instead of the optimizer comparison)")
    study.add_argument("--rules", action="store_true",
                       help="default unobserved-curvature rule vs exact=True, over --rule-lrs "
                            "and --hvps (one table per task, one PNG)")
    study.add_argument("--rule-names", default="default,exact",
                       help="with --rules: default, exact, nofloor, floor<x> (e.g. floor0.0625)")
    study.add_argument("--rule-base", default="exact",
                       help="with --rules: the rule the 'same as' column compares with")
    study.add_argument("--rule-lrs", default="0.1,0.3,1", help="with --rules")
    study.add_argument("--hvps", default=",".join(HVP_MODES), help="with --rules")
    study.add_argument("--lowprec", action="store_true",
                       help="fp32 vs bf16 weights (round-to-nearest / stochastic rounding) and "
                            "bf16 state, at each task's lr (one table and one PNG per task)")
    ap.add_argument("--lowprec-variants", default="",
                    help="with --lowprec: only these variants (comma-separated labels of LOWPREC_VARIANTS, "
                         "e.g. 'fp32,fp32 + 8-bit state')")
    study.add_argument("--lowprec-lrs", default="",
                       help="with --lowprec: 'task=lr,...' (default " +
                            ", ".join(f"{k}={v:g}" for k, v in LOWPREC_LRS.items()) + ")")
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

    if args.rules and args.lowprec:
        raise SystemExit("--rules and --lowprec are separate studies: run them one at a time")
    mode = "rules" if args.rules else "lowprec" if args.lowprec else "compare"
    args.rule_lrs = [float(v) for v in args.rule_lrs.split(",") if v.strip()]
    args.rule_names = [v.strip() for v in args.rule_names.split(",") if v.strip()]
    args.hvps = [v.strip() for v in args.hvps.split(",") if v.strip()]
    if not all(map(_check_rule_name, args.rule_names)) or set(args.hvps) - set(HVP_MODES):
        raise SystemExit(f"--rule-names from {', '.join(RULES)}, nofloor, floor<x>; "
                         f"--hvps from {', '.join(HVP_MODES)}")
    try:
        args.lowprec_lrs = {k.strip(): float(v) for k, v in
                            (part.split("=") for part in args.lowprec_lrs.split(",") if part.strip())}
    except ValueError:
        raise SystemExit(f"cannot read --lowprec-lrs {args.lowprec_lrs!r}; write e.g. 'convnet=1,charlm=3'") from None
    meta["mode"] = mode

    tasks = []
    if set(DIGITS_TASKS) & set(wanted):
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
    try:
        steps = {k.strip(): int(v) for k, v in (part.split("=") for part in args.steps.split(",") if part.strip())}
    except ValueError:
        raise SystemExit(f"cannot read --steps {args.steps!r}; write e.g. 'convnet=500,charlm=100'") from None
    for t in tasks:
        if t.name in steps:
            t.steps = steps[t.name]
    unknown = set(wanted) - set(TASKS)
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")

    if mode != "compare":
        return run_study(mode, tasks, meta, args, device, log)

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


def run_study(mode: str, tasks, meta: dict, args, device, log) -> list[Run]:
    """``--rules`` / ``--lowprec``: train (or ``--render`` a saved ``--json``), then
    write the tables and plots."""
    t_start = time.perf_counter()
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        meta = saved["meta"]
        runs = [Run(**r) for r in saved["runs"]]
        for task in tasks:
            info = meta.get("tasks", {}).get(task.name, {})
            task.steps = info.get("steps", task.steps)
            task.data_note = info.get("data_note", task.data_note)
    else:
        runs = (run_rules if mode == "rules" else run_lowprec)(tasks, device, args, log)
        meta["seconds"] = round(time.perf_counter() - t_start)
        meta["tasks"] = {t.name: dict(steps=t.steps, data_note=t.data_note) for t in tasks}
        log(f"\nTotal {meta['seconds']} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, runs=[dict(r.__dict__) for r in runs]), f)
    write_study_report(mode, runs, tasks, meta, args, device, log)
    return runs


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
