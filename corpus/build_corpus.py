#!/usr/bin/env python3
"""Rebuild the bundled demo corpus (corpus/en.jsonl.gz, corpus/fr.jsonl.gz).

Maintainer script: neither `make demo` nor the tests run it; they read the
committed .jsonl.gz files.  It needs only the Python standard library and
`dpkg-deb` (Debian/Ubuntu).

Inputs: these Debian 12 "bookworm" documentation packages (all openly licensed,
see corpus/README.md for the exact copyright statements):

    debian-handbook           11.20220922       (en-US and fr-FR HTML)
    debian-reference-en       2.100
    debian-reference-fr       2.100
    developers-reference      12.18
    developers-reference-fr   12.18
    maint-guide               1.2.53
    maint-guide-fr            1.2.53
    debian-faq                11.1
    debian-faq-fr             11.1
    installation-guide-amd64  20230508+deb12u1  (en and fr HTML)
    aptitude-doc-en           0.8.13-5
    aptitude-doc-fr           0.8.13-5
    debian-edu-doc-en         2.12.23~deb12u1   (bookworm manual only)
    debian-edu-doc-fr         2.12.23~deb12u1   (bookworm manual only)

Rebuild (from the repository root, on any Debian/Ubuntu machine that can
reach a bookworm mirror; nothing is installed system-wide):

    mkdir -p /tmp/corpus-debs
    (cd /tmp/corpus-debs && apt-get download \
        debian-handbook=11.20220922 \
        debian-reference-en=2.100 debian-reference-fr=2.100 \
        developers-reference=12.18 developers-reference-fr=12.18 \
        maint-guide=1.2.53 maint-guide-fr=1.2.53 \
        debian-faq=11.1 debian-faq-fr=11.1 \
        installation-guide-amd64=20230508+deb12u1 \
        aptitude-doc-en=0.8.13-5 aptitude-doc-fr=0.8.13-5 \
        debian-edu-doc-en=2.12.23~deb12u1 debian-edu-doc-fr=2.12.23~deb12u1)
    python3 corpus/build_corpus.py --debs /tmp/corpus-debs --out corpus

The script unpacks each .deb with `dpkg-deb -x` into a temporary directory
(nothing is installed), extracts plain text from the HTML pages with
`html.parser`, and writes one JSON object per line:

    {"id": "debian-handbook/fr/sect.apt-get", "lang": "fr",
     "source": "debian-handbook 11.20220922", "title": "...", "text": "..."}

Extraction rules: scripts, styles, navigation bars, tables of contents,
index terms, code listings (<pre>), tables, examples and figures (with their
captions) and images are dropped; headings, paragraphs and list items become
paragraphs separated by a blank line ("\n\n"); whitespace inside a paragraph
is collapsed to single spaces.  The French translations leave untranslated
paragraphs in English: paragraphs that a stopword count says are in the other
language are dropped, then headings left with no text under them.  A page is
one document; pages longer than MAX_CHARS are split at their section headings
(recursively, highest level first; the part's id gets "#<anchor>" of its
first heading, or "#part<N>" where the anchor is a generated one), and
fragments shorter than MERGE_CHARS are merged into the next part.  Documents
shorter than MIN_CHARS are dropped, identical texts are kept once, and whole
documents that still look like the other language are dropped.  The
installation guide's verbatim copy of the GNU GPL (appendix F) is skipped.

Determinism: inputs are processed in a fixed order (sources as listed below,
pages sorted by path), ids are derived from file names and section anchors,
and the gzip files are written with mtime=0 and no embedded file name, so a
rebuild from the same .deb versions is byte-identical.  With other package
versions the script stops unless --allow-other-versions is given.
"""

from __future__ import annotations

import argparse
import gzip
import html.parser
import io
import json
import re
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path

MAX_CHARS = 40_000  # split pages longer than this at section headings
MERGE_CHARS = 600  # sections shorter than this are merged into the next one
MIN_CHARS = 200  # drop documents shorter than this

# The installation guide's appendix F is the verbatim text of the GNU GPL: not
# prose of the guide itself, and the GPL text may not be modified, so skip it.
GPL_PAGES = ("apf.html",)

# (package, pinned version, lang, id prefix, directory inside the package,
#  file glob, file names to skip, stem suffix to strip from ids)
SOURCES = [
    (
        "debian-handbook",
        "11.20220922",
        "en",
        "debian-handbook",
        "usr/share/doc/debian-handbook/html/en-US",
        "*.html",
        (),
        ".html",
    ),
    (
        "debian-handbook",
        "11.20220922",
        "fr",
        "debian-handbook",
        "usr/share/doc/debian-handbook/html/fr-FR",
        "*.html",
        (),
        ".html",
    ),
    (
        "debian-reference-en",
        "2.100",
        "en",
        "debian-reference",
        "usr/share/debian-reference",
        "*.en.html",
        (),
        ".en.html",
    ),
    (
        "debian-reference-fr",
        "2.100",
        "fr",
        "debian-reference",
        "usr/share/debian-reference",
        "*.fr.html",
        (),
        ".fr.html",
    ),
    (
        "developers-reference",
        "12.18",
        "en",
        "developers-reference",
        "usr/share/developers-reference",
        "*.html",
        ("developers-reference.html", "search.html", "genindex.html"),
        ".html",
    ),
    (
        "developers-reference-fr",
        "12.18",
        "fr",
        "developers-reference",
        "usr/share/developers-reference/fr",
        "*.html",
        ("developers-reference.html", "search.html", "genindex.html"),
        ".html",
    ),
    (
        "maint-guide",
        "1.2.53",
        "en",
        "maint-guide",
        "usr/share/doc/maint-guide/html",
        "*.en.html",
        (),
        ".en.html",
    ),
    (
        "maint-guide-fr",
        "1.2.53",
        "fr",
        "maint-guide",
        "usr/share/doc/maint-guide-fr/html",
        "*.fr.html",
        (),
        ".fr.html",
    ),
    (
        "debian-faq",
        "11.1",
        "en",
        "debian-faq",
        "usr/share/doc/debian/FAQ",
        "*.en.html",
        (),
        ".en.html",
    ),
    (
        "debian-faq-fr",
        "11.1",
        "fr",
        "debian-faq",
        "usr/share/doc/debian/FAQ/fr",
        "*.fr.html",
        (),
        ".fr.html",
    ),
    (
        "installation-guide-amd64",
        "20230508+deb12u1",
        "en",
        "installation-guide",
        "usr/share/doc/installation-guide-amd64/en",
        "*.html",
        GPL_PAGES,
        ".html",
    ),
    (
        "installation-guide-amd64",
        "20230508+deb12u1",
        "fr",
        "installation-guide",
        "usr/share/doc/installation-guide-amd64/fr",
        "*.html",
        GPL_PAGES,
        ".html",
    ),
    (
        "aptitude-doc-en",
        "0.8.13-5",
        "en",
        "aptitude-doc",
        "usr/share/doc/aptitude/html/en",
        "*.html",
        (),
        ".html",
    ),
    (
        "aptitude-doc-fr",
        "0.8.13-5",
        "fr",
        "aptitude-doc",
        "usr/share/doc/aptitude/html/fr",
        "*.html",
        (),
        ".html",
    ),
    (
        "debian-edu-doc-en",
        "2.12.23~deb12u1",
        "en",
        "debian-edu-bookworm-manual",
        "usr/share/doc/debian-edu-doc-en",
        "debian-edu-bookworm-manual.html",
        (),
        ".html",
    ),
    (
        "debian-edu-doc-fr",
        "2.12.23~deb12u1",
        "fr",
        "debian-edu-bookworm-manual",
        "usr/share/doc/debian-edu-doc-fr",
        "debian-edu-bookworm-manual.html",
        (),
        ".html",
    ),
]

# Elements whose whole content is dropped.
SKIP_TAGS = {
    "script",
    "style",
    "head",
    "pre",
    "table",
    "img",
    "svg",
    "form",
    "nav",
    "header",
    "footer",
    "button",
    "select",
    "textarea",
    "object",
}
# Elements dropped when they carry one of these classes (or ids).
SKIP_CLASSES = {
    "toc",
    "list-of-tables",
    "list-of-examples",
    "list-of-figures",
    "list-of-procedures",
    "navheader",
    "navfooter",
    "docnav",
    "indexterm",
    "headerlink",
    "sphinxsidebar",
    "related",
    "footer",
    "mediaobject",
    "language_switcher_placeholder",
    "toctree-wrapper",
    "searchformwrapper",
    "highlight",
    "clearer",
    "index",
    "footnote-reference",
    # tables, code examples and figures, with their captions
    "table",
    "informaltable",
    "example",
    "informalexample",
    "figure",
}
SKIP_IDS = {"banner", "title", "searchbox"}
# Elements that start / end a paragraph.
BLOCK_TAGS = {
    "p",
    "div",
    "section",
    "article",
    "aside",
    "main",
    "body",
    "html",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "ul",
    "ol",
    "li",
    "dl",
    "dt",
    "dd",
    "blockquote",
    "figure",
    "figcaption",
    "caption",
    "hr",
    "br",
    "address",
    "center",
    "details",
    "summary",
    "title",
}
VOID_TAGS = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "param",
    "source",
    "track",
    "wbr",
}
# Headings inside these are titles of admonitions, not section headings.
ADMONITION_CLASSES = {"note", "tip", "warning", "caution", "important", "sidebar", "admonition"}
HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}


class Block:
    __slots__ = ("anchor", "level", "text")

    def __init__(self, text: str, level: int = 0, anchor: str | None = None):
        self.text = text
        self.level = level  # 0: paragraph, 1-6: section heading
        self.anchor = anchor


class TextExtractor(html.parser.HTMLParser):
    """HTML page -> list of Blocks (paragraphs and section headings)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool, str | None]] = []  # tag, skip, admonition, id
        self.skip = 0
        self.admon = 0
        self.buf: list[str] = []
        self.prefix = ""
        self.blocks: list[Block] = []
        self.heading: tuple[int, str | None] | None = None
        self.pending_anchor: str | None = None

    # -- helpers
    def flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
        self.buf = []
        if not text:
            return
        if self.heading is not None:
            level, anchor = self.heading
            self.blocks.append(Block(text, level, anchor))
        else:
            self.blocks.append(Block(self.prefix + text))
            self.prefix = ""

    def _open(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        el_id = a.get("id")
        skip = (
            tag in SKIP_TAGS
            or bool(classes & SKIP_CLASSES)
            or (el_id in SKIP_IDS)
            or a.get("role") == "navigation"
        )
        admon = bool(classes & ADMONITION_CLASSES)
        if tag in VOID_TAGS:
            if tag in ("br", "hr") and not self.skip:
                self.buf.append(" ")
            return
        if self.skip == 0 and tag in BLOCK_TAGS:
            self.flush()
        self.stack.append((tag, skip, admon, el_id))
        if skip:
            self.skip += 1
        if admon:
            self.admon += 1
        if self.skip:
            return
        if tag in ("section", "div") and el_id and "section" in (classes | {tag}):
            self.pending_anchor = el_id
        if tag in HEADINGS and self.admon == 0:
            self.heading = (HEADINGS[tag], el_id or self.pending_anchor)
            self.pending_anchor = None
        elif (
            tag == "a"
            and (el_id or a.get("name"))
            and self.heading is not None
            and self.heading[1] is None
        ):
            self.heading = (self.heading[0], el_id or a.get("name"))
        if tag == "li":
            self.prefix = "- "

    def handle_starttag(self, tag, attrs):
        self._open(tag, attrs)

    def handle_startendtag(self, tag, attrs):
        self._open(tag, attrs)
        if tag not in VOID_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in VOID_TAGS or not any(t == tag for t, *_ in self.stack):
            return
        while self.stack:
            t, skip, admon, _ = self.stack.pop()
            if self.skip == 0 and t in BLOCK_TAGS:
                self.flush()
            if skip:
                self.skip -= 1
            if admon:
                self.admon -= 1
            if t in HEADINGS and self.skip == 0:
                self.heading = None
            if t == tag:
                break

    def handle_data(self, data):
        if self.skip == 0:
            self.buf.append(data)

    def close(self):
        super().close()
        self.flush()


def extract_blocks(html_text: str) -> list[Block]:
    p = TextExtractor()
    p.feed(html_text)
    p.close()
    return p.blocks


def _len(blocks: list[Block]) -> int:
    return sum(len(b.text) + 2 for b in blocks)


def split_blocks(blocks: list[Block]) -> list[list[Block]]:
    """Split a page at its section headings until every part is <= MAX_CHARS."""
    if _len(blocks) <= MAX_CHARS:
        return [blocks]
    levels = sorted({b.level for b in blocks[1:] if b.level})
    if not levels:
        return [blocks]
    top = levels[0]
    parts: list[list[Block]] = [[]]
    for b in blocks:
        if b.level == top and parts[-1]:
            parts.append([])
        parts[-1].append(b)
    if len(parts) == 1:  # the only heading of that level is the first block
        head, rest = blocks[:1], blocks[1:]
        sub = split_blocks(rest) if rest else []
        return [head + sub[0]] + sub[1:] if sub else [head]
    out: list[list[Block]] = []
    for part in parts:
        out.extend(split_blocks(part))
    # merge short fragments (e.g. a heading with a one-line intro) forward
    merged: list[list[Block]] = []
    carry: list[Block] = []
    for part in out:
        part = carry + part
        if _len(part) < MERGE_CHARS:
            carry = part
        else:
            merged.append(part)
            carry = []
    if carry:
        if merged:
            merged[-1] = merged[-1] + carry
        else:
            merged.append(carry)
    return merged


EN_WORDS = frozenset(
    [
        "the",
        "and",
        "of",
        "to",
        "is",
        "in",
        "that",
        "for",
        "are",
        "with",
        "this",
        "be",
        "you",
        "can",
        "it",
        "as",
        "by",
        "not",
        "or",
        "from",
        "which",
        "your",
        "an",
        "if",
        "all",
        "have",
    ]
)
FR_LETTERS = re.compile("[éèêëàâçùûîïôœÉÈÊÀÇ«»]")
FR_WORDS = frozenset(
    [
        "le",
        "la",
        "les",
        "de",
        "des",
        "du",
        "et",
        "est",
        "un",
        "une",
        "que",
        "pour",
        "dans",
        "qui",
        "sur",
        "pas",
        "avec",
        "vous",
        "ce",
        "cette",
        "sont",
        "par",
        "au",
        "aux",
        "il",
        "ou",
        "peut",
    ]
)


def _votes(text: str) -> tuple[int, int]:
    words = re.findall(r"[a-zà-ÿ]+", text.lower())
    return sum(w in EN_WORDS for w in words), sum(w in FR_WORDS for w in words)


def looks_like(lang: str, text: str) -> bool:
    en, fr = _votes(text)
    return fr > en if lang == "fr" else en > fr


def other_language(lang: str, text: str) -> bool:
    """True for a paragraph clearly in the other language (an untranslated
    paragraph left in English by po4a in a French page, typically)."""
    en, fr = _votes(text)
    if en + fr >= 3:
        return en > 2 * fr if lang == "fr" else fr > 2 * en
    # short English list items in French pages: English stopword, no French
    # stopword, no French accented letter
    return lang == "fr" and en >= 1 and fr == 0 and len(text) >= 40 and not FR_LETTERS.search(text)


def drop_empty_sections(blocks: list[Block]) -> list[Block]:
    """Remove headings left without any paragraph before the next heading of
    the same or a higher level (their paragraphs were all filtered out)."""
    out: list[Block] = []
    for b in reversed(blocks):
        if b.level and (not out or (out[-1].level and out[-1].level <= b.level)):
            continue
        out.append(b)
    return out[::-1]


AUTO_ID = re.compile(r"^(idm?\d+|id-[\d.]+)$")


def page_documents(path: Path, stem: str, prefix: str, lang: str, source: str):
    blocks = [
        b
        for b in extract_blocks(path.read_text(encoding="utf-8"))
        if b.level or not other_language(lang, b.text)
    ]
    blocks = drop_empty_sections(blocks)
    parts = split_blocks(blocks)
    used: set[str] = set()
    for i, part in enumerate(parts):
        doc_id = f"{prefix}/{lang}/{stem}"
        if len(parts) > 1 and i > 0:
            anchor = next((b.anchor for b in part if b.level and b.anchor), None)
            if anchor is None or AUTO_ID.match(anchor):  # generated, e.g. "idm302"
                anchor = f"part{i}"
            doc_id += f"#{anchor}"
        while doc_id in used:
            doc_id += "+"
        used.add(doc_id)
        title = next((b.text for b in part if b.level), "")
        text = "\n\n".join(b.text for b in part)
        text = unicodedata.normalize("NFC", text)
        yield {"id": doc_id, "lang": lang, "source": source, "title": title, "text": text}


def deb_version(deb: Path) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()


def find_deb(debs: Path, package: str) -> Path:
    found = sorted(debs.glob(f"{package}_*.deb"))
    if len(found) != 1:
        sys.exit(f"expected exactly one {package}_*.deb in {debs}, found {found}")
    return found[0]


def write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        for d in docs:
            gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(raw.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--debs", type=Path, required=True, help="directory holding the downloaded .deb files"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--allow-other-versions", action="store_true")
    args = ap.parse_args()

    docs: dict[str, list[dict]] = {"en": [], "fr": []}
    seen_text: set[str] = set()
    dropped = {"short": 0, "dup": 0, "lang": 0}
    with tempfile.TemporaryDirectory() as tmp:
        unpacked: dict[str, Path] = {}
        for package, version, lang, prefix, subdir, glob, skip, suffix in SOURCES:
            deb = find_deb(args.debs, package)
            got = deb_version(deb)
            if got != version and not args.allow_other_versions:
                sys.exit(
                    f"{deb.name}: version {got}, expected {version} "
                    "(pass --allow-other-versions and update the README)"
                )
            if package not in unpacked:
                dest = Path(tmp) / package
                subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
                unpacked[package] = dest
            root = unpacked[package] / subdir
            source = f"{package} {got}"
            pages = sorted(p for p in root.glob(glob) if p.is_file() and p.name not in skip)
            if not pages:
                sys.exit(f"{package}: no {glob} under {subdir}")
            for page in pages:
                stem = page.name[: -len(suffix)]
                for doc in page_documents(page, stem, prefix, lang, source):
                    if len(doc["text"]) < MIN_CHARS:
                        dropped["short"] += 1
                    elif doc["text"] in seen_text:
                        dropped["dup"] += 1
                    elif not looks_like(lang, doc["text"]):
                        dropped["lang"] += 1
                        print(f"  wrong language, dropped: {doc['id']}", file=sys.stderr)
                    else:
                        seen_text.add(doc["text"])
                        docs[lang].append(doc)

    args.out.mkdir(parents=True, exist_ok=True)
    for lang, items in docs.items():
        path = args.out / f"{lang}.jsonl.gz"
        write_jsonl_gz(path, items)
        chars = sum(len(d["text"]) for d in items)
        raw = sum(len((json.dumps(d, ensure_ascii=False) + "\n").encode()) for d in items)
        print(
            f"{path}: {len(items)} documents, {chars:,} characters, "
            f"{raw:,} bytes uncompressed, {path.stat().st_size:,} bytes gzipped"
        )
    print(f"dropped: {dropped}")


if __name__ == "__main__":
    main()
