"""Labelled image sources: the bundled handwritten digits and image folders.

Each source is a map-style dataset of ``(PIL image or None, class index)``; None marks an image
that could not be read, which the loader skips and counts (a run never dies on one bad file).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _stratified_split(targets, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) indices: ``fraction`` of every class held out (at least one image of
    each class with two or more), chosen by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(list(targets))
    keep, hold = [], []
    for c in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        n = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        hold += idx[:n]
        keep += idx[n:]
    return sorted(keep), sorted(hold)


class DigitsDataset(Dataset):
    """scikit-learn's 1797 real handwritten digits (8x8, 16 grey levels, 10 classes) as RGB
    images of ``size`` pixels, with a seeded stratified train/val split.

    They ship inside scikit-learn, so training works with no download. The 8x8 scans are
    enlarged with bicubic resampling, which keeps strokes smooth for the crop augmentations.
    """

    def __init__(self, split: str = "train", *, val_fraction: float = 0.2, seed: int = 0, size: int = 32):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
        keep, hold = _stratified_split(digits.target.tolist(), val_fraction, seed)
        index = {"train": keep, "val": hold, "all": list(range(len(pixels)))}[split]
        self.pixels = pixels[index]
        self.targets = [int(t) for t in digits.target[index]]
        self.classes = [str(i) for i in range(10)]
        self.size = size

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.pixels[i], mode="L").resize((self.size, self.size), Image.BICUBIC)
        return img.convert("RGB"), self.targets[i]


class ImageFolderDataset(Dataset):
    """An image folder with one subfolder per class (torchvision's ImageFolder layout).

    Unreadable files (corrupt, truncated, empty, not an image) give ``(None, target)`` with a
    warning naming the file, instead of an exception that would end the run.
    """

    def __init__(self, root: str | os.PathLike, *, min_classes: int = 1):
        from torchvision.datasets.folder import find_classes, make_dataset

        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        try:
            classes, class_to_idx = find_classes(os.fspath(root))
        except FileNotFoundError:
            raise ValueError(
                f"{root} has no class subfolders: put the images of each class in their own subfolder "
                f"({root}/cat/1.jpg, {root}/dog/2.jpg ...)"
            ) from None
        try:
            self.samples = make_dataset(os.fspath(root), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError:
            raise ValueError(
                f"{root} holds no images ({', '.join(IMG_EXTENSIONS)}) in its class subfolders {classes[:10]}"
            ) from None
        used = sorted({t for _, t in self.samples})
        if len(used) < min_classes:
            raise ValueError(
                f"{root} has images of {len(used)} class(es) ({[classes[t] for t in used]}); "
                f"training a classifier needs at least {min_classes}"
            )
        self.root = root
        self.classes = classes
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB"), target
        except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
            warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", stacklevel=2)
            return None, target


class _Labelled(Subset):
    """A subset that keeps ``classes`` and ``targets``."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, list(indices))
        self.classes = dataset.classes
        self.targets = [dataset.targets[i] for i in self.indices]


def split_holdout(dataset, fraction: float, seed: int):
    """(train, val): a seeded, stratified ``fraction`` of every class held out for validation."""
    keep, hold = _stratified_split(dataset.targets, fraction, seed)
    if not hold:
        raise ValueError(f"cannot hold out a validation part of {len(dataset)} images: pass --val DIR")
    return _Labelled(dataset, keep), _Labelled(dataset, hold)


def subset_fraction(dataset, fraction: float, seed: int):
    """A seeded, stratified ``fraction`` of every class (at least one image per class)."""
    if fraction >= 1:
        return dataset
    _, kept = _stratified_split(dataset.targets, fraction, seed + 1)
    return _Labelled(dataset, kept)


def resolve_folders(data: str | os.PathLike, val: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """(train root, val root or None): ``data/train`` and ``data/val`` when they exist (the
    ImageNet layout), else ``data`` itself; ``val`` overrides."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    train = root / "train" if (root / "train").is_dir() else root
    if val is not None:
        val_root = Path(val)
        if not val_root.is_dir():
            raise FileNotFoundError(f"validation folder not found: {val_root}")
        return train, val_root
    return train, (root / "val" if train != root and (root / "val").is_dir() else None)
