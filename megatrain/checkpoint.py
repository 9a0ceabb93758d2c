"""Checkpoints that are either whole or ignored.

    RUN_DIR/checkpoints/
      step00000200/                 DeepSpeed's files (model, optimizer shards per rank)
        rng-rank00000.pt            each rank's RNG states
        megatrain-checkpoint.json   step, data position, config, versions, and a sha256 per file
      latest                        name of the newest complete checkpoint

A checkpoint counts only once its megatrain-checkpoint.json exists, and that file is written
(by rename) after every other file is on disk and hashed; `latest` is rewritten (by rename)
after that. Loading verifies sizes and hashes first and falls back to the previous checkpoint,
with a logged event, when one is missing a file or corrupt.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatrain.files import atomic_write_bytes, sha256_file
from megatrain.parallel import all_gather

MANIFEST = "megatrain-checkpoint.json"
LATEST = "latest"
UNIVERSAL_SUFFIX = "-universal"
UNIVERSAL_DONE = "megatrain-universal.done"


class CheckpointError(Exception):
    """No usable checkpoint where one was expected; the message says which and why."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _hash_files(folder: Path, names: list[str]) -> dict:
    """Every rank hashes its share of the files; all ranks get the whole table."""
    rank, world = _rank_world()
    mine = {
        n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size}
        for n in names[rank::world]
    }
    table: dict = {}
    for part in all_gather(mine):
        table.update(part)
    return table


def save(
    engine,
    ckpt_dir: str | os.PathLike,
    step: int,
    client_state: dict,
    keep: int = 3,
    keep_every: int = 0,
) -> Path:
    """Save a complete checkpoint of `engine` after `step` optimizer steps; collective (all ranks call it)."""
    rank, world = _rank_world()
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    folder = ckpt_dir / tag
    if rank == 0 and folder.exists():  # a leftover from a crash during an earlier save of this step
        shutil.rmtree(folder)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), folder / f".rng-rank{rank:05d}.pt.tmp")
    os.replace(folder / f".rng-rank{rank:05d}.pt.tmp", folder / f"rng-rank{rank:05d}.pt")
    _barrier()
    names = all_gather(
        sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if rank == 0
        else None
    )[0]
    files = _hash_files(folder, names)
    if rank == 0:
        manifest = {"step": step, "tag": tag, "world_size": world, "files": files, **client_state}
        atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1, default=str).encode())
        atomic_write_bytes(ckpt_dir / LATEST, tag.encode())
        prune(ckpt_dir, keep, keep_every)
    _barrier()
    return folder


def prune(ckpt_dir: Path, keep: int, keep_every: int = 0) -> None:
    """Delete all but the newest `keep` complete checkpoints, sparing the steps that are multiples of `keep_every`."""
    tags = complete_tags(ckpt_dir)
    for tag in tags[:-keep] if keep > 0 else []:
        step = int(tag.removeprefix("step"))
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
        # the manifest goes first: a half-deleted folder is then never taken for a checkpoint
        (ckpt_dir / tag / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a megatrain manifest, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    return sorted(p.parent.name for p in Path(ckpt_dir).glob(f"step*/{MANIFEST}"))


def verify(folder: Path) -> str | None:
    """None if every file listed in the manifest is present with its size and sha256, else the problem."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{manifest_path}: unreadable ({e})"
    names = sorted(manifest["files"])
    problems = []
    rank, world = _rank_world()
    for name in names[rank::world]:
        path, want = folder / name, manifest["files"][name]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, expected {want['bytes']}")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{path} is corrupt (sha256 differs from {MANIFEST})")
    problems = sorted(p for part in all_gather(problems) for p in part)
    return "; ".join(problems) or None


def find_resumable(ckpt_dir: str | os.PathLike, log=print) -> tuple[str, dict] | None:
    """Newest checkpoint that verifies (collective), with its manifest; older ones are tried in turn."""
    ckpt_dir = Path(ckpt_dir)
    for tag in reversed(complete_tags(ckpt_dir)):
        problem = verify(ckpt_dir / tag)
        if problem is None:
            return tag, json.loads((ckpt_dir / tag / MANIFEST).read_text())
        log({"event": "checkpoint_rejected", "tag": tag, "reason": problem})
    return None


def load(engine, ckpt_dir: str | os.PathLike, tag: str) -> dict:
    """Load engine state (model, optimizer, scheduler) and this rank's RNG from a verified checkpoint."""
    rank, _ = _rank_world()
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {Path(ckpt_dir) / tag}")
    rng_file = Path(ckpt_dir) / tag / f"rng-rank{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def needs_universal(meta: dict, dp_size: int, tp_size: int, zero_stage: int) -> bool:
    """A ZeRO checkpoint shards optimizer state by data-parallel rank: another layout must go through
    DeepSpeed's universal format. (ZeRO-0 keeps whole states and loads at any data-parallel size.)"""
    saved = meta.get("layout", {})
    if (
        not saved
        or saved.get("zero_stage", 0) == 0
        and zero_stage == 0
        and saved.get("tp_size", 1) == tp_size
    ):
        return False
    return (saved.get("dp_size"), saved.get("tp_size"), saved.get("zero_stage")) != (
        dp_size,
        tp_size,
        zero_stage,
    )


def to_universal(ckpt_dir: str | os.PathLike, tag: str, log=print) -> str:
    """Convert checkpoint `tag` to DeepSpeed's universal format once (rank 0; collective); returns its tag.

    Runs `python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state` (the missing-state
    injection is what makes ZeRO-1/2 checkpoints convertible); its output goes to convert.log.
    """
    rank, _ = _rank_world()
    ckpt_dir = Path(ckpt_dir)
    out_tag = f"{tag}{UNIVERSAL_SUFFIX}"
    out = ckpt_dir / out_tag
    if rank == 0 and not (out / UNIVERSAL_DONE).exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        log({"event": "universal_conversion", "tag": tag, "output": str(out)})
        with open(out / "convert.log", "w") as logfile:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder",
                    str(ckpt_dir / tag),
                    "--output_folder",
                    str(out),
                    "--inject_missing_state",
                    "--num_extract_workers",
                    "2",
                    "--num_merge_workers",
                    "1",
                ],
                stdout=logfile,
                stderr=subprocess.STDOUT,
            )
        ok = result.returncode == 0
        if ok:
            (out / UNIVERSAL_DONE).write_text(tag)
    else:
        ok = True
    if not all(all_gather(ok)):
        raise CheckpointError(
            f"converting {ckpt_dir / tag} to a universal checkpoint failed; see {out}/convert.log"
        )
    return out_tag
