"""Tokenize-and-write throughput per core: megatrain vs plain HF `tokenizers` vs datatrove, same
text, same run.

    .venv/bin/python bench/prep_throughput.py [--mb 20] [--repeats 3] [--out bench-prep.json]

Text: the bundled French/English corpus, repeated up to --mb megabytes. Tokenizer: a byte-level
BPE (--vocab-size, default 32000) trained here with HF `tokenizers` on the corpus. Every
measurement runs on one thread (RAYON_NUM_THREADS=1, tiktoken num_threads=1, one datatrove task),
so tokens/s is tokens/s per core. Measured, alternating, --repeats times each (median kept):

    hf_encode_batch      Tokenizer.encode_batch on batches of 1,000 documents, ids to numpy
    megatrain            data_prep.stages.tokenize_unit + write_layout_shard: read the kept text
                         from its Arrow unit file, encode, append EOS, write token files and the
                         final Arrow shards with their sha256: the whole tokenize-and-write path
    datatrove            datatrove's DocumentTokenizer (pip install datatrove; skipped if absent),
                         EOS appended, no shuffling, writing its .ds files
    megatrain_prep       `megatrain prep FILE --tokenizer T --workers 1` end to end (normalize, no
                         filter, no dedup: the text repeats), tokens / total wall time, for context

megatrain's ids are checked against HF's for every document (the run fails if any differs).
Prints one JSON object (and writes it to --out if given).
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers is imported: one core for everyone
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep import stages  # noqa: E402
from data_prep.comm import SingleComm  # noqa: E402
from data_prep.recipe import Recipe  # noqa: E402
from data_prep.state import PrepOptions, PrepState  # noqa: E402
from data_prep.tokenizer import EOS, FastEncoder, train_bpe  # noqa: E402
from megatrain.shards import token_dtype  # noqa: E402


def corpus(mb: float) -> list[str]:
    texts = [
        json.loads(line)["text"]
        for lang in ("en", "fr")
        for line in gzip.open(REPO / "corpus" / f"{lang}.jsonl.gz", "rt")
    ]
    out, size = [], 0
    while size < mb * 1e6:
        for t in texts:
            out.append(t)
            size += len(t.encode())
            if size >= mb * 1e6:
                break
    return out


def bench_hf(tok, texts) -> tuple[float, int, list]:
    t = time.perf_counter()
    arrays = []
    for i in range(0, len(texts), 1000):
        arrays += [
            np.asarray(e.ids, dtype=np.uint32)
            for e in tok.encode_batch(texts[i : i + 1000], add_special_tokens=False)
        ]
    seconds = time.perf_counter() - t
    return seconds, sum(map(len, arrays)), arrays


def bench_megatrain(tok, texts, tmp: Path, shard_tokens: int) -> tuple[float, int, Path]:
    state = PrepState(PrepOptions(inputs=[], out=str(tmp / "mt")), Recipe(), SingleComm())
    work = state.work
    shutil.rmtree(work.out, ignore_errors=True)
    work.make()
    with (
        pa.OSFile(str(work.unit(0, "docs.arrow")), "wb") as sink,
        pa.ipc.new_file(sink, stages.DOCS_SCHEMA) as w,
    ):
        for i in range(
            0, len(texts), 1024
        ):  # the unit file the scan stage would have written (not timed)
            chunk = texts[i : i + 1024]
            w.write_batch(
                pa.record_batch(
                    [pa.array(chunk, pa.large_string()), pa.array(["x"] * len(chunk))],
                    schema=stages.DOCS_SCHEMA,
                )
            )
    state.tok, state.dtype = tok, token_dtype(tok.get_vocab_size())
    state.encoder = FastEncoder(tok, texts[:200])
    assert state.encoder.backend == "tiktoken", "tiktoken disagreed with HF on the sample"
    state.offsets = np.array([0, len(texts)])  # one unit, nothing removed by dedup
    t = time.perf_counter()
    stats = stages.tokenize_unit(state, 0)
    for plan in stages.shard_layout(work, [0], shard_tokens):
        stages.write_layout_shard(state, plan)
    return time.perf_counter() - t, stats["tokens"], work.out


def bench_datatrove(tokenizer_file: Path, texts, tmp: Path) -> tuple[float, int, Path] | None:
    try:
        from datatrove.data import Document
        from datatrove.pipeline.tokens.tokenizer import DocumentTokenizer
    except ImportError:
        return None
    out = tmp / "dt"
    shutil.rmtree(out, ignore_errors=True)
    step = DocumentTokenizer(
        str(out),
        tokenizer_name_or_path=str(tokenizer_file),
        eos_token=EOS,
        shuffle_documents=False,
        save_final_metadata=False,
    )
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    t = time.perf_counter()
    result = step.run(iter(docs), rank=0, world_size=1)
    if result is not None and hasattr(result, "__next__"):
        for _ in result:
            pass
    seconds = time.perf_counter() - t
    tokens = sum(p.stat().st_size for p in out.rglob("*.ds")) // 2
    return seconds, tokens, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=20)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()

    texts = corpus(args.mb)
    with tempfile.TemporaryDirectory(prefix="megatrain-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tok = train_bpe(texts[:2000], args.vocab_size)
        tok_file = tmp / "tokenizer.json"
        tok.save(str(tok_file))
        tok.encode_special_tokens = True

        times = {"hf_encode_batch": [], "megatrain": [], "datatrove": [], "megatrain_prep": []}
        tokens = {}
        for _ in range(args.repeats):
            seconds, tokens["hf_encode_batch"], reference = bench_hf(tok, texts)
            times["hf_encode_batch"].append(seconds)
            seconds, tokens["megatrain"], mt_out = bench_megatrain(tok, texts, tmp, 50_000_000)
            times["megatrain"].append(seconds)
            dt = bench_datatrove(tok_file, texts, tmp)
            if dt is not None:
                times["datatrove"].append(dt[0])
                tokens["datatrove"] = dt[1]
            seconds, tokens["megatrain_prep"] = prep_end_to_end(texts, tok_file, tmp)
            times["megatrain_prep"].append(seconds)

        # the ids megatrain wrote, document by document, against HF's
        ds = _read_shards(mt_out, tok)
        identical = len(ds) == len(reference) and all(
            np.array_equal(a[:-1], b) for a, b in zip(ds, reference)
        )
        if not identical:
            raise SystemExit("megatrain's token ids differ from HF tokenizers'")

    rate = {k: tokens[k] / statistics.median(v) for k, v in times.items() if v}
    result = {
        "corpus_mb": round(sum(len(t.encode()) for t in texts) / 1e6, 2),
        "documents": len(texts),
        "vocab_size": tok.get_vocab_size(),
        "threads": 1,
        "repeats": args.repeats,
        "tokens": tokens["hf_encode_batch"],
        **{f"{k}_tokens_per_s": round(v) for k, v in rate.items()},
        "megatrain_vs_hf_encode_batch": round(rate["megatrain"] / rate["hf_encode_batch"], 2),
        "megatrain_vs_datatrove": round(rate["megatrain"] / rate["datatrove"], 2)
        if "datatrove" in rate
        else None,
        "ids_identical_to_hf": identical,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def prep_end_to_end(texts, tok_file: Path, tmp: Path) -> tuple[float, int]:
    from data_prep.launch import run_prep
    from data_prep.state import PrepOptions

    raw, recipe = tmp / "raw.jsonl", tmp / "recipe.yaml"
    if not raw.exists():
        raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        recipe.write_text(
            "dedup: {exact: false}\n"
        )  # the text is the corpus repeated: keep every copy
    shutil.rmtree(tmp / "prep", ignore_errors=True)
    t = time.perf_counter()
    report = run_prep(
        PrepOptions(
            inputs=[str(raw)], out=str(tmp / "prep"), tokenizer=str(tok_file), recipe=str(recipe)
        ),
        log=lambda *_: None,
    )
    return time.perf_counter() - t, report["tokens"]


def _read_shards(directory: Path, tok) -> list[np.ndarray]:
    out = []
    for shard in sorted(directory.glob("shard-*.arrow")):
        reader = pa.ipc.open_file(pa.memory_map(str(shard), "r"))
        for i in range(reader.num_record_batches):
            out += [
                np.asarray(x) for x in reader.get_batch(i).column(0).to_numpy(zero_copy_only=False)
            ]
    return out


if __name__ == "__main__":
    main()
