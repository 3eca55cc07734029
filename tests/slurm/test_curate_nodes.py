"""`megatron-ext curate` under `srun` on the 2 nodes of the local Slurm: the ranks share the work
through the output's work directory, and the output equals a one-process run's."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.curate.test_curate import _curate_cmd, _same_output, _split_sample
from tests.slurm.helpers import REPO, hard_timeout

pytestmark = pytest.mark.slurm


@hard_timeout(240)
def test_curate_on_two_nodes_matches_one_process(tmp_path, jobs):
    inputs, cfg = _split_sample(tmp_path)
    one = tmp_path / "one"
    proc = subprocess.run(_curate_cmd(inputs, one, cfg), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    nodes = tmp_path / "nodes"
    cmd = " ".join(_curate_cmd(inputs, nodes, cfg))
    script = tmp_path / "curate.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2 --ntasks-per-node=1 --time=00:04:00\n"
        f"#SBATCH --output={tmp_path}/slurm-%j.out --chdir={REPO}\n"
        f"srun --kill-on-bad-exit=1 {cmd}\n"
    )
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    jobs.add(sub.stdout.strip().split(";")[0])
    jobs.wait(timeout=200)
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert (nodes / "report.json").exists(), log[-3000:]
    _same_output(one, nodes)
    ranks = json.loads((nodes / "report.json").read_text())["ranks"]
    assert [(r["rank"], r["host"]) for r in ranks] == [(0, "node1"), (1, "node2")], ranks
    assert all(r["units"] > 0 for r in ranks)  # both nodes did part of the work
