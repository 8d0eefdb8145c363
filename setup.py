"""Build esgdm: the compiled extension and the editable-install fix.

The package metadata is in pyproject.toml (PEP 621; the version is read from
esgdm/_version.py).  This file adds what pyproject.toml cannot say:

* the compiled extension ``esgdm._C`` (the "cpu" and "cuda" backends, sources under
  ``csrc/``), configured by ``csrc/setup_ext.py``; see its docstring for the
  environment switches (ESGDM_BUILD_EXTENSION, ESGDM_BUILD_CUDA, TORCH_CUDA_ARCH_LIST);
* editable installs (``pip install -e .``) that put the repository root on
  ``sys.path`` (see :class:`EditableWheel`).
"""

import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """(ext_modules, cmdclass) from csrc/setup_ext.py."""
    path = os.path.join(ROOT, "csrc", "setup_ext.py")
    spec = importlib.util.spec_from_file_location("esgdm_setup_ext", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.extensions()


def _editable_wheel():
    """An ``editable_wheel`` command whose wheel also adds the repository root to
    ``sys.path``.

    setuptools makes a flat-layout project (``esgdm/`` next to ``setup.py``) editable
    through an import hook that runs after the ordinary path search.  Python run from
    the folder that holds a clone named ``esgdm`` then finds that folder first and
    imports it as an empty namespace package (``esgdm.__version__`` missing).  With the
    repository root on ``sys.path`` the path search itself finds the real package,
    which wins over a namespace folder wherever it sits on the path; the hook still
    maps ``esgdm.kernels`` to ``kernels/``.

    The hook into setuptools (``_select_strategy``) is not public: if a future
    setuptools lacks it, the install is setuptools' own, without this fix.
    """
    try:
        from setuptools.command.editable_wheel import editable_wheel
    except ImportError:  # pragma: no cover - setuptools < 64
        return None
    if not hasattr(editable_wheel, "_select_strategy"):  # pragma: no cover
        return None

    class _WithRootOnPath:
        def __init__(self, strategy, pth_name):
            self.strategy, self.pth_name = strategy, pth_name

        def __enter__(self):
            self.strategy.__enter__()
            return self

        def __exit__(self, *exc):
            return self.strategy.__exit__(*exc)

        def __call__(self, wheel, files, mapping):
            self.strategy(wheel, files, mapping)
            wheel.writestr(self.pth_name, ROOT + "\n")

    class EditableWheel(editable_wheel):
        def _select_strategy(self, name, tag, build_lib):
            strategy = super()._select_strategy(name, tag, build_lib)
            return _WithRootOnPath(strategy, f"__editable__.{name}-root.pth")

    return EditableWheel


ext_modules, cmdclass = _extensions()
editable = _editable_wheel()
if editable is not None:
    cmdclass = {**cmdclass, "editable_wheel": editable}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
