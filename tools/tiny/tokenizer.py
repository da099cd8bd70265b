"""A CLIP tokenizer whose vocabulary is the caption grammar's words.

CLIP's byte-level alphabet is kept, so any prompt still tokenizes (unknown words fall apart
into characters); each grammar word gets merges that make it one token.
"""

from __future__ import annotations

from transformers import CLIPTokenizer

from .scenes import vocabulary

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
MAX_LENGTH = 24  # the longest grammar caption is 21 words plus start and end tokens


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _add_chain(parts: list[str], tokens: list[str], merges: list[tuple[str, str]]) -> None:
    """Merges that join parts left to right into one token."""
    while len(parts) > 1:
        pair = (parts[0], parts[1])
        if pair not in merges:
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
        parts = [pair[0] + pair[1], *parts[2:]]


def build_tokenizer() -> CLIPTokenizer:
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in vocabulary():
        _add_chain([*word[:-1], word[-1] + "</w>"], tokens, merges)
    # An earlier merge from another word ("an" in "and") can cut a word into other pieces;
    # joining those pieces with later merges makes every grammar word a single token.
    while True:
        tokenizer = CLIPTokenizer(
            vocab={t: i for i, t in enumerate(dict.fromkeys([*tokens, *SPECIAL]))},
            merges=merges,
            model_max_length=MAX_LENGTH,
        )
        split = [w for w in vocabulary() if len(tokenizer.tokenize(w)) > 1]
        if not split:
            return tokenizer
        for word in split:
            _add_chain(tokenizer.tokenize(word), tokens, merges)
