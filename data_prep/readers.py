"""Reading raw text: files, directories and globs of jsonl / txt / parquet, plain or .gz / .zst.

Every document comes out as a `Document(doc_id, text, source)` with a stable id (`file:line`
for jsonl, `file:block` for txt, `file:row` for parquet). Bad input never stops the run and is
never dropped silently: each problem (malformed JSON, missing text field, invalid UTF-8, an
oversized document, a truncated archive) goes to the `on_reject(location, reason)` callback,
which the pipeline counts and samples into its report.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SUPPORTED = (".jsonl", ".json", ".txt", ".parquet")
COMPRESSED = (".gz", ".zst")

RejectCallback = Callable[[str, str], None]


class InputError(Exception):
    """The inputs cannot be read at all (nothing found, directory unreadable); names the path."""


@dataclass
class Document:
    doc_id: str
    text: str
    source: str


def _base_suffix(path: Path) -> str:
    name = path.name
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    return Path(name).suffix


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named, found in directories (recursively) or matched by globs; sorted, so the order is stable."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            try:
                found = [p for p in path.rglob("*") if p.is_file() and _base_suffix(p) in SUPPORTED]
            except PermissionError as e:
                raise InputError(f"cannot read input directory {path}: {e}") from None
            files += sorted(found)
        elif path.is_file():
            files.append(path)
        elif any(ch in item for ch in "*?["):
            files += sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            raise InputError(f"input {item} does not exist")
    unsupported = [f for f in files if _base_suffix(f) not in SUPPORTED]
    if unsupported:
        raise InputError(f"unsupported input {unsupported[0]}: expected one of {', '.join(SUPPORTED)} "
                         f"(optionally {' or '.join(COMPRESSED)} compressed)")
    unique = list(dict.fromkeys(files))
    if not unique:
        raise InputError(f"no input files found in {', '.join(inputs)} (looked for {', '.join(SUPPORTED)})")
    return unique


def open_binary(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
    return open(path, "rb")


def _lines(path: Path, on_reject: RejectCallback) -> Iterator[tuple[int, str]]:
    """(line number, text) with invalid UTF-8 repaired (U+FFFD) and reported; stops cleanly on a truncated archive."""
    number = 0
    try:
        with open_binary(path) as raw:
            for number, line in enumerate(io.BufferedReader(raw), start=1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    text = line.decode("utf-8", errors="replace")
                    on_reject(f"{path}:{number}", "repaired:invalid_utf8")
                yield number, text
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        on_reject(f"{path}:{number + 1}", f"truncated_or_corrupt_archive: {e}")
    except Exception as e:  # zstandard.ZstdError and friends
        if type(e).__module__.startswith("zstandard"):
            on_reject(f"{path}:{number + 1}", f"truncated_or_corrupt_archive: {e}")
        else:
            raise


def read_jsonl(path: Path, text_field: str, on_reject: RejectCallback) -> Iterator[Document]:
    for number, line in _lines(path, on_reject):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            on_reject(where, f"malformed_json: {e.msg}")
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            on_reject(where, f"missing_field: no string '{text_field}'")
            continue
        doc_id = str(record.get("id", where)) if isinstance(record, dict) else where
        yield Document(doc_id, text, where)


def read_txt(path: Path, on_reject: RejectCallback, split: str = "file") -> Iterator[Document]:
    """`file`: the whole file is one document; `paragraph`: blocks separated by blank lines."""
    block, start = [], 1
    for number, line in _lines(path, on_reject):
        if split == "paragraph" and not line.strip():
            if block:
                yield Document(f"{path}:{start}", "".join(block), f"{path}:{start}")
            block, start = [], number + 1
            continue
        block.append(line)
    if block:
        where = f"{path}:{start}" if split == "paragraph" else str(path)
        yield Document(where, "".join(block), where)


def read_parquet(path: Path, text_field: str, on_reject: RejectCallback) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        on_reject(str(path), f"unreadable_parquet: {e}")
        return
    if text_field not in pf.schema_arrow.names:
        on_reject(str(path), f"missing_field: no column '{text_field}'")
        return
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            where = f"{path}:{row}"
            row += 1
            if isinstance(text, str):
                yield Document(where, text, where)
            else:
                on_reject(where, f"missing_field: '{text_field}' is null")


def read_documents(path: Path, on_reject: RejectCallback, text_field: str = "text", txt_split: str = "file",
                   max_chars: int = 10_000_000) -> Iterator[Document]:
    """Documents of one input file, whatever its format; oversized ones are rejected."""
    kind = _base_suffix(path)
    if os.path.getsize(path) == 0:
        on_reject(str(path), "empty_file")
        return
    if kind in (".jsonl", ".json"):
        docs = read_jsonl(path, text_field, on_reject)
    elif kind == ".txt":
        docs = read_txt(path, on_reject, txt_split)
    else:
        docs = read_parquet(path, text_field, on_reject)
    for doc in docs:
        if len(doc.text) > max_chars:
            on_reject(doc.source, f"too_long: {len(doc.text):,} characters > {max_chars:,}")
            continue
        yield doc
