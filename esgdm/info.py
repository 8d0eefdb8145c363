"""``python -m esgdm.info``: versions, the capability table, and what ``auto`` picks on each device.

Everything said about the backends comes from the capability table
(:data:`esgdm.backends.capabilities.CAPABILITIES`) and :func:`esgdm.backends.why_not`.
"""

from __future__ import annotations

import platform
import sys

import torch

import esgdm
from esgdm import backends, dtypes

DTYPES = (torch.float32, torch.bfloat16)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as e:  # noqa: BLE001 - report any import failure as-is
        return f"not importable ({type(e).__name__}: {e})"


def devices() -> list[torch.device]:
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, sm_{cap[0]}{cap[1]})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def report() -> str:
    lines = [
        f"esgdm {esgdm.__version__}",
        f"python {sys.version.split()[0]}  torch {torch.__version__}  "
        f"(CUDA build: {torch.version.cuda or 'no'}, GPU visible: {torch.cuda.is_available()})",
        f"triton {_triton_version()}",
        "",
        "backends:",
    ]
    for name, row in backends.CAPABILITIES.items():
        b = backends.get(name)
        usable = [str(d) for d in devices() if backends.why_not(name, d, torch.float32) is None]
        status = f"usable on {', '.join(usable)}" if usable else "not usable here"
        lines.append(f"  {name:7s} {status}")
        where = "every device type" if row.devices is None else ", ".join(row.devices)
        lines.append(f"          runs on: {where}; needs {row.needs}")
        pairs = "; ".join(f"{dtypes.name(p)} with {dtypes.names(row.state_dtypes(p))} state" for p in row.params)
        lines.append(f"          steps: {pairs}")
        if isinstance(b, backends._Missing):
            lines.append(f"          {b.reason}")
            continue
        if b.describe():
            lines.append(f"          {b.describe()}")
        for d in devices():
            reason = backends.why_not(name, d, torch.float32)
            if reason:
                lines.append(f"          not on {d}: {reason}")
    lines += ["", "backend 'auto' picks:"]
    for d in devices():
        lines.append(f"  {device_name(d)}")
        for dtype in DTYPES:
            try:
                chosen, note = backends.resolve("auto", d, dtype)
                why = note or f"fastest of {', '.join(backends.candidates(d))} that can run"
                lines.append(f"    {str(dtype):15s} -> {chosen.name}: {why}")
            except backends.BackendUnavailableError as e:
                lines.append(f"    {str(dtype):15s} -> none: {e}")
    default = backends.default_name()
    lines += ["", f"default backend (ESGDM_BACKEND or auto): {default}"]
    lines += ["", "bytes moved per element by the fused step (plain / D-step):"]
    from esgdm.buckets import bytes_moved

    for p_dtype, s_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)):
        pb, sb = p_dtype.itemsize, s_dtype.itemsize
        lines.append(f"  {str(p_dtype)[6:]:9s} parameters, {str(s_dtype)[6:]:8s} state: "
                     f"{bytes_moved(1, False, pb, sb):2d} / {bytes_moved(1, True, pb, sb):2d} B, "
                     f"state {2 * sb} B per element")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
