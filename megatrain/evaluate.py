"""`megatrain eval`: how good a trained model is, offline.

- Perplexity and bits per byte on token data: a run's own validation set (the samples the
  trainer validates on), or any prepared dataset (`--data DIR`, its first `--max-tokens`
  tokens cut into sequences of the model's context). Bits per byte divide the loss by the bytes
  of text the targets stand for, so that models with different tokenizers compare.
- `--tasks`: EleutherAI's lm-evaluation-harness on the model exported to Hugging Face's format,
  with task definitions and data read from local files (configs/eval/ ships a French and an
  English one; `--task-dir` points at others, e.g. pre-downloaded standard tasks).

Results go to RUN_DIR/eval/*.json (the run an exported model came from, when it is still
there) and, when the run logged to W&B, into that W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megatrain.data import IGNORE_INDEX, PackedSamples, validation_batches
from megatrain.errors import MegatrainError, need
from megatrain.files import write_json
from megatrain.shards import Dataset
from megatrain.tokens import token_bytes


@torch.no_grad()
def token_loss(model, batches, device) -> tuple[float, int, np.ndarray]:
    """(summed cross-entropy in nats, targets counted, the target ids) over `batches`."""
    nll, count, targets = 0.0, 0, []
    for b in batches:
        x, y = b.inputs.to(device), b.targets.to(device)
        logits = model(x).float()
        losses = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none"
        )
        keep = y.reshape(-1) != IGNORE_INDEX
        nll += float(losses[keep].sum())
        count += int(keep.sum())
        targets.append(y.reshape(-1)[keep].cpu().numpy())
    return nll, count, np.concatenate(targets) if targets else np.zeros(0, np.int64)


def perplexity(model, tokenizer, batches, device, name: str) -> dict:
    """Mean loss, perplexity and bits per byte of `model` on `batches`."""
    started = time.perf_counter()
    nll, count, targets = token_loss(model, batches, device)
    if not count:
        raise MegatrainError(f"no tokens to evaluate in {name}")
    sizes = np.asarray(token_bytes(tokenizer), dtype=np.int64)
    n_bytes = int(sizes[targets].sum())
    loss = nll / count
    return {
        "data": name,
        "tokens": count,
        "bytes": n_bytes,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else None,
        "seconds": time.perf_counter() - started,
    }


def validation_set(config, dp_size: int, micro_batch: int = 8):
    """The samples the trainer validated `config`'s run on, which it ran on `dp_size`
    data-parallel ranks (they decide how many samples the set holds)."""
    sources = [
        PackedSamples(
            Dataset(s.path),
            config.data.seq_len,
            config.data.val_fraction,
            config.run.seed + 1000 * i,
        )
        for i, s in enumerate(config.data.sources)
    ]
    total = config.run.eval_batches * config.batch.micro_batch * dp_size
    weights = [s.weight for s in config.data.sources]
    return validation_batches(sources, weights, total, micro_batch, 0, 1)


def dataset_batches(directory: str | Path, seq_len: int, max_tokens: int, micro_batch: int = 8):
    """The first `max_tokens` tokens of a prepared dataset, in sequences of `seq_len`."""
    from megatrain.data import Batch

    stream = Dataset(directory).stream
    n = min(max_tokens, len(stream) - 1) // seq_len
    if n == 0:
        raise MegatrainError(f"{directory} holds fewer than {seq_len + 1} tokens")
    rows = np.stack([stream.read(i * seq_len, i * seq_len + seq_len + 1) for i in range(n)])
    tokens = torch.from_numpy(rows.astype(np.int64))
    return [
        Batch(tokens[i : i + micro_batch, :-1], tokens[i : i + micro_batch, 1:])
        for i in range(0, n, micro_batch)
    ]


def source_run(path: Path) -> Path | None:
    """The run directory `path` is, or the one the model exported to `path` came from when it is
    still there; None for a model from elsewhere."""
    if (path / "checkpoints").is_dir():
        return path
    try:
        run = Path(json.loads((path / "config.json").read_text())["megatrain"]["run_dir"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return run if run.is_dir() else None


def results_dir(path: Path) -> Path:
    """RUN_DIR/eval, or the eval/ of the run an exported model came from, else DIR/eval."""
    return (source_run(path) or path) / "eval"


def save_results(path: Path, name: str, results: dict) -> Path:
    folder = results_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.json"
    write_json(out, results, indent=2)
    return out


# ----------------------------------------------------------------------------- lm-eval tasks

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
"""Set before the Hugging Face libraries are imported (they read them once): nothing is
looked up or downloaded; data and models come from local files or the local caches."""


def default_task_dir() -> Path:
    from megatrain.config import configs_root

    return configs_root() / "eval"


def model_directory(path: Path, step: int | None, scratch: Path) -> tuple[Path, int | None]:
    """(a Hugging Face model directory, its training step): a run's checkpoint `step` (default:
    the newest) exported into `scratch`, or `path` itself when it is an exported model."""
    if (path / "checkpoints").is_dir():
        from megatrain.export import export

        out = export(path, scratch / "model", step)
        return out, json.loads((out / "config.json").read_text())["megatrain"]["step"]
    if not (path / "config.json").is_file():
        raise MegatrainError(
            f"{path} is neither a run directory (with checkpoints/) nor an exported model "
            "(with config.json)"
        )
    try:
        exported = json.loads((path / "config.json").read_text()).get("megatrain", {}).get("step")
    except (OSError, ValueError, AttributeError) as e:
        raise MegatrainError(f"{path / 'config.json'} is not a model's JSON config: {e}") from None
    if step is not None and step != exported:
        raise MegatrainError(
            f"--step {step}: {path} is an exported model"
            + (f" (of step {exported})" if exported is not None else "")
            + "; --step chooses a checkpoint of a run directory"
        )
    return path, exported


class _NoMetadataAdvice(logging.Filter):
    """lm-eval advises its `--metadata` option whenever a task uses `custom_dataset`, as the
    shipped tasks do to find their data beside their YAML: advice for another command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _numbers(metrics: dict) -> dict:
    """lm-eval's row of one task as {metric: number}: "acc,none" -> "acc" (another filter than
    "none" keeps lm-eval's "metric,filter" name); a non-finite value becomes None, and what is
    not a metric (name, alias, "N/A" standard errors) is left out."""
    row = {}
    for key, value in metrics.items():
        metric, _, filtered = key.partition(",")
        if not filtered or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        row[metric if filtered == "none" else key] = float(value) if math.isfinite(value) else None
    return row


def run_tasks(
    path: str | Path,
    tasks: list[str],
    task_dir: str | Path | None = None,
    step: int | None = None,
    device: str = "cpu",
    limit: int | None = None,
) -> dict:
    """Evaluate the model of `path` (a run directory: its checkpoint `step`, default the newest,
    exported to a temporary directory; or an exported model directory) on lm-evaluation-harness
    `tasks`, defined in `task_dir` (default: configs/eval), in this process and offline; at most
    `limit` examples per task. Returns the JSON-able summary that `megatrain eval` saves."""
    started = time.perf_counter()
    path = Path(path)
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise MegatrainError(
            "--tasks names no task: give comma-separated task names, e.g. "
            "--tasks megatrain_lastword_fr,megatrain_lastword_en"
        )
    if limit is not None and limit < 1:
        raise MegatrainError(f"--limit {limit}: give at least 1 example per task")
    task_dir = Path(task_dir) if task_dir else default_task_dir()
    if not task_dir.is_dir():
        raise MegatrainError(f"--task-dir {task_dir} is not a directory of lm-eval task YAMLs")
    os.environ.update(OFFLINE)
    for module in ("transformers", "accelerate"):  # what lm-eval's "hf" model needs
        need(module, "eval")
    lm_eval = need("lm_eval", "eval")
    from lm_eval.tasks import TaskManager

    # lm-eval's own tasks are not searched: their data would have to be downloaded
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise MegatrainError(
            f"no task {', '.join(unknown)} in {task_dir} (it has: "
            f"{', '.join(manager.all_tasks) or 'none'}); lm-eval's standard tasks run from a "
            "copy of their YAMLs with local data, given as --task-dir (see configs/eval/README.md)"
        )
    on_cpu = torch.device(device).type == "cpu"
    quiet = _NoMetadataAdvice()
    logging.getLogger("lm_eval.api.task").addFilter(quiet)
    with tempfile.TemporaryDirectory(prefix="megatrain-eval-") as scratch:
        model_dir, step = model_directory(path, step, Path(scratch))
        try:
            raw = lm_eval.simple_evaluate(
                model="hf",
                model_args={
                    "pretrained": str(model_dir),
                    "dtype": "float32" if on_cpu else "auto",  # on GPU: as the weights are stored
                },
                tasks=tasks,
                device=device,
                batch_size=8 if on_cpu else "auto",
                limit=limit,
                task_manager=manager,
                log_samples=False,
            )
        except (ConnectionError, FileNotFoundError) as e:  # OfflineModeIsEnabled is one
            raise MegatrainError(
                f"lm-eval could not find offline what {', '.join(tasks)} need: "
                f"{type(e).__name__}: {' '.join(str(e).split())[:300]}. megatrain eval downloads "
                "nothing: give tasks whose data are local files or in the Hugging Face datasets "
                "cache (configs/eval/README.md)"
            ) from None
        finally:
            logging.getLogger("lm_eval.api.task").removeFilter(quiet)
    samples = raw.get("n-samples", {})
    return {
        "step": step,
        "model": str(path),
        "tasks": tasks,
        "results": {task: _numbers(metrics) for task, metrics in raw["results"].items()},
        "samples": {t: n.get("effective") for t, n in samples.items() if isinstance(n, dict)},
        "limit": limit,
        "task_dir": str(task_dir.resolve()),
        "task_versions": {
            t: v for t, v in raw.get("versions", {}).items() if isinstance(v, (int, float, str))
        },
        "device": device,
        "lm_eval_version": str(raw.get("lm_eval_version") or lm_eval.__version__),
        "seconds": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------- W&B


def wandb_numbers(name: str, results: dict) -> dict:
    """The summary keys of one evaluation: eval/<task>/<metric> for lm-eval tasks (results of
    `run_tasks`), eval/<name>/<metric> otherwise (`perplexity`'s, `name` perplexity-<data>)."""
    if isinstance(results.get("results"), dict):
        return {
            f"eval/{task}/{metric}": value
            for task, metrics in results["results"].items()
            for metric, value in metrics.items()
            if value is not None
        }
    return {
        f"eval/{name}/{k}": v
        for k, v in results.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def wandb_run(run_dir: Path) -> tuple[Path, str, str] | None:
    """(folder, id, mode) of the newest W&B run of `run_dir`: RUN_DIR/wandb/offline-run-<time>-<id>
    (offline) or run-<time>-<id> (online); None if it has none."""
    folders = [
        p
        for pattern in ("offline-run-*", "run-*")
        for p in (run_dir / "wandb").glob(pattern)
        if p.is_dir()
    ]
    if not folders:
        return None
    folder = max(folders, key=lambda p: p.name.removeprefix("offline-"))  # run-YYYYmmdd_HHMMSS-id
    mode = "offline" if folder.name.startswith("offline-") else "online"
    return folder, folder.name.rsplit("-", 1)[-1], mode


def log_to_wandb(path: str | Path, name: str, results: dict) -> str | None:
    """Put the numbers of one evaluation (see `wandb_numbers`) into the summary of the W&B run
    of the run `path` is or came from: that run resumed by its id, in the mode it ran in (an
    offline one adds a folder to RUN_DIR/wandb for `wandb sync`). Returns the line it printed,
    None when there is no W&B run. W&B failing never fails the evaluation: one line says why."""
    run_dir = source_run(Path(path))
    found = wandb_run(run_dir) if run_dir else None
    if not found:
        return None
    folder, run_id, mode = found
    numbers = wandb_numbers(name, results)
    try:
        import yaml

        from megatrain.sinks import reachable, wandb_base_url

        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text()).get("wandb") or {}
        except (OSError, AttributeError, yaml.YAMLError):
            config = {}
        if mode == "online" and (why := reachable(wandb_base_url())):
            raise ConnectionError(why)
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(run_dir),
            project=config.get("project") or "megatrain",
            entity=config.get("entity"),
            settings=wandb.Settings(console="off", x_disable_stats=True, init_timeout=30),
        )
        written = Path(run.dir).parent  # RUN_DIR/wandb/<offline-run|run>-<time>-<id>
        try:
            run.summary.update(numbers)
        finally:
            run.finish()
        where = f"; sync it with: wandb sync {written}" if mode == "offline" else ""
        line = f"megatrain eval: {len(numbers)} numbers in the summary of W&B run {run_id}{where}"
    except Exception as e:  # noqa: BLE001 -- W&B must never fail an evaluation
        detail = " ".join(str(e).split())[:200]
        line = (
            f"megatrain eval: not logged to W&B run {run_id} ({folder}): "
            f"{type(e).__name__}: {detail}"
        )
    print(line)
    return line
