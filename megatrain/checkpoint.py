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
with a logged event, when one is missing a file or corrupt; when every checkpoint fails, the run
stops by name instead of starting again from step 0.

Lineage: each fresh start of a run draws a lineage id, which every checkpoint it writes records
and a resumed run continues. Pruning deletes only checkpoints of the current lineage (never the
one just written), and a resume follows the lineage of the checkpoint `latest` names.
`run.resume=never` moves the old checkpoints aside into checkpoints/superseded-<time>/ first, so
that neither this run's requeued jobs nor its pruning can mistake them for its own.

A failed save (a full disk, any write error) removes its partial folder, logs `checkpoint_failed`
with the free space against the last checkpoint's size and stops by name; `latest` still names the
last good checkpoint. Before writing, the free space is checked against the last checkpoint's size.

What a checkpoint holds besides DeepSpeed's engine state comes from the `Stateful` parts the
trainer hands the `Checkpointer` (data position, metrics counters, the stability guard): each
part's `state_dict()` is merged into the manifest's top level, and `load_state_dict(manifest)`
reads its own keys back. Adding state to checkpoints is adding a part, or a key to one.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from megatrain import dist
from megatrain.config import RunConfig
from megatrain.errors import MegatrainError
from megatrain.files import atomic_path, atomic_write_text, human_bytes, sha256_file, write_json

MANIFEST = "megatrain-checkpoint.json"
LATEST = "latest"
UNIVERSAL_SUFFIX = "-universal"
UNIVERSAL_DONE = "megatrain-universal.done"
# Keys of the manifest that belong to the checkpoint itself, not to a part.
RESERVED = {"step", "tag", "world_size", "files", "lineage"}
SUPERSEDED = "superseded-"


class CheckpointError(MegatrainError):
    """No usable checkpoint where one was expected; the message says which and why."""


class Stateful(Protocol):
    """A part of the trainer whose state a checkpoint keeps (JSON values, the same on every rank;
    `state_dict` may be collective)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def new_lineage() -> str:
    """The id of a fresh start of a run (rank 0 draws it; the trainer shares it)."""
    return uuid.uuid4().hex[:12]


def read_manifest(folder: Path) -> dict | None:
    """A checkpoint's manifest, or None if it is missing or unreadable."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def lineage_of(folder: Path) -> str | None:
    return (read_manifest(folder) or {}).get("lineage")


def checkpoint_bytes(manifest: dict) -> int:
    """What a checkpoint takes on disk: the sum of its files' sizes."""
    return sum(int(f.get("bytes", 0)) for f in manifest.get("files", {}).values())


def no_space(error: BaseException) -> bool:
    """A write error that means the device is full (torch's zip writer says "unexpected pos")."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "unexpected pos" in str(error) or "No space left" in str(error)


def supersede(ckpt_dir: Path, log=print, also: tuple[Path, ...] = ()) -> Path | None:
    """Move an earlier run's checkpoints (and `latest`, and the files in `also`: its
    metrics.jsonl) into checkpoints/superseded-<time>/, so that a fresh start
    (`run.resume=never`) never resumes, prunes or rolls back to them."""
    ckpt_dir = Path(ckpt_dir)
    old = [p for p in ckpt_dir.glob("step*") if p.is_dir()] if ckpt_dir.is_dir() else []
    old += [p for p in (ckpt_dir / LATEST, *also) if p.exists()]
    if not old:
        return None
    dest = ckpt_dir / f"{SUPERSEDED}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    dest.mkdir(parents=True)
    for path in old:
        os.replace(path, dest / path.name)
    log({"event": "checkpoints_superseded", "moved": len(old), "to": str(dest)})
    return dest


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
        self,
        engine,
        ckpt_dir: Path,
        run: RunConfig,
        parts: dict[str, Stateful],
        info: dict,
        log=print,
        last_bytes: int = 0,
    ):
        """`info`: what every checkpoint records about the run (config, parallel layout, lineage).
        `log`: where events go. `last_bytes`: the size of the checkpoint the run resumed from."""
        self.engine, self.dir, self.run = engine, Path(ckpt_dir), run
        self.parts, self.info, self.log = parts, info, log
        self.last_bytes = last_bytes

    def due(self, step: int, last: bool, stopped: bool) -> bool:
        """After the last step (unless `run.ckpt_at_end` is off), a stop, and each cadence step."""
        every = self.run.ckpt_every
        return stopped or (last and self.run.ckpt_at_end) or bool(every and step % every == 0)

    def save(self, step: int) -> Path:
        """A complete checkpoint after `step` optimizer steps; collective (all ranks call it).
        Raises `CheckpointError` on every rank when it cannot be written whole."""
        rank, world = dist.rank_world()
        tag = tag_for(step)
        folder = self.dir / tag
        state = self._parts_state()
        dist.agree(lambda: self._check_space(folder), root=0)
        if rank == 0 and folder.exists():  # a leftover from a crash during an earlier save
            shutil.rmtree(folder)
        dist.barrier()
        error = None
        try:
            self.engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        except Exception as e:  # noqa: BLE001 -- every rank learns of it below
            # a write fails between DeepSpeed's first and last barriers: stand in for the last
            error = e
            dist.barrier()
        if error is None:
            try:
                with atomic_path(folder / f"rng-rank{rank:05d}.pt") as tmp:
                    torch.save(rng_state(), tmp)
            except Exception as e:  # noqa: BLE001
                error = e
        self._agree_saved(folder, error)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        files = _hash_files(folder, dist.all_gather(files if rank == 0 else None)[0])
        error = None
        if rank == 0:
            manifest = {"step": step, "tag": tag, "world_size": world, "files": files}
            try:
                write_json(
                    folder / MANIFEST, {**manifest, **state, **self.info}, indent=1, default=str
                )
                atomic_write_text(self.dir / LATEST, tag)
            except Exception as e:  # noqa: BLE001
                error = e
        self._agree_saved(folder, error)
        if rank == 0:
            prune(self.dir, self.run.keep, self.run.keep_every, self.info.get("lineage"), tag)
        self.last_bytes = sum(f["bytes"] for f in files.values())
        dist.barrier()
        return folder

    def _check_space(self, folder: Path) -> None:
        """Fail early, by name, when the disk cannot hold another checkpoint as large as the last
        (rank 0; cheap)."""
        free = free_bytes(self.dir)
        if self.last_bytes and free < self.last_bytes:
            self._fail(folder, OSError(errno.ENOSPC, "not enough free space before saving"))

    def _agree_saved(self, folder: Path, error: Exception | None) -> None:
        """Every rank learns whether every rank wrote its files; if one failed, the partial
        folder is removed, the failure logged, and every rank raises the same named error."""
        errors = [e for e in dist.all_gather(None if error is None else repr(error)) if e]
        if not errors:
            return
        if dist.rank_world()[0] == 0:
            try:
                self._fail(folder, error or OSError(errors[0]), "; ".join(errors))
            except CheckpointError as e:
                failure = e
        else:
            failure = None
        failure = dist.all_gather(failure)[0]
        failure.shared = True
        raise failure

    def _fail(self, folder: Path, error: Exception, detail: str = "") -> None:
        """Remove the partial `folder` (manifest first), log `checkpoint_failed`, raise by name
        (rank 0)."""
        (folder / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        free = free_bytes(self.dir)
        full = no_space(error) or no_space(RuntimeError(detail))
        self.log(
            {
                "event": "checkpoint_failed",
                "tag": folder.name,
                "error": detail or repr(error),
                "free_bytes": free,
                "last_checkpoint_bytes": self.last_bytes,
                "latest": _read_latest(self.dir),
            }
        )
        if full:
            raise CheckpointError(
                f"no space left on device in {self.dir}: {human_bytes(free)} free, the last "
                f"checkpoint took {human_bytes(self.last_bytes)}; free space (or lower run.keep) "
                f"and resume: {_read_latest(self.dir) or 'no checkpoint'} is the latest"
            )
        raise CheckpointError(
            f"could not save checkpoint {folder}: {detail or repr(error)}; "
            f"{_read_latest(self.dir) or 'no checkpoint'} is still the latest"
        )

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


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _read_latest(ckpt_dir: Path) -> str | None:
    try:
        return (Path(ckpt_dir) / LATEST).read_text().strip() or None
    except OSError:
        return None


def prune(
    ckpt_dir: Path, keep: int, keep_every: int = 0, lineage: str | None = None, spare: str = ""
) -> None:
    """Delete all but the newest `keep` complete checkpoints of `lineage` (checkpoints of another
    run are never touched), sparing `spare` (the one just written) and the steps that are
    multiples of `keep_every`."""
    tags = [t for t in complete_tags(ckpt_dir) if lineage_of(Path(ckpt_dir) / t) == lineage]
    for tag in tags[:-keep] if keep > 0 else []:
        step = int(tag.removeprefix("step"))
        if tag == spare or keep_every and step % keep_every == 0:
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
        manifest = {"files": {}, "problem": f"{manifest_path}: unreadable ({e})"}
    if not isinstance(manifest.get("files"), dict) and "problem" not in manifest:
        manifest = {"files": {}, "problem": f"{manifest_path} has no 'files' table"}
    if "problem" in manifest:  # every rank reaches the all_gather below
        problem = manifest["problem"]
        dist.all_gather([])
        return problem
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


def find_resumable(
    ckpt_dir: str | os.PathLike, log=print, lineage: str | None = None
) -> tuple[str, dict] | None:
    """Newest checkpoint of the run that verifies (collective), with its manifest; older ones are
    tried in turn. The run: `lineage` when given (a rollback), else that of the checkpoint
    `latest` names (all checkpoints if it names none that can be read). A folder without a
    manifest (an interrupted save) is skipped with a `checkpoint_rejected` event. None when there
    is no checkpoint; `CheckpointError` when there are some and none verifies."""
    ckpt_dir = Path(ckpt_dir)
    if lineage is None:
        latest = _read_latest(ckpt_dir)
        manifest = read_manifest(ckpt_dir / latest) if latest else None
        lineage = manifest.get("lineage") if manifest else None
        follow = manifest is not None
    else:
        follow = True
    if ckpt_dir.is_dir():
        for folder in sorted(ckpt_dir.glob("step*")):
            if folder.is_dir() and not folder.name.endswith(UNIVERSAL_SUFFIX):
                if not (folder / MANIFEST).exists():
                    reason = f"{folder} has no {MANIFEST} (an interrupted save)"
                    log({"event": "checkpoint_rejected", "tag": folder.name, "reason": reason})
    tags = complete_tags(ckpt_dir)
    if follow:
        tags = [t for t in tags if lineage_of(ckpt_dir / t) == lineage]
    rejected = []
    for tag in reversed(tags):
        problem = verify(ckpt_dir / tag)
        if problem is None:
            return tag, json.loads((ckpt_dir / tag / MANIFEST).read_text())
        log({"event": "checkpoint_rejected", "tag": tag, "reason": problem})
        rejected.append(f"{tag}: {problem}")
    if rejected:
        error = CheckpointError(
            f"every checkpoint in {ckpt_dir} fails verification ({'; '.join(rejected)}); "
            "restore them, or start afresh with run.resume=never (or another run.dir)"
        )
        error.shared = True  # every rank verified the same checkpoints
        raise error
    return None


def check_global_batch(manifest: dict, global_batch: int) -> None:
    """A resumed run keeps its checkpoint's global batch: a new world size with an explicit
    `batch.grad_accum` would silently change it. Checkpoints from before this check was written
    recorded it in their config only when `grad_accum` was explicit."""
    layout = manifest.get("layout", {})
    saved = layout.get("global_batch")
    batch = manifest.get("config", {}).get("batch", {})
    if saved is None and batch.get("grad_accum") and layout.get("dp_size"):
        saved = batch["micro_batch"] * batch["grad_accum"] * layout["dp_size"]
    if saved and saved != global_batch:
        raise CheckpointError(
            f"checkpoint {manifest.get('tag')} was trained with a global batch of {saved} "
            f"sequences (data-parallel size {layout.get('dp_size')}), this job's layout gives "
            f"{global_batch}: set batch.global_batch={saved} and drop batch.grad_accum, so that "
            "the accumulation follows the world size"
        )


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
    ckpt_dir: Path,
    dp_size: int,
    tp_size: int,
    zero_stage: int,
    log=print,
    global_batch: int | None = None,
    check=None,
) -> ResumePoint | None:
    """Where a run continues from (collective): the newest checkpoint that verifies, converted
    once to the universal format if it was saved with another (dp, tp, ZeRO) layout; with
    `global_batch`, one trained with another global batch is refused by name.
    `check(tag, manifest)` may refuse it (raise) before anything is converted or loaded."""
    found = find_resumable(ckpt_dir, log)
    if not found:
        return None
    tag, manifest = found
    if global_batch is not None:
        try:
            check_global_batch(manifest, global_batch)
        except CheckpointError as e:
            e.shared = True  # every rank read the same manifest
            raise
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
