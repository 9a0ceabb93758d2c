"""Shared fixtures; every process the tests start gets offline W&B, one thread, a cached
DeepSpeed op."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO, corpus_sample

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("MEGATRAIN_CONFIGS", str(REPO / "configs"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared dataset (vocab 512, several shards) from a sample of the bundled corpus."""
    from data_prep.launch import run_prep
    from data_prep.state import PrepOptions

    root = tmp_path_factory.mktemp("tiny_dataset")
    inputs = corpus_sample(root / "raw")
    out = root / "data"
    run_prep(
        PrepOptions(inputs=[str(inputs)], out=str(out), vocab_size=512, shard_tokens=40_000),
        log=lambda *_: None,
    )
    return out
