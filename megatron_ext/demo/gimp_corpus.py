"""Readable text from HTML manuals, written as JSON Lines; and the bundled Finnish demo corpus.

Made for the Finnish GIMP manual (Debian package `gimp-help-fi`, DocBook XSL output), but the
extractor is generic: it drops `<head>`, scripts, styles, the DocBook navigation header and
footer and the tables of contents, keeps one paragraph per block element (separated by
"\\n\\n") and collapses other whitespace. `<pre>` keeps its line breaks.

One output line per page: `{"text": ..., "source": "<path relative to the input dir>"}`,
pages in sorted path order, so the same input gives byte-identical output (gzip included).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

DEFAULT_INPUT_DIR = "/usr/share/gimp/2.0/help/fi"
SAMPLE_CORPUS = "fi_gimp_sample.jsonl.gz"

# Subtrees whose text is never content.
_SKIP_TAGS = frozenset({"head", "script", "style", "noscript", "template", "svg", "object"})
# DocBook XSL wrappers for navigation and generated lists of links.
_SKIP_CLASSES = frozenset(
    "navheader navfooter toc list-of-figures list-of-tables list-of-examples reportbug".split()
)
_BLOCK_TAGS = frozenset(
    "address article aside blockquote caption dd div dl dt figcaption figure footer form "
    "h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section table tbody td tfoot th thead "
    "tr ul body html title".split()
)
_VOID_TAGS = frozenset(
    "area base br col embed hr img input link meta param source track wbr".split()
)
_PARA = "\x00"  # paragraph break marker (never in extracted text: NULs are dropped)
_LINE = "\x01"  # line break marker (<br>, lines of <pre>)
_KEPT_SPACE = "\x02"  # a space inside <pre>, exempt from collapsing
_SPACES = re.compile(r"[^\S\x00\x01]+")

# Frequent words that tell Finnish from English in this manual's partly translated pages.
_FI_WORDS = frozenset(
    "ja on tai ei se sen ne niin kun jos kuin että joka jotka voi voit voidaan myös tämä tämän "
    "nämä ovat ole olla oli mutta kanssa sekä tässä siitä sitä mitä mikä kuva kuvan kuvaa "
    "valitse valinnan työkalu työkalun ikkuna ikkunan tason kohdassa avulla".split()
)
_EN_WORDS = frozenset(
    "the and is of to a in you this for with can are be it that by on as or an if from your "
    "which will not when use".split()
)
_WORD = re.compile(r"[^\W\d_]+")


class _TextExtractor(HTMLParser):
    """Collects text with paragraph/line markers; `text()` normalises whitespace."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._parts: list[str] = []
        self._skip_tag: str | None = None  # tag of the outermost skipped element
        self._skip_depth = 0
        self._pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag and tag not in _VOID_TAGS:
                self._skip_depth += 1
            return
        classes = set((dict(attrs).get("class") or "").split())
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES:
            if tag not in _VOID_TAGS:
                self._skip_tag, self._skip_depth = tag, 1
            return
        if tag == "br":
            self._parts.append(_LINE)
        elif tag in _BLOCK_TAGS:
            self._parts.append(_PARA)
        if tag == "pre":
            self._pre_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag in _BLOCK_TAGS:
            self._parts.append(_PARA)
        if tag == "pre" and self._pre_depth:
            self._pre_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._skip_tag is not None:
            return
        data = data.replace(_PARA, "").replace(_LINE, "").replace(_KEPT_SPACE, "")
        if self._pre_depth:  # keep code layout: line breaks and indentation
            data = data.replace("\r\n", "\n").replace("\n", _LINE)
            data = data.replace("\t", "    ").replace(" ", _KEPT_SPACE)
        self._parts.append(data)

    def text(self) -> str:
        paragraphs = []
        for block in "".join(self._parts).split(_PARA):
            lines = [
                _SPACES.sub(" ", line).strip().replace(_KEPT_SPACE, " ").rstrip()
                for line in block.split(_LINE)
            ]
            para = "\n".join(line for line in lines if line)
            if para:
                paragraphs.append(para)
        return "\n\n".join(paragraphs)


def html_to_text(html: str) -> str:
    """Readable text of one HTML page: paragraphs joined by "\\n\\n", entities decoded."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()


def finnish_ratio(text: str) -> float:
    """Share of `text` (0.0 to 1.0, by characters) in paragraphs that look Finnish.

    A paragraph looks Finnish when its Finnish marker words (frequent short words, and words
    with ä/ö) outnumber its English ones; paragraphs with neither are not counted. A cheap
    check for the partly untranslated manual, not a language identifier.
    """
    fi_chars = en_chars = 0
    for para in text.split("\n\n"):
        fi = en = 0
        for word in _WORD.findall(para.lower()):
            if word in _FI_WORDS or "ä" in word or "ö" in word:
                fi += 1
            elif word in _EN_WORDS:
                en += 1
        if fi > en:
            fi_chars += len(para)
        elif en > fi:
            en_chars += len(para)
    return fi_chars / (fi_chars + en_chars) if fi_chars + en_chars else 0.0


@dataclass
class HtmlCorpusConfig:
    """What `build_html_corpus` reads and keeps.

    `fraction` keeps a deterministic pseudo-random share of pages (by a hash of the relative
    path), `max_chars` stops once that much text is kept (pages in sorted order), and
    `min_finnish` drops pages whose `finnish_ratio` is lower.
    """

    input_dir: str = DEFAULT_INPUT_DIR
    output: str = "gimp_help_fi.jsonl.gz"
    repeat: int = 1
    min_chars: int = 200
    min_finnish: float = 0.0
    fraction: float = 1.0
    max_chars: int | None = None

    def validate(self) -> None:
        if self.repeat < 1:
            raise UserError(f"--repeat must be at least 1, got {self.repeat}")
        if not 0.0 < self.fraction <= 1.0:
            raise UserError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not self.output.endswith((".jsonl", ".jsonl.gz")):
            raise UserError(f"{self.output}: output name must end in .jsonl or .jsonl.gz")


@dataclass
class CorpusStats:
    pages_read: int = 0
    documents: int = 0  # kept pages (each written `repeat` times)
    chars: int = 0  # characters of text in the kept pages, one copy
    bytes_written: int = 0


def html_files(input_dir: str | os.PathLike) -> list[Path]:
    """All `.html`/`.htm` files under `input_dir`, sorted by relative path."""
    root = Path(input_dir)
    if not root.is_dir():
        raise UserError(
            f"{root}: input directory not found (install Debian's gimp-help-fi, "
            "or pass --input-dir with a directory of HTML files)"
        )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".html", ".htm"))
    if not files:
        raise UserError(f"{root}: no .html files in this directory")
    return files


def _keep_by_hash(source: str, fraction: float) -> bool:
    digest = hashlib.sha1(source.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def iter_html_documents(
    config: HtmlCorpusConfig, stats: CorpusStats | None = None
) -> Iterator[dict[str, str]]:
    """Yield `{"text", "source"}` per kept page, in sorted path order."""
    stats = stats if stats is not None else CorpusStats()
    root = Path(config.input_dir)
    for path in html_files(root):
        source = path.relative_to(root).as_posix()
        if config.fraction < 1.0 and not _keep_by_hash(source, config.fraction):
            continue
        stats.pages_read += 1
        try:
            text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror})") from None
        if len(text) < config.min_chars or finnish_ratio(text) < config.min_finnish:
            continue
        if config.max_chars is not None and stats.chars + len(text) > config.max_chars:
            break
        stats.documents += 1
        stats.chars += len(text)
        yield {"text": text, "source": source}


def write_jsonl_atomic(records: Iterable[dict], output: str | os.PathLike, repeat: int = 1) -> int:
    """Write `records` (materialised once) `repeat` times as JSON Lines; returns bytes written.

    `.gz` output is gzip with a zero timestamp and no file name, so bytes are reproducible.
    The file appears under its name only when complete (temp name + rename).
    """
    out = Path(output)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as raw:
            if out.name.endswith(".gz"):
                stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
            else:
                stream = raw
            with io.TextIOWrapper(stream, encoding="utf-8", newline="\n") as f:
                for _ in range(repeat):
                    f.writelines(lines)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{out}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out.stat().st_size


def build_html_corpus(config: HtmlCorpusConfig) -> CorpusStats:
    """Extract the pages of `config.input_dir` and write `config.output` atomically."""
    config.validate()
    stats = CorpusStats()
    docs = list(iter_html_documents(config, stats))
    if not docs:
        raise UserError(f"{config.input_dir}: no page passed the filters (--min-chars etc.)")
    stats.bytes_written = write_jsonl_atomic(docs, config.output, config.repeat)
    log.debug(
        "%s: %d of %d pages, %d chars x%d, %d bytes",
        config.output,
        stats.documents,
        stats.pages_read,
        stats.chars,
        config.repeat,
        stats.bytes_written,
    )
    return stats


def sample_corpus_path() -> Path:
    """Path of the bundled Finnish demo corpus (`.jsonl.gz`; see megatron_ext/assets/README.md)."""
    ref = resources.files("megatron_ext").joinpath("assets", SAMPLE_CORPUS)
    path = Path(str(ref))
    if not path.is_file():
        raise UserError(f"{path}: bundled sample corpus missing (reinstall megatron-ext)")
    return path


def add_arguments(parser) -> None:
    """Flags of `tools/gimp_help_to_jsonl.py` (CLI-module convention of megatron_ext.cli)."""
    parser.add_argument(
        "--input-dir",
        default=DEFAULT_INPUT_DIR,
        help="directory of HTML pages (default: %(default)s)",
    )
    parser.add_argument("--output", required=True, help="output file, .jsonl or .jsonl.gz")
    parser.add_argument(
        "--repeat", type=int, default=1, help="write the corpus K times (benchmark sizes)"
    )
    parser.add_argument(
        "--min-chars",
        type=int,
        default=200,
        help="drop pages with less text than this (default: %(default)s)",
    )
    parser.add_argument(
        "--min-finnish",
        type=float,
        default=0.0,
        help="drop pages whose Finnish share (0-1) is lower (default: keep all)",
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="keep this deterministic share of pages, chosen by path hash",
    )
    parser.add_argument(
        "--max-chars", type=int, default=None, help="stop after this many characters of kept text"
    )


def run(args) -> int:
    config = HtmlCorpusConfig(
        input_dir=args.input_dir,
        output=args.output,
        repeat=args.repeat,
        min_chars=args.min_chars,
        min_finnish=args.min_finnish,
        fraction=args.fraction,
        max_chars=args.max_chars,
    )
    stats = build_html_corpus(config)
    print(
        f"wrote {config.output}: {stats.documents} documents x{config.repeat} "
        f"({stats.chars} chars each copy, {stats.bytes_written} bytes)"
    )
    return 0
