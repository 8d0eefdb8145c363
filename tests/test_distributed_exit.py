"""A two-process FSDP2 run over gloo that continues from a distributed checkpoint saved
by one process must exit with status 0, every time.

It used to finish training and then abort at interpreter exit in about a third of the
runs ("terminate called without an active exception", SIGABRT, so torchrun returns 1):
gloo's worker thread released, during Python's finalization, a work created during
backward whose copy of the thread-local state holds a Python object (see
esgdm/guards.py, _drain_before_exit).  This happens with any optimizer; esgdm collects
those objects before finalization wherever an ESGDM is built in a process group or
takes finite differences in one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

RUNS = 8
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.nn.functional as F
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    import esgdm


    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


    def train(model, opt, steps, rank=0, world=1):
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x, y = torch.randn(8 * world, 6, generator=g), torch.randint(0, 3, (8 * world,), generator=g)
            mine = slice(8 * rank, 8 * (rank + 1))

            def closure():
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[mine]), y[mine])
                loss.backward()
                return loss

            opt.step(closure)


    what, path = sys.argv[1], sys.argv[2]
    if what == "save":  # one process, no process group
        model = make()
        opt = esgdm.ESGDM(model.parameters(), lr=0.3, hvp="finite_difference", seed=3)
        train(model, opt, 5)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=path)
    else:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        model = make()
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        opt = esgdm.ESGDM(model.parameters(), lr=0.3, hvp="finite_difference")  # default backend
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        train(model, opt, 10, dist.get_rank(), dist.get_world_size())
        assert opt.steps == 15
        if what == "run-and-destroy":
            dist.destroy_process_group()
''')


@pytest.mark.slow  # RUNS two-process runs, each importing torch twice: ~10 s apiece
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_run_from_a_one_process_checkpoint_exits_cleanly(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("ESGDM_BACKEND", None)  # the default backend, as in the report
    checkpoint = str(tmp_path / "checkpoint")
    subprocess.run([sys.executable, str(script), "save", checkpoint], env=env, check=True, timeout=300)
    failures = []
    for i in range(RUNS):
        what = "run-and-destroy" if i % 2 else "run"  # with and without destroy_process_group()
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--standalone", str(script), what, checkpoint],  # (standalone: it binds a free port itself)
            env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            failures.append(f"run {i} ({what}): exit {done.returncode}\n{done.stderr[-2000:]}")
    assert not failures, "\n\n".join(failures)
