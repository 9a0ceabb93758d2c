"""Cleaning building blocks: text normalization and document filters.

What's inside, in pipeline order:

    normalize(text)       Unicode NFC, control characters, whitespace (idempotent)
    split_words(text)     the fast, Unicode-aware word splitter the filters share
    LengthFilter          min/max characters
    QualityFilter         Gopher "quality" heuristics (Rae et al. 2021, appendix A.1.1)
    RepetitionFilter      Gopher repetition heuristics (same appendix, table A1)
    LanguageFilter        offline language identification with lingua (models ship in the wheel)
    build_filter(spec)    {"name": "quality", ...thresholds} -> filter, for YAML recipes

Every filter is a dataclass whose fields are its thresholds, and has one method,
``check(doc) -> str | None``: None keeps the document, a short string such as
"quality:mean_word_length" says why it is dropped. ``doc`` is a data_prep.readers.Document
or anything with a ``.text``, or a plain string. Filters expect normalized text.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

# ----------------------------------------------------------------------------------------------
# Normalization

# Line breaks in all their forms (CR, VT, FF, NEL, U+2028/2029) become "\n".
_NEWLINES = "\r\x0b\x0c\x85\u2028\u2029"
# Invisible characters that only get in the way: soft hyphen (splits words: "in\u00adformation"),
# zero-width space, word joiner, byte-order mark. ZWJ/ZWNJ (U+200C/D) are kept: emoji
# sequences and several scripts (Persian, Indic) need them.
_INVISIBLE = "\u00ad\u200b\u2060\ufeff"
# Every Unicode space separator (category Zs), including NO-BREAK SPACE U+00A0 and the
# NARROW NO-BREAK SPACE U+202F of French typography ("Bonjour\u202f!", "«\u00a0oui\u00a0»").
_SPACES = "\u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u202f\u205f\u3000"
_CONTROLS = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t" + _NEWLINES]

# Three regex substitutions: ~4x faster than str.translate on non-ASCII text.
_NEWLINE_RE = re.compile(f"[{re.escape(_NEWLINES)}]")
_REMOVE_RE = re.compile(f"[{re.escape(''.join(_CONTROLS) + _INVISIBLE)}]")
_SPACE_RE = re.compile(f"[{re.escape(_SPACES)}]")
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINE_RUNS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """Return a canonical form of ``text``; normalize(normalize(x)) == normalize(x).

    1. Line breaks -> "\\n"; control characters other than "\\n" and "\\t" are removed,
       and so are a few invisible format characters (see _INVISIBLE).
    2. All space separators become a plain space, the French no-break spaces included.
       The spaces themselves are kept ("Bonjour !", "« oui »"), only their kind is unified:
       web text mixes U+0020, U+00A0 and U+202F at random for the same typography, and keeping
       three spellings of " :" would fragment the tokenizer's merges and blind the dedup hashes.
    3. Trailing spaces/tabs on every line are removed, runs of blank lines become a single blank
       line (a paragraph break), and the whole text is stripped. Spaces inside a line and the
       indentation at the start of a line are kept: code and tables need them.
    4. Unicode NFC, last, so that nothing removed above (a soft hyphen between a letter and
       its accent) can leave a composable pair behind.
    """
    text = _NEWLINE_RE.sub("\n", text.replace("\r\n", "\n"))
    text = _SPACE_RE.sub(" ", _REMOVE_RE.sub("", text))
    text = _TRAILING_WS.sub("", text)
    text = _BLANK_LINE_RUNS.sub("\n\n", text).strip()
    return unicodedata.normalize("NFC", text)


# ----------------------------------------------------------------------------------------------
# Words

# A word is a run of letters/digits (\w is Unicode-aware), possibly with inner apostrophes
# ("don't", "aujourd'hui"). A French elision ("l'", "d'", "qu'", "jusqu'", ...) in front of a
# word is split off as its own word: "l'homme" -> ["l'", "homme"], "qu'il" -> ["qu'", "il"], so
# that "homme" counts as a word of length 5, not "l'homme" of length 7. Hyphens separate words.
_WORD_RE = re.compile(r"\b(?i:[cdjlmnst]|qu|jusqu|lorsqu|puisqu|quoiqu)['’](?=\w)|\w+(?:['’]\w+)*")


def split_words(text: str) -> list[str]:
    """Split text into words (see _WORD_RE); punctuation and symbols are not words."""
    return _WORD_RE.findall(text)


def _text_of(doc: Any) -> str:
    """Filters accept a Document (anything with .text) or a plain string."""
    return doc if isinstance(doc, str) else doc.text


class DocFilter:
    """Base class: ``check(doc)`` returns None to keep ``doc``, or a reason string to drop it.

    A reason starts with the filter's ``name`` and a colon ("quality:stop_words"): the report
    counts removals per filter by that prefix."""

    name: ClassVar[str] = "base"

    def check(self, doc: Any) -> str | None:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Length


@dataclass(frozen=True)
class LengthFilter(DocFilter):
    """Drop documents shorter or longer than a number of characters (after normalization)."""

    min_chars: int = 200
    """Fewer characters than this: too short to teach anything (menus, captions, stubs)."""
    max_chars: int = 1_000_000
    """More characters than this: usually dumps, logs or concatenated files."""

    name: ClassVar[str] = "length"

    def check(self, doc: Any) -> str | None:
        n = len(_text_of(doc))
        if n < self.min_chars:
            return "length:too_short"
        if n > self.max_chars:
            return "length:too_long"
        return None


# ----------------------------------------------------------------------------------------------
# Gopher quality rules

# Gopher's English stop words, verbatim from the paper ("be" and "have" as written: lemmas, matched
# literally). For French, the same idea: a dozen of the most frequent French function words
# (articles, prepositions, conjunctions, "est") that any running French prose contains and that
# are rare or absent in English, so a French list cannot be satisfied by English text and
# vice versa ("a", "on", "as" are left out for that reason). Elisions ("l'", "d'") are not in
# the list: the full forms are frequent enough.
STOP_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset({"the", "be", "to", "of", "and", "that", "have", "with"}),
    "fr": frozenset({"le", "la", "les", "de", "des", "du", "et", "un", "une", "est", "en", "que"}),
}
# Dashes (– —) are not bullets here: a French dialogue line starts with one ("— Oui, dit-il.").
_BULLETS = ("-", "*", "•", "‣", "⁃", "◦", "▪", "▫", "●", "○", "■", "□", "➢", "►", "→")
_ELLIPSES = ("...", "…")
_LETTER_RE = re.compile(r"[^\W\d_]")  # a letter: a word character that is neither a digit nor "_"


@dataclass(frozen=True)
class QualityFilter(DocFilter):
    """Gopher's quality heuristics (Rae et al. 2021, appendix A.1.1, "quality filters")."""

    min_words: int = 50
    """Gopher: keep documents with 50 to 100,000 words."""
    max_words: int = 100_000
    """Upper bound on the word count (see min_words)."""
    min_mean_word_length: float = 3.0
    """Gopher: mean word length between 3 and 10 characters (catches symbol soup, URLs, hashes)."""
    max_mean_word_length: float = 10.0
    """Upper bound on the mean word length (see min_mean_word_length)."""
    max_symbol_word_ratio: float = 0.1
    """Gopher: drop if '#' count / words > 0.1, or ellipsis ('...' or '…') count / words > 0.1."""
    max_bullet_lines_fraction: float = 0.9
    """Gopher: drop if more than 90% of the non-empty lines start with a bullet point."""
    max_ellipsis_lines_fraction: float = 0.3
    """Gopher: drop if more than 30% of the non-empty lines end with an ellipsis (truncated
    teasers)."""
    min_alpha_words_fraction: float = 0.8
    """Gopher: at least 80% of the words contain an alphabetic character. Here "words" are
    whitespace-separated tokens, as in the paper, so that standalone symbols ("|", "==", "12.5")
    count against the document: split_words() would not see them at all."""
    min_stop_words: int = 2
    """Gopher: the document contains at least 2 of the stop words (distinct words, counted per
    language in ``languages``; the best language counts)."""
    languages: tuple[str, ...] = ("en", "fr")
    """Which stop-word lists to use (keys of STOP_WORDS)."""

    name: ClassVar[str] = "quality"

    def __post_init__(self) -> None:
        object.__setattr__(self, "languages", tuple(self.languages))  # YAML gives lists
        unknown = set(self.languages) - STOP_WORDS.keys()
        if unknown:
            raise ValueError(f"no stop-word list for {sorted(unknown)}; have {sorted(STOP_WORDS)}")

    def check(self, doc: Any) -> str | None:
        text = _text_of(doc)
        words = split_words(text)
        n_words = len(words)
        if not self.min_words <= n_words <= self.max_words or n_words == 0:
            return "quality:word_count"
        mean_length = sum(map(len, words)) / n_words
        if not self.min_mean_word_length <= mean_length <= self.max_mean_word_length:
            return "quality:mean_word_length"
        n_hash, n_ellipsis = text.count("#"), text.count("...") + text.count("…")
        if max(n_hash, n_ellipsis) / n_words > self.max_symbol_word_ratio:
            return "quality:symbol_word_ratio"
        lines = [line.strip() for line in text.split("\n")]
        lines = [line for line in lines if line]
        if sum(line.startswith(_BULLETS) for line in lines) > self.max_bullet_lines_fraction * len(
            lines
        ):
            return "quality:bullet_lines"
        if sum(line.endswith(_ELLIPSES) for line in lines) > self.max_ellipsis_lines_fraction * len(
            lines
        ):
            return "quality:ellipsis_lines"
        tokens = text.split()
        n_alpha = sum(1 for token in tokens if _LETTER_RE.search(token))
        if n_alpha < self.min_alpha_words_fraction * len(tokens):
            return "quality:alpha_words"
        lowered = {w.lower() for w in words}
        if max(len(STOP_WORDS[lang] & lowered) for lang in self.languages) < self.min_stop_words:
            return "quality:stop_words"
        return None


# ----------------------------------------------------------------------------------------------
# Gopher repetition rules


def _duplicate_stats(items: list[str]) -> tuple[int, int]:
    """(number of items, number of characters) in items that repeat an earlier item.

    The first occurrence is the original; only the later copies count as duplicates, i.e. what
    deduplicating the items inside the document would remove.
    """
    seen: set[str] = set()
    n_dup = chars_dup = 0
    for item in items:
        if item in seen:
            n_dup += 1
            chars_dup += len(item)
        else:
            seen.add(item)
    return n_dup, chars_dup


def _covered_chars(starts: np.ndarray, n: int, word_lengths: np.ndarray) -> int:
    """Characters in the words covered by the n-grams starting at ``starts``, each word once.

    A difference array marks [start, start + n) for every start; overlapping n-grams ("a a a a")
    therefore do not count a word twice, as the paper asks.
    """
    diff = np.bincount(starts, minlength=len(word_lengths) + 1)
    diff -= np.bincount(starts + n, minlength=len(word_lengths) + 1)
    covered = np.cumsum(diff[:-1]) > 0
    return int(word_lengths[covered].sum())


@dataclass(frozen=True)
class RepetitionFilter(DocFilter):
    """Gopher's repetition heuristics (Rae et al. 2021, appendix A.1.1 and table A1).

    Text that repeats itself (boilerplate, spam, generated pages) is dropped. Lines are the
    non-empty lines; paragraphs are separated by blank lines. N-grams are n consecutive words of
    split_words(); their "characters" are the characters of their words, and the fractions
    divide by all word characters of the document.
    """

    max_dup_line_fraction: float = 0.30
    """Fraction of (non-empty) lines that repeat an earlier line."""
    max_dup_paragraph_fraction: float = 0.30
    """Fraction of paragraphs that repeat an earlier paragraph."""
    max_dup_line_char_fraction: float = 0.20
    """Characters in repeated lines / characters in all lines."""
    max_dup_paragraph_char_fraction: float = 0.20
    """Characters in repeated paragraphs / characters in all paragraphs."""
    max_top_ngram_char_fraction: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    """(n, limit): characters covered by all occurrences of the most frequent n-gram (if it occurs
    at least twice). Short n-grams: a single phrase hammered over and over ("click here")."""
    max_dup_ngram_char_fraction: tuple[tuple[int, float], ...] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10),
    )  # fmt: skip
    """(n, limit): characters covered by n-grams that repeat an earlier n-gram, overlapping words
    counted once. Long n-grams: repeated passages, even with small edits around them."""

    name: ClassVar[str] = "repetition"

    def __post_init__(self) -> None:  # YAML gives lists of lists
        for attr in ("max_top_ngram_char_fraction", "max_dup_ngram_char_fraction"):
            object.__setattr__(
                self, attr, tuple((int(n), float(f)) for n, f in getattr(self, attr))
            )

    def check(self, doc: Any) -> str | None:
        text = _text_of(doc)
        lines = [line for line in text.split("\n") if line.strip()]
        if lines:
            n_dup, chars_dup = _duplicate_stats(lines)
            if n_dup > self.max_dup_line_fraction * len(lines):
                return "repetition:dup_lines"
            if chars_dup > self.max_dup_line_char_fraction * sum(map(len, lines)):
                return "repetition:dup_line_chars"
        paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
        if paragraphs:
            n_dup, chars_dup = _duplicate_stats(paragraphs)
            if n_dup > self.max_dup_paragraph_fraction * len(paragraphs):
                return "repetition:dup_paragraphs"
            if chars_dup > self.max_dup_paragraph_char_fraction * sum(map(len, paragraphs)):
                return "repetition:dup_paragraph_chars"
        return self._check_ngrams(split_words(text))

    def _check_ngrams(self, words: list[str]) -> str | None:
        top_limits, dup_limits = (
            dict(self.max_top_ngram_char_fraction),
            dict(self.max_dup_ngram_char_fraction),
        )
        max_n = max([*top_limits, *dup_limits], default=0)
        if len(words) < 2 or max_n < 2:
            return None
        word_lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        total_chars = int(word_lengths.sum())
        # Exact n-gram ids without hashing: a word gets a dense id; an n-gram is the pair
        # ((n-1)-gram id, id of its last word), which np.unique turns into a dense id again.
        vocab: dict[str, int] = {}
        ids = np.fromiter(
            (vocab.setdefault(w, len(vocab)) for w in words), dtype=np.int64, count=len(words)
        )
        gram_ids = ids
        for n in range(2, min(max_n, len(words)) + 1):
            pairs = gram_ids[:-1] * len(vocab) + ids[n - 1 :]
            _, first_index, gram_ids = np.unique(pairs, return_index=True, return_inverse=True)
            if n in top_limits:
                counts = np.bincount(gram_ids)
                top = int(np.argmax(counts))  # ties: the smallest id, i.e. deterministic
                if counts[top] >= 2:
                    chars = _covered_chars(np.flatnonzero(gram_ids == top), n, word_lengths)
                    if chars > top_limits[n] * total_chars:
                        return f"repetition:top_{n}gram"
            if n in dup_limits:
                repeats = np.flatnonzero(first_index[gram_ids] != np.arange(len(gram_ids)))
                if (
                    len(repeats)
                    and _covered_chars(repeats, n, word_lengths) > dup_limits[n] * total_chars
                ):
                    return f"repetition:dup_{n}gram"
        return None


# ----------------------------------------------------------------------------------------------
# Language identification


@functools.cache
def _lingua_detector(candidates: tuple[str, ...]) -> Any:
    """One lingua detector per process and candidate set (loading its models takes ~1 s)."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder  # heavy (~96 MB of models): lazy

    codes = [getattr(IsoCode639_1, code.upper()) for code in candidates]
    return (
        LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
        .with_preloaded_language_models()
        .build()
    )


@dataclass
class LanguageFilter(DocFilter):
    """Keep documents whose language is in ``languages``, identified offline by lingua.

    lingua-language-detector ships its n-gram models inside the wheel: nothing is downloaded
    at run time. Its confidences are relative to the candidate languages (they sum to 1), so
    the candidate set includes common confusers besides the languages kept: with only
    ("en", "fr") a German text would be called English or French with high confidence.
    """

    languages: tuple[str, ...] = ("en", "fr")
    """ISO 639-1 codes of the languages to keep."""
    min_confidence: float = 0.65
    """Keep only if lingua's confidence for the top language is at least this."""
    detect_on_chars: int = 2000
    """Identify on this prefix of the text: enough for lingua, and bounds the cost of long docs."""
    candidates: tuple[str, ...] = ("en", "fr", "de", "es", "it", "pt", "nl")
    """Languages lingua chooses among (``languages`` are always added)."""

    name: ClassVar[str] = "language"
    _detector: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.languages = tuple(self.languages)
        self.candidates = tuple(sorted(set(self.candidates) | set(self.languages)))
        self._detector = _lingua_detector(self.candidates)

    def detect(self, text: str) -> tuple[str, float]:
        """(ISO 639-1 code, confidence) of the most likely candidate; ("unknown", 0.0) if none."""
        confidences = self._detector.compute_language_confidence_values(
            text[: self.detect_on_chars]
        )
        if not confidences or confidences[0].value == 0.0:  # no letters at all
            return "unknown", 0.0
        top = confidences[0]
        return top.language.iso_code_639_1.name.lower(), top.value

    def check(self, doc: Any) -> str | None:
        language, confidence = self.detect(_text_of(doc))
        if language not in self.languages:
            return f"language:{language}"
        if confidence < self.min_confidence:
            return f"language:{language}:low_confidence"
        return None


# ----------------------------------------------------------------------------------------------
# Recipes

FILTERS: dict[str, type[DocFilter]] = {
    f.name: f for f in (LengthFilter, QualityFilter, RepetitionFilter, LanguageFilter)
}


def build_filter(spec: dict[str, Any]) -> DocFilter:
    """Build a filter from a recipe entry, e.g. {"name": "quality", "min_words": 30}."""
    spec = dict(spec)
    name = spec.pop("name")
    if name not in FILTERS:
        raise ValueError(f"unknown filter {name!r}; known: {sorted(FILTERS)}")
    return FILTERS[name](**spec)


def first_rejection(filters: list[DocFilter], doc: Any) -> str | None:
    """Run filters in order (put the cheap ones first); the first reason found, or None to keep."""
    for f in filters:
        reason = f.check(doc)
        if reason is not None:
            return reason
    return None
