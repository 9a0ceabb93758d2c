"""megatrain's transformer in Hugging Face's terms, both ways: `LlamaForCausalLM` and
`GPT2LMHeadModel` (the two families the model's switches reproduce), tensor by tensor.

    LLaMA-style (RMSNorm, rotary, SwiGLU)      <-> LlamaForCausalLM (GQA, biases, tied or not)
    GPT-2-style (LayerNorm, learned positions,  <-> GPT2LMHeadModel (fused qkv, Conv1D layout:
                 GELU, biases)                       weights stored transposed)

Rotary layouts differ: megatrain rotates interleaved (even, odd) feature pairs of each head, HF
Llama rotates the first half against the second. Reordering each head's rows of q and k to
(evens, odds) makes one the other (the attention scores are unchanged, since q and k move
together); the import applies the inverse order. Nothing here needs `transformers` itself:
config.json is written and read as JSON, weights as safetensors.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from megatrain.config import ConfigError, ModelConfig, validate
from megatrain.errors import MegatrainError, need
from megatrain.model import mlp_hidden_size


class ConversionError(MegatrainError):
    """A model Hugging Face's classes cannot express, or a directory that is not one we read."""


# The switches each family fixes; anything else does not map.
FAMILIES = {
    "llama": {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu"},
    "gpt2": {"norm": "layernorm", "position": "learned", "mlp": "gelu", "bias": True},
}


def family(m: ModelConfig) -> str:
    """ "llama" or "gpt2" for a model config, or a named error listing what does not map."""
    for name, switches in FAMILIES.items():
        if all(getattr(m, k) == v for k, v in switches.items()):
            if name == "gpt2" and (m.n_kv_head or m.n_head) != m.n_head:
                raise ConversionError(
                    "a GPT-2-style model with grouped-query attention (model.n_kv_head) has no "
                    "Hugging Face class: GPT2LMHeadModel has one key/value head per query head"
                )
            return name
    close = min(FAMILIES, key=lambda f: sum(getattr(m, k) != v for k, v in FAMILIES[f].items()))
    wrong = [f"model.{k}={getattr(m, k)} (it needs {v})" for k, v in FAMILIES[close].items()
             if getattr(m, k) != v]  # fmt: skip
    raise ConversionError(
        "neither LlamaForCausalLM nor GPT2LMHeadModel can express this model; closest is "
        f"{close}, but " + ", ".join(wrong)
    )


def rotary_order(head_dim: int, heads: int) -> torch.Tensor:
    """Row order that turns megatrain's interleaved rotary pairs into HF's halves, per head."""
    one = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return torch.cat([one + h * head_dim for h in range(heads)])


# ----------------------------------------------------------------------------- config.json


def hf_config(m: ModelConfig, seq_len: int, eos_id: int, dtype: str, extra: dict) -> dict:
    """config.json for model `m` (its HF family), with `extra` (provenance) under "megatrain"."""
    common = {
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": dtype,
        "dtype": dtype,
        "megatrain": extra,
    }
    if family(m) == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": m.d_model,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_inner": mlp_hidden_size(m),
            "n_positions": seq_len,
            "n_ctx": seq_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.d_model,
        "intermediate_size": mlp_hidden_size(m),
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_kv_head or m.n_head,
        "head_dim": m.d_model // m.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # transformers 4
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},  # 5
        "attention_bias": m.bias,
        "mlp_bias": m.bias,
        "attention_dropout": 0.0,
        **common,
    }


def model_config_from_hf(hf_dir: str | Path) -> tuple[ModelConfig, int]:
    """(ModelConfig, context length) of a local LlamaForCausalLM or GPT2LMHeadModel directory."""
    path = Path(hf_dir) / "config.json"
    try:
        c = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not a Hugging Face model directory ({e})") from None
    kind = c.get("model_type")
    if kind == "llama":
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConversionError(f"{path}: rope scaling {rope} is not supported (plain rotary)")
        heads, width = c["num_attention_heads"], c["hidden_size"]
        if c.get("head_dim", width // heads) != width // heads:
            raise ConversionError(f"{path}: head_dim {c['head_dim']} != hidden_size / heads")
        if c.get("attention_bias", False) != c.get("mlp_bias", False):
            raise ConversionError(f"{path}: attention_bias and mlp_bias differ")
        if c.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"{path}: hidden_act {c['hidden_act']!r}, not silu")
        m = ModelConfig(
            vocab_size=c["vocab_size"], vocab_multiple=1, n_layer=c["num_hidden_layers"],
            n_head=heads, n_kv_head=c.get("num_key_value_heads", heads), d_model=width,
            d_ff=c["intermediate_size"], mlp="swiglu", norm="rmsnorm",
            norm_eps=c.get("rms_norm_eps", 1e-6), position="rope",
            rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            bias=c.get("attention_bias", False),
            tie_embeddings=c.get("tie_word_embeddings", False),
        )  # fmt: skip
        return m, c.get("max_position_embeddings", 2048)
    if kind == "gpt2":
        if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConversionError(f"{path}: activation {c['activation_function']!r}, not gelu_new")
        m = ModelConfig(
            vocab_size=c["vocab_size"], vocab_multiple=1, n_layer=c["n_layer"],
            n_head=c["n_head"], d_model=c["n_embd"], d_ff=c.get("n_inner") or 4 * c["n_embd"],
            mlp="gelu", norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5),
            position="learned", bias=True, tie_embeddings=c.get("tie_word_embeddings", True),
        )  # fmt: skip
        return m, c.get("n_positions", 1024)
    raise ConversionError(
        f"{path}: model_type {kind!r}; megatrain reads LlamaForCausalLM ('llama') and "
        "GPT2LMHeadModel ('gpt2') directories"
    )


# ----------------------------------------------------------------------------- weights


def to_hf(m: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]):
    """megatrain (name, tensor) pairs -> HF ones, streaming (GPT-2 holds one layer's q, k, v)."""
    head_dim = m.d_model // m.n_head
    gpt2 = family(m) == "gpt2"
    pending: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        if name == "lm_head.weight" and m.tie_embeddings:
            continue  # the embedding's
        if not gpt2:
            if name.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
                t = t[rotary_order(head_dim, m.n_head)]
            elif name.endswith(("attn.k_proj.weight", "attn.k_proj.bias")):
                t = t[rotary_order(head_dim, m.n_kv_head or m.n_head)]
            yield _llama_name(name), t
            continue
        parts = name.split(".")
        if parts[-2] in ("q_proj", "k_proj", "v_proj"):  # fused into c_attn once all three are in
            pending[name] = t
            base = ".".join(parts[:-2])
            keys = [f"{base}.{p}.{parts[-1]}" for p in ("q_proj", "k_proj", "v_proj")]
            if all(k in pending for k in keys):
                fused = torch.cat([pending.pop(k) for k in keys], dim=0)
                yield _gpt2_name(f"{base}.qkv.{parts[-1]}"), _conv1d(fused)
            continue
        yield _gpt2_name(name), _conv1d(t) if _is_linear_weight(name) else t


def from_hf(m: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]):
    """HF (name, tensor) pairs -> megatrain ones, the inverse of `to_hf`."""
    head_dim = m.d_model // m.n_head
    gpt2 = family(m) == "gpt2"
    inverse = {}
    for name, t in tensors:
        if gpt2:
            if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
                continue  # old GPT-2 checkpoints store the causal mask
            ours = _from_gpt2_name(name)
            if ".qkv." in ours:
                t = _conv1d(t) if ours.endswith(".weight") else t
                for p, piece in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    yield ours.replace(".qkv.", f".{p}."), piece.contiguous()
                continue
            yield ours, _conv1d(t) if _is_linear_weight(ours) else t
            continue
        ours = _from_llama_name(name)
        if ".attn.q_proj." in ours or ".attn.k_proj." in ours:
            heads = m.n_head if ".q_proj." in ours else (m.n_kv_head or m.n_head)
            order = inverse.setdefault(heads, torch.argsort(rotary_order(head_dim, heads)))
            t = t[order]
        yield ours, t


def _is_linear_weight(name: str) -> bool:
    return name.endswith("_proj.weight")


def _conv1d(t: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D stores a linear layer's weight transposed ([in, out])."""
    return t.t().contiguous() if t.dim() == 2 else t


_LLAMA = [
    ("tok_embedding.", "model.embed_tokens."),
    ("norm.", "model.norm."),
    (".attn_norm.", ".input_layernorm."),
    (".mlp_norm.", ".post_attention_layernorm."),
    (".attn.", ".self_attn."),
    ("blocks.", "model.layers."),
]
_GPT2 = [
    ("tok_embedding.", "transformer.wte."),
    ("pos_embedding.", "transformer.wpe."),
    ("norm.", "transformer.ln_f."),
    (".attn_norm.", ".ln_1."),
    (".mlp_norm.", ".ln_2."),
    (".attn.qkv.", ".attn.c_attn."),
    (".attn.o_proj.", ".attn.c_proj."),
    (".mlp.up_proj.", ".mlp.c_fc."),
    (".mlp.down_proj.", ".mlp.c_proj."),
    ("blocks.", "transformer.h."),
]


def _rename(name: str, table, reverse: bool = False) -> str:
    out = name
    for ours, theirs in reversed(table) if reverse else table:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if src.startswith(".") and src in out:
            out = out.replace(src, dst)
        elif not src.startswith(".") and out.startswith(src):
            out = dst + out[len(src) :]
    return out


def _llama_name(name: str) -> str:
    return _rename(name, _LLAMA)


def _from_llama_name(name: str) -> str:
    return _rename(name, _LLAMA, reverse=True)


def _gpt2_name(name: str) -> str:
    return _rename(name, _GPT2)


def _from_gpt2_name(name: str) -> str:
    return _rename(name, _GPT2, reverse=True)


def read_hf_tensors(hf_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from a directory's safetensors files, one file and tensor at a time."""
    safe_open = need("safetensors", "hf").safe_open
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir} has no *.safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as weights:
            for name in weights.keys():
                yield name, weights.get_tensor(name)


# ----------------------------------------------------------------------------- starting a run


def resolve_init_from(cfg) -> None:
    """Give `cfg.model` the shape of the HF model `cfg.model.init_from` names. A field the
    config sets to something else is an error naming it; so is a context longer than a learned
    position table."""
    m = cfg.model
    if not m.init_from:
        return
    hf, context = model_config_from_hf(m.init_from)
    defaults = ModelConfig()
    fixed = [f for f in dataclasses.fields(ModelConfig) if f.name not in KEPT]
    clashes = [
        f"model.{f.name}={getattr(m, f.name)} (the model has {getattr(hf, f.name)})"
        for f in fixed
        if getattr(m, f.name) not in (getattr(defaults, f.name), getattr(hf, f.name))
    ]
    if clashes:
        raise ConfigError(f"'model.init_from' {m.init_from} disagrees with " + ", ".join(clashes))
    if hf.position == "learned" and cfg.data.seq_len > context:
        raise ConfigError(
            f"'data.seq_len' {cfg.data.seq_len} is longer than {m.init_from}'s learned position "
            f"table ({context})"
        )
    kept = {k: getattr(m, k) for k in KEPT}
    cfg.model = dataclasses.replace(hf, **kept)
    validate(cfg)


# What the run config still decides when the shape comes from a Hugging Face model.
KEPT = ("preset", "init_from", "dropout", "init_std")


def load_hf_weights(model, hf_dir: str | Path) -> None:
    """Put a Hugging Face model's weights into `model` (built with `resolve_init_from`'s shape)."""
    state = dict(from_hf(model.cfg, read_hf_tensors(hf_dir)))
    if model.pos_embedding is not None:  # a shorter context than the model's: its first rows
        state["pos_embedding.weight"] = state["pos_embedding.weight"][: model.seq_len]
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(
            f"{hf_dir}: weights do not fit its config.json: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )


def check_tokenizer(hf_dir: str | Path, dataset_tokenizer: Path) -> None:
    """The data must be tokenized with the model's own tokenizer: same tokens, same ids."""
    from tokenizers import Tokenizer

    theirs = Path(hf_dir) / "tokenizer.json"
    if not theirs.is_file():
        raise ConversionError(f"{hf_dir} has no tokenizer.json to compare the data's with")
    try:
        vocab = Tokenizer.from_file(str(theirs)).get_vocab()
    except Exception as e:  # noqa: BLE001 -- the tokenizers library's own error type
        raise ConversionError(f"{theirs} is not a tokenizer this can read ({e})") from None
    if vocab != Tokenizer.from_file(str(dataset_tokenizer)).get_vocab():
        raise ConversionError(
            f"the data was tokenized with {dataset_tokenizer}, whose vocabulary differs from "
            f"{theirs}: prepare it with `megatrain prep ... --tokenizer {theirs}`"
        )
