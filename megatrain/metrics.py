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


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s per device over the device's dense peak."""
    return flops_per_token * tokens_per_s_per_device / peak_flops if peak_flops > 0 else 0.0


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
