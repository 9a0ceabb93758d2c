r"""Training throughput on one device: the trainer a user runs against a plain PyTorch loop.

Both sides train the same model (megatrain.model.Transformer: same preset, micro-batch and
sequence length), each in its own process:

- megatrain: `megatrain train` itself, on a synthetic token dataset written for the occasion: its
  data loader thread, metrics, guard, DeepSpeed (ZeRO-1 by default, as the run configs), the
  compilation it does by default. Its steady-state step time is read from its metrics.jsonl
  (the steps after --warmup; the step time there includes waiting for data).
- reference: a nanoGPT-style loop: fp32 weights, bf16 autocast, SDPA, fused AdamW, gradient
  clipping, torch.compile of the whole model, batches already on the device.

Prints one JSON object: tokens/s, MFU (against the detected device's dense peak), step time
and peak memory for each side, and `ratio` = megatrain / reference tokens/s. On a GPU node:

    python bench/train_throughput.py --model gpt2-124m --seq-len 1024 --micro-batch 16
    python bench/train_throughput.py --model gpt2-1.3b --seq-len 2048 --micro-batch 8 \
        --activation-checkpointing

(`--device cpu --model tiny --precision fp32 --no-compile` runs it anywhere, as a smoke check.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megatrain import hardware
from megatrain.config import load_config
from megatrain.model import Transformer, count_params, flops_per_token
from megatrain.plan import resolve_vocab
from megatrain.shards import Manifest, write_shard

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-124m", help="a preset in configs/models/")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--activation-checkpointing", action="store_true", help="megatrain side only")
    p.add_argument("--no-compile", action="store_true", help="run both sides eagerly")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=["megatrain", "reference"], help="run one side only")
    p.add_argument("--side", choices=["reference"], help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


def model_config(args):
    overrides = [f"model.preset={args.model}", "data.sources.0.path=unused", "run.max_steps=1"]
    cfg = load_config(None, overrides)
    cfg.model.vocab_size = resolve_vocab(cfg.model, None if cfg.model.vocab_size else 32000)
    return cfg.model


# ----------------------------------------------------------------------------- megatrain side


def write_dataset(directory: Path, vocab_size: int, tokens: int, seq_len: int) -> None:
    """Random tokens in documents of a sequence's length, as `megatrain prep` would store them."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, vocab_size, seq_len, dtype=np.int64) for _ in range(tokens // seq_len)]
    for d in docs:
        d[-1] = 0  # the EOS id that ends every document
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text("{}")  # never read by the trainer; hashed only
    from megatrain.files import sha256_file

    info = write_shard(directory / "shard-00000.arrow", docs, vocab_size)
    Manifest(
        vocab_size, 0, "tokenizer.json", sha256_file(directory / "tokenizer.json"), [info]
    ).write(directory)


def run_megatrain(args, model) -> dict:
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        write_dataset(
            data, model.vocab_size, (steps + 2) * args.micro_batch * args.seq_len + 1, args.seq_len
        )
        config = {"model": {"preset": args.model, "vocab_size": model.vocab_size}}
        (Path(tmp) / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
        overrides = [
            f"data.sources.0.path={data}",
            f"data.seq_len={args.seq_len}",
            "data.val_fraction=0",
            f"batch.micro_batch={args.micro_batch}",
            "batch.grad_accum=1",
            f"precision={args.precision}",
            f"parallel.zero_stage={args.zero_stage}",
            f"parallel.activation_checkpointing={str(args.activation_checkpointing).lower()}",
            f"run.compile={str(not args.no_compile).lower()}",
            f"run.max_steps={steps}",
            "run.log_every=1",
            "run.ckpt_at_end=false",
            "run.eval_batches=1",  # the validation at the last step, after its timing
            f"run.dir={run}",
            "wandb.mode=disabled",
            "cluster=local",
        ]
        cmd = [sys.executable, "-m", "megatrain.cli", "train", str(Path(tmp) / "run.yaml")]
        out = subprocess.run([*cmd, *overrides], cwd=HERE.parent, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"megatrain train failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > args.warmup]
    return {
        "step_ms": 1000 * sum(r["step_s"] for r in timed) / len(timed),
        "mem_gb": max(r["mem_gb"] for r in timed) if args.device == "cuda" else None,
    }


# ----------------------------------------------------------------------------- reference side


def run_reference(args, model_cfg) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:
        model = Transformer(model_cfg, args.seq_len)
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
    g = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randint(
        0, model_cfg.vocab_size, (8, args.micro_batch, args.seq_len + 1), generator=g
    ).to(device)

    def step(i):
        b = data[i % len(data)]
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = forward(b[:, :-1], b[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    synchronize()
    return {
        "step_ms": 1000 * (time.perf_counter() - t0) / args.steps,
        "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


def reference_in_its_own_process(argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--side", "reference"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the reference failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    model = model_config(args)
    if args.side == "reference":
        print(json.dumps(run_reference(args, model)))
        return
    tokens = args.micro_batch * args.seq_len
    flops = flops_per_token(model, args.seq_len)
    accel = hardware.detect_accelerator()
    peak = hardware.peak_flops(accel, args.precision)
    result = {
        "model": args.model,
        "params": count_params(model, args.seq_len)["params"],
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
        if side == "megatrain":
            r = run_megatrain(args, model)
        else:
            r = reference_in_its_own_process(argv)
        r["tokens_per_s"] = tokens / (r["step_ms"] / 1000)
        r["mfu"] = flops * r["tokens_per_s"] / peak
        result[side] = r
    if len(sides) == 2:
        result["ratio"] = result["megatrain"]["tokens_per_s"] / result["reference"]["tokens_per_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
