"""The GPU acceptance check: what a CPU cannot show, in one command (`bench/gpu_check.sh`).

On a machine with one NVIDIA GPU, it prepares the bundled corpus, trains GPT-2 124M through the
real `megatrain` command in several ways, and runs the throughput benchmark. It prints one JSON
line per check, {"check": ..., "status": "PASS" | "FAIL" | "SKIP", figures..., "why": ...},
and exits 1 if any check failed. Without a GPU every check is a SKIP that says why: nothing
passes that did not run.

    environment       torch, CUDA, DeepSpeed versions, the device and its peak
    train-bf16-zero1  loss falls; energy measured by NVML (non-zero joules); MFU reported;
    train-bf16-zero2  a checkpoint written
    train-fp16        the same in fp16: the loss scale reported, no rollback from overflow skips
    exact-resume      stop at step 10, resume: the same losses as the uninterrupted run
                      (run.deterministic=true)
    local-rank        LOCAL_RANK=1 with one visible GPU (each task bound to its own GPU) trains
    two-ranks-one-gpu two processes on one GPU are refused by name (NCCL cannot run them)
    throughput-*      megatrain / plain PyTorch at 124M (T=1024) and 1.3B (T=2048), compile on
                      and off; the bar with compile on: >= 1.0 and >= 1.10
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "runs" / "gpt2-124m.yaml"
BARS = {"124m": 1.0, "1.3b": 1.10}  # megatrain / reference tokens/s, compile on


def report(check: str, status: str, **figures) -> bool:
    print(json.dumps({"check": check, "status": status, **figures}), flush=True)
    return status != "FAIL"


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def judge_training(run_dir: Path, precision: str) -> tuple[str, dict]:
    """PASS or FAIL for a training run directory, with the figures that decided it."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    events = read_jsonl(run_dir / "events.jsonl")
    if not records:
        return "FAIL", {"why": f"no metrics in {run_dir}"}
    first, last = records[0], records[-1]
    figures = {
        "first_loss": first["loss"],
        "last_loss": last["loss"],
        "tokens_per_s": last["tokens_per_s"],
        "mfu": last.get("mfu"),
        "energy_method": last["energy_method"],
        "energy_kwh_it": last["energy_kwh_it"],
        "mem_gb": last["mem_gb"],
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step*")),
        "rollbacks": sum(e["event"] == "rollback" for e in events),
        "overflow_skips": sum(e["event"] == "overflow_skip" for e in events),
    }
    if precision == "fp16":
        figures["loss_scale"] = last.get("loss_scale")
    problems = []
    if not last["loss"] < first["loss"] - 1.0:
        problems.append("the loss did not fall by 1")
    if last["energy_method"] != "nvml" or not last["energy_kwh_it"] > 0:
        problems.append("energy not measured by NVML")
    if last.get("mfu") is None:
        problems.append("no MFU")
    if not figures["checkpoints"]:
        problems.append("no checkpoint")
    if figures["rollbacks"]:
        problems.append("rolled back")
    if precision == "fp16" and not figures["loss_scale"]:
        problems.append("no loss scale")
    return ("FAIL" if problems else "PASS"), {**figures, **({"why": problems} if problems else {})}


class Check:
    def __init__(self, work: Path):
        self.work = work
        self.data = work / "data"

    def megatrain(self, *args: str, env: dict | None = None, timeout: float = 600):
        cmd = [sys.executable, "-m", "megatrain.cli", *args]
        env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
        return subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout
        )

    def train(self, name: str, *overrides: str, env: dict | None = None, nproc: int = 1):
        """gpt2-124m on the prepared corpus, in short steps (64k tokens) with a short warmup."""
        run_dir = self.work / name
        args = [
            "train",
            str(CONFIG),
            f"--nproc={nproc}",
            f"data.sources.0.path={self.data}",
            "model.vocab_size=0",
            "batch.global_tokens=65536",
            "optim.warmup_steps=10",
            "run.max_steps=40",
            "run.log_every=5",
            "run.eval_every=0",
            "run.eval_batches=2",
            "run.ckpt_every=0",
            f"run.dir={run_dir}",
            "wandb.mode=disabled",
            *overrides,
        ]
        return run_dir, self.megatrain(*args, env=env)

    def prepare(self) -> bool:
        t = time.perf_counter()
        out = self.megatrain("prep", "corpus/", "--out", str(self.data), "--vocab-size", "8192")
        figures = {"seconds": round(time.perf_counter() - t, 1)}
        if out.returncode:
            return report("prep", "FAIL", **figures, why=out.stderr[-2000:])
        return report("prep", "PASS", **figures)

    def training(self, precision: str, zero: int) -> bool:
        name = f"train-{precision}-zero{zero}"
        run_dir, out = self.train(name, f"precision={precision}", f"parallel.zero_stage={zero}")
        if out.returncode:
            return report(name, "FAIL", why=out.stderr[-2000:])
        status, figures = judge_training(run_dir, precision)
        return report(name, status, **figures)

    def exact_resume(self) -> bool:
        same = ["run.deterministic=true", "run.max_steps=20", "run.log_every=1"]
        full, out = self.train("resume-full", *same)
        part, out2 = self.train("resume-part", *same, "run.stop_at_step=10")
        _, out3 = self.train("resume-part", *same)
        failed = [o for o in (out, out2, out3) if o.returncode]
        if failed:
            return report("exact-resume", "FAIL", why=failed[0].stderr[-2000:])
        a = {r["step"]: r["loss"] for r in read_jsonl(full / "metrics.jsonl")}
        b = {r["step"]: r["loss"] for r in read_jsonl(part / "metrics.jsonl")}
        differ = [s for s in a if a[s] != b.get(s)]
        status = "PASS" if a and not differ else "FAIL"
        return report("exact-resume", status, steps=len(a), differing_steps=differ)

    def local_rank(self) -> bool:
        env = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29611",
            "CUDA_VISIBLE_DEVICES": "0",
        }
        _, out = self.train("local-rank", "run.max_steps=5", env=env)
        if out.returncode:
            return report("local-rank", "FAIL", why=out.stderr[-2000:])
        return report("local-rank", "PASS")

    def two_ranks_one_gpu(self) -> bool:
        env = {"CUDA_VISIBLE_DEVICES": "0"}
        _, out = self.train("two-ranks", "run.max_steps=5", env=env, nproc=2)
        named = "taken by another rank" in out.stderr + out.stdout
        status = "PASS" if out.returncode and named else "FAIL"
        why = None if status == "PASS" else (out.stderr[-2000:] or "it trained")
        return report("two-ranks-one-gpu", status, refused=bool(out.returncode), why=why)

    def memory_plan(self, size: str) -> bool:
        """`megatrain plan`'s memory against torch.cuda.max_memory_allocated over the first two
        steps (eager: the plan measures the pass eagerly; compiled, for the record)."""
        model, seq, micro = {"124m": ("gpt2-124m", 1024, 16), "1.3b": ("gpt2-1.3b", 2048, 8)}[size]
        from megatrain.config import load_config
        from megatrain.memory import memory_per_gpu
        from megatrain.plan import plan_run
        from megatrain.shards import Manifest

        settings = [
            f"model.preset={model}",
            f"data.seq_len={seq}",
            f"batch.micro_batch={micro}",
            "batch.grad_accum=1",
            "batch.global_tokens=0",
            "run.max_steps=3",
        ]
        figures = {}
        for compile in (False, True):
            probe = self.work / f"memory-{size}-{compile}"
            name = f"memory-{size}-{'compiled' if compile else 'eager'}"
            _, out = self.train(
                name,
                *settings,
                f"run.compile={str(compile).lower()}",
                env={"MEGATRAIN_MEMORY_PROBE": str(probe)},
            )
            if out.returncode:
                return report(f"memory-plan-{size}", "FAIL", why=out.stderr[-2000:])
            measured = json.loads(Path(f"{probe}.rank0.json").read_text())
            figures[f"{'compiled' if compile else 'eager'}_gib"] = round(
                measured["max_memory_allocated"] / 2**30, 3
            )
        cfg = load_config(
            CONFIG, [f"data.sources.0.path={self.data}", "model.vocab_size=0", *settings]
        )
        plan = memory_per_gpu(cfg, plan_run(cfg, 1, Manifest.read(self.data).vocab_size))
        planned = plan["total"] - plan["overhead"]  # the allocator's peak has no CUDA context
        error = figures["eager_gib"] / planned - 1
        status = "PASS" if abs(error) < 0.10 else "FAIL"
        return report(
            f"memory-plan-{size}",
            status,
            planned_gib=round(planned, 3),
            error=round(error, 4),
            **figures,
        )

    def throughput(self, size: str, compile: bool) -> bool:
        model, seq, micro = {"124m": ("gpt2-124m", 1024, 16), "1.3b": ("gpt2-1.3b", 2048, 8)}[size]
        args = [
            sys.executable,
            "bench/train_throughput.py",
            "--model",
            model,
            "--seq-len",
            str(seq),
            "--micro-batch",
            str(micro),
            "--steps",
            "15",
            "--warmup",
            "8",
        ]
        if not compile:
            args.append("--no-compile")
        out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
        name = f"throughput-{size}-{'compiled' if compile else 'eager'}"
        if out.returncode:
            return report(name, "FAIL", why=out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        figures = {
            "ratio": r["ratio"],
            "megatrain_tokens_per_s": r["megatrain"]["tokens_per_s"],
            "reference_tokens_per_s": r["reference"]["tokens_per_s"],
            "megatrain_mfu": r["megatrain"]["mfu"],
            "reference_mfu": r["reference"]["mfu"],
            "megatrain_mem_gb": r["megatrain"]["mem_gb"],
            "reference_mem_gb": r["reference"]["mem_gb"],
        }
        bar = BARS[size] if compile else None
        status = "PASS" if bar is None or r["ratio"] >= bar else "FAIL"
        return report(name, status, bar=bar, **figures)


CHECKS = [
    "prep",
    "train-bf16-zero1",
    "train-bf16-zero2",
    "train-fp16",
    "exact-resume",
    "local-rank",
    "two-ranks-one-gpu",
    "memory-plan-124m",
    "memory-plan-1.3b",
    "throughput-124m-compiled",
    "throughput-124m-eager",
    "throughput-1.3b-compiled",
    "throughput-1.3b-eager",
]


def environment() -> str | None:
    """Report the environment; None if there is a GPU to check on, else why not."""
    import torch

    if not torch.cuda.is_available():
        report("environment", "SKIP", torch=torch.__version__, why="no CUDA device")
        return "needs an NVIDIA GPU (torch sees none)"
    from megatrain import hardware

    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        report("environment", "FAIL", why="DeepSpeed is not installed (see bench/README.md)")
        return "DeepSpeed is not installed"
    accel = hardware.detect_accelerator()
    try:
        peak = hardware.peak_flops(accel, "bf16") / 1e12
    except ValueError:
        peak = None
    report(
        "environment",
        "PASS",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        deepspeed=ds,
        device=torch.cuda.get_device_name(0),
        accelerator=accel.key,
        peak_bf16_tflops=peak,
        gpus=torch.cuda.device_count(),
    )
    return None


def main() -> int:
    t0 = time.perf_counter()
    missing = environment()
    if missing:
        for name in CHECKS:
            report(name, "SKIP", why=missing)
        return 0
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        check = Check(Path(tmp))
        if not check.prepare():
            return 1
        ok &= check.training("bf16", 1)
        ok &= check.training("bf16", 2)
        ok &= check.training("fp16", 1)
        ok &= check.exact_resume()
        ok &= check.local_rank()
        ok &= check.two_ranks_one_gpu()
        ok &= check.memory_plan("124m")
        ok &= check.memory_plan("1.3b")
        for size in ("124m", "1.3b"):
            for compile in (True, False):
                ok &= check.throughput(size, compile)
    report("total", "PASS" if ok else "FAIL", seconds=round(time.perf_counter() - t0, 1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
