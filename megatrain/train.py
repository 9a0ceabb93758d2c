"""The training loop, assembled from parts.

    Trainer(cfg):  process group -> datasets -> run plan -> resume point -> engine -> parts:
                   data loader, metrics, stability guard, evaluator, checkpointer
    Trainer.run(): step -> guard (skip, spike, roll back) -> log and evaluate -> checkpoint,
                   until the step budget, `run.stop_at_step` or a stop signal

Each part owns its state and its cadence; the loop only asks them. Every rank runs this same
code (torchrun, srun, mpiexec or `megatrain train --nproc N`).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import yaml

from megatrain import dist, energy, faults, hardware, probes
from megatrain.callbacks import Callback
from megatrain.checkpoint import (
    Checkpointer,
    ResumePoint,
    checkpoint_bytes,
    find_resumable,
    find_resume_point,
    new_lineage,
    supersede,
)
from megatrain.config import Config, ConfigError, load_cluster
from megatrain.data import DataLoader, PackedSamples, validation_batches
from megatrain.evaluator import Evaluator
from megatrain.files import atomic_write_bytes, atomic_write_text
from megatrain.guard import StabilityGuard
from megatrain.hf import check_tokenizer, load_hf_weights, resolve_init_from
from megatrain.locks import ReadersLock, RunLock
from megatrain.memory import memory_per_gpu
from megatrain.metrics import StepMetrics, resolve_peak
from megatrain.model import Transformer
from megatrain.optim import lr_at
from megatrain.parallel import (
    MIN_LOSS_SCALE,
    build_engine,
    compile_counters,
    compile_reason,
    parameter_bytes,
    use_deterministic_kernels,
)
from megatrain.plan import plan_run
from megatrain.resume import check_resume, data_identity, resume_event
from megatrain.shards import Dataset
from megatrain.sinks import EventLog, MetricsLogger
from megatrain.stop import StopRequest
from megatrain.stragglers import StragglerMonitor
from megatrain.watchdog import Watchdog


@dataclass
class Step:
    """One optimizer step as every rank agrees it went."""

    loss: float
    """Mean loss over the step's micro-batches and the ranks."""
    skipped: bool
    """The update was not applied (non-finite gradients, or an fp16 overflow)."""
    overflow: bool
    """fp16's loss scaler skipped it, with a finite loss and its scale above the minimum."""
    loss_scale: float | None
    """fp16's loss scale after the step (None in bf16 and fp32)."""
    stop: bool
    """Some rank got a stop signal: stop after this step."""


def software_versions() -> dict:
    import deepspeed

    versions = {
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "deepspeed": str(deepspeed.__version__),
    }
    root = Path(__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(root), "rev-parse", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True, timeout=5, check=False)
        versions["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        versions["git_commit"] = None
    return versions


def open_sources(cfg: Config, rank: int, world: int) -> list[PackedSamples]:
    """Open every dataset on every rank; each rank hashes only its share of the shards, and a
    bad shard stops every rank with the same error (collective)."""

    def mine(shard_index: int) -> bool:
        return cfg.data.verify_checksums and shard_index % world == rank

    datasets = dist.agree(lambda: [Dataset(src.path, verify=mine) for src in cfg.data.sources])
    if len({d.manifest.tokenizer_sha256 for d in datasets}) > 1:
        raise ConfigError(
            "the datasets in 'data.sources' were tokenized with different tokenizers: "
            + ", ".join(f"{d.directory} ({d.manifest.tokenizer_sha256[:12]})" for d in datasets)
        )
    # every rank finds the same too-short dataset: one error, printed once (collective)
    return dist.agree(
        lambda: [
            PackedSamples(d, cfg.data.seq_len, cfg.data.val_fraction, cfg.run.seed + 1000 * i)
            for i, d in enumerate(datasets)
        ]
    )


class Trainer:
    def __init__(self, cfg: Config, callbacks: Sequence[Callback] = ()):
        self.cfg, self.callbacks = cfg, list(callbacks)
        env = dist.DistEnv.from_environ()
        timeout = timedelta(seconds=cfg.run.collective_timeout_s)
        self.device = dist.init_process_group(env, timeout=timeout)
        self.rank, self.world = env.rank, env.world_size
        self._lock(cfg)
        self.sources = open_sources(cfg, self.rank, self.world)
        self.data = data_identity(
            [(s.path, s.weight, d.dataset.manifest) for s, d in zip(cfg.data.sources, self.sources)]
        )
        if cfg.model.init_from:  # the shape of the model the run starts from
            resolve_init_from(cfg)
            dataset = self.sources[0].dataset
            check_tokenizer(
                cfg.model.init_from, dataset.directory / dataset.manifest.tokenizer_file
            )
        vocab = self.sources[0].dataset.vocab_size
        self.plan = plan_run(cfg, self.world, vocab, env.local_world_size)
        cfg.model = self.plan.model  # with its vocabulary size, for config.yaml and checkpoints
        self.dp_rank = self.rank // self.plan.tp_size  # tensor-parallel groups read the same data
        self.cluster = load_cluster(cfg.cluster)
        self.accel = hardware.detect_accelerator()
        self._check_device()
        self.peak_flops, self.peak_source = resolve_peak(
            cfg.precision, self.accel, self.cluster.peak_tflops, self.cluster.accelerator
        )
        self.logger = MetricsLogger(cfg.run_dir, enabled=self.rank == 0, wandb_args=self._wandb())
        self.resolved = self._write_resolved_config() if self.rank == 0 else {}
        self.stop = StopRequest()
        self._compile_reported = False
        self.memory_plan: dict | None = None  # rank 0's, until compared with the first record

        resume = self._resume_point()
        # a fresh start draws a lineage; a resumed run continues its checkpoint's
        fresh = dist.all_gather(new_lineage() if self.rank == 0 else None)[0]
        self.lineage = resume.manifest.get("lineage") if resume else fresh
        unsaved = self._rewind_metrics(resume)
        if cfg.run.deterministic:
            use_deterministic_kernels()
        torch.manual_seed(cfg.run.seed)
        with self.device:  # built where it trains: no full fp32 copy in host memory per rank
            model = Transformer(cfg.model, cfg.data.seq_len)
        if cfg.model.init_from and not resume:
            load_hf_weights(model, cfg.model.init_from)
        self.engine, self.optimizer = build_engine(
            model,
            cfg,
            self.plan.layout,
            self.device,
            load_universal=bool(resume and resume.universal),
        )
        self.step = resume.manifest["step"] if resume else 0
        self._build_parts(env.local_rank, resume)
        if resume:
            self.checkpointer.restore(resume.tag, resume.manifest)
        if unsaved:
            self.metrics.add_unsaved_work(unsaved["energy_j"], unsaved["device_s"])
            self.logger.event({"event": "unsaved_work_counted", "step": self.step, **unsaved})
        if resume:
            self.logger.event(
                {
                    "event": "resumed",
                    "tag": resume.tag,
                    "step": self.step,
                    "consumed_samples": self.loader.consumed_samples,
                    "universal": resume.universal,
                }
            )
        if cfg.model.init_from and not resume:
            self.logger.event({"event": "initialized_from", "dir": cfg.model.init_from})
        gathered = dist.all_gather(parameter_bytes(self.engine.module))
        self.param_gb_per_rank = [b / 2**30 for b in gathered]

    def _lock(self, cfg: Config) -> None:
        """Before anything is written: rank 0 takes RUN_DIR/.lock (a second training on the run
        directory stops here, on every rank, naming the holder), and every rank holds its
        datasets open against `megatrain prep --force`. Released at the end of `run()`, or by
        the kernel when the process dies."""
        self.run_lock: RunLock | None = None
        self.readers: ReadersLock | None = None

        def take_run_dir() -> None:
            self.run_lock = RunLock(cfg.run_dir)

        def take_data() -> None:
            self.readers = ReadersLock([src.path for src in cfg.data.sources])

        dist.agree(take_run_dir, root=0)
        dist.agree(take_data)

    def _unlock(self) -> None:
        for lock in (self.readers, self.run_lock):
            if lock is not None:
                lock.release()

    def _check_device(self) -> None:
        cuda = self.device.type == "cuda"
        hardware.check_device(
            self.cfg.precision,
            self.device.type,
            self.accel.name,
            torch.cuda.get_device_capability(self.device) if cuda else None,
            self.cluster.name,
            self.cluster.gpus_per_node,
        )

    def _wandb(self) -> dict:
        c = self.cfg
        return {
            "name": c.run.name,
            "mode": c.wandb.mode,
            "project": c.wandb.project,
            "entity": c.wandb.entity,
            "config": {"config": asdict(c)},  # the rest comes with run_start
        }

    def _write_resolved_config(self) -> dict:
        plan = self.plan
        resolved = {
            "cluster_profile": asdict(self.cluster),
            "world_size": self.world,
            "dp_size": plan.dp_size,
            "batch": {**asdict(plan.layout), "global_batch": plan.layout.global_batch},
            "max_steps": plan.max_steps,
            "params": plan.params,
            "non_embedding_params": plan.non_embedding_params,
            "flops_per_token": plan.flops_per_token,
            "versions": software_versions(),
        }
        text = yaml.safe_dump({**asdict(self.cfg), "resolved": resolved}, sort_keys=False)
        atomic_write_text(self.cfg.run_dir / "config.yaml", text)
        # the tokenizer beside it: the run directory alone is enough to export or sample
        dataset = self.sources[0].dataset
        tokenizer = dataset.directory / dataset.manifest.tokenizer_file
        atomic_write_bytes(self.cfg.run_dir / "tokenizer.json", tokenizer.read_bytes())
        return resolved

    def _resume_point(self) -> ResumePoint | None:
        """Where this job continues the run; it decides how the engine is built (a checkpoint of
        another (dp, tp, ZeRO) layout loads through DeepSpeed's universal format)."""
        ckpt_dir = self.cfg.run_dir / "checkpoints"
        if self.cfg.run.resume != "auto":
            # an earlier run's checkpoints go aside: never resumed, pruned or rolled back to
            old_metrics = (self.cfg.run_dir / "metrics.jsonl",)
            dist.agree(lambda: supersede(ckpt_dir, self.logger.event, old_metrics), root=0)
            return None
        p = self.cfg.parallel
        return find_resume_point(
            ckpt_dir,
            self.plan.dp_size,
            p.tensor,
            p.zero_stage,
            log=self.logger.event,
            global_batch=self.plan.layout.global_batch,
            check=self._check_resume,
        )

    def _check_resume(self, tag: str, manifest: dict) -> None:
        """Refuse, on every rank and by name, a checkpoint this config does not continue (see
        megatrain/resume.py); log what `run.allow_changes` let through."""
        if "data" not in manifest:
            reason = "written before checkpoints recorded their data and tokenizer"
            self.logger.event({"event": "resume_unchecked", "tag": tag, "reason": reason})
        allow = self.cfg.run.allow_changes
        current = {"config": asdict(self.cfg), "data": self.data}
        where = self.cfg.run_dir / "checkpoints" / tag
        found = dist.agree(lambda: check_resume(manifest, current, allow, str(where)))
        if found:
            self.logger.event(resume_event(found, tag, allow))

    def _rewind_metrics(self, resume: ResumePoint | None) -> dict | None:
        """metrics.jsonl keeps each step once: the records after the checkpoint's step go (with
        `run.resume=never` the earlier run's file went to its superseded folder). The work they
        measured and no checkpoint holds (a crashed job's last steps) is returned, to be counted
        in the run's totals."""
        step = resume.manifest["step"] if resume else 0
        saved = resume.manifest if resume else {}

        def rewind() -> dict | None:  # rank 0
            last = self.logger.rewind(step)
            if not last:
                return None
            return {
                "redone_steps": last["step"] - step,
                "energy_j": last.get("energy_kwh_it", 0.0) * 3.6e6 - saved.get("energy_j", 0.0),
                "device_s": last.get("gpu_hours", 0.0) * 3600 - saved.get("device_s", 0.0),
            }

        return dist.agree(rewind, root=0)

    def _build_parts(self, local_rank: int, resume: ResumePoint | None) -> None:
        cfg, plan, layout = self.cfg, self.plan, self.plan.layout
        weights = [s.weight for s in cfg.data.sources]
        self.loader = DataLoader(
            self.sources, weights, layout, self.dp_rank, 0, cfg.data.prefetch, self.device
        )
        fallback = self.cluster.device_power_w or self.accel.tdp_w or 0.0
        self.meter = energy.make_meter(
            str(self.device),
            local_rank,
            fallback,
            fallback_source=(
                f"cluster profile '{self.cluster.name}'"
                if self.cluster.device_power_w
                else f"{self.accel.name} board power"
            ),
        )
        self.metrics = StepMetrics(
            tokens_per_step=layout.tokens_per_step,
            world_size=self.world,
            flops_per_token=plan.flops_per_token,
            peak_flops=self.peak_flops,
            meter=self.meter,
            pue=self.cluster.pue,
            intensity_g_per_kwh=self.cluster.carbon_intensity_g_per_kwh,
            device=self.device,
            max_steps=plan.max_steps,
            first_step=self.step,
        )
        self.stragglers = StragglerMonitor(
            cfg.run.straggler_factor,
            cfg.run.straggler_intervals,
            self.device,
            log=self.logger.event if self.rank == 0 else None,
        )
        self.guard = StabilityGuard(cfg.guard)
        val_samples = cfg.run.eval_batches * layout.micro_batch * plan.dp_size
        val = validation_batches(
            self.sources, weights, val_samples, layout.micro_batch, self.dp_rank, plan.dp_size
        )
        self.evaluator = Evaluator(self.engine, val, cfg.run.eval_every, self.device)
        layout_info = {"dp_size": plan.dp_size, "tp_size": plan.tp_size}
        layout_info["global_batch"] = layout.global_batch
        self.checkpointer = Checkpointer(
            self.engine,
            cfg.run_dir / "checkpoints",
            cfg.run,
            parts={"data": self.loader, "metrics": self.metrics, "guard": self.guard},
            info={
                "config": asdict(cfg),
                "layout": {**layout_info, "zero_stage": cfg.parallel.zero_stage},
                "lineage": self.lineage,
                "data": self.data,
            },
            log=self.logger.event,
            last_bytes=checkpoint_bytes(resume.manifest) if resume else 0,
        )

    # ------------------------------------------------------------------------- one step

    def train_step(self) -> Step:
        """Forward/backward over this rank's micro-batches and one optimizer step; what happened,
        agreed by all ranks."""
        engine, metrics, stragglers = self.engine, self.metrics, self.stragglers
        lr = lr_at(self.step, self.cfg.optim, self.plan.max_steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        metrics.begin_step()
        batches = self.loader.next_step()
        metrics.begin_compute()
        skipped_before = self._updates_skipped()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, b in enumerate(batches):
            stragglers.begin_forward()  # each rank's own work: the backward waits for the others
            loss = engine(b.inputs, b.targets)
            stragglers.end_forward()
            engine.backward(loss)
            loss_sum += loss.detach()  # stays on the device: one host sync per step, below
            if i == len(batches) - 1:
                metrics.begin_optimizer()  # DeepSpeed updates the weights at the last step()
            engine.step()
        # One host sync and one collective per step, once the optimizer step is queued (the
        # device works through it meanwhile): the loss, any rank's non-finite loss, stop votes.
        local = loss_sum.item()
        nonfinite = 0.0 if math.isfinite(local) else 1.0
        sums = dist.all_reduce({"loss": local, "nonfinite": nonfinite, **self.stop.votes()})
        loss = sums["loss"] / (len(batches) * self.world)
        skipped = sums["nonfinite"] > 0 or self._updates_skipped() > skipped_before
        scale = self._loss_scale()
        # fp16's loss scaler skipping an overflow is normal while its scale is above the minimum
        overflow = skipped and math.isfinite(loss) and scale is not None and scale > MIN_LOSS_SCALE
        metrics.end_step(loss, skipped_steps=self.guard.skipped_steps + skipped)
        return Step(loss, skipped, overflow, scale, self.stop.agree(sums))

    def _updates_skipped(self) -> int:
        """Updates skipped so far: by DeepSpeed's optimizers, or by ours (fp32 without ZeRO)."""
        return self.engine.skipped_steps + getattr(self.optimizer, "skipped_steps", 0)

    def _loss_scale(self) -> float | None:
        """fp16's current loss scale (None in bf16 and fp32)."""
        if self.cfg.precision != "fp16":
            return None
        return float(self.engine.optimizer.loss_scale)

    def roll_back(self) -> bool:
        """Reload the last checkpoint's weights and optimizer, but keep reading from the current
        data position (the data since the checkpoint is the usual culprit)."""
        ckpt_dir = self.cfg.run_dir / "checkpoints"
        found = find_resumable(ckpt_dir, log=self.logger.event, lineage=self.lineage)
        if not found:
            reason = "no checkpoint yet"
            self.logger.event({"event": "rollback_impossible", "step": self.step, "reason": reason})
            return False
        tag, manifest = found
        with self.watchdog.phase("rollback"):
            self.checkpointer.restore(tag, manifest, parts=False)
        self.logger.event(
            {
                "event": "rollback",
                "from_step": self.step,
                "to_step": manifest["step"],
                "tag": tag,
                "skipped_samples": [manifest["consumed_samples"], self.loader.consumed_samples],
            }
        )
        self.step = manifest["step"]
        return True

    # ------------------------------------------------------------------------- the loop

    def run(self) -> dict:
        r = self.cfg.run
        # a hung rank (a frozen peer, a dead device) dumps its stacks and exits (megatrain/watchdog)
        self.watchdog = Watchdog(
            self.cfg.run_dir,
            self.rank,
            self.step,
            r.hang_timeout_s,
            r.hang_factor,
            r.hang_slow_s,
            log=self.logger.event if self.rank == 0 else None,
        ).start()
        self._announce()
        record: dict = {}
        stopped, error = False, None
        self._hook("on_start")
        try:
            while self.step < self.plan.max_steps and not stopped:
                step = self.train_step()
                self.step += 1
                self.watchdog.beat(self.step)
                stopped = step.stop
                self._hook("on_step_end", step.loss, step.skipped)
                if self._guard(step) and not stopped:
                    continue  # rolled back: go on from the checkpoint's step
                last = self.step == self.plan.max_steps
                record = self._log_and_evaluate(last) or record
                stopped = stopped or self.step == self.cfg.run.stop_at_step
                if self.checkpointer.due(self.step, last, stopped):
                    self._save()
                if stopped:
                    reason = self.stop.signal or "run.stop_at_step"
                    self.logger.event({"event": "stopped", "reason": reason, "step": self.step})
        except BaseException as e:
            error = e
            message = {"type": type(e).__name__, "message": str(e), "step": self.step}
            # every rank's error: the first one is the cause, the others its echoes (a peer gone)
            record = {"event": "error", "rank": self.rank, **message}
            if self.rank == 0:
                self.logger.event(record)
            elif not isinstance(e, (KeyboardInterrupt, SystemExit)):
                EventLog(self.cfg.run_dir).write(record, echo=False)
            raise
        finally:
            self.watchdog.stop()
            self.loader.close()
            self._hook("on_close", error)
            self.logger.close()
            self._unlock()
        return {
            "run_dir": str(self.cfg.run_dir),
            "steps": self.step,
            "interrupted": self.step < self.plan.max_steps,
            "stop_signal": self.stop.signal,
            **record,
        }

    def _hook(self, name: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(self, *args)

    def _guard(self, step: Step) -> bool:
        """Let the guard judge the step; True if it asked for a rollback and got one."""
        verdict = self.guard.check(step.loss, step.skipped, step.overflow)
        if verdict == "overflow":
            scale = step.loss_scale
            self.logger.event({"event": "overflow_skip", "step": self.step, "loss_scale": scale})
        elif verdict:
            kind = "skipped_step" if verdict == "nonfinite" else "loss_spike"
            info = {"step": self.step, "loss": step.loss, "bad_streak": self.guard.bad_streak}
            self.logger.event({"event": kind, **info})
        if self.guard.should_roll_back:
            if self.roll_back():
                self.guard.rolled_back()
                return True
            self.guard.cannot_roll_back(self.step)  # a non-finite streak stops the run here
        return False

    def _log_and_evaluate(self, last: bool) -> dict | None:
        """A metrics record every `run.log_every` steps, and at each evaluation, which has its own
        cadence (its result goes into the record of its step)."""
        evaluate = self.evaluator.due(self.step, last)
        if not (evaluate or last or self.step % self.cfg.run.log_every == 0):
            return None
        record = self.metrics.collect(
            self.step,
            tokens=self.loader.consumed_samples * self.plan.layout.seq_len,
            lr=lr_at(self.step - 1, self.cfg.optim, self.plan.max_steps),
            grad_norm=float(self.engine.get_global_grad_norm() or 0.0),
            rollbacks=self.guard.rollbacks,
            param_mem_gb=max(self.param_gb_per_rank),
        )
        record.update(self.stragglers.collect(self.step))
        if self.cfg.precision == "fp16":
            record["loss_scale"] = self._loss_scale()
        if evaluate:
            with self.watchdog.phase("evaluation"):
                record.update(self.evaluator.evaluate())
        if self.memory_plan is not None:
            self._compare_memory(record["mem_gb"])
        if not self._compile_reported and compile_reason(self.cfg, self.device) is None:
            self.logger.event({"event": "compiled", "step": self.step, **compile_counters()})
            self._compile_reported = True
        self.logger.log(record)
        self._hook("on_log", record)
        return record

    def _compare_memory(self, measured_gb: float) -> None:
        """Once, at the first record: the measured peak against `megatrain plan`'s (on a GPU the
        allocator's peak against the plan's live bytes; on the CPU the resident set, which also
        holds the interpreter and libraries)."""
        plan, self.memory_plan = self.memory_plan, None
        gpu = self.device.type == "cuda"
        planned = plan["total"] - plan["overhead"]
        what = "allocated" if gpu else "resident (interpreter and libraries included)"
        error = measured_gb / planned - 1 if gpu and planned else None
        self.logger.event(
            {
                "event": "memory_vs_plan",
                "step": self.step,
                "measured_gb": measured_gb,
                "measured": what,
                "planned_gb": planned,
                "planned_total_gb": plan["total"],
                "planned_peak_phase": plan["peak_phase"],
                "error": error,
            }
        )

    def _save(self) -> None:
        with self.watchdog.phase("checkpoint save"):
            path = self.checkpointer.save(self.step)
        self.logger.event({"event": "checkpoint", "step": self.step, "path": str(path)})
        self._hook("on_checkpoint", path)

    def _announce(self) -> None:
        cfg, plan, layout = self.cfg, self.plan, self.plan.layout
        if self.rank == 0:
            print(
                f"megatrain: {plan.params / 1e6:.2f}M parameters, {self.world} processes "
                f"(dp {plan.dp_size} x tp {plan.tp_size}), ZeRO-{cfg.parallel.zero_stage}, "
                f"{cfg.precision}, global batch {layout.global_batch} x {layout.seq_len} tokens, "
                f"{plan.max_steps} steps; {self.meter.reason}",
                flush=True,
            )
            per_rank = " ".join(f"{gb:.3f}" for gb in self.param_gb_per_rank)
            print(f"megatrain: parameter memory per rank (GB): {per_rank}", flush=True)
            gpu = self.device.type == "cuda"
            self.memory_plan = memory_per_gpu(cfg, plan, gpu=gpu)
            print(
                f"megatrain: planned peak memory per {'GPU' if gpu else 'process'} "
                f"{self.memory_plan['total'] - self.memory_plan['overhead']:.3f} GiB of tensors"
                + (f", {self.memory_plan['total']:.2f} GiB with CUDA's own" if gpu else ""),
                flush=True,
            )
        self.logger.run_start(
            {
                "config": asdict(cfg),
                **self.resolved,
                "start_step": self.step,
                "slurm_job": dist.slurm_job(),  # which job of a requeued chain this is
                "tokens_per_step": layout.tokens_per_step,
                "accelerator": self.accel.name,
                "peak_flops": self.peak_flops,
                "peak_source": self.peak_source,
                "energy_method": self.meter.method,
                "energy_reason": self.meter.reason,
                "compile": compile_reason(cfg, self.device) or "each block and the loss",
                "skipped_steps": self.guard.skipped_steps,
            }
        )
        self.logger.event({"event": "parameter_memory", "gb_per_rank": self.param_gb_per_rank})


def train(cfg: Config, callbacks: Sequence[Callback] = ()) -> dict:
    """Train `cfg` on this rank (every rank calls it); faults and probes asked for by the
    environment (tests) are applied."""
    return Trainer(cfg, [*callbacks, *faults.from_environ(), *probes.from_environ()]).run()
