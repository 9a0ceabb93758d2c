"""Memory per GPU, before a run: what `megatrain plan` predicts and the trainer compares with.

Two parts, added up per GPU:

    model states   parameters, gradients and optimizer states as DeepSpeed lays them out for
                   the precision, ZeRO stage (0-3), tensor-parallel size and CPU offload, plus
                   its communication buckets and ZeRO-3's gathered working set: arithmetic on
                   the parameter count, stage by stage (below)
    one pass       the activations, logits and temporaries of one micro-batch's forward and
                   backward, *measured*: the real `Transformer`, with the real loss and
                   activation checkpointing, runs on fake tensors (no memory, no compute)
                   under torch's memory tracker, for 2 and 4 blocks; each further block adds
                   what the third and fourth added

The peak is then the resident model states plus the larger of the pass and the optimizer step's
temporaries, and on a GPU an allowance for the CUDA context (cuBLAS, NCCL) and the caching
allocator's fragmentation. The pass is measured eagerly: where the trainer compiles (GPU), the
loss's fp32 copies fuse away and the real peak is lower.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings

import torch

from megatrain.config import Config, ModelConfig
from megatrain.model import TENSOR_PARALLEL_PLAN, Transformer
from megatrain.parallel import PREFETCH_BUCKET, REDUCE_BUCKET, apply_activation_checkpointing
from megatrain.plan import RunPlan

GIB = 2**30
CUDA_CONTEXT_GIB = 1.5  # CUDA context, cuBLAS and NCCL workspaces (about 0.5-1 GiB measured)
FRAGMENTATION = 0.10  # the caching allocator's slack over the live bytes
# DeepSpeed ZeRO-3 defaults: parameters this small stay gathered on every rank; at most this
# many gathered parameters are alive at once
PERSISTENCE_THRESHOLD = 100_000
MAX_LIVE_PARAMETERS = 1_000_000_000
WORD = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=64)
def _measure_pass(
    model_json: str, seq_len: int, precision: str, tp: int, checkpointing: bool
) -> tuple[int, int]:
    """Peak bytes beyond the parameters during one forward+backward of one sequence: (what the
    blocks add, the rest), from fake-tensor runs of the model with 0, 1 and 2 blocks. Everything
    in it grows with the micro-batch (no T x T matrix is stored) and with the blocks."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    model = ModelConfig(**json.loads(model_json))

    def peak(n_layer: int) -> int:
        cfg = dataclasses.replace(model, n_layer=n_layer)
        default = torch.get_default_dtype()
        with FakeTensorMode():
            torch.set_default_dtype(DTYPE[precision])  # DeepSpeed trains the model in this type
            try:
                net = Transformer(cfg, seq_len)
            finally:
                torch.set_default_dtype(default)
            _split_like_tensor_parallel(net, tp)
            if checkpointing:
                apply_activation_checkpointing(net)
            for param in net.parameters():  # gradients are model states: drop them as they come
                param.register_post_accumulate_grad_hook(_drop_grad)
            tokens = torch.zeros(1, seq_len, dtype=torch.long)
            tracker = MemTracker()
            tracker.track_external(net)
            with tracker, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "expected a tensor": the gradients we drop
                net(tokens, tokens).backward()
            snapshot = tracker.get_tracker_snapshot("peak")
        (by_type,) = snapshot.values()
        by_type = {str(k).split(".")[-1]: v for k, v in by_type.items()}
        # the parameters (and the rotary tables) are model states, counted apart
        return by_type["Total"] - by_type["PARAM"] - by_type["BUFFER"]

    # each block adds the same (its saved tensors; with checkpointing, its input): measure two
    without, one, two = peak(0), peak(1), peak(2)
    return one - without + (model.n_layer - 1) * (two - one), without


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


def _split_like_tensor_parallel(net: Transformer, tp: int) -> None:
    """Give each block one tensor-parallel rank's share of its linear layers, as DeepSpeed's AutoTP
    does (the attention reads its head counts from the projections' widths)."""
    if tp == 1:
        return
    for block in net.blocks:
        for name, split in TENSOR_PARALLEL_PLAN.items():
            parent, _, child = name.rpartition(".")
            owner = block.get_submodule(parent)
            layer = getattr(owner, child, None)
            if layer is None:
                continue  # gate_proj of a non-gated MLP
            d_in, d_out = layer.in_features, layer.out_features
            d_in, d_out = (d_in, d_out // tp) if split == "column" else (d_in // tp, d_out)
            bias = layer.bias is not None
            weight = layer.weight  # on the meta device, or fake: no memory, no init
            shard = torch.nn.Linear(d_in, d_out, bias, weight.device, weight.dtype)
            setattr(owner, child, shard)


def _key(model: ModelConfig) -> str:
    """The model config as a cache key."""
    return json.dumps(dataclasses.asdict(model), sort_keys=True)


def one_pass(cfg: Config, plan: RunPlan) -> dict[str, float]:
    """Bytes of one micro-batch's forward and backward: `activations` (all blocks) and `logits`
    (the embedding output, output layer, loss and their gradients)."""
    blocks, rest = _measure_pass(
        _key(plan.model),
        plan.layout.seq_len,
        cfg.precision,
        plan.tp_size,
        cfg.parallel.activation_checkpointing,
    )
    batch = plan.layout.micro_batch
    return {"activations": batch * blocks, "logits": batch * rest}


@functools.lru_cache(maxsize=64)
def _persistent_parameters(model_json: str, seq_len: int, tp: int) -> int:
    """Parameters ZeRO-3 keeps gathered everywhere (each no larger than its persistence
    threshold: norms, biases, the small matrices of small models), per tensor-parallel rank."""
    with torch.device("meta"):
        net = Transformer(ModelConfig(**json.loads(model_json)), seq_len)
    _split_like_tensor_parallel(net, tp)
    return sum(p.numel() for p in net.parameters() if p.numel() <= PERSISTENCE_THRESHOLD)


def model_states(cfg: Config, plan: RunPlan) -> dict[str, float]:
    """Bytes per GPU of parameters, gradients, optimizer states and DeepSpeed's buffers, what the
    gradient reduction and optimizer step add for a moment (`step`), and what lives in host
    memory (`host`).

    With n parameters per tensor-parallel rank, N data-parallel ranks and w bytes per weight
    (2 in bf16/fp16, 4 in fp32), DeepSpeed keeps:

        ZeRO-0 (fp32 only)  weights 4n, gradients 4n, Adam's moments 8n; the step's temporaries 4n
        ZeRO-1              weights wn; gradients: fp32 4n in bf16 (BLOOM's bf16 optimizer),
                            wn otherwise; fp32 master weights and moments 12n/N, the step's
                            fp32 gradient partition 4n/N (not in bf16, where it is a view)
        ZeRO-2              as ZeRO-1 but gradients partitioned, wn/N, and reduced through
                            buckets (two with overlap_comm)
        ZeRO-3              weights partitioned, wn/N, plus those gathered for the layers at
                            work (up to twice the model, capped by max_live_parameters and the
                            prefetch bucket; small tensors stay gathered whole besides their
                            partition); gradients wn/N in a buffer made at the start; a reduce
                            bucket, and during backward a bucket of full-size gradients and
                            its reduce-scatter's output
        offload             optimizer states (and ZeRO-3 weights) in host memory instead
    """
    p, tp, dp = cfg.parallel, plan.tp_size, plan.dp_size
    zero, w = p.zero_stage, WORD[cfg.precision]
    n = plan.params / tp
    bf16_optimizer = zero == 1 and cfg.precision == "bf16"
    bucket = min(REDUCE_BUCKET, plan.params)
    states = {"params": w * n, "grads": w * n, "optimizer": 8 * n, "buffers": 0.0, "step": 4 * n}
    if zero >= 1:
        states["optimizer"] = 12 * n / dp
        states["step"] = 0.0 if bf16_optimizer else 4 * n / dp
        if bf16_optimizer:
            states["grads"] = 4 * n
    if zero == 2:
        states["grads"] = w * n / dp
        states["buffers"] = w * bucket * 2  # overlap_comm: one bucket fills while one reduces
    elif zero == 1:
        states["buffers"] = w * bucket
    if zero == 3:
        persistent = _persistent_parameters(_key(plan.model), plan.layout.seq_len, tp)
        gathered = min(2 * (n - persistent), MAX_LIVE_PARAMETERS + PREFETCH_BUCKET)
        states["params"] = w * n / dp + w * persistent  # partitions, and the small ones whole
        states["grads"] = w * n / dp
        states["buffers"] = w * bucket + w * gathered
        # the backward's reduce-scatter: a bucket of full-size gradients and its output
        states["step"] += 2 * w * min(bucket, n)
    host = 0.0
    if p.offload_optimizer != "none":
        host += states["optimizer"] + states["step"]
        states["optimizer"] = states["step"] = 0.0
    if p.offload_params != "none":
        host += states["params"]
        states["params"] = 0.0
    states["host"] = host
    return states


def memory_per_gpu(cfg: Config, plan: RunPlan, gpu: bool = True) -> dict:
    """GiB per GPU: `params`, `grads`, `optimizer`, `activations`, `logits`, `buffers`,
    `overhead` (CUDA context and fragmentation; 0 off a GPU) and `total` (the peak), `host`
    (offloaded states, per process), and `peak_phase` ("pass" or "backward and step").

    The peak: parameters, optimizer states and buffers are always there; gradients appear during
    the backward pass, as the activations it frees, unless they outlive the step (accumulated
    over micro-batches, or in a buffer DeepSpeed allocates once: the bf16 optimizer's, ZeRO-3's).
    So the rest is the larger of one pass, and the gradients with the step's temporaries.
    """
    states = model_states(cfg, plan)
    passes = one_pass(cfg, plan)
    in_pass = passes["activations"] + passes["logits"]
    resident = sum(states[k] for k in ("params", "optimizer", "buffers"))
    zero = cfg.parallel.zero_stage
    grads_resident = (
        plan.layout.grad_accum > 1 or zero == 3 or (zero == 1 and cfg.precision == "bf16")
    )
    after_pass = states["step"]
    if grads_resident:
        resident += states["grads"]
    else:
        after_pass += states["grads"]
    live = resident + max(in_pass, after_pass)
    overhead = (CUDA_CONTEXT_GIB * GIB + FRAGMENTATION * live) if gpu else 0.0
    gib = {k: states[k] / GIB for k in ("params", "grads", "optimizer")}
    gib.update({k: v / GIB for k, v in passes.items()})
    gib["buffers"] = states["buffers"] / GIB
    gib["overhead"] = overhead / GIB
    gib["total"] = (live + overhead) / GIB
    gib["host"] = states["host"] / GIB
    gib["peak_phase"] = "pass" if in_pass >= after_pass else "backward and step"
    return gib
