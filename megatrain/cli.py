"""The `megatrain` command: thin wrappers that parse arguments and call the modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatrain.dist import DistEnv
from megatrain.errors import MegatrainError
from megatrain.schema import ConfigError

EXAMPLES = """examples:
  megatrain prep corpus/ --out data/demo --vocab-size 4096
  megatrain train configs/tiny.yaml --nproc 2 data.sources.0.path=data/demo
  megatrain plan configs/runs/gopher-1.4b.yaml --cluster jean-zay-h100 --nodes 8
  megatrain report runs/tiny-demo
  megatrain export runs/tiny-demo --out exports/tiny-demo
  megatrain generate runs/tiny-demo --prompt "La rivière"
  megatrain eval runs/tiny-demo
  megatrain carbon --gpu-hours 1082990 --gpu-power-w 400 --pue 1.2 --intensity 57
  megatrain submit configs/my-run.yaml --cluster jean-zay-h100 --nodes 4 --account xyz
"""


# ----------------------------------------------------------------------------- prep


def cmd_prep(args) -> int:
    from data_prep.launch import run_prep
    from data_prep.state import PrepOptions

    report = run_prep(
        PrepOptions(
            inputs=args.inputs,
            out=args.out,
            recipe=args.recipe,
            vocab_size=args.vocab_size,
            tokenizer=args.tokenizer,
            text_field=args.text_field,
            shard_tokens=args.shard_tokens,
            workers=args.workers,
            force=args.force,
            keep_work=args.keep_work,
        )
    )
    if DistEnv.from_environ(arrays_are_ranks=True).rank == 0:  # every rank returns the report
        print(
            f"prep: {report['docs_in']:,} documents in, {report['docs_out']:,} out, "
            f"{report['tokens']:,} tokens -> {args.out}"
        )
    return 0


# ----------------------------------------------------------------------------- train


def _launch_local(args, cfg) -> int:
    """Start `nproc` local ranks, each running this same command (megatrain/launcher.py)."""
    from megatrain.hf import resolve_init_from
    from megatrain.launcher import launch_local

    resolve_init_from(cfg)  # the model's shape, for the preflight's run plan
    cmd = [sys.executable, "-m", "megatrain.cli", "train", args.config, *args.overrides]
    return launch_local(cfg, cmd, args.nproc)


def cmd_train(args) -> int:
    from megatrain.config import load_config
    from megatrain.dist import DistEnv
    from megatrain.stop import catch_stop_signals

    catch_stop_signals()  # a time-limit warning during the slow start-up must not kill us
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        info = dry_run(cfg, args.world_size or args.nproc)
        print(json.dumps(info))
        return 0
    if args.nproc > 1 and DistEnv.from_environ().world_size == 1:
        return _launch_local(args, cfg)

    from megatrain.requeue import train_job

    train_job(cfg)  # under Slurm, a signal-stop requeues the job
    return 0


def cmd_recover(args) -> int:
    from megatrain.config import load_config
    from megatrain.requeue import recover

    if args.exit_status == 0:
        return 0  # nothing crashed
    recover(load_config(args.config, args.overrides), args.exit_status)
    return args.exit_status  # the job's status stays the crash's


def dry_run(cfg, world_size: int) -> dict:
    """Model size, FLOPs per token and batch layout, without touching a GPU: the trainer's own
    run plan (the dataset's manifest gives the vocabulary when the config leaves it to it), and
    `megatrain plan`'s forecast on the config's cluster (memory alone on a CPU profile)."""
    from megatrain.config import load_cluster
    from megatrain.forecast import forecast
    from megatrain.hf import resolve_init_from
    from megatrain.memory import memory_per_gpu
    from megatrain.plan import plan_run
    from megatrain.shards import Manifest

    resolve_init_from(cfg)
    vocab = (
        Manifest.read(cfg.data.sources[0].path).vocab_size if cfg.model.vocab_size == 0 else None
    )
    plan = plan_run(cfg, world_size, vocab)
    info = plan.summary()
    profile = load_cluster(cfg.cluster)
    if profile.gpus_per_node:  # the forecast on the config's cluster
        nodes = -(-world_size // profile.gpus_per_node)
        info["plan"] = forecast(cfg, profile, nodes, world_size, vocab=vocab).summary()
    else:
        memory = memory_per_gpu(cfg, plan, gpu=False)
        info["memory_gb_per_process"] = {
            k: round(v, 3) if isinstance(v, float) else v for k, v in memory.items()
        }
    return info


def _vocab(cfg) -> int | None:
    """The dataset's vocabulary when the config leaves it to the dataset and the dataset is here
    (`megatrain plan` also works before the data is prepared: then GPT-2's 50,257)."""
    from megatrain.shards import Manifest

    if cfg.model.vocab_size:
        return None
    path = Path(cfg.data.sources[0].path) if cfg.data.sources else None
    if path and (path / "manifest.json").is_file():
        return Manifest.read(path).vocab_size
    return 50257


# ----------------------------------------------------------------------------- plan


def _node_counts(text: str) -> list[int]:
    """ "8" -> [8]; "2-16" -> [2, 4, 8, 16] (doubling, and the upper end)."""
    low, _, high = text.partition("-")
    try:
        a, b = int(low), int(high or low)
    except ValueError:
        raise ConfigError(f"--nodes {text!r}: expected N or A-B, e.g. 8 or 2-16") from None
    if not 1 <= a <= b:
        raise ConfigError(f"--nodes {text!r}: expected 1 <= A <= B")
    counts = []
    while a < b:
        counts.append(a)
        a *= 2
    return [*counts, b]


def cmd_plan(args) -> int:
    from megatrain import forecast as fc
    from megatrain.config import load_cluster, load_config
    from megatrain.hf import resolve_init_from

    cfg = load_config(args.config, args.overrides)
    resolve_init_from(cfg)
    profile = load_cluster(args.cluster or cfg.cluster)
    vocab = _vocab(cfg)
    calibrated = fc.calibration(args.calibrate, profile) if args.calibrate else None
    nodes = _node_counts(args.nodes)
    if args.search:
        found = fc.search(cfg, profile, nodes, calibrated, vocab, args.rank)
        if args.json:
            print(json.dumps([f.summary() for f in found]))
        else:
            order = "fastest first" if args.rank == "time" else "fewest kWh first"
            print(
                f"search: {len(found)} layouts fit on {args.nodes} node(s) of {profile.name}; "
                f"{order}"
            )
            print(fc.render_search(found))
        return 0 if found else 1
    if len(nodes) > 1:
        raise ConfigError("--nodes A-B is for --search; give one node count")
    result = fc.forecast(cfg, profile, nodes[0], args.gpus, calibrated, vocab)
    out = result.summary()
    if args.budget_gpu_hours:
        out["budget"] = fc.budget_advice(result, args.budget_gpu_hours)
    if args.json:
        print(json.dumps(out))
    else:
        print(fc.render(result))
        if "budget" in out:
            b = out["budget"]
            print(
                f"  budget         {b['gpu_hours']:,.0f} GPU-hours buy {b['flops']:.3g} FLOPs "
                f"here: compute-optimal {b['params'] / 1e9:.3g}B parameters on "
                f"{b['tokens'] / 1e9:.3g}B tokens (loss {b['predicted_loss']:.3f}); the 20 "
                f"tokens/parameter rule: {b['rule_params'] / 1e9:.3g}B on "
                f"{b['rule_tokens'] / 1e9:.3g}B"
            )
    return 0 if result.fits else 1


# ----------------------------------------------------------------------------- submit


def cmd_submit(args) -> int:
    import submitit

    from megatrain import submit
    from megatrain.config import load_cluster

    time_min = submit.parse_slurm_time(args.time)
    cfg = submit.prepare(args.config, args.overrides, args.cluster)
    if not args.force and not _fits(cfg, args.nodes, args.tasks_per_node):
        return 2
    if args.dry_run:
        params = submit.slurm_parameters(
            load_cluster(cfg.cluster),
            nodes=args.nodes,
            tasks_per_node=args.tasks_per_node,
            time_min=time_min,
            qos=args.qos,
            account=args.account,
            job_name=cfg.run.name,
        )
        print(json.dumps(params, indent=2))
        return 0
    job = submit.submit(
        cfg,
        cluster=args.cluster,
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node,
        time_min=time_min,
        qos=args.qos,
        account=args.account,
        folder=args.folder,
        executor=args.executor,
    )
    print(f"megatrain submit: job {job.job_id}; logs {job.paths.stdout.parent}", flush=True)
    if not args.wait:
        return 0
    try:
        summary = job.results()[0]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        print(f"megatrain submit: job {job.job_id} failed:\n{e}", file=sys.stderr)
        return 1
    print(
        f"megatrain submit: job {job.job_id} "
        f"{'stopped' if summary['interrupted'] else 'finished'} at step "
        f"{summary['steps']}; run directory {summary['run_dir']}"
    )
    return 0


def _fits(cfg, nodes: int, tasks_per_node: int | None) -> bool:
    """`megatrain plan`'s verdict on a GPU cluster; when it will not fit, say so with the plan
    and the nearest layout that does."""
    from megatrain import forecast as fc
    from megatrain.config import load_cluster

    profile = load_cluster(cfg.cluster)
    if not profile.gpus_per_node:
        return True  # CPU processes: nothing to forecast
    vocab = _vocab(cfg)
    gpus = nodes * (tasks_per_node or profile.gpus_per_node)
    result = fc.forecast(cfg, profile, nodes, gpus, vocab=vocab)
    if result.fits:
        return True
    print(fc.render(result), file=sys.stderr)
    nearest = fc.nearest_fitting(cfg, profile, nodes, vocab)
    if nearest:
        changed = {k: v for k, v in nearest.layout().items() if result.layout()[k] != v}
        print(
            f"megatrain submit: this run will not fit; the nearest layout that does on {nodes} "
            f"node(s): {changed} ({nearest.memory['total']:.1f} GiB per GPU, "
            f"{nearest.wall_clock_days:.3g} days); override with --force",
            file=sys.stderr,
        )
    else:
        print(
            f"megatrain submit: this run will not fit, and no layout does on {nodes} node(s): "
            "more nodes, or a smaller model (`megatrain plan ... --search --nodes A-B`); "
            "override with --force",
            file=sys.stderr,
        )
    return False


# ----------------------------------------------------------------------------- the trained model


def cmd_export(args) -> int:
    from megatrain.export import export

    export(args.run_dir, args.out, step=args.step, dtype=args.dtype)
    return 0


def cmd_generate(args) -> int:
    from megatrain.generate import Sampling, load_model, print_continuation

    if args.prompts:
        prompts = [p for p in Path(args.prompts).read_text().splitlines() if p.strip()]
    else:
        prompts = [args.prompt]
    model, tokenizer, eos = load_model(args.path, args.step, _device(args.device))
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    for prompt in prompts:
        print_continuation(model, tokenizer, eos, prompt, args.max_new_tokens, sampling)
    return 0


def cmd_eval(args) -> int:
    from megatrain import evaluate

    path = Path(args.path)
    if args.tasks:
        results = evaluate.run_tasks(
            path, args.tasks.split(","), args.task_dir, args.step, _device(args.device), args.limit
        )
        step = results["step"]
        out = evaluate.save_results(path, "tasks" if step is None else f"tasks-step{step}", results)
        print(json.dumps(results["results"], indent=2))
        print(f"megatrain eval: {out}")
        evaluate.log_to_wandb(path, out.stem, results)
        return 0
    from megatrain.generate import load_model

    model, tokenizer, _ = load_model(path, args.step, _device(args.device))
    device = model.tok_embedding.weight.device
    if args.data:
        batches = evaluate.dataset_batches(args.data, model.seq_len, args.max_tokens)
        name = Path(args.data).name
    elif (path / "checkpoints").is_dir():
        from megatrain.weights import checkpoint_weights

        weights = checkpoint_weights(path, args.step)
        dp_size = weights.manifest.get("layout", {}).get("dp_size", 1)
        batches, name = evaluate.validation_set(weights.config, dp_size), "validation"
    else:
        raise ConfigError("give --data DATA_DIR (or --tasks) to evaluate an exported model")
    results = evaluate.perplexity(model, tokenizer, batches, device, name)
    out = evaluate.save_results(path, f"perplexity-{name}", results)
    print(json.dumps(results, indent=2))
    print(f"megatrain eval: {out}")
    evaluate.log_to_wandb(path, out.stem, results)
    return 0


def _device(choice: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice


# ----------------------------------------------------------------------------- report, config-doc


def cmd_report(args) -> int:
    from megatrain.report import report

    text, pngs = report(args.run_dir)
    print(text)
    print("plots: " + ", ".join(str(p) for p in pngs))
    return 0


def cmd_carbon(args) -> int:
    from megatrain import carbon
    from megatrain.config import load_cluster

    if args.published:
        print(
            json.dumps(carbon.published_dicts(), indent=2)
            if args.json
            else carbon.render_published()
        )
        return 0
    if args.energy_kwh is None and args.gpu_hours is None:
        raise carbon.CarbonInputError(
            "give --gpu-hours (with --gpu-power-w or --cluster) or --energy-kwh; "
            "--published shows the published cases"
        )
    cluster = load_cluster(args.cluster) if args.cluster else None
    kwargs, sources = carbon.resolve_inputs(
        gpu_hours=args.gpu_hours,
        gpu_power_w=args.gpu_power_w,
        energy_kwh=args.energy_kwh,
        pue=args.pue,
        intensity=args.intensity,
        cluster=cluster,
    )
    if "gpu_hours" in kwargs and kwargs.get("gpu_power_w") is None:
        raise carbon.CarbonInputError(
            "--gpu-hours needs --gpu-power-w (W per GPU: measured mean, or the TDP "
            "as an upper bound), or --cluster NAME to take the profile's power"
        )
    try:
        result = carbon.estimate(**kwargs)
    except ValueError as e:
        raise carbon.CarbonInputError(str(e)) from None
    if args.json:
        print(json.dumps({**carbon.to_dict(result), "sources": sources}, indent=2))
    else:
        print(carbon.render_with_sources(result, sources))
    return 0


def cmd_config_doc(args) -> int:
    from megatrain.config import config_reference

    text = config_reference()
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


# ----------------------------------------------------------------------------- main


def add_prep(sub) -> None:
    p = sub.add_parser(
        "prep",
        help="raw text -> tokenizer + Arrow token shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read raw text (jsonl, txt, parquet; .gz/.zst), clean, filter and "
        "deduplicate it as a recipe says, train a byte-level BPE tokenizer or load one, "
        "tokenize, and write Arrow shards with a manifest and a report. Rerun the same command "
        "to resume after a crash.",
        epilog="examples:\n  megatrain prep corpus/ --out data/demo --vocab-size 4096\n"
        "  megatrain prep raw/ --out data/fr-en --recipe configs/data/fr-en.yaml --workers 8\n"
        "  mpiexec -n 4 megatrain prep raw/ --out data/fr-en --recipe configs/data/fr-en.yaml",
    )
    p.add_argument("inputs", nargs="+", help="input files, directories or globs")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument(
        "--recipe", help="YAML recipe: filters, dedup, tokenizer, shards (see configs/data/)"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--vocab-size", type=int, help="train a BPE of this size (default: the recipe's, 32000)"
    )
    group.add_argument(
        "--tokenizer", help="use this existing tokenizer.json instead of training one"
    )
    p.add_argument(
        "--text-field", help="JSON field / parquet column holding the text (default text)"
    )
    p.add_argument("--shard-tokens", type=int, help="tokens per shard (default: the recipe's, 50M)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local worker processes "
        "(under mpiexec/srun or a Slurm array, the ranks are the workers)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing dataset or unfinished prep in --out",
    )
    p.add_argument(
        "--keep-work",
        action="store_true",
        help="keep DIR/.prep-work (intermediate files) at the end",
    )
    p.set_defaults(func=cmd_prep)


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a run config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with DeepSpeed from a YAML run config; key=value arguments override "
        "config keys (e.g. optim.lr=3e-4 run.max_steps=100). Under torchrun or srun "
        "every process runs this; --nproc starts local processes itself.",
        epilog="examples:\n  megatrain train configs/tiny.yaml --nproc 2\n"
        "  megatrain train configs/tiny.yaml --dry-run model.preset=gopher-117m\n"
        "  torchrun --nproc_per_node=4 -m megatrain.cli train configs/tiny.yaml run.max_steps=100",
    )
    p.add_argument("config", help="run config YAML, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument(
        "--nproc", type=int, default=1, help="local processes to start (CPU or GPUs), default 1"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print parameters, FLOPs per token and batch layout as JSON, then exit",
    )
    p.add_argument(
        "--world-size", type=int, default=0, help="world size to resolve the batch for in --dry-run"
    )
    p.set_defaults(func=cmd_train)


def add_recover(sub) -> None:
    p = sub.add_parser(
        "recover",
        help="after a crashed Slurm job step: requeue the job if the run can go on",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run by a batch script after `srun megatrain train ...` failed (slurm/"
        "pretrain.sh, `megatrain submit`): records a `crashed` event in RUN_DIR/events.jsonl and "
        "requeues the job (same id) when a checkpoint was saved since it started, or once when "
        "none was; a second crash in a row without progress, or run.max_restarts, stops the "
        "chain with the reason. Exits with the crash's status.",
        epilog='example (in a batch script):\n  srun megatrain train CONFIG "$@" || status=$?\n'
        '  megatrain recover CONFIG "$@" --exit-status ${status:-0}',
    )
    p.add_argument("config", help="the run config the job trained, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="the same overrides")
    p.add_argument(
        "--exit-status", type=int, required=True, help="srun's exit status (0: nothing to do)"
    )
    p.set_defaults(func=cmd_recover)


def add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="will a run fit, how long, how many GPU-hours, kWh and CO2 (before queueing it)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Forecast a run on a cluster profile: memory per GPU (model states by ZeRO "
        "stage, tensor size and offload; activations measured on the real model with fake "
        "tensors), step time from FLOPs, peak and MFU (measured with --calibrate, else assumed "
        "and labelled so) plus communication, Slurm jobs at the QoS limit, GPU-hours, energy "
        "and CO2e, and compute-optimal scaling. Exit status 1 when it does not fit.",
        epilog="examples:\n"
        "  megatrain plan configs/runs/gopher-1.4b.yaml --cluster jean-zay-h100 --nodes 8\n"
        "  megatrain plan configs/runs/gopher-7.1b.yaml --cluster jean-zay-v100 --nodes 16 "
        "precision=fp16 --search\n"
        "  megatrain plan configs/runs/gpt2-124m.yaml --cluster jean-zay-a100 --nodes 1 "
        "--calibrate runs/gpt2-124m --budget-gpu-hours 5000 --json",
    )
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--cluster", help="cluster profile (default: the config's `cluster` key)")
    p.add_argument("--nodes", default="1", help="nodes (default 1); A-B with --search")
    p.add_argument("--gpus", type=int, help="GPUs in all, when fewer than the nodes have")
    p.add_argument("--calibrate", metavar="RUN_DIR", help="take MFU and power from this run")
    p.add_argument(
        "--budget-gpu-hours", type=float, help="the compute-optimal model this budget buys"
    )
    p.add_argument("--search", action="store_true", help="every layout that fits, best first")
    p.add_argument(
        "--rank",
        choices=["time", "energy"],
        default="time",
        help="--search order: time to train (default) or facility kWh",
    )
    p.add_argument("--json", action="store_true", help="one JSON object (a list with --search)")
    p.set_defaults(func=cmd_plan)


def add_submit(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a training run to Slurm (or local processes) through submitit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit `megatrain train CONFIG overrides` as a Slurm job shaped by a cluster "
        "profile (configs/clusters/): one task per GPU, constraint, QoS, account, "
        "modules, a warning signal before the time limit. The job saves a checkpoint "
        "and requeues itself before the limit, and resumes. Without Slurm, it runs as "
        "local processes. For plain sbatch, see slurm/pretrain.sh.",
        epilog="examples:\n"
        "  megatrain submit configs/my-run.yaml --cluster jean-zay-h100 --nodes 4 --account xyz\n"
        "  megatrain submit configs/my-run.yaml --cluster jean-zay-a100 --time 2:00:00 "
        "--qos dev --dry-run\n"
        "  megatrain submit configs/tiny.yaml --executor local --tasks-per-node 2 --wait",
    )
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--cluster", help="cluster profile (default: the config's `cluster` key)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument(
        "--tasks-per-node",
        type=int,
        help="tasks per node (default: the profile's GPUs per node, or 1)",
    )
    p.add_argument(
        "--time", default="20:00:00", help="time limit of each job, Slurm format (default 20:00:00)"
    )
    p.add_argument("--qos", help="QoS: a short name of the profile (dev, t3, t4) or a full name")
    p.add_argument(
        "--account", help="project to charge, e.g. xyz (the profile adds its suffix: xyz@h100)"
    )
    p.add_argument("--folder", help="submitit logs and pickles (default RUN_DIR/submitit)")
    p.add_argument(
        "--executor",
        choices=["auto", "slurm", "local"],
        default="auto",
        help="auto: Slurm if sbatch exists, else local processes",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the run (through requeues) and report how it ended",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the Slurm parameters as JSON and submit nothing",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="submit even when `megatrain plan` says the run will not fit in GPU memory",
    )
    p.set_defaults(func=cmd_submit)


def add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="plots and summary of a run directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read RUN_DIR/metrics.jsonl (written by `megatrain train`), print a summary "
        "(tokens, loss, throughput, MFU, energy, CO2 and how the energy was obtained) "
        "and write RUN_DIR/report/: PNG plots, summary.md and summary.json.",
        epilog="example:\n  megatrain report runs/tiny-demo",
    )
    p.add_argument("run_dir", help="a run directory (it holds metrics.jsonl)")
    p.set_defaults(func=cmd_report)


def add_carbon(sub) -> None:
    p = sub.add_parser(
        "carbon",
        help="energy and CO2e of a training run, with the arithmetic shown",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="IT energy (GPU-hours x power per GPU, or measured kWh) x PUE = facility "
        "energy; x grid intensity = CO2e. Prints both the facility and the IT-only CO2e, since "
        "published tables mix them. --cluster takes PUE, intensity and power from "
        "configs/clusters/NAME.yaml; explicit flags win.",
        epilog="examples:\n"
        "  megatrain carbon --gpu-hours 1082990 --gpu-power-w 400 --pue 1.2 --intensity 57"
        "   # BLOOM\n"
        "  megatrain carbon --energy-kwh 1066000 --pue 1.08 --intensity 330 --json"
        "          # Gopher\n"
        "  megatrain carbon --gpu-hours 5000 --cluster local\n"
        "  megatrain carbon --published     # BLOOM, Gopher, GPT-3, Llama 3.1 8B recomputed",
    )
    p.add_argument("--gpu-hours", type=float, help="GPU-hours (or device-hours) of the run")
    p.add_argument(
        "--gpu-power-w",
        type=float,
        help="mean power per GPU in W (measured, or the TDP as an upper bound)",
    )
    p.add_argument(
        "--energy-kwh", type=float, help="IT energy in kWh (before PUE), instead of hours x power"
    )
    p.add_argument(
        "--pue", type=float, help="power usage effectiveness (default 1, or the cluster profile's)"
    )
    p.add_argument(
        "--intensity",
        type=float,
        metavar="G",
        help="grid intensity in gCO2e/kWh (default 57, France per the BLOOM paper, "
        "or the cluster profile's)",
    )
    p.add_argument(
        "--cluster",
        metavar="NAME",
        help="cluster profile: configs/clusters/NAME.yaml or a YAML path",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON (energy_kwh_it, energy_kwh_facility, co2_kg, "
        "co2_kg_it, formula, inputs, sources)",
    )
    p.add_argument(
        "--published",
        action="store_true",
        help="recompute the published rows (BLOOM, Gopher, GPT-3, Llama 3.1 8B) with notes",
    )
    p.set_defaults(func=cmd_carbon)


def add_config_doc(sub) -> None:
    p = sub.add_parser(
        "config-doc",
        help="print the configuration reference (Markdown)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render every run-config key (section.key) with its type, default and "
        "docstring, as the Markdown table in docs/config.md.",
        epilog="example:\n  megatrain config-doc --out docs/config.md",
    )
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_config_doc)


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="a run's checkpoint as a Hugging Face model directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a checkpoint of RUN_DIR as a directory that transformers loads offline "
        "(AutoModelForCausalLM / AutoTokenizer.from_pretrained): safetensors weights, config.json "
        "(LlamaForCausalLM or GPT2LMHeadModel), the tokenizer, and a model card recording the "
        "run, step, tokens seen and checkpoint hashes. Reads ZeRO 0-3 and tensor-parallel "
        "checkpoints without GPUs, one tensor at a time.",
        epilog="examples:\n  megatrain export runs/tiny-demo --out exports/tiny-demo\n"
        "  megatrain export runs/gpt2-124m --step 20000 --out exports/gpt2-124m-20k --dtype bf16",
    )
    p.add_argument("run_dir", help="a run directory (it holds checkpoints/)")
    p.add_argument("--out", required=True, help="the directory to write (new or empty)")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], help="weights' precision (default: the run's)"
    )
    p.set_defaults(func=cmd_export)


def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="text a trained model writes after a prompt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue a prompt with a run's newest checkpoint (or --step) or an exported "
        "model, token by token over a KV cache, printing as it goes, until the end-of-text "
        "token or --max-new-tokens. Greedy by default; --temperature samples, --top-k and --top-p "
        "restrict the sampling; the same --seed gives the same text.",
        epilog="examples:\n  megatrain generate runs/tiny-demo --prompt 'La rivière'\n"
        "  megatrain generate exports/gpt2-124m --prompts prompts.txt --temperature 0.8 "
        "--top-p 0.95 --seed 1",
    )
    p.add_argument("path", help="a run directory or an exported model directory")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="the text to continue")
    group.add_argument("--prompts", help="a file of prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens")
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the fewest most likely tokens whose probability reaches P",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="a run's checkpoint (default: the newest)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: a GPU if any)")
    p.set_defaults(func=cmd_generate)


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, bits per byte and lm-evaluation-harness tasks of a trained model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a run (its newest checkpoint, or --step) or an exported model, "
        "offline. Without --tasks: loss, perplexity and bits per byte on the run's validation set "
        "or on --data (a prepared dataset). With --tasks: EleutherAI's lm-evaluation-harness on "
        "the model exported to Hugging Face's format, tasks and data read from --task-dir. "
        "Results go to RUN_DIR/eval/ (and the run's W&B run).",
        epilog="examples:\n  megatrain eval runs/tiny-demo\n"
        "  megatrain eval exports/gpt2-124m --data data/fr-en-val\n"
        "  megatrain eval runs/tiny-demo --tasks megatrain_lastword_fr,megatrain_lastword_en",
    )
    p.add_argument("path", help="a run directory or an exported model directory")
    p.add_argument("--data", help="a prepared dataset to compute perplexity on")
    p.add_argument("--max-tokens", type=int, default=2**20, help="tokens of --data to use")
    p.add_argument("--tasks", help="comma-separated lm-evaluation-harness task names")
    p.add_argument("--task-dir", help="where the task definitions are (default: configs/eval)")
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--step", type=int, help="a run's checkpoint (default: the newest)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: a GPU if any)")
    p.set_defaults(func=cmd_eval)


SUBCOMMANDS = [
    add_prep,
    add_train,
    add_plan,
    add_submit,
    add_recover,
    add_export,
    add_generate,
    add_eval,
    add_report,
    add_carbon,
    add_config_doc,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatrain",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        description="Pretrain GPT-style language models: prepare data, train with DeepSpeed, "
        "report cost.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come after options (`train CONFIG --nproc 2 run.max_steps=10`): collect them
    args, extra = parser.parse_known_args(argv)
    if extra:
        # name only what is wrong: an unknown option here; an override without `=` is named by
        # the config loader
        unknown = [e for e in extra if e.startswith("-")]
        if args.command not in ("train", "plan", "submit", "recover") or unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
        args.overrides += extra
    try:
        code = args.func(args)
    except MegatrainError as e:
        # an error every rank raised together is printed once
        if not e.shared or DistEnv.from_environ(arrays_are_ranks=args.command == "prep").rank == 0:
            print(f"megatrain {args.command}: error: {e}", file=sys.stderr)
        code = 2
    if args.command == "train" and not args.dry_run:
        # Everything is written and closed. Skip the interpreter's teardown, where gloo's threads
        # occasionally abort ("terminate called without an active exception", ~2% of exits).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
