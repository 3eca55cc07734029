"""tools/gpu_verify.py on CPU: the dry run goes through every section's code, and a section past
its cap is recorded as a timeout while the sections after it still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.verify.runner import SECTIONS, SLEEP_ENV

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "gpu_verify.py"


def run_tool(out: Path, *args: str, env: dict | None = None, timeout: float = 400):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, str(TOOL), "--out", str(out), "--cpu-dry-run", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_verify")
    proc = run_tool(out)
    assert proc.returncode == 0, proc.stderr[-4000:] + (out / "summary.md").read_text()
    return out


def test_dry_run_records_every_section_ok(dry_run):
    rows = results(dry_run)
    assert [r["section"] for r in rows] == list(SECTIONS)
    for row in rows:
        assert row["status"] == "ok", row
        assert row["seconds"] >= 0 and row["dry_run"] is True


def test_dry_run_figures(dry_run):
    by = {r["section"]: r for r in results(dry_run)}
    assert by["S0"]["python"] and by["S0"]["versions"]["torch"]
    assert by["S1"]["modules"]["_ops_cpu"] == "ok"
    assert set(by["S1"]["fused_ops_status"]) >= {"layer_norm", "scaled_alibi_softmax"}
    assert by["S2"]["collected"] > 0
    s3 = by["S3"]
    assert s3["resumed_from_checkpoint"] and s3["resume_max_abs_diff"] < 1e-6
    assert len(s3["resume_losses"]) == len(s3["straight_losses"]) == 6
    cases = by["S4"]["cases"]
    assert {c["backend"] for c in cases} == {"softmax", "sdpa", "flex"}
    for case in cases:
        assert case["status"] == "ok", case
        assert case["max_abs_err"] < 1e-5 and case["median_ms"] > 0
        assert case["pass"] == ("fwd (no CPU backward)" if case["backend"] == "flex" else "fwd+bwd")
    s5 = by["S5"]
    for key in ("tokens_per_s", "tflops_per_device", "plain_tokens_per_s", "peak_memory_gb"):
        assert s5[key] > 0, key
    assert isinstance(s5["engine_overhead"], float)
    assert s5["plain_top_kernels"] and all(k["ms"] > 0 for k in s5["plain_top_kernels"])
    s6 = by["S6"]
    assert s6["shape"]["kv_heads"] < s6["shape"]["heads"] and s6["tokens_per_s"] > 0


def test_dry_run_summary_names_every_section(dry_run):
    summary = (dry_run / "summary.md").read_text()
    for name, (title, _, _) in SECTIONS.items():
        assert f"## {name} {title}: ok" in summary


def test_a_section_past_its_cap_is_a_timeout_and_the_next_still_runs(tmp_path):
    proc = run_tool(tmp_path, "--sections", "S0,S1", "--cap-scale", "0.3", env={SLEEP_ENV: "S0"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = results(tmp_path)
    assert [(r["section"], r["status"]) for r in rows] == [("S0", "timeout"), ("S1", "ok")]
    assert rows[0]["seconds"] < 30
    assert "| S0 | environment | timeout |" in (tmp_path / "summary.md").read_text()
