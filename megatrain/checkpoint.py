"""Checkpoints that are either whole or ignored, and the `Checkpointer` that owns their cadence.

    RUN_DIR/checkpoints/
      step00000200/                 DeepSpeed's files (model, optimizer shards per rank)
        rng-rank00000.pt            each rank's RNG states
        megatrain-checkpoint.json   step, the trainer's parts' state, config, layout,
                                    a sha256 per file
      step00000200-universal/       the same in DeepSpeed's universal format, made when a resume
                                    changed the parallel layout
      latest                        name of the newest complete checkpoint

A checkpoint counts only once its megatrain-checkpoint.json exists, and that file is written
(by rename) after every other file is on disk and hashed; `latest` is rewritten (by rename)
after that. Loading verifies sizes and hashes first and falls back to the previous checkpoint,
with a logged event, when one is missing a file or corrupt.

What a checkpoint holds besides DeepSpeed's engine state comes from the `Stateful` parts the
trainer hands the `Checkpointer` (data position, metrics counters, the stability guard): each
part's `state_dict()` is merged into the manifest's top level, and `load_state_dict(manifest)`
reads its own keys back. Adding state to checkpoints is adding a part, or a key to one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from megatrain import dist
from megatrain.config import RunConfig
from megatrain.errors import MegatrainError
from megatrain.files import atomic_path, atomic_write_text, sha256_file, write_json

MANIFEST = "megatrain-checkpoint.json"
LATEST = "latest"
UNIVERSAL_SUFFIX = "-universal"
UNIVERSAL_DONE = "megatrain-universal.done"
# Keys of the manifest that belong to the checkpoint itself, not to a part.
RESERVED = {"step", "tag", "world_size", "files"}


class CheckpointError(MegatrainError):
    """No usable checkpoint where one was expected; the message says which and why."""


class Stateful(Protocol):
    """A part of the trainer whose state a checkpoint keeps (JSON values, the same on every rank;
    `state_dict` may be collective)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def tag_for(step: int) -> str:
    return f"step{step:08d}"


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


class Checkpointer:
    """Saves the engine, each rank's RNG and the trainer's parts every `run.ckpt_every` steps
    (and when the run ends or stops), keeps the newest `run.keep`, and restores them."""

    def __init__(
        self, engine, ckpt_dir: Path, run: RunConfig, parts: dict[str, Stateful], info: dict
    ):
        """`info`: what every checkpoint records about the run (config, parallel layout)."""
        self.engine, self.dir, self.run = engine, Path(ckpt_dir), run
        self.parts, self.info = parts, info

    def due(self, step: int, last: bool, stopped: bool) -> bool:
        """After the last step (unless `run.ckpt_at_end` is off), a stop, and each cadence step."""
        every = self.run.ckpt_every
        return stopped or (last and self.run.ckpt_at_end) or bool(every and step % every == 0)

    def save(self, step: int) -> Path:
        """A complete checkpoint after `step` optimizer steps; collective (all ranks call it)."""
        rank, world = dist.rank_world()
        tag = tag_for(step)
        folder = self.dir / tag
        state = self._parts_state()
        if rank == 0 and folder.exists():  # a leftover from a crash during an earlier save
            shutil.rmtree(folder)
        dist.barrier()
        self.engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        with atomic_path(folder / f"rng-rank{rank:05d}.pt") as tmp:
            torch.save(rng_state(), tmp)
        dist.barrier()
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        files = _hash_files(folder, dist.all_gather(files if rank == 0 else None)[0])
        if rank == 0:
            manifest = {"step": step, "tag": tag, "world_size": world, "files": files}
            write_json(folder / MANIFEST, {**manifest, **state, **self.info}, indent=1, default=str)
            atomic_write_text(self.dir / LATEST, tag)
            prune(self.dir, self.run.keep, self.run.keep_every)
        dist.barrier()
        return folder

    def _parts_state(self) -> dict:
        state: dict = {}
        for name, part in self.parts.items():
            own = part.state_dict()
            clash = (RESERVED | set(self.info) | set(state)) & set(own)
            if clash:
                raise RuntimeError(f"checkpoint part {name!r} reuses the keys {sorted(clash)}")
            state.update(own)
        return state

    def restore(self, tag: str, manifest: dict, parts: bool = True) -> None:
        """Load the engine (model, optimizer) and this rank's RNG from checkpoint `tag` (a
        universal one after a layout change), then, unless told not to, every part's state from
        `manifest`. A rollback restores the weights but not the parts: the data position and the
        energy counters go on."""
        rank, _ = dist.rank_world()
        path, _ = self.engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {self.dir / tag}")
        rng_file = self.dir / tag / f"rng-rank{rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        if parts:
            for part in self.parts.values():
                part.load_state_dict(manifest)


def _hash_files(folder: Path, names: list[str]) -> dict:
    """Every rank hashes its share of the files; all ranks get the whole table."""
    rank, world = dist.rank_world()
    mine = {
        n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size}
        for n in names[rank::world]
    }
    table: dict = {}
    for part in dist.all_gather(mine):
        table.update(part)
    return table


def prune(ckpt_dir: Path, keep: int, keep_every: int = 0) -> None:
    """Delete all but the newest `keep` complete checkpoints, sparing the steps that are
    multiples of `keep_every`."""
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
    """None if every file listed in the manifest is present with its size and sha256, else the
    problem."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{manifest_path}: unreadable ({e})"
    names = sorted(manifest["files"])
    problems = []
    rank, world = dist.rank_world()
    for name in names[rank::world]:
        path, want = folder / name, manifest["files"][name]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, expected {want['bytes']}")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{path} is corrupt (sha256 differs from {MANIFEST})")
    problems = sorted(p for part in dist.all_gather(problems) for p in part)
    return "; ".join(problems) or None


def find_resumable(ckpt_dir: str | os.PathLike, log=print) -> tuple[str, dict] | None:
    """Newest checkpoint that verifies (collective), with its manifest; older ones are tried in
    turn."""
    ckpt_dir = Path(ckpt_dir)
    for tag in reversed(complete_tags(ckpt_dir)):
        problem = verify(ckpt_dir / tag)
        if problem is None:
            return tag, json.loads((ckpt_dir / tag / MANIFEST).read_text())
        log({"event": "checkpoint_rejected", "tag": tag, "reason": problem})
    return None


def needs_universal(meta: dict, dp_size: int, tp_size: int, zero_stage: int) -> bool:
    """A ZeRO checkpoint shards optimizer state by data-parallel rank: another layout must go
    through DeepSpeed's universal format. (ZeRO-0 keeps whole states and loads at any
    data-parallel size.)"""
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


@dataclass
class ResumePoint:
    tag: str
    """The checkpoint to load: the newest valid one, or its universal conversion."""
    manifest: dict
    """The newest valid checkpoint's manifest (step, parts' state, layout)."""
    universal: bool
    """True when the parallel layout changed and the engine must load the universal format."""


def find_resume_point(
    ckpt_dir: Path, dp_size: int, tp_size: int, zero_stage: int, log=print, check=None
) -> ResumePoint | None:
    """Where a run continues from (collective): the newest checkpoint that verifies, converted
    once to the universal format if it was saved with another (dp, tp, ZeRO) layout.
    `check(tag, manifest)` may refuse it (raise) before anything is converted or loaded."""
    found = find_resumable(ckpt_dir, log)
    if not found:
        return None
    tag, manifest = found
    if check is not None:
        check(tag, manifest)
    universal = needs_universal(manifest, dp_size, tp_size, zero_stage)
    if universal:
        tag = to_universal(ckpt_dir, tag, log)
    return ResumePoint(tag, manifest, universal)


def to_universal(ckpt_dir: str | os.PathLike, tag: str, log=print) -> str:
    """Convert checkpoint `tag` to DeepSpeed's universal format once (rank 0; collective);
    returns its tag.

    Runs `python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state` (the
    missing-state injection is what makes ZeRO-1/2 checkpoints convertible); its output goes to
    convert.log.
    """
    ckpt_dir = Path(ckpt_dir)
    out = ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}"

    def convert() -> None:
        if (out / UNIVERSAL_DONE).exists():
            return
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        log({"event": "universal_conversion", "tag": tag, "output": str(out)})
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
        command += ["--input_folder", str(ckpt_dir / tag), "--output_folder", str(out)]
        command += ["--inject_missing_state", "--num_extract_workers", "2"]
        command += ["--num_merge_workers", "1"]
        with open(out / "convert.log", "w") as logfile:
            result = subprocess.run(command, stdout=logfile, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise CheckpointError(
                f"converting {ckpt_dir / tag} to a universal checkpoint failed; "
                f"see {out}/convert.log"
            )
        atomic_write_text(out / UNIVERSAL_DONE, tag)

    dist.agree(convert, root=0)
    return out.name
