#!/usr/bin/env python3
"""Write the bundled evaluation tasks (BIG-bench task.json) from the bundled Finnish sample.

    python tools/make_eval_tasks.py                      # -> megatron_ext/assets/tasks/
    python tools/make_eval_tasks.py --output DIR --check # fail if DIR differs from a fresh build

Deterministic: the same sample gives the same files byte for byte.
Logic: megatron_ext/demo/gimp_tasks.py.
"""

import argparse
import sys
from pathlib import Path

from megatron_ext.demo.gimp_corpus import sample_corpus_path
from megatron_ext.demo.gimp_tasks import build_tasks, iter_task_files, write_tasks
from megatron_ext.eval.tasks import bundled_tasks_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(bundled_tasks_dir()), help="(default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    sample = sample_corpus_path()
    if args.check:
        stale = [
            str(path)
            for path, text in iter_task_files(build_tasks(sample), Path(args.output))
            if not path.is_file() or path.read_text(encoding="utf-8") != text
        ]
        if stale:
            print(f"make_eval_tasks: out of date: {', '.join(stale)}", file=sys.stderr)
            return 1
        print("make_eval_tasks: up to date")
        return 0
    for path in write_tasks(sample, args.output):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
