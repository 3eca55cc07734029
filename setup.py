"""Build megatron-ext: Python package plus ahead-of-time compiled C++ extensions.

Nothing is compiled at import time. Every extension listed here is built by
`pip install --no-build-isolation -e .` (build isolation would pull an unpinned
torch; see README). A missing extension falls back to a pure-Python reference
at run time with one warning.
"""

import os

from setuptools import find_packages, setup

try:  # torch's build_ext drives ninja (parallel compile) and knows CUDA/HIP sources.
    from torch.utils.cpp_extension import BuildExtension as build_ext
except ImportError:  # pragma: no cover - torch is a hard dependency, but keep the data tools buildable
    from setuptools.command.build_ext import build_ext

from pybind11.setup_helpers import Pybind11Extension

CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden"]


def data_extensions() -> list:
    """pybind11 modules without a torch dependency (indexed datasets, index helpers)."""
    return [
        Pybind11Extension(
            "megatron_ext._data_cpp",
            ["csrc/data/indexed_dataset.cpp"],
            extra_compile_args=CXX_FLAGS,
        ),
    ]


def torch_extensions() -> list:
    """Fused ops built against torch (CPU always; CUDA/HIP when the toolkit is present)."""
    return []


def ext_modules() -> list:
    mods = data_extensions()
    if os.environ.get("MEGATRON_EXT_SKIP_TORCH_EXT") != "1":
        mods += torch_extensions()
    return mods


setup(
    name="megatron-ext",
    version="0.1.0",
    description="Megatron-style LLM training stack for Slurm clusters (LUMI, NVIDIA)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ext", "megatron_ext.*"]),
    package_data={"megatron_ext": ["assets/*"]},
    ext_modules=ext_modules(),
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19,<0.20",
        "numpy>=1.24",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
        "pybind11>=2.12",
        "PyYAML>=6.0",
        "tqdm>=4.66",
        "psutil>=5.9",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "megatron-core==0.16.1",
            "transformers>=4.44",
            "mpi4py>=3.1",
            "zstandard>=0.22",
        ],
        "mpi": ["mpi4py>=3.1"],
        "zstd": ["zstandard>=0.22"],
    },
    entry_points={"console_scripts": ["megatron-ext=megatron_ext.cli:main"]},
)
