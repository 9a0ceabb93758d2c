"""`megatrain report RUN_DIR`: plots and a summary of a run, from the files in its directory.

Reads metrics.jsonl (required), and config.yaml and events.jsonl when present (cluster profile,
model size, how energy and MFU were obtained). Writes RUN_DIR/report/:
  loss.png         training and validation loss
  throughput.png   tokens/s and MFU
  step_time.png    where a step's time goes: data wait, forward+backward, optimizer
  energy.png       power and cumulative energy (IT and facility)
  co2.png          cumulative CO2e
  summary.md       the summary as a table, with the carbon arithmetic spelled out
  summary.json     the same numbers for scripts
Estimated energy is labelled as such in the text and on every energy/CO2 plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from megatrain import carbon
from megatrain.errors import MegatrainError
from megatrain.sinks import EventLog, human_energy, human_mass


class ReportError(MegatrainError):
    """The run directory cannot be reported on; the message says why."""


def read_metrics(run_dir: Path) -> list[dict]:
    """Records of metrics.jsonl, one per step: after a resume, the later record of a step wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} not found: is {run_dir} a megatrain run directory?")
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def read_run_info(run_dir: Path) -> dict:
    """The last run_start event (events.jsonl), else config.yaml's resolved section, else {}."""
    run_dir = Path(run_dir)
    info: dict = {}
    config = run_dir / "config.yaml"
    if config.is_file():
        data = yaml.safe_load(config.read_text()) or {}
        info = {
            "config": {k: v for k, v in data.items() if k != "resolved"},
            **(data.get("resolved") or {}),
        }
    for event in EventLog(run_dir).read():
        if event.get("event") == "run_start":
            info = event
    return info


def _weights(records: list[dict]) -> list[float]:
    """Seconds each record's interval lasted (steps in it x mean step time): for time-weighted
    means."""
    previous = [0] + [r["step"] for r in records[:-1]]
    return [(r["step"] - p) * r.get("step_s", 0.0) for r, p in zip(records, previous)]


def _weighted_mean(records: list[dict], key: str) -> float | None:
    pairs = [(r[key], w) for r, w in zip(records, _weights(records)) if key in r]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


def summarize(records: list[dict], info: dict | None = None) -> dict:
    info = info or {}
    last = records[-1]
    val = [r for r in records if "val_loss" in r]
    cluster = info.get("cluster_profile") or {}
    s = {
        "run": (info.get("config") or {}).get("run", {}).get("name"),
        "steps": last["step"],
        "tokens": last.get("tokens"),
        "first_loss": records[0]["loss"],
        "final_loss": last["loss"],
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "params": info.get("params"),
        "world_size": info.get("world_size"),
        "accelerator": info.get("accelerator"),
        "mean_tokens_per_s": _weighted_mean(records, "tokens_per_s"),
        "mean_tflops_per_gpu": _weighted_mean(records, "tflops_per_gpu"),
        "mean_mfu": _weighted_mean(records, "mfu"),
        "peak_source": info.get("peak_source"),
        "mean_step_s": _weighted_mean(records, "step_s"),
        "mean_data_wait_s": _weighted_mean(records, "data_wait_s"),
        "mean_fwd_bwd_s": _weighted_mean(records, "fwd_bwd_s"),
        "mean_optimizer_s": _weighted_mean(records, "optimizer_s"),
        "skipped_steps": last.get("skipped_steps"),
        "peak_mem_gb": max((r.get("mem_gb", 0) for r in records), default=0),
        "gpu_hours": last.get("gpu_hours"),
        "energy_kwh_it": last.get("energy_kwh_it"),
        "energy_kwh_facility": last.get("energy_kwh_facility"),
        "co2_kg": last.get("co2_kg"),
        "energy_method": last.get("energy_method"),
        "energy_reason": info.get("energy_reason"),
        "pue": cluster.get("pue"),
        "intensity_g_per_kwh": cluster.get("carbon_intensity_g_per_kwh"),
    }
    if s["gpu_hours"] and s["energy_kwh_it"] is not None:
        s["mean_power_w_per_gpu"] = s["energy_kwh_it"] * 1000 / s["gpu_hours"]
    if (
        s["energy_kwh_it"] is not None
        and s["pue"] is not None
        and s["intensity_g_per_kwh"] is not None
    ):
        s["formula"] = carbon.estimate(
            energy_kwh=s["energy_kwh_it"],
            pue=s["pue"],
            intensity_g_per_kwh=s["intensity_g_per_kwh"],
        ).formula
    return s


def method_label(method: str | None) -> str:
    if method == "estimate":
        return "ESTIMATED (device power x time, not measured)"
    return f"measured ({method})" if method else "n/a"


# ----------------------------------------------------------------------------- plots


def _scaled(values: list[float], units: list[tuple[str, float]]) -> tuple[list[float], str]:
    """Values in the largest unit they reach at least 1 of (units: (name, size) from small to
    large)."""
    top = max(values, default=0.0)
    name, size = units[0]
    for n, sz in units:
        if top >= sz:
            name, size = n, sz
    return [v / size for v in values], name


ENERGY_UNITS = [("Wh", 1e-3), ("kWh", 1.0), ("MWh", 1e3)]
MASS_UNITS = [("mg", 1e-6), ("g", 1e-3), ("kg", 1.0), ("t", 1e3)]


def plot(records: list[dict], out_dir: Path, info: dict | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    est = " (ESTIMATED)" if records[-1].get("energy_method") == "estimate" else ""
    cluster = (info or {}).get("cluster_profile") or {}
    paths = []

    def series(key, scale=1.0):
        return [r["step"] for r in records if key in r], [
            r[key] * scale for r in records if key in r
        ]

    def figure(name, title, panels):
        """panels: (ylabel, [(xs, ys, style, label), ...]); one row each, sharing the step axis."""
        fig, axes = plt.subplots(
            len(panels), 1, figsize=(7, 2.2 + 1.9 * len(panels)), sharex=True, squeeze=False
        )
        for ax, (ylabel, lines) in zip(axes[:, 0], panels):
            for xs, ys, style, label in lines:
                ax.plot(xs, ys, style, label=label)
            ax.set_ylabel(ylabel)
            ax.set_ylim(
                bottom=0, top=max([max(ys, default=0) for _, ys, _, _ in lines] + [1e-12]) * 1.12
            )
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize=8)
        axes[0, 0].set_title(title)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        paths.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series("loss"), label="train loss")
    ax.plot(*series("val_loss"), "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)
    paths.append(out_dir / "loss.png")

    figure(
        "throughput.png",
        "Throughput and model FLOPs utilization",
        [
            ("tokens/s", [(*series("tokens_per_s"), "-", "all devices")]),
            ("MFU (%)", [(*series("mfu", 100), "-C1", "model FLOPs / dense peak")]),
        ],
    )

    steps, total = series("step_s")
    fig, ax = plt.subplots(figsize=(7, 4))
    parts = [
        (k, label)
        for k, label in [
            ("data_wait_s", "data wait"),
            ("fwd_bwd_s", "forward + backward"),
            ("optimizer_s", "optimizer"),
        ]
        if all(k in r for r in records)
    ]
    if parts:
        ax.stackplot(
            steps,
            *[[r[k] for r in records] for k, _ in parts],
            labels=[lb for _, lb in parts],
            alpha=0.8,
        )
    ax.plot(steps, total, "k--", label="step (total)")
    ax.set(
        xlabel="step", ylabel="seconds per step (interval mean)", title="Where a step's time goes"
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "step_time.png", dpi=120)
    plt.close(fig)
    paths.append(out_dir / "step_time.png")

    xs, it = series("energy_kwh_it")
    xf, fac = series("energy_kwh_facility")
    both, unit = _scaled(it + fac, ENERGY_UNITS)
    pue = f" x PUE {cluster['pue']:g}" if cluster.get("pue") is not None else " x PUE"
    figure(
        "energy.png",
        f"Power and cumulative energy{est}",
        [
            ("power (W)", [(*series("power_w"), "-C3", "all devices")]),
            (
                f"energy ({unit})",
                [
                    (xs, both[: len(it)], "-C2", "IT"),
                    (xf, both[len(it) :], "--C8", f"facility = IT{pue}"),
                ],
            ),
        ],
    )

    xs, co2 = series("co2_kg")
    values, unit = _scaled(co2, MASS_UNITS)
    grid = (
        f"\nPUE {cluster['pue']:g}, {cluster['carbon_intensity_g_per_kwh']:g} gCO2e/kWh"
        if cluster.get("pue") is not None
        else ""
    )
    figure(
        "co2.png",
        f"Cumulative emissions{est}{grid}",
        [(f"CO2e ({unit})", [(xs, values, "-C7", "facility energy x grid intensity")])],
    )
    return paths


# ----------------------------------------------------------------------------- text


def _rows(s: dict) -> list[tuple[str, str]]:
    """(label, value) pairs, shared by the console text and the markdown table."""
    rows = []
    if s.get("run"):
        rows.append(("run", s["run"]))
    if s.get("params"):
        rows.append(("model", f"{s['params'] / 1e6:,.2f}M parameters"))
    if s.get("world_size"):
        rows.append(("devices", f"{s['world_size']} x {s.get('accelerator') or 'device'}"))
    rows.append(("steps", f"{s['steps']:,}"))
    if s.get("tokens") is not None:
        rows.append(("tokens seen", f"{s['tokens']:,}"))
    rows.append(("loss", f"{s['first_loss']:.3f} -> {s['final_loss']:.3f}"))
    if s.get("final_val_loss") is not None:
        rows.append(("validation loss", f"{s['final_val_loss']:.3f}"))
    if s.get("mean_tokens_per_s") is not None:
        rows.append(
            (
                "throughput",
                f"{s['mean_tokens_per_s']:,.0f} tokens/s"
                + (
                    f", {s['mean_tflops_per_gpu']:.3g} TFLOP/s per device"
                    if s.get("mean_tflops_per_gpu")
                    else ""
                ),
            )
        )
    mfu = f"{100 * s['mean_mfu']:.2f}%" if s.get("mean_mfu") is not None else "n/a"
    rows.append(
        ("mean MFU", mfu + (f" (against {s['peak_source']})" if s.get("peak_source") else ""))
    )
    if s.get("mean_step_s") is not None:
        split = ", ".join(
            f"{label} {s[k]:.3g}"
            for k, label in [
                ("mean_data_wait_s", "data"),
                ("mean_fwd_bwd_s", "fwd+bwd"),
                ("mean_optimizer_s", "optimizer"),
            ]
            if s.get(k) is not None
        )
        rows.append(("step time", f"{s['mean_step_s']:.3g} s ({split})"))
    if s.get("skipped_steps") is not None:
        rows.append(("skipped steps", f"{s['skipped_steps']}"))
    rows.append(("peak memory", f"{s['peak_mem_gb']:.2f} GiB per process (max over ranks)"))
    if s.get("gpu_hours") is not None:
        rows.append(("GPU-hours", f"{s['gpu_hours']:.4g} (device-hours: processes x wall time)"))
    if s.get("energy_kwh_it") is not None:
        rows.append(("energy method", method_label(s["energy_method"])))
        if s.get("energy_reason"):
            rows.append(("energy source", s["energy_reason"]))
        power = (
            f", mean {s['mean_power_w_per_gpu']:.3g} W per device"
            if s.get("mean_power_w_per_gpu")
            else ""
        )
        rows.append(
            (
                "energy (IT)",
                f"{s['energy_kwh_it']:.4g} kWh ({human_energy(s['energy_kwh_it'])}){power}",
            )
        )
        pue = f", PUE {s['pue']:g}" if s.get("pue") is not None else ""
        rows.append(("energy (facility)", f"{s['energy_kwh_facility']:.4g} kWh{pue}"))
        grid = (
            f", {s['intensity_g_per_kwh']:g} gCO2e/kWh"
            if s.get("intensity_g_per_kwh") is not None
            else ""
        )
        rows.append(
            (
                "CO2e",
                f"{s['co2_kg']:.4g} kg ({human_mass(s['co2_kg'])}){grid}"
                + (" ESTIMATED" if s["energy_method"] == "estimate" else ""),
            )
        )
    return rows


def render_summary(s: dict) -> str:
    text = "\n".join(f"{label:<18}{value}" for label, value in _rows(s))
    if s.get("formula"):
        text += "\n\n" + s["formula"]
    return text


def render_markdown(s: dict, name: str, pngs: list[Path]) -> str:
    lines = [f"# Run summary: {name}", "", "| | |", "| --- | --- |"]
    lines += [f"| {label} | {value.replace('|', '/')} |" for label, value in _rows(s)]
    if s.get("formula"):
        lines += [
            "",
            "How the CO2e was computed (`megatrain carbon` arithmetic):",
            "",
            "```",
            s["formula"],
            "```",
        ]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(lines) + "\n"


def report(run_dir: str | Path) -> tuple[str, list[Path]]:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ReportError(
            f"{run_dir}/metrics.jsonl has no records yet "
            "(the first is written after run.log_every steps)"
        )
    info = read_run_info(run_dir)
    summary = summarize(records, info)
    out = run_dir / "report"
    pngs = plot(records, out, info)
    text = render_summary(summary)
    (out / "summary.md").write_text(render_markdown(summary, run_dir.name, pngs))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return text, pngs
