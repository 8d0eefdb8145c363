"""Small helpers shared by the benchmark scripts: machine description, sizes, tables,
timing clocks and peak-memory probes."""

from __future__ import annotations

import ctypes
import math
import os
import platform
import re
import time
from collections.abc import Sequence
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def parse_dtypes(text: str) -> list[torch.dtype]:
    out = []
    for name in filter(None, (s.strip() for s in text.split(","))):
        if name not in DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
        out.append(DTYPES[name])
    return out


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864, ``"1B"``/``"1G"`` -> 2**30, ``"4096"`` -> 4096, ``"64K"`` -> 65536."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KkMmGgBb]?)\s*", text)
    if not m:
        raise SystemExit(f"cannot read size {text!r}; write e.g. 64K, 16M or 1B")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "b": 2**30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def fmt_size(n: int) -> str:
    for unit, scale in (("B", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= 0.95 * scale:
            v = n / scale
            return f"{v:.0f}{unit}" if abs(v - round(v)) < 0.05 else f"{v:.1f}{unit}"
    return str(n)


def pick_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return device


def machine(device: torch.device) -> str:
    """One line naming the hardware the figures come from."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                f"torch {torch.__version__}")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
        if names:
            cpu = names[0].strip()
    except OSError:
        pass
    return (f"{os.cpu_count()}-core {platform.machine()} ({cpu}), {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Times a callable: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def ms(self, fn: Callable[[], object], n: int = 1) -> float:
        """Milliseconds per call of ``fn`` over ``n`` back-to-back calls."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1e3 / n


def free_bytes(device: torch.device) -> int:
    """Memory that new tensors can take on ``device`` (now)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemAvailable:\s+(\d+) kB", f.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _trim_heap() -> None:
    """Hands freed heap pages back to the OS so the next RSS reading starts low."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(field + r":\s+(\d+) kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory growth over a block of code.

    On CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at the
    start.  On the CPU: the kernel's resident-set high-water mark (``VmHWM``, reset
    through ``/proc/self/clear_refs``) above the resident set at the start, after
    returning freed heap pages to the OS.  ``mib`` is ``None`` where neither works.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: float | None = None
        self.how = "cuda max_memory_allocated" if device.type == "cuda" else "RSS high-water (VmHWM)"

    def __enter__(self):
        import gc
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _trim_heap()
        self._base = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            peak = _status_kb("VmHWM")
            if peak is not None:
                self.mib = (peak - self._base) / 1024
        return False


def save_png(fig, path: str, dpi: int = 80) -> None:
    """Saves a matplotlib figure as a small PNG (palette of 64 colours when Pillow is there)."""
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    try:
        from PIL import Image
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        img.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    except Exception:  # noqa: BLE001 - plain PNG without Pillow
        with open(path, "wb") as f:
            f.write(buf.getvalue())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one of 'l'/'r' per column (numbers right)."""
    def cell(v):
        return "" if v is None else str(v)
    if align is None:
        align = "".join("r" if all(_numberish(r[i]) for r in rows if cell(r[i])) and rows else "l"
                        for i in range(len(headers)))
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _numberish(v) -> bool:
    if isinstance(v, (int, float)):
        return True
    return bool(re.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?\s*(%|x|±.*)?", str(v).strip()))


def fmt(v: float | None, digits: int = 3) -> str:
    """Compact number: 3 significant digits, no scientific notation for usual ranges."""
    if v is None:
        return ""
    if v != v:
        return "nan"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1e-3:
        return f"{v:.{max(0, digits - 1 - math.floor(math.log10(a)))}f}"
    return f"{v:.2e}"


__all__ = [
    "Clock", "DTYPES", "PeakMemory", "dtype_name", "fmt", "fmt_size", "free_bytes", "machine",
    "markdown_table", "parse_dtypes", "parse_size", "pick_device", "save_png", "sync",
]
