"""Finite-difference curvature from several threads at once.

torch's own optimizers can train separate models in separate threads; so can ESGDM
with hvp="finite_difference": the probe installs nothing global (no module hooks),
restores only its own model's buffers, and touches torch's process-wide generators
only when its closure drew from them, under a lock that orders the closures of all
ESGDM optimizers (see esgdm/guards.py).
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import esgdm
from esgdm.hvp import GENERATORS

STEPS = 12
SCHEDULE = dict(d_warmup=4, update_d_every=3)  # D-steps and plain steps mixed


class OwnDropout(torch.nn.Module):
    """Dropout drawing from a generator of its own (reseeded by the closure), so that
    a run's masks do not depend on what other threads draw."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator = torch.Generator()

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape, generator=self.generator) >= self.p
        return x * keep / (1 - self.p)


def make_model(seed: int, dropout: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.BatchNorm1d(32), torch.nn.Tanh(),
                               dropout, torch.nn.Linear(32, 4))


def setup(seed: int, dropout: str, scheme: str = "forward", masks: list | None = None):
    """A model (BatchNorm, and dropout "own", "global" or "none"), its data and its
    optimizer, built in the calling thread (initialisation draws from the global
    generator); returns the training job.  ``masks`` collects the dropout mask of
    every closure call."""
    drop = {"own": lambda: OwnDropout(0.3), "global": lambda: torch.nn.Dropout(0.3),
            "none": torch.nn.Identity}[dropout]()
    model = make_model(seed, drop)
    if masks is not None:
        drop.register_forward_hook(lambda m, args, out: masks.append(out != 0))
    g = torch.Generator().manual_seed(100 + seed)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g)
    opt = esgdm.ESGDM(model.parameters(), lr=0.3, hvp="finite_difference", fd_scheme=scheme,
                      backend="torch", seed=seed, **SCHEDULE)

    def train() -> dict:
        """Its parameters, buffers, optimizer state and losses after STEPS steps."""
        losses, d_steps = [], []
        for step in range(STEPS):
            def closure():
                if dropout == "own":
                    drop.generator.manual_seed(1000 * seed + step)  # the same masks for the probe  # noqa: B023 (used within this iteration)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            d_steps.append(opt.is_d_step())
            losses.append(opt.step(closure).item())
        return {"params": [p.detach().clone() for p in model.parameters()],
                "buffers": [b.clone() for b in model.buffers()],
                "state": [t.clone() for s in opt.state.values() for t in s.values()],
                "losses": losses, "d_steps": d_steps}

    return train


def in_threads(*jobs):
    """Runs the jobs in threads that start together; re-raises a thread's error."""
    out = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def body(i, job):
        try:
            start.wait()
            out[i] = job()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            out[i] = e

    threads = [threading.Thread(target=body, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


def same(a: dict, b: dict) -> bool:
    return a["losses"] == b["losses"] and all(
        torch.equal(u, v) for key in ("params", "buffers", "state") for u, v in zip(a[key], b[key]))


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_two_threads_give_the_numbers_of_two_runs_one_after_the_other(scheme):
    """BatchNorm and dropout (from the models' own generators): bit for bit the
    numbers of the same two runs made one after the other, however they interleave."""
    alone = [setup(seed, "own", scheme)() for seed in (1, 2)]
    assert alone[0]["losses"] != alone[1]["losses"]
    for _ in range(3):
        together = in_threads(*(setup(seed, "own", scheme) for seed in (1, 2)))
        for a, b in zip(alone, together):
            assert same(a, b)


def test_every_probe_replays_its_own_masks_with_the_global_generator():
    """nn.Dropout draws from torch's process-wide generator, which the threads share:
    which thread gets which numbers depends on timing (with any optimizer), but each
    probe must draw exactly the masks of its own main evaluation, and no thread may
    be handed numbers replayed for another's probe."""
    for _ in range(3):
        masks = ([], [])
        jobs = [setup(i + 1, "global", masks=masks[i]) for i in range(2)]
        results = in_threads(*jobs)
        for result, seen in zip(results, masks):
            calls = iter(seen)
            per_step = [[next(calls) for _ in range(2 if d else 1)] for d in result["d_steps"]]
            assert next(calls, None) is None
            for step in per_step:
                if len(step) == 2:  # a D-step: main evaluation, then probe
                    assert torch.equal(step[0], step[1])
        # Apart from each probe repeating its main evaluation, no two calls (in either
        # thread) drew the same mask.
        everything = [m for seen in masks for m in seen]
        distinct = {tuple(m.flatten().tolist()) for m in everything}
        d_steps = sum(sum(r["d_steps"]) for r in results)
        assert len(distinct) == len(everything) - d_steps


def test_a_thread_drawing_under_the_lock_gets_its_stream_untouched():
    """A BatchNorm model without dropout trains with finite differences while another
    thread draws from the global generator, holding esgdm.guards.GENERATORS shared as
    the README asks of code that draws next to ESGDM: the D-steps neither rewind nor
    restore the generator, so that thread gets exactly the stream it gets alone."""
    for _ in range(3):
        train = setup(3, "none")
        done = threading.Event()

        def draw():
            chunks = []
            while not done.is_set() or len(chunks) < 100:  # noqa: B023 (used within this iteration)
                with GENERATORS.hold(exclusive=False):
                    chunks.append(torch.rand(7))
            return chunks

        def train_then_stop():
            try:
                return train()  # noqa: B023 (used within this iteration)
            finally:
                done.set()  # noqa: B023 (used within this iteration)

        torch.manual_seed(5)
        drawn, _ = in_threads(draw, train_then_stop)
        torch.manual_seed(5)
        assert len(drawn) >= 100 and all(torch.equal(torch.rand(7), chunk) for chunk in drawn)
