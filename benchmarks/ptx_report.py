"""Compile every variant of the fused ESGD-M Triton kernel ahead of time and report
what the compiler made of it -- no GPU needed.

For each parameter dtype (fp32, bf16, fp16), state dtype (fp32 by default; bf16 with
``--states fp32,bf16``; ``u8`` the 8-bit state of esgdm.quant, uint8 codes and block
scales), rounding of 16-bit parameters (nearest by default; also
stochastic with ``--rounding nearest,stochastic``), each step kind (plain, D-step) and
each target (sm_80, sm_90 by default) the kernel in ``kernels/esgdm_step.py`` is
compiled with ``triton.compile`` for a ``GPUTarget``; ``--amp`` compiles the variants
that read ``grad_scale``/``found_inf``, ``--exact`` those with ``FLAG_EXACT``.  The
report prints, per variant:

* the global loads and stores by access width (``128b`` = ``ld/st.global.v4.b32``:
  the fp32 fast path must show them),
* registers per thread, spill stores/loads and the stack frame (from ``ptxas -v``),
* shared memory (Triton's metadata; layout conversions on the masked path use it),
* compile seconds (about 0 when Triton's cache already held the variant).

Use it to tune the launch configuration without a GPU::

    python benchmarks/ptx_report.py                       # the configuration in use
    python benchmarks/ptx_report.py --block 2048 --warps 4
    python benchmarks/ptx_report.py --states fp32,bf16 --rounding nearest,stochastic --amp
    python benchmarks/ptx_report.py --archs 90 --states u8    # 8-bit state
    python benchmarks/ptx_report.py --dump /tmp/ptx       # also write each PTX file
    python benchmarks/ptx_report.py --json out.json       # machine-readable

The kernel must be compiled, not interpreted, so ``TRITON_INTERPRET`` is cleared
before the kernel module is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # before anything imports triton kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9:_]+)*)")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _import_kernels():
    """The kernel module, imported in compiled (not interpreted) mode."""
    try:
        import esgdm.kernels.esgdm_step as k
    except ImportError:  # running from a checkout that is not installed
        sys.path.insert(0, ROOT)
        import esgdm.kernels.esgdm_step as k  # noqa: F811
    if k.INTERPRET:
        raise SystemExit("ptx_report: the kernel module was imported with TRITON_INTERPRET=1; "
                         "run this script in a fresh process")
    return k


def access_widths(ptx: str) -> dict:
    """``{"ld": {"128b": n, "32b": n, ...}, "st": {...}}`` for the global accesses in ``ptx``."""
    out = {"ld": {}, "st": {}}
    for kind, quals in _ACCESS.findall(ptx):
        parts = quals.strip(".").split(".")
        vec = 1
        bits = 0
        for q in parts:
            if re.fullmatch(r"v\d+", q):
                vec = int(q[1:])
            m = re.fullmatch(r"[bfsu](\d+)", q)
            if m:
                bits = int(m.group(1))
        key = f"{vec * bits}b" if bits else "?"
        out[kind][key] = out[kind].get(key, 0) + 1
    return out


def find_ptxas(arch: int):
    """A ptxas that knows ``sm_<arch>``: Triton's own, else the CUDA toolkit's, else PATH."""
    candidates = []
    try:
        from triton import knobs
        tool = knobs.nvidia.ptxas_blackwell if arch >= 100 else knobs.nvidia.ptxas
        candidates.append(tool.path)
    except Exception:  # noqa: BLE001 - older Triton: no knobs
        pass
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    except Exception:  # noqa: BLE001
        pass
    candidates += ["/usr/local/cuda/bin/ptxas", shutil.which("ptxas") or ""]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def ptxas_usage(ptx: str, arch: int, workdir: str) -> dict:
    """Registers, spills and stack of ``ptx`` from ``ptxas -v`` (empty dict if no ptxas)."""
    ptxas = find_ptxas(arch)
    if ptxas is None:
        return {}
    target = re.search(r"^\s*\.target\s+(\S+)", ptx, re.M)
    gpu = target.group(1).split(",")[0] if target else f"sm_{arch}"
    src = os.path.join(workdir, "k.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(workdir, "k.cubin")],
                         capture_output=True, text=True)
    log = res.stdout + res.stderr
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    if res.returncode != 0 or not regs:
        return {"ptxas_error": log.strip().splitlines()[-1] if log.strip() else f"rc={res.returncode}"}
    out = {"regs": int(regs.group(1))}
    if spill:
        out.update(stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                   spill_loads=int(spill.group(3)))
    return out


def compile_variant(k, dtype: str, d_step: bool, arch: int, block: int, warps: int,
                    state: str = "fp32", rounding: str = "nearest", amp: bool = False,
                    exact: bool = False):
    """Compiles one variant for ``sm_<arch>``; returns the CompiledKernel.

    ``state``: the exp_avg/exp_avg_d dtype ("u8": 8-bit codes); ``rounding``: how 16-bit parameters are
    stored ("nearest" or "stochastic"); ``amp``: with grad_scale and found_inf;
    ``exact``: FLAG_EXACT (no dscale rule)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = k.esgdm_step_kernel
    mode = k.ROUND_NEAREST
    if rounding == "stochastic" and dtype != "fp32":
        mode = k.ROUND_STOCHASTIC_BF16 if dtype == "bf16" else k.ROUND_STOCHASTIC_FP16
    constexprs = dict(ROW_=k.ROW, NS=k.N_SCALAR_COLUMNS, NH=k.N_HPARAM_COLUMNS, BLOCK=block,
                      D_STEP=d_step, EXACT=exact, HAS_GS=amp, HAS_FI=amp, ROUNDING=mode,
                      HINTS=True, EMULATE_BF16=False, PRECISE_MATH=k.PRECISE, QUANT=state == "u8")
    pointers = {"blocks_ptr": "*i32", "table_ptr": "*i64", "index_ptr": "*i32",
                "scalars_ptr": "*fp64", "hparams_ptr": "*fp64", "grad_scale_ptr": "*fp32",
                "found_inf_ptr": "*fp32", "tickets_ptr": "*i32", "p_ref": f"*{dtype}",
                "s_ref": f"*{state}", "seed": "i32"}
    target = GPUTarget("cuda", arch, 32)
    try:  # Triton >= 3.2: arguments by name, constexprs in the signature
        signature = dict(pointers, **{name: "constexpr" for name in constexprs})
        src = ASTSource(fn, signature, constexprs=constexprs)
    except Exception:  # noqa: BLE001 - Triton 3.0/3.1: arguments by position
        names = fn.arg_names
        signature = {names.index(n): t for n, t in pointers.items()}
        src = ASTSource(fn, signature, constants={names.index(n): v for n, v in constexprs.items()})
    return triton.compile(src, target=target, options={"num_warps": warps})


def report(dtypes, archs, block=None, warps=None, dump=None, states=("fp32",),
           roundings=("nearest",), amp=False, exact=False):
    """Compiles every variant; returns a list of dicts (one per variant)."""
    import tempfile

    import torch

    k = _import_kernels()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            config = k.CONFIGS[getattr(torch, DTYPE_NAMES[dtype])]
            b = block or config["BLOCK"]
            w = warps or config["num_warps"]
            for state in states:
                # float32 parameters are always stored rounded to nearest
                for rounding in (("nearest",) if dtype == "fp32" else roundings):
                    for d_step in (False, True):
                        for arch in archs:
                            name = f"{dtype}_{'dstep' if d_step else 'plain'}"
                            if state != "fp32":
                                name += f"_s{state}"
                            if rounding != "nearest":
                                name += "_sr"
                            name += f"_sm{arch}_b{b}_w{w}"
                            t0 = time.perf_counter()
                            compiled = compile_variant(k, dtype, d_step, arch, b, w, state, rounding,
                                                       amp, exact)
                            seconds = time.perf_counter() - t0
                            ptx = compiled.asm["ptx"]
                            if dump:
                                os.makedirs(dump, exist_ok=True)
                                with open(os.path.join(dump, name + ".ptx"), "w") as f:
                                    f.write(ptx)
                            row = dict(variant=name, dtype=dtype, state=state, rounding=rounding,
                                       amp=amp, exact=exact, d_step=d_step, arch=arch, block=b,
                                       warps=w, compile_s=round(seconds, 2),
                                       shared=getattr(compiled.metadata, "shared", None),
                                       **access_widths(ptx))
                            usage = ptxas_usage(ptx, arch, tmp)
                            if not usage:  # no ptxas: older Triton kept these in the metadata
                                for key in ("n_regs", "n_spills"):
                                    if getattr(compiled, key, None) is not None:
                                        usage[key] = getattr(compiled, key)
                            row.update(usage)
                            rows.append(row)
    return rows


def _fmt_widths(widths: dict) -> str:
    order = sorted(widths, key=lambda s: -int(s[:-1]) if s[:-1].isdigit() else 0)
    return " ".join(f"{key}x{widths[key]}" for key in order) or "-"


def print_table(rows) -> None:
    head = (f"{'variant':40} {'loads (width x count)':26} {'stores':22} {'regs':>4} "
            f"{'spill st/ld':>11} {'smem':>5} {'comp_s':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        spill = f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}"
        regs = r.get("regs", r.get("n_regs", "?"))
        print(f"{r['variant']:40} {_fmt_widths(r['ld']):26} {_fmt_widths(r['st']):22} {regs!s:>4} "
              f"{spill:>11} {r.get('shared')!s:>5} {r['compile_s']:6.1f}")
        if "ptxas_error" in r:
            print(f"    ptxas: {r['ptxas_error']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma-separated: fp32,bf16,fp16")
    parser.add_argument("--archs", default="80,90", help="comma-separated compute capabilities")
    parser.add_argument("--block", type=int, default=None, help="elements per program (default: CONFIGS)")
    parser.add_argument("--warps", type=int, default=None, help="warps per program (default: CONFIGS)")
    parser.add_argument("--states", default="fp32", help="comma-separated state dtypes: fp32,bf16,u8")
    parser.add_argument("--rounding", default="nearest",
                        help="comma-separated: nearest,stochastic (16-bit parameters)")
    parser.add_argument("--amp", action="store_true", help="with grad_scale and found_inf")
    parser.add_argument("--exact", action="store_true", help="FLAG_EXACT (no dscale rule)")
    parser.add_argument("--dump", metavar="DIR", help="write each variant's PTX into DIR")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPE_NAMES]
    if bad:
        parser.error(f"unknown dtype(s) {bad}; choose from {sorted(DTYPE_NAMES)}")
    archs = [int(a) for a in args.archs.split(",") if a.strip()]
    states = [d.strip() for d in args.states.split(",") if d.strip()]
    if any(d not in ("fp32", "bf16", "u8") for d in states):
        parser.error(f"state dtypes are fp32, bf16 and u8, not {states}")
    roundings = [d.strip() for d in args.rounding.split(",") if d.strip()]
    if any(d not in ("nearest", "stochastic") for d in roundings):
        parser.error(f"rounding is nearest or stochastic, not {roundings}")
    rows = report(dtypes, archs, args.block, args.warps, args.dump, states, roundings, args.amp,
                  args.exact)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
