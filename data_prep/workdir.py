"""Where a prep keeps its intermediate files, and the crash points the resume tests kill it at.

    OUT/.prep.lock               flock: one run at a time writes into OUT (data_prep.launch)
    OUT/.prep-work/plan.json     fingerprint (inputs, recipe, options) and the units of work
    OUT/.prep-work/units/        per unit: docs.arrow (kept text), keys.npz (dedup keys, lengths),
                                 tokens (*.tok) and their lengths (*.len.npy), each committed by
                                 a *.json marker
    OUT/.prep-work/dedup.npz     which documents the global dedup removed
    OUT/.prep-work/shards/       one marker per shard written (its manifest entry)
    OUT/.prep-work/sync/         FileComm's files, one folder per launch
    OUT/.prep-work/progress/     each rank's progress counts (advisory)

Every file is written through megatrain.files.atomic_path (temporary name, fsync, rename); a
marker written last says that a unit's files are whole. A unit with no marker is redone from
scratch. OUT/.prep-work is removed once manifest.json, the dataset's own completion marker, exists.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

from megatrain import files

WORK_DIR = ".prep-work"


class WorkDir:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.root = self.out / WORK_DIR

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def dedup(self) -> Path:
        return self.root / "dedup.npz"

    @property
    def progress(self) -> Path:
        return self.root / "progress"

    def unit(self, index: int, name: str) -> Path:
        return self.root / "units" / f"u{index:06d}.{name}"

    def shard_marker(self, index: int) -> Path:
        return self.root / "shards" / f"shard-{index:05d}.json"

    def sync(self, session: str) -> Path:
        return self.root / "sync" / session

    def make(self) -> None:
        for sub in ("units", "shards", "sync"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)


def write_json(path: Path, obj) -> None:
    """The prep's JSON files (plan, markers, report): sorted keys, indent 1, atomically."""
    files.write_json(path, obj, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------- crash points

_hits: Counter = Counter()


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL at the n-th pass here if MEGATRAIN_PREP_KILL_AT=name:n.

    The resume tests use it to crash at chosen moments for real (no cleanup, no finally).
    """
    spec = os.environ.get("MEGATRAIN_PREP_KILL_AT")
    if not spec:
        return
    _hits[name] += 1
    target, _, count = spec.partition(":")
    if target == name and _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
