"""Tensor parallelism composed with ZeRO on CPU/gloo: tp=2 and tp=2 x dp=2 match tp=1,
checkpoints move between layouts, and uneven splits are refused by name."""

import pytest

from megatrain.config import ConfigError, load_config
from megatrain.plan import validate_tensor_parallel
from tests.distributed.test_trainer import base, events, losses
from tests.helpers import REPO, read_jsonl, run_train

TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """tp=1 on 2 processes (ZeRO-1): the losses every layout must reproduce."""
    run_dir = tmp_path_factory.mktemp("tp") / "tp1"
    run_train(TINY, base(tiny_dataset, run_dir, **{"parallel.zero_stage": 1, "run.max_steps": 8}))
    return losses(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
@pytest.mark.parametrize("nproc", [2, 4], ids=["tp2", "tp2xdp2"])
def test_tensor_parallel_matches_tp1(tiny_dataset, tmp_path, reference, zero_stage, nproc):
    run_dir = tmp_path / "run"
    run_train(
        TINY,
        base(
            tiny_dataset,
            run_dir,
            **{"parallel.zero_stage": zero_stage, "parallel.tensor": 2, "run.max_steps": 8},
        ),
        nproc=nproc,
    )
    got = losses(run_dir)
    diffs = [abs(got[s] - reference[s]) for s in reference]
    assert max(diffs) < 1e-5, (
        f"tp=2 on {nproc} processes, ZeRO-{zero_stage}: up to {max(diffs):.2e} from tp=1"
    )
    memory = events(run_dir, "parameter_memory")[0]["gb_per_rank"]
    full = read_jsonl(run_dir / "metrics.jsonl")[-1]["param_mem_gb"]
    assert len(memory) == nproc and full == max(memory)
    if (
        zero_stage < 3
    ):  # each rank holds half of every split matrix (embeddings and head stay whole)
        assert max(memory) < 0.9 * reference_param_gb(tiny_dataset, tmp_path)


def reference_param_gb(tiny_dataset, tmp_path):
    from megatrain.model import count_params

    cfg = load_config(
        TINY, [f"data.sources.0.path={tiny_dataset}", "data.seq_len=64", "model.vocab_size=512"]
    )
    return count_params(cfg.model, 64)["params"] * 4 / 2**30


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_checkpoints_move_between_tensor_parallel_layouts(
    tiny_dataset, tmp_path, reference, first, second
):
    run_dir = tmp_path / f"tp{first}to{second}"
    args = base(tiny_dataset, run_dir, **{"parallel.zero_stage": 1, "run.max_steps": 8})
    run_train(TINY, args + [f"parallel.tensor={first}", "run.stop_at_step=4"])
    run_train(TINY, args + [f"parallel.tensor={second}"])
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    assert max(abs(got[s] - reference[s]) for s in reference) < 1e-5
    resumed = events(run_dir, "resumed")[0]
    assert resumed["universal"] and resumed["step"] == 4 and resumed["consumed_samples"] == 4 * 16


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.n_head=2", "model.n_head"),
        ("model.d_ff=102", "model.d_ff"),
    ],
)
def test_uneven_splits_are_refused_by_name(override, key):
    cfg = load_config(TINY, ["parallel.tensor=4", "model.d_model=128", override])
    with pytest.raises(ConfigError, match=f"'{key}' .* not divisible by 'parallel.tensor' \\(4\\)"):
        validate_tensor_parallel(cfg, world_size=8, local_world_size=4)


def test_tensor_groups_must_not_span_nodes_or_exceed_the_world():
    cfg = load_config(TINY, ["parallel.tensor=4"])
    with pytest.raises(ConfigError, match="would span nodes"):
        validate_tensor_parallel(cfg, world_size=8, local_world_size=2)
    with pytest.raises(
        ConfigError, match=r"'parallel.tensor' \(4\) must divide the number of processes \(6\)"
    ):
        validate_tensor_parallel(cfg, world_size=6, local_world_size=6)
    validate_tensor_parallel(cfg, world_size=8, local_world_size=4)
