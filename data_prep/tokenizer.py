"""Byte-level BPE: trained and saved with HF `tokenizers`, encoded fast with `tiktoken`.

HF `tokenizers` trains the vocabulary and remains the reference (its tokenizer.json is what
ships with the dataset and the model). For encoding at scale we build a `tiktoken.Encoding`
from the same vocabulary: byte-level BPE whose merge priority is the token id, with GPT-2's
pre-tokenization regex. It yields identical ids about 4x faster per core; `FastEncoder`
checks that on a sample of the real data before it is trusted, and falls back to HF if not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from megatrain.errors import MegatrainError
from megatrain.tokens import EOS, byte_decoder

# GPT-2's pre-tokenization, which HF's ByteLevel pre-tokenizer (use_regex=True) also applies
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(MegatrainError):
    """The tokenizer file is missing or not a byte-level BPE we can use; names the file."""


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: tuple[str, ...] = (EOS,),
    min_frequency: int = 2,
):
    """Train a byte-level BPE (GPT-2 style) on `texts` (any iterable: streamed); EOS gets id 0.

    Deterministic: the same texts in the same order give the same tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS] + [t for t in special_tokens if t != EOS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"{path} is not a valid HF tokenizer.json ({e})") from None
    if tok.token_to_id(EOS) is None:
        raise TokenizerError(
            f"{path} has no '{EOS}' token, which separates documents; add it or train a new one"
        )
    return tok


def to_tiktoken(tok):
    """The same byte-level BPE as a tiktoken Encoding (ranks = HF ids, special tokens kept
    apart)."""
    import tiktoken

    spec = json.loads(tok.to_str())
    if (
        spec["model"]["type"] != "BPE"
        or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel"
    ):
        raise TokenizerError("the fast encoder needs a byte-level BPE tokenizer")
    decode = byte_decoder()
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    ranks = {
        bytes(decode[ch] for ch in token): i
        for token, i in spec["model"]["vocab"].items()
        if token not in special
    }
    return tiktoken.Encoding(
        "megatrain-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special
    )


class FastEncoder:
    """Encodes documents to ids with tiktoken when it agrees with HF on a sample, else with HF.

    Special-token strings inside a document ("<|endoftext|>" typed in a web page) are encoded as
    ordinary text by both backends, so a document can never fake a document boundary.
    `backend` forces a choice already made (all ranks of a prep use rank 0's decision).
    """

    def __init__(self, tok, sample: list[str], threads: int = 1, backend: str | None = None):
        self.hf, self.threads = tok, threads
        self.hf.encode_special_tokens = True
        self.eos_id = tok.token_to_id(EOS)
        self.backend = "hf"
        try:
            fast = to_tiktoken(tok)
        except TokenizerError:
            return
        if backend is None:
            reference = self._hf(sample)
            backend = (
                "tiktoken"
                if reference == fast.encode_ordinary_batch(sample, num_threads=threads)
                else "hf"
            )
        if backend == "tiktoken":
            self.fast, self.backend = fast, "tiktoken"

    def _hf(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_lists(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without EOS."""
        if self.backend == "tiktoken":
            if self.threads == 1:  # no thread pool: ~10% faster on one core
                return [self.fast.encode_ordinary(t) for t in texts]
            return self.fast.encode_ordinary_batch(texts, num_threads=self.threads)
        return self._hf(texts)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text followed by EOS."""
        return [np.asarray(x + [self.eos_id], dtype=np.uint32) for x in self.encode_lists(texts)]
