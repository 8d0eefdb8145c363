"""Past one process: DDP, FSDP2 (fully_shard / DTensor) and distributed checkpoints,
on two CPU processes over gloo on loopback, each against one process on the whole batch.

Neither DDP nor FSDP2 can run the double backward that hvp="autograd" needs, so these
runs take curvature by finite differences.  The sign vectors come from a keyed
generator (seed, step, parameter, element index in the full tensor), so a sharded run
probes exactly the direction an unsharded one does, and the finite-difference radius
uses the global norm of θ (all-reduced over the mesh).

Everything is float64 so that the difference quotient does not magnify the rounding
differences between an all-reduced mean of two half-batch gradients and a whole-batch
gradient: trajectories agree to 1e-6 relative.  (In float32 the same comparison holds
only to what finite differences allow: the quotient divides gradient rounding of
order u·|g| by r ~ sqrt(u)·|θ|, so h differs by ~sqrt(u) ≈ 2e-4 relative between
runs that sum the batch in another order.)
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import rel_err

import esgdm

STEPS = 14  # D-steps (the first 4, then every 3rd) and plain steps
WORLD = 2
SEED = 11

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.slow,
]


def make_mlp():
    torch.manual_seed(0)  # 7 and 3 rows: uneven shards over two ranks
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def make_block():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        # bias=False: softmax ignores the key projection's bias, whose gradient is then
        # pure rounding noise that no two summation orders agree on.
        torch.nn.TransformerEncoderLayer(d_model=6, nhead=2, dim_feedforward=10, dropout=0.0,
                                         batch_first=True, bias=False),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6, 3)).double()


def data(kind):
    g = torch.Generator().manual_seed(1)
    shape = (STEPS, 8 * WORLD, 6) if kind == "mlp" else (STEPS, 8 * WORLD, 4, 6)
    return (torch.randn(*shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (STEPS, 8 * WORLD), generator=g))


def make_opt(params, seed=SEED):
    return esgdm.ESGDM(params, lr=0.5, update_d_every=3, d_warmup=4, hvp="finite_difference",
                       backend="torch", seed=seed)


def train(model, opt, xs, ys, after_backward=None):
    for x, y in zip(xs, ys):
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)  # noqa: B023 (called in this iteration)
            loss.backward()
            if after_backward is not None:
                after_backward()
            return loss

        opt.step(closure)


def full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()


def _worker(rank, out_dir):
    # a file store in the run's own folder: no port to find free and lose to another process
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD)
    from torch.distributed.fsdp import fully_shard

    out = {}
    shard = slice(8 * rank, 8 * (rank + 1))
    try:
        # DDP, with the seed drawn per rank and agreed on at first use (rank 0's).
        model = make_mlp()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(100 + rank)  # ranks' global RNGs differ, as they often do
        opt = esgdm.ESGDM(model.parameters(), lr=0.5, update_d_every=3, d_warmup=4,
                          hvp="finite_difference", backend="torch")
        xs, ys = data("mlp")
        train(ddp, opt, xs[:, shard], ys[:, shard])
        out["ddp"] = [p.detach().clone() for p in model.parameters()]
        out["ddp_seed"] = opt.seed

        # FSDP2 over an MLP with uneven shards, and over a transformer block.
        for kind, make in (("mlp", make_mlp), ("block", make_block)):
            model = make()
            for layer in model:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer)
            fully_shard(model)
            opt = make_opt(model.parameters())
            xs, ys = data(kind)
            train(model, opt, xs[:, shard], ys[:, shard])
            out[f"fsdp_{kind}"] = [full(p) for p in model.parameters()]
            out[f"fsdp_{kind}_state_bytes"] = sum(b.nbytes() for b in opt.buckets())
            assert all(hasattr(v, "placements") for v in opt.state[next(model.parameters())].values()
                       if v.dim() > 0), "state of a sharded parameter is a DTensor"

        # Mixed: the first layer sharded, the rest replicated (gradients averaged by hand).
        model = make_mlp()
        fully_shard(model[0])
        plain = list(model[2].parameters())

        def average():
            for p in plain:
                dist.all_reduce(p.grad)
                p.grad /= WORLD

        opt = make_opt(model.parameters())
        xs, ys = data("mlp")
        train(model, opt, xs[:, shard], ys[:, shard], after_backward=average)
        out["mixed"] = [full(p) for p in model.parameters()]

        # Distributed checkpoint after 7 steps on two ranks (loaded on one by the test).
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model = make_mlp()
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        opt = make_opt(model.parameters())
        train(model, opt, xs[:7, shard], ys[:7, shard])
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=os.path.join(out_dir, "dcp"))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(str(path),), nprocs=WORLD, join=True, start_method="spawn")
    return path, [torch.load(path / f"rank{r}.pt") for r in range(WORLD)]


def one_process(make, kind, seed=SEED, steps=STEPS):
    model = make()
    opt = make_opt(model.parameters(), seed=seed)
    xs, ys = data(kind)
    train(model, opt, xs[:steps], ys[:steps])
    return model, opt


def test_ddp_matches_one_process(ranks):
    _, (r0, r1) = ranks
    for a, b in zip(r0["ddp"], r1["ddp"]):
        assert torch.equal(a, b)  # every rank took the same steps
    assert r0["ddp_seed"] == r1["ddp_seed"]
    same, _ = one_process(make_mlp, "mlp", seed=r0["ddp_seed"])
    other, _ = one_process(make_mlp, "mlp", seed=r0["ddp_seed"] + 1)
    for q, p, o in zip(r0["ddp"], same.parameters(), other.parameters()):
        # a sum split in two rounds differently and r magnifies it, by how much depends on
        # the signs: 5e-9 to 2.3e-6 over five seeds (the default seed follows the ranks'
        # torch.manual_seed); another seed's trajectory is > 1e-4 away
        assert rel_err(q, p) < 1e-5
        assert rel_err(q, o) > 1e-4  # other signs, other trajectory: the signs were shared


@pytest.mark.parametrize("kind,make", [("mlp", make_mlp), ("block", make_block)])
def test_fsdp2_matches_one_process(ranks, kind, make):
    _, (r0, r1) = ranks
    single, opt = one_process(make, kind)
    for a, b, p in zip(r0[f"fsdp_{kind}"], r1[f"fsdp_{kind}"], single.parameters()):
        assert torch.equal(a, b)
        assert rel_err(a, p) < 1e-6
    # each rank holds about half of the state
    assert r0[f"fsdp_{kind}_state_bytes"] < 0.75 * sum(b.nbytes() for b in opt.buckets())


def test_some_parameters_sharded_some_replicated(ranks):
    _, (r0, _) = ranks
    single, _ = one_process(make_mlp, "mlp")
    for a, p in zip(r0["mixed"], single.parameters()):
        assert rel_err(a, p) < 1e-6


def test_checkpoint_saved_on_two_ranks_continues_on_one(ranks):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path, _ = ranks
    model = make_mlp()
    opt = make_opt(model.parameters(), seed=12345)  # the checkpoint's seed must win
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert opt.steps == 7 and opt.seed == SEED
    xs, ys = data("mlp")
    train(model, opt, xs[7:], ys[7:])
    uninterrupted, _ = one_process(make_mlp, "mlp")
    for a, p in zip(model.parameters(), uninterrupted.parameters()):
        assert rel_err(a, p) < 1e-6


def test_autograd_curvature_under_fsdp2_names_finite_differences(tmp_path):
    mp.start_processes(_autograd_worker, args=(), nprocs=1, join=True, start_method="spawn")


def _autograd_worker(rank):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.fsdp import fully_shard

    try:
        model = make_mlp()
        fully_shard(model)
        opt = esgdm.ESGDM(model.parameters(), backend="torch")
        x, y = data("mlp")
        try:
            F.cross_entropy(model(x[0]), y[0]).backward(create_graph=True)
            opt.step()
        except RuntimeError as e:
            assert "hvp='finite_difference'" in str(e), str(e)
        else:
            raise AssertionError("expected an error naming hvp='finite_difference'")
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_keep_float32_state_when_8bit_is_asked(tmp_path):
    """A shard's block scales are not a tensor DCP could reshard: FSDP2 parameters get
    float32 state under state_dtype=torch.uint8, and the step works."""
    mp.start_processes(_state8_worker, args=(), nprocs=1, join=True, start_method="spawn")


def _state8_worker(rank):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.fsdp import fully_shard

    try:
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
        fully_shard(model)
        opt = esgdm.ESGDM(model.parameters(), backend="torch", state_dtype=torch.uint8, hvp="finite_difference")
        x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        kinds = {local_state.dtype for st in opt.state.values()
                 for local_state in (st["exp_avg"].to_local(), st["exp_avg_d"].to_local())}
        assert kinds == {torch.float32}, kinds
        assert all("qscale" not in st for st in opt.state.values())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("hvp", ["auto", "autograd"])
def test_ddp_closure_that_keeps_the_graph_names_finite_differences(hvp):
    """DistributedDataParallel's reducer refuses backward(create_graph=True) with "a leaf
    Variable that requires grad is being used in an in-place operation": the step says
    what to do instead and changes nothing (before, torch's line alone; hvp="auto" cannot
    run the closure again, since the reducer is left mid-backward)."""
    mp.start_processes(_ddp_create_graph_worker, args=(hvp,), nprocs=1, join=True,
                       start_method="spawn")


def _ddp_create_graph_worker(rank, hvp):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_mlp())
        opt = esgdm.ESGDM(model.parameters(), backend="torch", hvp=hvp)
        x, y = data("mlp")
        before = [p.detach().clone() for p in model.parameters()]

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[0]), y[0])
            loss.backward(create_graph=opt.should_create_graph())
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "DDP with create_graph=True is not well-supported"
            try:
                opt.step(closure)
            except RuntimeError as e:
                assert "DistributedDataParallel cannot run backward(create_graph=True)" in str(e), str(e)
                assert "hvp='finite_difference'" in str(e) and "without create_graph" in str(e), str(e)
            else:
                raise AssertionError("expected an error naming finite differences")
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert opt.steps == 0 and not opt.state
    finally:
        dist.destroy_process_group()


def test_a_process_group_of_one_rank_drains_collectives_at_exit():
    """torch can abort at exit after collectives issued during backward (esgdm/guards.py):
    a process group of one rank has them too (FSDP2 still reduce-scatters), so the exit
    drain is registered wherever a group exists: by the constructor, and by the probe when
    the group came after the optimizer (before, only with two or more ranks, and only by
    the probe: one-process FSDP2 runs aborted in 7 of 300, benchmarks/exit_abort_rate.py)."""
    mp.start_processes(_drain_worker, args=(), nprocs=1, join=True, start_method="spawn")


def _drain_worker(rank):
    import esgdm.guards as guards

    model = make_mlp()
    before = esgdm.ESGDM(model.parameters(), backend="torch", hvp="finite_difference")
    assert not guards._exit_drain  # no process group yet: nothing to drain
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x, y = data("mlp")

        def closure():
            before.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[0]), y[0])
            loss.backward()
            return loss

        before.step(closure)  # the probe, in a group made after the optimizer
        assert guards._exit_drain == [True]
        guards._exit_drain.clear()
        esgdm.ESGDM(make_mlp().parameters(), backend="torch")  # the constructor, in a group
        assert guards._exit_drain == [True]
    finally:
        dist.destroy_process_group()
