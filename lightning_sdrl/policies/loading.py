"""Loading diffusers/transformers components from a local directory or the Hugging Face hub.

Errors say what to do when the weights are not there (offline machines above all).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer


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
