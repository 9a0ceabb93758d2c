import re

import pytest
import torch

from megatrain.config import ModelConfig
from megatrain.model import TENSOR_PARALLEL_PLAN, Transformer, count_params, flops_per_token
from megatrain.parallel import tensor_parallel_config

GPT2_124M = ModelConfig(
    vocab_size=50257,
    n_layer=12,
    n_head=12,
    d_model=768,
    mlp="gelu",
    norm="layernorm",
    position="learned",
    bias=True,
    tie_embeddings=True,
)


def test_gpt2_small_has_the_published_parameter_count():
    # nanoGPT's GPT-2 124M: 124,439,808 parameters with the 1024-position table
    assert count_params(GPT2_124M, 1024)["params"] == 124_439_808


def test_flops_per_token_follows_the_palm_formula():
    n = count_params(GPT2_124M, 1024)
    expected = 6 * (n["non_embedding_params"] + 50257 * 768) + 12 * 12 * 1024 * 768
    assert flops_per_token(GPT2_124M, 1024) == expected


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {
            "mlp": "gelu",
            "norm": "layernorm",
            "position": "learned",
            "bias": True,
            "tie_embeddings": True,
        },
        {"n_kv_head": 2},
        {"d_ff": 100},
    ],
)
def test_forward_shapes_loss_and_backward(variant):
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, **variant)
    torch.manual_seed(0)
    model = Transformer(cfg, seq_len=16)
    idx = torch.randint(0, 97, (3, 16))
    assert model(idx).shape == (3, 16, 97)
    loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # near-uniform at init
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_attention_is_causal():
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16)
    model = Transformer(cfg, seq_len=8).eval()
    a = torch.randint(0, 50, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 50
    assert torch.allclose(model(a)[0, :5], model(b)[0, :5], atol=1e-6)
    assert not torch.allclose(model(a)[0, 5:], model(b)[0, 5:])


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_the_tensor_parallel_plan_covers_every_linear_layer_of_a_block(mlp):
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, d_model=32, mlp=mlp, bias=True)
    model = Transformer(cfg, 16)
    linears = {n for n, m in model.blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears and linears <= set(TENSOR_PARALLEL_PLAN)
    assert set(TENSOR_PARALLEL_PLAN.values()) == {"column", "row"}
    # the AutoTP rules DeepSpeed gets split exactly those weights, each one way
    rules = tensor_parallel_config(2)["partition_config"]["layer_specs"]
    split = {}
    for name, _ in model.named_parameters():
        kinds = [r["partition_type"] for r in rules for p in r["patterns"] if re.match(p, name)]
        if kinds:
            split[name] = kinds
    expected = {
        f"blocks.{i}.{n}.weight": [TENSOR_PARALLEL_PLAN[n]] for i in range(2) for n in linears
    }
    assert split == expected


def test_residual_branch_outputs_get_the_scaled_init():
    cfg = ModelConfig(vocab_size=64, n_layer=8, n_head=4, d_model=256, init_std=0.02)
    model = Transformer(cfg, 16)
    scaled = 0.02 / (2 * 8) ** 0.5
    for name, p in model.named_parameters():
        if p.dim() == 2 and name.startswith("blocks."):
            row = TENSOR_PARALLEL_PLAN[name.split(".", 2)[2].removesuffix(".weight")] == "row"
            assert p.std().item() == pytest.approx(scaled if row else 0.02, rel=0.1), name
