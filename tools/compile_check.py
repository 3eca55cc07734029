"""Compile the GPU kernels without a GPU or a GPU build of torch (CI, compile only).

    python tools/compile_check.py                 # nvcc sm_80 and sm_90, hipcc gfx90a
    python tools/compile_check.py --only nvcc     # or --only hipcc

nvcc builds csrc/ops/launch.cu (torch-free kernels + C launchers) for each CUDA arch; for HIP the
sources are hipified with torch.utils.hipify (as torch's BuildExtension does for ROCm) and built
with `HIP_PLATFORM=amd hipcc --offload-arch=gfx90a -c`. Warnings are errors. Exit status 0 when
every compiler that ran succeeded, 1 when one failed, 2 when a requested compiler is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("kernels.cuh", "launch.cu", "launch.h")
CUDA_ARCHS = ("sm_80", "sm_90")
HIP_ARCHS = ("gfx90a",)


def torch_flags(kind: str) -> list[str]:
    """The defines torch's BuildExtension adds (no implicit half conversions, ...), so the check
    compiles what the real build compiles; empty without torch."""
    try:
        from torch.utils import cpp_extension as ext
    except ImportError:
        return []
    if kind == "nvcc":
        return list(ext.COMMON_NVCC_FLAGS)
    return list(ext.COMMON_HIP_FLAGS) + list(ext.COMMON_HIPCC_FLAGS)


def _run(cmd: list[str], env: dict | None = None) -> tuple[bool, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout + proc.stderr


def compile_nvcc(arch: str, workdir: Path) -> tuple[bool, str]:
    """nvcc -c launch.cu for one sm_XY architecture."""
    num = arch.removeprefix("sm_")
    cmd = ["nvcc", "-std=c++17", "-O3", "-Werror", "all-warnings", *torch_flags("nvcc"),
           f"-gencode=arch=compute_{num},code=sm_{num}",
           "-c", str(ROOT / "csrc/ops/launch.cu"), "-o", str(workdir / f"launch_{arch}.o")]  # fmt: skip
    return _run(cmd)


def hipify_sources(workdir: Path) -> Path:
    """Copy the kernel sources into workdir, hipify them there; returns the .hip file."""
    from torch.utils.hipify import hipify_python

    src = workdir / "hip_src"
    src.mkdir()
    for name in SOURCES:
        shutil.copy(ROOT / "csrc/ops" / name, src / name)
    with contextlib.redirect_stderr(io.StringIO()):  # hipify prints a banner
        result = hipify_python.hipify(
            project_directory=str(src),
            output_directory=str(src),
            includes=[str(src / "*")],
            extra_files=[str(src / "launch.cu")],
            is_pytorch_extension=True,
            hipify_extra_files_only=True,
            show_detailed=False,
            show_progress=False,
        )
    return Path(result[str(src / "launch.cu")].hipified_path)


def compile_hipcc(arch: str, workdir: Path) -> tuple[bool, str]:
    """hipify, then hipcc --offload-arch=<arch> -c."""
    hip_file = hipify_sources(workdir)
    env = dict(os.environ, HIP_PLATFORM="amd")
    cmd = ["hipcc", f"--offload-arch={arch}", "-std=c++17", "-O3", "-Wall", "-Werror", *torch_flags("hipcc"),
           "-c", str(hip_file), "-o", str(workdir / f"launch_{arch}.o")]  # fmt: skip
    return _run(cmd, env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("nvcc", "hipcc"), help="run one compiler")
    args = parser.parse_args(argv)
    jobs = [("nvcc", a, compile_nvcc) for a in CUDA_ARCHS]
    jobs += [("hipcc", a, compile_hipcc) for a in HIP_ARCHS]
    failed = missing = False
    for compiler, arch, fn in jobs:
        if args.only and compiler != args.only:
            continue
        if shutil.which(compiler) is None:
            print(f"MISSING {compiler}: not on PATH (CI installs it: tools/install.sh --test)")
            missing = True
            continue
        with tempfile.TemporaryDirectory(prefix="mx_compile_") as tmp:
            ok, log = fn(arch, Path(tmp))
        print(f"{'OK' if ok else 'FAILED'} {compiler} {arch}")
        if not ok:
            print(log)
            failed = True
    return 1 if failed else (2 if missing else 0)


if __name__ == "__main__":
    sys.exit(main())
