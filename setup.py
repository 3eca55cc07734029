"""Build megatron-ext: Python package plus ahead-of-time compiled C++ extensions.

Nothing is compiled at import time. Every extension listed here is built by
`pip install --no-build-isolation -e .` (build isolation would pull an unpinned
torch; see README). A missing extension falls back to a pure-Python reference
at run time with one warning.
"""

import os
import sys

from setuptools import find_packages, setup

try:  # torch's build_ext drives ninja (parallel compile) and knows CUDA/HIP sources.
    from torch.utils.cpp_extension import BuildExtension as build_ext
except ImportError:  # pragma: no cover - keep the data tools buildable without torch
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
        Pybind11Extension(
            "megatron_ext._index_cpp",
            ["csrc/data/index_helpers.cpp"],
            extra_compile_args=CXX_FLAGS,
        ),
    ]


def torch_extensions() -> list:
    """Fused ops built against torch (CPU always; CUDA/HIP when the toolkit is present).

    `_ops_cpu` is compiled for the baseline x86-64 plus AVX2 and AVX-512 clones picked at load
    time (no -march flags). `_ops_cuda` is built when torch is a CUDA build and CUDA_HOME is
    found, or a ROCm build (BuildExtension hipifies the sources); its architectures come from
    TORCH_CUDA_ARCH_LIST / PYTORCH_ROCM_ARCH as usual.
    """
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return []
    # No -std: torch adds the standard its headers need (C++20 for torch 2.13).
    # -fno-trapping-math lets GCC turn the kernels' selects into vector blends (csrc/ops/cpu_math.h).
    base_flags = ["-O3", "-fvisibility=hidden"]
    ops_flags = base_flags + ["-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno"]
    # at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread. The libgomp it
    # links resolves to the copy torch has already loaded (same soname), so one thread pool.
    omp = [] if sys.platform == "darwin" else ["-fopenmp"]
    mods = [
        cpp_extension.CppExtension(
            "megatron_ext._ops_cpu",
            ["csrc/ops/ops_cpu.cpp", "csrc/ops/cpu_kernels.cpp"],
            extra_compile_args=ops_flags + omp,
            extra_link_args=omp,
        )
    ]
    gpu = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None) or (
        torch.version.hip is not None and cpp_extension.ROCM_HOME is not None
    )
    if gpu and os.environ.get("MEGATRON_EXT_SKIP_GPU_EXT") != "1":
        mods.append(
            cpp_extension.CUDAExtension(
                "megatron_ext._ops_cuda",
                ["csrc/ops/ops_cuda.cpp", "csrc/ops/launch.cu"],
                extra_compile_args={"cxx": base_flags, "nvcc": ["-O3"]},
            )
        )
    return mods


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
    package_data={"megatron_ext": ["assets/*", "assets/tasks/*/*"]},
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
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        # `megatron-ext eval` and the quickstart: lm-evaluation-harness on converted models
        "transformers>=4.44",
        "lm-eval[hf]>=0.4.13,<0.5",
        # `megatron-ext curate`: mojibake repair, MinHash/LSH, language identification (its
        # model ships in the package: nothing is downloaded)
        "ftfy>=6.2",
        "rensa>=0.5,<0.6",
        "py3langid>=0.3",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "ruff==0.17.6",  # lint + format, run by the test command before pytest
            "megatron-core==0.16.1",
            "transformers>=4.44",
            "mpi4py>=3.1",
            "zstandard>=0.22",
            "wandb>=0.31",
        ],
        "mpi": ["mpi4py>=3.1"],
        "wandb": ["wandb>=0.31"],  # logging.wandb (W&B beside TensorBoard)
        "zstd": ["zstandard>=0.22"],
    },
    entry_points={"console_scripts": ["megatron-ext=megatron_ext.cli:main"]},
)
