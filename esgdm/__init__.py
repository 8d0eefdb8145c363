"""esgdm: the ESGD-M optimizer for PyTorch, with fused multi-tensor kernels.

>>> import esgdm
>>> opt = esgdm.ESGDM(model.parameters(), lr=0.5)
>>> loss.backward(create_graph=opt.should_create_graph())
>>> opt.step()
"""

import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys

from esgdm._version import __version__
from esgdm.backends import BackendUnavailableError
from esgdm.optimizer import ESGD, ESGDM


def _source_tree_kernels() -> None:
    """Makes ``esgdm.kernels`` importable from a source checkout.

    The Triton sources live in the repository's top-level ``kernels/`` folder, which
    wheels install as ``esgdm/kernels/``.  That folder has no ``__init__.py`` on
    purpose: Python run from the repository root then sees it as a namespace portion,
    which never wins over an installed package called ``kernels`` (Hugging Face's
    kernel hub, which transformers imports).  In a checkout (an editable install, or
    Python started at the root) no ``esgdm/kernels/`` exists, so the namespace package
    ``esgdm.kernels`` is declared here, pointing at that folder.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    source = _os.path.join(_os.path.dirname(here), "kernels")
    if "esgdm.kernels" in _sys.modules or _os.path.isdir(_os.path.join(here, "kernels")):
        return  # installed from a wheel: found by the ordinary path search
    if not _os.path.isfile(_os.path.join(source, "esgdm_step.py")):
        return
    spec = _machinery.ModuleSpec("esgdm.kernels", None, is_package=True)
    spec.submodule_search_locations = [source]
    module = _util.module_from_spec(spec)
    _sys.modules["esgdm.kernels"] = module
    globals()["kernels"] = module


_source_tree_kernels()

__all__ = ["ESGD", "ESGDM", "BackendUnavailableError", "__version__"]
