"""Helpers for tests that start training processes or read run outputs."""
from __future__ import annotations

import gzip
import json
import os
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


def run_train(config: Path | str, overrides: list[str], nproc: int = 2, timeout: int = 600,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=N -m megatrain.cli train CONFIG overrides`, on its own port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "megatrain.cli", "train", str(config), *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise AssertionError(f"training failed (rc {result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
