"""`megatrain eval`: how good a trained model is, offline.

- Perplexity and bits per byte on token data: a run's own validation set (the samples the
  trainer validates on), or any prepared dataset (`--data DIR`, its first `--max-tokens`
  tokens cut into sequences of the model's context). Bits per byte divide the loss by the bytes
  of text the targets stand for, so that models with different tokenizers compare.
- `--tasks`: EleutherAI's lm-evaluation-harness on the model exported to Hugging Face's format,
  with task definitions and data read from local files (configs/eval/ ships a French and an
  English one; `--task-dir` points at others, e.g. pre-downloaded standard tasks).

Results go to RUN_DIR/eval/*.json (the run an exported model came from, when it is still
there) and, when the run logged to W&B, into that W&B run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from megatrain.data import IGNORE_INDEX, PackedSamples, validation_batches
from megatrain.errors import MegatrainError
from megatrain.files import write_json
from megatrain.shards import Dataset
from megatrain.tokens import token_bytes


@torch.no_grad()
def token_loss(model, batches, device) -> tuple[float, int, np.ndarray]:
    """(summed cross-entropy in nats, targets counted, the target ids) over `batches`."""
    nll, count, targets = 0.0, 0, []
    for b in batches:
        x, y = b.inputs.to(device), b.targets.to(device)
        logits = model(x).float()
        losses = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none"
        )
        keep = y.reshape(-1) != IGNORE_INDEX
        nll += float(losses[keep].sum())
        count += int(keep.sum())
        targets.append(y.reshape(-1)[keep].cpu().numpy())
    return nll, count, np.concatenate(targets) if targets else np.zeros(0, np.int64)


def perplexity(model, tokenizer, batches, device, name: str) -> dict:
    """Mean loss, perplexity and bits per byte of `model` on `batches`."""
    started = time.perf_counter()
    nll, count, targets = token_loss(model, batches, device)
    if not count:
        raise MegatrainError(f"no tokens to evaluate in {name}")
    sizes = np.asarray(token_bytes(tokenizer), dtype=np.int64)
    n_bytes = int(sizes[targets].sum())
    loss = nll / count
    return {
        "data": name,
        "tokens": count,
        "bytes": n_bytes,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else None,
        "seconds": time.perf_counter() - started,
    }


def validation_set(config, dp_size: int, micro_batch: int = 8):
    """The samples the trainer validated `config`'s run on, which it ran on `dp_size`
    data-parallel ranks (they decide how many samples the set holds)."""
    sources = [
        PackedSamples(
            Dataset(s.path),
            config.data.seq_len,
            config.data.val_fraction,
            config.run.seed + 1000 * i,
        )
        for i, s in enumerate(config.data.sources)
    ]
    total = config.run.eval_batches * config.batch.micro_batch * dp_size
    weights = [s.weight for s in config.data.sources]
    return validation_batches(sources, weights, total, micro_batch, 0, 1)


def dataset_batches(directory: str | Path, seq_len: int, max_tokens: int, micro_batch: int = 8):
    """The first `max_tokens` tokens of a prepared dataset, in sequences of `seq_len`."""
    from megatrain.data import Batch

    stream = Dataset(directory).stream
    n = min(max_tokens, len(stream) - 1) // seq_len
    if n == 0:
        raise MegatrainError(f"{directory} holds fewer than {seq_len + 1} tokens")
    rows = np.stack([stream.read(i * seq_len, i * seq_len + seq_len + 1) for i in range(n)])
    tokens = torch.from_numpy(rows.astype(np.int64))
    return [
        Batch(tokens[i : i + micro_batch, :-1], tokens[i : i + micro_batch, 1:])
        for i in range(0, n, micro_batch)
    ]


def results_dir(path: Path) -> Path:
    """RUN_DIR/eval, or the eval/ of the run an exported model came from, else DIR/eval."""
    if (path / "checkpoints").is_dir():
        return path / "eval"
    try:
        run = Path(json.loads((path / "config.json").read_text())["megatrain"]["run_dir"])
        if run.is_dir():
            return run / "eval"
    except (OSError, KeyError, ValueError):
        pass
    return path / "eval"


def save_results(path: Path, name: str, results: dict) -> Path:
    folder = results_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.json"
    write_json(out, results, indent=2)
    return out
