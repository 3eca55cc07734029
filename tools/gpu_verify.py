"""Verify the stack on one GPU (H200) in at most 8 minutes, or its code paths on CPU.

    python tools/gpu_verify.py --out DIR [--cpu-dry-run] [--sections S0,S3] [--cap-scale X]

Results: DIR/results.jsonl (one line per section, written as each ends) and DIR/summary.md.
Sections, caps and the run budget: megatron_ext/verify/runner.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.verify.runner import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
