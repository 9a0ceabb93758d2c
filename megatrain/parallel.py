"""Distributed set-up and parallelism, applied to a model from outside.

- `DistEnv.from_environ()`: who am I, from torchrun's or Slurm's variables.
- `init_distributed()`: the process group (NCCL on GPU, gloo on CPU) through DeepSpeed.
- `deepspeed_config()`: our typed config turned into DeepSpeed's JSON (ZeRO stage, precision,
  offload, batch layout, clipping).
- `apply_activation_checkpointing()`: recompute each block in backward.
- `build_engine()`: model + optimizer -> DeepSpeed engine.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch

from megatrain.config import BatchLayout, Config, ConfigError
from megatrain.optim import build_optimizer, param_groups


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @classmethod
    def from_environ(cls, environ=os.environ) -> DistEnv:
        """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; under `srun` we read SLURM_PROCID/NTASKS/LOCALID.
        The master address and port: see `megatrain.launch.rendezvous` (first host of the step, port from the job id)."""
        from megatrain.launch import rendezvous

        addr, port = rendezvous(environ)
        if "RANK" in environ and "WORLD_SIZE" in environ:
            return cls(
                int(environ["RANK"]),
                int(environ["WORLD_SIZE"]),
                int(environ.get("LOCAL_RANK", 0)),
                int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])),
                addr,
                port,
            )
        if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and "SLURM_STEP_ID" in environ:
            tasks_on_node = environ.get(
                "SLURM_NTASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", "1")
            )
            return cls(
                int(environ["SLURM_PROCID"]),
                int(environ["SLURM_NTASKS"]),
                int(environ.get("SLURM_LOCALID", 0)),
                int(tasks_on_node.split("(")[0].split(",")[0]),
                addr,
                port,
            )
        return cls(master_addr=addr, master_port=port)


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(env: DistEnv) -> torch.device:
    """Create the default process group; MASTER_ADDR/MASTER_PORT must be set when world_size > 1."""
    device = device_for(env)
    if device.type == "cpu":
        os.environ.setdefault(
            "DS_ACCELERATOR", "cpu"
        )  # say so, rather than let DeepSpeed warn it guessed
    # DeepSpeed 0.19 calls a torch.distributed function that torch 2.13 deprecates; nothing for users to do
    warnings.filterwarnings(
        "ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning
    )
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    # DeepSpeed reads these from the environment, whichever launcher started us
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank)
    )
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        auto_mpi_discovery=False,
        rank=env.rank,
        world_size=env.world_size,
    )
    return device


def deepspeed_config(cfg: Config, layout: BatchLayout, load_universal: bool = False) -> dict:
    p = cfg.parallel
    zero: dict = {"stage": p.zero_stage}
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
    }
    if p.tensor > 1:
        ds["tensor_parallel"] = tensor_parallel_config(p.tensor)
    if load_universal:  # resuming a checkpoint saved with another parallel layout
        ds["checkpoint"] = {"load_universal": True}
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        # dynamic loss scaling (loss_scale 0): start at 2^16, halve on overflow, double after 1000 clean steps
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return ds


# Tensor parallelism (Megatron's split, applied by DeepSpeed's training AutoTP): the projections
# that fan out are split by output columns, the ones that fan back in by input rows, so each block
# needs one all-reduce after attention and one after the MLP. Embeddings, norms and the output
# head stay replicated.
COLUMN_PARALLEL = r".*\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$"
ROW_PARALLEL = r".*\.(o_proj|down_proj)\.weight$"


def tensor_parallel_config(size: int) -> dict:
    return {
        "autotp_size": size,
        "partition_config": {
            "use_default_specs": False,
            "layer_specs": [
                {"patterns": [COLUMN_PARALLEL], "partition_type": "column"},
                {"patterns": [ROW_PARALLEL], "partition_type": "row"},
            ],
        },
    }


def validate_tensor_parallel(cfg: Config, world_size: int, local_world_size: int) -> None:
    """Every split must be even, and a tensor-parallel group must not span nodes; errors name the key."""
    from megatrain.model import mlp_hidden_size

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
    if tp > 1 and local_world_size % tp:
        raise ConfigError(
            f"'parallel.tensor' ({tp}) does not divide the {local_world_size} processes per node: a "
            "tensor-parallel group would span nodes (all-reduces twice per layer over the network); "
            "use a tensor size that divides the GPUs per node"
        )


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds: its tensor-parallel slices, or its ZeRO-3 partition."""
    return sum(
        (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * p.element_size()
        for p in module.parameters()
    )


def check_tensor_parallel_groups(size: int) -> None:
    """Our data loader gives ranks r // size the same data: DeepSpeed's TP groups must be those blocks."""
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

    for block in model.blocks:
        block.forward = functools.partial(
            checkpoint, type(block).forward.__get__(block), use_reentrant=False
        )


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) of a few floats over all ranks; identity when not distributed."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    return all_reduce(values, "sum")


def all_gather(value) -> list:
    """One picklable value from every rank, in rank order."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def build_engine(
    model: torch.nn.Module,
    cfg: Config,
    layout: BatchLayout,
    device: torch.device,
    load_universal: bool = False,
):
    """Wrap the model in a DeepSpeed engine with our AdamW; returns (engine, the AdamW it wraps)."""
    import deepspeed

    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.parallel.offload_optimizer == "cpu":
        # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's vectorized Adam (JIT-built once)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(
            param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            adamw_mode=True,
        )
    else:
        optimizer = build_optimizer(model, cfg.optim, device)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, layout, load_universal)
    )
    if cfg.parallel.tensor > 1:
        check_tensor_parallel_groups(cfg.parallel.tensor)
    if cfg.run.compile:
        engine.compile()  # torch.compile of the wrapped module, the DeepSpeed way
    return engine, optimizer
