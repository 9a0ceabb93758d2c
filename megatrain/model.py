"""A decoder-only transformer, readable top to bottom.

    tokens -> embedding (+ learned positions) -> n_layer x Block -> norm -> linear head -> logits
    Block:  x = x + Attention(Norm(x));  x = x + MLP(Norm(x))

The defaults are LLaMA's (RMSNorm, rotary positions, SwiGLU, no biases); the config's switches
give GPT-2 (LayerNorm, learned positions, GELU, biases, tied embeddings). Nothing here knows
about parallelism: megatrain/parallel.py applies ZeRO, activation checkpointing and tensor
parallelism from outside, the latter following the plan declared here (TENSOR_PARALLEL_PLAN).
Attention goes through `scaled_dot_product_attention`, which picks flash kernels on GPU.
Projections are separate linear layers (q, k, v, o; gate, up, down) so that tensor parallelism
can split each one by columns or rows; layers derive their local head count from the
projection's actual width, so they also run when split.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatrain.config import ModelConfig


def mlp_hidden_size(cfg: ModelConfig) -> int:
    if cfg.d_ff:
        return cfg.d_ff
    if cfg.mlp == "gelu":
        return 4 * cfg.d_model
    return 64 * math.ceil(8 * cfg.d_model / 3 / 64)  # SwiGLU: same parameters as a 4x GELU MLP


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 for stability under bf16/fp16, return in the input's dtype
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rotary_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle for each position and frequency pair:
    (seq_len, head_dim/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of features of x (B, heads, T, head_dim) by its position's
    angle."""
    T = x.shape[-2]
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        kv_heads = cfg.n_kv_head or cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_heads * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, rope, cached=None):
        """`cached` (generation): a callable that appends this call's keys and values to those of
        the tokens before and returns them all."""
        B, T, _ = x.shape
        # head counts from the projections' actual widths: correct when tensor parallelism
        # splits them
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cached is not None:
            k, v = cached(k, v)
        # grouped-query attention: each k/v head serves several q heads (SDPA repeats them
        # without a copy). One query token (generation) sees every cached key: no mask.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.gated = cfg.mlp == "swiglu"
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


# How tensor parallelism splits each linear layer of a block (Megatron-LM's scheme, applied from
# outside by megatrain/parallel.py): "column" layers fan out and are split by output features,
# "row" layers fan back into the residual stream and are split by input features, so a block
# needs one all-reduce after attention and one after the MLP. Embeddings, norms and the output
# head stay whole. The "row" layers are the residual branches' output projections, which is
# also where GPT-2 scales the init down (Transformer.__init__).
TENSOR_PARALLEL_PLAN = {
    "attn.q_proj": "column",
    "attn.k_proj": "column",
    "attn.v_proj": "column",
    "attn.o_proj": "row",
    "mlp.gate_proj": "column",
    "mlp.up_proj": "column",
    "mlp.down_proj": "row",
}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cached=None):
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, cached))
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_len: int):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                "model.vocab_size must be set (from the dataset manifest) before building the model"
            )
        self.cfg, self.seq_len = cfg, seq_len
        self.tok_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embedding = (
            nn.Embedding(seq_len, cfg.d_model) if cfg.position == "learned" else None
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embedding.weight
        self.reset_buffers()
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection by 1/sqrt(2 * n_layer)
        residual_outputs = {
            f"{n}.weight" for n, split in TENSOR_PARALLEL_PLAN.items() if split == "row"
        }
        for name, p in self.named_parameters():
            if name.split(".", 2)[-1] in residual_outputs:  # blocks.<i>.attn.o_proj.weight
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def reset_buffers(self) -> None:
        """The rotary tables: buffers, not parameters, computed here and never saved (again after
        building on the meta device)."""
        if self.cfg.position == "rope":
            device = self.tok_embedding.weight.device
            head_dim = self.cfg.d_model // self.cfg.n_head
            cos, sin = rotary_tables(head_dim, self.seq_len, self.cfg.rope_theta)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None):
        """Logits (B, T, vocab) for `idx` (B, T); with `targets`, the mean cross-entropy instead.
        With a `KVCache` (generation), `idx` continues the tokens cached so far."""
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start and T > 1:
            raise ValueError("after the prompt, a cached forward takes one token at a time")
        x = self.tok_embedding(idx)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding(torch.arange(start, start + T, device=idx.device))
        x = self.dropout(x)
        rope = None
        if self.cfg.position == "rope":
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return self.loss(logits, targets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy, computed in fp32 whatever the logits' precision. (Compiled, as
        megatrain/parallel.py does on GPU, the upcast fuses into the kernel: the fp32 logits of
        the whole batch are never stored.)"""
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1).long())


class KVCache:
    """Keys and values of the tokens generated so far, per block, so that each new token costs
    one token's forward (megatrain/generate.py)."""

    def __init__(self, model: Transformer, batch: int, max_len: int):
        cfg = model.cfg
        weight = model.tok_embedding.weight
        shape = (batch, cfg.n_kv_head or cfg.n_head, max_len, cfg.d_model // cfg.n_head)
        self.keys = [weight.new_empty(shape) for _ in range(cfg.n_layer)]
        self.values = [weight.new_empty(shape) for _ in range(cfg.n_layer)]
        self.length = 0

    def layer(self, i: int):
        """Block i's `cached`: store its new keys and values, return all of them so far."""

        def cached(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            end = self.length + k.shape[2]
            self.keys[i][:, :, self.length : end] = k
            self.values[i][:, :, self.length : end] = v
            return self.keys[i][:, :, :end], self.values[i][:, :, :end]

        return cached


# ----------------------------------------------------------------------------- counting


def count_params(cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """Parameters of the model `cfg` describes, counted on a meta-device copy (no memory used)."""
    with torch.device("meta"):
        model = Transformer(cfg, seq_len)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.tok_embedding.weight.numel()
    if model.pos_embedding is not None:
        embedding += model.pos_embedding.weight.numel()
    return {"params": total, "non_embedding_params": total - embedding}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, the PaLM convention (appendix B) that published MFU figures use.

    6 per weight of every matmul (2 forward, 4 backward): all parameters except the embedding
    lookups, the output head included (tied or not); plus attention's QK^T and AV products,
    12 x n_layer x seq_len x d_model (counted as if unmasked, as PaLM, nanoGPT and torchtitan do).
    """
    n = count_params(cfg, seq_len)
    matmul_weights = n["non_embedding_params"] + (
        cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    )
    return 6 * matmul_weights + 12 * cfg.n_layer * seq_len * cfg.d_model
