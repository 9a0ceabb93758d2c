import pytest
import torch

from megatrain.config import ModelConfig
from megatrain.model import Transformer, count_params, flops_per_token

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
