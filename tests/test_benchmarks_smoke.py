"""The benchmarks' own correctness: the loop baseline and the compiled rule compute
ESGD-M, and both benchmark scripts (and the pytest-benchmark suite) run end to end.

Tolerances: float32 trajectories agree to rtol 1e-5 / atol 1e-6 (same formula, one
rounding order apart); bfloat16 parameters to one bf16 ulp (rtol 2**-7), with their
float32 state to the float32 tolerance.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from reference import ReferenceESGDM

import esgdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

from baseline_loop import LoopESGDM, loop_step  # noqa: E402
from bench_step import compiled_rule  # noqa: E402

F32 = dict(rtol=1e-5, atol=1e-6)


def _signs(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda p: (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype)


def _model(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    m.extra = torch.nn.Parameter(torch.randn(3))  # used on some steps only
    return m


def test_loop_baseline_matches_reference_trajectory():
    """30 steps of a small MLP (non-diagonal Hessian, shared probe vectors), two param
    groups (one with weight decay), a short D-step schedule, and a parameter without a
    gradient on some steps: the loop baseline follows tests/reference.py."""
    a, b = _model(), _model()
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    hp = dict(lr=0.3, update_d_every=4, d_warmup=3, lr_warmup=0.9)
    groups = lambda m: [{"params": list(m[0].parameters())},  # noqa: E731
                        {"params": list(m[2].parameters()) + [m.extra], "weight_decay": 0.1,
                         "lr": 0.2}]
    loop = LoopESGDM(groups(a), signs=_signs(1), **hp)
    ref = ReferenceESGDM(groups(b), signs=_signs(1), **hp)
    for step in range(30):
        for m, opt in ((a, loop), (b, ref)):
            for p in m.parameters():
                p.grad = None
            create = opt.should_create_graph()
            out = m(x)
            if step % 7 != 3:  # on the other steps `extra` gets no gradient at all
                out = out * torch.tanh(m.extra)
            loss = ((out - y) ** 2).mean()
            loss.backward(create_graph=create)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, **F32)
        torch.testing.assert_close(loop.state[pa]["exp_avg"], ref.state[pb]["m"], **F32)
        torch.testing.assert_close(loop.state[pa]["exp_avg_d"], ref.state[pb]["D"], **F32)
        assert loop.state[pa]["exp_avg_bias_corr"] == pytest.approx(ref.state[pb]["bias"], rel=1e-12)
        assert loop.state[pa]["lr_warmup_cumprod"] == pytest.approx(ref.state[pb]["warm"], rel=1e-12)
    assert loop.steps == ref.steps == 30


def _inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(33,), (4, 17), (2, 3, 5), (1,)]
    r = lambda s, dt: torch.randn(s, generator=gen).to(dt)  # noqa: E731
    ps = [r(s, dtype) for s in shapes]
    gs = [r(s, dtype) for s in shapes]
    hs = [r(s, dtype) for s in shapes]
    ms = [r(s, torch.float32) for s in shapes]
    ds = [r(s, torch.float32).abs() for s in shapes]
    sc = torch.tensor([[0.9, 0.999, 1e-4, 0.05, 1.0], [0.8, 0.99, 1e-3, 0.2, 0.97],
                       [0.9, 0.999, 1e-4, 0.01, 1.0], [0.5, 0.9, 1e-2, 1.0, 0.9]], dtype=torch.float64)
    return ps, gs, ms, ds, hs, sc


def _clone(xs):
    return [x.clone() for x in xs]


def _compiled_rule_eager(ps, gs, ms, ds, hs, sc):
    """compiled_rule takes one (beta1, beta2, eps) and per-tensor scales/decays as tensors."""
    for i in range(len(ps)):
        b1, b2, eps, scale, decay = sc[i].tolist()
        compiled_rule([ps[i]], [gs[i]], [ms[i]], [ds[i]], None if hs is None else [hs[i]],
                      torch.tensor([scale]), torch.tensor([decay]), b1, b2, eps)


def _rule_reference(ps, gs, ms, ds, hs, sc):
    """esgdm.rule.update_elements (the original rule, exact=True) on the benchmarks'
    per-tensor table: beta1, beta2, eps, step_scale, decay."""
    from esgdm.rule import update_elements

    def f32(x):
        return torch.tensor(x, dtype=torch.float64).float().item()

    for i in range(len(ps)):
        b1, b2, eps, scale, decay = sc[i].tolist()
        h = None if hs is None else hs[i].float()
        p, m, d = update_elements(ps[i].float(), gs[i].float(), ms[i], ds[i], h, w=f32(1 - b1),
                                  beta2=f32(b2), eps=f32(eps), step_scale=f32(scale),
                                  decay=f32(decay), dscale=0.0, exact=True)
        ps[i].copy_(p)
        ms[i].copy_(m)
        if h is not None:
            ds[i].copy_(d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_step", [False, True])
@pytest.mark.parametrize("impl", ["loop", "compiled_rule"])
def test_step_functions_match_torch_backend(impl, dtype, d_step):
    """loop_step and the rule that bench_step compiles agree with esgdm's "torch" backend
    element for element, plain and D-step, fp32 and bf16, per-tensor hyper-parameters."""
    ps, gs, ms, ds, hs, sc = _inputs(dtype)
    hs = hs if d_step else None
    p2, m2, d2 = _clone(ps), _clone(ms), _clone(ds)
    fn = loop_step if impl == "loop" else _compiled_rule_eager
    fn(ps, gs, ms, ds, hs, sc)
    _rule_reference(p2, gs, m2, d2, hs, sc)
    ptol = F32 if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    for a, b in zip(ps, p2):
        torch.testing.assert_close(a, b, **ptol)
    for a, b in zip(ms + ds, m2 + d2):
        torch.testing.assert_close(a, b, **F32)
    assert any(not torch.equal(a, b) for a, b in zip(ps, _inputs(dtype)[0])), "nothing moved"


def _run(args, timeout):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_bench_step_smoke(tmp_path):
    out = _run(["benchmarks/bench_step.py", "--smoke", "--device", "cpu", "--threads", "1",
                "--compile", "off", "--json", str(tmp_path / "s.json"),
                "--markdown", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")], 240)
    rows = json.load(open(tmp_path / "s.json"))["rows"]
    need = {"optimizer", "impl", "device", "dtype", "numel", "ntensors", "step_kind", "ms", "gbps"}
    assert rows and all(need <= r.keys() for r in rows)
    seen = {(r["optimizer"], r["impl"], r["step_kind"]) for r in rows}
    for must in [("ESGD-M", "torch", "plain"), ("ESGD-M", "torch", "dstep_kernel"),
                 ("ESGD-M", "torch", "dstep+hvp"), ("ESGD-M", "loop", "plain"),
                 ("AdamW", "foreach", "plain"), ("SGD", "foreach", "plain"), ("copy", "copy", "copy")]:
        assert must in seen, f"{must} missing from {sorted(seen)}"
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in rows)
    assert "| implementation |" in out
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert "Plain step" in (tmp_path / "s.md").read_text()


def test_bench_portable_smoke():
    """bench_portable.py runs, counts passes (the old backend's 25 from git included) and
    prints every row."""
    out = _run(["benchmarks/bench_portable.py", "--tensors", "3", "--numel", "2000", "--repeats", "2",
                "--inner", "1", "--threads", "1", "--count", "--torch-at", "94f165c"], 240)
    for row in ("esgdm/torch plain", "esgdm/torch eager plain", "esgdm/torch dstep", "esgdm/torch_before plain",
                "AdamW/foreach", "AdamW/fused", "copy"):
        assert f"\n{row} " in out, out
    assert re.search(r"esgdm/torch_before plain +25\.0 passes", out), out


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bench_host_loop_smoke(backend):
    """bench_host_loop.py times both competitors (the cpu backend where it is built)."""
    if backend == "cpu" and esgdm.backends.why_not("cpu", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the cpu backend (esgdm._C) is not built")
    out = _run(["benchmarks/bench_host_loop.py", "--tensors", "3", "--inner", "5", "--repeats", "2",
                "--backend", backend], 120)
    for row in (f"ESGDM({backend})", "AdamW(fused=True)"):
        assert re.search(rf"{re.escape(row)} +best +\d+\.\d+ us +median +\d+\.\d+ us", out), out


def test_bench_gpu_tables_smoke():
    """bench_gpu.py's launcher-table rows run on a CPU (host work only)."""
    out = _run(["benchmarks/bench_gpu.py", "--device", "cpu", "--quick", "--only", "tables"], 240)
    for label in ("C++", "Python"):
        assert re.search(rf"\| 256 \| {re.escape(label)} \| \d", out), out


@pytest.mark.parametrize("evict", [[], ["--evict-mib", "8"]], ids=["warm", "evicted"])
def test_bench_gpu_host_smoke(evict):
    """bench_gpu.py's host table runs on a CPU: every optimizer, both memory layouts,
    with and without the caches written over before every step."""
    out = _run(["benchmarks/bench_gpu.py", "--device", "cpu", "--quick", "--only", "host", *evict], 240)
    assert ("caches written over (8 MiB)" in out) == bool(evict), out
    for name in ("cpu", "torch", "cpu (no plan)", "AdamW(fused)", "AdamW(foreach)"):
        for layout in ("separate", "flat"):
            assert re.search(rf"\| 256 \| {re.escape(name)} \| {layout} \|", out), out


def test_bench_gpu_triton_host_smoke():
    """--triton-no-launch: the triton backend's host rows on a CPU (its launch a no-op)."""
    out = _run(["benchmarks/bench_gpu.py", "--device", "cpu", "--quick", "--only", "host",
                "--triton-no-launch"], 240)
    for layout in ("separate", "flat"):
        assert re.search(rf"\| 256 \| triton \| {layout} \| \d", out), out


@pytest.mark.slow
def test_bench_gpu_compile_smoke():
    """bench_gpu.py's compiled-step rows run on a CPU, with the guards each compiled call
    checks (fewer where the step leaves the graph than where fullgraph traces it), and
    the whole training steps eager and compiled."""
    out = _run(["benchmarks/bench_gpu.py", "--device", "cpu", "--quick", "--only", "compile",
                "--compile-tensors", "24"], 600)
    assert "plain step, 24 tensors" in out, out
    guards = {(name, how): int(n) for name, how, n in
              re.findall(r"\| (cpu|torch) \| (compiled|compiled, fullgraph) \| [\d.]+ \| (\d+) \|", out)}
    assert {name for name, _ in guards} == {"cpu", "torch"} and len(guards) == 4, out
    assert re.search(r"\| AdamW\(fused\) \| compiled \| [\d.]+ \|", out), out
    for name in ("cpu", "torch"):
        assert 0 < guards[name, "compiled"] < guards[name, "compiled, fullgraph"], out
    steps = re.findall(r"\| (autograd|finite_difference) \| (eager|compiled|compiled, fullgraph) \| [\d.]+ \|", out)
    assert len(set(steps)) == 6, out


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    _run(["benchmarks/bench_train.py", "--smoke", "--device", "cpu", "--threads", "1",
          "--no-progress", "--plots", str(tmp_path), "--json", str(tmp_path / "t.json"),
          "--markdown", str(tmp_path / "t.md")], 300)
    runs = json.load(open(tmp_path / "t.json"))["runs"]
    assert {r["task"] for r in runs} == {"autoencoder", "convnet", "charlm"}
    assert {r["optimizer"] for r in runs} == {"ESGD-M", "AdamW", "SGD"}
    for r in runs:
        assert r["steps_done"] == 30 or r["nonfinite_step"] is not None
        assert len(r["step_ms"]) == r["steps_done"]
        if r["optimizer"] == "ESGD-M" and r["steps_done"] == 30:
            # 20 warmup D-steps, 9 plain steps, then the 1-in-10 refresh
            assert r["d_steps"] == [True] * 20 + [False] * 9 + [True]
    for task in ("autoencoder", "convnet", "charlm"):
        assert (tmp_path / f"train_{task}_cpu.png").stat().st_size > 1000
    assert "non-finite runs" in (tmp_path / "t.md").read_text()


@pytest.mark.slow
def test_pytest_benchmark_suite_runs():
    """The pytest-benchmark suite collects and runs (each case once, benchmarking off)."""
    env = dict(os.environ, ESGDM_BENCH_NUMEL="16K", ESGDM_BENCH_DEVICE="cpu", ESGDM_BENCH_DTYPES="fp32")
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


@pytest.mark.slow
def test_bench_train_finite_difference_smoke(tmp_path):
    """The transformer with fused attention (no double backward) trains with
    hvp="finite_difference", D-steps on the same schedule."""
    import inspect

    import esgdm
    if "hvp" not in inspect.signature(esgdm.ESGDM).parameters:
        pytest.skip("this esgdm has no hvp= option")
    _run(["benchmarks/bench_train.py", "--smoke", "--device", "cpu", "--threads", "1",
          "--no-progress", "--tasks", "charlm", "--optimizers", "ESGD-M", "--attention", "sdpa",
          "--esgdm-hvp", "finite_difference", "--json", str(tmp_path / "t.json")], 120)
    (run,) = json.load(open(tmp_path / "t.json"))["runs"]
    assert run["nonfinite_step"] is None and run["steps_done"] == 30
    assert run["d_steps"] == [True] * 20 + [False] * 9 + [True]


def test_bench_state8_smoke(tmp_path):
    """8-bit against float32 state in the cpu kernel: every row timed, bytes per element
    and state per parameter as the script's docstring says."""
    from esgdm.backends import cpp_impl

    if cpp_impl._C is None:
        pytest.skip(str(cpp_impl.LOAD_ERROR))
    out = _run(["benchmarks/bench_state8.py", "--smoke", "--threads", "1", "--json",
                str(tmp_path / "s8.json")], 240)
    rows = json.load(open(tmp_path / "s8.json"))["rows"]
    assert {(r["state"], r["kind"]) for r in rows} == {
        (s, k) for s in ("fp32", "u8") for k in ("plain", "dstep", "dstep+dscale")}
    assert all(r["ms"] > 0 for r in rows)
    per = {(r["state"], r["kind"]): r["bytes_per_element"] for r in rows}
    assert per[("fp32", "plain")] == 24 and per[("fp32", "dstep")] == 32
    assert abs(per[("u8", "plain")] - 15.047) < 1e-3 and abs(per[("u8", "dstep")] - 20.0625) < 1e-3
    assert "2.031 B/param (8-bit, scales included)" in out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("drain", [[], ["--without-drain"]], ids=["with", "without"])
def test_exit_abort_rate_smoke(drain):
    """exit_abort_rate.py runs its one-process FSDP2 job and counts aborts, either way."""
    out = _run(["benchmarks/exit_abort_rate.py", "--runs", "2", "--jobs", "1", *drain], 240)
    which = "without-drain" if drain else "with-drain"
    assert re.search(rf"{which}: \d of 2 runs of 1 process\(es\) aborted at exit", out), out
