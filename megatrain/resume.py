"""What a resume may find changed since its checkpoint (pure: dicts in, changes out).

Every checkpoint records the resolved config and, per data source, the tokenizer's sha256 and
a fingerprint of the data (`data_identity`). On resume the trainer compares them with its own:

    checked, refused unless `run.allow_changes` names them:
        data (sources, their contents, their weights), tokenizer, optim.*, batch.*, run.seed,
        data.seq_len, data.val_fraction, model.dropout
    checked, never allowed: the model's shape (model.*), precision
    not checked (meant to change between jobs): run.* other than the seed, eval and checkpoint
        cadence, wandb.*, guard.*, cluster, parallel.* (a layout change goes through the
        universal conversion), data.verify_checksums, data.prefetch

A data directory that moved but holds the same data is no change: sources are compared by
fingerprint, not by path. A checkpoint written before these records resumes unchecked (the
trainer logs that it could not compare).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from megatrain.config import RESUMABLE_CHANGES
from megatrain.errors import MegatrainError

CHECKED = (
    "model.",
    "optim.",
    "batch.",
    "data.seq_len",
    "data.val_fraction",
    "precision",
    "run.seed",
)
# Model fields that do not describe the trained weights: where it started, how it was set up.
NOT_CHECKED = {"model.init_from", "model.preset", "model.init_std", "model.vocab_multiple"}


class ResumeError(MegatrainError):
    """The run directory's checkpoint was made by a run this config does not continue."""


@dataclass
class Change:
    key: str
    """A config key, or `data` / `tokenizer`."""
    old: Any
    new: Any

    @property
    def allowed_by(self) -> str | None:
        """The `run.allow_changes` name that allows it most narrowly; None: never allowed."""
        return self.key if self.key in RESUMABLE_CHANGES else None

    def allowed(self, allow: list[str]) -> bool:
        return self.allowed_by is not None and any(
            self.key == name or self.key.startswith(name + ".") for name in allow
        )

    def __str__(self) -> str:
        return f"{self.key} {self.old} -> {self.new}"


def fingerprint(shard_sha256s: list[str]) -> str:
    """One hash of a dataset's contents: its shards' sha256s, in order."""
    return hashlib.sha256("\n".join(shard_sha256s).encode()).hexdigest()


def data_identity(sources: list[tuple[str, float, Any]]) -> list[dict]:
    """What a checkpoint records of each data source: (path, weight, shards.Manifest) ->
    path, weight, tokenizer sha256, data fingerprint, tokens."""
    return [
        {
            "path": str(path),
            "weight": weight,
            "tokenizer_sha256": manifest.tokenizer_sha256,
            "fingerprint": fingerprint([s.sha256 for s in manifest.shards]),
            "num_tokens": manifest.num_tokens,
        }
        for path, weight, manifest in sources
    ]


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _describe(data: list[dict]) -> str:
    items = [
        f"{d['path']} ({d['fingerprint'][:12]}, {d['num_tokens']:,} tokens, weight {d['weight']})"
        for d in data
    ]
    return "[" + ", ".join(items) + "]"


def changes(saved: dict, current: dict) -> list[Change]:
    """The checked differences between a checkpoint's manifest (`config`, `data`) and the
    current run's (same keys); keys one side lacks (an older or newer megatrain) are skipped."""
    old, new = _flat(saved.get("config", {})), _flat(current["config"])
    found = [
        Change(key, old[key], new[key])
        for key in sorted(old.keys() & new.keys())
        if key.startswith(CHECKED) and key not in NOT_CHECKED and old[key] != new[key]
    ]
    if "data" in saved:
        was, now = saved["data"], current["data"]
        tokenizers = [sorted({d["tokenizer_sha256"][:12] for d in x}) for x in (was, now)]
        if tokenizers[0] != tokenizers[1]:
            found.append(Change("tokenizer", ",".join(tokenizers[0]), ",".join(tokenizers[1])))
        same = [(d["fingerprint"], d["weight"]) for d in was] == [
            (d["fingerprint"], d["weight"]) for d in now
        ]
        if not same:
            found.append(Change("data", _describe(was), _describe(now)))
    return found


def check_resume(saved: dict, current: dict, allow: list[str], where: str) -> list[Change]:
    """The changes a resume from `where` (a checkpoint) may go on with, or `ResumeError`: one
    line saying what changed and what to do."""
    found = changes(saved, current)
    never = [c for c in found if c.allowed_by is None]
    refused = [c for c in found if c.allowed_by is not None and not c.allowed(allow)]
    if never:
        raise ResumeError(
            f"cannot resume from {where}: {'; '.join(map(str, never))}; the model's shape and "
            "the precision stay fixed within a run: start a new run.dir (to start from this run's "
            "weights: megatrain export, then model.init_from)"
        )
    if refused:
        names = sorted({c.allowed_by for c in refused if c.allowed_by})
        raise ResumeError(
            f"cannot resume from {where}: {'; '.join(map(str, refused))}; start a new run.dir, "
            f"or continue this run with the change: run.allow_changes=[{','.join(names)}]"
        )
    return found


def resume_event(found: list[Change], tag: str, allow: list[str]) -> dict:
    """The `resume_changes` event: what changed, and the override that allowed it."""
    items = [{"key": c.key, "old": c.old, "new": c.new} for c in found]
    return {"event": "resume_changes", "tag": tag, "changes": items, "allowed": list(allow)}
