"""ADE20K scene parsing (the ADEChallengeData2016 layout) as a map-style dataset.

Layout (the official one)::

    root/images/{split}/<stem>.jpg        (or .jpeg, .png)
    root/annotations/{split}/<stem>.png   8-bit label maps, 0 = "other", 1..150 = the classes
    root/objectInfo150.csv                (or objectInfo150.txt, or classes.txt: optional)

With ``reduce_zero_label`` (mmseg's convention for ADE20K) label 0 becomes 255, the ignored
index, and every other label k becomes k - 1, so the 150 classes are 0..149 and "other" pixels
count neither as right nor as wrong.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .datasets import MissingFolderError
from .images import is_regular_file, open_rgb

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_LABEL_MODES = ("L", "P")  # 8-bit grey or palette: the pixel values are the labels


class ADE20KSegmentation(Dataset):
    """``ds[i] -> (image, mask)``: ``tv_tensors.Image`` uint8 (3, H, W) and ``tv_tensors.Mask``
    int64 (H, W) of labels in ``0..len(classes)-1`` or :data:`IGNORE_INDEX`; or None when the
    image or its annotation cannot be read (a warning names it; the loader's collate counts it).

    ``classes`` come from the first of ``root/objectInfo150.csv``, ``root/objectInfo150.txt``
    (the official files: the first name of each row) and ``root/classes.txt`` (one name per
    line) that exists. Each names the file labels 1..N, which are the served labels 0..N-1 after
    the reduction; without it label 0 is served too and named "other".
    Without any of them the class count is ``num_classes`` or, when that is None, found by
    reading every training annotation for its largest label (slow on the full set: one pass at
    construction), and the names are ``"class 0"``, ``"class 1"``... Labels beyond the class
    count raise a ValueError naming the file when the item is read.
    """

    def __init__(self, root: str | os.PathLike, split: str = "training", *, reduce_zero_label: bool = True,
                 num_classes: int | None = None):
        self.root, self.split, self.reduce_zero_label = Path(root), split, reduce_zero_label
        self.image_folder = self.root / "images" / split
        self.annotation_folder = self.root / "annotations" / split
        layout = (f"(expected {self.root}/images/{split}/*.jpg with one label map each in "
                  f"{self.root}/annotations/{split}/*.png of the same stem)")
        for folder in (self.image_folder, self.annotation_folder):
            if not folder.is_dir():
                raise MissingFolderError(f"ADE20K folder not found: {folder} {layout}")
        images = sorted(p for p in self.image_folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        not_files = [p for p in images if not is_regular_file(p)]
        if not_files:
            warnings.warn(f"skipping {len(not_files)} entries of {self.image_folder} named like images but not "
                          f"regular files (FIFO, socket, device or broken link), e.g. {not_files[0]}", stacklevel=2)
        images = [p for p in images if is_regular_file(p)]
        if not images:
            raise ValueError(f"{self.image_folder} holds no images {layout}")
        self.samples: list[tuple[Path, Path]] = []
        for path in images:
            label = self.annotation_folder / f"{path.stem}.png"
            if not label.exists():
                raise ValueError(f"image {path} has no annotation: {label} is missing")
            self.samples.append((path, label))
        self.classes = self._find_classes(num_classes)
        self.skipped = 0

    def _find_classes(self, num_classes: int | None) -> list[str]:
        names, source = _read_class_file(self.root)
        if names is not None and not self.reduce_zero_label:
            names = ["other", *names]  # class files name labels 1..N; label 0 is kept as "other"
        if names is None:
            count = num_classes if num_classes is not None else self._scan_class_count()
            return [f"class {k}" for k in range(count)]
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"num_classes={num_classes} but {source} names {len(names)} classes")
        return names

    def _scan_class_count(self) -> int:
        folder = self.root / "annotations" / "training"
        if not folder.is_dir():
            folder = self.annotation_folder
        largest = -1
        for path in sorted(folder.glob("*.png")):
            try:
                labels = np.unique(_read_labels(path))
            except _LabelFormatError:
                raise
            except Exception:  # noqa: BLE001 - an unreadable map is skipped (and reported) when it is served
                continue
            labels = labels[labels != IGNORE_INDEX]
            if labels.size:
                largest = max(largest, int(labels[-1]))
        count = largest if self.reduce_zero_label else largest + 1
        if count <= 0:
            raise ValueError(f"no class label found in the annotations of {folder}: add {self.root}/classes.txt "
                             "or pass num_classes")
        return count

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask] | None:
        image_path, label_path = self.samples[i]
        try:
            pixels = np.asarray(open_rgb(image_path))  # (H, W, 3) uint8
            labels = _read_labels(label_path)  # (H, W) uint8
        except _LabelFormatError:
            raise
        except Exception as err:  # a corrupt or truncated file of either kind: skip the pair
            self.skipped += 1
            warnings.warn(f"skipping unreadable pair {image_path}: {type(err).__name__}: {err}", stacklevel=2)
            return None
        if labels.shape != pixels.shape[:2]:
            raise ValueError(f"annotation {label_path} is {labels.shape[1]}x{labels.shape[0]} but its image "
                             f"{image_path.name} is {pixels.shape[1]}x{pixels.shape[0]} (width x height)")
        mask = torch.from_numpy(labels.astype(np.int64))  # (H, W)
        if self.reduce_zero_label:
            mask = torch.where(mask == 0, IGNORE_INDEX, mask - 1)
            mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX  # 255 was ignored already: 255 - 1 stays ignored
        bad = mask[(mask >= len(self.classes)) & (mask != IGNORE_INDEX)]
        if bad.numel():
            raw = int(bad.max()) + (1 if self.reduce_zero_label else 0)
            raise ValueError(f"annotation {label_path} holds label {raw}, beyond the {len(self.classes)} classes"
                             f"{' after reduce_zero_label' if self.reduce_zero_label else ''}")
        image = tv_tensors.Image(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # (3, H, W)
        return image, tv_tensors.Mask(mask)


class _LabelFormatError(ValueError):
    """An annotation that decodes but holds no 8-bit labels (an RGB rendering, 16-bit...)."""


def _read_labels(path: Path) -> np.ndarray:
    """The label map at ``path`` as uint8 (H, W): palette indices or grey levels, never colours."""
    if not is_regular_file(path):
        raise OSError(f"{path} is not a regular file")
    with Image.open(path) as img:
        if img.mode not in _LABEL_MODES:
            raise _LabelFormatError(f"annotation {path} has pixel mode {img.mode}: label maps must be 8-bit "
                                    "grey or palette PNGs whose values are the labels")
        return np.array(img, dtype=np.uint8)


def _read_class_file(root: Path) -> tuple[list[str] | None, Path | None]:
    """(names, the file they came from), or (None, None) when the folder has no class file."""
    for name in ("objectInfo150.csv", "objectInfo150.txt"):
        path = root / name
        if path.is_file():
            return _read_object_info(path), path
    path = root / "classes.txt"
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise ValueError(f"{path} names no class (one name per line)")
        return names, path
    return None, None


def _read_object_info(path: Path) -> list[str]:
    """The Name column of an official objectInfo150 file in Idx order, first synonym of each."""
    text = path.read_text(encoding="utf-8")
    rows = list(csv.reader(text.splitlines(), delimiter="\t" if path.suffix == ".txt" else ","))
    header = [h.strip() for h in rows[0]] if rows else []
    if "Name" not in header:
        raise ValueError(f"{path} has no Name column in its header (got {header})")
    name_at, idx_at = header.index("Name"), header.index("Idx") if "Idx" in header else None
    entries = []
    for n, row in enumerate(rows[1:], start=1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= name_at:
            raise ValueError(f"{path} line {n + 1} has no Name field")
        try:
            order = int(row[idx_at]) if idx_at is not None else n
        except ValueError:
            raise ValueError(f"{path} line {n + 1}: Idx {row[idx_at]!r} is not a number") from None
        entries.append((order, re.split(r"[;,]", row[name_at])[0].strip()))
    if not entries:
        raise ValueError(f"{path} names no class")
    return [name for _, name in sorted(entries)]


__all__ = ["IGNORE_INDEX", "ADE20KSegmentation"]
