"""Every Python recipe in the README runs as written.

Each ```python block of README.md is either executed here, on a small model with the
names the recipes use (``model``, ``data``, ``loss_fn``, ``x``, ``y``), and must then
train it, or it is a sketch that needs a framework or several processes, and then
:data:`COVERED_ELSEWHERE` names the test that runs the same recipe for real.  A new
block that is neither fails :func:`test_every_block_is_run_or_covered`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import esgdm

README = Path(__file__).resolve().parent.parent / "README.md"

#: A phrase that marks a sketch block -> the test file that runs that recipe for real.
COVERED_ELSEWHERE = {
    "fully_shard(": "tests/test_distributed.py",
    "ESGDMTrainer(": "tests/test_integrations_transformers.py",
    "L.LightningModule": "tests/test_integrations_lightning.py",
    "L.Trainer(": "tests/test_integrations_lightning.py",
    "torchrun": "tests/test_distributed.py",
}

#: Blocks that compile a model: minutes of compile time on 2 CPU cores at worst.
SLOW = ("torch.compile(", ".compile()")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _covered_by(block: str) -> str | None:
    return next((test for phrase, test in COVERED_ELSEWHERE.items() if phrase in block), None)


def _runnable() -> list:
    out = []
    for k, block in enumerate(python_blocks()):
        if _covered_by(block) is not None:
            continue
        first = next(line for line in block.splitlines() if line.strip() and not line.startswith("import"))
        marks = [pytest.mark.slow] if any(s in block for s in SLOW) else []
        out.append(pytest.param(block, id=f"block{k}:{first.strip()[:40]}", marks=marks))
    return out


def test_every_block_is_run_or_covered():
    blocks = python_blocks()
    assert len(blocks) >= 4, "README lost its recipes?"
    root = README.parent
    for block in blocks:
        test = _covered_by(block)
        if test is not None:
            assert (root / test).exists(), f"{test} (covering a README recipe) is missing"
    assert len(_runnable()) + sum(_covered_by(b) is not None for b in blocks) == len(blocks)


def _namespace() -> dict:
    """The names the README's recipes use, bound to a small regression problem."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    w_true = torch.randn(6, 1, generator=gen)
    data = []
    for _ in range(40):
        xb = torch.randn(32, 6, generator=gen)
        data.append((xb, torch.tanh(xb @ w_true)))
    x, y = data[0]
    return dict(torch=torch, esgdm=esgdm, model=model, data=data, loss_fn=torch.nn.functional.mse_loss,
                x=x, y=y)


def _full_loss(ns: dict) -> float:
    with torch.no_grad():
        return sum(float(ns["loss_fn"](ns["model"](xb), yb)) for xb, yb in ns["data"]) / len(ns["data"])


@pytest.mark.parametrize("block", _runnable())
def test_readme_recipe_runs_as_written(block):
    ns = _namespace()
    before = _full_loss(ns)
    params_before = [p.detach().clone() for p in ns["model"].parameters()]
    exec(compile(block, str(README), "exec"), ns)
    opt = ns.get("opt")
    assert isinstance(opt, esgdm.ESGDM), "the recipe should build an esgdm.ESGDM called opt"
    if opt.steps == 0:  # a recipe that only builds the optimizer (parameter groups): step it
        for xb, yb in ns["data"]:
            opt.zero_grad(set_to_none=True)
            ns["loss_fn"](ns["model"](xb), yb).backward(create_graph=opt.should_create_graph())
            opt.step()
    moved = any(not torch.equal(a, b.detach()) for a, b in zip(params_before, ns["model"].parameters()))
    assert moved and opt.steps > 0
    if opt.steps >= len(ns["data"]):  # a whole pass over the data: it must have learnt
        assert _full_loss(ns) < before, (before, _full_loss(ns))
