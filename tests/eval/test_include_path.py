"""`megatron-ext eval --include-path DIR`: lm-eval task YAMLs (FIN-bench v2's layout: a template
that task files `include:`, groups, datasets from local files) run offline beside the BIG-bench
tasks; a malformed file stops the run before any model is loaded, named (exit 2)."""

from __future__ import annotations

import json

import pytest

from megatron_ext.cli import main
from megatron_ext.errors import UserError
from megatron_ext.eval.tasks import resolve, yaml_tasks
from megatron_ext.training.config import EvalConfig
from megatron_ext.training.in_loop_eval import eval_command
from tests.eval.helpers import run_cli

ROWS = [
    {"question": "Suomen pääkaupunki on", "choices": ["Turku", "Helsinki", "Oulu"], "answer": 1},
    {"question": "Ruotsin pääkaupunki on", "choices": ["Tukholma", "Malmö"], "answer": 0},
    {"question": "Norjan pääkaupunki on", "choices": ["Bergen", "Oslo"], "answer": 1},
]
TEMPLATE = """\
dataset_path: json
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(root, data_file=None) -> dict:
    """A FIN-bench v2-like include path: a template (not *.yaml), a task including it, a group."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "capitals.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), "utf-8")
    (root / "_capitals_yaml").write_text(TEMPLATE, encoding="utf-8")
    task = root / "capitals_p0.yaml"
    task.write_text(
        "include: _capitals_yaml\ntask: capitals_p0\ntag: [capitals_fi]\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file or data}\n",
        encoding="utf-8",
    )
    group = root / "_group_capitals.yaml"
    group.write_text("group: capitals_all\ntask:\n  - capitals_p0\n", encoding="utf-8")
    return {"task": task, "group": group, "data": data}


def test_yaml_tasks_are_found_and_left_to_lm_eval(tmp_path):
    files = write_tasks(tmp_path / "yaml")
    assert yaml_tasks(tmp_path / "yaml") == {"capitals_p0": files["task"]}
    assert resolve([], None, tmp_path / "yaml") == ([], ["capitals_p0"])  # no --tasks: all
    ours, others = resolve(["fi_gimp_completion", "capitals_all"], None, tmp_path / "yaml")
    assert [t.name for t in ours] == ["fi_gimp_completion"] and others == ["capitals_all"]


BAD = [
    ("syntax", "task: [capitals\n", r"not valid YAML"),
    ("no task", "dataset_path: json\noutput_type: multiple_choice\n", r"no `task: NAME`"),
    ("no dataset", "task: bad\noutput_type: multiple_choice\n", r"task 'bad' has no dataset_path"),
    ("no include", "include: _missing_yaml\ntask: bad\n", r"includes _missing_yaml, which does"),
    (
        "no data file",
        "include: _capitals_yaml\ntask: bad\ndataset_kwargs: {data_files: {test: /no/such.jsonl}}\n",
        r"data file /no/such.jsonl not found",
    ),
]


@pytest.mark.parametrize(("case", "text", "message"), BAD, ids=[b[0] for b in BAD])
def test_malformed_yaml_refused_naming_the_file(tmp_path, case, text, message):
    write_tasks(tmp_path / "yaml")
    bad = tmp_path / "yaml" / "sub" / "bad.yaml"
    bad.parent.mkdir()
    (bad.parent / "_capitals_yaml").write_text(TEMPLATE, encoding="utf-8")
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message) as err:
        yaml_tasks(tmp_path / "yaml")
    assert str(err.value).startswith(f"{bad}: ")


def test_cli_refuses_a_missing_data_file_before_any_work(tmp_path, capsys):
    """exit 2, the file named, no results (the model dir does not even exist)."""
    files = write_tasks(tmp_path / "yaml", data_file=tmp_path / "gone.jsonl")
    out = tmp_path / "results.json"
    code = main(
        ["eval", "--hf-dir", str(tmp_path / "no-model"), "--include-path", str(tmp_path / "yaml"),
         "--output", str(out)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert f"{files['task']}: data file {tmp_path / 'gone.jsonl'} not found" in err
    assert not out.exists()


def test_yaml_task_runs_offline_beside_a_bigbench_task(random_hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    write_tasks(tmp_path / "yaml")
    out = tmp_path / "r.json"
    proc = run_cli(
        "eval", "--hf-dir", str(random_hf_dir), "--include-path", str(tmp_path / "yaml"),
        "--tasks", "fi_gimp_completion,capitals_p0", "--limit", "3", "--output", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["n-samples"]["capitals_p0"]["effective"] == 3
    assert 0.0 <= res["results"]["capitals_p0"]["acc,none"] <= 1.0
    assert "acc,none" in res["results"]["fi_gimp_completion"]
    assert "| capitals_p0 " in proc.stdout  # the printed table


def test_in_loop_eval_passes_the_include_path(tmp_path):
    cfg = EvalConfig(tasks="capitals_p0", tokenizer="tok", include_path=str(tmp_path))
    cmd = eval_command(cfg, tmp_path / "iter_0000002", tmp_path / "out.json")
    assert cmd[cmd.index("--include-path") + 1] == str(tmp_path)
