"""The per-unit work of a prep, each step committed by a marker so that a rerun skips it.

    scan_unit       read -> normalize -> filters; writes the kept text (Arrow), dedup keys, counts
    kept_docs       the kept text minus the global duplicates: what the tokenizer sees
    sample_texts    a seeded sample of the kept documents, to train the tokenizer on
    tokenize_unit   kept documents -> token ids (*.tok) and lengths (*.len.npy)
    shard_layout    where shards start and end, from the token counts of all units
    write_layout_shard   one shard of the layout, in the spine's Arrow format

Every output depends only on the unit and the global results, never on which rank did it.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import xxhash

from data_prep.dedup import text_hash
from data_prep.filters import first_rejection, normalize
from data_prep.progress import Progress
from data_prep.readers import ByteCounts, Unit, problem_class, read_unit
from data_prep.state import PrepState
from data_prep.workdir import WorkDir, crash_point, write_json
from megatrain.files import atomic_path, read_json
from megatrain.shards import ShardInfo, write_shard

DOCS_SCHEMA = pa.schema([pa.field("text", pa.large_string()), pa.field("source", pa.string())])
BATCH_DOCS = 1024


class UnitCounts:
    """What happened to the records of one unit, and samples of what was removed."""

    def __init__(self, sample_limit: int, sample_chars: int):
        self.docs_in = 0
        self.kept = 0
        self.chars_kept = 0
        self.counters = {
            k: Counter() for k in ("rejected", "repaired", "file_problems", "removed", "reasons")
        }
        self.samples: dict[str, list] = {}
        self.limit, self.sample_chars = sample_limit, sample_chars
        self.bytes = ByteCounts()

    def on_reject(self, location: str, reason: str) -> None:
        kind = reason.split(":")[0]
        cls = problem_class(kind)
        if cls == "repaired":
            self.counters["repaired"][reason.split(":")[1]] += 1
            return
        if cls == "record":
            self.docs_in += 1
        self.counters["rejected" if cls == "record" else "file_problems"][kind] += 1
        self._sample("input", {"location": location, "reason": reason})

    def removed(self, stage: str, reason: str, location: str, text: str) -> None:
        self.counters["removed"][stage] += 1
        self.counters["reasons"][reason] += 1
        self._sample(
            stage, {"location": location, "reason": reason, "text": text[: self.sample_chars]}
        )

    def _sample(self, stage: str, item: dict) -> None:
        bucket = self.samples.setdefault(stage, [])
        if len(bucket) < self.limit:
            bucket.append(item)

    def as_dict(self) -> dict:
        return {
            "docs_in": self.docs_in,
            "kept": self.kept,
            "chars_kept": self.chars_kept,
            **{k: dict(v) for k, v in self.counters.items()},
            "samples": self.samples,
            "bytes": self.bytes.as_dict(),
        }


def scan_unit(state: PrepState, unit: Unit, progress: Progress | None = None) -> dict:
    """Read, clean and filter one unit; commit its kept text, dedup keys and counts."""
    recipe, work, hasher = state.recipe, state.work, state.hasher
    counts = UnitCounts(recipe.report.reject_samples, recipe.report.sample_chars)
    hashes, chars, signatures, has_shingles = [], [], [], []
    texts, sources = [], []
    with (
        atomic_path(work.unit(unit.index, "docs.arrow")) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, DOCS_SCHEMA) as writer,
    ):

        def flush():
            writer.write_batch(
                pa.record_batch(
                    [pa.array(texts, pa.large_string()), pa.array(sources)], schema=DOCS_SCHEMA
                )
            )
            texts.clear()
            sources.clear()

        read = read_unit(
            unit,
            counts.on_reject,
            recipe.read.text_field,
            recipe.read.txt_split,
            recipe.read.max_doc_chars,
            counts.bytes,
        )
        for doc in read:
            counts.docs_in += 1
            if progress is not None:
                progress.add(docs=1, chars=len(doc.text))
            text = normalize(doc.text) if recipe.normalize else doc.text
            if not text.strip():
                counts.removed("empty", "empty", doc.source, doc.text)
                continue
            reason = first_rejection(state.filters, text)
            if reason is not None:  # "quality:stop_words": counted under the filter's name
                counts.removed(reason.split(":")[0], reason, doc.source, text)
                continue
            counts.kept += 1
            counts.chars_kept += len(text)
            chars.append(len(text))
            if recipe.dedup.exact:
                hashes.append(text_hash(text))
            if hasher is not None:
                shingles = hasher.shingle_hashes(text)
                has_shingles.append(len(shingles) > 0)
                signatures.append(hasher.signature(text, shingles))
            texts.append(text)
            sources.append(doc.source)
            if len(texts) >= BATCH_DOCS:
                flush()
        if texts or counts.kept == 0:
            flush()
    n_bands = hasher.config.bands if hasher is not None else 0
    bands = (
        hasher.band_keys(np.stack(signatures)) if signatures else np.zeros((0, n_bands), np.uint64)
    )
    # a file object: given a path, np.savez would append ".npz" to it
    with atomic_path(work.unit(unit.index, "keys.npz")) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            hashes=np.array(hashes, dtype=np.uint64),
            chars=np.array(chars, dtype=np.int64),
            bands=bands,
            has_shingles=np.array(has_shingles, dtype=bool),
        )
    crash_point("scan")
    stats = {"unit": unit.index, **counts.as_dict()}
    write_json(work.unit(unit.index, "scan.json"), stats)
    return stats


def read_keys(work: WorkDir, unit: int) -> dict[str, np.ndarray]:
    with np.load(work.unit(unit, "keys.npz")) as z:
        return {k: z[k] for k in z.files}


def doc_at(work: WorkDir, unit: int, index: int) -> tuple[str, str]:
    """(text, source) of one kept document: every record batch but the last holds BATCH_DOCS."""
    reader = pa.ipc.open_file(pa.memory_map(str(work.unit(unit, "docs.arrow")), "r"))
    row = reader.get_batch(index // BATCH_DOCS).slice(index % BATCH_DOCS, 1)
    return row.column(0)[0].as_py(), row.column(1)[0].as_py()


# ----------------------------------------------------------------------------- kept documents


def kept_docs(state: PrepState, units: Iterable[int]) -> Iterator[tuple[int, str]]:
    """(global id, text) of each document of `units` that the filters and the global dedup
    kept, in the global order: what the tokenizer is trained on, checked on and encodes."""
    for u in units:
        gid = int(state.offsets[u])
        lo, hi = np.searchsorted(state.dropped, state.offsets[u : u + 2])
        dropped = set(state.dropped[lo:hi].tolist())
        reader = pa.ipc.open_file(pa.memory_map(str(state.work.unit(u, "docs.arrow")), "r"))
        for i in range(reader.num_record_batches):
            for text in reader.get_batch(i).column(0).to_pylist():
                if gid not in dropped:
                    yield gid, text
                gid += 1


def sample_texts(state: PrepState) -> Iterator[str]:
    """A seeded sample of about `tokenizer.sample_chars` characters of the kept documents.

    A document is in it when a hash of (seed, its global id) falls under budget / total: the
    same sample whatever the number of workers, streamed so memory stays small.
    """
    units = range(len(state.units))
    total = sum(int(read_keys(state.work, u)["chars"].sum()) for u in units)
    threshold = min(1.0, state.recipe.tokenizer.sample_chars / max(total, 1)) * 2**64
    for gid, text in kept_docs(state, units):
        if xxhash.xxh3_64_intdigest(f"{state.recipe.seed}:{gid}".encode()) < threshold:
            yield text


def tokenize_unit(state: PrepState, unit: int, progress: Progress | None = None) -> dict:
    """Encode the unit's kept documents; each document's ids end with EOS."""
    work, encoder = state.work, state.encoder
    docs = kept_docs(state, [unit])
    lengths, n_tokens = [], 0
    with atomic_path(work.unit(unit, "tok")) as tmp, open(tmp, "wb") as out:
        while texts := [text for _, text in itertools.islice(docs, BATCH_DOCS)]:
            encoded = encoder.encode_lists(texts)
            for ids in encoded:
                ids.append(encoder.eos_id)
            batch_lengths = [len(x) for x in encoded]
            flat = np.fromiter(
                itertools.chain.from_iterable(encoded), dtype=state.dtype, count=sum(batch_lengths)
            )
            out.write(flat.tobytes())
            lengths += batch_lengths
            n_tokens += len(flat)
            if progress is not None:
                progress.add(docs=len(texts), chars=sum(map(len, texts)), tokens=len(flat))
    with atomic_path(work.unit(unit, "len.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, np.array(lengths, dtype=np.int64), allow_pickle=False)
    crash_point("tokenize")
    stats = {"unit": unit, "documents": len(lengths), "tokens": n_tokens}
    write_json(work.unit(unit, "tok.json"), stats)
    return stats


# ----------------------------------------------------------------------------- shards


@dataclass
class ShardPlan:
    index: int
    pieces: list[tuple[int, int, int]]  # (unit, first document, end document) in the unit's *.len


def shard_layout(work: WorkDir, units: list[int], shard_tokens: int) -> list[ShardPlan]:
    """Cut the global document sequence into shards: a shard closes once it holds shard_tokens."""
    shards, pieces, held = [], [], 0
    for u in units:
        lengths = np.load(work.unit(u, "len.npy"))
        start = 0
        cum = np.cumsum(lengths)
        while start < len(lengths):
            base = cum[start - 1] if start else 0
            # first document at which the open shard reaches shard_tokens
            end = int(np.searchsorted(cum, base + (shard_tokens - held), side="left")) + 1
            end = min(end, len(lengths))
            pieces.append((u, start, end))
            held += int(cum[end - 1] - base)
            start = end
            if held >= shard_tokens:
                shards.append(ShardPlan(len(shards), pieces))
                pieces, held = [], 0
    if pieces:
        shards.append(ShardPlan(len(shards), pieces))
    return shards


def write_layout_shard(state: PrepState, plan: ShardPlan) -> ShardInfo:
    """Write one shard of the layout, unless a marker says it is already whole."""
    work, dtype = state.work, state.dtype
    marker = work.shard_marker(plan.index)
    path = work.out / f"shard-{plan.index:05d}.arrow"
    if marker.exists() and path.exists():
        info = ShardInfo(**read_json(marker))
        if os.path.getsize(path) == info.bytes:
            return info
    documents = []
    for u, start, end in plan.pieces:
        lengths = np.load(work.unit(u, "len.npy"))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = (
            np.memmap(work.unit(u, "tok"), dtype=dtype, mode="r")
            if offsets[-1]
            else np.zeros(0, dtype)
        )
        documents += [tokens[offsets[i] : offsets[i + 1]] for i in range(start, end)]
    info = write_shard(path, documents, state.tok.get_vocab_size())
    crash_point("shard")
    write_json(marker, info.__dict__)
    return info


def unit_done(work: WorkDir, unit: int, step: str) -> dict | None:
    marker = work.unit(unit, f"{step}.json")
    return read_json(marker) if marker.exists() else None
