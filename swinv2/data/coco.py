"""COCO 2017 instances (boxes, labels and instance masks) as a map-style dataset.

Layout (the official one)::

    root/annotations/instances_{split}2017.json
    root/{split}2017/<file_name of each image>

Every image of the JSON is an item, those without objects included (their targets are empty),
as COCO evaluation counts them. Labels are positions in the categories sorted by COCO id, plus
one: 0 is the background class of torchvision's detectors. The JSON is checked whole when the
dataset is built, so a broken annotation fails before training rather than hours into it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .datasets import MissingFolderError
from .images import open_rgb

try:
    from pycocotools import mask as _mask_utils
except ModuleNotFoundError:  # part of the dense extra: swinv2 imports without it
    _mask_utils = None


def _masks():
    """pycocotools' mask module, or a one-line error naming the extra that installs it."""
    if _mask_utils is None:
        raise ModuleNotFoundError("COCO annotations need pycocotools: pip install 'swinv2[dense]'", name="pycocotools")
    return _mask_utils

# A box narrower or lower than this, once clipped to the image, holds no object to learn
# (mmdet's filter); such annotations are dropped and counted.
MIN_BOX_SIDE = 1.0

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


class CocoDetection(Dataset):
    """``ds[i] -> (image, target)`` for image ``i`` of ``root/annotations/instances_{split}2017.json``,
    or None when its file cannot be read (a warning names it; the loader's collate counts it).

    ``image`` is a ``tv_tensors.Image`` uint8 (3, H, W); ``target`` holds ``boxes``
    (``tv_tensors.BoundingBoxes`` XYXY float32 in pixels, canvas (H, W)), ``labels`` int64,
    ``masks`` (``tv_tensors.Mask`` uint8 (N, H, W), only with ``masks=True``), ``iscrowd``
    int64, ``area`` float32 (the annotation's ``area``, which COCO evaluation bins by; the box's
    area where it is missing) and ``image_id`` (int).

    ``keep_crowd=False`` (training) drops ``iscrowd=1`` regions, which mark groups too dense to
    outline one by one; evaluation keeps them (``keep_crowd=True``) so that detections there
    are ignored rather than counted false. Boxes under :data:`MIN_BOX_SIDE` pixels after
    clipping are dropped: :attr:`degenerate` counts them over the whole JSON when it is read,
    :attr:`dropped_boxes` over the items served so far in this process.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, masks: bool = True, keep_crowd: bool = False):
        _masks()  # the dense extra, before any file is read
        self.root, self.split = Path(root), split
        self.masks, self.keep_crowd = masks, keep_crowd
        self.annotation_file = self.root / "annotations" / f"instances_{split}2017.json"
        self.image_folder = self.root / f"{split}2017"
        if not self.annotation_file.is_file():
            raise MissingFolderError(
                f"COCO annotations not found: {self.annotation_file} (expected root/annotations/"
                f"instances_{split}2017.json next to root/{split}2017/ holding the images)"
            )
        if not self.image_folder.is_dir():
            raise MissingFolderError(f"COCO image folder not found: {self.image_folder} (the images of "
                                     f"{self.annotation_file.name} go in root/{split}2017/)")
        data = _read_json(self.annotation_file)
        where = self.annotation_file
        categories = sorted(data["categories"], key=lambda c: _require(c, ("id", "name"), "category", where)["id"])
        self.category_ids: list[int] = [int(c["id"]) for c in categories]
        self.classes: list[str] = [str(c["name"]) for c in categories]
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"{where}: category ids repeat: {self.category_ids}")
        label_of = {cid: k + 1 for k, cid in enumerate(self.category_ids)}

        self.images: list[dict] = [_require(im, _IMAGE_KEYS, "image", where) for im in data["images"]]
        position = {}
        for k, im in enumerate(self.images):
            if im["id"] in position:
                raise ValueError(f"{where}: image id {im['id']} appears twice")
            position[im["id"]] = k
        self._objects: list[list[tuple]] = [[] for _ in self.images]
        self._degenerate_of = [0] * len(self.images)
        for ann in data["annotations"]:
            _require(ann, _ANNOTATION_KEYS, "annotation", where)
            if ann["category_id"] not in label_of:
                raise ValueError(f"{where}: annotation {ann['id']} has category_id {ann['category_id']}, which is not "
                                 "among the categories")
            if ann["image_id"] not in position:
                raise ValueError(f"{where}: annotation {ann['id']} refers to image id {ann['image_id']}, which is not "
                                 "among the images")
            crowd = int(ann.get("iscrowd", 0))
            if crowd and not keep_crowd:
                continue
            k = position[ann["image_id"]]
            height, width = int(self.images[k]["height"]), int(self.images[k]["width"])
            if masks:
                _check_segmentation(ann, height, width, where)
            box = _clipped_box(ann["bbox"], height, width, ann["id"], where)
            area = float(ann["area"]) if "area" in ann else float((box[2] - box[0]) * (box[3] - box[1]))
            if min(box[2] - box[0], box[3] - box[1]) < MIN_BOX_SIDE or area <= 0:
                self._degenerate_of[k] += 1
                continue
            self._objects[k].append((box, label_of[ann["category_id"]], crowd, area, ann.get("segmentation")))
        self.dropped_boxes = 0
        self.skipped = 0

    @property
    def degenerate(self) -> int:
        """Annotations of this split dropped for a degenerate box (crowd ones counted only when kept)."""
        return sum(self._degenerate_of)

    @property
    def class_names(self) -> list[str]:
        """Names indexed by a predicted label: ``class_names[0]`` is the background."""
        return ["__background__", *self.classes]

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, i: int) -> Path:
        return self.image_folder / self.images[i]["file_name"]

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict] | None:
        info, path = self.images[i], self.image_path(i)
        try:
            pixels = np.asarray(open_rgb(path))  # (H, W, 3) uint8
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError...: all mean "skip"
            self.skipped += 1
            warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", stacklevel=2)
            return None
        height, width = pixels.shape[:2]
        if (height, width) != (int(info["height"]), int(info["width"])):
            raise ValueError(f"{path} is {width}x{height} pixels but {self.annotation_file} says "
                             f"{info['width']}x{info['height']} (width x height)")
        self.dropped_boxes += self._degenerate_of[i]
        image = tv_tensors.Image(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # (3, H, W)
        objects = self._objects[i]
        boxes = torch.tensor([o[0] for o in objects], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([o[1] for o in objects], dtype=torch.int64),
            "iscrowd": torch.tensor([o[2] for o in objects], dtype=torch.int64),
            "area": torch.tensor([o[3] for o in objects], dtype=torch.float32),
            "image_id": int(info["id"]),
        }
        if self.masks:
            stack = np.zeros((len(objects), height, width), dtype=np.uint8)  # (N, H, W)
            for n, o in enumerate(objects):
                stack[n] = decode_segmentation(o[4], height, width)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stack))
        return image, target


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a uint8 (H, W) 0/1 mask.

    Polygons hold vertices on pixel edges: the square ``[x, x+1) x [y, y+1)`` is pixel (x, y).
    Polygons of fewer than three points enclose nothing and are left out; pycocotools would
    read a four-number polygon as a box.
    """
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = _masks().merge(_masks().frPyObjects(polygons, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = _masks().frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    return _masks().decode(rle)


def encode_rle(mask: np.ndarray) -> dict:
    """A 0/1 (H, W) mask as COCO's compressed RLE, ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    rle = _masks().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path} as JSON: {type(err).__name__}: {err}") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path} is not a COCO instances file: no {', '.join(repr(k) for k in missing)}")
    return data


def _require(record, keys: tuple[str, ...], kind: str, where: Path) -> dict:
    """``record`` itself once it is a dict holding ``keys``, else a one-line ValueError."""
    missing = [k for k in keys if not isinstance(record, dict) or k not in record]
    if missing:
        name = record.get("id", "?") if isinstance(record, dict) else repr(record)[:40]
        raise ValueError(f"{where} is not a COCO instances file: {kind} {name} has no {', '.join(missing)}")
    return record


def _clipped_box(bbox, height: int, width: int, ann_id, where: Path) -> list[float]:
    """COCO's [x, y, w, h] as [x1, y1, x2, y2] clipped to the image."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: annotation {ann_id} has bbox {bbox!r}, not four numbers [x, y, w, h]") from None
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    return [x1, y1, max(min(x + w, width), x1), max(min(y + h, height), y1)]


def _check_segmentation(ann: dict, height: int, width: int, where: Path) -> None:
    seg = ann.get("segmentation")
    if isinstance(seg, list) and all(isinstance(p, list) for p in seg):
        return
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if [int(s) for s in seg["size"]] != [height, width]:
            raise ValueError(f"{where}: masks of the wrong size: annotation {ann['id']} has an RLE of size "
                             f"{list(seg['size'])} on an image of (height, width) {[height, width]}")
        return
    raise ValueError(f"{where}: annotation {ann['id']} has no polygon or RLE segmentation (pass masks=False for "
                     "boxes only)")


__all__ = ["MIN_BOX_SIDE", "CocoDetection", "decode_segmentation", "encode_rle"]
