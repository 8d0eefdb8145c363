"""pytest-benchmark suite of the optimizer step (the same competitors as bench_step.py).

Not part of the regular test run (``pytest`` from the repository root collects
``tests/`` only).  Run and compare with::

    pytest benchmarks --benchmark-only --benchmark-save=mine
    pytest benchmarks --benchmark-only --benchmark-compare            # against the last save
    pytest benchmarks --benchmark-only --benchmark-group-by=group     # the default here

Benchmarks are grouped by (step kind, dtype, parameter shapes) so that each group
lists ESGD-M's implementations next to torch.optim's for the same parameters:
group ``plain ...`` holds ESGD-M's plain step (through ``ESGDM.step()`` and the bare
kernel), the loop baseline, AdamW and SGD (foreach and fused), and a copy and an
in-place add over the same bytes; group ``dstep ...`` holds ESGD-M's D-step kernel and
full D-step.

Environment knobs: ``ESGDM_BENCH_NUMEL`` (default 4M), ``ESGDM_BENCH_SHAPES``
(few | transformer | many, default transformer), ``ESGDM_BENCH_DTYPES`` (default
fp32,bf16), ``ESGDM_BENCH_DEVICE`` (default cuda if available), ``ESGDM_BENCH_COMPILE=1``
to include the torch.compile rows.
"""

from __future__ import annotations

import os

import pytest
import torch
from bench_step import (
    CompiledTorch,
    Copy,
    EsgdmKernel,
    EsgdmOpt,
    LoopOpt,
    TorchOptim,
    Workload,
    available_backends,
    shapes_for,
)
from benchutil import fmt_size, parse_dtypes, parse_size, pick_device, sync

NUMEL = parse_size(os.environ.get("ESGDM_BENCH_NUMEL", "4M"))
SHAPE_SET = os.environ.get("ESGDM_BENCH_SHAPES", "transformer")
DTYPES = parse_dtypes(os.environ.get("ESGDM_BENCH_DTYPES", "fp32,bf16"))
DEVICE = pick_device(os.environ.get("ESGDM_BENCH_DEVICE", "auto"))
COMPILE = os.environ.get("ESGDM_BENCH_COMPILE", "0") == "1"
SHAPES = shapes_for(SHAPE_SET, NUMEL, 4096)


def _family_makers(dtype):
    """(id, factory(workload) -> Family) for every competitor that can run here."""
    makers = []
    for name in available_backends(DEVICE, dtype, {}):
        makers.append((f"esgdm-{name}", lambda w, n=name: EsgdmOpt(w, n)))
        makers.append((f"esgdm-{name}-kernel", lambda w, n=name: EsgdmKernel(w, n)))
    if COMPILE:
        makers.append(("esgdm-torch+compile", CompiledTorch))
    makers += [
        ("loop", LoopOpt),
        ("AdamW-foreach", lambda w: TorchOptim(w, torch.optim.AdamW, "foreach", 2)),
        ("AdamW-fused", lambda w: TorchOptim(w, torch.optim.AdamW, "fused", 2)),
        ("SGD-foreach", lambda w: TorchOptim(w, torch.optim.SGD, "foreach", 1, momentum=0.9)),
        ("SGD-fused", lambda w: TorchOptim(w, torch.optim.SGD, "fused", 1, momentum=0.9)),
        ("copy", lambda w: Copy(w, 1 << 30 if DEVICE.type == "cuda" else 256 << 20)),
    ]
    return makers


# Which rows each family contributes; decided without building anything.
_ROWS = {"esgdm": ("plain", "dstep+hvp"), "kernel": ("plain_kernel", "dstep_kernel"),
         "compile": ("plain_kernel", "dstep_kernel"), "loop": ("plain", "dstep_kernel", "dstep+hvp"),
         "torch": ("plain",), "copy": ("copy", "add_")}


def _kinds(fam_id):
    if fam_id == "copy":
        return _ROWS["copy"]
    if fam_id.endswith("compile"):
        return _ROWS["compile"]
    if fam_id.endswith("kernel"):
        return _ROWS["kernel"]
    if fam_id.startswith("esgdm"):
        return _ROWS["esgdm"]
    if fam_id == "loop":
        return _ROWS["loop"]
    return _ROWS["torch"]


CASES = [
    pytest.param(dtype, fam_id, maker, kind, id=f"{str(dtype)[6:]}-{fam_id}-{kind}")
    for dtype in DTYPES
    for fam_id, maker in _family_makers(dtype)
    for kind in _kinds(fam_id)
]

_workloads: dict = {}


def _workload(dtype) -> Workload:
    if dtype not in _workloads:
        _workloads.clear()  # one at a time keeps memory down
        _workloads[dtype] = Workload(SHAPES, dtype, DEVICE)
    return _workloads[dtype]


@pytest.mark.parametrize("dtype,fam_id,maker,kind", CASES)
def test_step(benchmark, dtype, fam_id, maker, kind):
    w = _workload(dtype)
    fam = maker(w)
    try:
        fam.setup()
    except Exception as e:  # noqa: BLE001 - e.g. no fused SGD in this torch
        pytest.skip(f"{fam_id} cannot run: {type(e).__name__}: {e}")
    row = next(r for r in fam.rows if r.step_kind == kind)
    group_kind = "plain" if kind in ("plain", "plain_kernel", "copy", "add_") else "dstep"
    benchmark.group = (f"{group_kind} | {str(dtype)[6:]} | {SHAPE_SET} ({len(SHAPES)} tensors) "
                       f"{fmt_size(w.numel)} | {DEVICE.type}")
    benchmark.extra_info.update(optimizer=row.optimizer, impl=row.impl, step_kind=kind,
                                numel=w.numel, bytes_per_step=row.bytes_per_elem * w.numel)

    def target():
        with torch.no_grad():
            row.run()
        sync(DEVICE)

    try:
        if row.prepare is None:
            benchmark(target)
        else:
            def setup():
                row.finish()
                row.prepare()
            benchmark.pedantic(target, setup=setup, rounds=10, iterations=1, warmup_rounds=1)
            row.finish()
    finally:
        fam.teardown()
