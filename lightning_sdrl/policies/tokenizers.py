"""CLIP tokenizers built offline.

Either the real CLIP BPE vocabulary shipped with open_clip, or a tiny character-level vocabulary
for tests and miniature models.

Stable Diffusion's tokenizer is CLIP's byte-level BPE. Its vocabulary is fully determined by the
merge list (256 byte symbols, the same with the end-of-word marker, one token per merge, then the
two special tokens), and open_clip ships that merge list, so the exact tokenizer can be rebuilt
without the model hub.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import open_clip
import torch
from transformers import CLIPTokenizer

START, END = "<|startoftext|>", "<|endoftext|>"
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


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The CLIP ViT-L/14 (Stable Diffusion 1.x) tokenizer, rebuilt from open_clip's BPE file.

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
    )


def char_clip_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: one token per character (514 tokens in all).

    Small enough for tiny text encoders in tests and miniature models.

    Example:
        >>> tok = char_clip_tokenizer()
        >>> len(tok), len(tok("ab").input_ids)
        (514, 4)
    """
    return CLIPTokenizer(vocab=_vocab_from_merges([]), merges=[], model_max_length=max_length)


def token_ids(tokenizer: CLIPTokenizer, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Token ids ``[B, L]`` of prompts, padded (and truncated) to the tokenizer's max length.

    Raises:
        ValueError: If ``prompts`` is empty.
    """
    if not prompts:
        raise ValueError("prompts is empty; expected at least one prompt")
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
