"""How setup.py builds the compiled extension ``esgdm._C`` (the "cpu" and "cuda" backends).

Imported by ``setup.py``; returns the extension list and ``cmdclass`` to pass to
``setup()``.  Nothing here needs a GPU.

* The C++ part (the CPU kernel and the Python module ``esgdm._C``, whose ``step``
  function the ``esgdm::step_`` operator of esgdm/ops.py calls) is built whenever torch
  is importable at build time (install with ``pip install --no-build-isolation``).
* The CUDA kernel is added when torch is a CUDA build and ``nvcc`` is found (under
  ``CUDA_HOME`` or on ``PATH``), for the architectures in ``TORCH_CUDA_ARCH_LIST``
  (default :data:`DEFAULT_ARCH_LIST`: real architectures, since the build machine may
  have no GPU, plus PTX of the newest for GPUs that came later).

Environment switches:

``ESGDM_BUILD_EXTENSION=0``  build no extension (the "torch"/"triton" backends remain).
``ESGDM_BUILD_CUDA=0``       build the C++ part only; ``=1`` fails the build if the
                             CUDA kernel cannot be built; unset: build it if possible.
``ESGDM_VEC_REPORT=1``       print gcc's vectorisation report (-fopt-info-vec).
``TORCH_CUDA_ARCH_LIST``     e.g. ``"8.0;9.0+PTX"`` (``+PTX`` also embeds PTX).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

#: Architectures built when TORCH_CUDA_ARCH_LIST is not set: Turing (T4), Ampere
#: (A100; runs on the 8.6/8.9 consumer parts too), Hopper (H100/H200), and PTX of 9.0
#: that the driver compiles for anything newer (Blackwell).  nvcc 13 has no sm < 75.
DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"

SOURCES_CPP = ["esgdm_module.cpp", "esgdm_cpu.cpp", "esgdm_frontend.cpp", "esgdm_plan.cpp"]
SOURCES_CUDA = ["esgdm_cuda.cu", "esgdm_cuda_host.cpp"]
HEADERS = ["esgdm_update.h", "esgdm_common.h", "esgdm_cuda.h", "esgdm_python.h"]


def _say(msg: str) -> None:
    print(f"esgdm setup: {msg}", file=sys.stderr)


def _switch(name: str) -> str | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "false", "no", "off"):
        return "0"
    if value in ("1", "true", "yes", "on"):
        return "1"
    raise SystemExit(f"esgdm setup: {name} must be 0 or 1, got {os.environ[name]!r}")


def _nvcc(cuda_home: str | None) -> str | None:
    if cuda_home:
        path = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.exists(path):
            return path
    return shutil.which("nvcc")


def _why_no_cuda(torch, cuda_home) -> str | None:
    """None if the CUDA kernel can be built here, else the reason."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if _nvcc(cuda_home) is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def arch_flags() -> tuple[list[str], list[str]]:
    """(nvcc -gencode flags, names such as 'sm_80' / 'compute_90') for the arch list."""
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags

        flags = _get_cuda_arch_flags()
    except ImportError:  # torch without the private helper: parse "X.Y[+PTX]" ourselves
        flags = []
        for item in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"].strip()):
            if not item:
                continue
            ptx = item.endswith("+PTX")
            num = item.replace("+PTX", "").replace(".", "")
            flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
            if ptx:
                flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    names = []
    for f in flags:
        m = re.search(r",code=\[?([\w,]+)\]?", f)
        if m:
            names += [n for n in m.group(1).split(",") if n not in names]
    # cubins first, then PTX, each by architecture number
    names.sort(key=lambda n: (n.startswith("compute"), int(re.sub(r"\D", "", n) or 0), n))
    if not names:
        raise SystemExit(f"esgdm setup: no CUDA architecture in TORCH_CUDA_ARCH_LIST="
                         f"{os.environ['TORCH_CUDA_ARCH_LIST']!r}")
    return flags, names


def _nvcc_folders(cuda_home: str | None, variable: str) -> list[str]:
    """The folders nvcc's own dry run names in ``variable`` (INCLUDES, LIBRARIES)."""
    nvcc = _nvcc(cuda_home)
    if not nvcc:
        return []
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    folders = []
    for line in (out.stdout + out.stderr).splitlines():
        if f"{variable}=" in line:
            folders += re.findall(r'-[IL]"?([^"\s]+)', line)
    return folders


def _find(candidates: list[str], filename: str) -> str | None:
    for folder in candidates:
        if os.path.exists(os.path.join(folder, filename)):
            return os.path.normpath(folder)
    return None


def _cudart_dir(cuda_home: str | None) -> str | None:
    """The folder holding libcudart.so to link against.

    torch derives CUDA_HOME from the location of nvcc, which is wrong when nvcc on
    PATH is a wrapper script (/usr/local/bin/nvcc -> /usr/local/lib64 has no CUDA);
    nvcc's own dry run names the library folders of the real toolkit.
    """
    candidates = []
    if cuda_home:
        candidates += [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]
    candidates += _nvcc_folders(cuda_home, "LIBRARIES")
    candidates.append("/usr/local/cuda/lib64")
    return _find(candidates, "libcudart.so")


def _cuda_include_dir(cuda_home: str | None) -> str | None:
    """The folder holding cuda_runtime.h, for the C++ sources that include c10/cuda
    headers (same wrapper problem as :func:`_cudart_dir`)."""
    candidates = [os.path.join(cuda_home, "include")] if cuda_home else []
    candidates += _nvcc_folders(cuda_home, "INCLUDES")
    candidates.append("/usr/local/cuda/include")
    return _find(candidates, "cuda_runtime.h")


def extensions() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for ``setup()``; empty when nothing is to be built."""
    if _switch("ESGDM_BUILD_EXTENSION") == "0":
        _say("ESGDM_BUILD_EXTENSION=0: not building esgdm._C (the 'cpu' and 'cuda' "
             "backends will be unavailable)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        _say(f"torch is not importable at build time ({e}); not building esgdm._C. "
             "Install torch first, then `pip install --no-build-isolation .`")
        return [], {}

    want_cuda = _switch("ESGDM_BUILD_CUDA")
    reason = _why_no_cuda(torch, cpp_extension.CUDA_HOME)
    if want_cuda == "0":
        reason = "ESGDM_BUILD_CUDA=0"
    elif want_cuda == "1" and reason is not None:
        raise SystemExit(f"esgdm setup: ESGDM_BUILD_CUDA=1 but the CUDA kernel cannot be "
                         f"built: {reason}")

    # -fno-math-errno and -fno-trapping-math change no result; they let gcc vectorise
    # sqrt and the float16 conversions (which it otherwise keeps as branches).
    # -ffp-contract=off (and nvcc's --fmad=false below): no multiply-add is fused unless
    # the code says so (esgdm_update.h fuses exactly where torch's kernels do), so that
    # the kernels round as the reference, esgdm.rule.reference_step, does.
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
    if _switch("ESGDM_VEC_REPORT") == "1":
        cxx.append("-fopt-info-vec-optimized")
    sources = [os.path.join("csrc", s) for s in SOURCES_CPP]
    kwargs = dict(extra_link_args=["-fopenmp"], depends=[os.path.join("csrc", h) for h in HEADERS])
    cudart = None
    if reason is None:
        cudart = _cudart_dir(cpp_extension.CUDA_HOME)
        cuda_include = _cuda_include_dir(cpp_extension.CUDA_HOME)
        if cudart is None or cuda_include is None:
            reason = ("libcudart.so" if cudart is None else "cuda_runtime.h") + \
                " was not found next to nvcc (set CUDA_HOME)"
            if want_cuda == "1":
                raise SystemExit(f"esgdm setup: ESGDM_BUILD_CUDA=1 but {reason}")
    if reason is None:
        flags, names = arch_flags()
        cxx.append("-DESGDM_WITH_CUDA")
        # nvcc splits option values at commas: join the names with "+".
        nvcc = ["-O3", "--fmad=false", f"-DESGDM_CUDA_ARCHS={'+'.join(names)}", *flags]
        _say(f"building esgdm._C with the CUDA kernel for {', '.join(names)} "
             f"(TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r})")
        ext = cpp_extension.CUDAExtension(
            "esgdm._C",
            sources + [os.path.join("csrc", s) for s in SOURCES_CUDA],
            library_dirs=[cudart],
            include_dirs=[cuda_include],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
    else:
        _say(f"building esgdm._C without the CUDA kernel: {reason}")
        ext = cpp_extension.CppExtension(
            "esgdm._C", sources, extra_compile_args={"cxx": cxx}, **kwargs
        )
    build = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build}
