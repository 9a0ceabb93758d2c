"""Reading raw text: files, directories and globs of jsonl / txt / parquet, plain or compressed
(.gz, .zst, .bz2, .xz).

Input is cut into *units* of work (`plan_units`): a whole file, a byte range of a big plain
jsonl file (cut at line starts), or a range of row groups of a big parquet file. Units are
numbered in a fixed order (files sorted, ranges in file order), which is the global document
order: the output never depends on how units are spread over workers.

Every document comes out as a `Document(text, source)` with a stable location (`file:line` for
jsonl, `file:line` of the block for txt, `file:row` for parquet). Bad input never stops the run
and is never dropped silently: each problem goes to the `on_reject(location, reason)` callback.
A reason is "kind: detail"; `problem_class(kind)` says how the report counts it: a *record*
that could not become a document (malformed JSON, missing field, too long), a *repair* that
kept the document (invalid UTF-8), or a *file* problem (empty file, truncated archive, binary or
unreadable file).

Every input byte is accounted for in a `ByteCounts`: on disk, a byte is read or skipped (a
binary or unreadable file, the damaged tail of an archive); once read (decompressed), it is in a
document, a rejected record, a blank line, or the partial record cut by an archive's damage.
"""

from __future__ import annotations

import bz2
import glob
import io
import json
import lzma
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatrain.errors import MegatrainError

SUPPORTED = (".jsonl", ".json", ".txt", ".parquet")
COMPRESSED = (".gz", ".zst", ".bz2", ".xz")
FILE_PROBLEMS = (
    "empty_file",
    "truncated_or_corrupt_archive",
    "unreadable_parquet",
    "missing_column",
    "binary_file",
    "unreadable",
)
SNIFF_BYTES = 1 << 16
"""How much of a text file's (decompressed) start `binary_reason` looks at."""
BINARY_SHARE = 0.3
"""Share of invalid UTF-8 or control characters above which a text file is binary. Text in a
legacy 8-bit encoding (Latin-1 French: a few percent of accented letters) stays far below."""

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
    nbytes: int = 0
    """Bytes of input (decompressed) the document was read from: its line(s), JSON included."""


@dataclass
class ByteCounts:
    """Where the bytes of the input went; two sums close (`bytes_closes`):

    on disk:      size of the inputs == read + sum(skipped)
    once read:    decoded == documents + rejected + blank + partial
    """

    read: int = 0
    """On-disk bytes read: whole files, ranges of files, archives up to their damage."""
    skipped: Counter = field(default_factory=Counter)
    """On-disk bytes not read, by reason: binary_file, unreadable, unreadable_parquet,
    truncated_or_corrupt_archive (an archive's bytes from where decoding failed)."""
    decoded: int = 0
    """Bytes read out of them (decompressed; for parquet, the UTF-8 text of the cells)."""
    documents: int = 0
    """...of which records that became documents (before filters and dedup)."""
    rejected: int = 0
    """...records that did not (malformed JSON, missing field, too long)."""
    blank: int = 0
    """...blank lines (jsonl) and the blank lines between paragraphs (txt)."""
    partial: int = 0
    """...the partial record cut by an archive's damage: dropped."""
    invalid_utf8: int = 0
    """Bytes of what was read that are not UTF-8, each replaced by U+FFFD (not in the sums)."""
    files: list[dict] = field(default_factory=list)
    """Each file skipped or damaged: path, reason, bytes (and offsets for damage)."""

    def skip(self, path: str, reason: str, nbytes: int, **detail) -> None:
        self.skipped[reason.split(":")[0]] += nbytes
        self.files.append({"path": path, "reason": reason, "bytes": nbytes, **detail})

    def as_dict(self) -> dict:
        return {**asdict(self), "skipped": dict(self.skipped)}


def bytes_closes(b: dict, size: int) -> bool:
    """The two sums of a (summed) `ByteCounts.as_dict()`, against the inputs' on-disk size."""
    return size == b["read"] + sum(b["skipped"].values()) and b["decoded"] == (
        b["documents"] + b["rejected"] + b["blank"] + b["partial"]
    )


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
    skip: str = ""
    """Why the whole file is skipped ("binary_file: ...", "unreadable: ..."), decided in the
    plan; "" to read it."""

    def as_dict(self) -> dict:
        return asdict(self)


def _base_suffix(path: Path) -> str:
    name = path.name
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    return Path(name).suffix


def _found(path: Path) -> bool:
    """A file, or a dangling symlink (reported when the plan is made, not dropped silently)."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named, found in directories (recursively) or matched by globs; sorted, so the order
    is stable. A file named that cannot be read is fatal; one found in a directory or by a glob
    (dangling symlinks included) is kept, to be skipped and reported by `plan_units`."""
    files: list[Path] = []
    named: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):
                raise InputError(
                    f"cannot read input directory {path}: permission denied; fix its permissions"
                )
            try:
                found = [p for p in path.rglob("*") if _found(p) and _base_suffix(p) in SUPPORTED]
            except PermissionError as e:
                raise InputError(f"cannot read input directory {path}: {e}") from None
            files += sorted(found)
        elif path.is_file():
            files.append(path)
            named.add(path)
        elif any(ch in item for ch in "*?["):
            files += sorted(Path(p) for p in glob.glob(item, recursive=True) if _found(Path(p)))
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
    unreadable = [f for f in unique if f in named and not os.access(f, os.R_OK)]
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
        size = file_size(path)
        kind = _base_suffix(path)
        skip = skip_reason(path)
        if skip:
            units.append(Unit(len(units), str(path), size, skip=skip))
        elif kind == ".parquet" and size > unit_bytes and path.suffix == ".parquet":
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


def file_size(path: Path) -> int:
    """On-disk size; 0 for a dangling symlink."""
    return path.stat().st_size if path.exists() else 0


def skip_reason(path: Path) -> str:
    """Why a whole input file is skipped ("kind: detail"), or "": a dangling symlink, a file
    this process may not read, or binary data in a text format."""
    if not path.exists():
        return f"unreadable: dangling symlink to {os.readlink(path)}"
    if not os.access(path, os.R_OK):
        return "unreadable: permission denied"
    if _base_suffix(path) == ".parquet":
        return ""
    with open_binary(path) as f:
        why = binary_reason(f.read(SNIFF_BYTES))
    return f"binary_file: {why} in the first {SNIFF_BYTES // 1024} KiB" if why else ""


_CONTROL = bytes(c for c in range(32) if chr(c) not in "\t\n\r\f\v\x1b") + b"\x7f"


def binary_reason(sample: bytes) -> str:
    """Why `sample` (a text file's start) is binary data, not text, or "".

    A NUL byte is never in UTF-8 or Latin-1 text; otherwise binary means more than
    BINARY_SHARE of the characters are invalid UTF-8 or control characters (tab, newlines,
    form feed and escape are text).
    """
    if b"\0" in sample:
        return f"NUL byte at offset {sample.index(0)}"
    text = sample.decode("utf-8", errors="replace")
    if not text:
        return ""
    bad = text.count("\ufffd") + sum(sample.count(c) for c in _CONTROL)
    if bad > BINARY_SHARE * len(text):
        return f"{bad / len(text):.0%} invalid UTF-8 or control characters"
    return ""


def _decompressor(name: str):
    """A fresh incremental decompressor for one member / frame / stream of `name`'s format."""
    if name.endswith(".gz"):
        return zlib.decompressobj(wbits=31)
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()
    if name.endswith(".bz2"):
        return bz2.BZ2Decompressor()
    return lzma.LZMADecompressor()


class Decompressed(io.RawIOBase):
    """The decompressed bytes of a .gz / .zst / .bz2 / .xz file (several members or frames
    too), decoded piece by piece so that everything before damage is delivered: a truncated or
    corrupt archive reads as a shorter stream, and `damage` says where decoding failed."""

    CHUNK = 1 << 14  # compressed bytes per step: how precisely damage is located

    def __init__(self, path: Path):
        self.name = path.name
        self.file = open(path, "rb")
        self.d = _decompressor(self.name)
        self.started = False  # the current member has begun (at end of file: truncated)
        self.pending = memoryview(b"")
        self.compressed = 0  # compressed bytes decoded into output so far
        self.decompressed = 0
        self.damage: dict | None = None
        """{"error", "compressed_offset", "decompressed_offset"} once decoding failed."""
        self.done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending and not self.done:
            self._step()
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def _step(self) -> None:
        chunk = self.file.read(self.CHUNK)
        if not chunk:
            if self.started:
                self._fail("unexpected end of the compressed stream")
            self.done = True
            return
        out = []
        try:
            while chunk:
                self.started = True
                out.append(self.d.decompress(chunk))
                if not self.d.eof:
                    break
                chunk = self.d.unused_data  # the next member / frame / stream
                self.d, self.started = _decompressor(self.name), False
            self.compressed = self.file.tell()
        except Exception as e:  # zlib.error, OSError, EOFError, zstandard.ZstdError, LZMAError
            # the members before are whole; what the failing call decoded is lost with it
            self.compressed = self.file.tell() - len(chunk)
            kind, module = type(e).__name__, type(e).__module__.split(".")[0]
            self._fail(f"{kind if module == 'builtins' else f'{module}.{kind}'}: {e}")
        data = b"".join(out)
        self.decompressed += len(data)
        self.pending = memoryview(data)

    def _fail(self, error: str) -> None:
        """Stop at self.compressed: the rest of the file is the damaged tail."""
        self.damage = {
            "error": error,
            "compressed_offset": self.compressed,
            "decompressed_offset": self.decompressed,
        }
        self.done = True

    def close(self) -> None:
        self.file.close()
        super().close()


def open_binary(path: Path):
    """The bytes of an input file, decompressed (a `Decompressed`) when it is compressed."""
    if path.name.endswith(COMPRESSED):
        return Decompressed(path)
    return open(path, "rb")


_SURROGATES = re.compile("[\ud800-\udfff]")

PARTIAL = object()
"""`_lines`' text for the partial last record of a damaged archive."""


def _lines(
    unit: Unit, on_reject: RejectCallback, max_line_bytes: int, ledger: ByteCounts
) -> Iterator[tuple[int, object, int]]:
    """(line number, text, bytes) of the unit's lines. Invalid UTF-8 is repaired (U+FFFD) and
    reported; a line longer than max_line_bytes is skipped without being held in memory (text
    None). A damaged archive ends the unit early: its partial last line comes as PARTIAL, and
    the damage goes into `ledger` (read_unit reports it)."""
    path = Path(unit.path)
    number = unit.first_line - 1
    consumed = 0
    with open_binary(path) as raw:
        reader = io.BufferedReader(raw, 1 << 20)
        if unit.start:
            reader.seek(unit.start)
        length = unit.stop - unit.start if unit.stop >= 0 else None
        damage = None
        while length is None or consumed < length:
            try:
                line = reader.readline(max_line_bytes + 1)
            except OSError as e:  # a plain file that cannot be read to its end
                damage = {"error": str(e), "decompressed_offset": unit.start + consumed}
                break
            if not line:
                break
            consumed += len(line)
            ledger.decoded += len(line)
            number += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                nbytes = len(line)
                while line and not line.endswith(b"\n"):  # drain the rest of a huge line
                    line = reader.readline(1 << 24)
                    consumed += len(line)
                    ledger.decoded += len(line)
                    nbytes += len(line)
                yield number, None, nbytes
                continue
            if not line.endswith(b"\n") and getattr(raw, "damage", None):
                yield number, PARTIAL, len(line)  # cut by the damage: not a whole record
                number -= 1
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.decode("utf-8", errors="replace")
                escaped = line.decode("utf-8", errors="surrogateescape")  # one per invalid byte
                ledger.invalid_utf8 += len(_SURROGATES.findall(escaped))
                on_reject(f"{path}:{number}", "repaired:invalid_utf8")
            yield number, text, len(line)
        if isinstance(raw, Decompressed):
            damage, done, kind = raw.damage, raw.compressed, "truncated_or_corrupt_archive"
        else:
            done, kind = consumed, "unreadable"
        end = unit.stop if unit.stop >= 0 else os.path.getsize(path)
        ledger.read += done
    if damage is not None:  # the rest of the unit is skipped
        reason = f"{kind}: {damage.pop('error')}"
        ledger.skip(str(path), reason, end - unit.start - done, line=number + 1, **damage)


def _repair_surrogates(text: str, where: str, on_reject: RejectCallback) -> str:
    """JSON can spell lone surrogates ("\\ud800"), which are not encodable: replace them with
    U+FFFD."""
    if _SURROGATES.search(text):
        on_reject(where, "repaired:lone_surrogate")
        return _SURROGATES.sub("\ufffd", text)
    return text


def read_jsonl(
    unit: Unit, text_field: str, on_reject: RejectCallback, max_chars: int, ledger: ByteCounts
) -> Iterator[Document]:
    for number, line, nbytes in _lines(unit, on_reject, 8 * max_chars + 4096, ledger):
        where = f"{unit.path}:{number}"
        if line is PARTIAL:
            ledger.partial += nbytes
            continue
        if line is None:
            ledger.rejected += nbytes
            on_reject(where, f"too_long: line over {8 * max_chars + 4096:,} bytes")
            continue
        if not line.strip():
            ledger.blank += nbytes
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            ledger.rejected += nbytes
            on_reject(where, f"malformed_json: {e.msg} at column {e.colno}")
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            ledger.rejected += nbytes
            on_reject(where, f"missing_field: no string '{text_field}'")
            continue
        yield Document(_repair_surrogates(text, where, on_reject), where, nbytes)


def read_txt(
    unit: Unit, on_reject: RejectCallback, split: str, max_chars: int, ledger: ByteCounts
) -> Iterator[Document]:
    """`file`: the whole file is one document; `paragraph`: blocks separated by blank lines.
    The block a damaged archive cuts (the whole file, for `file`) is dropped as partial."""
    block, size, start, too_long, nbytes = [], 0, 1, False, 0
    for number, line, n in _lines(unit, on_reject, 4 * max_chars + 4096, ledger):
        if line is PARTIAL:  # the last line: drop the block it ends
            ledger.partial += nbytes + n
            block, too_long, nbytes = [], False, 0
            continue
        if split == "paragraph" and line is not None and not line.strip():
            if block or too_long:
                yield from _txt_block(unit, start, block, too_long, nbytes, on_reject, ledger)
            ledger.blank += n
            block, size, start, too_long, nbytes = [], 0, number + 1, False, 0
            continue
        nbytes += n
        if line is None or size + len(line) > max_chars:  # keep memory bounded: stop collecting
            block, too_long = [], True
        elif not too_long:
            block.append(line)
            size += len(line)
    if block or too_long:
        yield from _txt_block(unit, start, block, too_long, nbytes, on_reject, ledger)


def _txt_block(
    unit: Unit, start: int, block: list[str], too_long: bool, nbytes: int, on_reject, ledger
) -> Iterator[Document]:
    where = f"{unit.path}:{start}"
    if too_long:
        ledger.rejected += nbytes
        on_reject(where, "too_long: text block over the max_doc_chars limit")
    else:
        yield Document("".join(block), where, nbytes)


def read_parquet(
    unit: Unit, text_field: str, on_reject: RejectCallback, ledger: ByteCounts
) -> Iterator[Document]:
    """Rows of the unit's row groups; the file's bytes count as read by its first unit."""
    import pyarrow.parquet as pq

    size = os.path.getsize(unit.path) if unit.start == 0 else 0
    try:
        pf = pq.ParquetFile(unit.path)
        groups = list(range(unit.start, pf.metadata.num_row_groups if unit.stop < 0 else unit.stop))
    except Exception as e:
        on_reject(unit.path, f"unreadable_parquet: {e}")
        ledger.skip(unit.path, f"unreadable_parquet: {e}", size)
        return
    ledger.read += size
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
                    nbytes = len(text.encode("utf-8", "surrogatepass"))
                    ledger.decoded += nbytes
                    yield Document(text, where, nbytes)
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
    ledger: ByteCounts | None = None,
) -> Iterator[Document]:
    """Documents of one unit, whatever its format; oversized ones are rejected. `ledger`
    receives where the unit's bytes went (each byte once) and each file skipped or damaged."""
    ledger = ByteCounts() if ledger is None else ledger
    path = Path(unit.path)
    kind = _base_suffix(path)
    if unit.skip:
        on_reject(str(path), unit.skip)
        ledger.skip(str(path), unit.skip, unit.size)
        return
    if unit.start == 0 and os.path.getsize(path) == 0:
        on_reject(str(path), "empty_file")
        return
    if kind in (".jsonl", ".json"):
        docs = read_jsonl(unit, text_field, on_reject, max_chars, ledger)
    elif kind == ".txt":
        docs = read_txt(unit, on_reject, txt_split, max_chars, ledger)
    else:
        docs = read_parquet(unit, text_field, on_reject, ledger)
    problems, partial_before, kept = len(ledger.files), ledger.partial, 0
    for doc in docs:
        if len(doc.text) > max_chars:
            ledger.rejected += doc.nbytes
            on_reject(doc.source, f"too_long: {len(doc.text):,} characters > {max_chars:,}")
            continue
        ledger.documents += doc.nbytes
        kept += 1
        yield doc
    for damage in ledger.files[problems:]:  # a file damaged midway: what it cost
        partial = ledger.partial - partial_before  # the record the damage cut, dropped
        damage.update(documents_kept=kept, partial_bytes=partial)
        at = f"byte {damage['decompressed_offset']:,}"
        if "compressed_offset" in damage:
            at = f"compressed byte {damage['compressed_offset']:,} (decompressed {at})"
        on_reject(
            f"{path}:{damage['line']}",
            f"{damage['reason']} at {at}; {kept} document(s) before it kept, a partial record "
            f"of {partial:,} bytes dropped",
        )


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
