"""benchmarks/ptx_report.py compiles every kernel variant for sm_80 and sm_90 without a
GPU; the fp32 fast path must use 128-bit global loads and stores for all of its arrays."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "ptx_report.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, SCRIPT, "--json", str(out / "rows.json"), "--dump", str(out / "ptx")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(out / "rows.json") as f:
        rows = json.load(f)
    return rows, res.stdout, out / "ptx"


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
    rows, _, _ = report
    for r in rows:
        if r["dtype"] != "fp32":
            assert r["ld"].get("128b", 0) > 0 and r["st"].get("128b", 0) > 0, r


def test_registers_and_spills(report):
    rows, _, _ = report
    for r in rows:
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
