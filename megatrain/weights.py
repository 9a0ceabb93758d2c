"""A checkpoint's weights as one whole model, read without GPUs or a process group.

megatrain's checkpoints are DeepSpeed's files: under ZeRO 0-2 each tensor-parallel rank's
`mp_rank_XX_model_states.pt` holds its slice of every weight, in the training precision; under
ZeRO-3 the weights live only as fp32 partitions of the optimizer states. `checkpoint_weights()`
verifies a checkpoint (sizes and sha256 against its manifest), then yields each weight whole,
one at a time, under the model's own parameter names: slices of the tensor-parallel plan are put
back together (megatrain.model.TENSOR_PARALLEL_PLAN), files are memory-mapped, so exporting a
large model needs little more memory than its largest tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megatrain.checkpoint import MANIFEST, CheckpointError, complete_tags, tag_for, verify
from megatrain.config import Config
from megatrain.files import read_json
from megatrain.model import TENSOR_PARALLEL_PLAN, Transformer
from megatrain.schema import from_dict


@dataclass
class CheckpointWeights:
    """One verified checkpoint of a run: its manifest, the run's config, and its weights."""

    folder: Path
    manifest: dict
    config: Config

    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def tokens(self) -> int:
        return self.manifest["consumed_samples"] * self.config.data.seq_len

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(parameter name, whole tensor) for every weight, in the model's order."""
        layout = self.manifest.get("layout", {})
        tp, zero = layout.get("tp_size", 1), layout.get("zero_stage", 0)
        if zero == 3:
            if tp > 1:
                raise CheckpointError(
                    f"{self.folder}: ZeRO-3 with tensor parallelism cannot be read here; resume "
                    "the run with parallel.tensor=1 for one step (it converts the checkpoint), "
                    "then export that step"
                )
            yield from _zero3_tensors(self.folder)
        else:
            yield from _module_tensors(self.folder, tp)


def checkpoint_weights(run_dir: str | Path, step: int | None = None) -> CheckpointWeights:
    """The newest complete checkpoint of `run_dir` (or the one of `step`), verified."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    tags = complete_tags(ckpt_dir)
    if not tags:
        raise CheckpointError(
            f"{run_dir} has no complete checkpoint (no {ckpt_dir}/step*/{MANIFEST}): train it "
            "until it saves one (run.ckpt_every, or the end of the run)"
        )
    tag = tag_for(step) if step is not None else tags[-1]
    if tag not in tags:
        raise CheckpointError(
            f"{run_dir} has no complete checkpoint of step {step}; it has "
            + ", ".join(str(int(t.removeprefix("step"))) for t in tags)
        )
    problem = verify(ckpt_dir / tag)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} does not verify: {problem}")
    manifest = read_json(ckpt_dir / tag / MANIFEST)
    return CheckpointWeights(ckpt_dir / tag, manifest, from_dict(Config, manifest["config"]))


def _module_tensors(folder: Path, tp: int) -> Iterator[tuple[str, torch.Tensor]]:
    """ZeRO 0-2: the engine's module state of each tensor-parallel rank, slices joined."""
    ranks = [
        torch.load(folder / f"mp_rank_{r:02d}_model_states.pt", map_location="cpu", mmap=True,
                   weights_only=False)["module"]
        for r in range(tp)
    ]  # fmt: skip
    for name, tensor in ranks[0].items():
        split = _split_of(name)
        if tp == 1 or split is None or (split == "row" and name.endswith(".bias")):
            yield name, tensor  # whole on every rank (a row layer adds its bias after the reduce)
        else:
            yield name, torch.cat([r[name] for r in ranks], dim=0 if split == "column" else 1)


def _split_of(name: str) -> str | None:
    """How tensor parallelism splits parameter `name` (blocks.<i>.<layer>.weight), or None."""
    parts = name.split(".")
    if parts[0] != "blocks":
        return None
    return TENSOR_PARALLEL_PLAN.get(".".join(parts[2:-1]))


def _zero3_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """ZeRO-3: the fp32 weights rebuilt from the optimizer partitions (DeepSpeed's own reader,
    lazily: one tensor at a time)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name,
                                                    lazy_mode=True)  # fmt: skip
    for name, tensor in lazy.items():
        yield name, tensor.contiguous()


def build_model(config: Config, tensors, device: str | torch.device = "cpu") -> Transformer:
    """The model `config` describes, with these weights (fp32 unless they say otherwise)."""
    with torch.device("meta"):
        model = Transformer(config.model, config.data.seq_len)
    state = dict(tensors)
    dtype = next(iter(state.values())).dtype
    model = model.to_empty(device=device).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if model.cfg.tie_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
        model.lm_head.weight = model.tok_embedding.weight
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit the model: missing {missing}, unexpected "
                              f"{unexpected}")  # fmt: skip
    model.reset_buffers()
    return model.eval()
