"""Loading diffusers/transformers components from a local directory or the Hugging Face hub.

Errors say what to do when the weights are not there (offline machines above all).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTokenizer, T5TokenizerFast

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtype names a config may give (``torch_dtype: bfloat16``)."""


def resolve_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a dtype or its name (``"bfloat16"``, ``"torch.bfloat16"``); ``None`` stays ``None``.

    Example:
        >>> resolve_dtype("bfloat16"), resolve_dtype(None)
        (torch.bfloat16, None)
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype={value!r}; expected one of {sorted(TORCH_DTYPES)} (or null to keep it)")
    return TORCH_DTYPES[name]


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_local_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with path syntax is meant as a directory.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_source(pretrained_model_name_or_path: str, subfolders: list[str]) -> None:
    """Raise a clear error if a local model directory is missing or incomplete.

    Hub ids are left to :func:`load_component`, which explains a failed download.
    """
    path = Path(pretrained_model_name_or_path).expanduser()
    if path.is_dir():
        missing = [sub for sub in subfolders if not (path / sub).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"model directory '{path}' has no {missing} subfolder(s); expected a diffusers "
                f"layout with {subfolders} (as written by save_pretrained)"
            )
    elif _looks_like_local_path(pretrained_model_name_or_path):
        raise FileNotFoundError(
            f"model directory '{path}' does not exist; pass an existing directory written by "
            "save_pretrained, or a Hugging Face model id"
        )


def hub_kwargs(revision: str | None, local_files_only: bool | None) -> dict[str, Any]:
    """The ``from_pretrained`` arguments every component of a model shares (``local_files_only`` only if set).

    Example:
        >>> hub_kwargs("main", None)
        {'revision': 'main'}
    """
    kwargs: dict[str, Any] = {"revision": revision}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    return kwargs


def load_component(cls: Any, pretrained_model_name_or_path: str, subfolder: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, subfolder=...)`` with an actionable error when it fails."""
    local = Path(pretrained_model_name_or_path).expanduser().is_dir()
    try:
        return cls.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as error:
        if local:
            raise OSError(
                f"could not load {cls.__name__} from '{pretrained_model_name_or_path}/{subfolder}': "
                f"{error}. Re-save the model with save_pretrained or point to a complete directory."
            ) from error
        offline = hub_offline() or kwargs.get("local_files_only")
        how = (
            "HF_HUB_OFFLINE=1 / local_files_only forbid downloads and it is not in the local cache"
            if offline
            else "the download failed (no network access?)"
        )
        raise OSError(
            f"could not load {cls.__name__} '{subfolder}' of '{pretrained_model_name_or_path}': "
            f"{how}. Download the model on a machine with hub access (e.g. `hf download "
            f"{pretrained_model_name_or_path} --local-dir DIR`) and pass that local DIR as "
            "pretrained_model_name_or_path."
        ) from error


def load_clip_tokenizer(
    pretrained_model_name_or_path: str, subfolder: str = "tokenizer", **kwargs: Any
) -> CLIPTokenizer:
    """Load a CLIP tokenizer, refusing the empty tokenizer transformers returns for missing files."""
    tokenizer = load_component(CLIPTokenizer, pretrained_model_name_or_path, subfolder, **kwargs)
    if len(tokenizer) <= 2:  # only the special tokens: the vocabulary files were not found
        raise OSError(
            f"tokenizer in '{pretrained_model_name_or_path}/{subfolder}' has no vocabulary "
            f"({len(tokenizer)} tokens): its vocab/merges or tokenizer.json files are missing. "
            "Re-save it with tokenizer.save_pretrained(DIR)."
        )
    return tokenizer


def load_t5_tokenizer(
    pretrained_model_name_or_path: str, subfolder: str = "tokenizer_3", **kwargs: Any
) -> T5TokenizerFast:
    """Load a T5 tokenizer, refusing the empty tokenizer transformers returns for missing files.

    Without its ``tokenizer.json`` (or ``spiece.model``), transformers 5 builds a T5 tokenizer
    holding only the special tokens, the ``▁`` piece and the sentinel ``<extra_id_*>`` tokens,
    which maps every word to ``<unk>``.
    """
    tokenizer = load_component(T5TokenizerFast, pretrained_model_name_or_path, subfolder, **kwargs)
    pieces = len(tokenizer) - len(set(tokenizer.all_special_tokens))
    if pieces <= 1:  # at most the "▁" piece: the vocabulary files were not found
        raise OSError(
            f"T5 tokenizer in '{pretrained_model_name_or_path}/{subfolder}' has no vocabulary "
            f"({len(tokenizer)} tokens, special ones and '▁' only): its tokenizer.json or spiece.model file "
            "is missing. Re-save it with tokenizer.save_pretrained(DIR)."
        )
    return tokenizer
