"""examples/gpu/*.yaml: every GPU run config passes `megatron-ext train --dry-run` at the world
size its header states, resolves to bf16 at the layout its header states, and the dry run's memory
estimate of its most loaded pipeline stage fits the device it targets.

Each file's header carries three lines this test reads:

    # World size: 32 = ...
    # Layout: tp=1 pp=1 dp=32
    # Device: MI250X GCD, 64 GB (slurm profile `lumi`)

The dry run builds no model (parameter counts come from a meta-device build, memory from the
planner's formulas), starts no processes and does not open the data: `--nproc-per-node N` only
sets the world size. It runs in-process here (one torch import for the whole file); the data prefix
is the shared `fi_dataset` fixture although its 1000-token vocabulary is far below the models'
(the dry run never reads token ids; a real run checks them against the model's vocabulary).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GPU_DIR = ROOT / "examples" / "gpu"
EXAMPLES = sorted(GPU_DIR.glob("*.yaml"))


@dataclasses.dataclass
class Header:
    world_size: int
    tp: int
    pp: int
    dp: int
    device_gb: float
    profile: str | None
    nodes: int | None


def read_header(path: Path) -> Header:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    text = "\n".join(lines)

    def find(pattern: str) -> re.Match:
        m = re.search(pattern, text, re.MULTILINE)
        assert m, f"{path.name}: header has no line matching {pattern!r}"
        return m

    world = int(find(r"^# World size: (\d+)").group(1))
    tp, pp, dp = (int(g) for g in find(r"^# Layout: tp=(\d+) pp=(\d+) dp=(\d+)").groups())
    device_gb = float(find(r"^# Device: [^\n]*?(\d+(?:\.\d+)?) GB").group(1))
    profile = re.search(r"^# Device: [^\n]*slurm profile `([\w-]+)`", text, re.MULTILINE)
    launch = re.search(r"slurm (?:render|submit) --profile ([\w-]+) --nodes (\d+)", text)
    return Header(
        world,
        tp,
        pp,
        dp,
        device_gb,
        profile.group(1) if profile else None,
        int(launch.group(2)) if launch else None,
    )


def memory_fraction() -> float:
    """The share of device memory the planner plans for (the rest: allocator, comms, context)."""
    from megatron_ext.planner.plan import PlanRequest

    return {f.name: f.default for f in dataclasses.fields(PlanRequest)}["memory_fraction"]


def test_the_gpu_examples_are_there():
    names = {p.name for p in EXAMPLES}
    assert {
        "fingpt-1.5b.yaml",
        "fingpt-3b.yaml",
        "fingpt-13b.yaml",
        "bluumi-176b.yaml",
        "llama-3-8b.yaml",
    } <= names, names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_gpu_example_dry_run(path, fi_dataset, tmp_path, capsys):
    from megatron_ext.cli import main

    head = read_header(path)
    raw = yaml.safe_load(path.read_text())
    # left for the user; the attention backend stays `auto` (the GPU picks its own)
    assert raw["data"]["path"] is None and raw["checkpoint"]["dir"] is None
    assert "attention_backend" not in raw["model"] and "preset" in raw["model"]

    ckpt = tmp_path / "ckpt"
    argv = ["train", "--config", str(path), f"data.path={fi_dataset}", f"checkpoint.dir={ckpt}"]
    rc = main([*argv, "--nproc-per-node", str(head.world_size), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]

    # printed: the resolved config (YAML), the stage partition, then the report (JSON); the
    # first torch/DeepSpeed import may print a log line before them
    start = re.search(r"^model:", out, re.MULTILINE).start()
    resolved = yaml.safe_load(out[start : out.index("\nstage 0: layers")])
    report = json.loads(out[out.index("{\n") :])
    assert resolved["train"]["precision"] == "bf16"
    assert (resolved["parallel"]["tp"], resolved["parallel"]["pp"]) == (head.tp, head.pp)
    assert resolved["data"]["path"] == fi_dataset and resolved["checkpoint"]["dir"] == str(ckpt)
    assert resolved["logging"]["tensorboard"] is True
    layout = report["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"], layout["world_size"]) == (
        head.tp,
        head.pp,
        head.dp,
        head.world_size,
    )
    assert len(report["stages"]) == head.pp

    peak = max(s["memory_gb"] for s in report["stages"])
    budget = head.device_gb * memory_fraction()
    assert 0 < peak <= budget, f"{path.name}: {peak:.1f} GiB > {budget:.1f} GiB budget"

    if head.profile:  # the header's device and Slurm command agree with the cluster profile
        from megatron_ext.launch.profiles import load_profile

        prof = load_profile(head.profile)
        assert prof.device_memory_gb == head.device_gb
        assert head.nodes is not None and head.nodes * prof.tasks_per_node == head.world_size


def test_bluumi_is_continued_pretraining():
    raw = yaml.safe_load((GPU_DIR / "bluumi-176b.yaml").read_text())
    assert raw["model"]["preset"] == "bloom-176b"
    assert raw["checkpoint"]["load"] and raw["checkpoint"]["reset_progress"] is True
    assert raw["train"]["activation_checkpointing"] == "full"
    assert (raw["train"]["micro_batch_size"], raw["train"]["global_batch_size"]) == (2, 2048)
