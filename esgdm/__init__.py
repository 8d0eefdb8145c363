"""esgdm: the ESGD-M optimizer for PyTorch, with fused multi-tensor kernels.

>>> import esgdm
>>> opt = esgdm.ESGDM(model.parameters(), lr=0.5)
>>> loss.backward(create_graph=opt.should_create_graph())
>>> opt.step()
"""

from esgdm._version import __version__
from esgdm.backends import BackendUnavailableError
from esgdm.optimizer import ESGD, ESGDM

__all__ = ["ESGD", "ESGDM", "BackendUnavailableError", "__version__"]
