"""esgdm.integrations.transformers.ESGDMTrainer: a drop-in transformers.Trainer for ESGD-M.

A random-init GPT-2 (2 layers, 128 wide, tied embeddings, decay / no-decay parameter
groups) on characters of Python's own library sources; nothing is downloaded.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers import rel_err  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

import esgdm  # noqa: E402
from esgdm.integrations.transformers import ESGDMTrainer, esgdm_kwargs_from_args  # noqa: E402

SEQ = 64
VOCAB = 128


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: one thread is several times faster than two on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _text() -> str:
    import argparse
    import textwrap

    return inspect.getsource(argparse) + inspect.getsource(textwrap)


def char_data(n_train: int, n_eval: int = 32, seed: int = 0):
    """Windows of SEQ characters (ASCII codes) as input_ids/labels rows."""
    ids = torch.tensor([min(ord(c), VOCAB - 1) for c in _text()])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - SEQ - 1, (n_train + n_eval,), generator=g).tolist()
    rows = [{"input_ids": ids[s:s + SEQ], "labels": ids[s:s + SEQ]} for s in starts]
    return rows[:n_train], rows[n_train:]


def gpt2(attn: str = "sdpa", dropout: float = 0.1) -> GPT2LMHeadModel:
    """attn_pdrop is 0: with attention dropout CPU SDPA takes its math path, which has a
    double backward; without it, its fused kernel, which has none."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=128, n_layer=2, n_head=4,
                     tie_word_embeddings=True, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=0.0,
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    cfg._attn_implementation = attn
    return GPT2LMHeadModel(cfg)


def param_groups(model, weight_decay=0.1):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases, LayerNorm weights
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_trainer(model, train, evalset=None, *, steps, batch=8, accum=1, max_grad_norm=1.0,
                 optimizer=None, tmp="/tmp/esgdm-hf-test", **arg_overrides):
    args = TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        max_steps=steps, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        max_grad_norm=max_grad_norm, lr_scheduler_type="constant", seed=0,
        per_device_eval_batch_size=32, disable_tqdm=True, dataloader_num_workers=0,
        **arg_overrides)
    kw = {} if optimizer is None else {"optimizers": (optimizer, None)}
    return ESGDMTrainer(model=model, args=args, train_dataset=train, eval_dataset=evalset, **kw)


def train_eval(hvp, attn, steps, tmp_path, **kw):
    train, evalset = char_data(steps * 8)
    model = gpt2(attn)
    opt = esgdm.ESGDM(param_groups(model), lr=0.5, hvp=hvp, seed=0)
    trainer = make_trainer(model, train, evalset, steps=steps, tmp=tmp_path, optimizer=opt, **kw)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    return before, after, opt


# ------------------------------------------------------------------ training


@pytest.mark.slow
@pytest.mark.parametrize("hvp,attn", [("finite_difference", "sdpa"), ("auto", "sdpa"), ("autograd", "eager")])
def test_gpt2_eval_loss_falls(hvp, attn, tmp_path):
    """60 steps (26 of them D-steps) in each mode; SDPA has no double backward on CPU,
    so "auto" falls back to finite differences there (warning once)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before, after, opt = train_eval(hvp, attn, 60, tmp_path)
    assert after < before - 0.8, (before, after)  # measured: 4.62 -> 3.50
    assert opt.steps == 60
    fell_back = [w for w in caught if "double backward failed" in str(w.message)]
    assert len(fell_back) == (1 if hvp == "auto" else 0)
    assert not [w for w in caught if "reference cycle" in str(w.message)]


def test_gpt2_few_steps_each_mode(tmp_path):
    """Quick version of the above: 5 steps, the eval loss moves down in both modes."""
    for hvp, attn in (("finite_difference", "sdpa"), ("autograd", "eager")):
        before, after, opt = train_eval(hvp, attn, 5, tmp_path)
        assert after < before - 0.05, (hvp, before, after)
        assert opt.steps == 5


def _first_step_curvature(hvp, *, accum, max_grad_norm, tmp_path, fd_scheme="central", callbacks=()):
    """exp_avg_d of every parameter after one D-step (D = h*h on the first)."""
    train, _ = char_data(8)
    model = gpt2("eager", dropout=0.1)
    opt = esgdm.ESGDM(param_groups(model), lr=0.5, hvp=hvp, seed=3, fd_scheme=fd_scheme)
    trainer = make_trainer(model, train, steps=1, batch=8 // accum, accum=accum,
                           max_grad_norm=max_grad_norm, optimizer=opt, tmp=tmp_path)
    for cb in callbacks:
        trainer.add_callback(cb)
    trainer.train()
    return [opt.state[p]["exp_avg_d"].clone() for p in model.parameters()], model


@pytest.mark.parametrize("accum,max_grad_norm,scheme", [(1, 0.0, "central"), (2, 1e-2, "forward")])
def test_finite_difference_curvature_matches_autograd(accum, max_grad_norm, scheme, tmp_path):
    """The trainer's finite-difference closure reproduces autograd's H v: the probe
    re-runs every micro-batch with the dropout masks it first drew, and clipping
    (active here: the gradient norm is ~2) scales the gradient, not the curvature."""
    ag, _ = _first_step_curvature("autograd", accum=accum, max_grad_norm=max_grad_norm, tmp_path=tmp_path)
    fd, _ = _first_step_curvature("finite_difference", accum=accum, max_grad_norm=max_grad_norm,
                                  tmp_path=tmp_path, fd_scheme=scheme)
    a, f = torch.cat([d.flatten() for d in ag]), torch.cat([d.flatten() for d in fd])
    assert a.norm() > 0
    assert rel_err(f.sqrt(), a.sqrt()) < 2e-2  # |h|; measured 1.4e-3 (forward), less (central)


def test_finite_difference_curvature_ignores_clipping(tmp_path):
    """Clipping scales the gradient the step uses; the probe's difference must still be
    the loss's H v, whoever clipped: max_grad_norm, or a callback scaling the gradients."""
    from transformers import TrainerCallback

    class Shrink(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.25)

    # the forward scheme: h = (g(θ + r v) - g(θ)) / r uses the step's gradient g(θ)
    free, _ = _first_step_curvature("finite_difference", accum=2, max_grad_norm=0.0, tmp_path=tmp_path,
                                    fd_scheme="forward")
    a = torch.cat([d.flatten() for d in free]).sqrt()
    for kw in (dict(max_grad_norm=1e-3), dict(max_grad_norm=0.0, callbacks=[Shrink()])):
        clipped, _ = _first_step_curvature("finite_difference", accum=2, tmp_path=tmp_path, fd_scheme="forward",
                                           **kw)
        b = torch.cat([d.flatten() for d in clipped]).sqrt()
        assert rel_err(b, a) < 2e-3, kw  # measured 6e-5 (without the trainer's correction: 6e2)


@pytest.mark.parametrize("hvp", ["finite_difference", "autograd"])
def test_gradient_accumulation_equals_double_batch(hvp, tmp_path):
    """2 micro-batches of 4 per step == one batch of 8 (no dropout, so both see the same
    function): the same gradient and curvature on a step, the same training over 8.

    Finite differences amplify the rounding differences of the two summation orders
    (by 1/r) where the curvature is tiny, so there the comparison is of the outcome."""
    fd = hvp == "finite_difference"

    def run(batch, accum, steps):
        train, evalset = char_data(8 * steps)
        model = gpt2("eager", dropout=0.0)
        opt = esgdm.ESGDM(param_groups(model), lr=0.5, hvp=hvp, seed=1)
        trainer = make_trainer(model, train, evalset, steps=steps, batch=batch, accum=accum,
                               optimizer=opt, tmp=tmp_path)
        trainer.train()
        ps = list(model.parameters())
        flat = lambda ts: torch.cat([t.detach().flatten() for t in ts])  # noqa: E731
        return dict(loss=trainer.evaluate()["eval_loss"], p=flat(ps),
                    m=flat(opt.state[p]["exp_avg"] for p in ps), d=flat(opt.state[p]["exp_avg_d"] for p in ps))

    big, acc = run(8, 1, 1), run(4, 2, 1)
    assert rel_err(acc["m"], big["m"]) < 1e-5  # measured 2e-7
    assert rel_err(acc["d"].sqrt(), big["d"].sqrt()) < (2e-3 if fd else 1e-5)  # 1.4e-4, 2e-7

    start = torch.cat([p.detach().flatten() for p in gpt2("eager", 0.0).parameters()])
    big, acc = run(8, 1, 6), run(4, 2, 6)
    assert big["loss"] < 4.5  # it trained (4.62 at the start)
    assert abs(acc["loss"] - big["loss"]) < (1e-2 if fd else 1e-4)  # measured 3e-3, 1e-6
    if not fd:
        moved = (big["p"] - start).norm()
        assert (acc["p"] - big["p"]).norm() < 2e-3 * moved  # measured 1e-3


# ----------------------------------------------------------- optimizer choice


def test_default_optimizer_is_esgdm_from_training_arguments(tmp_path):
    """No optimizer given: ESGD-M with learning_rate, the Trainer's decay / no-decay
    groups and ESGDM keywords from optim_args."""
    train, _ = char_data(16)
    model = gpt2("eager")
    trainer = make_trainer(model, train, steps=2, tmp=tmp_path, learning_rate=0.3, weight_decay=0.05,
                           optim_args="hvp=finite_difference,update_d_every=5,beta2=0.99,fd_scheme=central")
    trainer.train()
    opt = esgdm.integrations.unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, esgdm.ESGDM)
    assert (opt.hvp, opt.update_d_every, opt.fd_scheme) == ("finite_difference", 5, "central")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["betas"] == (0.9, 0.99) for g in opt.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for p in opt.param_groups[1]["params"]]
    assert no_decay and all(("bias" in n or "ln" in n) for n in no_decay)
    assert opt.steps == 2


def test_optimizer_cls_and_kwargs_hook(tmp_path):
    train, _ = char_data(16)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             weight_decay=0.1)
    trainer = ESGDMTrainer(model=gpt2("sdpa"), args=args, train_dataset=train,
                           optimizer_cls_and_kwargs=(esgdm.ESGDM, {"lr": 0.5, "hvp": "finite_difference"}))
    trainer.train()
    opt = esgdm.integrations.unwrap_optimizer(trainer.optimizer)
    assert opt.steps == 2 and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_optim_args_parsing():
    class Args:
        learning_rate = 0.5
        optim_args = "hvp=auto, d_warmup=4, exact=true, state_dtype=bfloat16, fd_radius=1e-3, beta1=0.8"

    kw = esgdm_kwargs_from_args(Args)
    assert kw == {"lr": 0.5, "hvp": "auto", "d_warmup": 4, "exact": True, "state_dtype": torch.bfloat16,
                  "fd_radius": 1e-3, "betas": (0.8, 0.999)}
    Args.optim_args = "lr=3"
    with pytest.raises(ValueError, match="learning_rate"):
        esgdm_kwargs_from_args(Args)


def test_adamw_default_learning_rate_warns():
    class Args:
        learning_rate = 5e-5
        optim_args = None

    with pytest.warns(UserWarning, match="AdamW value"):
        ESGDMTrainer.get_optimizer_cls_and_kwargs(Args)


def test_other_optimizers_pass_through(tmp_path):
    """With an optimizer that is not ESGD-M the subclass is plain Trainer."""
    train, _ = char_data(16)
    model = gpt2("sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    make_trainer(model, train, steps=2, optimizer=opt, tmp=tmp_path).train()
    assert opt.state and all(s["step"] == 2 for s in opt.state.values())


@pytest.mark.slow
def test_bf16_autocast_trains(tmp_path):
    """bf16 mixed precision (CPU autocast): both modes train, and the finite-difference
    radius is sized for bf16 (the trainer shows the optimizer what the loop computed in)."""
    for hvp, attn in (("finite_difference", "sdpa"), ("autograd", "eager")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            before, after, opt = train_eval(hvp, attn, 6, tmp_path, bf16=True)
        assert after < before - 0.05, (hvp, before, after)
        assert not [w for w in caught if "precision" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.slow
def test_reference_cycle_warning_silenced_in_the_trainer_only(tmp_path):
    """torch gives this warning once per process, so this runs in a fresh one: the
    trainer's create_graph backward is quiet, and no filter is left behind for other code."""
    code = r"""
import sys, warnings
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("always")
import test_integrations_transformers as t
with warnings.catch_warnings(record=True) as inside:
    warnings.simplefilter("always")
    t.train_eval("autograd", "eager", 2, sys.argv[2])
print("inside", sum("reference cycle" in str(w.message) for w in inside))
print("filters left", sum("create_graph" in str(f[1] and f[1].pattern) for f in warnings.filters))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "inside 0" in out.stdout and "filters left 0" in out.stdout, out.stdout


# ------------------------------------------------------------- README recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block(marker: str) -> str:
    """The README's one python block that contains ``marker``."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if marker in b]
    assert len(blocks) == 1, f"{len(blocks)} README blocks contain {marker!r}"
    return blocks[0]


def run_readme_example(tmp_path, code: str, *script_args: str, processes: int = 1) -> tuple:
    """Runs the README's train.py as written (``python train.py`` or ``torchrun``);
    returns the eval losses it prints, before and after training."""
    (tmp_path / "train.py").write_text(code)
    cmd = [sys.executable, "train.py", *script_args]
    if processes > 1:  # torchrun, standalone: it binds a free port itself (tests may run side by side)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
               "--standalone", "train.py", *script_args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    found = re.search(r"eval loss ([0-9.]+) -> ([0-9.]+)", out.stdout)
    assert found, out.stdout[-2000:]
    return float(found[1]), float(found[2])


@pytest.mark.slow
def test_readme_example_learns(tmp_path):
    """The README's BERT example, as written, learns in its 30 steps."""
    before, after = run_readme_example(tmp_path, readme_block("BertForSequenceClassification"))
    assert before > 0.65 and after < 0.05, (before, after)  # measured 0.693 -> 0.000


@pytest.mark.slow
def test_readme_example_with_the_default_warmup_learns_slowly(tmp_path):
    """What the README says of the default lr_warmup: the same 30 steps end far higher."""
    code = readme_block("BertForSequenceClassification")
    slow = code.replace('"lr_warmup": 0.9, ', "")
    assert slow != code
    _, after = run_readme_example(tmp_path, slow)
    assert after > 0.1, after  # measured 0.28 (0.000 with lr_warmup=0.9)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
def test_readme_example_under_torchrun(tmp_path, how):
    """torchrun --nproc-per-node 2 train.py [--fsdp], as the README says."""
    args = ("--fsdp",) if how == "fsdp2" else ()
    before, after = run_readme_example(tmp_path, readme_block("BertForSequenceClassification"), *args,
                                       processes=2)
    assert before > 0.65 and after < 0.05, (before, after)  # measured 0.693 -> 0.001 (ddp), 0.000 (fsdp2)
