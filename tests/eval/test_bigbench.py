"""BIG-bench task.json -> lm-eval tasks: both kinds converted, malformed files refused clearly."""

from __future__ import annotations

import json
import re

import pytest

from megatron_ext.cli import main
from megatron_ext.errors import UserError
from megatron_ext.eval.bigbench import GENERATIVE, MULTIPLE_CHOICE, load_task
from megatron_ext.eval.tasks import bundled_tasks_dir, discover, resolve, write_lm_eval_tasks

MC = {
    "name": "capitals",
    "description": "pääkaupungit",
    "keywords": ["multiple choice"],
    "metrics": ["multiple_choice_grade"],
    "examples": [
        {"input": "Suomen pääkaupunki?", "target_scores": {"Turku": 0, "Helsinki": 1, "Oulu": 0}},
        {"input": "Ruotsin pääkaupunki?", "target_scores": {"Tukholma": 1.0, "Malmö": 0.0}},
        {"input": "Kaksi oikein", "target_scores": {"a": 1, "b": 1, "c": 0}},
    ],
}
GEN = {
    "name": "sums",
    "metrics": ["exact_str_match"],
    "task_prefix": "Laske.\n",
    "example_input_prefix": "\nK: ",
    "example_output_prefix": "\nV: ",
    "examples": [
        {"input": "1 + 1", "target": "2"},
        {"input": "2 + 2", "target": ["4", " neljä "]},
    ],
}


def write_task(root, name, data) -> str:
    path = root / name / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def test_multiple_choice_task_converts(tmp_path):
    task = load_task(write_task(tmp_path, "capitals", MC))
    assert (task.name, task.kind) == ("capitals", MULTIPLE_CHOICE)
    rows = task.rows()
    # BIG-bench defaults: "\nQ: " input, choices appended (fixed shuffled order), "\nA: " output
    q = rows[0]["query"]
    assert q.startswith("\nQ: Suomen pääkaupunki?") and q.endswith("\nA: ")
    assert sorted(re.findall(r"\n  choice: (\w+)", q)) == ["Helsinki", "Oulu", "Turku"]
    assert rows[0]["choices"] == ["Turku", "Helsinki", "Oulu"] and rows[0]["gold"] == [1]
    assert rows[0]["answer"] == "Helsinki"
    assert rows[1]["gold"] == [0]
    assert rows[2]["gold"] == [0, 1]  # every top-scored choice is right
    config = task.lm_eval_config(tmp_path / "capitals.jsonl")
    assert config["output_type"] == "multiple_choice"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    assert config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"] == {"test": str(tmp_path / "capitals.jsonl")}


def test_choices_not_appended_when_told(tmp_path):
    data = {**MC, "append_choices_to_input": False, "example_input_prefix": ""}
    task = load_task(write_task(tmp_path, "capitals", data))
    assert task.rows()[0]["query"] == "Suomen pääkaupunki?\nA: "


def test_generative_task_converts(tmp_path):
    task = load_task(write_task(tmp_path, "sums", GEN))
    assert task.kind == GENERATIVE
    rows = task.rows()
    # trailing spaces of the prompt go (the model writes its own); targets are stripped
    assert rows[0]["query"] == "\nK: 1 + 1\nV:"
    assert rows[1]["targets"] == ["4", "neljä"]
    config = task.lm_eval_config(tmp_path / "sums.jsonl")
    assert config["output_type"] == "generate_until"
    assert config["description"] == "Laske.\n"
    assert config["metric_list"][0]["metric"] == "exact_match"
    # BIG-bench's default output regex: the answer ends at the first . ? ! ; or newline
    (regex,) = [
        f["regex_pattern"] for f in config["filter_list"][0]["filter"] if "regex_pattern" in f
    ]
    assert re.findall(regex, " 4. Ja muuta")[0].strip() == "4"


def test_stop_string_replaces_default_regex(tmp_path):
    task = load_task(write_task(tmp_path, "sums", {**GEN, "stop_string": "</v>"}))
    config = task.lm_eval_config(tmp_path / "x.jsonl")
    assert config["generation_kwargs"]["until"] == ["</v>"]
    (regex,) = [
        f["regex_pattern"] for f in config["filter_list"][0]["filter"] if "regex_pattern" in f
    ]
    assert re.findall(regex, " 4. Ja muuta")[0].strip() == "4. Ja muuta"


def test_written_tasks_load_in_lm_eval(tmp_path, monkeypatch):
    """The configs and data we write are what lm-eval builds its tasks from (no network)."""
    from megatron_ext.eval.harness import OFFLINE_ENV

    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    from lm_eval.tasks import TaskManager

    tasks = [load_task(write_task(tmp_path, n, d)) for n, d in (("capitals", MC), ("sums", GEN))]
    configs = write_lm_eval_tasks(tasks, tmp_path / "work")
    assert (tmp_path / "work" / "capitals.yaml").is_file()
    loaded = TaskManager(include_defaults=False).load(configs)["tasks"]
    mc, gen = loaded["capitals"], loaded["sums"]
    docs = list(mc.test_docs())
    assert len(docs) == 3 and mc.doc_to_choice(docs[0]) == ["Turku", "Helsinki", "Oulu"]
    assert mc.doc_to_target(docs[2]) == [0, 1]
    assert [gen.doc_to_target(d) for d in gen.test_docs()] == [["2"], ["4", "neljä"]]


def test_bundled_tasks_are_valid_and_regenerable():
    from megatron_ext.demo.gimp_corpus import sample_corpus_path
    from megatron_ext.demo.gimp_tasks import build_tasks

    found = discover(bundled_tasks_dir())
    assert list(found) == ["fi_gimp_completion", "fi_gimp_generation"]
    mc, gen = (load_task(p, n) for n, p in found.items())
    assert (mc.kind, gen.kind) == (MULTIPLE_CHOICE, GENERATIVE)
    assert len(mc.examples) == len(gen.examples) == 40
    assert all(len(ex.choices) == 4 and len(ex.gold) == 1 for ex in mc.examples)
    fresh = build_tasks(sample_corpus_path())  # tools/make_eval_tasks.py: same files
    for name, path in found.items():
        assert json.loads(path.read_text(encoding="utf-8")) == fresh[name]


def test_task_dir_discovery(tmp_path):
    write_task(tmp_path, "capitals", MC)
    write_task(tmp_path, "math", {"name": "math", "description": "parent of subtasks"})
    write_task(tmp_path / "math", "sums", GEN)
    assert list(discover(tmp_path)) == ["capitals", "math_sums"]
    ours, others = resolve([], tmp_path)  # no --tasks: every task of the dir
    assert [t.name for t in ours] == ["capitals", "math_sums"] and others == []
    ours, others = resolve(["fi_gimp_completion", "hellaswag"], tmp_path)
    assert [t.name for t in ours] == ["fi_gimp_completion"] and others == ["hellaswag"]


BAD = [
    ("{not json", r"not valid JSON \(.* line 1"),
    ({"name": "x"}, r'no "examples"'),
    ({"examples": []}, r'no "examples"'),
    ({"examples": [{"input": "a", "target": "b"}, {"input": "c"}]}, r"example 1: neither"),
    ({"examples": [{"target": "b"}]}, r'example 0: "input" must be a string'),
    (
        {"examples": [{"input": "a", "target": "b"}, {"input": "c", "target_scores": {"d": 1}}]},
        r"example 1: mixed kinds",
    ),
    (
        {
            "examples": [
                {"input": "a", "target_scores": {"b": 1}},
                {"input": "c", "target_scores": {"d": 0, "e": 0}},
            ]
        },
        r"example 1: .*no positive choice",
    ),
    (
        {"examples": [{"input": "a", "target_scores": {"b": "yes"}}]},
        r"example 0: score of choice 'b'",
    ),
    ({"examples": [{"input": "a", "target": []}]}, r'example 0: "target" must be'),
    ([1, 2], r"is a JSON object"),
]


@pytest.mark.parametrize("data,message", BAD)
def test_malformed_task_refused(tmp_path, data, message):
    path = write_task(tmp_path, "bad", data)
    with pytest.raises(UserError, match=message) as err:
        load_task(path)
    assert path in str(err.value)


def test_cli_refuses_malformed_task_dir_before_any_work(tmp_path, capsys):
    """exit 2, the file and example named, no results file (and no model is even loaded)."""
    write_task(tmp_path / "tasks", "good", MC)
    bad = write_task(
        tmp_path / "tasks", "bad", {"examples": [{"input": "x", "target_scores": {"y": 0}}]}
    )
    out = tmp_path / "results.json"
    code = main(
        ["eval", "--hf-dir", str(tmp_path / "no-model"), "--task-dir", str(tmp_path / "tasks"),
         "--output", str(out)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}: example 0" in err and "no positive choice" in err
    assert not out.exists()
