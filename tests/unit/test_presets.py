"""Model presets and run configs: sizes as published, DeepSpeed configs as intended."""

import re

import pytest

from megatrain.cli import dry_run
from megatrain.config import load_cluster, load_config
from megatrain.hardware import ACCELERATORS
from megatrain.memory import memory_per_gpu
from megatrain.parallel import deepspeed_config
from megatrain.plan import plan_run, resolve_batch
from tests.helpers import REPO

RUNS = sorted((REPO / "configs" / "runs").glob("*.yaml"))


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_presets_have_the_size_their_name_says(path):
    info = dry_run(load_config(path), world_size=8)
    size = re.search(r"(\d+(?:\.\d+)?)([mb])$", path.stem)
    expected = float(size.group(1)) * (1e6 if size.group(2) == "m" else 1e9)
    # LLaMA "7B" has 6.74B
    assert abs(info["params"] - expected) / expected < 0.04, f"{path.stem}: {info['params']:,}"
    assert info["tokens_per_step"] == load_config(path).batch.global_tokens
    assert info["flops_per_token"] > 6 * info["non_embedding_params"]


def test_gopher_table_values():
    cfg = load_config(REPO / "configs" / "runs" / "gopher-7.1b.yaml")
    m = cfg.model
    assert (m.n_layer, m.n_head, m.d_model // m.n_head, m.d_model) == (32, 32, 128, 4096)
    assert cfg.optim.lr == 1.2e-4 and cfg.batch.global_tokens == 2 * 2**20


def test_deepspeed_config_fp16_offload_and_zero3():
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "precision=fp16",
            "parallel.zero_stage=3",
            "parallel.offload_optimizer=cpu",
            "parallel.offload_params=cpu",
            "batch.grad_accum=0",
            "batch.global_batch=64",
            "optim.clip=0.5",
        ],
    )
    ds = deepspeed_config(cfg, resolve_batch(cfg, 4))
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }  # loss_scale 0 = dynamic
    assert "bf16" not in ds and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2)
    bf16 = deepspeed_config(
        load_config(REPO / "configs" / "tiny.yaml", ["precision=bf16"]),
        resolve_batch(cfg, 1),
        load_universal=True,
    )
    assert bf16["bf16"] == {"enabled": True} and bf16["checkpoint"] == {"load_universal": True}


def profiles_named(path) -> list[tuple[str, list[str]]]:
    """The cluster profiles a run config names, each with the overrides it says it needs there:
    `cluster: A   # also fits: B; C with key=value key=value (a note)`."""
    line = next(x for x in path.read_text().splitlines() if x.startswith("cluster:"))
    main, _, also = line.removeprefix("cluster:").partition("# also fits:")
    named = [(main.strip(), [])]
    for entry in also.split("(")[0].split(";"):
        profile, _, overrides = entry.strip().partition(" with ")
        if profile:
            named.append((profile, overrides.split()))
    return named


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_every_run_config_fits_the_profiles_it_names(path):
    """On one node of each profile (the least ZeRO sharding), by the arithmetic of
    megatrain.memory.memory_per_gpu."""
    named = profiles_named(path)
    assert len(named) >= 2, f"{path.name} names no other profile than {named}"
    for profile, overrides in named:
        cluster = load_cluster(profile)
        gpu = ACCELERATORS[cluster.accelerator]
        cfg = load_config(path, [f"cluster={profile}", *overrides])
        need = memory_per_gpu(cfg, plan_run(cfg, cluster.gpus_per_node))
        assert need["total"] < gpu.memory_gb, f"{path.name} on {profile} {overrides}: {need}"


def test_the_billion_parameter_configs_do_not_fit_a_v100_as_they_are():
    """micro-batch 8 x 2048 tokens without activation checkpointing: ~50 GB per GPU."""
    for name in ("gpt2-1.3b", "gopher-1.4b"):
        cfg = load_config(REPO / "configs" / "runs" / f"{name}.yaml", ["precision=fp16"])
        need = memory_per_gpu(cfg, plan_run(cfg, 4))["total"]
        assert 40 < need and need > ACCELERATORS["V100-SXM2-32GB"].memory_gb


def test_gpt2_vocabulary_is_padded_to_an_aligned_size():
    info = dry_run(load_config(REPO / "configs" / "runs" / "gpt2-124m.yaml"), world_size=8)
    assert info["vocab_size"] == 50304  # 50,257 rounded up to a multiple of 64


def test_deepspeed_config_turns_off_its_timer_and_accumulates_bf16_gradients_in_fp32():
    for precision, accum in [
        ("bf16", {"grad_accum_dtype": "fp32"}),
        ("fp16", None),
        ("fp32", None),
    ]:
        cfg = load_config(REPO / "configs" / "tiny.yaml", [f"precision={precision}"])
        ds = deepspeed_config(cfg, resolve_batch(cfg, 1))
        assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
        assert ds.get("data_types") == accum
