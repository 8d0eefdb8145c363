"""Data-parallel training (DDP, two CPU processes over gloo on loopback).

DDP cannot run the double backward that hvp="autograd" needs, so data-parallel
ESGD-M uses hvp="finite_difference": both gradient evaluations of a D-step are
all-reduced by DDP, and every rank must probe along the same sign vector.  The
optimizer makes sure of that by seeding its sign draws alike on every rank.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import esgdm
from helpers import rel_err

STEPS = 14  # D-steps (the first 4) and plain steps
WORLD = 2


# float64, so that the difference quotient does not magnify the rounding differences
# between an all-reduced mean of two half-batch gradients and a whole-batch gradient.
def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(STEPS, 8 * WORLD, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (STEPS, 8 * WORLD), generator=g))


def make_opt(params):
    return esgdm.ESGDM(params, lr=0.5, update_d_every=3, d_warmup=4, hvp="finite_difference",
                       backend="torch")


def train(model, opt, xs, ys):
    for x, y in zip(xs, ys):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(100 + rank)  # ranks' global RNGs differ, as they often do
        opt = make_opt(model.parameters())
        xs, ys = data()
        shard = slice(8 * rank, 8 * (rank + 1))
        train(ddp, opt, xs[:, shard], ys[:, shard])
        torch.save({"params": [p.detach() for p in model.parameters()],
                    "sign_seed": opt.state_dict()["global_state"]["sign_seed"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_with_finite_differences_matches_one_process(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # every rank took the same steps
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    assert ranks[0]["sign_seed"] == ranks[1]["sign_seed"] is not None

    # and they are the steps of one process on the whole batch, probing the same signs
    def one_process(seed):
        model = make_model()
        opt = make_opt(model.parameters())
        opt.sign_seed = seed
        train(model, opt, *data())
        return list(model.parameters())

    same = one_process(ranks[0]["sign_seed"])
    other = one_process(ranks[0]["sign_seed"] + 1)
    for q, p, o in zip(ranks[0]["params"], same, other):
        assert rel_err(q, p) < 1e-6  # a sum split in two rounds differently; r magnifies it
        assert rel_err(q, o) > 1e-4  # other signs, other trajectory: the signs were shared


def test_sign_seed_without_distributed_is_unused_until_set():
    opt = make_opt(make_model().parameters())
    assert opt._sign_generator(torch.device("cpu")) is None
    opt.sign_seed = 7
    a = torch.empty(5).random_(0, 2, generator=opt._sign_generator(torch.device("cpu")))
    b = torch.empty(5).random_(0, 2, generator=opt._sign_generator(torch.device("cpu")))
    assert torch.equal(a, b)  # a function of (seed, step): reproducible after a restart
