"""Labelled image sources: the bundled handwritten digits and ImageFolder-style directories.

Every source is a map-style dataset ``i -> (PIL RGB image or None, class index)`` with
``classes`` (names) and ``targets`` (one int per item). ``None`` marks a file that could not be
decoded: the loader drops and counts it (:func:`swinv2.data.loader.collate_skip`), so one bad
file in a million never ends a run. A split with no readable image at all is refused by
:func:`require_readable`. No transform is applied here; augmentation is seeded per
(seed, epoch, index) by :class:`swinv2.data.loader.TransformedDataset`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from .images import is_regular_file, open_rgb


class MissingFolderError(FileNotFoundError, ValueError):
    """A data folder that does not exist. Both a FileNotFoundError (what it is) and a
    ValueError (what the other data errors are), so either ``except`` catches it."""


def _stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(rest, picked) sorted indices: ``round(fraction * count)`` items of every class picked.

    Each class with two or more items gives at least one to each side, so a small class is
    neither missing from validation nor from training. One seeded torch.Generator, classes in
    sorted order: the split depends only on (targets, fraction, seed).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    targets = np.asarray(list(targets), dtype=np.int64)
    rest, picked = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        idx = idx[torch.randperm(len(idx), generator=gen).numpy()]
        n = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        picked.extend(idx[:n].tolist())
        rest.extend(idx[n:].tolist())
    return sorted(rest), sorted(picked)


class DigitsDataset(Dataset):
    """scikit-learn's 1797 real handwritten digits (8x8, grey levels 0..16, 10 classes) as RGB
    images of ``size`` x ``size`` pixels, with a seeded stratified train/val split.

    They ship inside scikit-learn, so a real classification run needs no download. The scans
    are enlarged with bicubic resampling: smooth strokes that stay readable under the random
    crops and RandAugment, where nearest-neighbour would give 4x4-pixel blocks.
    """

    def __init__(self, split: str = "train", *, val_fraction: float = 0.2, seed: int = 0, size: int = 32):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        if size < 8:
            raise ValueError(f"size must be at least the native 8 pixels, got {size}")
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
        rest, held = _stratified_split(digits.target.tolist(), val_fraction, seed)
        index = {"train": rest, "val": held, "all": list(range(len(pixels)))}[split]
        self.split, self.size = split, size
        self.indices = index  # positions in load_digits(), for checking the split
        self.pixels = pixels[index]
        self.targets = [int(t) for t in digits.target[index]]
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        # Resized per item rather than cached: 1797 images at 256 px would hold 350 MB.
        img = Image.fromarray(self.pixels[i], mode="L").resize((self.size, self.size), Image.BICUBIC)
        return img.convert("RGB"), self.targets[i]


class ImageFolderDataset(Dataset):
    """A folder with one subfolder per class (torchvision's ImageFolder layout, class order and
    ``IMG_EXTENSIONS``); files with other extensions are ignored, as torchvision does.

    ``min_classes=2`` for a training folder (one class cannot train a classifier); 1 for
    evaluation. Entries named like images that are no regular files (FIFOs, sockets, devices,
    broken links), which would block or fail on opening, are left out at scan time, listed in
    ``not_files`` and reported in one warning. Unreadable files (corrupt, truncated, zero bytes,
    not an image) give ``(None, target)`` and one warning naming the file.
    """

    def __init__(self, root: str | os.PathLike, *, min_classes: int = 1):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

        root = Path(root)
        if not root.is_dir():
            raise MissingFolderError(f"image folder not found: {root}")
        try:
            classes, class_to_idx = find_classes(os.fspath(root))
        except FileNotFoundError:
            files = sum(1 for p in root.iterdir() if p.is_file())
            raise ValueError(
                f"{root} has no class subfolders ({files} loose files): put each class's images in their own "
                f"subfolder, e.g. {root}/cat/1.jpg and {root}/dog/2.jpg"
            ) from None
        not_files: list[str] = []

        def is_image_file(path: str) -> bool:
            if not has_file_allowed_extension(path, IMG_EXTENSIONS):
                return False
            if is_regular_file(path):
                return True
            not_files.append(path)
            return False

        samples = make_dataset(os.fspath(root), class_to_idx, is_valid_file=is_image_file, allow_empty=True)
        if not_files:
            warnings.warn(
                f"skipping {len(not_files)} entr{'y' if len(not_files) == 1 else 'ies'} under {root} named like "
                f"images but not regular files (FIFO, socket, device or broken link), e.g. {not_files[0]}",
                stacklevel=2,
            )
        if not samples:
            raise ValueError(
                f"{root} holds no images: none of its class subfolders {_names(classes)} has a file ending in "
                f"{', '.join(IMG_EXTENSIONS)}"
            )
        used = {t for _, t in samples}
        empty = [c for c in classes if class_to_idx[c] not in used]
        if empty:
            # An empty class would still get an output unit that no image ever trains.
            raise ValueError(f"{root}: class subfolder(s) {_names(empty)} hold no images; remove or fill them")
        if len(classes) < min_classes:
            raise ValueError(
                f"{root} has {len(classes)} class subfolder ({_names(classes)}): training a classifier needs at "
                f"least {min_classes} classes"
            )
        self.root = root
        self.classes = classes
        self.class_to_idx = class_to_idx
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.not_files = not_files

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> Image.Image:
        """Image ``i`` as 8-bit RGB; raises whatever makes it unreadable."""
        return open_rgb(self.samples[i][0])

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        path, target = self.samples[i]
        try:
            return self.read(i), target
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error...: all mean "skip"
            warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", stacklevel=2)
            return None, target


def require_readable(dataset, split: str) -> None:
    """Raise a one-line ValueError when not one image of ``dataset`` can be read.

    Images are tried in order until the first that decodes, so a sound folder costs one decode
    however large it is, and only a folder of unreadable files is read through (each fails
    fast). Without this, a split of corrupt files trains on nothing and "evaluates" to 0.0 on 0
    images. ``split`` names it in the message ("training", "validation"...). Sources other than
    image folders (the bundled digits) are always readable.
    """
    base, indices = _unwrap(dataset)
    if not isinstance(base, ImageFolderDataset):
        return
    order = indices if indices is not None else range(len(base))
    first_error = None
    for i in order:
        try:
            base.read(i)
            return
        except Exception as err:  # noqa: BLE001 - any failure means this one is unreadable: try the next
            first_error = first_error or f"{base.samples[i][0]}: {type(err).__name__}: {err}"
    where = f"folder {base.root}" if indices is None else f"split of {base.root}"
    raise ValueError(
        f"no readable image in the {split} {where}: all {len(order)} of its image files are unreadable "
        f"(first: {first_error})"
    )


def _unwrap(dataset):
    """(the dataset under any nesting of subsets, its indices there or None for all of it)."""
    base, indices = dataset, None
    while isinstance(base, Subset):
        indices = [base.indices[i] for i in (indices if indices is not None else range(len(base)))]
        base = base.dataset
    return base, indices


def root_of(dataset) -> Path | None:
    """The folder an image-folder dataset (or a subset of one) reads, else None."""
    return getattr(_unwrap(dataset)[0], "root", None)


def _names(classes: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(c) for c in classes[:limit])
    return f"[{shown}{', ...' if len(classes) > limit else ''}] ({len(classes)})"


class LabelledSubset(Subset):
    """A Subset that keeps ``classes`` and the subset's ``targets`` (nests: subsets of subsets)."""

    def __init__(self, dataset, indices: Sequence[int]):
        super().__init__(dataset, list(indices))
        self.classes = list(dataset.classes)
        self.targets = [dataset.targets[i] for i in self.indices]


def split_holdout(dataset, fraction: float = 0.1, seed: int = 0) -> tuple[LabelledSubset, LabelledSubset]:
    """(train, val) when there is no validation folder: a seeded ``fraction`` of every class
    held out (at least one image of each class that has two)."""
    rest, held = _stratified_split(dataset.targets, fraction, seed)
    if not held:
        raise ValueError(
            f"cannot hold out {fraction:.0%} of {len(dataset)} images for validation (no class has two images): "
            "give a validation folder"
        )
    return LabelledSubset(dataset, rest), LabelledSubset(dataset, held)


def subset_fraction(dataset, fraction: float, seed: int = 0, per_class: bool = True):
    """A seeded ``fraction`` of a labelled dataset, for "train on x% of the labels" runs.

    ``per_class``: that fraction of every class, at least one image each (class balance as in
    the full set); else a uniform draw of ``round(fraction * n)`` (at least one) images.
    ``fraction >= 1`` returns the dataset itself.
    """
    if fraction >= 1:
        return dataset
    if fraction <= 0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    # seed + 1: a different draw from split_holdout's, so the subset is not biased towards
    # the images that the same seed would hold out.
    if per_class:
        targets = np.asarray(dataset.targets)
        gen = torch.Generator().manual_seed(int(seed) + 1)
        kept = []
        for c in np.unique(targets):
            idx = np.flatnonzero(targets == c)
            n = max(1, round(fraction * len(idx)))
            kept.extend(idx[torch.randperm(len(idx), generator=gen)[:n].numpy()].tolist())
        return LabelledSubset(dataset, sorted(kept))
    gen = torch.Generator().manual_seed(int(seed) + 1)
    n = max(1, round(fraction * len(dataset)))
    return LabelledSubset(dataset, sorted(torch.randperm(len(dataset), generator=gen)[:n].tolist()))


def resolve_folders(
    data: str | os.PathLike | None, val: str | os.PathLike | None = None
) -> tuple[Path | None, Path | None]:
    """(train root, val root or None) from ``--data`` and ``--val``.

    ``data/train`` (and ``data/val`` when present) if ``data`` has a ``train/`` subfolder (the
    ImageNet layout), else ``data`` itself is the training folder; ``val`` overrides the
    validation folder. ``(None, None)`` without ``data`` (the caller uses the bundled digits).
    """
    if data is None:
        if val is not None:
            raise ValueError("a validation folder was given without a training folder (--data)")
        return None, None
    root = Path(data)
    if not root.is_dir():
        raise MissingFolderError(f"data folder not found: {root}")
    if (root / "train").is_dir():
        train, default_val = root / "train", (root / "val" if (root / "val").is_dir() else None)
    elif (root / "val").is_dir():
        # Otherwise val/ would silently become a class of its own.
        raise ValueError(f"{root} has a val/ subfolder but no train/ subfolder: add {root}/train or pass it as --data")
    else:
        train, default_val = root, None
    if val is None:
        return train, default_val
    val_root = Path(val)
    if not val_root.is_dir():
        raise MissingFolderError(f"validation folder not found: {val_root}")
    return train, val_root


def check_same_classes(train, val, train_name: str = "training", val_name: str = "validation") -> None:
    """Raise a ValueError naming the differing classes when two datasets' class lists differ
    (class indices come from sorted folder names, so any difference shifts the labels)."""
    a, b = list(train.classes), list(val.classes)
    if a == b:
        return
    only_train = [c for c in a if c not in set(b)]
    only_val = [c for c in b if c not in set(a)]
    where = lambda ds: f" ({ds.root})" if getattr(ds, "root", None) else ""
    raise ValueError(
        f"the {train_name}{where(train)} and {val_name}{where(val)} data need the same class subfolders: "
        f"only in {train_name}: {_names(only_train)}; only in {val_name}: {_names(only_val)}"
    )
