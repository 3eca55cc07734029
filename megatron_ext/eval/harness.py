"""Running lm-evaluation-harness (pinned in constraints.txt) on a Hugging Face model directory,
offline, and reading its results back: one run's table, several runs side by side.

Nothing is downloaded: the Hub and `datasets` are switched to offline mode before lm-eval is
imported, our tasks read local JSON lines, and the model and tokenizer come from a local dir.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.eval.bigbench import FILTER_NAME, BigBenchTask
from megatron_ext.log import get_logger

log = get_logger(__name__)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def go_offline() -> None:
    """Set before `datasets`/`huggingface_hub` are imported: they read these once at import."""
    os.environ.update(OFFLINE_ENV)


@dataclass
class EvalRequest:
    hf_dir: Path
    tasks: list[BigBenchTask]
    other_tasks: list[str]  # include_path's YAML tasks, or lm-eval's (their data cached)
    num_fewshot: int | None = None
    limit: int | float | None = None
    batch_size: int = 8
    device: str = "cpu"
    max_length: int | None = None
    log_samples: bool = False
    seed: int = 1234
    include_path: Path | None = None  # lm-eval task YAMLs (checked by tasks.yaml_tasks)


def check_hf_dir(hf_dir: Path) -> None:
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"--hf-dir {hf_dir}: no config.json (not a Hugging Face model directory)")
    if not any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise UserError(
            f"{hf_dir}: no tokenizer files (tokenizer.json / tokenizer.model); convert with "
            "--tokenizer DIR or copy the tokenizer there"
        )


def evaluate(req: EvalRequest) -> dict:
    """Run lm-eval's `simple_evaluate` on `req.hf_dir`; returns its results dict (JSON-able)."""
    go_offline()
    check_hf_dir(req.hf_dir)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from megatron_ext.eval.tasks import write_lm_eval_tasks

    # Our tasks come as configs; lm-eval's own index (thousands of YAML files) is scanned only
    # when a name is neither ours nor in the include path.
    manager = TaskManager(include_path=req.include_path, include_defaults=False)
    if any(n not in manager.all_tasks for n in req.other_tasks):
        manager = TaskManager(include_path=req.include_path)
    unknown = [n for n in req.other_tasks if n not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown task(s) {', '.join(unknown)}: not among the bundled tasks, --task-dir, "
            "--include-path or lm-eval's registry"
        )
    model_args: dict = {"pretrained": str(req.hf_dir), "device": req.device}
    if req.max_length is not None:
        model_args["max_length"] = req.max_length
    lm = HFLM(**model_args, batch_size=req.batch_size)
    with tempfile.TemporaryDirectory(prefix="megatron-ext-eval-") as work:
        configs = write_lm_eval_tasks(req.tasks, Path(work))
        results = simple_evaluate(
            model=lm,
            tasks=[*configs, *req.other_tasks],
            num_fewshot=req.num_fewshot,
            limit=req.limit,
            task_manager=manager,
            log_samples=req.log_samples,
            bootstrap_iters=1000,
            random_seed=req.seed,
            numpy_random_seed=req.seed,
            torch_random_seed=req.seed,
            fewshot_random_seed=req.seed,
        )
    results["config"]["model"] = str(req.hf_dir)
    # A round trip through JSON: what is returned is exactly what --output holds.
    return json.loads(json.dumps(results, default=handle_non_serializable, ensure_ascii=False))


# ---------------------------------------------------------------------------- results as tables
def metric_rows(results: dict) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(task, metric) -> (value, stderr or None) from lm-eval's results JSON."""
    if not isinstance(results.get("results"), dict):
        raise UserError('not an lm-eval results JSON (no "results" object)')
    rows = {}
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            # metrics are "name,filter" keys; also there: alias, name, sample_len, stderrs
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)  # "acc,none", "exact_match,bigbench"
            if filt not in ("none", FILTER_NAME):  # lm-eval tasks with several filters
                metric = key
            stderr = metrics.get(key.replace(",", "_stderr,", 1))
            ok = isinstance(stderr, (int, float)) and math.isfinite(stderr)
            rows[(task, metric)] = (float(value), float(stderr) if ok else None)
    return rows


def _cell(value: tuple[float, float | None] | None) -> str:
    if value is None:
        return "-"
    v, se = value
    return f"{v:.4f} ± {se:.4f}" if se is not None else f"{v:.4f}"


def format_table(runs: list[tuple[str, dict]]) -> str:
    """A Markdown table: one row per (task, metric), one column per run."""
    tables = [(name, metric_rows(res)) for name, res in runs]
    keys = sorted({k for _, rows in tables for k in rows})
    header = ["task", "metric", *[name for name, _ in tables]]
    lines = [header] + [[t, m, *[_cell(rows.get((t, m))) for _, rows in tables]] for t, m in keys]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), sep, *map(fmt, lines[1:])])


def read_results(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read an lm-eval results JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UserError(f'{path}: not an lm-eval results JSON (no "results" object)')
    return data


def run_label(path: Path, results: dict) -> str:
    """A column name for a results file: its model (the HF dir's checkpoint tag if cached)."""
    model = str((results.get("config") or {}).get("model") or "")
    return Path(model).name if model else path.stem


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
