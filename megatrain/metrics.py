"""What a run records about itself, and where.

Metric names are fixed (see docs/architecture.md) so dashboards line up across runs:
step, tokens, loss, val_loss, lr, grad_norm, tokens_per_s, tokens_per_s_per_gpu,
tflops_per_gpu, mfu, step_s, data_wait_s, mem_gb, power_w, energy_kwh_it,
energy_kwh_facility, co2_kg, energy_method.

Sinks, all written by rank 0:
- RUN_DIR/metrics.jsonl: one JSON object per log interval; always on, the source of truth.
- RUN_DIR/events.jsonl: checkpoints, resumes, skipped steps, signals.
- Weights & Biases: offline by default (RUN_DIR/wandb/, `wandb sync` later), never blocks a run.
- the console: one line per interval.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from megatrain import energy
from megatrain.parallel import all_reduce_sum


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s per device over the device's dense peak."""
    return flops_per_token * tokens_per_s_per_device / peak_flops if peak_flops > 0 else 0.0


class StepMetrics:
    """Measurements of the steps since the last log line, turned into one record for all ranks.

    `observe()` is called by every rank after each optimizer step (cheap, local); `collect()` is
    collective: it averages the loss over ranks, sums energy over ranks, and derives throughput,
    MFU, energy and CO2.
    """

    def __init__(self, *, tokens_per_step: int, world_size: int, flops_per_token: float, peak_flops: float,
                 meter, pue: float, intensity_g_per_kwh: float, device: torch.device, max_steps: int,
                 first_step: int, energy_before_j: float = 0.0):
        self.tokens_per_step, self.world_size = tokens_per_step, world_size
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.meter, self.pue, self.intensity = meter, pue, intensity_g_per_kwh
        self.device, self.max_steps, self.first_step = device, max_steps, first_step
        self.energy_before_j = energy_before_j
        self.t_start = self.t_last = time.perf_counter()
        self.losses: list[float] = []
        self.data_wait_s = 0.0

    def observe(self, loss: float, data_wait_s: float) -> None:
        self.losses.append(loss)
        self.data_wait_s += data_wait_s

    def energy_joules(self) -> float:
        """IT energy of the whole job so far, all ranks, earlier jobs of this run included (collective)."""
        return all_reduce_sum([self.meter.read().joules])[0] + self.energy_before_j

    def collect(self, step: int, **extra) -> dict:
        now = time.perf_counter()
        n = max(len(self.losses), 1)
        loss_sum, joules, power = all_reduce_sum([sum(self.losses), self.meter.read().joules, self.meter.read().power_w])
        joules += self.energy_before_j
        tok_s = n * self.tokens_per_step / (now - self.t_last)
        per_device = tok_s / self.world_size
        kwh_facility = energy.facility_kwh(joules, self.pue)
        record = {
            "step": step, "loss": loss_sum / (n * self.world_size), **extra,
            "tokens_per_s": tok_s, "tokens_per_s_per_gpu": per_device,
            "tflops_per_gpu": self.flops_per_token * per_device / 1e12,
            "mfu": mfu(self.flops_per_token, per_device, self.peak_flops),
            "step_s": (now - self.t_last) / n, "data_wait_s": self.data_wait_s / n,
            "mem_gb": peak_memory_gb(self.device), "power_w": power,
            "energy_kwh_it": joules / 3.6e6, "energy_kwh_facility": kwh_facility,
            "co2_kg": energy.co2_kg(kwh_facility, self.intensity), "energy_method": self.meter.method,
            "eta_s": (now - self.t_start) / max(step - self.first_step, 1) * (self.max_steps - step),
        }
        self.t_last, self.losses, self.data_wait_s = time.perf_counter(), [], 0.0
        return record


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class JsonlSink:
    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)  # line-buffered: a crash loses at most one line

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, default=float) + "\n")

    def close(self) -> None:
        self.file.close()


class WandbSink:
    """A W&B run in RUN_DIR/wandb; offline unless the config asks for online."""

    def __init__(self, run_dir: Path, name: str, mode: str, project: str, entity: str | None, config: dict):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(dir=str(run_dir), name=name, project=project, entity=entity, mode=mode,
                              config=config, settings=wandb.Settings(console="off", x_disable_stats=True))

    def write(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def format_console(r: dict) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}"]
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f}")
    parts += [f"lr {r['lr']:.2e}", f"{r['tokens_per_s']:,.0f} tok/s", f"mfu {100 * r['mfu']:.1f}%"]
    if "energy_kwh_it" in r:
        label = " (est.)" if r.get("energy_method") == "estimate" else ""
        parts.append(f"{r['energy_kwh_facility'] * 1000:.2f} Wh {1000 * r['co2_kg']:.2f} gCO2e{label}")
    if "eta_s" in r:
        parts.append(f"eta {_duration(r['eta_s'])}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class MetricsLogger:
    """Fans records out to the sinks; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_args: dict | None = None, stream=sys.stdout):
        self.enabled, self.stream = enabled, stream
        self.sinks: list = []
        self.events = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
        self.events = JsonlSink(run_dir / "events.jsonl")
        if wandb_args and wandb_args["mode"] != "disabled":
            try:
                self.sinks.append(WandbSink(run_dir, **wandb_args))
            except Exception as e:  # W&B must never take a run down
                self.event({"event": "wandb_failed", "error": repr(e)})

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.write(record)
        print(format_console(record), file=self.stream, flush=True)

    def event(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self.events.write(record)
        print("[event] " + " ".join(f"{k}={v}" for k, v in record.items() if k != "time"), file=self.stream,
              flush=True)

    def close(self) -> None:
        for sink in self.sinks + ([self.events] if self.events else []):
            sink.close()
        self.sinks, self.events = [], None
