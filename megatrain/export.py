"""`megatrain export RUN_DIR --out DIR`: a run's checkpoint as a Hugging Face model directory.

    DIR/
      model.safetensors                 the weights (model-0000i-of-0000n.safetensors and
                                        model.safetensors.index.json above SHARD_BYTES)
      config.json                       LlamaForCausalLM or GPT2LMHeadModel, and under
                                        "megatrain": run, step, tokens seen, checkpoint hashes
      generation_config.json
      tokenizer.json, tokenizer_config.json, special_tokens_map.json   EOS = BOS = pad
      README.md                         the model card: where the model comes from

`transformers` loads it offline (`AutoModelForCausalLM.from_pretrained(DIR)`), and so does
megatrain (`megatrain generate DIR`, `model.init_from: DIR`). The weights stream from the
checkpoint one tensor at a time; the directory appears whole or not at all (written under a
temporary name, then renamed).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from megatrain.errors import need
from megatrain.files import fsync_file, sha256_file, temp_path, write_json
from megatrain.hf import family, hf_config, to_hf
from megatrain.weights import CheckpointWeights, checkpoint_weights

SHARD_BYTES = 2 * 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EOS = "<|endoftext|>"


def run_tokenizer(run_dir: Path, weights: CheckpointWeights) -> Path:
    """The tokenizer the run was trained with: the copy in the run directory, else the dataset's."""
    from megatrain.shards import Manifest

    kept = Path(run_dir) / "tokenizer.json"
    if kept.is_file():
        return kept
    source = Path(weights.config.data.sources[0].path)
    return source / Manifest.read(source).tokenizer_file


def export(
    run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str | None = None
) -> Path:
    """Write checkpoint `step` (default: the newest) of `run_dir` to `out`; returns `out`."""
    from megatrain.checkpoint import CheckpointError

    started = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    weights = checkpoint_weights(run_dir, step)
    cfg, m = weights.config, weights.config.model
    kind = family(m)  # a model HF cannot express stops here, before anything is written
    dtype = dtype or cfg.precision
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: choose another --out or remove it")
    tokenizer = run_tokenizer(run_dir, weights)
    from tokenizers import Tokenizer

    eos = Tokenizer.from_file(str(tokenizer)).token_to_id(EOS)
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = write_weights(tmp, to_hf(m, weights.tensors()), DTYPES[dtype])
    provenance = {
        "run": cfg.run.name,
        "run_dir": str(run_dir.resolve()),
        "step": weights.step,
        "tokens": weights.tokens,
        "checkpoint": weights.folder.name,
        "checkpoint_sha256": {n: f["sha256"] for n, f in weights.manifest["files"].items()},
        "tokenizer_sha256": sha256_file(tokenizer),
    }
    write_json(
        tmp / "config.json",
        hf_config(m, cfg.data.seq_len, eos, _hf_dtype(dtype), provenance),
        indent=2,
    )
    write_json(
        tmp / "generation_config.json",
        {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos},
        indent=2,
    )
    shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS}
    write_json(tmp / "special_tokens_map.json", special, indent=2)
    write_json(
        tmp / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "model_max_length": cfg.data.seq_len,
            "clean_up_tokenization_spaces": False,
        },
        indent=2,
    )
    (tmp / "README.md").write_text(model_card(weights, kind, dtype, files, provenance))
    for f in tmp.iterdir():
        fsync_file(f)
    os.replace(tmp, out)
    print(
        f"megatrain export: {out} ({kind}, {dtype}, step {weights.step}, "
        f"{time.perf_counter() - started:.1f} s)"
    )
    return out


def _hf_dtype(dtype: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]


def write_weights(folder: Path, tensors, dtype: torch.dtype) -> list[str]:
    """safetensors shards of at most SHARD_BYTES (one file below that), and the index that maps
    each tensor to its shard when there are several; returns the file names."""
    save_file = need("safetensors.torch", "hf").save_file
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        nonlocal current, size
        if current:
            save_file(current, str(folder / f"part-{len(shards):05d}"), metadata={"format": "pt"})
            shards.append(list(current))
            current, size = {}, 0

    for name, t in tensors:
        t = t.to(dtype).contiguous()
        if t.untyped_storage().nbytes() > t.nbytes:  # a view into a bigger buffer (ZeRO-3's):
            t = t.clone()  # safetensors stores whole storages and refuses shared ones
        if size and size + t.nbytes > SHARD_BYTES:
            flush()
        current[name], size = t, size + t.nbytes
    flush()
    if len(shards) == 1:
        os.replace(folder / "part-00000", folder / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {}
    for i, (name, keys) in enumerate(zip(names, shards)):
        os.replace(folder / f"part-{i:05d}", folder / name)
        index.update({k: name for k in keys})
    total = sum((folder / n).stat().st_size for n in names)
    write_json(
        folder / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": index},
        indent=2,
    )
    return names


def model_card(
    weights: CheckpointWeights, kind: str, dtype: str, files: list[str], provenance: dict
) -> str:
    cfg = weights.config
    cls = "GPT2LMHeadModel" if kind == "gpt2" else "LlamaForCausalLM"
    hashes = "\n".join(f"| `{n}` | `{h}` |" for n, h in provenance["checkpoint_sha256"].items())
    config = yaml.safe_dump(asdict(cfg), sort_keys=False)
    return f"""# {cfg.run.name}

A {cls} trained with megatrain and exported from its checkpoint:

| | |
| --- | --- |
| run | `{provenance["run_dir"]}` |
| checkpoint | `{weights.folder.name}` (step {weights.step:,}) |
| tokens seen | {weights.tokens:,} |
| context length | {cfg.data.seq_len} tokens |
| weights | {dtype}, {", ".join(f"`{f}`" for f in files)} |
| tokenizer | byte-level BPE, `tokenizer.json` (sha256 `{provenance["tokenizer_sha256"]}`) |

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("DIR")
tokenizer = AutoTokenizer.from_pretrained("DIR")
```

Documents are separated by `{EOS}`, which is also the BOS and padding token.

## Checkpoint files (sha256)

| file | sha256 |
| --- | --- |
{hashes}

## Training configuration

```yaml
{config}```
"""
