"""Triton kernels of esgdm (installed as the ``esgdm.kernels`` package)."""
