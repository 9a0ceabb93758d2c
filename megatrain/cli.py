"""The `megatrain` command: thin wrappers that parse arguments and call the modules."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from megatrain.dist import DistEnv
from megatrain.errors import MegatrainError

EXAMPLES = """examples:
  megatrain prep corpus/ --out data/demo --vocab-size 4096
  megatrain train configs/tiny.yaml --nproc 2 data.sources.0.path=data/demo
  megatrain report runs/tiny-demo
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


def _launch_local(args) -> int:
    """Start `nproc` local processes through torchrun, each running this same command."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={args.nproc}", "-m", "megatrain.cli", "train", args.config]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    return subprocess.call([*cmd, *args.overrides], env=env)


def cmd_train(args) -> int:
    from megatrain.config import load_config
    from megatrain.dist import DistEnv
    from megatrain.stop import catch_stop_signals

    catch_stop_signals()  # a time-limit warning during the slow start-up must not kill us
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(dry_run(cfg, args.world_size or args.nproc)))
        return 0
    if args.nproc > 1 and DistEnv.from_environ().world_size == 1:
        return _launch_local(args)

    from megatrain.requeue import train_job

    train_job(cfg)  # under Slurm, a signal-stop requeues the job
    return 0


def dry_run(cfg, world_size: int) -> dict:
    """Model size, FLOPs per token and batch layout, without touching a GPU: the trainer's own
    run plan (the dataset's manifest gives the vocabulary when the config leaves it to it)."""
    from megatrain.plan import plan_run
    from megatrain.shards import Manifest

    vocab = (
        Manifest.read(cfg.data.sources[0].path).vocab_size if cfg.model.vocab_size == 0 else None
    )
    return plan_run(cfg, world_size, vocab).summary()


# ----------------------------------------------------------------------------- submit


def cmd_submit(args) -> int:
    import submitit

    from megatrain import submit
    from megatrain.config import load_cluster

    time_min = submit.parse_slurm_time(args.time)
    if args.dry_run:
        cfg = submit.prepare(args.config, args.overrides, args.cluster)
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
        args.config,
        args.overrides,
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


SUBCOMMANDS = [add_prep, add_train, add_submit, add_report, add_carbon, add_config_doc]


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
        if args.command not in ("train", "submit") or any(
            "=" not in e or e.startswith("-") for e in extra
        ):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
