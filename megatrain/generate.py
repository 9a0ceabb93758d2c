"""`megatrain generate`: what a trained model writes, from a run directory or an exported one.

Decoding, one token at a time over a KV cache (megatrain.model.KVCache), until EOS or
--max-new-tokens:

    greedy           temperature 0: the most likely token
    temperature T    sample from softmax(logits / T)
    top-k K          ... among the K most likely tokens only
    top-p P          ... among the fewest most likely tokens whose probabilities reach P

The same seed gives the same text. Text is printed as it comes (whole characters only: a byte-
level BPE token can end in the middle of one).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megatrain.config import Config, DataConfig
from megatrain.errors import MegatrainError
from megatrain.model import KVCache, Transformer
from megatrain.tokens import EOS


@dataclass
class Sampling:
    temperature: float = 0.0
    """0: greedy."""
    top_k: int = 0
    """0: no limit."""
    top_p: float = 1.0
    """1: no limit."""
    seed: int = 0


def load_model(path: str | Path, step: int | None = None, device: str = "cpu"):
    """(model, HF tokenizer, EOS id) of a run directory (its newest checkpoint, or `step`'s) or
    of an exported Hugging Face directory; fp32 on CPU, the stored precision on GPU."""
    from tokenizers import Tokenizer

    from megatrain.hf import from_hf, model_config_from_hf, read_hf_tensors
    from megatrain.weights import build_model, checkpoint_weights

    path = Path(path)
    if (path / "checkpoints").is_dir():
        from megatrain.export import run_tokenizer

        weights = checkpoint_weights(path, step)
        model = build_model(weights.config, weights.tensors(), device)
        tokenizer = run_tokenizer(path, weights)
        eos = None
    elif (path / "config.json").is_file():
        m, context = model_config_from_hf(path)
        config = Config(model=m, data=DataConfig(seq_len=context))
        model = build_model(config, from_hf(m, read_hf_tensors(path)), device)
        tokenizer = path / "tokenizer.json"
        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    else:
        raise MegatrainError(
            f"{path} is neither a run directory (with checkpoints/) nor an exported model "
            "(with config.json)"
        )
    if torch.device(device).type == "cpu":
        model = model.float()  # half precision is slow, and not always there, on a CPU
    tokenizer = Tokenizer.from_file(str(tokenizer))
    if eos is None:
        eos = tokenizer.token_to_id(EOS)
    return model, tokenizer, eos[0] if isinstance(eos, list) else eos


def top_p_filter(probs: torch.Tensor, p: float) -> torch.Tensor:
    """`probs` (..., vocab) with all but the smallest set of most likely tokens whose total
    probability reaches `p` set to 0 (ties broken by token id)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
    sorted_probs = sorted_probs.masked_fill(before >= p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of `logits` (batch, vocab)."""
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if s.top_p < 1.0:
        probs = top_p_filter(probs, s.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    eos_id: int | None = None,
) -> Iterator[int]:
    """Yield the ids that follow `prompt`, one at a time, until `eos_id` (not yielded) or
    `max_new_tokens`. The prompt is cut from the left to leave room in the context."""
    device = model.tok_embedding.weight.device
    max_new_tokens = min(max_new_tokens, model.seq_len - 1)
    prompt = prompt[-(model.seq_len - max_new_tokens) :] or [eos_id or 0]
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    cache = KVCache(model, 1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[:, -1]
    for _ in range(max_new_tokens):
        token = next_token(logits, sampling, generator)
        if eos_id is not None and int(token) == eos_id:
            return
        yield int(token)
        logits = model(token.view(1, 1), cache=cache)[:, -1]


def print_continuation(
    model,
    tokenizer,
    eos: int | None,
    prompt: str,
    max_new_tokens: int,
    sampling: Sampling,
    stream=sys.stdout,
) -> list[int]:
    """Print `prompt` and what the model writes after it, as it comes; returns the new ids."""
    ids = tokenizer.encode(prompt).ids
    stream.write(prompt)
    new, shown = [], ""
    for token in generate(model, ids, max_new_tokens, sampling, eos):
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # a character cut between two tokens: wait for the rest
            stream.write(text[len(shown) :])
            stream.flush()
            shown = text
    stream.write(tokenizer.decode(new)[len(shown) :] + "\n")
    stream.flush()
    return new
