"""Multi-rank preprocessing under Open MPI equals the single-process result, byte for byte."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed


def mpi_env() -> dict:
    env = dict(os.environ)
    # root in CI; tcp instead of shared memory between ranks (see shared/notes/local-slurm.md)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl="self,tcp",
        OMPI_MCA_rmaps_base_oversubscribe="1",
    )
    return env


@pytest.fixture(scope="module")
def mpirun():
    pytest.importorskip("mpi4py")
    path = shutil.which("mpirun")
    if path is None:
        pytest.skip("Open MPI's mpirun is not installed (apt-get install openmpi-bin)")
    return path


def make_inputs(tmp_path, fi_sample_path, num_files=5) -> list[str]:
    import gzip

    with gzip.open(fi_sample_path, "rt", encoding="utf-8") as f:
        lines = f.readlines()[:100]
    paths = []
    for i in range(num_files):
        p = tmp_path / f"part{i}.jsonl"
        p.write_text("".join(lines[i::num_files]), encoding="utf-8")
        paths.append(str(p))
    with open(paths[-1], "a") as f:  # a bad record: skipped and counted across ranks
        f.write(json.dumps({"oops": 1}) + "\n")
    return paths


def test_two_ranks_equal_single_process(tmp_path, mpirun, fi_sample_path, bpe_tokenizer_dir):
    inputs = make_inputs(tmp_path, fi_sample_path)
    common = [
        "--tokenizer",
        str(bpe_tokenizer_dir),
        "--append-eod",
        "--no-progress",
        "--workers",
        "1",
    ]
    mpi = subprocess.run(
        [
            mpirun,
            "-np",
            "2",
            sys.executable,
            "-m",
            "megatron_ext",
            "preprocess",
            "--input",
            *inputs,
            "--output-prefix",
            str(tmp_path / "mpi"),
            *common,
        ],
        capture_output=True,
        text=True,
        env=mpi_env(),
        timeout=300,
    )
    assert mpi.returncode == 0, mpi.stderr
    assert "merged 2 rank shards" in mpi.stderr
    assert "skipped records: 1 (missing key: 1)" in mpi.stdout
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_ext",
            "preprocess",
            "--input",
            *inputs,
            "--output-prefix",
            str(tmp_path / "single"),
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / f"mpi{ext}", tmp_path / f"single{ext}", shallow=False)
    assert not [p for p in os.listdir(tmp_path) if "shard" in p or ".tmp-" in p]


def test_bad_record_on_one_rank_fails_all_without_output(
    tmp_path, mpirun, fi_sample_path, bpe_tokenizer_dir
):
    inputs = make_inputs(tmp_path, fi_sample_path)
    proc = subprocess.run(
        [
            mpirun,
            "-np",
            "2",
            sys.executable,
            "-m",
            "megatron_ext",
            "preprocess",
            "--input",
            *inputs,
            "--output-prefix",
            str(tmp_path / "mpi"),
            "--tokenizer",
            str(bpe_tokenizer_dir),
            "--strict",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=mpi_env(),
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"{inputs[-1]}:" in proc.stderr and "missing key 'text'" in proc.stderr
    assert not [p for p in os.listdir(tmp_path) if p.startswith("mpi")]
