"""Build and install esgdm.

The Python package ``esgdm`` is installed together with ``esgdm.kernels`` (the Triton
sources under ``kernels/``).  The compiled extension ``esgdm._C`` (the "cpu" and "cuda"
backends, sources under ``csrc/``) is configured by ``csrc/setup_ext.py``; see its
docstring for the environment switches (ESGDM_BUILD_EXTENSION, ESGDM_BUILD_CUDA,
TORCH_CUDA_ARCH_LIST).
"""

import importlib.util
import os

from setuptools import setup


def _extensions():
    """(ext_modules, cmdclass) from csrc/setup_ext.py."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "setup_ext.py")
    spec = importlib.util.spec_from_file_location("esgdm_setup_ext", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.extensions()


ext_modules, cmdclass = _extensions()

setup(
    name="esgdm",
    version="0.1.0",
    description="ESGD-M, a second-order optimizer for PyTorch, with fused multi-tensor kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["esgdm", "esgdm.backends", "esgdm.kernels"],
    package_dir={"esgdm.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "demo": ["scikit-learn", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "tqdm", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib", "scikit-learn", "tqdm"],
    },
    license="MIT",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
