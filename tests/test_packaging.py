"""Packaging: one version, PEP 621 metadata, an sdist that holds what the build needs
and installs, and editable installs that work from the folder holding the clone.

The install tests make a venv without pip that sees this environment's packages
(torch, setuptools, pip) through a .pth file, and skip the compiled extension
(ESGDM_BUILD_EXTENSION=0); CI (.ci/run) also installs the sdist, extension and all,
into a venv of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import esgdm

ROOT = Path(__file__).resolve().parent.parent

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None


def _pyproject() -> dict:
    if tomllib is None:
        pytest.skip("needs tomllib (Python 3.11+)")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version():
    from esgdm import _version

    assert esgdm.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev|\.post)?\d*", esgdm.__version__)
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "esgdm._version.__version__"}
    literal = re.compile(r"""(?<![\w-])version\s*=\s*["']\d""")  # not python_version, target-version
    for name in ("setup.py", "pyproject.toml", "esgdm/__init__.py"):
        assert not literal.search((ROOT / name).read_text()), f"{name} writes a version of its own"
    try:
        assert metadata.version("esgdm") == esgdm.__version__
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        pass


def test_pep621_metadata_and_extras():
    project = _pyproject()["project"]
    assert project["name"] == "esgdm" and project["readme"] == "README.md"
    assert any(d.startswith("torch") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert {"transformers", "lightning", "test", "bench", "demo"} <= set(extras)
    names = {re.split(r"[<>=\[ ]", d)[0] for d in extras["test"]}
    # CI installs [test] and runs every test: the optional integrations included
    assert {"pytest", "hypothesis", "transformers", "accelerate", "lightning", "pytest-benchmark", "ruff",
            "mypy"} <= names
    packages = _pyproject()["tool"]["setuptools"]["packages"]
    on_disk = {".".join(p.relative_to(ROOT).parts[:-1]) for p in (ROOT / "esgdm").rglob("__init__.py")}
    assert on_disk <= set(packages), f"packages missing from pyproject.toml: {on_disk - set(packages)}"
    assert (ROOT / "esgdm" / "py.typed").exists()


def test_no_top_level_folder_is_an_importable_package():
    """Python and pytest put the repository root first on sys.path.  A folder there
    with an __init__.py would shadow any installed package of the same name (our
    kernels/ once hid Hugging Face's `kernels`, which transformers imports); folders
    without one are namespace portions, which never win over an installed package."""
    shadowing = sorted(d.name for d in ROOT.iterdir()
                       if d.is_dir() and d.name != "esgdm" and (d / "__init__.py").exists())
    assert not shadowing, f"top-level folders that shadow installed packages: {shadowing}"


SHADOW = textwrap.dedent("""
    import json, sys, types
    # a stand-in for an installed package called `kernels`, just after the root
    site = sys.argv[1]
    sys.path.insert(1, site)
    import kernels
    import esgdm, esgdm.kernels.esgdm_step
    print(json.dumps(dict(kernels=kernels.__file__, ours=esgdm.kernels.esgdm_step.__file__)))
""")


def test_an_installed_kernels_package_wins_over_the_kernels_folder(tmp_path):
    """Run from the repository root (as `python -m pytest` is): `import kernels` finds
    the installed package, and esgdm still finds its own Triton kernels."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = object\n")
    done = subprocess.run([sys.executable, "-c", SHADOW, str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(got["kernels"]) == fake / "__init__.py"
    assert Path(got["ours"]) == ROOT / "kernels" / "esgdm_step.py"


def test_transformers_imports_from_the_repository_root():
    """The failure users hit: transformers imports the PyPI package `kernels`."""
    pytest.importorskip("transformers")
    code = "import kernels, transformers; from transformers import Trainer; print(kernels.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not Path(done.stdout.strip().splitlines()[-1]).is_relative_to(ROOT / "kernels")


def _build_sdist(out: Path) -> Path:
    env = dict(os.environ, ESGDM_BUILD_EXTENSION="0")
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    return _build_sdist(tmp_path_factory.mktemp("sdist"))


def test_sdist_holds_what_the_build_needs(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "csrc/setup_ext.py",
              "esgdm/__init__.py", "esgdm/_version.py", "esgdm/py.typed", "esgdm/integrations/__init__.py",
              "esgdm/integrations/transformers.py", "esgdm/integrations/lightning.py",
              "kernels/esgdm_step.py", "kernels/esgdm_elements.py", "tests/conftest.py"}
    assert needed <= names, needed - names
    tracked = subprocess.run(["git", "ls-files", "csrc", "kernels", "esgdm"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    present = {f for f in tracked if (ROOT / f).exists()}
    assert present <= names, f"tracked sources missing from the sdist: {present - names}"
    assert any(n.startswith("csrc/") and n.endswith(".cpp") for n in names)
    assert not [n for n in names if n.endswith((".so", ".pyc", ".o"))]


def _bare_venv(path: Path) -> Path:
    """A venv without pip that sees this environment's site-packages (torch, pip,
    setuptools) through a .pth file, after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _pip(python: Path, *args: str, cwd: Path) -> None:
    env = dict(os.environ, ESGDM_BUILD_EXTENSION="0", PIP_NO_INDEX="1")
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


ONE_STEP = textwrap.dedent("""
    import json, esgdm, esgdm.kernels, esgdm.integrations, torch
    p = torch.nn.Parameter(torch.ones(3))
    opt = esgdm.ESGDM([p], lr=0.5, backend="torch")
    (p ** 4).sum().backward(create_graph=opt.should_create_graph())
    opt.step()
    print(json.dumps(dict(version=getattr(esgdm, "__version__", None), file=esgdm.__file__,
                          kernels=list(esgdm.kernels.__path__)[0], moved=bool((p != 1).all()))))
""")


def _run_from(python: Path, cwd: Path) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", ONE_STEP], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _copy_source_tree(dest: Path) -> None:
    """The files a clone would have (tracked or new, not ignored), as they are now."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True)
    if listed.returncode != 0:  # not a git checkout: the tree without build products
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache"))
        return
    for f in listed.stdout.splitlines():
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


@pytest.mark.slow
def test_editable_install_imports_from_the_folder_holding_the_clone(tmp_path):
    """A clone named esgdm, installed with `pip install -e`, and Python started in its
    parent folder: the clone folder must not shadow the package as an empty namespace."""
    clone = tmp_path / "work" / "esgdm"
    clone.mkdir(parents=True)
    _copy_source_tree(clone)
    python = _bare_venv(tmp_path / "venv")
    _pip(python, "-e", ".", cwd=clone)
    got = _run_from(python, clone.parent)
    assert got["version"] == esgdm.__version__
    assert Path(got["file"]) == clone / "esgdm" / "__init__.py"
    assert Path(got["kernels"]) == clone / "kernels"
    assert got["moved"]


@pytest.mark.slow
def test_sdist_installs_and_runs_a_step(sdist, tmp_path):
    python = _bare_venv(tmp_path / "venv")
    _pip(python, str(sdist), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = _run_from(python, elsewhere)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert got["version"] == esgdm.__version__ and got["moved"]
    assert Path(got["file"]).parent == site / "esgdm"
    assert Path(got["kernels"]) == site / "esgdm" / "kernels"
    assert (site / "esgdm" / "py.typed").exists()


# ------------------------------------------------- esgdm.integrations (no framework)

QUIET = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("always")
    import torch, esgdm
    from esgdm.integrations import backward, unwrap_optimizer
    p = torch.nn.Parameter(torch.ones(3))
    opt = esgdm.ESGDM([p], lr=0.5, backend="torch")
    assert unwrap_optimizer(opt) is opt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if sys.argv[1] == "helper":
            kept = backward((p ** 4).sum(), opt)
        else:
            kept = True
            (p ** 4).sum().backward(create_graph=True)
    opt.step()
    print(kept, sum("reference cycle" in str(w.message) for w in caught))
""")


def test_backward_helper_silences_the_reference_cycle_warning_for_its_own_call():
    """torch warns once per process, so each case runs in a fresh one (both at once):
    the helper's create_graph backward is quiet; importing esgdm leaves the warning on
    for everyone else's."""
    procs = {how: subprocess.Popen([sys.executable, "-c", QUIET, how], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for how in ("helper", "plain")}
    out = {}
    for how, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[how] = stdout.split()
    assert out == {"helper": ["True", "0"], "plain": ["True", "1"]}


def test_backward_helper_follows_the_schedule():
    from esgdm.integrations import backward

    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.ones(3))
    opt = esgdm.ESGDM([p], lr=0.5, d_warmup=1, update_d_every=3, backend="torch")
    kept = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        kept.append(backward((p ** 4).sum(), opt))
        assert (p.grad.grad_fn is not None) == kept[-1]
        opt.step()
    assert kept == [True, False, False, True, False]
    with pytest.raises(TypeError, match="esgdm.ESGDM"):
        backward((p ** 4).sum(), torch.optim.SGD([p], lr=0.1))
