"""Run the verification sections, each in its own process under its own time cap.

    python tools/gpu_verify.py --out DIR [--cpu-dry-run] [--sections S0,S3] [--cap-scale X]
                               [--budget SECONDS] [--work WORKDIR]

The parent starts `python -m megatron_ext.verify --section SN --out DIR --cap C` in a session
of its own for each section in turn. A section that runs past its cap is killed with every
process it started (the whole session: a hung trainer does not keep the GPU) and recorded as
`{"section": SN, "status": "timeout", "partial": [...]}`, with whatever pieces it had kept;
a crash is recorded as failed with the end of its log. After each section the parent appends
one line to DIR/results.jsonl (flushed and synced at once) and renders DIR/summary.md again,
so a run stopped from outside still leaves every finished section. DIR keeps what a person
reads (results.jsonl, summary.md, s2-junit.xml, logs/); the synthetic datasets and checkpoints
go to --work (default DIR/work: point it elsewhere to bring back only the small files).

Time: each section has a default cap (SECTIONS, seconds on one H200, scaled by --cap-scale):
    S0  20  a cold torch import
    S1 180  nvcc for sm_90 with 16 jobs, plus the C++ modules
    S2 100  the gpu tier; a tier stopped at its cap still reports the tests it finished
    S3  90  three tiny runs: startup and, with ALiBi on a GPU, a flex compile each
    S4  90  softmax/sdpa cases take seconds; each flex shape compiles, so the flex cases run
            last and a capped section keeps the cases it finished
    S5 180  FinGPT-3B: host-side init of 3B weights, compile, 8 steps of 65k tokens; then the
            plain loop and its profile
    S6  75  an 8-layer Llama-3-8B shape, 6 steps
They add up to more than 8 minutes; the whole run keeps to --budget (default 470 s: the 8
minutes of a device check, build included): a section gets at most what is left, and one that
would start with less than MIN_START_S left is recorded as skipped. The caps are estimates
until a first GPU run. A rerun into the same DIR appends, and the summary shows each section's
newest line, so one section can be rerun alone (`--sections S4`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_ext.log import get_logger
from megatron_ext.verify.common import SectionContext, read_jsonl, repo_env, tail
from megatron_ext.verify.report import append_result, render_summary

log = get_logger(__name__)

# name: (title, default cap in seconds on one H200, "module:function" of the section)
SECTIONS: dict[str, tuple[str, float, str]] = {
    "S0": ("environment", 20, "environment:section_environment"),
    "S1": ("CUDA extension build", 180, "environment:section_build"),
    "S2": ("gpu test tier", 100, "environment:section_gpu_tests"),
    "S3": ("train CLI and bit-exact resume", 90, "trainer_runs:section_train_resume"),
    "S4": ("attention backends", 90, "attention_bench:section_attention"),
    "S5": ("training throughput and engine overhead", 180, "throughput:section_throughput"),
    "S6": ("Llama shape with SDPA", 75, "throughput:section_llama"),
}
MIN_START_S = 15.0
EXIT_GRACE_S = 5.0  # the child's own deadline ends this much before the parent kills it
SLEEP_ENV = "MEGATRON_EXT_VERIFY_SLEEP"  # a section name: that section hangs (timeout tests)
TAIL_ERROR = 3000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results directory (results.jsonl, summary.md)")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU, no rebuild")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, e.g. S0,S3")
    p.add_argument("--cap-scale", type=float, default=1.0, help="multiply every section's cap")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run")
    p.add_argument("--work", help="datasets and checkpoints (default: OUT/work)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # child: run this one section
    p.add_argument("--cap", type=float, default=None, help=argparse.SUPPRESS)
    return p


def parse_sections(text: str) -> list[str]:
    names = [s.strip().upper() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"gpu_verify: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "work"
    if args.section:
        return run_child(args.section.upper(), out, work, args.cpu_dry_run, args.cap)
    return run_all(args, out, work)


# -- parent ----------------------------------------------------------------------------------


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the parent while a section ran."""


def _interrupt(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run_all(args: argparse.Namespace, out: Path, work: Path) -> int:
    """Every requested section in turn; exit status 0 when all came back ok. A SIGTERM/SIGINT
    ends the running section (recorded as interrupted) and the run."""
    names = parse_sections(args.sections)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    end = time.monotonic() + args.budget
    statuses = []
    for name in names:
        title, cap, _ = SECTIONS[name]
        left = end - time.monotonic()
        cap = min(cap * args.cap_scale, left)
        if left < MIN_START_S:
            record = {"section": name, "status": "skipped", "seconds": 0.0,
                      "reason": f"run budget of {args.budget:.0f} s spent"}  # fmt: skip
        else:
            log.info("gpu_verify: %s (%s), cap %.0f s", name, title, cap)
            record = run_section_process(name, out, work, args.cpu_dry_run, cap)
        record = {"section": name, "title": title, **record, "dry_run": args.cpu_dry_run}
        append_result(out, record)
        render_summary(out)
        log.info("gpu_verify: %s %s in %.1f s", name, record["status"], record["seconds"])
        statuses.append(record["status"])
        if record["status"] == "interrupted":
            log.warning(
                "gpu_verify: interrupted during %s; the sections after it did not run", name
            )
            break
    log.info("gpu_verify: results in %s (summary.md)", out)
    return 0 if all(s == "ok" for s in statuses) else 1


def run_section_process(name: str, out: Path, work: Path, dry_run: bool, cap: float) -> dict:
    """Run one section's process under `cap` seconds; its record (status, seconds, figures)."""
    result_path = out / "sections" / f"{name}.json"
    partial_path = out / "sections" / f"{name}.partial.jsonl"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (result_path, partial_path):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "megatron_ext.verify", "--section", name, "--out", str(out),
           "--work", str(work), "--cap", f"{cap:.1f}",
           *(["--cpu-dry-run"] if dry_run else [])]  # fmt: skip
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with log_path.open("w") as sink:
        proc = subprocess.Popen(
            cmd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=repo_env(dry_run),
        )
        try:
            code = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            code = None
        except Interrupted:  # the run is stopped from outside: end the section, record it
            code = "interrupted"
        if code is None or code == "interrupted":
            kill_session(proc.pid)
            proc.wait()
    seconds = round(time.monotonic() - began, 2)
    record = json.loads(result_path.read_text()) if result_path.is_file() else None
    if record is not None:
        return {**record, "seconds": seconds, "cap_s": round(cap, 1)}
    log_tail = tail(log_path.read_text(errors="replace"), 1500)
    partial = read_jsonl(partial_path)
    status = {None: "timeout", "interrupted": "interrupted"}.get(code, "failed")
    extra = (
        {"error": f"section process exited {code} without a result"} if status == "failed" else {}
    )
    return {"status": status, "seconds": seconds, "cap_s": round(cap, 1), **extra,
            "partial": partial, "log_tail": log_tail}  # fmt: skip


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (Linux /proc): the section process and all it started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[3]) == sid:  # state ppid pgrp session
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session a section process leads (it was started with
    start_new_session, so sid is its pid)."""
    pids = session_pids(sid) if Path("/proc/self/stat").exists() else [sid]
    for pid in pids or [sid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- child -----------------------------------------------------------------------------------


def run_child(name: str, out: Path, work: Path, dry_run: bool, cap: float | None) -> int:
    """Run section `name` here; write its record to DIR/sections/<name>.json."""
    title, default_cap, target = SECTIONS[name]
    cap = cap if cap is not None else default_cap
    deadline = time.monotonic() + max(1.0, cap - EXIT_GRACE_S)
    ctx = SectionContext(name, out, dry_run, deadline, work)
    if os.environ.get(SLEEP_ENV, "").upper() == name:
        log.warning("%s: %s=%s, sleeping past the cap", name, SLEEP_ENV, name)
        time.sleep(10 * cap + 60)
    module_name, fn_name = target.split(":")
    began = time.monotonic()
    try:
        fn = getattr(importlib.import_module(f"megatron_ext.verify.{module_name}"), fn_name)
        figures = fn(ctx)
        record = {"status": "ok", **figures}
    except Exception as exc:  # the record says what failed; the other sections still run
        log.exception("%s (%s) failed", name, title)
        record = {"status": "failed", "error": _clip(f"{type(exc).__name__}: {exc}")}
    record["seconds"] = round(time.monotonic() - began, 2)
    path = out / "sections" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, path)
    return 0 if record["status"] == "ok" else 1


def _clip(text: str, head: int = 600) -> str:
    """The start (what failed) and the end (a log's last lines) of a long error."""
    if len(text) <= TAIL_ERROR:
        return text
    return text[:head] + "\n...\n" + text[-(TAIL_ERROR - head) :]
