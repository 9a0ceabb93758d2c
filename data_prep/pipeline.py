"""`megatrain prep`: raw text in, a dataset directory (manifest, tokenizer, Arrow shards) out.

    read -> normalize -> tokenizer (train or load) -> tokenize -> write shards -> manifest, report

The output directory is only ever completed, never half-overwritten: shards are written under
temporary names and renamed, and manifest.json, the file the trainer looks for, comes last.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import megatrain
from data_prep.readers import Document, expand_inputs, read_documents
from data_prep.tokenizer import EOS, FastEncoder, file_sha256, load_tokenizer, train_bpe
from megatrain.shards import MANIFEST_FILE, Manifest, atomic_write_bytes, write_shard


class PrepError(Exception):
    """The job cannot produce a dataset (no documents, output in use); the message says what to do."""


@dataclass
class PrepOptions:
    inputs: list[str]
    out: str
    vocab_size: int = 32_000
    tokenizer: str | None = None
    text_field: str = "text"
    shard_tokens: int = 50_000_000
    tokenizer_sample_chars: int = 200_000_000
    seed: int = 0
    force: bool = False


@dataclass
class Report:
    docs_in: int = 0
    docs_out: int = 0
    rejected: Counter = field(default_factory=Counter)
    removed: Counter = field(default_factory=Counter)
    reject_samples: list = field(default_factory=list)
    tokens: int = 0
    bytes_in: int = 0
    seconds: float = 0.0

    def reject(self, location: str, reason: str) -> None:
        kind = reason.split(":")[0]
        self.rejected[kind] += 1
        if len(self.reject_samples) < 100:
            self.reject_samples.append({"location": location, "reason": reason})

    def as_dict(self) -> dict:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "removed": dict(self.removed),
                "rejected": dict(self.rejected), "tokens": self.tokens, "bytes_in": self.bytes_in,
                "seconds": round(self.seconds, 3), "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
                "reject_samples": self.reject_samples}


def normalize(text: str) -> str:
    return text.strip()


def _fingerprint(opts: PrepOptions, files: list[Path]) -> dict:
    return {"inputs": [[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in files],
            "vocab_size": opts.vocab_size, "tokenizer": opts.tokenizer, "text_field": opts.text_field,
            "shard_tokens": opts.shard_tokens, "seed": opts.seed}


def run_prep(opts: PrepOptions, log=print) -> dict:
    t0 = time.perf_counter()
    out = Path(opts.out)
    files = expand_inputs(opts.inputs)
    fingerprint = _fingerprint(opts, files)
    if (out / MANIFEST_FILE).exists() and not opts.force:
        done = Manifest.read(out)
        if done.extra.get("fingerprint") == fingerprint:
            log(f"{out} is already prepared from these inputs ({done.num_tokens:,} tokens); nothing to do")
            return json.loads((out / "report.json").read_text())
        raise PrepError(f"{out} holds a dataset prepared from other inputs or options; choose another --out "
                        "or pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)

    report = Report()
    docs: list[Document] = []
    for path in files:
        report.bytes_in += path.stat().st_size
        for doc in read_documents(path, report.reject, text_field=opts.text_field):
            report.docs_in += 1
            doc.text = normalize(doc.text)
            if not doc.text:
                report.removed["empty"] += 1
                continue
            docs.append(doc)
    report.docs_in += sum(report.rejected[k] for k in report.rejected if not k.startswith("repaired"))
    if not docs:
        raise PrepError(f"no documents found in {', '.join(opts.inputs)} "
                        f"(rejected: {dict(report.rejected) or 'none'}); check the inputs and --text-field")
    log(f"read {len(docs):,} documents from {len(files)} files ({report.bytes_in / 1e6:.1f} MB)")

    tok_path = out / "tokenizer.json"
    if opts.tokenizer:
        tok = load_tokenizer(opts.tokenizer)
    else:
        sample, budget = [], opts.tokenizer_sample_chars
        for doc in random.Random(opts.seed).sample(docs, len(docs)):
            if budget <= 0:
                break
            sample.append(doc.text)
            budget -= len(doc.text)
        t = time.perf_counter()
        tok = train_bpe(sample, opts.vocab_size)
        log(f"trained a byte-level BPE of {tok.get_vocab_size():,} tokens in {time.perf_counter() - t:.1f}s")
    tok.save(str(tok_path))

    encoder = FastEncoder(tok, [d.text for d in docs[:200]])
    t = time.perf_counter()
    shards, pending, pending_tokens = [], [], 0
    for start in range(0, len(docs), 1024):
        for ids in encoder.encode([d.text for d in docs[start:start + 1024]]):
            pending.append(ids)
            pending_tokens += len(ids)
            if pending_tokens >= opts.shard_tokens:
                shards.append(write_shard(out / f"shard-{len(shards):05d}.arrow", pending, tok.get_vocab_size()))
                pending, pending_tokens = [], 0
    if pending:
        shards.append(write_shard(out / f"shard-{len(shards):05d}.arrow", pending, tok.get_vocab_size()))
    report.docs_out = len(docs)
    report.tokens = sum(s.num_tokens for s in shards)
    report.seconds = time.perf_counter() - t0
    log(f"tokenized with {encoder.backend}: {report.tokens:,} tokens in {len(shards)} shard(s), "
        f"{report.tokens / (time.perf_counter() - t):,.0f} tokens/s")

    atomic_write_bytes(out / "report.json", (json.dumps(report.as_dict(), indent=2) + "\n").encode())
    manifest = Manifest(vocab_size=tok.get_vocab_size(), eos_id=tok.token_to_id(EOS), tokenizer_file=tok_path.name,
                        tokenizer_sha256=file_sha256(tok_path), shards=shards,
                        extra={"fingerprint": fingerprint, "created_by": f"megatrain {megatrain.__version__}",
                               "encoder": encoder.backend})
    manifest.write(out)
    return report.as_dict()
