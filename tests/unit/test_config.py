import dataclasses
import typing

import pytest

from megatrain.config import (
    Config,
    ConfigError,
    apply_override,
    config_reference,
    field_docs,
    load_cluster,
    load_config,
)
from megatrain.plan import resolve_batch
from tests.helpers import REPO

TINY = REPO / "configs" / "tiny.yaml"


def test_tiny_config_loads_with_preset_merged():
    cfg = load_config(TINY)
    assert cfg.model.n_layer == 4 and cfg.model.d_model == 128  # from configs/models/tiny.yaml
    assert cfg.parallel.zero_stage == 2 and cfg.precision == "fp32"
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 3e-3


def test_unknown_key_names_key_and_closest_valid_one():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["optim.learning_rate=1e-3"])
    assert "'optim.learning_rate'" in str(e.value)
    with pytest.raises(
        ConfigError, match=r"unknown key 'run.max_step'; did you mean 'run.max_steps'\?"
    ):
        load_config(TINY, ["run.max_step=3"])
    with pytest.raises(ConfigError, match="did you mean 'parallel'"):
        load_config(TINY, ["paralel.zero_stage=1"])


def test_mistyped_values_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="'run.max_steps' should be a whole number"):
        load_config(TINY, ["run.max_steps=2.5"])
    with pytest.raises(ConfigError, match="'batch.micro_batch' should be a number"):
        load_config(TINY, ["batch.micro_batch=eight"])
    with pytest.raises(
        ConfigError, match=r"'precision' = 'bf61' is not one of .*did you mean 'bf16'"
    ):
        load_config(TINY, ["precision=bf61"])
    with pytest.raises(
        ConfigError, match="'parallel.activation_checkpointing' should be true or false"
    ):
        load_config(TINY, ["parallel.activation_checkpointing=3"])


def test_cross_field_checks_name_the_key():
    with pytest.raises(ConfigError, match="'model.d_model' .* divisible by 'model.n_head'"):
        load_config(TINY, ["model.n_head=5"])
    with pytest.raises(
        ConfigError, match="'parallel.offload_params' needs 'parallel.zero_stage: 3'"
    ):
        load_config(TINY, ["parallel.offload_params=cpu"])
    # ZeRO-Offload moves ZeRO's optimizer partitions: without ZeRO there are none (and the
    # trainer's non-finite skip would have no optimizer to tell)
    with pytest.raises(
        ConfigError, match="'parallel.offload_optimizer' needs 'parallel.zero_stage'"
    ):
        load_config(TINY, ["parallel.offload_optimizer=cpu", "parallel.zero_stage=0"])
    load_config(TINY, ["parallel.offload_optimizer=cpu", "parallel.zero_stage=1"])
    # DeepSpeed's mixed precision without ZeRO is per-parameter and unfused, with half-precision
    # gradient accumulation (and a skipped step armed a flag that ate the next good update)
    for precision in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match="use parallel.zero_stage=1"):
            load_config(TINY, [f"precision={precision}", "parallel.zero_stage=0"])
    load_config(TINY, ["precision=fp32", "parallel.zero_stage=0"])
    with pytest.raises(ConfigError, match="no models preset 'tiyn'.*did you mean 'tiny'"):
        load_config(TINY, ["model.preset=tiyn"])


def test_overrides_parse_yaml_values_and_list_indices():
    tree = {"data": {"sources": [{"path": "a"}]}}
    apply_override(tree, "data.sources.0.path=b")
    apply_override(tree, "data.sources.1.path=c")
    apply_override(tree, "optim.lr=6e-4")
    assert tree["data"]["sources"] == [{"path": "b"}, {"path": "c"}]
    cfg = load_config(TINY, ["data.sources.1.path=x", "data.sources.1.weight=3", "optim.lr=6e-4"])
    assert [s.weight for s in cfg.data.sources] == [1.0, 3.0] and cfg.optim.lr == 6e-4
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_override({}, "optim.lr")


def test_batch_layout_from_global_batch_or_accumulation():
    cfg = load_config(TINY, ["batch.grad_accum=0", "batch.global_batch=64", "batch.micro_batch=4"])
    assert dataclasses.astuple(resolve_batch(cfg, 2)) == (4, 8, 2, 128)
    assert resolve_batch(cfg, 4).grad_accum == 4
    with pytest.raises(ConfigError, match="not divisible by micro_batch 4 x 3 data-parallel ranks"):
        resolve_batch(cfg, 3)
    cfg = load_config(
        TINY, ["batch.grad_accum=0", "batch.global_tokens=4096", "batch.micro_batch=8"]
    )
    assert (
        resolve_batch(cfg, 2).global_batch == 32 and resolve_batch(cfg, 2).tokens_per_step == 4096
    )


def test_every_field_is_documented_and_the_reference_renders():
    def walk(cls):
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            tp = hints[f.name]
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
            if dataclasses.is_dataclass(inner):
                walk(inner)

    walk(Config)
    ref = config_reference()
    assert "| `optim.lr` | `float` | `0.0006` |" in ref and "`data.sources[].weight`" in ref


def test_cluster_profiles_load():
    local = load_cluster("local")
    assert local.pue >= 1.0 and local.carbon_intensity_g_per_kwh > 0
    with pytest.raises(ConfigError, match="no clusters preset"):
        load_cluster("no-such-cluster")
