"""Reading raw text: files, directories and globs of jsonl / txt / parquet, plain or .gz / .zst.

Input is cut into *units* of work (`plan_units`): a whole file, a byte range of a big plain
jsonl file (cut at line starts), or a range of row groups of a big parquet file. Units are
numbered in a fixed order (files sorted, ranges in file order), which is the global document
order: the output never depends on how units are spread over workers.

Every document comes out as a `Document(text, source)` with a stable location (`file:line` for
jsonl, `file:line` of the block for txt, `file:row` for parquet). Bad input never stops the run
and is never dropped silently: each problem goes to the `on_reject(location, reason)` callback.
A reason is "kind: detail"; `problem_class(kind)` says how the report counts it: a *record*
that could not become a document (malformed JSON, missing field, too long), a *repair* that
kept the document (invalid UTF-8), or a *file* problem (empty file, truncated archive).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from megatrain.errors import MegatrainError

SUPPORTED = (".jsonl", ".json", ".txt", ".parquet")
COMPRESSED = (".gz", ".zst")
FILE_PROBLEMS = (
    "empty_file",
    "truncated_or_corrupt_archive",
    "unreadable_parquet",
    "missing_column",
)

RejectCallback = Callable[[str, str], None]


class InputError(MegatrainError):
    """The inputs cannot be read at all (nothing found, directory unreadable); names the path."""


def problem_class(kind: str) -> str:
    """'file', 'repaired' or 'record' (a record that did not become a document)."""
    if kind in FILE_PROBLEMS:
        return "file"
    return "repaired" if kind.startswith("repaired") else "record"


@dataclass
class Document:
    text: str
    source: str


@dataclass(frozen=True)
class Unit:
    """One unit of work: a file, or a part of one. Ranges are [start, stop); stop -1 is the end."""

    index: int
    path: str
    size: int
    start: int = 0
    """Byte offset of a line start (jsonl), or first row group (parquet)."""
    stop: int = -1
    first_line: int = 1
    """Line (jsonl) or row (parquet, 0-based) number of the first record, for `file:line`
    reports."""

    def as_dict(self) -> dict:
        return asdict(self)


def _base_suffix(path: Path) -> str:
    name = path.name
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    return Path(name).suffix


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named, found in directories (recursively) or matched by globs; sorted, so the order
    is stable."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):
                raise InputError(
                    f"cannot read input directory {path}: permission denied; fix its permissions"
                )
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
        raise InputError(
            f"unsupported input {unsupported[0]}: expected one of {', '.join(SUPPORTED)} "
            f"(optionally {' or '.join(COMPRESSED)} compressed)"
        )
    unique = list(dict.fromkeys(files))
    if not unique:
        raise InputError(
            f"no input files found in {', '.join(inputs)} (looked for {', '.join(SUPPORTED)})"
        )
    unreadable = [f for f in unique if not os.access(f, os.R_OK)]
    if unreadable:
        raise InputError(f"cannot read input file {unreadable[0]}: permission denied")
    return unique


# ----------------------------------------------------------------------------- units


def _line_splits(path: Path, unit_bytes: int, block: int = 1 << 24) -> list[tuple[int, int]]:
    """(byte offset, line number) of the line starts where a big plain-text file is cut."""
    size = path.stat().st_size
    cuts, lines, pos, target = [(0, 1)], 0, 0, unit_bytes
    with open(path, "rb") as f:
        while chunk := f.read(block):
            while target < pos + len(chunk):
                nl = chunk.find(b"\n", max(0, target - pos))
                if nl < 0:
                    break
                cut = pos + nl + 1
                if cut < size:
                    cuts.append((cut, lines + chunk.count(b"\n", 0, nl + 1) + 1))
                target = cut + unit_bytes
            lines += chunk.count(b"\n")
            pos += len(chunk)
    return cuts


def plan_units(files: list[Path], unit_bytes: int) -> list[Unit]:
    """Cut the input files into units of about `unit_bytes` (compressed and txt files stay
    whole)."""
    units: list[Unit] = []
    for path in files:
        size = path.stat().st_size
        kind = _base_suffix(path)
        if kind == ".parquet" and size > unit_bytes and path.suffix == ".parquet":
            units += _parquet_units(path, unit_bytes, len(units))
        elif kind in (".jsonl", ".json") and path.suffix == kind and size > unit_bytes:
            cuts = _line_splits(path, unit_bytes) + [(size, -1)]
            for (start, line), (stop, _) in zip(cuts, cuts[1:]):
                units.append(Unit(len(units), str(path), stop - start, start, stop, line))
        else:
            units.append(Unit(len(units), str(path), size))
    return units


def _parquet_units(path: Path, unit_bytes: int, first_index: int) -> list[Unit]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:
        return [Unit(first_index, str(path), path.stat().st_size)]  # reported when read
    units, start, row, first_row, acc = [], 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        row += meta.row_group(g).num_rows
        if acc >= unit_bytes or g == meta.num_row_groups - 1:
            units.append(Unit(first_index + len(units), str(path), acc, start, g + 1, first_row))
            start, first_row, acc = g + 1, row, 0
    return units


# ----------------------------------------------------------------------------- reading


def open_binary(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
    return open(path, "rb")


def _is_archive_error(e: Exception) -> bool:
    return isinstance(e, (EOFError, OSError, gzip.BadGzipFile)) or type(e).__module__.startswith(
        "zstandard"
    )


def _lines(
    unit: Unit, on_reject: RejectCallback, max_line_bytes: int
) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of the unit's lines. Invalid UTF-8 is repaired (U+FFFD) and reported;
    a line longer than max_line_bytes is skipped without being held in memory (text None);
    a truncated archive ends the unit cleanly with a report."""
    path = Path(unit.path)
    number = unit.first_line - 1
    try:
        with open_binary(path) as raw:
            reader = io.BufferedReader(raw, 1 << 20)
            if unit.start:
                reader.seek(unit.start)
            length = unit.stop - unit.start if unit.stop >= 0 else None
            consumed = 0
            while length is None or consumed < length:
                line = reader.readline(max_line_bytes + 1)
                if not line:
                    break
                consumed += len(line)
                number += 1
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # drain the rest of a huge line
                        line = reader.readline(1 << 24)
                        consumed += len(line)
                    yield number, None
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    text = line.decode("utf-8", errors="replace")
                    on_reject(f"{path}:{number}", "repaired:invalid_utf8")
                yield number, text
    except Exception as e:
        if not _is_archive_error(e):
            raise
        on_reject(f"{path}:{number + 1}", f"truncated_or_corrupt_archive: {e}")


_SURROGATES = re.compile("[\ud800-\udfff]")


def _repair_surrogates(text: str, where: str, on_reject: RejectCallback) -> str:
    """JSON can spell lone surrogates ("\\ud800"), which are not encodable: replace them with
    U+FFFD."""
    if _SURROGATES.search(text):
        on_reject(where, "repaired:lone_surrogate")
        return _SURROGATES.sub("\ufffd", text)
    return text


def read_jsonl(
    unit: Unit, text_field: str, on_reject: RejectCallback, max_chars: int
) -> Iterator[Document]:
    for number, line in _lines(unit, on_reject, 8 * max_chars + 4096):
        where = f"{unit.path}:{number}"
        if line is None:
            on_reject(where, f"too_long: line over {8 * max_chars + 4096:,} bytes")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            on_reject(where, f"malformed_json: {e.msg} at column {e.colno}")
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            on_reject(where, f"missing_field: no string '{text_field}'")
            continue
        yield Document(_repair_surrogates(text, where, on_reject), where)


def read_txt(
    unit: Unit, on_reject: RejectCallback, split: str, max_chars: int
) -> Iterator[Document]:
    """`file`: the whole file is one document; `paragraph`: blocks separated by blank lines."""
    block, size, start, too_long = [], 0, 1, False
    for number, line in _lines(unit, on_reject, 4 * max_chars + 4096):
        if split == "paragraph" and line is not None and not line.strip():
            if block or too_long:
                yield from _txt_block(unit, start, block, too_long, on_reject)
            block, size, start, too_long = [], 0, number + 1, False
            continue
        if line is None or size + len(line) > max_chars:  # keep memory bounded: stop collecting
            block, too_long = [], True
        elif not too_long:
            block.append(line)
            size += len(line)
    if block or too_long:
        yield from _txt_block(unit, start, block, too_long, on_reject)


def _txt_block(
    unit: Unit, start: int, block: list[str], too_long: bool, on_reject
) -> Iterator[Document]:
    where = f"{unit.path}:{start}"
    if too_long:
        on_reject(where, "too_long: text block over the max_doc_chars limit")
    else:
        yield Document("".join(block), where)


def read_parquet(unit: Unit, text_field: str, on_reject: RejectCallback) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(unit.path)
        groups = list(range(unit.start, pf.metadata.num_row_groups if unit.stop < 0 else unit.stop))
    except Exception as e:
        on_reject(unit.path, f"unreadable_parquet: {e}")
        return
    if text_field not in pf.schema_arrow.names:
        on_reject(
            unit.path, f"missing_column: no column '{text_field}' (have {pf.schema_arrow.names})"
        )
        return
    row = unit.first_line
    try:
        for batch in pf.iter_batches(columns=[text_field], row_groups=groups):
            for text in batch.column(0).to_pylist():
                where = f"{unit.path}:{row}"
                row += 1
                if isinstance(text, str):
                    yield Document(text, where)
                else:
                    on_reject(where, f"missing_field: '{text_field}' is {type(text).__name__}")
    except OSError as e:
        on_reject(f"{unit.path}:{row}", f"unreadable_parquet: {e}")


def read_unit(
    unit: Unit,
    on_reject: RejectCallback,
    text_field: str = "text",
    txt_split: str = "file",
    max_chars: int = 10_000_000,
) -> Iterator[Document]:
    """Documents of one unit, whatever its format; oversized ones are rejected."""
    path = Path(unit.path)
    kind = _base_suffix(path)
    if unit.start == 0 and os.path.getsize(path) == 0:
        on_reject(str(path), "empty_file")
        return
    if kind in (".jsonl", ".json"):
        docs = read_jsonl(unit, text_field, on_reject, max_chars)
    elif kind == ".txt":
        docs = read_txt(unit, on_reject, txt_split, max_chars)
    else:
        docs = read_parquet(unit, text_field, on_reject)
    for doc in docs:
        if len(doc.text) > max_chars:
            on_reject(doc.source, f"too_long: {len(doc.text):,} characters > {max_chars:,}")
            continue
        yield doc


def read_documents(
    path: Path,
    on_reject: RejectCallback,
    text_field: str = "text",
    txt_split: str = "file",
    max_chars: int = 10_000_000,
) -> Iterator[Document]:
    """Documents of one whole input file."""
    path = Path(path)
    yield from read_unit(
        Unit(0, str(path), path.stat().st_size), on_reject, text_field, txt_split, max_chars
    )
