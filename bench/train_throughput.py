r"""Training throughput on one device: megatrain (DeepSpeed engine) against a plain PyTorch loop.

Both sides train the same model (megatrain.model.Transformer) on the same random batches:

- megatrain: the engine `megatrain train` builds (DeepSpeed, ZeRO stage and precision from the
  flags, torch's fused AdamW, optional torch.compile through `engine.compile()`).
- reference: a nanoGPT-style loop: fp32 weights, bf16 autocast, SDPA, fused AdamW, torch.compile.

Prints one JSON object: tokens/s, MFU (against the detected device's dense peak), step time and
peak memory for each, and megatrain / reference. Run on a GPU node, e.g.:

    TORCH_CUDA_ARCH_LIST=9.0 python bench/train_throughput.py \
        --model gpt2-124m --seq-len 1024 --micro-batch 16
    TORCH_CUDA_ARCH_LIST=9.0 python bench/train_throughput.py \
        --model gpt2-1.3b --seq-len 2048 --micro-batch 8

(`--device cpu --model tiny` runs it anywhere, for a smoke check.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

from megatrain import hardware
from megatrain.config import load_config
from megatrain.model import Transformer, count_params, flops_per_token
from megatrain.plan import resolve_batch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-124m", help="a preset in configs/models/")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument(
        "--warmup", type=int, default=10, help="untimed steps first (compilation, allocator)"
    )
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="run both sides eagerly")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=["megatrain", "reference"], help="run one side only")
    return p.parse_args()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step_fn, args, device) -> dict:
    for _ in range(args.warmup):
        step_fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step_fn()
    synchronize(device)
    seconds = (time.perf_counter() - t0) / args.steps
    return {
        "step_ms": 1000 * seconds,
        "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


def batches(cfg, args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randint(
        0, cfg.model.vocab_size, (8, args.micro_batch, args.seq_len + 1), generator=g
    )
    data = data.to(device)
    i = 0
    while True:
        b = data[i % len(data)]
        yield b[:, :-1], b[:, 1:]
        i += 1


def run_megatrain(cfg, args, device) -> dict:
    from megatrain.dist import DistEnv, init_process_group
    from megatrain.parallel import build_engine

    init_process_group(DistEnv())
    torch.manual_seed(0)
    engine, _ = build_engine(
        Transformer(cfg.model, args.seq_len), cfg, resolve_batch(cfg, 1), device
    )
    data = batches(cfg, args, device)

    def step():
        x, y = next(data)
        engine.backward(engine(x, y))
        engine.step()

    return timed(step, args, device)


def run_reference(cfg, args, device) -> dict:
    torch.manual_seed(0)
    model = Transformer(cfg.model, args.seq_len).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        fused=device.type == "cuda",
    )
    forward = model if args.no_compile else torch.compile(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(enabled=args.precision == "fp16")
    data = batches(cfg, args, device)

    def step():
        x, y = next(data)
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = forward(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, args, device)


def main():
    args = parse_args()
    os.environ.setdefault("MASTER_PORT", "29555")
    device = torch.device(args.device)
    cfg = load_config(
        None,
        [
            f"model.preset={args.model}",
            "data.sources.0.path=unused",
            f"data.seq_len={args.seq_len}",
            f"batch.micro_batch={args.micro_batch}",
            "batch.grad_accum=1",
            "run.max_steps=1",
            f"precision={args.precision}",
            f"parallel.zero_stage={args.zero_stage}",
            f"run.compile={'false' if args.no_compile or device.type == 'cpu' else 'true'}",
        ],
    )
    cfg.model.vocab_size = cfg.model.vocab_size or 32000  # presets without one (tiny)
    if cfg.model.vocab_size % 64:  # pad like a tokenizer-derived vocabulary would be
        cfg.model.vocab_size += 64 - cfg.model.vocab_size % 64
    tokens = args.micro_batch * args.seq_len
    flops = flops_per_token(cfg.model, args.seq_len)
    accel = hardware.detect_accelerator()
    peak = hardware.peak_flops(accel, args.precision)
    result = {
        "model": args.model,
        "params": count_params(cfg.model, args.seq_len)["params"],
        "device": accel.name,
        "precision": args.precision,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "zero_stage": args.zero_stage,
        "compile": not args.no_compile,
        "flops_per_token": flops,
        "peak_tflops": peak / 1e12,
    }
    sides = [args.only] if args.only else ["megatrain", "reference"]
    for side in sides:
        r = (run_megatrain if side == "megatrain" else run_reference)(cfg, args, device)
        r["tokens_per_s"] = tokens / (r["step_ms"] / 1000)
        r["mfu"] = flops * r["tokens_per_s"] / peak
        result[side] = r
    if len(sides) == 2:
        result["ratio"] = result["megatrain"]["tokens_per_s"] / result["reference"]["tokens_per_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
