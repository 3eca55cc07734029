"""S0 environment, S1 build of the compiled extensions, S2 the `gpu` test tier.

S1 builds for sm_90 only (`TORCH_CUDA_ARCH_LIST=9.0`): setup.py compiles megatron_ext._ops_cpu,
_data_cpp, _index_cpp and, with a CUDA torch, _ops_cuda. A failed build keeps the end of the
compiler's output and the section goes on: the reference ops still run. The fused-ops status is
read in a fresh interpreter, so it sees what the build just wrote.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

from megatron_ext.verify.common import SectionContext, child_env, python_json, run_logged

SMI_FIELDS = (
    "name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
    "power.limit", "power.max_limit", "power.draw", "memory.total", "temperature.gpu",
    "persistence_mode", "compute_mode",
)  # fmt: skip
SMI_BASIC = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "power.limit")
PACKAGES = ("torch", "deepspeed", "triton", "numpy", "pybind11", "ninja", "setuptools")
COMPILED = ("_ops_cpu", "_ops_cuda", "_data_cpp", "_index_cpp")
FAILURES_KEPT = 30


# -- S0 --------------------------------------------------------------------------------------


def section_environment(ctx: SectionContext) -> dict:
    """GPU (nvidia-smi, torch's view), library versions, Python, host."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": _cpu_count(),
        "versions": _versions(),
        "torch_cuda": _torch_cuda(),
        "nvidia_smi": nvidia_smi(),
    }


def _cpu_count() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _torch_cuda() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip,
            "available": torch.cuda.is_available(), "nccl": None}  # fmt: skip
    try:
        version = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except (AttributeError, RuntimeError, TypeError):
        pass  # a CPU build of torch has no NCCL
    if info["available"]:
        props = torch.cuda.get_device_properties(0)
        info |= {"device": props.name, "capability": f"{props.major}.{props.minor}",
                 "memory_gib": round(props.total_memory / 2**30, 1),
                 "sm_count": props.multi_processor_count,
                 "device_count": torch.cuda.device_count()}  # fmt: skip
    return info


def nvidia_smi() -> dict:
    """One GPU's nvidia-smi query fields, or {"error": why} (no nvidia-smi: a CPU machine).
    A driver that refuses one of the fields is asked again for the basic ones."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    first = _smi_query(exe, SMI_FIELDS)
    return first if "error" not in first else _smi_query(exe, SMI_BASIC) | {"full_query": first}


def _smi_query(exe: str, fields: tuple[str, ...]) -> dict:
    cmd = [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=8)
    except subprocess.TimeoutExpired:
        return {"error": "nvidia-smi timed out"}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[-500:]}
    values = [v.strip() for v in proc.stdout.splitlines()[0].split(",")]
    return dict(zip(fields, values, strict=False))


# -- S1 --------------------------------------------------------------------------------------


def build_status() -> dict:
    """Which compiled modules import, and the fused ops' backends (run in a fresh process)."""
    import importlib

    from megatron_ext.ops._backend import build_errors, fused_ops_status

    modules = {}
    for name in COMPILED:
        try:
            importlib.import_module(f"megatron_ext.{name}")
            modules[name] = "ok"
        except ImportError as exc:
            modules[name] = str(exc)[:300]
    return {"modules": modules, "fused_ops_status": fused_ops_status(),
            "build_errors": build_errors()}  # fmt: skip


STATUS_CODE = (
    "import json; from megatron_ext.verify.environment import build_status; "
    "print(json.dumps(build_status()))"
)


def section_build(ctx: SectionContext) -> dict:
    """Build the extensions for sm_90 (not in the dry run), then the fused-ops status."""
    figures: dict = {"built": False}
    if ctx.dry_run:
        figures["build"] = "skipped (dry run: the modules already here are checked)"
    else:
        figures |= build_extensions(ctx)
    figures |= python_json(ctx, STATUS_CODE, "status")
    if not ctx.dry_run and not figures["built"]:
        figures["status"] = "failed"  # recorded; the later sections run on the reference ops
    return figures


def build_extensions(ctx: SectionContext) -> dict:
    """`pip install -e .` for sm_90; if that fails, `setup.py build_ext --inplace` (the same
    compile without pip's editable install), while time is left."""
    env = child_env(ctx, TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="16")
    pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    done = run_logged(ctx, pip, "pip-install", env=env, margin_s=20.0)
    figures = {"built": done.ok, "build_seconds": round(done.seconds, 1),
               "build_returncode": done.returncode}  # fmt: skip
    if done.ok:
        return figures
    figures["build_output_tail"] = done.log_tail()
    if ctx.remaining() < 40:
        return figures
    inplace = [sys.executable, "setup.py", "build_ext", "--inplace"]
    again = run_logged(ctx, inplace, "build-ext-inplace", env=env, margin_s=15.0)
    figures |= {"built": again.ok, "fallback": "setup.py build_ext --inplace",
                "fallback_seconds": round(again.seconds, 1),
                "fallback_returncode": again.returncode}  # fmt: skip
    if not again.ok:
        figures["fallback_output_tail"] = again.log_tail()
    return figures


# -- S2 --------------------------------------------------------------------------------------


def section_gpu_tests(ctx: SectionContext) -> dict:
    """`pytest -m gpu tests` (junit XML kept); in the dry run only the collection."""
    junit = ctx.out / "s2-junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-p", "no:cacheprovider"]
    if ctx.dry_run:
        done = run_logged(ctx, [*cmd, "--collect-only", "-q"], "pytest-collect")
        text = done.log.read_text(errors="replace")
        match = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
        return {"mode": "collect-only", "returncode": done.returncode,
                "collected": int(match.group(1)) if match else None}  # fmt: skip
    junit.unlink(missing_ok=True)
    done = run_logged(ctx, [*cmd, "-v", "--junitxml", str(junit)], "pytest", margin_s=5.0)
    figures = {"returncode": done.returncode, "pytest_seconds": round(done.seconds, 1)}
    if junit.is_file():
        return figures | parse_junit(junit)
    # stopped at the deadline: count the verbose lines written so far
    text = done.log.read_text(errors="replace")
    counts = {k.lower(): len(re.findall(rf"::\S+ {k}\b", text))
              for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}  # fmt: skip
    failed = re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)", text, flags=re.M)
    return figures | counts | {"incomplete": True, "failures": [{"test": t} for t in failed]}


def parse_junit(path) -> dict:
    """passed/failed/errors/skipped counts and the failures' names and first lines."""
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failures, skipped = [], 0
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                first = (node.get("message") or node.text or "").strip().splitlines()
                failures.append({"test": name, "kind": tag, "first_line": (first or [""])[0][:300]})
        skipped += case.find("skipped") is not None
    failed = sum(f["kind"] == "failure" for f in failures)
    errors = len(failures) - failed
    return {"tests": len(cases), "passed": len(cases) - len(failures) - skipped, "failed": failed,
            "errors": errors, "skipped": skipped,
            "failures": failures[:FAILURES_KEPT]}  # fmt: skip
