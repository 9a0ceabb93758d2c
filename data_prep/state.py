"""What one rank of a prep knows: the options, the recipe, the plan and the results of each
stage so far. `data_prep.pipeline` fills a `PrepState` stage by stage; the per-unit work in
`data_prep.stages` reads it, so no function needs a dozen positional parameters.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from data_prep.comm import Comm
from data_prep.dedup import MinHashConfig, MinHasher
from data_prep.filters import DocFilter
from data_prep.readers import Unit
from data_prep.recipe import Recipe, load_recipe
from data_prep.tokenizer import FastEncoder
from data_prep.workdir import WorkDir
from megatrain.errors import MegatrainError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class PrepError(MegatrainError):
    """The job cannot produce a dataset (no documents, output in use); says what to do."""


@dataclass
class PrepOptions:
    """The `megatrain prep` command line."""

    inputs: list[str]
    """Files, directories or globs of jsonl / txt / parquet (text formats plain, .gz, .zst, .bz2,
    .xz)."""
    out: str
    """The dataset directory to write."""
    recipe: str | None = None
    """A recipe YAML file; None: the default recipe (normalize, exact dedup)."""
    vocab_size: int | None = None
    """Overrides tokenizer.vocab_size."""
    tokenizer: str | None = None
    """Overrides tokenizer.path: an existing tokenizer.json to use instead of training one."""
    text_field: str | None = None
    """Overrides read.text_field."""
    shard_tokens: int | None = None
    """Overrides output.shard_tokens."""
    workers: int = 1
    """Local processes (this one and N-1 children); under MPI or Slurm the ranks are the workers."""
    force: bool = False
    """Replace an existing dataset or unfinished prep in `out`."""
    keep_work: bool = False
    """Keep OUT/.prep-work at the end."""
    tokenizer_sample_chars: int | None = None
    """Overrides tokenizer.sample_chars."""
    seed: int | None = None
    """Overrides the recipe's seed."""


def resolve_recipe(opts: PrepOptions) -> Recipe:
    """The recipe file (or the default one) with the command-line flags applied on top."""
    recipe = load_recipe(opts.recipe)
    for value, section, key in [
        (opts.vocab_size, recipe.tokenizer, "vocab_size"),
        (opts.tokenizer, recipe.tokenizer, "path"),
        (opts.tokenizer_sample_chars, recipe.tokenizer, "sample_chars"),
        (opts.text_field, recipe.read, "text_field"),
        (opts.shard_tokens, recipe.output, "shard_tokens"),
        (opts.seed, recipe, "seed"),
    ]:
        if value is not None:
            setattr(section, key, value)
    return recipe


@dataclass
class StageTimer:
    """Wall-clock seconds per stage, in the order the stages ran (report.json's `seconds`):

    with state.timer("scan"):
        ...
    """

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def quiet(*_) -> None:
    """A log that prints nothing (the ranks other than 0)."""


@dataclass
class PrepState:
    """One rank's view of a prep, filled in stage by stage (the comments say which)."""

    opts: PrepOptions
    recipe: Recipe
    comm: Comm
    log: Callable[[str], None] = print
    """Where rank 0 prints; the other ranks get `quiet` whatever is given."""
    timer: StageTimer = field(default_factory=StageTimer)
    work: WorkDir = field(init=False)
    """OUT and its work directory OUT/.prep-work."""
    # setup
    plan: dict = field(default_factory=dict)
    """plan.json: the fingerprint, the units of work, the recipe, the input size."""
    units: list[Unit] = field(default_factory=list)
    """Every unit of work, in the global order."""
    mine: list[int] = field(default_factory=list)
    """The units this rank scans and tokenizes."""
    # scan
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    """Global id of the first kept document of each unit; offsets[-1] is the number kept."""
    # global dedup
    dedup: dict[str, np.ndarray] = field(default_factory=dict)
    """dedup.npz: exact_drop / exact_of, near_drop / near_of (removed ids, the id each copies)."""
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Sorted global ids of the documents the global dedup removed."""
    # tokenizer
    tok: Tokenizer | None = None
    """The HF tokenizer of OUT/tokenizer.json."""
    encoder: FastEncoder | None = None
    """Encodes with the backend rank 0 chose (the same on every rank)."""
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.uint16))
    """Token id type of the shards."""

    def __post_init__(self) -> None:
        self.work = WorkDir(self.opts.out)
        if self.comm.rank != 0:
            self.log = quiet

    @functools.cached_property
    def filters(self) -> list[DocFilter]:
        """The recipe's filters, built once per rank (the language filter loads models)."""
        return self.recipe.build_filters()

    @functools.cached_property
    def hasher(self) -> MinHasher | None:
        """MinHash for near dedup, or None when the recipe has it off."""
        near = self.recipe.dedup.near
        if not near.enabled:
            return None
        return MinHasher(MinHashConfig(near.shingle_size, near.bands, near.rows, near.seed))
