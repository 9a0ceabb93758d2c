"""`megatrain report RUN_DIR`: plots and a summary from the run's metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    """Records of metrics.jsonl, one per step: after a resume, the later record of a step wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a megatrain run directory?")
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def summarize(records: list[dict]) -> dict:
    last = records[-1]
    val = [r for r in records if "val_loss" in r]
    return {
        "steps": last["step"], "tokens": last["tokens"], "first_loss": records[0]["loss"], "final_loss": last["loss"],
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "mean_tokens_per_s": sum(r["tokens_per_s"] for r in records) / len(records),
        "mean_mfu": sum(r["mfu"] for r in records) / len(records),
        "energy_kwh_it": last.get("energy_kwh_it"), "energy_kwh_facility": last.get("energy_kwh_facility"),
        "co2_kg": last.get("co2_kg"), "energy_method": last.get("energy_method"),
    }


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="train loss")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def render_summary(s: dict) -> str:
    method = s["energy_method"] or "n/a"
    label = " (ESTIMATED from device power x time, not measured)" if method == "estimate" else f" (measured: {method})"
    lines = [
        f"steps                 {s['steps']:,}",
        f"tokens                {s['tokens']:,}",
        f"loss                  {s['first_loss']:.3f} -> {s['final_loss']:.3f}",
    ]
    if s["final_val_loss"] is not None:
        lines.append(f"validation loss       {s['final_val_loss']:.3f}")
    lines += [
        f"throughput            {s['mean_tokens_per_s']:,.0f} tokens/s (mean), MFU {100 * s['mean_mfu']:.2f}%",
    ]
    if s["energy_kwh_it"] is not None:
        lines += [
            f"energy (IT)           {1000 * s['energy_kwh_it']:.3f} Wh{label}",
            f"energy (facility)     {1000 * s['energy_kwh_facility']:.3f} Wh",
            f"CO2e                  {1000 * s['co2_kg']:.3f} g",
        ]
    return "\n".join(lines)


def report(run_dir: str | Path) -> tuple[str, list[Path]]:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records yet")
    summary = summarize(records)
    pngs = plot(records, run_dir / "report")
    text = render_summary(summary)
    (run_dir / "report" / "summary.md").write_text(f"# Run summary: {run_dir.name}\n\n```\n{text}\n```\n")
    (run_dir / "report" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return text, pngs
