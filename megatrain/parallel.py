"""Parallelism, applied to a model from outside (the process group is megatrain/dist.py's).

- `deepspeed_config()`: our typed config turned into DeepSpeed's JSON (ZeRO stage, precision,
  offload, batch layout, clipping).
- `tensor_parallel_config()`: DeepSpeed AutoTP rules from the model's TENSOR_PARALLEL_PLAN.
- `compile_blocks()`: torch.compile each block (on GPU, by default).
- `apply_activation_checkpointing()`: recompute each block in backward.
- `build_engine()`: model + optimizer -> DeepSpeed engine.
"""

from __future__ import annotations

import functools
import os
import re
from types import SimpleNamespace

import torch

from megatrain.config import Config, ConfigError
from megatrain.model import TENSOR_PARALLEL_PLAN
from megatrain.optim import build_optimizer, param_groups
from megatrain.plan import BatchLayout

MIN_LOSS_SCALE = 1  # fp16: an overflow at this scale is a real non-finite step


# DeepSpeed's default bucket sizes, in elements: ZeRO 1-2's reduce and all-gather buckets, and
# ZeRO-3's prefetch bucket
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000


def deepspeed_config(
    cfg: Config, layout: BatchLayout, load_universal: bool = False, params: int | None = None
) -> dict:
    """DeepSpeed's JSON for `cfg`; with the model's parameter count, no bucket is allocated
    larger than the model (DeepSpeed's 5e8-element reduce buckets would take 1-2 GB per GPU for
    any model size)."""
    p = cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if params:
        zero["reduce_bucket_size"] = min(REDUCE_BUCKET, params)
        zero["allgather_bucket_size"] = min(REDUCE_BUCKET, params)
        if p.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = min(PREFETCH_BUCKET, params)
    if p.zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": p.offload_optimizer, "pin_memory": True}
    if p.offload_params != "none":
        zero["offload_param"] = {"device": p.offload_params, "pin_memory": True}
    ds = {
        # no train_batch_size: DeepSpeed would check it against its own idea of the world size,
        # which counts tensor-parallel ranks as data-parallel; our layout is authoritative
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.optim.clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, which DeepSpeed wraps fine
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every forward and step: we time
        # ourselves (megatrain/metrics.py), without synchronizing
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if p.tensor > 1:
        ds["tensor_parallel"] = tensor_parallel_config(p.tensor)
    if load_universal:  # resuming a checkpoint saved with another parallel layout
        ds["checkpoint"] = {"load_universal": True}
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        # accumulate the micro-batches' gradients in fp32, not bf16 (under ZeRO-1 this selects
        # DeepSpeed's bf16 optimizer, BLOOM's: fp32 master weights and gradients)
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif cfg.precision == "fp16":
        # dynamic loss scaling (loss_scale 0): start at 2^16, halve on overflow, double after
        # 1000 clean steps
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": MIN_LOSS_SCALE,
        }
    return ds


def tensor_parallel_config(size: int) -> dict:
    """DeepSpeed AutoTP's partition rules, one per layer of the model's TENSOR_PARALLEL_PLAN."""
    patterns: dict[str, list[str]] = {"column": [], "row": []}
    for name, split in TENSOR_PARALLEL_PLAN.items():
        patterns[split].append(rf".*\.{re.escape(name)}\.weight$")
    return {
        "autotp_size": size,
        "partition_config": {
            "use_default_specs": False,
            "layer_specs": [
                {"patterns": patterns[split], "partition_type": split}
                for split in ("column", "row")
            ],
        },
    }


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters of `module`, each shared tensor once (tied embeddings)."""
    return sum(p.numel() for p in module.parameters())


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds: its tensor-parallel slices, or its ZeRO-3 partition."""
    return sum(
        (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * p.element_size()
        for p in module.parameters()
    )


def check_tensor_parallel_groups(size: int) -> None:
    """Our data loader gives ranks r // size the same data: DeepSpeed's TP groups must be those
    blocks."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    ranks = dist.get_process_group_ranks(groups.get_tensor_model_parallel_group())
    rank = dist.get_rank()
    expected = list(range(rank - rank % size, rank - rank % size + size))
    if sorted(ranks) != expected:
        raise RuntimeError(
            f"DeepSpeed put rank {rank} in tensor-parallel group {ranks}, expected {expected}"
        )


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Make every block recompute its activations in backward (parameter names stay unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:  # the block's forward as it is: compiled, or the class's
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def use_deterministic_kernels() -> None:
    """Run-to-run identical results on GPU: deterministic algorithms only, cuBLAS with a fixed
    workspace, and the math attention kernel (the fused ones accumulate in a varying order)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first use
    torch.use_deterministic_algorithms(True, warn_only=True)  # a kernel without: a warning
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def compile_reason(cfg: Config, device: torch.device) -> str | None:
    """Why the blocks are not compiled, or None when they are."""
    if not cfg.run.compile:
        return "run.compile is false"
    if device.type != "cuda":
        return "compiled on GPU only"
    if cfg.parallel.zero_stage == 3:  # its parameter-gathering hooks sit on every layer
        return "not with ZeRO-3"
    return None


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each block's forward and the loss (regional compilation: the graphs stay
    small, compile fast, and DeepSpeed's hooks on the blocks and the model stay outside them).
    Where dynamo cannot compile, the code runs eagerly instead (`compile_counters` says how
    often)."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    for block in model.blocks:
        block.forward = torch.compile(block.forward)
    model.loss = torch.compile(model.loss)  # fp32 cross-entropy fused: no fp32 copy of the logits


def compile_counters() -> dict:
    """What torch.compile did so far: graphs made, graph breaks, frames it gave up on."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "failed": frames["total"] - frames["ok"],
    }


def build_engine(
    model: torch.nn.Module,
    cfg: Config,
    layout: BatchLayout,
    device: torch.device,
    load_universal: bool = False,
):
    """Wrap the model in a DeepSpeed engine with our AdamW; returns (engine, the AdamW it wraps).
    The engine uses `device` (DeepSpeed would otherwise take LOCAL_RANK as a GPU index)."""
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.parallel.tensor > 1 and device.type == "cuda" and device.index != local_rank:
        # DeepSpeed's AutoTP selects GPU LOCAL_RANK itself
        raise ConfigError(
            f"'parallel.tensor' {cfg.parallel.tensor} needs every task to see all its node's GPUs "
            f"(this one, local rank {local_rank}, sees only its own): drop `--gpus-per-task` "
            "and per-task GPU binding, and start one task per GPU"
        )
    if compile_reason(cfg, device) is None:
        compile_blocks(model)  # inside the activation checkpoints, which wrap each block
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.parallel.offload_optimizer == "cpu":
        # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's vectorized Adam
        # (JIT-built once)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(
            param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            adamw_mode=True,
        )
    else:
        # without ZeRO, nothing else skips a step whose gradients overflowed (fp32 only: half
        # precision needs ZeRO, see config.validate)
        zero = cfg.parallel.zero_stage > 0
        optimizer = build_optimizer(model, cfg.optim, device, skip_nonfinite=not zero)
    engine, *_ = deepspeed.initialize(
        args=SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None,
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, layout, load_universal, count_parameters(model)),
    )
    if cfg.parallel.tensor > 1:
        check_tensor_parallel_groups(cfg.parallel.tensor)
    return engine, optimizer
