"""Build and install esgdm.

The Python package ``esgdm`` is installed together with ``esgdm.kernels`` (the Triton
sources under ``kernels/``).
"""

from setuptools import setup

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
)
