"""Cluster profiles: what a Slurm cluster needs in a job script, as data (slurm/profiles/*.yaml).

A profile says how many tasks and GPUs a node gets, which sbatch/srun options, modules,
environment variables and per-node set-up a job needs, and why. `megatron-ext slurm render`
turns a profile plus a run config into a job script; `megatron-ext plan` reads the device count
and memory from it. Users add a cluster by writing one more YAML file (copy `generic.yaml`) and
passing its path to `--profile`, or by putting it in a directory listed in
`MEGATRON_EXT_PROFILES` (colon-separated).

Settings with a reason are written as `NAME: {value: ..., why: ...}`; the reason becomes the
comment above the line in the rendered script. A bare `NAME: value` is accepted too.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_ext.config import read_yaml
from megatron_ext.errors import UserError

BUNDLED_DIR = Path(__file__).resolve().parents[2] / "slurm" / "profiles"
LAUNCHERS = ("torch", "mpi")
GPU_DIRECTIVES = ("gpus-per-node", "gres", "none")


@dataclass(frozen=True)
class Setting:
    """One option, variable or command, with the reason it is there (rendered as a comment)."""

    name: str
    value: Any
    why: str = ""


@dataclass(frozen=True)
class Container:
    runtime: str = "singularity"  # singularity or apptainer: `<runtime> exec --bind ... IMAGE`
    image: str | None = None  # default image; `--container IMG` overrides
    binds: tuple[str, ...] = ()
    exec_args: tuple[str, ...] = ()
    required: bool = False


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    path: str
    description: str = ""
    # Devices: one task per GPU (or per GCD on MI250X). gpus_per_node = 0 for CPU-only nodes.
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    allowed_tasks_per_node: tuple[int, ...] = ()  # `--tasks-per-node` may pick one of these
    device_name: str = "cpu"
    device_memory_gb: float = 0.0  # GiB per task's device, as vendors list it; the planner's budget
    cpus_per_task: int | None = None
    gpu_directive: str = "gpus-per-node"
    # Queue
    partition: str | None = None
    account_required: bool = False
    time: str = "01:00:00"
    max_time: str | None = None
    max_nodes: int | None = None
    # Time limit: USR1 this many seconds before the limit; the trainer saves and exits 0.
    signal_margin_s: int = 300
    # per-job write bandwidth of the checkpoint filesystem (GB/s): `plan` prints the save time
    filesystem_write_gb_s: float = 10.0
    # the device `plan` predicts throughput for (planner/devices.py: a100-40gb, a100-80gb, h100,
    # h200, mi250x-gcd) and the links between devices (nvidia, nvidia-ndr, lumi, generic);
    # none: no prediction (CPU profiles)
    planner_device: str | None = None
    planner_links: str | None = None
    requeue: bool = True
    max_requeues: int = 20
    launcher: str = "torch"
    train_cmd: str = "megatron-ext train --config {config}"
    # Script content
    sbatch: tuple[Setting, ...] = ()
    srun: tuple[Setting, ...] = ()
    modules: tuple[str, ...] = ()
    env: tuple[Setting, ...] = ()
    task_env: tuple[Setting, ...] = ()
    node_setup: tuple[Setting, ...] = ()
    container: Container | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def profile_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("MEGATRON_EXT_PROFILES", "").split(":") if p]
    return extra + [BUNDLED_DIR]


def available_profiles() -> list[str]:
    names = set()
    for d in profile_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_profile(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.is_file():
            raise UserError(f"profile file {path} does not exist: give a path to a YAML profile")
        return path
    for d in profile_dirs():
        candidate = d / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise UserError(
        f"no cluster profile '{name_or_path}' in {', '.join(map(str, profile_dirs()))}: "
        f"pick one of {', '.join(available_profiles())} or pass the path of your own YAML "
        f"(copy {BUNDLED_DIR / 'generic.yaml'})"
    )


def load_profile(name_or_path: str) -> ClusterProfile:
    """Read and check a profile; errors name the file and the key to fix."""
    path = find_profile(name_or_path)
    return profile_from_dict(read_yaml(path), str(path), default_name=path.stem)


def _settings(raw: Any, where: str) -> tuple[Setting, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise UserError(
            f"{where}: expected a mapping NAME: value or NAME: {{value: ..., why: ...}}"
        )
    out = []
    for name, spec in raw.items():
        if isinstance(spec, dict):
            unknown = set(spec) - {"value", "why"}
            if unknown or "value" not in spec:
                raise UserError(
                    f"{where}.{name}: use {{value: ..., why: ...}} (got {sorted(spec)})"
                )
            out.append(Setting(str(name), spec["value"], str(spec.get("why", "")).strip()))
        else:
            out.append(Setting(str(name), spec))
    return tuple(out)


def profile_from_dict(raw: dict, path: str, default_name: str = "custom") -> ClusterProfile:
    fields = {f.name for f in dataclasses.fields(ClusterProfile)} - {"path"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise UserError(
            f"{path}: unknown profile key(s) {', '.join(unknown)}; known keys: "
            f"{', '.join(sorted(fields))}"
        )
    kw: dict[str, Any] = {k: v for k, v in raw.items() if k in fields}
    kw.setdefault("name", default_name)
    for key in ("sbatch", "srun", "env", "task_env", "node_setup"):
        kw[key] = _settings(raw.get(key), f"{path}: {key}")
    for key in ("allowed_tasks_per_node", "modules", "notes"):
        kw[key] = tuple(raw.get(key) or ())
    if raw.get("container") is not None:
        c = raw["container"]
        known = {f.name for f in dataclasses.fields(Container)}
        if not isinstance(c, dict) or set(c) - known:
            raise UserError(f"{path}: container takes the keys {', '.join(sorted(known))}")
        kw["container"] = Container(
            **{
                **c,
                "binds": tuple(c.get("binds") or ()),
                "exec_args": tuple(c.get("exec_args") or ()),
            }
        )
    profile = ClusterProfile(path=path, **kw)
    _check(profile)
    return profile


def _check(p: ClusterProfile) -> None:
    def bad(key: str, what: str) -> UserError:
        return UserError(f"{p.path}: {key}: {what}")

    if p.tasks_per_node < 1:
        raise bad("tasks_per_node", "must be at least 1")
    if p.gpus_per_node < 0:
        raise bad("gpus_per_node", "must be 0 (CPU nodes) or more")
    if p.gpus_per_node and p.gpus_per_node % p.tasks_per_node:
        raise bad("tasks_per_node", f"must divide gpus_per_node ({p.gpus_per_node})")
    if p.launcher not in LAUNCHERS:
        raise bad("launcher", f"must be one of {', '.join(LAUNCHERS)}")
    if p.gpu_directive not in GPU_DIRECTIVES:
        raise bad("gpu_directive", f"must be one of {', '.join(GPU_DIRECTIVES)}")
    if p.signal_margin_s < 0:
        raise bad("signal_margin_s", "must be 0 (no signal) or more seconds")
    if not p.filesystem_write_gb_s > 0:
        raise bad("filesystem_write_gb_s", "must be a positive bandwidth in GB/s")
    from megatron_ext.planner.devices import DEVICES, LINKS

    if p.planner_device is not None and p.planner_device not in DEVICES:
        raise bad("planner_device", f"must be one of {', '.join(DEVICES)}")
    if p.planner_links is not None and p.planner_links not in LINKS:
        raise bad("planner_links", f"must be one of {', '.join(LINKS)}")
    for s in p.task_env:
        if "'" in str(s.value):
            raise bad(f"task_env.{s.name}", "values are rendered inside single quotes; drop the '")
    for s in p.env:
        if '"' in str(s.value):
            raise bad(f"env.{s.name}", 'values are rendered inside double quotes; drop the "')
    for s in p.node_setup:
        if "'" in str(s.value):
            raise bad(f"node_setup.{s.name}", "commands run inside single quotes; drop the '")
