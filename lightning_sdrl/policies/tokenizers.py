"""Tokenizers built offline: CLIP's (real or character-level) and a small T5 one.

Either the real CLIP BPE vocabulary shipped with open_clip, or a tiny character-level vocabulary
for tests and miniature models; and a small unigram T5 tokenizer for the T5 text encoder of
Stable Diffusion 3 (the real SentencePiece vocabulary is not shipped by any installed package).

Stable Diffusion's tokenizer is CLIP's byte-level BPE. Its vocabulary is fully determined by the
merge list (256 byte symbols, the same with the end-of-word marker, one token per merge, then the
two special tokens), and open_clip ships that merge list, so the exact tokenizer can be rebuilt
without the model hub.
"""

from __future__ import annotations

import gzip
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import open_clip
import torch
from transformers import CLIPTokenizer, PreTrainedTokenizerBase, T5TokenizerFast

START, END = "<|startoftext|>", "<|endoftext|>"
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
"""T5's special tokens, ids 0, 1, 2 (padding, end of sequence, unknown)."""
METASPACE = "\u2581"
"""SentencePiece's word-start marker ``▁`` (a space is a ``▁`` at the start of the next piece)."""
_T5_WORDS = ("a", "an", "the", "of", "and", "in", "on", "with", "photo", "cat", "dog", "red", "blue", "digit")
_CLIP_MERGES = 49152 - 256 - 2  # merges used by CLIP (vocabulary size 49408)


@lru_cache
def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for the bytes 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
    return {token: index for index, token in enumerate(tokens)}


def clip_tokenizer(max_length: int = 77, pad_token: str = END) -> CLIPTokenizer:
    """The CLIP ViT-L/14 (Stable Diffusion 1.x) tokenizer, rebuilt from open_clip's BPE file.

    ``pad_token="!"`` gives the OpenCLIP bigG tokenizer of SDXL and Stable Diffusion 3's
    ``tokenizer_2`` (the same vocabulary, padded with ``!``, id 0, instead of the end token).

    Example:
        >>> clip_tokenizer()("a photo of a cat").input_ids
        [49406, 320, 1125, 539, 320, 2368, 49407]
    """
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")[1 : _CLIP_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    return CLIPTokenizer(
        vocab=_vocab_from_merges(merges),
        merges=merges,
        model_max_length=max_length,
        pad_token=pad_token,
    )


def char_clip_tokenizer(max_length: int = 16, pad_token: str = END) -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: one token per character (514 tokens in all).

    Small enough for tiny text encoders in tests and miniature models. ``pad_token`` as in
    :func:`clip_tokenizer`.

    Example:
        >>> tok = char_clip_tokenizer()
        >>> len(tok), len(tok("ab").input_ids)
        (514, 4)
    """
    return CLIPTokenizer(vocab=_vocab_from_merges([]), merges=[], model_max_length=max_length, pad_token=pad_token)


def unigram_t5_tokenizer(words: Sequence[str] = _T5_WORDS, max_length: int = 256) -> T5TokenizerFast:
    """A small T5 tokenizer: a unigram model over printable ASCII characters and a few whole words.

    It works like T5's SentencePiece tokenizer (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, the ``▁``
    metaspace pre-tokenizer, ``</s>`` appended), with a vocabulary small enough for tiny T5
    encoders in tests: one piece per character and per ``▁``-prefixed word of ``words``, which
    the unigram model prefers to spelling the word out.

    Args:
        words: whole words with their own token (as ``▁word``).
        max_length: the tokenizer's ``model_max_length``.

    Example:
        >>> tok = unigram_t5_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("a cat!").input_ids)
        ['▁a', '▁cat', '!', '</s>']
        >>> tok.pad_token_id, tok.eos_token_id, len(tok)
        (0, 1, 112)
    """
    characters = [c for c in string.printable if not c.isspace()]
    pieces = [*characters, *(METASPACE + word for word in words)]
    if len(set(pieces)) != len(pieces):
        raise ValueError(f"words={list(words)} has duplicates or one-character words; pass distinct longer words")
    # Log-probabilities of the unigram model: a known word (-1) beats its spelling (-10 per character).
    vocab = [(token, 0.0) for token in T5_SPECIAL_TOKENS] + [(METASPACE, -5.0)]
    vocab += [(piece, -1.0 if piece.startswith(METASPACE) else -10.0) for piece in pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def token_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    device: torch.device | str = "cpu",
    max_length: int | None = None,
) -> torch.Tensor:
    """Token ids ``[B, L]`` of prompts, padded (and truncated) to ``max_length`` (default: the tokenizer's).

    Raises:
        ValueError: If ``prompts`` is empty.
    """
    if not prompts:
        raise ValueError("prompts is empty; expected at least one prompt")
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length if max_length is None else max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
