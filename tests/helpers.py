"""Helpers for tests that start training or prep processes or read their outputs."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "corpus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus_sample(out_dir: Path, docs_per_language: int = 60) -> Path:
    """A few dozen real French and English documents from the bundled corpus, as jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for lang in ("en", "fr"):
        with gzip.open(CORPUS / f"{lang}.jsonl.gz", "rt") as f:
            lines = [line for _, line in zip(range(docs_per_language), f)]
        (out_dir / f"{lang}.jsonl").write_text("".join(lines))
    return out_dir


def train_command(config: Path | str, overrides: list[str], nproc: int = 2) -> list[str]:
    """`torchrun --nproc_per_node=N -m megatrain.cli train CONFIG overrides`, on its own port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "megatrain.cli",
        "train",
        str(config),
        *overrides,
    ]


def run_train(
    config: Path | str,
    overrides: list[str],
    nproc: int = 2,
    timeout: int = 600,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run `train_command(config, overrides, nproc)`; a failure raises with its output."""
    result = subprocess.run(
        train_command(config, overrides, nproc),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise AssertionError(
            f"training failed (rc {result.returncode}):\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-6000:]}"
        )
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step, from a run's metrics.jsonl (a resumed step: its later record)."""
    return {r["step"]: r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")}


def events(run_dir: Path, *names: str) -> list[dict]:
    """A run's events.jsonl records, oldest first; only those of the given kinds if any."""
    records = read_jsonl(Path(run_dir) / "events.jsonl")
    return [e for e in records if not names or e["event"] in names]


# ----------------------------------------------------------------------------- prep test corpus

SPAM = {
    "short": "Click here.",
    "symbols": " ".join(["#tag #win #free #now ###"] * 40),
    "repeated": "\n".join(
        [
            "The best way to learn about the history of the town is to read the old letters and "
            "the records that the merchants have kept with care."
        ]
        * 30
    ),
    "german": (
        "Der Fluss, der durch die Altstadt fließt, war mehr als tausend Jahre lang eine Quelle "
        "für Wasser, Nahrung und Handel. Im Frühling, wenn in den Bergen der Schnee schmilzt, "
        "steigt das Wasser schnell an, und die Bauern, die an seinen Ufern leben, treiben ihre "
        "Tiere auf höher gelegene Weiden. Historiker haben im Archiv des Rathauses Berichte über "
        "große Überschwemmungen gefunden, dazu Briefe von Kaufleuten, die sich beklagten, dass "
        "die Schiffe den Hafen wochenlang nicht erreichen konnten."
    ),
}


def _edit(text: str, every: int = 40) -> str:
    """The same text with one word in `every` replaced: a near duplicate (Jaccard of 5-shingles
    ~0.85)."""
    words = text.split(" ")
    return " ".join("modified" if i % every == 7 else w for i, w in enumerate(words))


def planted_corpus(out_dir: Path, per_language: int = 24) -> dict:
    """Real documents spread over jsonl, .gz, .zst, txt and parquet files, with planted duplicates
    in other files than their originals, spam for each filter and broken input of every kind.

    Returns what a prep with configs/data/fr-en.yaml must find: planted exact and near duplicates,
    the location of each spam document, and the rejected records by kind.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    out_dir.mkdir(parents=True, exist_ok=True)
    docs = {}
    for lang in ("en", "fr"):
        with gzip.open(CORPUS / f"{lang}.jsonl.gz", "rt") as f:
            # long real documents, which pass the quality and repetition rules
            texts = [json.loads(line)["text"] for line in f]
        docs[lang] = [t for t in texts if 3000 < len(t) < 12000][: per_language + 3]
    en, fr = docs["en"], docs["fr"]

    def jsonl(records):
        return "".join(
            (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records
        )

    a = [{"text": t} for t in en[:8]] + [
        {"text": SPAM["short"]},
        "{broken json",
        {"body": "no text"},
        json.dumps({"text": "surrogate \ud800 " + en[8]}),
    ]
    (out_dir / "a.jsonl").write_text(jsonl(a))
    b = [{"text": t} for t in fr[:8]] + [
        {"text": en[2]},
        {"text": _edit(en[3])},
        {"text": SPAM["symbols"]},
    ]
    (out_dir / "b.jsonl").write_text(jsonl(b))
    with gzip.open(out_dir / "c.jsonl.gz", "wt") as f:
        f.write(
            jsonl([{"text": t} for t in en[9:14]] + [{"text": fr[4]}, {"text": SPAM["repeated"]}])
        )
    (out_dir / "d.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(
            jsonl(
                [{"text": t} for t in fr[8:13]] + [{"text": _edit(fr[5])}, {"text": SPAM["german"]}]
            ).encode()
        )
    )
    (out_dir / "e.txt").write_text(en[14])
    pq.write_table(
        pa.table({"text": en[15:20] + [fr[6], None]}), out_dir / "f.parquet", row_group_size=3
    )
    # a bigger plain file, cut into several units by a small read.unit_mb
    big = [{"text": t} for t in fr[13:per_language] + en[20:per_language]] + [{"text": en[0]}]
    (out_dir / "g.jsonl").write_text(jsonl(big))
    # broken input
    (out_dir / "h-latin1.jsonl").write_bytes(
        json.dumps({"text": en[1][:3000].replace("the", "thé")}, ensure_ascii=False).encode(
            "latin-1", "replace"
        )
        + b"\n"
    )
    (out_dir / "i-empty.jsonl").write_text("")
    with gzip.open(out_dir / "j.jsonl.gz", "wt") as f:
        f.write(jsonl([{"text": t} for t in fr[per_language:]]))
    (out_dir / "j.jsonl.gz").write_bytes(
        (out_dir / "j.jsonl.gz").read_bytes()[:-200]
    )  # truncated archive
    (out_dir / "k-huge.jsonl").write_text(
        jsonl([{"text": "word " * 400_000}])
    )  # 2 MB: over max_doc_chars
    # binary data named .txt (seeded, so every run plans the same), and a dangling symlink
    (out_dir / "l-noise.txt").write_bytes(random.Random(0).randbytes(1 << 16))
    (out_dir / "m-link.jsonl").symlink_to(out_dir / "moved-away.jsonl")
    return {
        "exact": 4,  # en[2] in b, fr[4] in c, fr[6] in f, en[0] in g
        "near": 2,  # edited en[3] in b, edited fr[5] in d
        "spam": {
            "length": f"{out_dir / 'a.jsonl'}:9",
            "quality": f"{out_dir / 'b.jsonl'}:11",
            "repetition": f"{out_dir / 'c.jsonl.gz'}:7",
            "language": f"{out_dir / 'd.jsonl.zst'}:7",
        },
        "rejected": {"malformed_json": 1, "missing_field": 2, "too_long": 1},
        "repaired": {"invalid_utf8": 1, "lone_surrogate": 1},
        "file_problems": {
            "binary_file": 1,
            "empty_file": 1,
            "truncated_or_corrupt_archive": 1,
            "unreadable": 1,
        },
    }


# The planted corpus' recipe: every stage on, the language filter early so that the German spam
# document is caught by it (not by the stop-word rule), tiny units so files are cut in several.
PLANTED_RECIPE = """
read: {max_doc_chars: 1000000, unit_mb: 0.02}
filters:
  - {name: length, min_chars: 200}
  - {name: language, languages: [en, fr]}
  - {name: quality}
  - {name: repetition}
dedup: {exact: true, near: {enabled: true}}
tokenizer: {vocab_size: 1024}
output: {shard_tokens: 60000}
"""


def planted_reference(root: Path) -> Path:
    """root/raw (the planted corpus), root/recipe.yaml (PLANTED_RECIPE) and root/ref, the
    output of a plain 1-process prep of them: what any parallel run must reproduce."""
    from data_prep.launch import run_prep
    from data_prep.state import PrepOptions

    planted_corpus(root / "raw")
    (root / "recipe.yaml").write_text(PLANTED_RECIPE)
    opts = PrepOptions(
        inputs=[str(root / "raw")], out=str(root / "ref"), recipe=str(root / "recipe.yaml")
    )
    run_prep(opts, log=lambda *_: None)
    return root


def output_bytes(out: Path) -> dict[str, bytes]:
    """The files of a prepared dataset that a trainer reads: manifest, tokenizer, shards."""
    names = ["manifest.json", "tokenizer.json", *sorted(p.name for p in out.glob("shard-*.arrow"))]
    return {name: (out / name).read_bytes() for name in names}


def prep_summaries(output: str) -> int:
    """How many times `megatrain prep`'s closing line ("prep: N documents in, ...") appears."""
    return output.count(" documents in, ")


# ----------------------------------------------------------------------------- processes
# read through /proc (Linux): the fault benchmarks and tests find and signal real ranks


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has exited


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(x.split("=", 1) for x in raw.decode(errors="replace").split("\0") if "=" in x)


def kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # gone already


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]
