"""`megatron-ext curate`: each step on documents made to trip it, and the command end to end on
the bundled Finnish sample (deterministic across worker counts, no partial output)."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.curate import config as curate_config
from megatron_ext.curate import dedup, text
from megatron_ext.curate.pipeline import curate
from megatron_ext.demo.gimp_corpus import sample_corpus_path
from megatron_ext.errors import UserError

PII = curate_config.PiiConfig()
ENGLISH = (
    "The committee met on Tuesday to discuss the budget for next year, and after a long debate "
    "about roads, schools and the new library the members agreed to postpone the decision until "
    "the auditors have finished their report on the spending of the previous council, which "
    "several residents had questioned at the public meeting in March."
)


@pytest.mark.parametrize(
    "code, valid",
    [
        ("131052-308T", True),  # the Digital and Population Data Services Agency's example
        ("131052-308U", False),  # wrong control character
        ("010594Y9021", True),  # a century sign of the 2023 reform (Y: 1900s)
        ("010594Y9033", False),
        ("311399-000A", False),  # month 13, individual number 000
    ],
)
def test_henkilotunnus_is_masked_only_with_its_control_character(code, valid):
    masked, counts = text.mask_pii(f"Henkilötunnus {code} on salainen.", PII)
    assert (masked == "Henkilötunnus <HETU> on salainen.") == valid
    assert counts["hetu"] == int(valid)


def test_contact_details_are_masked():
    doc = (
        "Soita numeroon 040 123 4567 tai +358 9 1234 5678, kirjoita osoitteeseen "
        "matti.meikalainen@example.fi, palvelin 192.168.10.254, tili FI21 1234 5600 0007 85. "
        "Virheellinen tili FI21 1234 5600 0007 86 ja versio 1.2.3 jäävät."
    )
    masked, counts = text.mask_pii(doc, PII)
    assert counts == {"phone": 2, "email": 1, "ip": 1, "iban": 1}
    assert "<EMAIL>" in masked and "<IBAN>" in masked and "FI21 1234 5600 0007 86" in masked
    assert "versio 1.2.3" in masked and "040" not in masked
    heading = "5.11.3.1. Valinnat\nOsoite 10.0.0.1. Loppu"  # a section number, then an address
    assert text.mask_pii(heading, PII)[0] == "5.11.3.1. Valinnat\nOsoite <IP>. Loppu"


def _finnish(seed: int, words: int = 120) -> str:
    vocab = ("talo kissa ja on ei se että oli kun mutta kirja metsä järvi kaupunki ihminen "
             "aurinko sade tuuli ystävä koulu työ päivä ilta aamu").split()  # fmt: skip
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab) for _ in range(words)) + "."


def test_quality_rules_name_the_rule_broken():
    q = curate_config.QualityConfig()
    assert text.quality_problem(_finnish(1), q) is None
    assert "word count" in text.quality_problem("Liian lyhyt teksti.", q)
    assert "digit ratio" in text.quality_problem(" ".join(["12345 678"] * 60), q)
    bullets = "\n".join(f"- kohta {i} on tässä ja se on hyvä asia" for i in range(40))
    assert "bullet lines" in text.quality_problem(bullets, q)
    assert "function words" in text.quality_problem(ENGLISH, q)


def test_near_duplicates_cluster_and_keep_the_first():
    base = _finnish(3, 300).split()
    swapped = list(base)
    swapped[10], swapped[11] = swapped[11], swapped[10]  # a swap: Jaccard ~0.98
    trimmed = base[: int(len(base) * 0.5)]  # half the text: Jaccard ~0.5, not a duplicate
    docs = [" ".join(base), _finnish(4, 300), " ".join(swapped), " ".join(trimmed)]
    assert dedup.near_duplicates(docs, curate_config.NearDedupConfig()) == {2: 0}
    # 70% of the text (Jaccard 0.70) shares an LSH band with the whole: a duplicate only when
    # candidates are not verified against the threshold (datatrove's rule)
    pair = [" ".join(base), " ".join(base[: int(len(base) * 0.7)])]
    assert dedup.near_duplicates(pair, curate_config.NearDedupConfig()) == {}
    assert dedup.near_duplicates(pair, curate_config.NearDedupConfig(verify=False)) == {1: 0}


def _write_corpus(path, docs: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            row = {"id": f"d{i}", "text": d, "url": f"u{i}"} | ({"title": f"t{i}"} if i % 2 else {})
            row |= {"lang": "", "note": ""}  # records of two shapes, sharing objects inside
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def test_each_step_removes_what_it_should(tmp_path):
    banner = "Tämä sivu käyttää evästeitä, jotta palvelu toimisi paremmin."
    task = json.loads((sample_corpus_path().parents[0] / "tasks" / "fi_gimp_generation" /
                       "task.json").read_text())  # fmt: skip
    example = next(e for e in task["examples"] if len(f"{e['input']} {e['target']}".split()) >= 13)
    answer = example["target"]
    docs = [_finnish(i) + f"\n{banner}" for i in range(12)]
    docs += [docs[0].replace(banner, "").strip()]  # 12: doc 0 once its banner is gone
    docs += ["Lyhyt."]  # 13: quality
    docs += [ENGLISH + " Se on ja ei."]  # 14: passes the function-word rule, English
    docs += [_finnish(40) + f" {example['input']} {answer} " + _finnish(41)]  # 15: contaminated
    docs += [_finnish(50) + " Soita 040 123 4567."]  # 16: kept, masked
    docs += [docs[1]]  # 17: an exact copy
    (tmp_path / "in").mkdir()
    _write_corpus(tmp_path / "in" / "a.jsonl", docs)
    (tmp_path / "in" / "a.jsonl").open("a").write("{broken json\n")
    report = curate([str(tmp_path / "in")], str(tmp_path / "out"), curate_config.CurateConfig())
    removed = {r["id"]: r for r in map(json.loads, open(tmp_path / "out/removed/removed.jsonl"))}
    assert removed["d13"]["step"] == "quality" and "word count" in removed["d13"]["reason"]
    assert removed["d14"]["step"] == "language"
    assert (
        removed["d15"]["step"] == "decontaminate"
        and "fi_gimp_generation" in removed["d15"]["matched"]
    )
    kept = [json.loads(line) for line in open(tmp_path / "out/kept/shard-00000.jsonl")]
    by_id = {k["id"]: k for k in kept}
    assert all(banner not in k["text"] for k in kept)  # in 12 documents: boilerplate
    assert removed["d17"]["step"] == "exact_dedup" and removed["d17"]["matched"] == "d1"
    assert removed["d12"]["step"] == "near_dedup" and removed["d12"]["matched"] == "d0"
    assert "<PHONE>" in by_id["d16"]["text"] and by_id["d16"]["url"] == "u16"
    for k in kept:  # every other field as it came, in its place (records spilled to disk)
        i = int(k["id"][1:])
        title = ["title"] if i % 2 else []
        assert list(k) == ["id", "text", "url", *title, "lang", "note"] and k["url"] == f"u{i}"
        assert k["lang"] == k["note"] == "" and k.get("title", f"t{i}") == f"t{i}"
    assert [k["id"] for k in kept] == sorted(by_id, key=lambda i: int(i[1:]))  # input order
    assert report["skipped_records"] == {"malformed JSON": 1} and report["pii_masked"] == {
        "phone": 1
    }
    assert (tmp_path / "out/report.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="exists"):
        curate([str(tmp_path / "in")], str(tmp_path / "out"), curate_config.CurateConfig())


def test_bad_config_is_refused_before_any_work(tmp_path):
    for body, why in [("near_dedup: {threshold: 1.5}", "threshold"),
                      ("quality: {min_wrds: 3}", "unknown key"),
                      ("near_dedup: {num_perm: 100, bands: 16}", "multiple of bands")]:  # fmt: skip
        path = tmp_path / "c.yaml"
        path.write_text(body)
        with pytest.raises(UserError, match=why):
            curate_config.load(str(path))


def _split_sample(tmp_path) -> tuple[Path, Path]:
    """The bundled sample and 20 exact copies in 4 files, and a config that makes 4 input parts
    and several hash buckets of them."""
    rows = gzip.open(sample_corpus_path(), "rt").read().splitlines(keepends=True)
    rows += rows[:20]
    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"s{i}.jsonl").write_text("".join(rows[i * 56 : (i + 1) * 56]))
    cfg = tmp_path / "small.yaml"
    cfg.write_text("part_mb: 0.05\nbucket_mb: 0.15\n")
    return tmp_path / "in", cfg


def _curate_cmd(inputs, out, cfg, *extra) -> list[str]:
    return [sys.executable, "-m", "megatron_ext", "curate", "--input", str(inputs),
            "--output", str(out), "--config", str(cfg), *extra]  # fmt: skip


def _same_output(a, b, *also_ignored: str) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*.jsonl"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.jsonl"))
    for p in files:
        assert (a / p).read_bytes() == (b / p).read_bytes(), p
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        for k in ("seconds", "step_seconds", "processes", "ranks", *also_ignored):
            del r[k]
    assert ra == rb


def _ranks(cmd: list[str], world: int, attempt: str, timeout: float = 120) -> list:
    """CMD on WORLD ranks as srun/mpirun start them (torchrun's variables here): the processes'
    return codes and outputs (all killed if one hangs)."""
    procs = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": str(world),
                "MEGATRON_EXT_CURATE_ATTEMPT": attempt,
            },
        )  # fmt: skip
        for r in range(world)
    ]
    try:
        return [(p.communicate(timeout=timeout)[0], p.returncode) for p in procs]
    finally:
        for p in procs:
            p.kill()


def test_output_is_the_same_with_parts_workers_ranks_and_after_a_resume(tmp_path):
    inputs, cfg = _split_sample(tmp_path)
    one = tmp_path / "one"
    proc = subprocess.run(_curate_cmd(inputs, one, cfg), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((one / "report.json").read_text())
    assert report["documents"] == 221 and report["removed_by_step"]["exact_dedup"] == 20
    assert report["parts"] == 4 and report["buckets"] >= 3
    assert not (tmp_path / "one.work").exists()

    # the default config: one part, one bucket
    whole = tmp_path / "whole"
    default = tmp_path / "default.yaml"
    default.write_text("{}\n")
    proc = subprocess.run(_curate_cmd(inputs, whole, default), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((whole / "report.json").read_text())["buckets"] == 1
    _same_output(one, whole, "parts", "buckets")

    two = tmp_path / "two"
    proc = subprocess.run(_curate_cmd(inputs, two, cfg, "--workers", "2"), capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_output(one, two)

    ranked = tmp_path / "ranked"
    (log0, code0), (log1, code1) = _ranks(_curate_cmd(inputs, ranked, cfg), 2, "a1")
    assert (code0, code1) == (0, 0), (log0, log1)
    assert "documents kept" in log0 and "documents kept" not in log1  # rank 0 writes
    ranks = json.loads((ranked / "report.json").read_text())["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["units"] > 0 for r in ranks)
    _same_output(one, ranked)

    # interrupted after the near-duplicate phase: nothing under the final name; resumed
    resumed = tmp_path / "resumed"
    env = {**os.environ, "MEGATRON_EXT_CURATE_EXIT_AFTER": "near"}
    proc = subprocess.run(_curate_cmd(inputs, resumed, cfg), capture_output=True, text=True,
                          env=env)  # fmt: skip
    assert proc.returncode == 9 and not resumed.exists()
    assert (tmp_path / "resumed.work" / "plan.json").exists()
    proc = subprocess.run(_curate_cmd(inputs, resumed, cfg), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scan: 4 of 4 units already done" in proc.stderr
    _same_output(one, resumed)

    # interrupted, then run with another config: the old work is not reused
    changed = tmp_path / "changed"
    env["MEGATRON_EXT_CURATE_EXIT_AFTER"] = "scan"
    proc = subprocess.run(_curate_cmd(inputs, changed, cfg), capture_output=True, text=True,
                          env=env)  # fmt: skip
    assert proc.returncode == 9
    other = tmp_path / "other.yaml"
    other.write_text(cfg.read_text() + "quality: {enabled: false}\n")
    proc = subprocess.run(_curate_cmd(inputs, changed, other), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting over" in proc.stderr and "already done" not in proc.stderr
    assert "quality" not in json.loads((changed / "report.json").read_text())["removed_by_step"]


def test_a_rank_that_fails_stops_the_others(tmp_path):
    inputs, cfg = _split_sample(tmp_path)
    with open(inputs / "s1.jsonl", "a") as f:  # part 1: rank 1's
        f.write("{broken\n")
    out = tmp_path / "out"
    (log0, code0), (log1, code1) = _ranks(_curate_cmd(inputs, out, cfg, "--strict"), 2, "a2")
    assert code0 != 0 and code1 != 0, (log0, log1)
    assert "s1.jsonl:57: malformed JSON (--strict)" in log1
    assert "rank 1 failed: " in log0 and "s1.jsonl:57" in log0
    assert not out.exists()
    inside = inputs / "curated"
    proc = subprocess.run(_curate_cmd(inputs, inside, cfg), capture_output=True, text=True)
    assert proc.returncode != 0 and "lies inside the input directory" in proc.stderr


def test_inputs_of_every_kind_and_strict_stops_at_the_first_bad_record(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    docs = [_finnish(i) for i in range(6)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "page.txt").write_text(docs[0])  # a .txt file is one document
    with gzip.open(tmp_path / "in" / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[1:3])
    rows = "".join(json.dumps({"text": d}) + "\n" for d in docs[3:5]) + '{"txt": "no text"}\n'
    (tmp_path / "in" / "b.jsonl.zst").write_bytes(zstandard.compress(rows.encode()))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "c.jsonl").write_text(json.dumps({"text": docs[5]}) + "\n")
    cfg = curate_config.CurateConfig()
    inputs = [str(tmp_path / "in"), str(tmp_path / "oth*" / "*.jsonl")]
    report = curate(inputs, str(tmp_path / "out"), cfg)
    per_source = {
        Path(k).name: v["documents"] for k, v in report["steps"]["read"]["per_source"].items()
    }
    assert per_source == {"page.txt": 1, "a.jsonl.gz": 2, "b.jsonl.zst": 2, "c.jsonl": 1}
    assert report["skipped_records"] == {"no non-empty string 'text'": 1}

    with pytest.raises(
        UserError, match=r"b\.jsonl\.zst:3: no non-empty string 'text' \(--strict\)"
    ):
        curate(inputs, str(tmp_path / "strict"), cfg, strict=True)
    assert not (tmp_path / "strict").exists()


def test_normalise_repairs_mojibake_and_leaves_clean_text_alone():
    cfg = curate_config.NormaliseConfig()
    clean = "Tämä sivu kertoo ”suotimista” – ja ’valinnoista’.\n\n\n\nLoppu.  "
    assert text.normalise(clean, cfg) == clean.replace("\n\n\n\n", "\n\n").rstrip()
    broken = "Tämä sivu kertoo suotimista ja työkaluista.".encode().decode("latin-1")
    assert (
        "Ã¤" in broken
        and text.normalise(broken, cfg) == "Tämä sivu kertoo suotimista ja työkaluista."
    )
    assert text.normalise("a\u0308iti", cfg) == "äiti"  # NFC
    off = curate_config.NormaliseConfig(fix_mojibake=False)
    assert text.normalise(broken, off) == broken
