"""The two command-line entry points: the demo and esgdm.info."""

import subprocess
import sys

import esgdm.demo


def test_info_reports_every_backend_and_the_auto_choice():
    done = subprocess.run([sys.executable, "-m", "esgdm.info"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for name in ("triton", "cuda", "cpu", "torch"):
        assert f"\n  {name:7s} " in out
    assert "backend 'auto' picks:" in out
    assert "torch.float32   -> " in out and "torch.bfloat16  -> " in out


def test_demo_trains_and_prints_its_table(capsys):
    rows = esgdm.demo.main(["--epochs", "2", "--batch-size", "128"])
    out = capsys.readouterr().out
    assert [r["optimizer"].split()[0] for r in rows] == ["ESGD-M", "AdamW"]
    for r in rows:
        assert 0.0 <= r["test"][1] <= 1.0 and r["ms_per_step"] > 0
    # two epochs on the digits already beat chance (10%) by far
    assert rows[0]["test"][1] > 0.5
    assert "train loss" in out and "backend" in out
