"""The shard format: how tokenized text is stored between `megatrain prep` and `megatrain train`.

A dataset is a directory:

    DATA_DIR/
      manifest.json        format + version, tokenizer file and sha256, vocab size, EOS id,
                           token and document counts, and one entry (file, sha256, counts) per shard
      tokenizer.json       the HF tokenizer the ids come from
      shard-00000.arrow    Arrow IPC files, one row per document: a single column `tokens`
      shard-00001.arrow    of type list<uint16> (uint32 when the vocabulary exceeds 65,536)

Each document's ids end with the EOS id, so the concatenation of all rows in manifest order
is the token stream the trainer packs into sequences, and the list offsets are the document
boundaries. Readers memory-map the files (no copy, no parse) and refuse, with a named error,
a shard whose sha256 or format version does not match the manifest. Writers write to a
temporary name and rename, so a crash never leaves a file that looks like a whole shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from megatrain.errors import MegatrainError
from megatrain.files import atomic_path, atomic_write_text, sha256_file

FORMAT_NAME = "megatrain-shards"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENS_COLUMN = "tokens"


class ShardError(MegatrainError):
    """A dataset directory cannot be used as it is; the message names the file and what to do."""


class ManifestError(ShardError):
    """manifest.json is missing, unreadable or inconsistent."""


class FormatVersionError(ShardError):
    """The data was written by a format version this megatrain cannot read."""


class ChecksumMismatch(ShardError):
    """A shard's bytes differ from the sha256 recorded in the manifest (corrupt or partial file)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer type that holds every id of the vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    file: str
    sha256: str
    num_tokens: int
    num_documents: int
    bytes: int


@dataclass
class Manifest:
    vocab_size: int
    eos_id: int
    tokenizer_file: str
    tokenizer_sha256: str
    shards: list[ShardInfo] = field(default_factory=list)
    dtype: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    num_tokens: int = 0
    num_documents: int = 0
    extra: dict = field(default_factory=dict)
    """Free-form provenance (prep recipe, tool versions, input files)."""

    def __post_init__(self):
        self.dtype = self.dtype or token_dtype(self.vocab_size).name
        self.num_tokens = sum(s.num_tokens for s in self.shards)
        self.num_documents = sum(s.num_documents for s in self.shards)

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_FILE
        fields = asdict(self)
        head = {
            k: fields.pop(k)
            for k in ("format", "format_version", "num_tokens", "num_documents", "vocab_size")
        }
        atomic_write_text(path, json.dumps({**head, **fields}, indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(
                f"{path} not found: is '{directory}' a directory written by `megatrain prep`?"
            )
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(
                f"{path} is not valid JSON ({e}); rerun `megatrain prep` to rewrite it"
            ) from None
        if raw.get("format") != FORMAT_NAME:
            raise ManifestError(
                f"{path}: format is {raw.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        if raw.get("format_version") != FORMAT_VERSION:
            raise FormatVersionError(
                f"{path}: shard format version {raw.get('format_version')} but this megatrain "
                f"reads version {FORMAT_VERSION}; re-run `megatrain prep` with this version, "
                "or use the matching megatrain"
            )
        try:
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            counts = (raw.pop("num_tokens"), raw.pop("num_documents"))
            manifest = cls(**raw)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{path}: missing or unexpected field ({e})") from None
        if counts != (manifest.num_tokens, manifest.num_documents):
            raise ManifestError(
                f"{path}: totals {counts} disagree with the sum over shards "
                f"{(manifest.num_tokens, manifest.num_documents)}"
            )
        return manifest


# ----------------------------------------------------------------------------- writing


def write_shard(
    path: str | os.PathLike,
    documents: list[np.ndarray],
    vocab_size: int,
    batch_documents: int = 8192,
) -> ShardInfo:
    """Write documents (arrays of token ids, each ending with EOS) as one Arrow IPC shard.

    Goes through a temporary file and a rename; returns the entry for the manifest.
    """
    path = Path(path)
    dtype = token_dtype(vocab_size)
    arrow_type = pa.from_numpy_dtype(dtype)
    schema = pa.schema(
        [pa.field(TOKENS_COLUMN, pa.list_(arrow_type))],
        metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)},
    )
    num_tokens = 0
    with (
        atomic_path(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, schema) as writer,
    ):
        for start in range(0, len(documents), batch_documents):
            chunk = documents[start : start + batch_documents]
            lengths = np.fromiter((len(d) for d in chunk), dtype=np.int64, count=len(chunk))
            offsets = np.zeros(len(chunk) + 1, dtype=np.int32)
            if lengths.sum() >= 2**31:
                raise ValueError(
                    f"{path}: more than 2^31 tokens in one batch; write smaller shards"
                )
            np.cumsum(lengths, out=offsets[1:])
            values = (
                np.concatenate(chunk).astype(dtype, copy=False) if chunk else np.zeros(0, dtype)
            )
            if values.size and int(values.max()) >= vocab_size:
                raise ValueError(
                    f"{path}: token id {int(values.max())} is outside the vocabulary ({vocab_size})"
                )
            column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=arrow_type))
            writer.write_batch(pa.record_batch([column], schema=schema))
            num_tokens += int(values.size)
    return ShardInfo(
        file=path.name,
        sha256=sha256_file(path),
        num_tokens=num_tokens,
        num_documents=len(documents),
        bytes=path.stat().st_size,
    )


# ----------------------------------------------------------------------------- reading


class Shard:
    """One memory-mapped shard: its tokens as numpy views and its document offsets."""

    def __init__(self, path: str | os.PathLike, info: ShardInfo | None = None, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise ShardError(
                f"{self.path} is listed in the manifest but missing; re-run `megatrain prep`"
            )
        if info is not None:
            size = self.path.stat().st_size
            if size != info.bytes:
                raise ChecksumMismatch(
                    f"{self.path}: {size} bytes on disk, manifest says {info.bytes} "
                    "(truncated or replaced file); re-run `megatrain prep` to rewrite it"
                )
            if verify and sha256_file(self.path) != info.sha256:
                raise ChecksumMismatch(
                    f"{self.path}: sha256 differs from manifest.json (corrupt file); "
                    "re-run `megatrain prep` to rewrite it"
                )
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(self.path), "r"))
        except pa.ArrowInvalid as e:
            raise ShardError(f"{self.path} is not an Arrow IPC file ({e})") from None
        meta = reader.schema.metadata or {}
        version = meta.get(b"format_version", b"?").decode()
        if meta.get(b"format") != FORMAT_NAME.encode() or version != str(FORMAT_VERSION):
            raise FormatVersionError(
                f"{self.path}: shard format {meta.get(b'format')!r} version {version}, "
                f"this megatrain reads {FORMAT_NAME} version {FORMAT_VERSION}"
            )
        self.chunks: list[np.ndarray] = []  # token ids, one view per record batch
        doc_lengths = []
        for i in range(reader.num_record_batches):
            column = reader.get_batch(i).column(0)
            self.chunks.append(
                column.values.to_numpy(zero_copy_only=True)[column.offsets[0].as_py() :]
            )
            doc_lengths.append(np.diff(column.offsets.to_numpy()))
        lengths = np.concatenate(doc_lengths) if doc_lengths else np.zeros(0, np.int64)
        self.doc_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_tokens = int(self.doc_offsets[-1])
        if info is not None and self.num_tokens != info.num_tokens:
            raise ChecksumMismatch(
                f"{self.path}: holds {self.num_tokens} tokens, manifest says {info.num_tokens}"
            )

    def document(self, index: int) -> np.ndarray:
        return TokenStream([self]).read(
            int(self.doc_offsets[index]), int(self.doc_offsets[index + 1])
        )


class TokenStream:
    """The concatenation of shards as one random-access array of token ids."""

    def __init__(self, shards: list[Shard]):
        self.chunks = [c for s in shards for c in s.chunks if len(c)]
        self.starts = np.concatenate([[0], np.cumsum([len(c) for c in self.chunks])]).astype(
            np.int64
        )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as one array (a view when inside one chunk, a copy across
        chunks)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(
                f"token range [{start}, {stop}) outside a stream of {len(self)} tokens"
            )
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        i = first
        while start < stop:
            chunk, offset = self.chunks[i], start - int(self.starts[i])
            take = min(stop - start, len(chunk) - offset)
            pieces.append(chunk[offset : offset + take])
            start += take
            i += 1
        if len(pieces) == 1:
            return pieces[0]
        return (
            np.concatenate(pieces)
            if pieces
            else np.zeros(0, self.chunks[0].dtype if self.chunks else np.uint16)
        )


class Dataset:
    """A dataset directory opened for reading: manifest checked, shards memory-mapped."""

    def __init__(self, directory: str | os.PathLike, verify: bool | Callable[[int], bool] = True):
        """`verify` may pick shards by index, so that ranks can share the hashing of a large
        dataset."""
        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory)
        self.shards = [
            Shard(
                self.directory / info.file, info, verify=verify(i) if callable(verify) else verify
            )
            for i, info in enumerate(self.manifest.shards)
        ]
        self.stream = TokenStream(self.shards)
        if len(self.stream) != self.manifest.num_tokens:
            raise ManifestError(
                f"{self.directory}: shards hold {len(self.stream)} tokens, manifest says "
                f"{self.manifest.num_tokens}"
            )

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def num_tokens(self) -> int:
        return len(self.stream)
