"""Typed run configuration.

A run is described by one YAML file (see configs/) whose sections map onto the
dataclasses below; every field has a docstring, which `megatrain config-doc`
renders into docs/config.md. Loading goes:

    YAML file -> `key=value` overrides -> model preset merged in -> dataclasses
    (types checked, unknown keys refused with the closest valid name) -> cross-field checks

so a typo such as `optim.learning_rate=1e-3` stops the run at once with
"unknown key 'optim.learning_rate'; did you mean 'optim.lr'?".
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatrain.schema import (
    ConfigError,
    Range,
    apply_override,
    check_ranges,
    field_docs,
    from_dict,
    read_yaml,
)

# ----------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer (see megatrain/model.py)."""

    preset: str | None = None
    """Name of a file in configs/models/ (e.g. `gopher-117m`); fields set here override
    the preset's."""
    init_from: str = ""
    """A local Hugging Face model directory (LlamaForCausalLM or GPT2LMHeadModel) to start from:
    its config.json sets the shape (fields here must agree or stay unset) and its weights the
    first step; the data must be tokenized with its tokenizer.json. A resumed run ignores it."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the dataset manifest; either is rounded up to
    `vocab_multiple`."""
    vocab_multiple: int = 64
    """Pad the embedding table to a multiple of this (faster matmuls on GPU)."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Number of attention heads."""
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention; 0 means equal to `n_head` (plain multi-head)."""
    d_model: int = 128
    """Width of the residual stream."""
    d_ff: int = 0
    """Hidden width of the MLP; 0 derives it: 4*d_model for GELU, 8/3*d_model (rounded to 64)
    for SwiGLU."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """MLP type: LLaMA's gated SwiGLU or GPT-2's GELU."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalization layer, applied before attention and MLP (pre-norm)."""
    norm_eps: float = 1e-5
    """Epsilon of the normalization layers."""
    position: Literal["rope", "learned"] = "rope"
    """Rotary position embeddings (LLaMA) or a learned position table (GPT-2)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    bias: bool = False
    """Biases in linear layers and norms (GPT-2 has them, LLaMA does not)."""
    tie_embeddings: bool = False
    """Share the token embedding matrix with the output head."""
    dropout: float = 0.0
    """Dropout on attention and residual branches (0 for pretraining at scale)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init; output projections are scaled by
    1/sqrt(2*n_layer)."""


@dataclass
class DataSource:
    """One tokenized dataset (a directory written by `megatrain prep`) in the training mixture."""

    path: str = ""
    """Directory holding manifest.json and the Arrow shards."""
    weight: float = 1.0
    """Relative sampling weight in the mixture (normalized over all sources)."""


@dataclass
class DataConfig:
    """What the model reads and how it is cut into samples."""

    sources: list[DataSource] = field(default_factory=list)
    """Datasets to train on, e.g. `[{path: data/demo}]`; override one path with
    `data.sources.0.path=DIR`."""
    seq_len: int = 1024
    """Context length in tokens; documents are packed back to back, separated by EOS."""
    val_fraction: float = 0.005
    """Fraction of samples held out for validation."""
    verify_checksums: bool = True
    """Check each shard's sha256 against the manifest before reading it."""
    prefetch: int = 2
    """Batches prepared ahead of time by a background thread."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 6e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 6e-5
    """Floor of the decay; at most `lr`."""
    warmup_steps: int = 100
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from `lr` to `min_lr` over the rest of the run."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to norms, biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""


@dataclass
class BatchConfig:
    """How many sequences make a step: global = micro_batch x grad_accum x data-parallel size."""

    micro_batch: int = 8
    """Sequences per GPU (or CPU process) per forward/backward."""
    grad_accum: int = 0
    """Micro-batches accumulated per optimizer step; 0 derives it from `global_batch` or
    `global_tokens`."""
    global_batch: int = 0
    """Sequences per optimizer step over all ranks; 0 derives it."""
    global_tokens: int = 0
    """Tokens per optimizer step (global_batch x seq_len); an alternative to `global_batch`."""


@dataclass
class ParallelConfig:
    """How the model is spread over devices (applied by megatrain/parallel.py)."""

    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters sharded."""
    tensor: int = 1
    """Tensor-parallel degree (ranks sharing each layer)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states in CPU memory (ZeRO-Offload)."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep parameters in CPU memory (ZeRO-3 only)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""


@dataclass
class RunConfig:
    """Length, cadence and bookkeeping of a run."""

    name: str = "run"
    """Run name, shown in logs and in Weights & Biases."""
    dir: str = ""
    """Run directory (metrics, checkpoints, W&B files); empty means runs/<name>."""
    max_steps: int = 0
    """Optimizer steps to train; 0 derives it from `max_tokens`."""
    max_tokens: float = 0
    """Token budget; used when `max_steps` is 0."""
    stop_at_step: int = 0
    """Stop with a checkpoint after this step even if the schedule is longer
    (0: run to max_steps); for time-boxed jobs."""
    seed: int = 1234
    """Seed for weights and data order; same seed, data and config give the same losses."""
    log_every: int = 10
    """Steps between metrics lines."""
    eval_every: int = 0
    """Steps between validation passes (0: only at the end)."""
    eval_batches: int = 10
    """Micro-batches per validation pass on each rank."""
    ckpt_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    ckpt_at_end: bool = True
    """Save a checkpoint when the run reaches its step budget (benchmarks turn it off; a stop
    on a signal or at `stop_at_step` always saves)."""
    keep: int = 3
    """Most recent checkpoints kept; older ones are deleted (0: keep them all)."""
    keep_every: int = 0
    """Also keep, forever, the checkpoints of steps that are multiples of this (0: none)."""
    resume: Literal["auto", "never"] = "auto"
    """`auto` continues from the run directory's latest valid checkpoint, if any (and stops by
    name if it has checkpoints and none verifies); `never` starts afresh, moving any earlier
    checkpoints and metrics.jsonl into checkpoints/superseded-<time>/."""
    allow_changes: list[str] = field(default_factory=list)
    """What a resume may find changed since the checkpoint, e.g. `[optim.lr, data]`; any other
    change is refused by name. Names: `data` (the datasets or their weights), `tokenizer`, `optim`
    or one `optim.*` key, `batch` or one `batch.*` key, `run.seed`, `data.seq_len`,
    `data.val_fraction`, `model.dropout`. The model's shape and `precision` never change within
    a run."""
    deterministic: bool = False
    """Only deterministic kernels on GPU (slower: the math attention kernel, a fixed cuBLAS
    workspace), so that two runs, or a run and its resumed copy, give the same losses bit for
    bit as on CPU."""
    compile: bool = True
    """torch.compile each transformer block on GPU (not under ZeRO-3; never on CPU); a block
    that cannot be compiled runs eagerly, and events.jsonl says how many graphs and breaks."""
    max_restarts: int = 100
    """Most times a Slurm job requeues itself (SLURM_RESTART_COUNT), after a time-limit
    warning or a crash (`megatrain recover`); 100 x 20 h jobs is ~12 weeks. Two crashes in a
    row without a new checkpoint stop the chain sooner."""
    hang_timeout_s: float = 0
    """Seconds a rank may go without completing a step before its watchdog writes every thread's
    stack to RUN_DIR/hangs/, logs a `hang` event and exits (code 3), ending the job; 0: automatic,
    the larger of 600 s and `hang_factor` x the median step time so far."""
    hang_factor: float = 10.0
    """With `hang_timeout_s` 0: a step this many times slower than the median counts as a hang."""
    hang_slow_s: float = 3600.0
    """The least time allowed for start-up (until the first step ends: compilation, NCCL set-up),
    an evaluation and a checkpoint save, whatever `hang_timeout_s` says."""
    collective_timeout_s: float = 1800
    """Seconds a collective (NCCL, gloo) waits for its peers before it fails with an error (a
    dead peer also surfaces at once as an NCCL error: TORCH_NCCL_ASYNC_ERROR_HANDLING=1)."""
    straggler_factor: float = 1.5
    """A rank whose forward time over a log interval is at least this many times the median of all
    ranks' is slow that interval (metrics: `slowest_rank`, `slowest_rank_ratio`); above 1, or 0:
    no straggler events. With 2 ranks the ratio stays below 2."""
    straggler_intervals: int = 3
    """Log intervals in a row a rank must be slow before rank 0 logs one `straggler` event naming
    it (and as many below the factor before `straggler_recovered`)."""


@dataclass
class GuardConfig:
    """Stability guard: skip non-finite updates, flag loss spikes, roll back after repeated
    trouble."""

    spike_window: int = 100
    """Recent steps whose losses the spike detector compares each new loss against."""
    spike_zscore: float = 6.0
    """A loss this many standard deviations above the window's mean is a spike
    (0 disables spike detection)."""
    max_bad_steps: int = 3
    """Bad steps (non-finite or spike) in a row before rolling back to the last checkpoint
    (0: never roll back); with no checkpoint to roll back to, this many non-finite steps (loss
    or gradients) in a row stop the run with an error."""
    max_rollbacks: int = 5
    """Rollbacks allowed in one job before the run stops with an error."""


@dataclass
class WandbConfig:
    """Weights & Biases logging; compute nodes have no internet, so offline is the default."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """`offline` writes RUN_DIR/wandb/ for a later `wandb sync`; `online` needs network."""
    project: str = "megatrain"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None uses your default."""


@dataclass
class SlurmOptions:
    """How to ask this cluster's Slurm for nodes (used by `megatrain submit`;
    slurm/pretrain.sh shows the same flags)."""

    partition: str = ""
    """`--partition`; empty: the cluster's default (Jean Zay picks its GPU partitions from
    `constraint`)."""
    constraint: str = ""
    """`-C/--constraint`, e.g. `v100-32g`, `a100`, `h100` on Jean Zay."""
    account_suffix: str = ""
    """Appended to a project name to make `--account`: `xyz` -> `xyz@h100` on Jean Zay."""
    qos: dict[str, str] = field(default_factory=dict)
    """QoS names by short name, e.g.
    `{dev: qos_gpu_h100-dev, t3: qos_gpu_h100-t3, t4: qos_gpu_h100-t4}`."""
    qos_max_hours: dict[str, float] = field(default_factory=dict)
    """Longest job each QoS accepts (same keys as `qos`), e.g. `{dev: 2, t3: 20, t4: 100}`."""
    default_qos: str = ""
    """QoS used when none is asked for; a longer job gets the shortest non-dev QoS that fits its
    time."""
    cpus_per_task: int = 1
    """`--cpus-per-task` of one task (one GPU): the node's cores divided by its GPUs."""
    hint: str = ""
    """`--hint`, e.g. `nomultithread` (one task thread per physical core)."""
    signal_s: int = 300
    """Warning before the time limit (`--signal=USR1@N`), to finish a step and save; Slurm may
    send it up to a minute earlier."""
    extra: list[str] = field(default_factory=list)
    """Further sbatch options as on the command line, e.g. `[--exclusive]`."""


@dataclass
class ClusterProfile:
    """A machine the run executes on (configs/clusters/<name>.yaml): what MFU and CO2 are
    computed against."""

    name: str = "local"
    """Profile name (the file's stem)."""
    description: str = ""
    """One line about the machine."""
    accelerator: str = "cpu"
    """Device model, a key of megatrain/hardware.py's table (e.g. `H100-SXM`, `A100-SXM-80GB`,
    `V100-SXM2-32GB`, `cpu`)."""
    device_power_w: float = 0.0
    """Power drawn per device (GPU board power, or per CPU process), used when energy cannot be
    measured; 0 takes the table's value."""
    peak_tflops: dict[str, float] = field(default_factory=dict)
    """Override of the device's dense peak TFLOP/s per precision, e.g. `{bf16: 989}`."""
    pue: float = 1.0
    """Power usage effectiveness of the datacenter (facility energy / IT energy)."""
    carbon_intensity_g_per_kwh: float = 56.0
    """Grid carbon intensity in gCO2e per kWh (France: ~56, OWID 2023)."""
    gpus_per_node: int = 0
    """GPUs per node; jobs start one task per GPU. 0 on CPU-only machines."""
    cpus_per_node: int = 0
    """Physical CPU cores per node (hyperthreads not counted)."""
    host_memory_gb: float = 0.0
    """Host RAM per node in GiB that a job may use (`megatrain plan` checks offload and data
    loading against it); 0: unknown, not checked."""
    intra_node_gb_s: float = 0.0
    """Bandwidth between the GPUs of a node in GB/s per GPU and direction (NVLink), for
    `megatrain plan`'s communication estimate; 0: no estimate."""
    inter_node_gb_s: float = 0.0
    """Network bandwidth per GPU and direction between nodes in GB/s (InfiniBand/Omni-Path
    links divided among the node's GPUs); 0: no estimate."""
    modules: list[str] = field(default_factory=list)
    """Environment modules a job loads (after `module purge`) before Python starts, e.g.
    `[arch/h100, pytorch-gpu/py3/2.7.0]`."""
    setup: list[str] = field(default_factory=list)
    """Further shell lines a job runs before Python (activate a venv, export variables)."""
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    """Slurm options for this cluster's GPU nodes."""


# ----------------------------------------------------------------------------- valid ranges

AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, lo_open=True)
FRACTION = Range(0, 1, hi_open=True)  # [0, 1)

# The valid values of every number, checked at load (`schema.check_ranges`) and shown in
# docs/config.md; a float must also be finite. Checks involving several fields are in validate().
RANGES: dict[type, dict[str, Range]] = {
    ModelConfig: {
        **dict.fromkeys(["vocab_size", "n_kv_head", "d_ff"], AT_LEAST_0),
        **dict.fromkeys(["vocab_multiple", "n_layer", "n_head", "d_model"], AT_LEAST_1),
        **dict.fromkeys(["norm_eps", "rope_theta", "init_std"], POSITIVE),
        "dropout": FRACTION,
    },
    DataSource: {"weight": POSITIVE},
    DataConfig: {"seq_len": Range(2), "val_fraction": FRACTION, "prefetch": AT_LEAST_1},
    OptimConfig: {
        "lr": POSITIVE,
        **dict.fromkeys(["min_lr", "warmup_steps", "weight_decay", "clip"], AT_LEAST_0),
        **dict.fromkeys(["beta1", "beta2"], FRACTION),
        "eps": POSITIVE,
    },
    BatchConfig: {
        "micro_batch": AT_LEAST_1,
        **dict.fromkeys(["grad_accum", "global_batch", "global_tokens"], AT_LEAST_0),
    },
    ParallelConfig: {"zero_stage": Range(0, 3), "tensor": AT_LEAST_1},
    RunConfig: {
        **dict.fromkeys(["max_steps", "max_tokens", "stop_at_step", "seed"], AT_LEAST_0),
        **dict.fromkeys(["eval_every", "ckpt_every", "keep", "keep_every"], AT_LEAST_0),
        **dict.fromkeys(["log_every", "eval_batches"], AT_LEAST_1),
        "max_restarts": AT_LEAST_0,
        **dict.fromkeys(["hang_timeout_s", "hang_slow_s"], AT_LEAST_0),
        **dict.fromkeys(["hang_factor", "collective_timeout_s"], AT_LEAST_1),
        "straggler_factor": AT_LEAST_0,
        "straggler_intervals": AT_LEAST_1,
    },
    GuardConfig: {
        "spike_window": AT_LEAST_1,
        **dict.fromkeys(["spike_zscore", "max_bad_steps", "max_rollbacks"], AT_LEAST_0),
    },
    SlurmOptions: {"cpus_per_task": AT_LEAST_1, "signal_s": AT_LEAST_0},
    ClusterProfile: {
        "pue": Range(1),
        **dict.fromkeys(
            [
                "device_power_w",
                "carbon_intensity_g_per_kwh",
                "gpus_per_node",
                "cpus_per_node",
                "host_memory_gb",
                "intra_node_gb_s",
                "inter_node_gb_s",
            ],
            AT_LEAST_0,
        ),
    },
}


def load_cluster(name_or_path: str) -> ClusterProfile:
    """Load configs/clusters/<name>.yaml (or a path to a YAML file)."""
    path = (
        Path(name_or_path)
        if name_or_path.endswith((".yaml", ".yml"))
        else find_preset("clusters", name_or_path)
    )
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    try:
        profile = from_dict(ClusterProfile, data)
        check_ranges(profile, RANGES)
        return profile
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass
class Config:
    """A whole run: one YAML file (configs/*.yaml) plus command-line overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The transformer's shape."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and sample length."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Batch layout."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallelism."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision: bf16 on A100/H100, fp16 (dynamic loss scaling) on V100, fp32 for
    exact CPU tests."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run length and cadence."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """Stability guard."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases."""
    cluster: str = "local"
    """Cluster profile, a file in configs/clusters/ (peak FLOPs, power, PUE, grid carbon
    intensity)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or os.path.join("runs", self.run.name))


# What `run.allow_changes` may name: the rest of the checked keys (the model's shape,
# `precision`) cannot change within a run (megatrain/resume.py compares).
RESUMABLE_CHANGES = (
    "data",
    "tokenizer",
    "optim",
    *(f"optim.{f.name}" for f in dataclasses.fields(OptimConfig)),
    "batch",
    *(f"batch.{f.name}" for f in dataclasses.fields(BatchConfig)),
    "run.seed",
    "data.seq_len",
    "data.val_fraction",
    "model.dropout",
)


# ----------------------------------------------------------------------------- finding files


def configs_root() -> Path:
    """The configs/ directory: $MEGATRAIN_CONFIGS, else ./configs, else the one beside the
    package."""
    for candidate in (
        os.environ.get("MEGATRAIN_CONFIGS"),
        "configs",
        Path(__file__).resolve().parent.parent / "configs",
    ):
        if candidate and Path(candidate, "models").is_dir():
            return Path(candidate)
    raise ConfigError("cannot find the configs/ directory; set MEGATRAIN_CONFIGS to its path")


def find_preset(kind: str, name: str) -> Path:
    """Path of configs/<kind>/<name>.yaml, or an error listing the available names."""
    folder = configs_root() / kind
    path = folder / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        hint = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(
            f"no {kind} preset '{name}' in {folder}"
            + (f"; did you mean '{hint[0]}'?" if hint else "")
            + f" (available: {', '.join(names)})"
        )
    return path


# ----------------------------------------------------------------------------- load + validate


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a run config YAML, apply `key=value` overrides, merge the model preset, validate."""
    tree = read_yaml(path) if path else {}
    for assignment in overrides:
        apply_override(tree, assignment)
    model = tree.get("model") or {}
    if isinstance(model, dict) and model.get("preset"):
        preset = read_yaml(find_preset("models", str(model["preset"])))
        preset.pop("preset", None)
        tree["model"] = {**preset, **model}
    cfg = from_dict(Config, tree)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every number finite and in its range (`RANGES`), then the checks that involve several
    fields; each error names the key to change."""
    check_ranges(cfg, RANGES)
    m = cfg.model
    if m.d_model % m.n_head:
        raise ConfigError(
            f"'model.d_model' ({m.d_model}) must be divisible by 'model.n_head' ({m.n_head})"
        )
    kv = m.n_kv_head or m.n_head
    if m.n_head % kv:
        raise ConfigError(
            f"'model.n_head' ({m.n_head}) must be divisible by 'model.n_kv_head' ({kv})"
        )
    if m.position == "rope" and (m.d_model // m.n_head) % 2:
        raise ConfigError(
            "rotary positions need an even head size: change 'model.d_model' or 'model.n_head'"
        )
    if not cfg.data.sources:
        raise ConfigError(
            "'data.sources' is empty: give at least one dataset, e.g. data.sources.0.path=data/demo"
        )
    for i, src in enumerate(cfg.data.sources):
        if not src.path:
            raise ConfigError(f"'data.sources.{i}.path' is empty")
    if cfg.parallel.zero_stage == 0 and cfg.precision != "fp32":
        # DeepSpeed's path for it is per-parameter and unfused (a host sync per tensor, an fp32
        # copy of every gradient) and accumulates gradients in half precision
        raise ConfigError(
            f"'parallel.zero_stage' 0 with 'precision' {cfg.precision} takes DeepSpeed's slow, "
            "unfused mixed-precision path: use parallel.zero_stage=1 (fp32 master weights and "
            "gradient accumulation, optimizer states split over the data-parallel ranks)"
        )
    if cfg.parallel.offload_optimizer != "none" and cfg.parallel.zero_stage == 0:
        # DeepSpeed's CPU Adam steps the optimizer partitions ZeRO keeps; without ZeRO nothing
        # would move them to the CPU (and the trainer could not skip a non-finite step)
        raise ConfigError(
            "'parallel.offload_optimizer' needs 'parallel.zero_stage' 1, 2 or 3 (ZeRO-Offload "
            "moves ZeRO's optimizer partitions to the CPU); set zero_stage to 1 or more"
        )
    if cfg.parallel.offload_params != "none" and cfg.parallel.zero_stage != 3:
        raise ConfigError("'parallel.offload_params' needs 'parallel.zero_stage: 3'")
    if cfg.run.max_steps <= 0 and cfg.run.max_tokens <= 0:
        raise ConfigError("set 'run.max_steps' or 'run.max_tokens' to say how long to train")
    for name in cfg.run.allow_changes:
        if name not in RESUMABLE_CHANGES:
            hint = difflib.get_close_matches(str(name), RESUMABLE_CHANGES, n=1)
            raise ConfigError(
                f"'run.allow_changes' names '{name}', which a resume cannot allow"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f" (allowed: {', '.join(RESUMABLE_CHANGES)})"
            )
    if 0 < cfg.run.straggler_factor <= 1:
        # the slowest rank's ratio to the median is never below 1: every interval would be slow
        raise ConfigError(
            f"'run.straggler_factor' ({cfg.run.straggler_factor:g}) must be above 1 "
            "(e.g. 1.5), or 0 to turn straggler events off"
        )
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(
            f"'optim.min_lr' ({cfg.optim.min_lr}) is above 'optim.lr' ({cfg.optim.lr})"
        )


# ----------------------------------------------------------------------------- docs


def config_reference() -> str:
    """Markdown reference of every config key, generated from the docstrings above."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `megatrain config-doc` from megatrain/config.py; do not edit by hand.",
        "",
        "Every number must lie in its valid range and every float must be finite: a value",
        "outside is refused when the config loads, by key, value and range.",
        "",
    ]

    def section(cls: type, prefix: str) -> None:
        docs = field_docs(cls)
        # a docstring may wrap: each paragraph renders as one line, as it did unwrapped
        intro = inspect.cleandoc(cls.__doc__ or "").split("\n\n")
        nested = []
        lines.extend(
            [
                f"## `{prefix or 'top level'}`",
                "",
                "\n\n".join(" ".join(paragraph.split()) for paragraph in intro),
                "",
                "| key | type | default | meaning |",
                "| --- | --- | --- | --- |",
            ]
        )
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{prefix}.{f.name}" if prefix else f.name))
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = f.default_factory()  # type: ignore
            tname = str(tp).replace("typing.", "").replace("megatrain.config.", "")
            tname = getattr(tp, "__name__", tname) if not typing.get_args(tp) else tname
            tname = tname.replace("|", "\\|")  # a bare | would end the Markdown cell
            key = f"{prefix}.{f.name}" if prefix else f.name
            # a docstring may wrap; a table row may not
            doc = " ".join(docs.get(f.name, "").split())
            if f.name in RANGES.get(cls, {}):
                doc += f" Valid: {RANGES[cls][f.name]}."
            lines.append(f"| `{key}` | `{tname}` | `{default!r}` | {doc} |")
        lines.append("")
        if prefix == "data":
            section(DataSource, "data.sources[]")
        for cls2, pfx in nested:
            section(cls2, pfx)

    section(Config, "")
    lines += [
        "# Cluster profiles",
        "",
        "Files in configs/clusters/, named by the run's `cluster` key.",
        "",
    ]
    section(ClusterProfile, "clusters/<name>.yaml")
    return "\n".join(lines) + "\n"
