"""`Job`: everything a job script needs, checked (made by `launch.render.prepare_job`, turned into
text by `launch.script.render_script`, submitted by `launch.submit`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_ext.launch.profiles import ClusterProfile


@dataclass
class Job:
    profile: ClusterProfile
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    world_size: int
    tp: int
    pp: int
    dp: int
    iterations: int
    checkpoint_dir: str
    time: str
    time_s: int
    signal_margin_s: int
    account: str | None
    partition: str | None
    container: str | None
    launcher: str
    requeue: bool
    job_name: str
    run_dir: Path
    script_path: Path | None
    config_source: Path
    resolved_config: dict
    resolved_config_path: Path  # where the job reads its config
    train_argv: list[str]
    workdir: Path
    exclude: tuple[str, ...] = ()  # host names / Slurm ranges the job must not run on
