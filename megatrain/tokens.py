"""Facts of the byte-level BPE every megatrain dataset is tokenized with, shared by the prep
(which trains and applies it) and by the tools that read text back (generation, evaluation)."""

from __future__ import annotations

import functools

EOS = "<|endoftext|>"
"""Ends every document; also the BOS and padding token of an exported model."""


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the printable character that stands for each
    byte in a byte-level BPE vocabulary."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer) -> list[int]:
    """How many bytes of text each id of a byte-level BPE `tokenizer` (HF `tokenizers`) stands
    for; special tokens count 0 (they are not text)."""
    table, special = (
        byte_decoder(),
        {t.content for t in tokenizer.get_added_tokens_decoder().values()},
    )
    sizes = [0] * tokenizer.get_vocab_size()
    for token, i in tokenizer.get_vocab().items():
        if token not in special:
            sizes[i] = sum(1 for c in token if c in table)
    return sizes
