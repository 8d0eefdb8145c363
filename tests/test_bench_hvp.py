"""benchmarks/bench_hvp.py runs end to end (a smoke run: no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_hvp_smoke(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_hvp.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == [
        "adamw", "esgdm plain step", "esgdm D-step, autograd",
        "esgdm D-step, finite difference", "esgdm D-step, central difference",
        "esgdm D-step, finite difference, signs as tensors",
    ]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["peak_mib"] >= 0 and r["alloc_mib"] > 0
        if r["steps"]:
            assert r["nonfinite"] == 0 and 0 < r["final_loss"] < 10
