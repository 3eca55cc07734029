"""Finding BIG-bench task directories and writing them out as offline lm-eval tasks; checking
the lm-eval task YAMLs of an include path before any work.

A task directory is FIN-bench's layout: `DIR/<task>/task.json`; a task with subtasks has a
`task.json` of its own (metadata, no examples) and `DIR/<task>/<subtask>/task.json`, named
`<task>_<subtask>`. `DIR/task.json` alone is one task named after DIR. The project's own tasks
are under megatron_ext/assets/tasks/ and always available by name.

An include path is lm-eval's `--include_path` (FIN-bench v2's layout): every `*.yaml` under it
is a task (`task: NAME`) or a group, templates that they `include:` may have any name, and
`!function` code sits next to them. lm-eval skips a file it cannot read without a word; here
such a file stops the run, named.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import yaml

from megatron_ext.errors import UserError
from megatron_ext.eval.bigbench import BigBenchTask, load_task

TASK_FILE = "task.json"
_IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # as lm-eval's task index


def bundled_tasks_dir() -> Path:
    """megatron_ext/assets/tasks: fi_gimp_completion (multiple choice), fi_gimp_generation."""
    return Path(__file__).resolve().parent.parent / "assets" / "tasks"


def discover(task_dir: str | Path) -> dict[str, Path]:
    """Task name -> task.json under `task_dir` (parents of subtasks left out), sorted by name."""
    root = Path(task_dir)
    if not root.is_dir():
        raise UserError(f"--task-dir {root}: not a directory")
    files = sorted(root.rglob(TASK_FILE))
    dirs = {f.parent for f in files}
    found: dict[str, Path] = {}
    for f in files:
        if any(d != f.parent and f.parent in d.parents for d in dirs):
            continue  # a parent of subtasks: its examples (if any) live in the subtasks
        rel = f.parent.relative_to(root)
        name = "_".join(rel.parts) if rel.parts else root.resolve().name
        if name in found:
            raise UserError(f"{f}: task name {name!r} also used by {found[name]}; rename a dir")
        found[name] = f
    if not found:
        raise UserError(f"--task-dir {root}: no {TASK_FILE} files under it")
    return dict(sorted(found.items()))


def resolve(
    names: list[str], task_dir: str | Path | None, include_path: str | Path | None = None
) -> tuple[list[BigBenchTask], list[str]]:
    """Split requested names into our BIG-bench tasks (loaded and checked) and the rest (left
    for lm-eval: the YAML tasks of `include_path`, checked here, and its own registry). No
    names: every task of `task_dir` and `include_path`."""
    known = discover(bundled_tasks_dir())
    from_dir = discover(task_dir) if task_dir is not None else {}
    known |= from_dir  # a user's task of the same name wins
    from_yaml = yaml_tasks(include_path) if include_path is not None else {}
    for name, path in from_yaml.items():
        if name in known:
            raise UserError(f"{path}: task {name!r} is also the task of {known[name]}; rename one")
    names = names or [*from_dir, *from_yaml]
    if not names:
        raise UserError("no tasks: pass --tasks T1,T2, --task-dir DIR and/or --include-path DIR")
    ours = [load_task(known[n], n) for n in names if n in known]
    return ours, [n for n in names if n not in known]


class _TaskYamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """lm-eval's task YAML: `!function module.name` kept as text (lm-eval imports it later)."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _read_task_yaml(path: Path, included: set[Path], seen: tuple[Path, ...] = ()) -> dict:
    """`path`'s config with its `include:` files merged under it (its own keys win), as lm-eval
    reads it; adds every included file to `included`."""
    if path.resolve() in seen:
        raise UserError(f"{seen[-1]}: includes {path}, which includes it again")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise UserError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: not a task config (a YAML mapping of keys)")
    merged: dict = {}
    includes = cfg.pop("include", None) or []
    for name in includes if isinstance(includes, list) else [includes]:
        inc = path.parent / str(name)
        if not inc.is_file():
            raise UserError(f"{path}: includes {name}, which does not exist ({inc})")
        included.add(inc.resolve())
        base = _read_task_yaml(inc, included, (*seen, path.resolve()))
        merged |= {k: v for k, v in base.items() if k != "task_list"}
    return merged | cfg


def _check_data_files(path: Path, cfg: dict) -> None:
    """Every local file the task's dataset reads exists (nothing is downloaded). Like
    `datasets`, a relative data file is read from dataset_kwargs.data_dir, else from the working
    directory (not the YAML's)."""
    kwargs = cfg.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise UserError(f"{path}: dataset_kwargs must be a mapping (data_files: ...)")
    files = kwargs.get("data_files") or []
    groups = files.values() if isinstance(files, dict) else [files]
    base = Path(kwargs.get("data_dir") or ".").expanduser()
    for name in (str(f) for g in groups for f in (g if isinstance(g, list) else [g])):
        if "://" in name:
            raise UserError(
                f"{path}: data file {name} is remote and eval runs offline; download it and "
                "name the local copy in data_files"
            )
        full = base / Path(name).expanduser()
        if not (glob.glob(str(full), recursive=True) if glob.has_magic(name) else full.exists()):
            raise UserError(
                f"{path}: data file {name} not found at {full.resolve()} (a relative path is "
                "read from dataset_kwargs.data_dir, else the working directory)"
            )
    local = cfg.get("dataset_path")
    if isinstance(local, str) and local.startswith(("/", ".", "~")):
        if not Path(local).expanduser().exists():
            raise UserError(f"{path}: dataset_path {local} does not exist")


def _checked_task(path: Path, cfg: dict) -> str | None:
    """The task name of a task config (None for a group); UserError naming what is missing."""
    if "group" in cfg:
        if not isinstance(cfg.get("task"), list):
            raise UserError(f"{path}: group {cfg['group']!r} has no `task:` list of its members")
        return None
    name = cfg.get("task")
    if not isinstance(name, str) or not name:
        raise UserError(
            f"{path}: no `task: NAME` (nor `group:`), so lm-eval would skip it; a template that "
            "other files include belongs in a file not ending in .yaml (FIN-bench: _name_yaml)"
        )
    if "class" not in cfg and not (cfg.get("dataset_path") or cfg.get("custom_dataset")):
        raise UserError(
            f"{path}: task {name!r} has no dataset_path; for local files: `dataset_path: json` "
            "with `dataset_kwargs: {data_files: {test: FILE.jsonl}}`"
        )
    _check_data_files(path, cfg)
    return name


def yaml_tasks(include_path: str | Path) -> dict[str, Path]:
    """Task name -> YAML file of every lm-eval task under `include_path`, each file checked
    (valid YAML, includes present, a task or group, a task's dataset and local data files);
    UserError naming the first bad file."""
    root = Path(include_path)
    if not root.is_dir():
        raise UserError(f"--include-path {root}: not a directory")
    files = sorted(p for p in root.glob("**/*.yaml") if not _IGNORED_DIRS & set(p.parts))
    included: set[Path] = set()
    configs = {f: _read_task_yaml(f, included) for f in files}
    found: dict[str, Path] = {}
    for f, cfg in configs.items():
        if f.resolve() in included and "task" not in cfg and "group" not in cfg:
            continue  # a template of other files
        name = _checked_task(f, cfg)
        if name in found:
            raise UserError(f"{f}: task name {name!r} also used by {found[name]}; rename one")
        if name is not None:
            found[name] = f
    if not found:
        raise UserError(f"--include-path {root}: no task YAML (*.yaml with `task: NAME`) under it")
    return dict(sorted(found.items()))


def write_lm_eval_tasks(tasks: list[BigBenchTask], out_dir: Path) -> list[dict]:
    """Write each task's rows as `out_dir/<task>.jsonl`; return the lm-eval configs over them
    (`out_dir/<task>.yaml` too, so the lm_eval CLI can run them: `--include_path out_dir`)."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    configs = []
    for task in tasks:
        data = out_dir / f"{task.name}.jsonl"
        with data.open("w", encoding="utf-8") as f:
            for row in task.rows():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        config = task.lm_eval_config(data, cache_dir=out_dir / "hf-datasets-cache")
        (out_dir / f"{task.name}.yaml").write_text(
            yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8"
        )
        configs.append(config)
    return configs
