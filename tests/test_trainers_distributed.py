"""The trainers past one process: ESGDMTrainer under DDP and FSDP2 (through accelerate)
and Lightning's DDP strategy, on two CPU processes over gloo, each against one process
on the same global batch.

Everything is float64, without dropout, with the data in a fixed order: the two ranks'
halves of a step's batch are exactly the one-process batch, so the runs differ only in
how the gradient is summed (an all-reduced mean of two halves against one sum), a
rounding difference that the finite-difference quotient magnifies by 1/r and the next
steps carry along (the GPT-2 takes central differences, whose r is larger).  Parameters
then agree to 1e-8..5e-6 relative, while a run that probes other directions (another
seed) ends more than 1e-2 away.
"""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import rel_err

WORLD = 2
BATCH = 8  # the global batch of a step
STEPS = 6
SEED = 5

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.slow,
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(rank, port):
    """The environment torchrun gives a worker."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), NODE_RANK="0",
                      HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    torch.set_num_threads(1)


def flat(tensors):
    return torch.cat([(t.full_tensor() if hasattr(t, "full_tensor") else t).detach().flatten() for t in tensors])


# ------------------------------------------------------------ transformers.Trainer

SEQ, VOCAB = 12, 48


def gpt2():
    """A causal LM: its loss divides by the token count of the global batch, which the
    Trainer gathers over ranks, so 2 x 4 rows and 8 rows give the same loss."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).double()


def lm_rows():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH * STEPS, SEQ), generator=g)
    ids[:, 1::2] = (ids[:, 0::2] * 7 + 3) % VOCAB  # something to learn
    return [{"input_ids": r, "labels": r} for r in ids]


def hf_train(hvp, world=1, accum=1, seed=SEED, **arg_overrides):
    """Trains gpt2() for STEPS steps of BATCH rows; returns (model, trainer)."""
    from transformers import TrainingArguments

    import esgdm
    from esgdm.integrations.transformers import ESGDMTrainer

    args = TrainingArguments(
        output_dir="/tmp/esgdm-trainers-distributed", per_device_train_batch_size=BATCH // world // accum,
        gradient_accumulation_steps=accum, max_steps=STEPS, train_sampling_strategy="sequential",
        learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, seed=0,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        ddp_backend="gloo" if world > 1 else None,
        ddp_timeout=300,  # a configuration failing on one rank only fails, not waits 30 min
        **arg_overrides)
    kwargs = dict(lr=0.1, lr_warmup=0.9, hvp=hvp, d_warmup=3, update_d_every=2, seed=seed, backend="torch",
                  fd_scheme="central")
    model = gpt2()
    trainer = ESGDMTrainer(model=model, args=args, train_dataset=lm_rows(),
                           optimizer_cls_and_kwargs=(esgdm.ESGDM, kwargs))
    trainer.train()
    return trainer.model_wrapped, trainer


def _hf_worker(rank, port, out_dir):
    as_rank(rank, port)
    out = {}

    def attempt(name, run):  # one failing configuration does not hide the others
        try:
            run()
        except Exception as e:  # noqa: BLE001 - reported by the tests
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"

    def ddp():
        model, _ = hf_train("finite_difference", WORLD)
        out["ddp"] = flat(model.parameters())
        out["ddp_wrapper"] = type(model).__name__

    def ddp_accum():
        out["ddp_accum"] = flat(hf_train("finite_difference", WORLD, accum=2)[0].parameters())

    def auto():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, _ = hf_train("auto", WORLD)
        out["auto"] = flat(model.parameters())
        out["auto_warnings"] = [str(w.message) for w in caught if "esgdm" in str(w.message)]

    def autograd():
        hf_train("autograd", WORLD)

    def fsdp2():
        model, trainer = hf_train("finite_difference", WORLD, fsdp="full_shard", fsdp_config={"fsdp_version": 2})
        out["fsdp2"] = flat(model.parameters())
        out["fsdp2_sharded"] = all(hasattr(p, "placements") for p in model.parameters())
        opt = trainer.optimizer.optimizer
        out["fsdp2_state_numel"] = sum(s["exp_avg"].to_local().numel() for s in opt.state.values())

    def fsdp2_auto():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, _ = hf_train("auto", WORLD, fsdp="full_shard", fsdp_config={"fsdp_version": 2})
        out["fsdp2_auto"] = flat(model.parameters())
        out["fsdp2_auto_warnings"] = [str(w.message) for w in caught if "esgdm" in str(w.message)]

    def fsdp1():  # (with sync_module_states, accelerate refuses it on CPU itself)
        hf_train("finite_difference", WORLD, fsdp="full_shard",
                 fsdp_config={"fsdp_version": 1, "sync_module_states": False})

    try:
        for name, run in (("ddp", ddp), ("ddp_accum", ddp_accum), ("auto", auto), ("autograd", autograd),
                          ("fsdp2", fsdp2), ("fsdp2_auto", fsdp2_auto), ("fsdp1", fsdp1)):
            attempt(name, run)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def hf_ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    mp.start_processes(_hf_worker, args=(free_port(), str(path)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def hf_single():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        same = flat(hf_train("finite_difference")[0].parameters())
        other = flat(hf_train("finite_difference", seed=SEED + 1)[0].parameters())
    finally:
        torch.set_num_threads(n)
    start = flat(gpt2().parameters())
    return same, other, start


@pytest.mark.parametrize("run", ["ddp", "ddp_accum", "fsdp2"])
def test_hf_trainer_two_ranks_match_one_process(hf_ranks, hf_single, run):
    """DDP (also with 2 micro-batches of 2 rows per rank) and FSDP2 with finite
    differences, against one process on the same 8 rows per step."""
    r0, r1 = hf_ranks
    same, other, start = hf_single
    assert f"{run}_error" not in r0, r0[f"{run}_error"]
    assert torch.equal(r0[run], r1[run])  # every rank holds the same parameters
    assert rel_err(same, start) > 1e-2  # it trained (measured 2.7e-2)
    assert rel_err(r0[run], same) < 1e-4  # measured 7e-7 (ddp, fsdp2), 5e-6 (accumulation)
    assert rel_err(other, same) > 1e-2  # the check can tell: another seed ends elsewhere (measured 6e-2)


def test_hf_trainer_wrapped_the_model(hf_ranks):
    """The DDP runs went through DistributedDataParallel; fsdp="full_shard" with
    fsdp_version 2 sharded the parameters (accelerate alone leaves CPU runs unsharded),
    and each rank holds about half of the optimizer state."""
    r0, _ = hf_ranks
    assert r0["ddp_wrapper"] == "DistributedDataParallel"
    assert "fsdp2_error" not in r0, r0["fsdp2_error"]
    assert r0["fsdp2_sharded"]
    assert r0["fsdp2_state_numel"] < 0.75 * r0["ddp"].numel()


@pytest.mark.parametrize("run,fd_run,wrapper", [("auto", "ddp", "DistributedDataParallel"),
                                                ("fsdp2_auto", "fsdp2", "FSDP2")])
def test_hf_trainer_auto_falls_back_to_finite_differences(hf_ranks, run, fd_run, wrapper):
    """hvp="auto" under DDP and FSDP2: one warning naming the wrapper, then exactly the
    finite-difference run."""
    r0, r1 = hf_ranks
    for r in (r0, r1):
        assert f"{run}_error" not in r, r[f"{run}_error"]
        assert len(r[f"{run}_warnings"]) == 1, r[f"{run}_warnings"]
        assert wrapper in r[f"{run}_warnings"][0] and "finite differences" in r[f"{run}_warnings"][0]
    assert torch.equal(r0[run], r0[fd_run])


def test_hf_trainer_autograd_names_what_works(hf_ranks):
    message = hf_ranks[0].get("autograd_error", "")
    assert message.startswith("ValueError: ") and "DistributedDataParallel" in message, message
    assert "hvp='finite_difference'" in message and "\n" not in message, message


def test_hf_trainer_fsdp1_on_cpu_says_to_use_fsdp2(hf_ranks):
    """accelerate would silently train plain DDP."""
    message = hf_ranks[0].get("fsdp1_error", "")
    assert message.startswith("ValueError: ") and "'fsdp_version': 2" in message, message


# ------------------------------------------------------------------ Lightning DDP


def lightning_model(seed=SEED):
    import lightning.pytorch as pl
    import torch.nn.functional as F

    import esgdm

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return esgdm.ESGDM(self.parameters(), lr=0.1, lr_warmup=0.9, hvp="finite_difference", d_warmup=3,
                               update_d_every=2, seed=seed, backend="torch")

    return Net()


def lightning_fit(world=1, seed=SEED):
    import lightning.pytorch as pl

    from esgdm.integrations import lightning as esgdm_pl

    g = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH * STEPS, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (BATCH * STEPS,), generator=g)
    # in order: rank 0 gets rows 0, 2, 4, 6 of a step and rank 1 rows 1, 3, 5, 7, together
    # the one-process batch (Lightning's own distributed sampler always shuffles)
    data = torch.utils.data.TensorDataset(x, y)
    sampler = None if world == 1 else torch.utils.data.DistributedSampler(
        data, num_replicas=world, rank=int(os.environ["RANK"]), shuffle=False)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH // world, sampler=sampler)
    module = lightning_model(seed)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[esgdm_pl.ESGDMCallback()])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, loader)
    return flat(module.parameters())


def _lightning_worker(rank, port, out_dir):
    as_rank(rank, port)  # LOCAL_RANK set: Lightning takes the processes as launched
    try:
        torch.save(lightning_fit(WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_lightning_ddp_matches_one_process(tmp_path):
    pytest.importorskip("lightning.pytorch")
    mp.start_processes(_lightning_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    same, other = lightning_fit(), lightning_fit(seed=SEED + 1)
    assert torch.equal(r0, r1)
    assert rel_err(r0, same) < 1e-6  # measured 2e-8
    assert rel_err(other, same) > 1e-2  # measured 0.44
