"""Every number of the run config has a documented valid range, checked at load; a config path
that is no YAML file, and an override without `=`, are named errors of the real CLI."""

import dataclasses
import subprocess
import sys
import typing

import pytest

from megatrain.config import RANGES, ClusterProfile, Config, ConfigError, load_cluster, load_config
from megatrain.data import PackedSamples
from megatrain.shards import Dataset
from tests.helpers import REPO

TINY = REPO / "configs" / "tiny.yaml"

# (override, words the error must hold): one or more per range family
OUT_OF_RANGE = [
    # counts and cadences: at least 1
    ("run.log_every=0", "'run.log_every' = 0: must be >= 1"),
    ("run.eval_batches=0", "'run.eval_batches' = 0: must be >= 1"),
    ("batch.micro_batch=0", "'batch.micro_batch' = 0: must be >= 1"),
    ("model.n_layer=0", "'model.n_layer' = 0: must be >= 1"),
    ("model.n_head=0", "'model.n_head' = 0: must be >= 1"),
    ("model.d_model=0", "'model.d_model' = 0: must be >= 1"),
    ("parallel.tensor=0", "'parallel.tensor' = 0: must be >= 1"),
    ("guard.spike_window=0", "'guard.spike_window' = 0: must be >= 1"),
    ("run.straggler_intervals=0", "'run.straggler_intervals' = 0: must be >= 1"),
    ("data.prefetch=0", "'data.prefetch' = 0: must be >= 1"),
    ("data.seq_len=1", "'data.seq_len' = 1: must be >= 2"),
    # counts where 0 means "none", "derive it" or "all": at least 0
    ("run.eval_every=-1", "'run.eval_every' = -1: must be >= 0"),
    ("run.ckpt_every=-2", "'run.ckpt_every' = -2: must be >= 0"),
    ("run.keep=-1", "'run.keep' = -1: must be >= 0"),
    ("run.keep_every=-1", "'run.keep_every' = -1: must be >= 0"),
    ("run.max_steps=-5", "'run.max_steps' = -5: must be >= 0"),
    ("run.max_tokens=-1", "'run.max_tokens' = -1.0: must be a finite number >= 0"),
    ("run.stop_at_step=-1", "'run.stop_at_step' = -1: must be >= 0"),
    ("run.seed=-1", "'run.seed' = -1: must be >= 0"),
    ("batch.grad_accum=-1", "'batch.grad_accum' = -1: must be >= 0"),
    ("batch.global_batch=-16", "'batch.global_batch' = -16: must be >= 0"),
    ("batch.global_tokens=-1", "'batch.global_tokens' = -1: must be >= 0"),
    ("optim.warmup_steps=-10", "'optim.warmup_steps' = -10: must be >= 0"),
    ("guard.max_bad_steps=-1", "'guard.max_bad_steps' = -1: must be >= 0"),
    ("guard.max_rollbacks=-1", "'guard.max_rollbacks' = -1: must be >= 0"),
    ("model.vocab_size=-1", "'model.vocab_size' = -1: must be >= 0"),
    # positive reals, finite
    ("optim.lr=inf", "'optim.lr' = inf: must be a finite number > 0"),
    ("optim.lr=.nan", "'optim.lr' = nan: must be a finite number > 0"),
    ("optim.lr=0", "'optim.lr' = 0.0: must be a finite number > 0"),
    ("optim.lr=-1e-3", "'optim.lr' = -0.001: must be a finite number > 0"),
    ("optim.eps=0", "'optim.eps' = 0.0: must be a finite number > 0"),
    ("model.init_std=-1", "'model.init_std' = -1.0: must be a finite number > 0"),
    ("data.sources.0.weight=0", "'data.sources.0.weight' = 0.0: must be a finite number > 0"),
    # non-negative reals, finite
    ("optim.min_lr=-1", "'optim.min_lr' = -1.0: must be a finite number >= 0"),
    ("optim.min_lr=.nan", "'optim.min_lr' = nan: must be a finite number >= 0"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay' = -0.1: must be a finite number >= 0"),
    ("optim.clip=-1", "'optim.clip' = -1.0: must be a finite number >= 0"),
    ("guard.spike_zscore=-1", "'guard.spike_zscore' = -1.0: must be a finite number >= 0"),
    ("run.straggler_factor=-1", "'run.straggler_factor' = -1.0: must be a finite number >= 0"),
    # fractions in [0, 1)
    ("model.dropout=2", "'model.dropout' = 2.0: must be a finite number in [0, 1)"),
    ("model.dropout=-0.1", "'model.dropout' = -0.1: must be a finite number in [0, 1)"),
    ("optim.beta1=1", "'optim.beta1' = 1.0: must be a finite number in [0, 1)"),
    ("optim.beta2=-0.1", "'optim.beta2' = -0.1: must be a finite number in [0, 1)"),
    ("data.val_fraction=1", "'data.val_fraction' = 1.0: must be a finite number in [0, 1)"),
    # a closed set of integers
    ("parallel.zero_stage=4", "'parallel.zero_stage' = 4: must be in [0, 3]"),
]


@pytest.mark.parametrize("override, words", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_refused_at_load_by_key_value_and_range(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert words in str(e.value)


def numeric_fields(cls: type, prefix: str = ""):
    """(dataclass, field, dotted key) of every int and float field below `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        inner = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, key + ".")
        elif typing.get_origin(tp) is list and inner and dataclasses.is_dataclass(inner[0]):
            yield from numeric_fields(inner[0], key + ".N.")
        elif tp in (int, float):
            yield cls, f.name, key


def test_every_number_has_a_range_and_the_reference_shows_it():
    from megatrain.config import config_reference

    fields = [*numeric_fields(Config), *numeric_fields(ClusterProfile, "clusters.")]
    missing = [key for cls, name, key in fields if name not in RANGES.get(cls, {})]
    assert not missing, f"numbers without a valid range in config.RANGES: {missing}"
    reference = config_reference()
    assert "| `run.log_every` | `int` | `10` | Steps between metrics lines. Valid: >= 1. |" in (
        reference
    )
    assert "Valid: > 0." in reference and "Valid: in [0, 1)." in reference
    # the ends of the ranges are valid (0: keep all checkpoints, evaluate only at the end, ...)
    for edge in ("run.keep=0", "run.eval_every=0", "model.dropout=0", "data.val_fraction=0"):
        load_config(TINY, [edge])


def test_cluster_profile_numbers_are_checked_and_name_the_file(tmp_path):
    path = tmp_path / "dc.yaml"
    path.write_text("accelerator: cpu\npue: 0.8\n")
    with pytest.raises(ConfigError, match=r"dc.yaml: 'pue' = 0.8: must be a finite number >= 1"):
        load_cluster(str(path))


def test_seq_len_longer_than_the_data_is_named(tiny_dataset):
    with pytest.raises(ConfigError, match="'data.seq_len' = 10000000 is too long for .*data"):
        PackedSamples(Dataset(tiny_dataset), 10_000_000, 0.005, seed=0)


def cli_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatrain.cli", "train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = out.stderr.splitlines()
    return line


def test_a_directory_or_non_utf8_config_is_a_named_error(tmp_path):
    assert one_error_line(cli_train(str(tmp_path))) == (
        f"megatrain train: error: {tmp_path} is a directory; give the path of a YAML file"
    )
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run: {name: 'café'}\n".encode("latin-1"))
    line = one_error_line(cli_train(str(latin1)))
    assert f"{latin1}: not UTF-8 text" in line and "save the config as UTF-8" in line


def test_an_override_without_equals_is_named_alone():
    # after an option, argparse hands the overrides over unparsed: only the bad one is named
    line = one_error_line(
        cli_train("configs/tiny.yaml", "--nproc", "2", "run.max_steps", "run.log_every=5")
    )
    assert line == "megatrain train: error: override 'run.max_steps' is not of the form key=value"
