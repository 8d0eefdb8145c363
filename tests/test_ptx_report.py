"""benchmarks/ptx_report.py compiles kernel variants for sm_80 and sm_90 without a GPU;
the fp32 fast path must use 128-bit global loads and stores for all of its arrays, and
no variant may spill."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "ptx_report.py")


def _run(tmp, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the kernel of this tree, not of whatever esgdm is installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, SCRIPT, "--json", str(tmp / "rows.json"), "--dump", str(tmp / "ptx"),
                          *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(tmp / "rows.json") as f:
        rows = json.load(f)
    return rows, res.stdout, tmp / "ptx"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The default report: every parameter dtype, plain and D-step, sm_80 and sm_90."""
    return _run(tmp_path_factory.mktemp("ptx"))


@pytest.fixture(scope="module")
def report_variants(tmp_path_factory):
    """bfloat16 state, stochastic rounding, grad_scale/found_inf, on sm_90."""
    return _run(tmp_path_factory.mktemp("ptx_variants"), "--archs", "90", "--states", "bf16",
                "--rounding", "stochastic", "--amp")


@pytest.fixture(scope="module")
def report_u8(tmp_path_factory):
    """8-bit state (uint8 codes and block scales), nearest and stochastic rounding, on sm_90."""
    return _run(tmp_path_factory.mktemp("ptx_u8"), "--archs", "90", "--states", "u8",
                "--rounding", "nearest,stochastic")


def _fast_path_accesses(r, elem_bytes, arrays, want):
    """Adds to ``want`` (width -> count) the vector accesses of ``arrays`` arrays of
    ``elem_bytes``-byte elements on the fast path: each thread moves BLOCK / (32 * warps)
    consecutive elements of each array, in accesses of up to 128 bits."""
    per_thread = r["block"] // (32 * r["warps"]) * elem_bytes
    width = f"{min(per_thread, 16) * 8}b"
    want[width] = want.get(width, 0) + arrays * max(1, per_thread // 16)


def _assert_vectorized(r, state_bytes):
    p_bytes = 4 if r["dtype"] == "fp32" else 2
    loads, stores = {}, {}
    _fast_path_accesses(r, p_bytes, 3 if r["d_step"] else 2, loads)        # p, g (, h)
    _fast_path_accesses(r, state_bytes, 2, loads)                          # m, D
    _fast_path_accesses(r, p_bytes, 1, stores)                             # p
    _fast_path_accesses(r, state_bytes, 2 if r["d_step"] else 1, stores)   # m (, D)
    for width, count in loads.items():
        assert r["ld"].get(width, 0) >= count, (width, count, r)
    for width, count in stores.items():
        assert r["st"].get(width, 0) >= count, (width, count, r)


def test_every_variant_compiles(report):
    rows, stdout, _ = report
    seen = {(r["dtype"], r["d_step"], r["arch"]) for r in rows}
    assert seen == {(d, s, a) for d in ("fp32", "bf16", "fp16") for s in (False, True) for a in (80, 90)}
    for r in rows:
        assert r["variant"] in stdout


def test_fp32_fast_path_is_128_bit(report):
    """Each thread of the fast path moves BLOCK / (32 * warps) elements of every array
    in 128-bit accesses: p, g, m, D loads and p, m stores (and h, D on D-steps)."""
    rows, _, _ = report
    for r in rows:
        if r["dtype"] != "fp32":
            continue
        vectors = r["block"] // (32 * r["warps"]) // 4  # float4 per thread and array
        assert vectors >= 1
        loads, stores = (5, 3) if r["d_step"] else (4, 2)
        assert r["ld"].get("128b", 0) >= loads * vectors, r
        assert r["st"].get("128b", 0) >= stores * vectors, r


def test_half_precision_vectorized(report):
    """16-bit parameters (float32 state): vector accesses for every array of the fast path."""
    rows, _, _ = report
    for r in rows:
        if r["dtype"] != "fp32":
            _assert_vectorized(r, state_bytes=4)
            assert r["ld"].get("128b", 0) > 0 and r["st"].get("128b", 0) > 0, r


@pytest.mark.slow
def test_variants_vectorized(report_variants):
    """bfloat16 state, stochastic rounding and the AMP inputs compiled in: every array of
    the fast path still moves in vector accesses, and nothing spills."""
    rows, _, _ = report_variants
    seen = {(r["dtype"], r["rounding"], r["d_step"]) for r in rows}
    assert seen == {("fp32", "nearest", s) for s in (False, True)} | {
        (d, "stochastic", s) for d in ("bf16", "fp16") for s in (False, True)}
    for r in rows:
        assert r["state"] == "bf16" and r["amp"] and r["arch"] == 90
        _assert_vectorized(r, state_bytes=2)
        if "regs" in r:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def test_registers_and_spills(report):
    for r in report[0]:
        if "regs" not in r:
            pytest.skip(f"no ptxas here: {r.get('ptxas_error', 'not found')}")
        assert 0 < r["regs"] <= 255
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def test_dump_writes_ptx(report):
    rows, _, ptx_dir = report
    for r in rows:
        with open(ptx_dir / (r["variant"] + ".ptx")) as f:
            text = f.read()
        assert ".entry esgdm_step_kernel" in text
        assert f".target sm_{r['arch']}" in text


def test_8bit_state_compiles_for_sm90(report_u8):
    """Every parameter dtype with 8-bit state compiles for sm_90 without spilling; the
    parameters and gradients of the fast path still move in 128-bit accesses; the codes
    are rounded by cvt.rni and every division and sqrt is IEEE (no approximations)."""
    rows, _, ptx_dir = report_u8
    seen = {(r["dtype"], r["rounding"], r["d_step"]) for r in rows}
    assert seen == {("fp32", "nearest", s) for s in (False, True)} | {
        (d, rnd, s) for d in ("bf16", "fp16") for rnd in ("nearest", "stochastic") for s in (False, True)}
    for r in rows:
        assert r["state"] == "u8" and r["arch"] == 90
        assert r["ld"].get("128b", 0) >= (3 if r["d_step"] else 2), r  # p, g (, h)
        assert r["st"].get("128b", 0) >= 1, r                            # p
        if "regs" in r:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        with open(ptx_dir / (r["variant"] + ".ptx")) as f:
            text = f.read()
        assert "cvt.rni.f32.f32" in text
        assert "div.full" not in text and "sqrt.approx" not in text and "div.approx" not in text
