"""Rendering job scripts from the bundled profiles, and the combinations that are refused."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_ext.cli import main
from megatron_ext.errors import UserError
from megatron_ext.launch.profiles import available_profiles, load_profile
from megatron_ext.launch.render import RenderOptions, parse_time, prepare_job, render_script

RUN = {
    "model": {"preset": "fingpt-8b"},
    "parallel": {"tp": 2, "pp": 2},
    "data": {"path": "data/fi_text_document", "seq_length": 2048},
    "train": {"iterations": 1000, "micro_batch_size": 1, "global_batch_size": 64},
    "optim": {"lr": 3.0e-4},
    "checkpoint": {"dir": "ckpt", "interval": 100},
}


@pytest.fixture
def run_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(RUN))
    return path


def options(profile, run_yaml, **kw):
    kw.setdefault("nodes", 2)
    return RenderOptions(profile=load_profile(profile), config=run_yaml, **kw)


def test_bundled_profiles():
    assert {"lumi", "nvidia", "generic", "local"} <= set(available_profiles())


@pytest.mark.parametrize("profile", ["lumi", "nvidia", "generic", "local"])
def test_render_writes_valid_bash(profile, run_yaml, tmp_path):
    out = tmp_path / "run" / "job.sbatch"
    account = ["--account", "project_462000000"] if profile == "lumi" else []
    nodes = "4" if profile == "local" else "2"
    rc = main(["slurm", "render", "--profile", profile, "--nodes", nodes, "--config",
               str(run_yaml), "-o", str(out), *account])  # fmt: skip
    assert rc == 0
    text = out.read_text()
    subprocess.run(["bash", "-n", str(out)], check=True)
    assert f"#SBATCH --nodes={nodes}" in text
    assert "#SBATCH --signal=USR1@" in text
    assert f"#SBATCH --output={out.parent}/logs/%x-%j.out" in text
    assert "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS" in text
    assert f"--config {out.parent}/job.config.yaml" in text
    resolved = yaml.safe_load((out.parent / "job.config.yaml").read_text())
    assert resolved["checkpoint"]["dir"] == str(tmp_path / "ckpt")  # made absolute
    assert (out.parent / "logs").is_dir() and (out.parent / "run.json").is_file()


def test_lumi_key_lines(run_yaml, tmp_path):
    job = prepare_job(options("lumi", run_yaml, account="project_1", container="/img.sif"))
    text = render_script(job)
    for line in [
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=7",
        "#SBATCH --partition=standard-g",
        "#SBATCH --account=project_1",
        "#SBATCH --signal=USR1@600",
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",
        "#SBATCH --requeue",
        "module load LUMI/23.09",
        'export NCCL_SOCKET_IFNAME="hsn0,hsn1,hsn2,hsn3"',
        'export FI_CXI_DEFAULT_CQ_SIZE="262144"',
        "--cpu-bind=mask_cpu:0xfe000000000000,0xfe00000000000000,0xfe0000,0xfe000000,0xfe,0xfe00,",
        "singularity exec --bind /pfs,/scratch",
        "rm -rf /dev/shm/*",
        'export MIOPEN_USER_DB_PATH="/tmp/${USER}-miopen-${SLURM_JOB_ID}-${SLURM_NODEID}"',
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
    ]:
        assert line in text, line
    assert job.world_size == 16 and job.dp == 4


def test_nvidia_four_gpu_nodes(run_yaml):
    job = prepare_job(options("nvidia", run_yaml, tasks_per_node=4))
    text = render_script(job)
    assert "#SBATCH --gpus-per-node=4" in text and "#SBATCH --ntasks-per-node=4" in text
    assert 'export CUDA_DEVICE_MAX_CONNECTIONS="1"' in text
    assert job.dp == 2


def test_stdout_render_passes_overrides_to_the_trainer(run_yaml, capsys):
    rc = main(["slurm", "render", "--profile", "local", "--nodes", "4", "--config",
               str(run_yaml), "optim.lr=1e-4", "--train-cmd", "python t.py --cfg {config}"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert f"TRAIN_CMD=(python t.py --cfg {run_yaml} optim.lr=1e-4)" in out
    assert "--mpi=pmix" not in out


def test_mpi_launcher(run_yaml):
    text = render_script(prepare_job(options("local", run_yaml, nodes=4, launcher="mpi")))
    assert "srun \\\n  --kill-on-bad-exit=1 \\\n  --mpi=pmix \\" in text


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            {"overrides": ["parallel.tp=3"]},
            "16 ranks is not divisible by parallel.tp x parallel.pp = 3 x 2",
        ),
        ({"nodes": 0}, "--nodes N is required"),
        ({"overrides": ["train.global_batch_size=6"]}, "not a multiple of"),
        ({"overrides": ["checkpoint.dir="]}, "checkpoint.dir is empty"),
        ({"overrides": ["parallel.tp=0"]}, "parallel.tp must be a positive integer"),
        ({"time": "90"}, "write HH:MM:SS"),
        ({"time": "00:05:00"}, "leaves no training time before the save signal"),
        ({"time": "3-00:00:00"}, "exceeds the partition limit 2-00:00:00"),
        ({"account": None}, "needs --account"),
        ({"tasks_per_node": 4}, "allows 8"),
        ({"overrides": ["broken"]}, "override 'broken' is not of the form section.key=value"),
        ({"overrides": ["train.iteratons=5"]}, "unknown key(s) iteratons"),
        ({"overrides": ["data.path=null"]}, "give exactly one of data.path"),
    ],
)
def test_lumi_refusals(run_yaml, kw, message):
    kw = {"account": "project_1", **kw}
    with pytest.raises(UserError, match=re.escape(message)):
        prepare_job(options("lumi", run_yaml, **kw))


def test_trainer_schema_only_checked_for_our_trainer(run_yaml):
    # A custom command gets the config as it is; `megatron-ext train` would refuse the typo.
    job = prepare_job(options("local", run_yaml, nodes=4, train_cmd="python my.py {config}",
                              overrides=["train.iteratons=5"]))  # fmt: skip
    assert job.train_argv[:2] == ["python", "my.py"]


def test_container_needs_a_container_section(run_yaml):
    with pytest.raises(UserError, match="has no container: section"):
        prepare_job(options("generic", run_yaml, container="/img.sif"))


def test_cli_refusal_is_one_line_exit_2(run_yaml, capsys):
    rc = main(["slurm", "render", "--profile", "generic", "--nodes", "1", "--config",
               str(run_yaml), "parallel.tp=8"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "4 tasks = 4 ranks is not divisible by parallel.tp x parallel.pp = 8 x 2" in err


def test_missing_config_and_unknown_profile(tmp_path):
    with pytest.raises(UserError, match="does not exist: pass --config"):
        prepare_job(RenderOptions(profile=load_profile("local"), nodes=1, config=tmp_path / "x"))
    with pytest.raises(UserError, match="no cluster profile 'mars'"):
        load_profile("mars")


def test_user_profile_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: mine\ngpus_per_nod: 4\n")
    with pytest.raises(UserError, match=f"{bad}: unknown profile key\\(s\\) gpus_per_nod"):
        load_profile(str(bad))
    bad.write_text("name: mine\ngpus_per_node: 4\ntasks_per_node: 3\n")
    with pytest.raises(UserError, match="tasks_per_node: must divide gpus_per_node"):
        load_profile(str(bad))
    bad.write_text("name: mine\nfilesystem_write_gb_s: 0\n")
    with pytest.raises(UserError, match="filesystem_write_gb_s: must be a positive bandwidth"):
        load_profile(str(bad))


def test_user_profile_by_env_dir(tmp_path, monkeypatch, run_yaml):
    d = tmp_path / "profiles"
    d.mkdir()
    text = (Path(__file__).resolve().parents[2] / "slurm/profiles/generic.yaml").read_text()
    (d / "mycluster.yaml").write_text(text.replace("name: generic", "name: mycluster"))
    monkeypatch.setenv("MEGATRON_EXT_PROFILES", str(d))
    assert "mycluster" in available_profiles()
    assert prepare_job(options("mycluster", run_yaml)).profile.name == "mycluster"


def test_parse_time():
    assert parse_time("01:00:00") == 3600
    assert parse_time("2-00:00:30") == 2 * 86400 + 30


@pytest.mark.parametrize(
    "kw",
    [
        {"job_name": "run\nrm -rf ~"},
        {"job_name": "my run"},
        {"account": "project_1\n#SBATCH --qos=high"},
        {"partition": "small\tg"},
        {"output": Path("out\n/job.sbatch")},
        {"container": "img.sif\necho pwned"},
    ],
)
def test_control_characters_never_reach_the_script(run_yaml, kw):
    """A newline in a value became a top-level command (sbatch stops reading #SBATCH there)."""
    (name,) = kw
    with pytest.raises(UserError, match=f"--{name.replace('_', '-')} "):
        prepare_job(options("generic", run_yaml, **kw))


def test_config_path_with_a_newline_is_refused(run_yaml, tmp_path):
    odd = tmp_path / "run\necho pwned.yaml"
    odd.write_text(run_yaml.read_text())
    with pytest.raises(UserError, match="--config"):
        prepare_job(options("generic", run_yaml=odd))


@pytest.mark.parametrize("override", ["model.hiden_size=3", "optim.lrr=1"])
def test_a_model_typo_is_refused_before_anything_is_written(run_yaml, tmp_path, override):
    """`model.hiden_size=3` used to render (the model section was an untyped dict) and fail
    only when the job started on the cluster; now it is refused like `optim.lrr=1`."""
    out = tmp_path / "run" / "job.sbatch"
    with pytest.raises(UserError, match="unknown key"):
        prepare_job(options("local", run_yaml, nodes=4, overrides=[override], output=out))
    assert not out.parent.exists()


def test_exclude_is_one_sbatch_line(run_yaml):
    """Entries as typed in a hurry (spaces after commas, a repeat, a Slurm range) render as one
    clean `--exclude`."""
    kw = {"exclude": ["nid001234, nid001240", "nid[000010-000012,000020]", "nid001234"]}
    text = render_script(prepare_job(options("generic", run_yaml, **kw)))
    assert "#SBATCH --exclude=nid001234,nid001240,nid[000010-000012,000020]\n" in text
    assert "--exclude" not in render_script(prepare_job(options("generic", run_yaml)))


def test_render_and_submit_take_exclude(run_yaml, tmp_path, capsys):
    rc = main(["slurm", "render", "--profile", "local", "--nodes", "4", "--config",
               str(run_yaml), "--exclude", "node3", "--exclude", "node4.cluster"])  # fmt: skip
    assert rc == 0
    assert "#SBATCH --exclude=node3,node4.cluster\n" in capsys.readouterr().out
    out = tmp_path / "run" / "job.sbatch"
    rc = main(["slurm", "submit", "--profile", "local", "--nodes", "4", "--config",
               str(run_yaml), "-o", str(out), "--exclude", "node3;scancel -u $USER"])  # fmt: skip
    assert rc == 2  # refused before anything is written or queued
    assert "--exclude 'node3;scancel -u $USER': [' ', '$', ';'] cannot be part of a host name" in (
        capsys.readouterr().err
    )
    assert not out.parent.exists()


@pytest.mark.parametrize(
    "value",
    [
        "nid001234\n#SBATCH --qos=high",
        "nid001234 nid001240",
        "nid001234;rm -rf ~",
        "$(reboot)",
        "nid'1",
        "--nodelist=nid1",
        "../hosts",  # sbatch reads a value with '/' as a file of host names
        "nid1,,nid2",
        "nid[001-003",
        "nid[a-c]",
        "nid=1",
    ],
)
def test_exclude_takes_host_names_only(run_yaml, value):
    with pytest.raises(UserError, match=r"^--exclude .*e\.g\. --exclude nid001234,nid001240$"):
        prepare_job(options("generic", run_yaml, exclude=[value]))
