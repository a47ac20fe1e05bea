"""Reference image sets for diversity rewards and metrics, and their features computed once per extractor.

The diversity reward paper (section 4.1.2) compares each generated batch with a small, diverse
reference set ``X_r``: about 50 training images per class, or e.g. 25 faces with and 25 without
eyeglasses. :class:`ReferenceSet` reads such a set from image files (the digits miniature's
:class:`~lightning_sdrl.digits.reference.DigitsReference` takes it from its data). A set holds
the images as ``[N, 3, H, W]`` floats in ``[0, 1]`` and gives their features ``Z_r = phi(X_r)``
with :meth:`ReferenceSet.features`, computed once per feature extractor and kept in memory (and,
with ``cache_path``, on disk).

A bottom-layer module: rewards and metrics both read reference sets, so it imports neither.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn

__all__ = ["ReferenceSet", "extractor_cache_key"]


def extractor_cache_key(extractor: nn.Module) -> str:
    """A string identifying the features ``extractor`` produces.

    The extractor's own ``cache_key`` attribute if it has one (for example
    :class:`~lightning_sdrl.rewards.reward_model.CLIPEmbedder`), else its class name and a
    SHA-256 digest of its ``state_dict``.

    Example:
        >>> extractor_cache_key(torch.nn.Flatten())
        'Flatten:e3b0c44298fc1c14'
    """
    key = getattr(extractor, "cache_key", None)
    if isinstance(key, str):
        return key
    digest = hashlib.sha256()
    for name, tensor in extractor.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{type(extractor).__qualname__}:{digest.hexdigest()[:16]}"


def _image_files(images_dir: str) -> list[Path]:
    folder = Path(images_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"images_dir={images_dir!r} is not a folder; give a folder of images")
    extensions = set(Image.registered_extensions())
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise ValueError(
            f"images_dir={images_dir!r} holds no image files (expected e.g. .png or .jpg); "
            "put the reference images there or pass paths"
        )
    return files


def _load_image(path: Path, image_size: int | None) -> Tensor:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image_size is not None:
                # shorter side to image_size, then the centre square
                image = ImageOps.fit(image, (image_size, image_size), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(
            f"cannot read reference image {str(path)!r} ({type(error).__name__}: {error}); "
            "remove it or replace it with a readable image file"
        ) from error
    return torch.from_numpy(array).permute(2, 0, 1)


def _load_images(files: list[Path], image_size: int | None) -> Tensor:
    images = [_load_image(path, image_size) for path in files]
    for path, image in zip(files, images, strict=True):
        if image.shape != images[0].shape:
            raise ValueError(
                f"reference images differ in size: {str(files[0])!r} is "
                f"{list(images[0].shape[1:])} but {str(path)!r} is {list(image.shape[1:])}; "
                "set image_size to resize (and centre-crop) them all to one square size"
            )
    return torch.stack(images)


class ReferenceSet:
    """A reference image set ``X_r`` read from image files, and its cached features.

    Args:
        images_dir: Folder whose image files (sorted by name) form the set.
        paths: Image files forming the set; exclusive with ``images_dir``.
        image_size: Resize the shorter side to this size and crop the centre square (bicubic);
            ``None`` keeps the files' size, which must then be the same for all.
        cache_path: Folder for on-disk feature caches, one ``.pt`` file per extractor (keyed by
            :func:`extractor_cache_key` and the image files); ``None`` caches in memory only.

    Raises:
        ValueError: If neither or both of ``images_dir`` and ``paths`` are given, the folder
            holds no images, an image cannot be read, or sizes differ without ``image_size``.
        FileNotFoundError: If ``images_dir`` or a path does not exist.
    """

    def __init__(
        self,
        images_dir: str | None = None,
        paths: list[str] | None = None,
        image_size: int | None = None,
        cache_path: str | None = None,
    ) -> None:
        if (images_dir is None) == (paths is None):
            raise ValueError(f"images_dir={images_dir!r}, paths={paths!r}; give exactly one of the two")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size={image_size}; expected a positive int or None")
        if paths is not None:
            files = [Path(p) for p in paths]
            missing = [str(p) for p in files if not p.is_file()]
            if not files or missing:
                raise FileNotFoundError(
                    f"paths has {len(missing)} missing file(s) {missing[:3]} out of "
                    f"{len(files)}; give existing image files (at least one)"
                )
        else:
            files = _image_files(images_dir)
        self.paths = [str(p) for p in files]
        identity = hashlib.sha256()
        for path in files:
            identity.update(f"{path.resolve()}:{path.stat().st_size};".encode())
        self._init_set(
            _load_images(files, image_size),
            f"files:{identity.hexdigest()[:16]}:size={image_size}",
            cache_path,
        )

    def _init_set(self, images: Tensor, identity: str, cache_path: str | None) -> None:
        self.images = images
        self.identity = identity
        self.cache_path = None if cache_path is None else Path(cache_path)
        self._features: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return self.images.shape[0]

    def _cache_file(self, key: str) -> Path | None:
        if self.cache_path is None:
            return None
        name = hashlib.sha256(f"{key}|{self.identity}".encode()).hexdigest()[:16]
        return self.cache_path / f"reference_features_{name}.pt"

    def features(self, extractor: nn.Module, batch_size: int = 64) -> Tensor:
        """Features ``Z_r`` ``[N, D]`` of the set, computed once per extractor.

        The extractor runs without gradients, on the device of its parameters, in batches. The
        result (on the CPU) is kept in memory and, with ``cache_path``, saved to and loaded from
        a file named after :func:`extractor_cache_key` and the set.

        Args:
            extractor: Module mapping images ``[B, 3, H, W]`` in ``[0, 1]`` to ``[B, D]``.
            batch_size: Images per extractor call.

        Returns:
            ``[N, D]`` features on the CPU.
        """
        key = extractor_cache_key(extractor)
        if key in self._features:
            return self._features[key]
        cache_file = self._cache_file(key)
        if cache_file is not None and cache_file.is_file():
            state = torch.load(cache_file, map_location="cpu", weights_only=True)
            if state["extractor"] == key and state["reference"] == self.identity:
                self._features[key] = state["features"]
                return state["features"]
        features = self._extract(extractor, batch_size)
        self._features[key] = features
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            state = {"extractor": key, "reference": self.identity, "features": features}
            torch.save(state, cache_file)
        return features

    def _extract(self, extractor: nn.Module, batch_size: int) -> Tensor:
        tensor = next(iter(extractor.parameters()), None)
        if tensor is None:
            tensor = next(iter(extractor.buffers()), None)
        device = torch.device("cpu") if tensor is None else tensor.device
        with torch.no_grad():
            chunks = [
                extractor(self.images[start : start + batch_size].to(device)).flatten(1).cpu()
                for start in range(0, len(self), batch_size)
            ]
        return torch.cat(chunks)
