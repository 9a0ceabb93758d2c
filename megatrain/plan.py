"""The run plan: what a config means on a number of processes, before anything is built.

    vocabulary       the dataset's, rounded up to `model.vocab_multiple`, or the config's
    parallel layout  data-parallel size = processes / tensor-parallel size, with the splits checked
    batch layout     micro-batch x accumulation x data-parallel ranks = global batch
    budget           optimizer steps and tokens
    model size       parameters and training FLOPs per token

`plan_run` is pure (no I/O, no process group, no GPU): `megatrain train` and `--dry-run` call
the same function, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

from megatrain.config import Config, ConfigError, ModelConfig
from megatrain.model import count_params, flops_per_token, mlp_hidden_size


@dataclass
class BatchLayout:
    """The batch resolved against the number of data-parallel ranks."""

    micro_batch: int
    grad_accum: int
    dp_size: int
    seq_len: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def resolve_batch(cfg: Config, dp_size: int) -> BatchLayout:
    """global_batch = micro_batch x grad_accum x dp_size, from whichever of them the config
    gives."""
    b, seq = cfg.batch, cfg.data.seq_len
    target = b.global_batch
    if b.global_tokens:
        if b.global_tokens % seq:
            raise ConfigError(
                f"'batch.global_tokens' ({b.global_tokens}) is not a multiple of "
                f"'data.seq_len' ({seq})"
            )
        if target and target != b.global_tokens // seq:
            raise ConfigError(
                "'batch.global_batch' and 'batch.global_tokens' disagree; set only one"
            )
        target = b.global_tokens // seq
    if b.grad_accum:
        layout = BatchLayout(b.micro_batch, b.grad_accum, dp_size, seq)
        if target and layout.global_batch != target:
            raise ConfigError(
                f"micro_batch {b.micro_batch} x grad_accum {b.grad_accum} x {dp_size} ranks = "
                f"{layout.global_batch} sequences, but the global batch asked for is {target}; "
                "drop 'batch.grad_accum' to derive it"
            )
        return layout
    if not target:
        return BatchLayout(b.micro_batch, 1, dp_size, seq)
    per_step = b.micro_batch * dp_size
    if target % per_step:
        raise ConfigError(
            f"global batch {target} sequences is not divisible by micro_batch {b.micro_batch} x "
            f"{dp_size} data-parallel ranks = {per_step}; change 'batch.micro_batch' or the "
            "global batch"
        )
    return BatchLayout(b.micro_batch, target // per_step, dp_size, seq)


def validate_tensor_parallel(
    cfg: Config, world_size: int, local_world_size: int | None = None
) -> None:
    """Every split must be even, and a tensor-parallel group must not span nodes (checked when
    the processes per node are known); errors name the key."""
    tp, m = cfg.parallel.tensor, cfg.model
    if world_size % tp:
        raise ConfigError(
            f"'parallel.tensor' ({tp}) must divide the number of processes ({world_size})"
        )
    checks = [
        ("model.n_head", m.n_head),
        ("model.n_kv_head", m.n_kv_head or m.n_head),
        ("model.d_ff", mlp_hidden_size(m)),
    ]
    for key, value in checks:
        if value % tp:
            raise ConfigError(
                f"'{key}' ({value}) is not divisible by 'parallel.tensor' ({tp}): each of the {tp} "
                f"ranks would get an uneven share; change one of them"
            )
    if tp > 1 and local_world_size and local_world_size % tp:
        raise ConfigError(
            f"'parallel.tensor' ({tp}) does not divide the {local_world_size} processes per "
            "node: a tensor-parallel group would span nodes (all-reduces twice per layer over "
            "the network); use a tensor size that divides the GPUs per node"
        )


@dataclass(frozen=True)
class RunPlan:
    """Everything `plan_run` resolves; `model` has its vocabulary size set."""

    model: ModelConfig
    world_size: int
    tp_size: int
    dp_size: int
    layout: BatchLayout
    max_steps: int
    params: int
    non_embedding_params: int
    flops_per_token: int

    @property
    def total_tokens(self) -> int:
        return self.max_steps * self.layout.tokens_per_step

    def summary(self) -> dict:
        """The plan as flat JSON (what `megatrain train --dry-run` prints)."""
        L = self.layout
        return {
            "params": self.params,
            "non_embedding_params": self.non_embedding_params,
            "flops_per_token": self.flops_per_token,
            "vocab_size": self.model.vocab_size,
            "seq_len": L.seq_len,
            "world_size": self.world_size,
            "dp_size": self.dp_size,
            "tp_size": self.tp_size,
            "micro_batch": L.micro_batch,
            "grad_accum": L.grad_accum,
            "global_batch": L.global_batch,
            "tokens_per_step": L.tokens_per_step,
            "max_steps": self.max_steps,
            "total_tokens": self.total_tokens,
        }


def resolve_vocab(model: ModelConfig, dataset_vocab: int | None) -> int:
    """The embedding table's size: the config's `model.vocab_size` (which must hold every id of
    the dataset), or the dataset's when it is 0, rounded up to `model.vocab_multiple` either way
    (GPT-2's 50,257 becomes 50,304: the output layer's matrix products run on aligned shapes)."""
    vocab = model.vocab_size or dataset_vocab
    if vocab is None:
        raise ConfigError("'model.vocab_size' is 0 and no dataset says what it should be")
    if dataset_vocab is not None and vocab < dataset_vocab:
        raise ConfigError(
            f"'model.vocab_size' ({vocab}) is smaller than the tokenizer's ({dataset_vocab}); set "
            "it to 0 to take the dataset's"
        )
    return model.vocab_multiple * math.ceil(vocab / model.vocab_multiple)


def plan_run(
    cfg: Config,
    world_size: int,
    dataset_vocab: int | None = None,
    local_world_size: int | None = None,
) -> RunPlan:
    """Resolve `cfg` for `world_size` processes (`local_world_size` of them per node, if known)
    training on a dataset of `dataset_vocab` token ids."""
    model = dataclasses.replace(cfg.model, vocab_size=resolve_vocab(cfg.model, dataset_vocab))
    validate_tensor_parallel(cfg, world_size, local_world_size)
    tp = cfg.parallel.tensor
    layout = resolve_batch(cfg, world_size // tp)  # ranks r // tp share a tensor-parallel group
    counts = model_size(model, cfg.data.seq_len)
    return RunPlan(
        model=model,
        world_size=world_size,
        tp_size=tp,
        dp_size=world_size // tp,
        layout=layout,
        max_steps=cfg.run.max_steps or math.ceil(cfg.run.max_tokens / layout.tokens_per_step),
        params=counts["params"],
        non_embedding_params=counts["non_embedding_params"],
        flops_per_token=counts["flops_per_token"],
    )


def model_size(model: ModelConfig, seq_len: int) -> dict[str, int]:
    """Parameters and training FLOPs per token (each counted on a meta-device model: cached, as
    `megatrain plan --search` asks for the same model hundreds of times)."""
    return dict(_model_size(json.dumps(dataclasses.asdict(model), sort_keys=True), seq_len))


@functools.lru_cache(maxsize=32)
def _model_size(model_json: str, seq_len: int) -> tuple:
    model = ModelConfig(**json.loads(model_json))
    counts = count_params(model, seq_len)
    return (*counts.items(), ("flops_per_token", flops_per_token(model, seq_len)))
