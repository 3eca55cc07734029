"""The two bundled evaluation tasks, built deterministically from the bundled Finnish sample
(megatron_ext/assets/fi_gimp_sample.jsonl.gz, GIMP manual, GFDL; see assets/README.md).

- fi_gimp_completion (multiple choice): the first half of a sentence from the manual; choices
  are its real second half and the second halves of three other sentences of about the same
  length (chance: 25%).
- fi_gimp_generation (generative): a sentence without its last three words; the target is
  those words (BIG-bench's default output regex ends the answer at the sentence's period).

A model trained on the sample has seen every sentence, so the tasks measure memorisation of
the training text: a sanity check of the whole evaluation path, not a benchmark.
`tools/make_eval_tasks.py` writes them to megatron_ext/assets/tasks/.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

NUM_EXAMPLES = 40
NUM_CHOICES = 4
TARGET_WORDS = 3
SEED = 20260
MIN_WORDS, MAX_WORDS = 8, 16

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-ZÄÖÅ])")
# Plain sentences only: letters, spaces, commas and hyphens, one final period; no digits,
# quotes, arrows or symbols (menu paths), so the generative target ends where BIG-bench's
# default output regex ends an answer.
_PLAIN = re.compile(r"[^\W\d_](?:[^\W\d_]|[ ,\-])*\.")
_ENGLISH = re.compile(r"\b(the|and|of|is|to|a|in|you)\b")

SOURCE = (
    "Sentences of the Finnish GIMP manual (GNU Image Manipulation Program User Manual, GIMP "
    "Documentation Team, GFDL 1.2+), from megatron_ext/assets/fi_gimp_sample.jsonl.gz; made by "
    "tools/make_eval_tasks.py"
)


def sentences(sample_path: str | Path) -> list[str]:
    """Distinct plain Finnish sentences of MIN..MAX words from the sample, in corpus order."""
    seen: dict[str, None] = {}
    with gzip.open(sample_path, "rt", encoding="utf-8") as f:
        for line in f:
            for para in json.loads(line)["text"].split("\n"):
                for s in _SENTENCE_SPLIT.split(para.strip()):
                    if _keep(s):
                        seen.setdefault(s, None)
    return list(seen)


def _keep(s: str) -> bool:
    words = s.split()
    return (
        MIN_WORDS <= len(words) <= MAX_WORDS
        and _PLAIN.fullmatch(s) is not None
        and re.search("[äöÄÖ]", s) is not None
        and _ENGLISH.search(s) is None
    )


def _halves(s: str) -> tuple[str, str]:
    words = s.split()
    cut = (len(words) + 1) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


def completion_task(pool: list[str], rng: random.Random) -> dict:
    examples = []
    for s in pool[:NUM_EXAMPLES]:
        prefix, right = _halves(s)
        n = len(right.split())
        others = [_halves(o)[1] for o in pool if o != s]
        near = [o for o in others if abs(len(o.split()) - n) <= 1 and o != right]
        wrong = rng.sample(sorted(set(near)), NUM_CHOICES - 1)
        choices = [right, *wrong]
        rng.shuffle(choices)
        examples.append({"input": prefix, "target_scores": {c: int(c == right) for c in choices}})
    return {
        "name": "fi_gimp_completion",
        "description": "Which continuation completes the sentence from the Finnish GIMP manual?",
        "keywords": ["multiple choice", "memorization", "Finnish", "sentence completion"],
        "metrics": ["multiple_choice_grade"],
        "preferred_score": "multiple_choice_grade",
        "source": SOURCE,
        "task_prefix": "",
        "example_input_prefix": "",
        "example_output_prefix": " ",
        "append_choices_to_input": False,
        "examples": examples,
    }


def generation_task(pool: list[str]) -> dict:
    examples = []
    for s in pool[:NUM_EXAMPLES]:
        words = s.split()
        target = " ".join(words[-TARGET_WORDS:]).removesuffix(".")
        examples.append({"input": " ".join(words[:-TARGET_WORDS]), "target": target})
    return {
        "name": "fi_gimp_generation",
        "description": "Continue the sentence from the Finnish GIMP manual with its last words.",
        "keywords": ["free response", "memorization", "Finnish", "sentence completion"],
        "metrics": ["exact_str_match"],
        "preferred_score": "exact_str_match",
        "source": SOURCE,
        "task_prefix": "",
        "example_input_prefix": "",
        "example_output_prefix": " ",
        "examples": examples,
    }


def build_tasks(sample_path: str | Path) -> dict[str, dict]:
    """Task name -> task.json content. Same sample, same output, byte for byte."""
    pool = sentences(sample_path)
    rng = random.Random(SEED)
    rng.shuffle(pool)
    half = len(pool) // 2  # the two tasks use different sentences
    completion = completion_task(pool[:half], rng)
    generation = generation_task(pool[half:])
    return {t["name"]: t for t in (completion, generation)}


def iter_task_files(tasks: dict[str, dict], out_dir: Path) -> Iterator[tuple[Path, str]]:
    for name, task in tasks.items():
        yield out_dir / name / "task.json", json.dumps(task, indent=2, ensure_ascii=False) + "\n"


def write_tasks(sample_path: str | Path, out_dir: str | Path) -> list[Path]:
    paths = []
    for path, text in iter_task_files(build_tasks(sample_path), Path(out_dir)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
