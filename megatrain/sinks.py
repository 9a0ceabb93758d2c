"""Where a run's records go, all written by rank 0.

- RUN_DIR/metrics.jsonl: one JSON object per log interval; always on, the source of truth.
- RUN_DIR/events.jsonl: run_start (config, cluster profile, versions, git commit, how energy and
  MFU are obtained), checkpoints, resumes, skipped steps, W&B fallbacks, stops.
- Weights & Biases: offline by default (RUN_DIR/wandb/, `wandb sync` later). Online only when
  configured, and only if the W&B host answers within seconds: compute nodes have no network,
  and W&B would otherwise hang ~100 s and fail. The fallback is offline, said on the console
  and in events.jsonl. Never takes a run down: its start and finish are bounded in time, and
  any error from it (a dead helper process, a failing server) becomes one `wandb_failed`
  event, after which the run goes on without W&B; metrics.jsonl stays complete.
- the console: one plain line per interval (Slurm logs); on a terminal also a progress bar
  with the ETA and the projected final energy and CO2.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from megatrain.files import append_line, atomic_write_text

WANDB_PROBE_TIMEOUT_S = 3.0
WANDB_INIT_TIMEOUT_S = 15.0  # wandb.init waiting for its helper process and, online, the server
WANDB_FINISH_TIMEOUT_S = 60.0  # run.finish flushing (online: uploading) at the end of a job


def event_line(record: dict) -> str:
    """An events.jsonl record as one console line."""
    return "[event] " + " ".join(f"{k}={v}" for k, v in record.items() if k != "time")


class JsonlSink:
    """A JSON-lines file whose every line is whole or absent (`files.append_line`), even after
    kill -9 or a full disk."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        append_line(self.path, json.dumps(record, default=float))

    def rewind(self, step: int, set_aside: Path | None = None) -> dict | None:
        """Drop the records after `step` (the steps a resumed run does again), rewriting the file
        atomically, so that readers see each step once; returns the last record dropped (its
        cumulative energy counts work the checkpoint does not hold), and writes the dropped
        records to `set_aside` when given."""
        if not self.path.exists():
            return None
        kept, dropped = [], []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn line
            (kept if record.get("step", 0) <= step else dropped).append(line)
        if not dropped:
            return None
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if set_aside is not None:
            atomic_write_text(set_aside, "".join(line + "\n" for line in dropped))
        return json.loads(dropped[-1])

    def close(self) -> None:
        pass


class EventLog:
    """RUN_DIR/events.jsonl, the run's record of what happened; each event is also one console
    line. The file is opened per event (events are rare), so that whoever writes one (the
    trainer, or the requeue after it) needs nothing open."""

    def __init__(self, run_dir: Path, echo=print):
        self.path = Path(run_dir) / "events.jsonl"
        self.echo = echo

    def write(self, record: dict, echo: bool = True) -> dict:
        record = {"time": time.time(), **record}
        try:
            append_line(self.path, json.dumps(record, default=float))
        except OSError as e:  # a full disk: the event is said on the console, never half-written
            self.echo(f"[events.jsonl not written: {e}]")
        if echo:
            self.echo(event_line(record))
        return record

    def read(self) -> list[dict]:
        """Every whole record, oldest first ([] without a file); a line cut short by a crash is
        skipped."""
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


def reachable(url: str, timeout: float = WANDB_PROBE_TIMEOUT_S) -> str | None:
    """None if an HTTP server answers at `url` within `timeout` s (any status), else why not.

    HTTP rather than a bare TCP connect: site proxies and firewalls often accept connections
    they will not carry. DNS lookups have no timeout of their own (a node without a resolver
    can stall for tens of seconds), so the attempt runs in a daemon thread we stop waiting for.
    """
    import urllib.error
    import urllib.request

    result: list[str | None] = []

    def attempt():
        try:
            urllib.request.urlopen(
                urllib.request.Request(url, method="HEAD"), timeout=timeout
            ).close()
            result.append(None)
        except urllib.error.HTTPError:  # 4xx/5xx: a server is there
            result.append(None)
        except (urllib.error.URLError, OSError, ValueError) as e:
            why = getattr(e, "reason", None) or e
            result.append(f"cannot reach {url} ({why})")

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer from {url} within {timeout:g} s"


def wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


class WandbSink:
    """A W&B run in RUN_DIR/wandb. `self.mode` is what it really runs in; `self.fallback` says why
    it is offline when online was asked for (None otherwise)."""

    def __init__(
        self, run_dir: Path, name: str, mode: str, project: str, entity: str | None, config: dict
    ):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.fallback = reachable(wandb_base_url()) if mode == "online" else None
        args = dict(dir=str(run_dir), name=name, project=project, entity=entity, config=config)
        settings = dict(console="off", x_disable_stats=True, init_timeout=WANDB_INIT_TIMEOUT_S)
        self.mode = "offline" if self.fallback else mode
        if self.mode == "online":
            try:
                self.run = wandb.init(mode="online", settings=wandb.Settings(**settings), **args)
                return
            # no API key, refused login, timeout: keep training, offline
            except Exception as e:  # noqa: BLE001
                detail = " ".join(str(e).split())[:200]
                self.fallback, self.mode = (
                    f"online init failed: {type(e).__name__}: {detail}",
                    "offline",
                )
        self.run = wandb.init(mode=self.mode, settings=wandb.Settings(**settings), **args)

    def write(self, record: dict) -> None:
        numbers = {
            k: v
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.run.log(numbers, step=record["step"])

    def update_config(self, info: dict) -> None:
        self.run.config.update(info, allow_val_change=True)

    def close(self, timeout: float = WANDB_FINISH_TIMEOUT_S) -> None:
        """Finish the W&B run, waiting at most `timeout` s (a stuck helper must not hold the job
        past its end); raises what finish raised, or TimeoutError."""
        errors: list[Exception] = []

        def finish():
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001 -- raised below, in the caller's thread
                errors.append(e)

        thread = threading.Thread(target=finish, name="wandb-finish", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"W&B finish did not return within {timeout:g} s")
        if errors:
            raise errors[0]


# ----------------------------------------------------------------------------- console


def _sig(x: float) -> str:
    """Three significant digits, no exponent: 0.0317, 3.2, 24.7, 433."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def human_energy(kwh: float) -> str:
    """kWh in the unit that reads best: Wh, kWh or MWh."""
    if kwh >= 1000:
        return f"{_sig(kwh / 1000)} MWh"
    return f"{_sig(kwh)} kWh" if kwh >= 1 else f"{_sig(kwh * 1000)} Wh"


def human_mass(kg: float) -> str:
    """kg in the unit that reads best: g, kg or t."""
    if kg >= 1000:
        return f"{_sig(kg / 1000)} t"
    return f"{_sig(kg)} kg" if kg >= 1 else f"{_sig(kg * 1000)} g"


def human_count(n: float) -> str:
    """12.3k, 4.1M, 1.2B, 15T: token counts at a glance."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def format_line(r: dict, max_steps: int = 0) -> str:
    """One interval as a plain line (also what Slurm logs show)."""
    step = f"step {r['step']:>6}" + (
        f"/{max_steps} ({100 * r['step'] / max_steps:.0f}%)" if max_steps else ""
    )
    parts = [step, f"loss {r['loss']:.4f}"]
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f}")
    if "lr" in r:
        parts.append(f"lr {r['lr']:.2e}")
    parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    parts.append(f"mfu {100 * r['mfu']:.1f}%" if "mfu" in r else "mfu n/a")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    if "energy_kwh_facility" in r:
        est = " (est.)" if r.get("energy_method") == "estimate" else ""
        parts.append(
            f"{human_energy(r['energy_kwh_facility'])} {human_mass(r['co2_kg'])} CO2e{est}"
        )
    if "eta_s" in r and max_steps and r["step"] < max_steps:
        projected = (
            f" -> ~{human_energy(r['projected_kwh_facility'])} {human_mass(r['projected_co2_kg'])}"
            if "projected_kwh_facility" in r
            else ""
        )
        parts.append(f"eta {duration(r['eta_s'])}{projected}")
    return " | ".join(parts)


def format_bar(r: dict, max_steps: int, total_tokens: float = 0, width: int = 30) -> str:
    """A progress bar to the step (token) budget with the ETA and the projected final energy
    and CO2."""
    frac = min(r["step"] / max_steps, 1.0) if max_steps else 0.0
    filled = int(frac * width)
    est = " (est.)" if r.get("energy_method") == "estimate" else ""
    text = (
        f"[{'#' * filled}{'.' * (width - filled)}] {100 * frac:3.0f}% {r['step']}/{max_steps} steps"
    )
    if "tokens" in r:
        text += (
            f", {human_count(r['tokens'])}"
            + (f"/{human_count(total_tokens)}" if total_tokens else "")
            + " tokens"
        )
    if "eta_s" in r:
        text += f" | eta {duration(r['eta_s'])}"
    if "projected_kwh_facility" in r:
        text += (
            f" | final ~{human_energy(r['projected_kwh_facility'])}, "
            f"{human_mass(r['projected_co2_kg'])} CO2e{est}"
        )
    return text


class ConsoleSink:
    """Plain lines; on a terminal, a bar kept on the last line and redrawn after every print."""

    def __init__(self, stream=sys.stdout, tty: bool | None = None):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.max_steps, self.total_tokens = 0, 0
        self.bar, self.drawn = "", False

    def print(self, text: str, bar: str | None = None) -> None:
        """Print a line; on a terminal, clear the bar first and draw it (or the new `bar`) below
        the line."""
        if not self.tty:
            self.stream.write(text + "\n")
        else:
            self.bar = bar if bar is not None else self.bar
            self.stream.write(("\r\x1b[K" if self.drawn else "") + text + "\n" + self.bar)
            self.drawn = bool(self.bar)
        self.stream.flush()

    def write(self, record: dict) -> None:
        bar = (
            format_bar(record, self.max_steps, self.total_tokens)
            if self.tty and self.max_steps
            else None
        )
        self.print(format_line(record, self.max_steps), bar)

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
        self.bar, self.drawn = "", False


# ----------------------------------------------------------------------------- fan-out


class MetricsLogger:
    """Fans records out to the sinks; a no-op on ranks other than 0. W&B is optional: any error
    from it is one `wandb_failed` event (the error, the step), and the run goes on without it."""

    def __init__(
        self, run_dir: Path, enabled: bool, wandb_args: dict | None = None, stream=sys.stdout
    ):
        self.enabled = enabled
        self.sinks: list = []
        self.events = self.wandb = self.metrics = None
        self.console = ConsoleSink(stream)
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = JsonlSink(run_dir / "metrics.jsonl")
        self.sinks.append(self.metrics)
        self.events = EventLog(run_dir, echo=self.console.print)
        if wandb_args and wandb_args["mode"] != "disabled":
            try:
                self.wandb = WandbSink(run_dir, **wandb_args)
            except Exception as e:  # noqa: BLE001 -- W&B must never take a run down
                self._wandb_failed("init", e, step=None)
            if self.wandb and self.wandb.fallback:
                self.event(
                    {
                        "event": "wandb_offline",
                        "reason": self.wandb.fallback,
                        "sync_later": f"wandb sync {run_dir / 'wandb'}/offline-run-*",
                    }
                )
        self.sinks.append(self.console)

    def _wandb_failed(self, call: str, error: BaseException, step: int | None) -> None:
        """Drop the W&B sink after an error: one event, then the run goes on without W&B (its
        helper may be dead: nothing more is asked of it, not even finish)."""
        self.wandb = None
        detail = " ".join(str(error).split())[:300]
        self.event(
            {
                "event": "wandb_failed",
                "call": call,
                "error": f"{type(error).__name__}: {detail}",
                "step": step,
                "note": "training goes on without W&B; metrics.jsonl has every record",
            }
        )

    def _to_wandb(self, call: str, step: int | None, fn, *args) -> None:
        if self.wandb is None:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 -- W&B must never take a run down
            self._wandb_failed(call, e, step)

    def rewind(self, step: int, set_aside: Path | None = None) -> dict | None:
        """metrics.jsonl without the records after `step` (see `JsonlSink.rewind`); rank 0."""
        return self.metrics.rewind(step, set_aside) if self.enabled else None

    def run_start(self, info: dict) -> None:
        """Record what this job runs with (config, cluster, versions, git commit, energy method):
        an events.jsonl `run_start` line and the W&B run's config."""
        if not self.enabled:
            return
        self.console.max_steps = int(info.get("max_steps") or 0)
        self.console.total_tokens = self.console.max_steps * int(info.get("tokens_per_step") or 0)
        self.events.write({"event": "run_start", **info}, echo=False)
        step = info.get("start_step")
        if self.wandb:
            self._to_wandb("config.update", step, self.wandb.update_config, info)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.write(record)
        if self.wandb:
            self._to_wandb("log", record.get("step"), self.wandb.write, record)

    def event(self, record: dict) -> None:
        if not self.enabled:
            return
        self.events.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.wandb:
            self._to_wandb("finish", None, self.wandb.close, WANDB_FINISH_TIMEOUT_S)
        self.sinks, self.wandb = [], None
