"""The training loop.

    Trainer(cfg):  process group -> datasets -> model -> resume point -> DeepSpeed engine -> data loader
    Trainer.run(): next batch -> forward/backward per micro-batch -> optimizer step -> guard
                   -> log (+ eval) -> checkpoint -> stop on signal
    finish:        last validation, last checkpoint, summary

Every rank runs this same code (torchrun, srun, or `megatrain train --nproc N`).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from megatrain import checkpoint, energy, hardware
from megatrain.config import Config, ConfigError, load_cluster, resolve_batch
from megatrain.data import IGNORE_INDEX, DataLoader, PackedSamples, validation_batches
from megatrain.guard import StabilityGuard
from megatrain.launch import StopRequest
from megatrain.metrics import StepMetrics, resolve_peak
from megatrain.model import Transformer, count_params, flops_per_token
from megatrain.optim import lr_at
from megatrain.parallel import (
    DistEnv,
    all_gather,
    all_reduce_sum,
    build_engine,
    init_distributed,
    parameter_bytes,
    validate_tensor_parallel,
)
from megatrain.shards import Dataset, ShardError
from megatrain.sinks import MetricsLogger

# Test hook: optimizer steps whose loss becomes NaN on rank 0, once each (as bad data would, until skipped).
INJECT_NAN_ENV = "MEGATRAIN_INJECT_NAN_AT_STEPS"


def software_versions() -> dict:
    import deepspeed

    versions = {
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "deepspeed": str(deepspeed.__version__),
    }
    try:
        root = Path(__file__).resolve().parent.parent
        versions["git_commit"] = (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        versions["git_commit"] = None
    return versions


def open_sources(cfg: Config, rank: int, world: int) -> list[PackedSamples]:
    """Open every dataset on every rank; each rank hashes only its share of the shards (collective)."""

    def mine(shard_index: int) -> bool:
        return cfg.data.verify_checksums and shard_index % world == rank

    try:
        datasets, problem = [Dataset(src.path, verify=mine) for src in cfg.data.sources], None
    except ShardError as e:
        datasets, problem = [], e
    problems = [p for p in all_gather(str(problem) if problem else None) if p]
    if problems:  # raise on every rank, so that none waits forever for the others
        raise problem if problem else ShardError(problems[0])
    tokenizers = {d.manifest.tokenizer_sha256 for d in datasets}
    if len(tokenizers) > 1:
        raise ConfigError(
            "the datasets in 'data.sources' were tokenized with different tokenizers: "
            + ", ".join(f"{d.directory} ({d.manifest.tokenizer_sha256[:12]})" for d in datasets)
        )
    return [
        PackedSamples(d, cfg.data.seq_len, cfg.data.val_fraction, cfg.run.seed + 1000 * i)
        for i, d in enumerate(datasets)
    ]


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        env = DistEnv.from_environ()
        self.device = init_distributed(env)
        self.rank, self.world = env.rank, env.world_size
        tp = cfg.parallel.tensor
        validate_tensor_parallel(cfg, self.world, env.local_world_size)
        # ranks r // tp share a tensor-parallel group and read the same data
        self.dp_size, self.dp_rank = self.world // tp, self.rank // tp
        self.run_dir, self.ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
        self.cluster = load_cluster(cfg.cluster)

        self.sources = open_sources(cfg, self.rank, self.world)
        vocab = self.sources[0].dataset.manifest.vocab_size
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = cfg.model.vocab_multiple * math.ceil(
                vocab / cfg.model.vocab_multiple
            )
        elif cfg.model.vocab_size < vocab:
            raise ConfigError(
                f"'model.vocab_size' ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                f"({vocab}); set it to 0 to take the dataset's"
            )
        self.layout = resolve_batch(cfg, self.dp_size)
        self.max_steps = cfg.run.max_steps or math.ceil(
            cfg.run.max_tokens / self.layout.tokens_per_step
        )
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.accel = accel = hardware.detect_accelerator()
        self.peak_flops, self.peak_source = resolve_peak(
            cfg.precision, accel, self.cluster.peak_tflops, self.cluster.accelerator
        )

        self.logger = MetricsLogger(
            self.run_dir,
            enabled=self.rank == 0,
            wandb_args={
                "name": cfg.run.name,
                "mode": cfg.wandb.mode,
                "project": cfg.wandb.project,
                "entity": cfg.wandb.entity,
                "config": {"config": asdict(cfg)},
            },
        )  # the rest comes with run_start
        self.resolved = self._write_resolved_config() if self.rank == 0 else {}

        # The resume point decides how the engine is built: a checkpoint from another
        # (dp, tp, ZeRO) layout loads through DeepSpeed's universal format.
        self.step, self.consumed, self.skipped, meta = 0, 0, 0, {}
        found = (
            checkpoint.find_resumable(self.ckpt_dir, log=self.logger.event)
            if cfg.run.resume == "auto"
            else None
        )
        load_tag, universal = None, False
        if found:
            load_tag, meta = found
            universal = checkpoint.needs_universal(meta, self.dp_size, tp, cfg.parallel.zero_stage)
            if universal:
                load_tag = checkpoint.to_universal(self.ckpt_dir, load_tag, log=self.logger.event)
            self.step, self.consumed, self.skipped = (
                meta["step"],
                meta["consumed_samples"],
                meta.get("skipped_steps", 0),
            )

        torch.manual_seed(cfg.run.seed)
        self.engine, self.optimizer = build_engine(
            Transformer(cfg.model, cfg.data.seq_len),
            cfg,
            self.layout,
            self.device,
            load_universal=universal,
        )
        if load_tag:
            checkpoint.load(self.engine, self.ckpt_dir, load_tag)
            self.logger.event(
                {
                    "event": "resumed",
                    "tag": load_tag,
                    "step": self.step,
                    "consumed_samples": self.consumed,
                    "universal": universal,
                }
            )

        self.param_gb_per_rank = [
            b / 2**30 for b in all_gather(parameter_bytes(self.engine.module))
        ]
        self.weights = [s.weight for s in cfg.data.sources]
        self.loader = self._loader(self.consumed)
        self.val_batches = validation_batches(
            self.sources,
            self.weights,
            cfg.run.eval_batches * self.layout.micro_batch * self.dp_size,
            self.layout.micro_batch,
            self.dp_rank,
            self.dp_size,
        )
        self.meter = energy.make_meter(
            str(self.device),
            env.local_rank,
            self.cluster.device_power_w or accel.tdp_w or 0.0,
            fallback_source=(
                f"cluster profile '{self.cluster.name}'"
                if self.cluster.device_power_w
                else f"{accel.name} board power"
            ),
        )
        self.metrics = StepMetrics(
            tokens_per_step=self.layout.tokens_per_step,
            world_size=self.world,
            flops_per_token=self.flops_per_token,
            peak_flops=self.peak_flops,
            meter=self.meter,
            pue=self.cluster.pue,
            intensity_g_per_kwh=self.cluster.carbon_intensity_g_per_kwh,
            device=self.device,
            max_steps=self.max_steps,
            first_step=self.step,
            resumed=meta,
        )
        self.guard = StabilityGuard(cfg.guard)
        self.stop = StopRequest()
        self.inject_nan = {int(s) for s in os.environ.get(INJECT_NAN_ENV, "").split(",") if s}

    def _loader(self, consumed: int) -> DataLoader:
        return DataLoader(
            self.sources,
            self.weights,
            self.layout,
            self.dp_rank,
            consumed,
            self.cfg.data.prefetch,
            self.device.type,
        )

    def _write_resolved_config(self) -> dict:
        cfg = self.cfg
        resolved = {
            "cluster_profile": asdict(self.cluster),
            "world_size": self.world,
            "dp_size": self.dp_size,
            "batch": {**asdict(self.layout), "global_batch": self.layout.global_batch},
            "max_steps": self.max_steps,
            **count_params(cfg.model, cfg.data.seq_len),
            "flops_per_token": self.flops_per_token,
            "versions": software_versions(),
        }
        (self.run_dir / "config.yaml").write_text(
            yaml.safe_dump({**asdict(cfg), "resolved": resolved}, sort_keys=False)
        )
        return resolved

    # ------------------------------------------------------------------------- one step

    def train_step(self) -> tuple[float, bool, bool]:
        """Forward/backward over this rank's micro-batches and one optimizer step.

        Returns (mean loss over all ranks, update skipped, stop requested) — agreed by all ranks.
        """
        engine, metrics = self.engine, self.metrics
        metrics.begin_step()
        batches = self.loader.next_step()
        metrics.begin_compute()
        skipped_before = engine.skipped_steps
        loss_sum, nonfinite = torch.zeros((), dtype=torch.float64, device=self.device), 0.0
        for i, b in enumerate(batches):
            loss = engine(b.inputs, b.targets)
            if self.step + 1 in self.inject_nan and i == len(batches) - 1:
                self.inject_nan.discard(self.step + 1)
                if self.rank == 0:
                    loss = loss * float("nan")
            engine.backward(loss)
            loss_sum += loss.detach()  # stays on the device: one host sync per step, below
            if i == len(batches) - 1:
                # one collective per step: the loss, whether any rank saw a non-finite loss, stop votes
                local = loss_sum.item()
                loss_sum, nonfinite, *votes = all_reduce_sum(
                    [local, 0.0 if math.isfinite(local) else 1.0, *self.stop.votes()]
                )
                stop = self.stop.agree(votes)
                if nonfinite and self.cfg.parallel.zero_stage == 0:
                    self.optimizer.skip_next = (
                        True  # ZeRO 1-3 discard non-finite steps by themselves
                    )
                metrics.begin_optimizer()  # DeepSpeed updates the weights in step() at the accumulation boundary
            engine.step()
        skipped = bool(nonfinite) or engine.skipped_steps > skipped_before
        self.skipped += skipped
        loss = loss_sum / (len(batches) * self.world)
        metrics.end_step(
            loss, skipped_steps=self.skipped
        )  # the global mean, the same on every rank
        return loss, skipped, stop

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss per token over all ranks' batches."""
        self.engine.eval()
        loss_sum, count = 0.0, 0
        for b in self.val_batches:
            loss = self.engine(b.inputs.to(self.device), b.targets.to(self.device))
            n = int((b.targets != IGNORE_INDEX).sum())
            if n:
                loss_sum, count = loss_sum + float(loss) * n, count + n
        self.engine.train()
        loss_sum, count = all_reduce_sum([loss_sum, count])
        return loss_sum / max(count, 1)

    def save(self) -> None:
        state = {
            "consumed_samples": self.loader.consumed_samples,
            **self.metrics.state(),
            "skipped_steps": self.skipped,
            "config": asdict(self.cfg),
            "layout": {
                "dp_size": self.dp_size,
                "tp_size": self.cfg.parallel.tensor,
                "zero_stage": self.cfg.parallel.zero_stage,
            },
        }
        folder = checkpoint.save(
            self.engine,
            self.ckpt_dir,
            self.step,
            state,
            keep=self.cfg.run.keep,
            keep_every=self.cfg.run.keep_every,
        )
        self.logger.event({"event": "checkpoint", "step": self.step, "path": str(folder)})

    def roll_back(self) -> bool:
        """Reload the last checkpoint's weights and optimizer, but keep reading from the current data position."""
        found = checkpoint.find_resumable(self.ckpt_dir, log=self.logger.event)
        if not found:
            self.logger.event(
                {"event": "rollback_impossible", "step": self.step, "reason": "no checkpoint yet"}
            )
            return False
        tag, meta = found
        checkpoint.load(self.engine, self.ckpt_dir, tag)
        skipped_from = meta["consumed_samples"]
        self.loader.close()
        self.loader = self._loader(self.consumed_now)
        self.logger.event(
            {
                "event": "rollback",
                "from_step": self.step,
                "to_step": meta["step"],
                "tag": tag,
                "skipped_samples": [skipped_from, self.consumed_now],
            }
        )
        self.step = meta["step"]
        return True

    @property
    def consumed_now(self) -> int:
        return self.loader.consumed_samples

    # ------------------------------------------------------------------------- the loop

    def run(self) -> dict:
        cfg, layout = self.cfg, self.layout
        if self.rank == 0:
            n = count_params(cfg.model, cfg.data.seq_len)
            print(
                f"megatrain: {n['params'] / 1e6:.2f}M parameters, {self.world} processes (dp {self.dp_size} x "
                f"tp {cfg.parallel.tensor}), ZeRO-{cfg.parallel.zero_stage}, {cfg.precision}, global batch "
                f"{layout.global_batch} x {layout.seq_len} tokens, {self.max_steps} steps; {self.meter.reason}",
                flush=True,
            )
            print(
                "megatrain: parameter memory per rank (GB): "
                + " ".join(f"{gb:.3f}" for gb in self.param_gb_per_rank),
                flush=True,
            )
        self.logger.run_start(
            {
                "config": asdict(cfg),
                **self.resolved,
                "start_step": self.step,
                "tokens_per_step": layout.tokens_per_step,
                "accelerator": self.accel.name,
                "peak_flops": self.peak_flops,
                "peak_source": self.peak_source,
                "energy_method": self.meter.method,
                "energy_reason": self.meter.reason,
                "skipped_steps": self.skipped,
            }
        )
        self.logger.event({"event": "parameter_memory", "gb_per_rank": self.param_gb_per_rank})
        record: dict = {}
        stopped = False
        while self.step < self.max_steps and not stopped:
            lr = lr_at(self.step, cfg.optim, self.max_steps)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            loss, skipped, stopped = self.train_step()
            self.step += 1

            verdict = self.guard.check(loss, skipped)
            if verdict:
                self.logger.event(
                    {
                        "event": "skipped_step" if verdict == "nonfinite" else "loss_spike",
                        "step": self.step,
                        "loss": loss,
                        "bad_streak": self.guard.bad_streak,
                    }
                )
            if self.guard.should_roll_back and self.roll_back():
                self.guard.rolled_back()
                if not stopped:
                    continue

            last = self.step == self.max_steps
            if self.step % cfg.run.log_every == 0 or last:
                record = self.metrics.collect(
                    self.step,
                    tokens=self.consumed_now * layout.seq_len,
                    lr=lr,
                    grad_norm=float(self.engine.get_global_grad_norm() or 0.0),
                    rollbacks=self.guard.rollbacks,
                    param_mem_gb=max(self.param_gb_per_rank),
                )
                if cfg.run.eval_every and self.step % cfg.run.eval_every == 0 or last:
                    record["val_loss"] = self.evaluate()
                    record["val_ppl"] = math.exp(min(record["val_loss"], 50))
                self.logger.log(record)

            stopped = stopped or self.step == cfg.run.stop_at_step
            if last or stopped or (cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0):
                self.save()
            if stopped:
                self.logger.event(
                    {
                        "event": "stopped",
                        "reason": self.stop.signal or "run.stop_at_step",
                        "step": self.step,
                    }
                )

        self.loader.close()
        self.logger.close()
        return {
            "run_dir": str(self.run_dir),
            "steps": self.step,
            "interrupted": self.step < self.max_steps,
            "stop_signal": self.stop.signal,
            **record,
        }


def train(cfg: Config) -> dict:
    return Trainer(cfg).run()
