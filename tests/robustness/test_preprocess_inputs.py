"""`megatron-ext preprocess` against hostile inputs and runs: orphaned workers, symlinked
directories, a prefix without a file name, no usable documents, oversized records, too many
workers, an existing output and a run stopped half-way."""

from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ext.data.indexed_dataset import IndexedDataset
from megatron_ext.data.inputs import expand_inputs, iter_chunks
from megatron_ext.data.preprocess import PreprocessConfig, preprocess
from megatron_ext.errors import UserError

GOOD = ["Hyvää huomenta.", "Kiitos paljon.", "Näkemiin."]


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            rec = {"text": rec} if isinstance(rec, str) else rec
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "megatron_ext", "preprocess", "--no-progress", *map(str, args)]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, timeout=120)


def run(tmp_path, inputs, tokenizer, name="out", **kw):
    return preprocess(
        PreprocessConfig(
            inputs=[str(i) for i in inputs],
            output_prefix=str(tmp_path / name),
            tokenizer=str(tokenizer),
            progress=False,
            **kw,
        )
    )


# --- 1. workers die with the main process ---------------------------------------------------


def _big_input(tmp_path: Path, fi_sample_path, copies: int = 60) -> Path:
    src = tmp_path / "big.jsonl"
    src.write_bytes(gzip.decompress(Path(fi_sample_path).read_bytes()) * copies)
    return src


def _start_busy_run(tmp_path, fi_sample_path, bpe_tokenizer_dir):
    """A 2-worker run, returned once both workers exist and the first tokens are written."""
    psutil = pytest.importorskip("psutil")
    cmd = cli_cmd(
        "--input",
        _big_input(tmp_path, fi_sample_path),
        "--output-prefix",
        tmp_path / "out",
        "--tokenizer",
        bpe_tokenizer_dir,
        "--workers",
        "2",
        "--chunk-mb",
        "0.05",
    )
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    main = psutil.Process(proc.pid)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            workers = [c for c in main.children() if "spawn_main" in " ".join(c.cmdline())]
            written = [p for p in tmp_path.glob("out.bin.tmp-*") if p.stat().st_size > 0]
            if len(workers) == 2 and written:
                return proc, main.children(recursive=True)
        except (psutil.Error, FileNotFoundError):  # a process or file went away meanwhile
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no busy 2-worker run: {(tmp_path / 'stderr.txt').read_text()[-2000:]}")


def _all_gone(procs, timeout: float) -> list:
    psutil = pytest.importorskip("psutil")
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:  # reparented zombies are dead
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_workers_exit_when_the_main_process_is_killed(tmp_path, fi_sample_path, bpe_tokenizer_dir):
    proc, children = _start_busy_run(tmp_path, fi_sample_path, bpe_tokenizer_dir)
    alive = []
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        alive = _all_gone(children, timeout=5)
        assert alive == [], [(p.pid, p.cmdline()) for p in alive]
        # a killed run leaves no dataset under the final prefix
        assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()
    finally:
        for p in alive:
            p.kill()


def test_parent_watch_fallback_without_prctl(tmp_path):
    """Where PR_SET_PDEATHSIG is missing, a worker polls its parent id and exits."""
    psutil = pytest.importorskip("psutil")
    ready = tmp_path / "ready"
    worker = (
        "import os, pathlib, time; from megatron_ext.data import records; "
        "records._watch_parent(os.getppid(), poll_s=0.05); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    )
    parent = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {worker!r}]); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(proc.stdout.readline()))
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            if child.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.05)
        assert ready.exists(), "the worker did not start its parent watch"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    alive = _all_gone([child], timeout=5)
    for p in alive:
        p.kill()
    assert alive == []


def test_sigterm_stops_the_run_without_output(tmp_path, fi_sample_path, bpe_tokenizer_dir):
    proc, children = _start_busy_run(tmp_path, fi_sample_path, bpe_tokenizer_dir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 2
    assert "stopped by signal" in (tmp_path / "stderr.txt").read_text()
    assert _all_gone(children, timeout=5) == []
    assert sorted(p.name for p in tmp_path.glob("out*")) == []


# --- 2. symlinked directories ----------------------------------------------------------------


def test_symlinked_directories_are_followed_once(tmp_path, bpe_tokenizer_dir):
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    (corpus / "plain").mkdir(parents=True)
    elsewhere.mkdir()
    write_jsonl(corpus / "plain" / "a.jsonl", GOOD[:1])
    write_jsonl(elsewhere / "b.jsonl", GOOD[1:])
    (corpus / "linked").symlink_to(elsewhere, target_is_directory=True)
    (corpus / "plain" / "loop").symlink_to(corpus, target_is_directory=True)  # a cycle
    (corpus / "zz_again").symlink_to(corpus / "plain", target_is_directory=True)  # seen twice
    files = expand_inputs([str(corpus)])
    assert files == [str(corpus / "linked" / "b.jsonl"), str(corpus / "plain" / "a.jsonl")]
    summary = run(tmp_path, [corpus], bpe_tokenizer_dir)
    assert summary.documents == 3


def test_unreadable_subdirectory_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "corpus" / "locked").mkdir(parents=True)
    write_jsonl(tmp_path / "corpus" / "a.jsonl", GOOD)
    real_scandir = os.scandir

    def scandir(path):  # as for a directory without read permission (tests run as root)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match=r"locked: cannot list directory \(Permission denied\)"):
        expand_inputs([str(tmp_path / "corpus")])


# --- 3. an output prefix without a file name -------------------------------------------------


@pytest.mark.parametrize("suffix", ["/", "/.", "/.."])
def test_output_prefix_without_a_file_name_is_refused(tmp_path, bpe_tokenizer_dir, suffix):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    (tmp_path / "out").mkdir()  # "out/" used to write out/.bin
    prefix = f"{tmp_path / 'out'}{suffix}"
    with pytest.raises(UserError, match="needs a file name"):
        preprocess(PreprocessConfig([str(src)], prefix, str(bpe_tokenizer_dir), progress=False))
    assert not list(tmp_path.rglob(".bin")) and not list(tmp_path.rglob("*.bin"))


# --- 4. "no usable documents" says why -------------------------------------------------------


def test_no_usable_documents_names_the_missing_key(tmp_path, bpe_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"body": "a", "id": 1}, {"body": "b", "id": 2}])
    (tmp_path / "broken.jsonl").write_text('{"body": \n')
    with pytest.raises(UserError) as info:
        run(tmp_path, [src, tmp_path / "broken.jsonl"], bpe_tokenizer_dir)
    msg = str(info.value)
    assert "no usable documents" in msg and "malformed JSON: 1, missing key: 2" in msg
    assert "no record has the key 'text' (--json-key)" in msg
    assert "'body', 'id'" in msg
    assert not list(tmp_path.glob("out*"))


def test_no_usable_documents_counts_each_reason(tmp_path, bpe_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "  "}, {"text": 3}, {"body": "x"}])
    with pytest.raises(UserError) as info:
        run(tmp_path, [src], bpe_tokenizer_dir)
    msg = str(info.value)
    assert "3 records skipped (empty document: 1, missing key: 1, non-string value: 1)" in msg
    assert "no record has the key" not in msg and "1 record lacks the key 'text'" in msg
    assert f"{src}:1: empty document" in msg


# --- 5. a maximum record size ----------------------------------------------------------------


def test_oversized_record_is_skipped_or_fatal_in_strict(tmp_path, bpe_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD[0], "iso " * 2000, GOOD[1], GOOD[2]])
    args = ["--input", src, "--output-prefix", tmp_path / "out", "--tokenizer", bpe_tokenizer_dir]
    proc = cli(*args, "--max-record-bytes", "1000", "--chunk-mb", "0.001")
    assert proc.returncode == 0, proc.stderr
    assert "skipped records: 1 (record too large: 1)" in proc.stdout
    assert f"{src}:2: record of 8,012 bytes is over --max-record-bytes (1,000)" in proc.stdout
    assert IndexedDataset(tmp_path / "out").num_documents == 3
    proc = cli(*args, "--max-record-bytes", "1000", "--strict", "--overwrite")
    assert proc.returncode == 2
    assert f"{src}:2: record of 8,012 bytes is over --max-record-bytes" in proc.stderr


@pytest.mark.parametrize("kind", ["jsonl", "blank-line", "file"])
def test_oversized_record_is_never_held_whole(tmp_path, kind):
    cap, chunk = 4096, 1024
    big = "x" * 100_000
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "in.jsonl", ["a", big, "b"])
        expected_line = 2
    elif kind == "blank-line":
        path = tmp_path / "in.txt"
        path.write_text(f"a\n\nline\n{big}\nmore\n\nb\n")
        expected_line = 3
    else:
        path = tmp_path / "in.txt"
        path.write_text(big)
        expected_line = 1
    mode = "file" if kind == "file" else "blank-line"
    chunks = list(iter_chunks([str(path)], chunk, mode, max_record_bytes=cap))
    assert max(len(c.data) for c in chunks) <= cap + chunk
    oversized = [c for c in chunks if c.oversized]
    assert [(c.first_line, c.oversized > cap) for c in oversized] == [(expected_line, True)]
    assert sum(c.data.count(b"b") for c in chunks) == (0 if kind == "file" else 1)
    if kind == "jsonl":  # the record after it keeps its line number
        assert [c.first_line for c in chunks if b'"b"' in c.data] == [3]


# --- 6. more workers than CPUs ---------------------------------------------------------------


def test_more_workers_than_cpus_warns(tmp_path, bpe_tokenizer_dir, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("megatron_ext")
    logger.addHandler(handler)
    try:
        run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", GOOD)], bpe_tokenizer_dir, workers=2)
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any("--workers 2 is more than the 1 CPU" in m for m in messages), messages


# --- 7. an existing output -------------------------------------------------------------------


def test_existing_output_needs_overwrite(tmp_path, bpe_tokenizer_dir):
    first = write_jsonl(tmp_path / "first.jsonl", GOOD)
    second = write_jsonl(tmp_path / "second.jsonl", GOOD[:1])
    run(tmp_path, [first], bpe_tokenizer_dir)
    before = (tmp_path / "out.bin").read_bytes()
    with pytest.raises(UserError, match=r"out\.bin already exists; pass --overwrite"):
        run(tmp_path, [second], bpe_tokenizer_dir)
    assert (tmp_path / "out.bin").read_bytes() == before
    (tmp_path / "out.bin").unlink()  # a lone .idx is refused too
    with pytest.raises(UserError, match=r"out\.idx already exists"):
        run(tmp_path, [second], bpe_tokenizer_dir)
    args = ["--input", second, "--output-prefix", tmp_path / "out"]
    proc = cli(*args, "--tokenizer", bpe_tokenizer_dir)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    proc = cli(*args, "--tokenizer", bpe_tokenizer_dir, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert IndexedDataset(tmp_path / "out").num_documents == 1
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
