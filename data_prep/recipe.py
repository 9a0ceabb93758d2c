"""A prep recipe: which stages run and with which thresholds (YAML, see configs/data/).

    read:      {text_field: text, txt_split: file, max_doc_chars: 10000000, unit_mb: 256}
    normalize: true
    filters:   [{name: length, min_chars: 200}, {name: quality}, {name: repetition},
                {name: language, languages: [en, fr], min_confidence: 0.65}]
    dedup:     {exact: true, near: {enabled: true, shingle_size: 5, bands: 14, rows: 8}}
    tokenizer: {vocab_size: 32000, path: null, sample_chars: 200000000}
    output:    {shard_tokens: 50000000}
    report:    {reject_samples: 100}

Every key is optional; an unknown key stops with its name and the closest valid one. Filter
thresholds are the fields of the filter classes in data_prep.filters. Command-line flags
(--vocab-size, --tokenizer, --text-field, --shard-tokens) override the recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.filters import FILTERS, build_filter
from data_prep.tokenizer import EOS
from megatrain.schema import ConfigError, from_dict, read_yaml


@dataclass
class ReadConfig:
    text_field: str = "text"
    """JSON field / parquet column that holds the text."""
    txt_split: str = "file"
    """Plain-text files: `file` (one document per file) or `paragraph` (blocks between blank
    lines)."""
    max_doc_chars: int = 10_000_000
    """A longer document is rejected (counted with its file:line), never held whole in memory."""
    unit_mb: float = 256
    """Plain jsonl and parquet files bigger than this are cut into units of work of this size."""


@dataclass
class NearDedupConfig:
    enabled: bool = False
    """MinHash + LSH near-duplicate removal across the whole dataset."""
    shingle_size: int = 5
    """Words per shingle."""
    bands: int = 14
    """LSH bands; with `rows`, the threshold is about (1/bands)^(1/rows) Jaccard (0.72 by
    default)."""
    rows: int = 8
    """Hashes per band; the number of permutations is bands * rows."""
    num_perm: int = 0
    """Optional: number of permutations; if set, rows = num_perm / bands."""
    seed: int = 0
    """Seed of the MinHash functions."""


@dataclass
class DedupConfig:
    exact: bool = True
    """Remove documents whose normalized text is identical to an earlier one, across the whole
    dataset."""
    near: NearDedupConfig = field(default_factory=NearDedupConfig)


@dataclass
class TokenizerConfig:
    vocab_size: int = 32_000
    """Size of the byte-level BPE trained on a sample of the kept documents."""
    path: str | None = None
    """An existing tokenizer.json to use instead of training one."""
    special_tokens: list[str] = field(default_factory=lambda: [EOS])
    """Special tokens of a trained tokenizer; <|endoftext|> (id 0) always comes first and ends
    every document."""
    sample_chars: int = 200_000_000
    """Characters of text (a seeded sample of the kept documents) to train the BPE on."""
    min_frequency: int = 2
    """A pair must occur this often to become a merge."""


@dataclass
class OutputConfig:
    shard_tokens: int = 50_000_000
    """A shard is closed once it holds at least this many tokens."""


@dataclass
class ReportConfig:
    reject_samples: int = 100
    """Removed documents kept per filter / dedup stage in DIR/rejects/*.jsonl, for audit."""
    sample_chars: int = 500
    """Characters of each removed document kept in the rejects samples."""


@dataclass
class Recipe:
    read: ReadConfig = field(default_factory=ReadConfig)
    normalize: bool = True
    """Unicode NFC, control characters, whitespace (data_prep.filters.normalize)."""
    filters: list[dict] = field(default_factory=list)
    """Filters in order (cheap ones first): {name: length|quality|repetition|language,
    ...thresholds}."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    seed: int = 0
    """Seed of the tokenizer's training sample."""

    def build_filters(self) -> list:
        return [build_filter(spec) for spec in self.filters]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_recipe(raw: dict | None, where: str = "recipe") -> Recipe:
    raw = dict(raw or {})
    dedup = raw.get("dedup")
    if isinstance(dedup, dict) and isinstance(
        dedup.get("near"), bool
    ):  # `near: true` is short for enabled
        raw["dedup"] = {**dedup, "near": {"enabled": dedup["near"]}}
    try:
        recipe = from_dict(Recipe, raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    for i, spec in enumerate(recipe.filters):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{where}: filters[{i}] needs a 'name' (one of {', '.join(FILTERS)})")
        try:
            build_filter(spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: filters[{i}] ({spec['name']}): {e}") from None
    near = recipe.dedup.near
    if near.num_perm:
        if near.num_perm % near.bands:
            raise ConfigError(
                f"{where}: dedup.near.num_perm {near.num_perm} is not a multiple of bands "
                f"{near.bands}"
            )
        near.rows = near.num_perm // near.bands
    if recipe.read.txt_split not in ("file", "paragraph"):
        raise ConfigError(
            f"{where}: read.txt_split must be 'file' or 'paragraph', not {recipe.read.txt_split!r}"
        )
    if EOS not in recipe.tokenizer.special_tokens:
        recipe.tokenizer.special_tokens.insert(0, EOS)
    for name, value in [
        ("tokenizer.vocab_size", recipe.tokenizer.vocab_size),
        ("output.shard_tokens", recipe.output.shard_tokens),
        ("read.unit_mb", recipe.read.unit_mb),
    ]:
        if value <= 0:
            raise ConfigError(f"{where}: {name} must be positive, got {value}")
    return recipe


def load_recipe(path: str | Path | None) -> Recipe:
    """The recipe in a YAML file, or the default recipe (normalize + exact dedup) for None."""
    if path is None:
        return parse_recipe({})
    return parse_recipe(read_yaml(path), str(path))
