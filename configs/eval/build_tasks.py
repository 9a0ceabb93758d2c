"""Build the data of the shipped lm-evaluation-harness tasks from the bundled corpus.

    python configs/eval/build_tasks.py           # (re)write megatrain_lastword_{fr,en}.jsonl
    python configs/eval/build_tasks.py --check   # exit 1 if the committed files differ

`megatrain_lastword_fr` and `megatrain_lastword_en` are LAMBADA-style last-word prediction: the
model reads a passage up to its last word and is scored on that word (`acc`: it is the greedy
continuation; `perplexity`: of the word given the passage). A passage is one prose paragraph of
a document of corpus/<lang>.jsonl.gz (the Debian manuals, see corpus/README.md for sources and
licenses), chosen when:

- it is one line, not a list item (`- `), and ends with a full stop;
- it is MIN_CHARS to MAX_CHARS characters long and has at least MIN_WORDS words;
- its last word (before the full stop) is letters only, at least MIN_WORD_CHARS of them, and
  already appears earlier in the paragraph (as in LAMBADA, the context is what makes the word
  predictable; here, at least, the word has been seen).

The full stop is dropped: context = the paragraph up to its last word, without the space
before it; target = " " + the last word (what lm-eval scores after the context).

Of the qualifying paragraphs, EXAMPLES per language are kept, at most one per document, in the
order of the sha256 of "<lang>/<document id>/<paragraph index>" (a fixed shuffle that spreads
them over the books, so that `--limit N` takes a mix). The output depends only on the corpus
files and this script: the same corpus gives the same bytes. Each record is

    {"id": "<document id>", "paragraph": <index of the paragraph in the document's text>,
     "source": "<Debian package and version>", "context": "...", "target": " word"}

Standard library only, so that it runs before megatrain is installed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent.parent / "corpus"
LANGUAGES = ("fr", "en")
EXAMPLES = 32
MIN_CHARS, MAX_CHARS = 120, 320
MIN_WORDS = 20
MIN_WORD_CHARS = 4
STRIP = ".,;:!?()[]«»\"'“”’"


def task_name(lang: str) -> str:
    return f"megatrain_lastword_{lang}"


def split_last_word(paragraph: str) -> tuple[str, str] | None:
    """(context, target) of a paragraph that qualifies (see the module's docstring), else None."""
    if "\n" in paragraph or paragraph.startswith("- ") or not paragraph.endswith("."):
        return None
    if not MIN_CHARS <= len(paragraph) <= MAX_CHARS:
        return None
    context, _, word = paragraph[:-1].rpartition(" ")
    words = context.split(" ")
    if len(words) + 1 < MIN_WORDS or not (word.isalpha() and len(word) >= MIN_WORD_CHARS):
        return None
    if word.lower() not in {w.strip(STRIP).lower() for w in words}:
        return None
    return context, " " + word


def documents(lang: str, corpus: Path = CORPUS) -> list[dict]:
    with gzip.open(corpus / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def examples(lang: str, corpus: Path = CORPUS, n: int = EXAMPLES) -> list[dict]:
    """The task's records for `lang`, in their file order."""
    candidates = []
    for doc in documents(lang, corpus):
        for i, paragraph in enumerate(doc["text"].split("\n\n")):
            split = split_last_word(paragraph)
            if split:
                key = hashlib.sha256(f"{lang}/{doc['id']}/{i}".encode()).hexdigest()
                candidates.append((key, doc, i, split))
    candidates.sort(key=lambda c: c[0])
    chosen, used = [], set()
    for _, doc, i, (context, target) in candidates:
        if doc["id"] in used:
            continue
        used.add(doc["id"])
        chosen.append(
            {
                "id": doc["id"],
                "paragraph": i,
                "source": doc["source"],
                "context": context,
                "target": target,
            }
        )
        if len(chosen) == n:
            return chosen
    raise SystemExit(f"only {len(chosen)} qualifying documents in {corpus}/{lang}.jsonl.gz")


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the corpus/ directory")
    parser.add_argument("--out", type=Path, default=HERE, help="where the .jsonl files go")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for lang in LANGUAGES:
        path = args.out / f"{task_name(lang)}.jsonl"
        text = jsonl(examples(lang, args.corpus))
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"{path}: {text.count(chr(10))} examples, {len(text.encode())} bytes")
    if stale:
        print(f"out of date: {', '.join(map(str, stale))}; run {sys.argv[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
