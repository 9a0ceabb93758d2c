"""The training loop.

    set up:  process group -> datasets -> model -> DeepSpeed engine -> resume -> data loader
    loop:    next batch -> forward/backward per micro-batch -> optimizer step -> log, eval, checkpoint
    finish:  last validation, last checkpoint, summary

Every rank runs this same function (torchrun, srun, or `megatrain train --nproc N`).
"""
from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from megatrain import checkpoint, energy, hardware
from megatrain.config import Config, ConfigError, load_cluster, resolve_batch
from megatrain.data import IGNORE_INDEX, DataLoader, PackedSamples, validation_batches
from megatrain.launch import StopRequest
from megatrain.metrics import StepMetrics, resolve_peak
from megatrain.model import Transformer, count_params, flops_per_token
from megatrain.optim import lr_at
from megatrain.parallel import DistEnv, all_reduce_sum, build_engine, init_distributed
from megatrain.shards import Dataset
from megatrain.sinks import MetricsLogger


def software_versions() -> dict:
    import deepspeed

    versions = {"python": sys.version.split()[0], "torch": str(torch.__version__), "deepspeed": str(deepspeed.__version__)}
    try:
        root = Path(__file__).resolve().parent.parent
        versions["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        versions["git_commit"] = None
    return versions


def open_sources(cfg: Config, rank: int) -> list[PackedSamples]:
    datasets = [Dataset(src.path, verify=cfg.data.verify_checksums) for src in cfg.data.sources]
    tokenizers = {d.manifest.tokenizer_sha256 for d in datasets}
    if len(tokenizers) > 1:
        raise ConfigError("the datasets in 'data.sources' were tokenized with different tokenizers: "
                          + ", ".join(f"{d.directory} ({d.manifest.tokenizer_sha256[:12]})" for d in datasets))
    return [PackedSamples(d, cfg.data.seq_len, cfg.data.val_fraction, cfg.run.seed + 1000 * i)
            for i, d in enumerate(datasets)]


@torch.no_grad()
def evaluate(engine, batches, device) -> float:
    """Mean validation loss per token over all ranks' batches."""
    engine.eval()
    loss_sum, count = 0.0, 0
    for b in batches:
        loss = engine(b.inputs.to(device), b.targets.to(device))
        n = int((b.targets != IGNORE_INDEX).sum())
        if n:
            loss_sum, count = loss_sum + float(loss) * n, count + n
    engine.train()
    loss_sum, count = all_reduce_sum([loss_sum, count])
    return loss_sum / max(count, 1)


def train(cfg: Config) -> dict:
    env = DistEnv.from_environ()
    device = init_distributed(env)
    rank, world = env.rank, env.world_size
    tp = cfg.parallel.tensor
    if world % tp:
        raise ConfigError(f"'parallel.tensor' ({tp}) must divide the number of processes ({world})")
    dp_size, dp_rank = world // tp, rank // tp
    run_dir = cfg.run_dir
    cluster = load_cluster(cfg.cluster)

    sources = open_sources(cfg, rank)
    manifest = sources[0].dataset.manifest
    if cfg.model.vocab_size == 0:
        m = cfg.model.vocab_multiple
        cfg.model.vocab_size = m * math.ceil(manifest.vocab_size / m)
    elif cfg.model.vocab_size < manifest.vocab_size:
        raise ConfigError(f"'model.vocab_size' ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                          f"({manifest.vocab_size}); set it to 0 to take the dataset's")
    layout = resolve_batch(cfg, dp_size)
    max_steps = cfg.run.max_steps or math.ceil(cfg.run.max_tokens / layout.tokens_per_step)
    flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)
    accel = hardware.detect_accelerator()
    peak, peak_source = resolve_peak(cfg.precision, accel, cluster.peak_tflops, cluster.accelerator)

    torch.manual_seed(cfg.run.seed)
    model = Transformer(cfg.model, cfg.data.seq_len)
    engine = build_engine(model, cfg, layout, device)

    logger = MetricsLogger(run_dir, enabled=rank == 0, wandb_args=dict(
        name=cfg.run.name, mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity,
        config={"config": asdict(cfg)}))  # the rest comes with run_start, below
    resolved = {}
    if rank == 0:
        resolved = {"cluster_profile": asdict(cluster), "world_size": world, "dp_size": dp_size,
                    "batch": {**asdict(layout), "global_batch": layout.global_batch},
                    "max_steps": max_steps, **count_params(cfg.model, cfg.data.seq_len),
                    "flops_per_token": flops_tok, "versions": software_versions()}
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**asdict(cfg), "resolved": resolved}, sort_keys=False))

    step, consumed, meta = 0, 0, {}
    ckpt_dir = run_dir / "checkpoints"
    found = checkpoint.find_resumable(ckpt_dir, log=logger.event) if cfg.run.resume == "auto" else None
    if found:
        tag, meta = found
        checkpoint.load(engine, ckpt_dir, tag)
        step, consumed = meta["step"], meta["consumed_samples"]
        logger.event({"event": "resumed", "tag": tag, "step": step, "consumed_samples": consumed})

    loader = DataLoader(sources, [s.weight for s in cfg.data.sources], layout, dp_rank, consumed,
                        cfg.data.prefetch, device.type)
    val_batches = validation_batches(sources, [s.weight for s in cfg.data.sources],
                                     cfg.run.eval_batches * layout.micro_batch * dp_size, layout.micro_batch,
                                     dp_rank, dp_size)
    meter = energy.make_meter(str(device), env.local_rank, cluster.device_power_w or accel.tdp_w or 0.0,
                              fallback_source=f"cluster profile '{cluster.name}'" if cluster.device_power_w
                              else f"{accel.name} board power")
    if rank == 0:
        n = count_params(cfg.model, cfg.data.seq_len)
        print(f"megatrain: {n['params'] / 1e6:.2f}M parameters, {world} processes (dp {dp_size} x tp {tp}), "
              f"ZeRO-{cfg.parallel.zero_stage}, {cfg.precision}, global batch {layout.global_batch} x "
              f"{layout.seq_len} tokens, {max_steps} steps; {meter.reason}",
              flush=True)
    logger.run_start({"config": asdict(cfg), **resolved, "start_step": step, "tokens_per_step": layout.tokens_per_step,
                      "accelerator": accel.name, "peak_flops": peak, "peak_source": peak_source,
                      "energy_method": meter.method, "energy_reason": meter.reason,
                      "skipped_steps": engine.skipped_steps})

    stop = StopRequest()
    metrics = StepMetrics(tokens_per_step=layout.tokens_per_step, world_size=world, flops_per_token=flops_tok,
                          peak_flops=peak, meter=meter, pue=cluster.pue,
                          intensity_g_per_kwh=cluster.carbon_intensity_g_per_kwh, device=device,
                          max_steps=max_steps, first_step=step, resumed=meta)
    record: dict = {}
    while step < max_steps:
        lr = lr_at(step, cfg.optim, max_steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        metrics.begin_step()
        batches = loader.next_step()
        metrics.begin_compute()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # stays on the device: no sync per step
        for i, b in enumerate(batches):
            loss = engine(b.inputs, b.targets)
            engine.backward(loss)
            if i == len(batches) - 1:
                metrics.begin_optimizer()  # DeepSpeed updates the weights in step() at the accumulation boundary
            engine.step()
            loss_sum += loss.detach()
        step += 1
        metrics.end_step(loss_sum / len(batches), skipped_steps=engine.skipped_steps)

        last = step == max_steps
        if step % cfg.run.log_every == 0 or last:
            record = metrics.collect(step, tokens=loader.consumed_samples * layout.seq_len, lr=lr,
                                     grad_norm=float(engine.get_global_grad_norm() or 0.0))
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 or last:
                record["val_loss"] = evaluate(engine, val_batches, device)
                record["val_ppl"] = math.exp(min(record["val_loss"], 50))
            logger.log(record)

        interrupted = stop.any_rank() or step == cfg.run.stop_at_step
        if last or interrupted or (cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0):
            state = {"consumed_samples": loader.consumed_samples, **metrics.state(), "config": asdict(cfg)}
            folder = checkpoint.save(engine, ckpt_dir, step, state, keep=cfg.run.keep)
            logger.event({"event": "checkpoint", "step": step, "path": str(folder)})
        if interrupted:
            logger.event({"event": "stopped", "reason": stop.signal or "run.stop_at_step", "step": step})
            break

    loader.close()
    logger.close()
    summary = {"run_dir": str(run_dir), "steps": step, "interrupted": step < max_steps, **record}
    return summary
