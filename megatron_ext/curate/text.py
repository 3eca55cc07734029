"""Per-document steps: normalisation, quality rules, language score and PII masking. Each is a
pure function of one document's text (workers may run them in any order)."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter

WORD = re.compile(r"\w+(?:[-'’]\w+)*", re.UNICODE)
BULLET = re.compile(r"^\s*[-*•·–▪●◦]\s")


def normalise(text: str, cfg) -> str:
    if cfg.fix_mojibake and _has_mojibake(text):
        import ftfy

        # its other defaults would change clean text (curly quotes made straight in 77% of the
        # manual's pages: benchmarks/results/curate_libraries.md)
        text = ftfy.fix_text(text, normalization="NFC" if cfg.nfc else None, uncurl_quotes=False)
    elif cfg.nfc:
        text = unicodedata.normalize("NFC", text)
    if cfg.whitespace:
        lines = [line.rstrip() for line in text.strip().split("\n")]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text


def _has_mojibake(text: str) -> bool:
    """ftfy's own test for text that needs repair (2-4x faster than repairing every text)."""
    from ftfy.badness import is_bad

    return is_bad(text)


def words(text: str) -> list[str]:
    return WORD.findall(text)


def quality_problem(text: str, cfg) -> str | None:
    """The first Gopher/C4 rule TEXT breaks (a reason for the report), or None."""
    ws = words(text)
    n = len(ws)
    if n < cfg.min_words or n > cfg.max_words:
        return f"word count {n} outside [{cfg.min_words}, {cfg.max_words}]"
    mean = sum(len(w) for w in ws) / n
    if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
        return f"mean word length {mean:.1f}"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_ratio:
        return f"symbol-to-word ratio {symbols / n:.2f}"
    digits = sum(ch.isdigit() for ch in text)
    if digits / max(1, len(text)) > cfg.max_digit_ratio:
        return f"digit ratio {digits / len(text):.2f}"
    lines = [line for line in text.split("\n") if line.strip()]
    ellipsis = sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines)
    if ellipsis > cfg.max_ellipsis_lines:
        return f"lines ending in an ellipsis {ellipsis:.2f}"
    bullets = sum(bool(BULLET.match(line)) for line in lines) / len(lines)
    if bullets > cfg.max_bullet_lines:
        return f"bullet lines {bullets:.2f}"
    counts = Counter(line.strip() for line in lines)
    repeated = sum(c for c in counts.values() if c > 1) / len(lines)
    if repeated > cfg.max_duplicate_lines:
        return f"duplicate lines {repeated:.2f}"
    dup_chars = _duplicate_ngram_chars(ws, 5)
    if dup_chars > cfg.max_duplicate_ngram_chars:
        return f"characters in repeated 5-grams {dup_chars:.2f}"
    present = {w.lower() for w in ws} & set(cfg.function_words)
    if len(present) < cfg.min_function_words:
        return f"{len(present)} common function words (fewer than {cfg.min_function_words})"
    return None


def _duplicate_ngram_chars(ws: list[str], n: int) -> float:
    """Share of word characters inside word n-grams that occur more than once (Gopher)."""
    if len(ws) < n:
        return 0.0
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(ws)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    total = sum(len(w) for w in ws)
    return sum(len(w) for w, c in zip(ws, covered, strict=True) if c) / max(1, total)


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_score(text: str, language: str) -> tuple[str, float, float]:
    """(the most likely language, its probability, the probability of LANGUAGE)."""
    ident = _identifier()
    best, prob = ident.classify(text)
    if best == language:
        return best, float(prob), float(prob)
    ranked = dict(ident.rank(text))
    return best, float(prob), float(ranked.get(language, 0.0))


def paragraph_languages(text: str, min_chars: int = 200) -> set[str]:
    """The languages of TEXT's longer paragraphs (a document is mixed when there are two)."""
    ident = _identifier()
    return {ident.classify(p)[0] for p in text.split("\n\n") if len(p) >= min_chars}


# ---------------------------------------------------------------- PII

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
# Finnish: +358 or 0, an area/operator code, then 5-10 digits (spaces or dashes between groups);
# international: + and 8-15 digits
PHONE = re.compile(
    r"(?<![\w+])(?:\+358[ -]?\(?0?\)?[ -]?\d{1,3}|\(?0\d{1,3}\)?)(?:[ -]?\d){5,10}\b"
    r"|(?<![\w+])\+\d{1,3}(?:[ -]?\d){7,14}\b"
)
HETU = re.compile(r"\b(\d{2})(\d{2})(\d{2})([-+ABCDEFUVWXY])(\d{3})([0-9A-Y])\b")
HETU_CONTROL = "0123456789ABCDEFHJKLMNPRSTUVWXY"


def hetu_valid(match: re.Match) -> bool:
    """A henkilötunnus: a real day and month, and the control character of DDMMYYNNN mod 31."""
    dd, mm, yy, _, nnn, control = match.groups()
    if not (1 <= int(dd) <= 31 and 1 <= int(mm) <= 12) or nnn == "000":
        return False
    return HETU_CONTROL[int(dd + mm + yy + nnn) % 31] == control


def iban_valid(text: str) -> bool:
    """ISO 13616: the country and check digits moved to the end, letters as numbers, mod 97 = 1."""
    s = text.replace(" ", "")
    s = s[4:] + s[:4]
    digits = "".join(str(int(ch, 36)) for ch in s)
    return len(text.replace(" ", "")) >= 15 and int(digits) % 97 == 1


def _section_number(m: re.Match) -> bool:
    """ "5.11.3.1. Valinnat": a heading's number at a line start, not an IPv4 address."""
    before = m.string[: m.start()].rsplit("\n", 1)[-1]
    return not before.strip() and m.string[m.end() : m.end() + 2] == ". "


def mask_pii(text: str, cfg) -> tuple[str, Counter]:
    """TEXT with PII replaced by the placeholders; the counts by kind."""
    counts: Counter = Counter()

    def sub(kind: str, pattern: re.Pattern, placeholder: str, valid=None):
        nonlocal text

        def replace(m: re.Match) -> str:
            if valid is not None and not valid(m):
                return m.group(0)
            counts[kind] += 1
            return placeholder

        text = pattern.sub(replace, text)

    sub("email", EMAIL, cfg.email)
    sub("hetu", HETU, cfg.hetu, hetu_valid)
    sub("iban", IBAN, cfg.iban, lambda m: iban_valid(m.group(0)))
    sub("ip", IPV6, cfg.ip)
    sub("ip", IPV4, cfg.ip, lambda m: not _section_number(m))
    sub("phone", PHONE, cfg.phone)
    return text, counts
