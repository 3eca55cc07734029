"""HTML -> JSON Lines extraction (megatron_ext.demo.gimp_corpus, tools/gimp_help_to_jsonl.py)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.demo.gimp_corpus import (
    DEFAULT_INPUT_DIR,
    HtmlCorpusConfig,
    build_html_corpus,
    finnish_ratio,
    html_to_text,
    sample_corpus_path,
)
from megatron_ext.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "gimp_help_to_jsonl.py"
needs_gimp_help = pytest.mark.skipif(
    not Path(DEFAULT_INPUT_DIR).is_dir(), reason="Debian package gimp-help-fi not installed"
)

PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<html xmlns="http://www.w3.org/1999/xhtml">
<head><title>Otsikko</title><style>p { color: red }</style></head>
<body>
  <div class="navheader"><table><tr><th>Edellinen</th></tr></table><hr /></div>
  <script>var x = "<p>ei tekstiä</p>";</script>
  <h2 class="title">1. Värit &amp; sävyt</h2>
  <p>Tämä    on
     kappale: &auml;&ouml;&aring; &Auml;&Ouml;&Aring; &#228; &lt;tag&gt; &nbsp;x</p>
  <div class="toc"><dl><dt>1. Värit</dt><div/></dl></div>
  <p>Toinen<br/>rivi, <b>lihava</b> ja <a href="x.html">linkki</a>.</p>
  <pre>(define (f x)
    (* x 2))</pre>
  <img src="a.png" alt="[Huomaa]" />
  <div class="navfooter"><a href="index.html">Alkuun</a></div>
</body></html>
"""


def test_html_to_text_handmade_page():
    text = html_to_text(PAGE)
    assert text == (
        "1. Värit & sävyt\n\n"
        "Tämä on kappale: äöå ÄÖÅ ä <tag> x\n\n"
        "Toinen\nrivi, lihava ja linkki.\n\n"
        "(define (f x)\n    (* x 2))"
    )


def test_html_to_text_plain_html():
    # HTML (not XHTML): unclosed <p>, bare <br>, upper-case tags, a skipped div left open.
    html = "<P>Yksi<br>kaksi<p>Kolme &copy; 2024<DIV class='navfooter'><p>nav"
    assert html_to_text(html) == "Yksi\nkaksi\n\nKolme © 2024"


def _write_pages(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    body = "<p>" + "Tämä on suomenkielinen kappale, jossa on ääkkösiä. " * 5 + "</p>"
    (root / "b.html").write_text(f"<html><body><h1>B</h1>{body}</body></html>", "utf-8")
    (root / "a.html").write_text(f"<html><body><h1>A</h1>{body}</body></html>", "utf-8")
    (root / "sub" / "c.html").write_text("<html><body><p>lyhyt</p></body></html>", "utf-8")
    (root / "style.css").write_text("p {}", "utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_build_sorted_filtered_and_repeat(tmp_path):
    _write_pages(tmp_path / "in")
    out = tmp_path / "out.jsonl"
    stats = build_html_corpus(
        HtmlCorpusConfig(input_dir=str(tmp_path / "in"), output=str(out), min_chars=50, repeat=3)
    )
    docs = _read_jsonl(out)
    assert [d["source"] for d in docs] == ["a.html", "b.html"] * 3  # sorted; short page dropped
    assert docs[0]["text"].startswith("A\n\nTämä on suomenkielinen")
    assert (stats.documents, stats.pages_read) == (2, 3)
    assert not list(tmp_path.glob(".out.jsonl.tmp-*"))  # temp file renamed away

    build_html_corpus(
        HtmlCorpusConfig(input_dir=str(tmp_path / "in"), output=str(out), min_chars=0)
    )
    assert [d["source"] for d in _read_jsonl(out)] == ["a.html", "b.html", "sub/c.html"]


def test_missing_input_dir(tmp_path):
    config = HtmlCorpusConfig(input_dir=str(tmp_path / "nope"), output=str(tmp_path / "o.jsonl"))
    with pytest.raises(UserError, match="nope: input directory not found"):
        build_html_corpus(config)
    assert not (tmp_path / "o.jsonl").exists()


def test_tool_missing_dir_exit_code(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--input-dir",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path / "o.jsonl"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "input directory not found" in proc.stderr


@needs_gimp_help
def test_gimp_help_fi_deterministic_gzip_and_repeat(tmp_path):
    # A 5% slice of the manual keeps the test fast; the slice itself is deterministic.
    outs = []
    for name, repeat in (("a.jsonl.gz", 1), ("b.jsonl.gz", 1), ("c.jsonl.gz", 2)):
        out = tmp_path / name
        args = ["--output", str(out), "--fraction", "0.05", "--repeat", str(repeat)]
        proc = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()  # byte-identical, gzip header included
    docs = _read_jsonl(outs[0])
    assert len(docs) >= 10
    assert _read_jsonl(outs[2]) == docs * 2
    assert [d["source"] for d in docs] == sorted(d["source"] for d in docs)
    text = "\n\n".join(d["text"] for d in docs)
    assert "ä" in text and "ö" in text
    assert "Edellinen" not in text and "Report a bug" not in text  # navigation dropped


def test_bundled_sample_is_mostly_finnish():
    docs = _read_jsonl(sample_corpus_path())
    assert 150 <= len(docs) <= 400
    chars = sum(len(d["text"]) for d in docs)
    assert 300_000 <= chars <= 600_000
    assert all(finnish_ratio(d["text"]) >= 0.5 for d in docs)
    assert all(set(d) == {"text", "source"} and d["source"].endswith(".html") for d in docs)


def test_finnish_ratio():
    assert finnish_ratio("Tämä on kuva, jossa ei ole värejä.") == 1.0
    assert finnish_ratio("This is the image of the tool.") == 0.0
    assert finnish_ratio("Tämä on kuva.\n\nThis is the image of the day.") == pytest.approx(
        13 / (13 + 29)
    )
