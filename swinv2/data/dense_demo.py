"""Small detection and segmentation sets built from real images that ship with the libraries,
so that a dense run can be tried end to end without a download.

Each image is a crop of a real photograph or texture from scikit-image (grass, gravel, brick,
the cameraman, coffee, the astronaut, a stained tissue, a cat) with 0 to 4 of scikit-learn's
handwritten digit scans (8x8, 10 classes) enlarged to 20-48 pixels and painted on it in a
colour that stands out from what lies under it. The annotations are exact: an object's mask is
the set of painted pixels and its box that mask's tight box. Digits never touch (two clear
pixels between them), so no mask hides another. Validation digits come from other scans than
training ones.

* :func:`build_detection_demo` writes the COCO 2017 layout, with polygon and compressed RLE
  segmentations in turn (a polygon only where it reproduces the digit closely; the painted
  pixels are then the polygon's own), and in validation crowd regions (clusters of small
  digits of one class, as uncompressed RLE with ``iscrowd=1``).
* :func:`build_segmentation_demo` writes the ADE20K layout, stuff and things: each image is two
  regions of different textures split by a random line (labels 1..8, one per texture) with the
  digits on top (label 9, "digit"); 0 (ignored after ``reduce_zero_label``) is a one-pixel ring
  round each digit, where a resized image blends digit and background.

Both are pure functions of their arguments (the same bytes for the same seed) and are kept in
a cache folder keyed by them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import write_error
from .coco import decode_segmentation, encode_rle

try:  # part of the dense extra: swinv2 imports without them
    from skimage import data as _skdata
    from skimage.measure import find_contours
    from sklearn.datasets import load_digits
    _MISSING = None
except ModuleNotFoundError as _err:
    _MISSING = str(_err.name).split(".")[0]


def _require() -> None:
    """A one-line error naming the extra when scikit-image or scikit-learn is missing."""
    if _MISSING is not None:
        package = {"skimage": "scikit-image", "sklearn": "scikit-learn"}.get(_MISSING, _MISSING)
        raise ModuleNotFoundError(f"the bundled demo images need {package}: pip install 'swinv2[dense]'",
                                  name=_MISSING)

FORMAT_VERSION = 2  # raise when the images or annotations change: older cached sets are then rebuilt
_TEXTURES = ("grass", "gravel", "brick", "camera", "coffee", "astronaut", "immunohistochemistry", "chelsea")
_MARKER = "demo.json"
_MIN_CONTRAST = 96  # luminance difference (0..255) between a digit and the mean background under it
_POLYGON_MIN_IOU = 0.9  # a polygon outline filling a digit's holes more than this is replaced by RLE
_CLEARANCE = 2  # pixels kept free around every digit


def build_detection_demo(root: str | os.PathLike | None = None, *, image_size: int = 128, train_images: int = 240,
                         val_images: int = 60, seed: int = 0) -> Path:
    """The COCO-layout digit set at ``root`` (built there unless it holds this very set), or in
    the cache folder when ``root`` is None; returns its folder. Categories "0".."9" have ids 1..10."""
    _require()
    params = _check(image_size, train_images, val_images, seed)
    return build_cached("coco-digits", root, params, _write_coco)


def build_segmentation_demo(root: str | os.PathLike | None = None, *, image_size: int = 128,
                            train_images: int = 240, val_images: int = 60, seed: int = 0) -> Path:
    """The ADE20K-layout set (texture regions and digits) at ``root`` or in the cache folder;
    returns its folder. ``classes.txt`` names the labels after ``reduce_zero_label``: the eight
    textures, then "digit"."""
    _require()
    params = _check(image_size, train_images, val_images, seed)
    return build_cached("ade-digits", root, params, _write_ade)


def cache_folder() -> Path:
    """Where sets built without a ``root`` go: ``$SWINV2_CACHE_DIR/demo``, else ``~/.cache/swinv2/demo``."""
    base = os.environ.get("SWINV2_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "swinv2")
    return Path(base) / "demo"


def _check(image_size: int, train_images: int, val_images: int, seed: int) -> dict:
    if int(image_size) < 32:
        raise ValueError(f"image_size must be at least 32 pixels (room for digits), got {image_size}")
    if int(train_images) < 1 or int(val_images) < 1:
        raise ValueError(f"train_images and val_images must be at least 1, got {train_images} and {val_images}")
    return {"image_size": int(image_size), "train_images": int(train_images), "val_images": int(val_images),
            "seed": int(seed)}


def build_cached(name: str, root, params: dict, write: Callable[[Path, dict], None],
                 version: int = FORMAT_VERSION) -> Path:
    """The demo set ``name`` built by ``write(folder, params)`` at ``root``, or in the cache under
    a key of its name, ``version`` and ``params``; reused when already complete. It is written
    into a temporary sibling folder, its marker file last, and renamed into place: a folder with
    the marker is complete, and an interrupted build leaves no half set."""
    marker = {"name": name, "format": version, **params}
    if root is None:
        key = hashlib.sha256(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:12]
        target = cache_folder() / f"{name}-{key}"
    else:
        target = Path(root)
    if _complete(target, marker):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} is not empty and holds no {name} demo set built with {params}: give a new or "
                         "empty folder")
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        write(tmp, params)
        (tmp / _MARKER).write_text(json.dumps(marker, sort_keys=True, indent=1) + "\n")
        if target.is_dir():
            target.rmdir()  # empty: checked above
        os.rename(tmp, target)
    except OSError as err:
        if _complete(target, marker):  # another process finished the same set first
            return target
        raise write_error(err, target) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _complete(folder: Path, marker: dict) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _write_coco(folder: Path, params: dict) -> None:
    (folder / "annotations").mkdir()
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
    for split, count in (("train", params["train_images"]), ("val", params["val_images"])):
        (folder / f"{split}2017").mkdir()
        rng = np.random.default_rng([params["seed"], 0 if split == "train" else 1])
        sources = _Sources(split)
        images, annotations = [], []
        for i in range(count):
            crowd = split == "val" and i % 8 == 0  # the first validation image always has one
            pixels, objects = _scene(rng, sources, params["image_size"], shape=_coco_shape, crowd=crowd)
            file_name = f"{i + 1:012d}.png"
            Image.fromarray(pixels).save(folder / f"{split}2017" / file_name, format="PNG", compress_level=1)
            height, width = pixels.shape[:2]
            images.append({"id": i + 1, "file_name": file_name, "height": height, "width": width})
            for digit, mask, segmentation, is_crowd in objects:
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                box = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": digit + 1,
                                    "bbox": box, "area": int(mask.sum()), "iscrowd": int(is_crowd),
                                    "segmentation": segmentation})
        data = {"info": {"description": "handwritten digits on real textures", "version": str(FORMAT_VERSION)},
                "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        (folder / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))


def _write_ade(folder: Path, params: dict) -> None:
    # Stuff and things, as in ADE20K: each image is two regions of different textures split by a
    # random line (a class per texture), with digits pasted on top (one class, "digit"). Texture
    # is told by local appearance, which a network trained from scratch learns in minutes; the
    # ten digit classes are left to the detection demo, where whole objects are classified.
    names = [*_TEXTURES, "digit"]
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    digit_label = len(names)  # labels in the files are 1..N (0: ignored), as ADE20K's
    for split, count in (("training", params["train_images"]), ("validation", params["val_images"])):
        images, labels = folder / "images" / split, folder / "annotations" / split
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        rng = np.random.default_rng([params["seed"], 0 if split == "training" else 1])
        sources = _Sources("train" if split == "training" else "val")
        for i in range(count):
            ground, label = _two_textures(rng, sources, params["image_size"])
            pixels, objects = _scene(rng, sources, params["image_size"], shape=_plain_mask, crowd=False,
                                     ground=ground)
            for _, mask, _, _ in objects:
                label[_dilate(mask, 1) & ~mask] = 0  # the blended edge: ignored
                label[mask] = digit_label
            stem = f"demo_{split}_{i + 1:08d}"
            Image.fromarray(pixels).save(images / f"{stem}.png", format="PNG", compress_level=1)
            Image.fromarray(label).save(labels / f"{stem}.png", format="PNG")


def _two_textures(rng: np.random.Generator, sources: _Sources, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (size, size, 3), labels uint8 (size, size)): two different textures on either
    side of a random line through the middle half of the image; labels 1 + texture index."""
    first, second = (int(k) for k in rng.choice(len(sources.textures), size=2, replace=False))
    angle = rng.uniform(0, np.pi)
    centre = rng.uniform(size * 0.25, size * 0.75, size=2)
    rows, cols = np.mgrid[0:size, 0:size]
    side = (cols - centre[0]) * np.cos(angle) + (rows - centre[1]) * np.sin(angle) > 0  # (size, size)
    pixels = np.where(side[..., None], _texture_crop(rng, sources, size, second),
                      _texture_crop(rng, sources, size, first))
    labels = np.where(side, second + 1, first + 1).astype(np.uint8)
    return pixels, labels


class _Sources:
    """The textures (RGB uint8) and the digit scans (0..1 float, (N, 8, 8)) of one split."""

    def __init__(self, split: str):
        self.textures = []
        for name in _TEXTURES:
            image = getattr(_skdata, name)()
            grey = image.ndim == 2
            self.textures.append((np.stack([image] * 3, -1) if grey else image[..., :3], grey))  # (H, W, 3)
        digits = load_digits()
        keep = np.arange(len(digits.target)) % 5 != 0 if split == "train" else np.arange(len(digits.target)) % 5 == 0
        self.scans = (digits.images[keep] / 16.0).astype(np.float32)
        self.targets = digits.target[keep]


def _scene(rng: np.random.Generator, sources: _Sources, size: int, *, shape: Callable, crowd: bool,
           ground: np.ndarray | None = None):
    """(image uint8 (size, size, 3), [(digit, mask bool (size, size), segmentation, is_crowd)]):
    digits pasted on ``ground`` (default: a crop of one random texture)."""
    pixels = _background(rng, sources, size) if ground is None else ground.copy()
    occupied = np.zeros((size, size), dtype=bool)
    objects = []
    kinds = (["crowd"] if crowd else []) + ["digit"] * int(rng.integers(0, 5))
    for kind in kinds:
        digit, patch = _crowd_patch(rng, sources, size) if kind == "crowd" else _digit_patch(rng, sources, size)
        for _ in range(20):  # a few places to try; the digit is left out where none is clear
            top, left = (int(v) for v in rng.integers(0, size - np.array(patch.shape) + 1))
            mask = np.zeros((size, size), dtype=bool)
            mask[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
            if (_dilate(mask, _CLEARANCE) & occupied).any():
                continue
            if kind == "crowd":
                segmentation = _uncompressed_rle(mask)
            else:
                mask, segmentation = shape(mask, len(objects))  # a polygon's mask differs a little: checked again
            if mask.any() and not (_dilate(mask, _CLEARANCE) & occupied).any():
                break
        else:
            continue
        pixels[mask] = _contrasting_colour(rng, pixels[_dilate(mask, 1)])
        occupied |= mask
        objects.append((digit, mask, segmentation, kind == "crowd"))
    return pixels, objects


def _background(rng: np.random.Generator, sources: _Sources, size: int) -> np.ndarray:
    return _texture_crop(rng, sources, size, int(rng.integers(len(sources.textures))))


def _texture_crop(rng: np.random.Generator, sources: _Sources, size: int, k: int) -> np.ndarray:
    """A random square crop of texture ``k``, resized to (size, size, 3) uint8 (grey ones tinted)."""
    texture, grey = sources.textures[k]
    smallest = min(texture.shape[:2])
    side = int(rng.integers(min(size, smallest), smallest + 1))
    top, left = int(rng.integers(0, texture.shape[0] - side + 1)), int(rng.integers(0, texture.shape[1] - side + 1))
    crop = Image.fromarray(texture[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
    pixels = np.asarray(crop, dtype=np.float32)  # (size, size, 3)
    if grey:  # a tint, so that grey textures do not all look alike
        pixels = pixels * rng.uniform(0.55, 1.0, size=3).astype(np.float32)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _digit_patch(rng: np.random.Generator, sources: _Sources, size: int, side: int | None = None):
    """(class, bool (side, side)): one scan enlarged bilinearly and thresholded at 35% ink."""
    if side is None:
        largest = min(48, size // 2)
        side = int(rng.integers(min(20, largest), largest + 1))
    k = int(rng.integers(len(sources.targets)))
    scan = Image.fromarray(sources.scans[k]).resize((side, side), Image.BILINEAR)
    return int(sources.targets[k]), np.asarray(scan) > 0.35


def _crowd_patch(rng: np.random.Generator, sources: _Sources, size: int):
    """(class, bool (r, r)): three small scans of one class, overlapping: too close to outline apart."""
    side = int(min(size // 2, 40))
    digit = int(rng.integers(10))
    of_class = np.flatnonzero(sources.targets == digit)
    patch = np.zeros((side, side), dtype=bool)
    for _ in range(3):
        small = int(rng.integers(min(12, side), min(18, side) + 1))
        k = int(of_class[rng.integers(len(of_class))])
        scan = np.asarray(Image.fromarray(sources.scans[k]).resize((small, small), Image.BILINEAR)) > 0.35
        top, left = (int(v) for v in rng.integers(0, side - small + 1, size=2))
        patch[top:top + small, left:left + small] |= scan
    return digit, patch


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour whose luminance differs from the mean of ``under`` (N, 3) by enough to read."""
    weights = np.array([0.299, 0.587, 0.114])
    mean = float(under.astype(np.float64).mean(0) @ weights)
    for _ in range(30):
        colour = rng.integers(0, 256, size=3)
        if abs(float(colour @ weights) - mean) >= _MIN_CONTRAST:
            return colour.astype(np.uint8)
    return np.full(3, 0 if mean > 127 else 255, dtype=np.uint8)


def _coco_shape(mask: np.ndarray, k: int) -> tuple[np.ndarray, object]:
    """The ``k``-th digit of an image as polygons (even ``k``, where they fit) or compressed RLE."""
    return _as_polygons(mask) if k % 2 == 0 else _as_rle(mask)


def _plain_mask(mask: np.ndarray, k: int) -> tuple[np.ndarray, None]:
    return mask, None


def _as_rle(mask: np.ndarray) -> tuple[np.ndarray, dict]:
    return mask, encode_rle(mask)


def _as_polygons(mask: np.ndarray) -> tuple[np.ndarray, object]:
    """(the polygons' own mask, the polygons) from the digit's outline, or RLE where the outline
    does not reproduce the digit closely (polygons cannot hold the holes of a 0, 6, 8 or 9)."""
    polygons = []
    for contour in find_contours(np.pad(mask, 1).astype(np.float32), 0.5):  # (n, 2) row, col; padded by 1
        contour = _drop_collinear(contour[:-1])  # closed: the last point repeats the first
        if len(contour) < 3:
            continue
        # pixel centres sit at +0.5 on COCO's pixel-edge grid: the pad's -1 and the +0.5 give -0.5
        xy = np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1)
        polygons.append([round(float(v), 2) for v in xy.ravel()])
    height, width = mask.shape
    drawn = decode_segmentation(polygons, height, width).astype(bool) if polygons else np.zeros_like(mask)
    union = (drawn | mask).sum()
    if not polygons or (drawn & mask).sum() < _POLYGON_MIN_IOU * union:
        return _as_rle(mask)
    return drawn, polygons


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """A closed outline (n, 2) without the points that lie on the straight line through their
    neighbours: the same polygon with a fraction of the vertices (outlines of pixel masks run
    along the grid)."""
    before, after = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return points[np.abs(turn) > 1e-9]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, as crowd regions are stored: run lengths over the column-major
    pixels, starting with a run of zeros (of length 0 when the first pixel is set)."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    counts = ([0] if flat[0] else []) + [int(r) for r in runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels in the 8 directions (a square structuring element)."""
    grown = mask.copy()
    height, width = mask.shape
    padded = np.pad(mask, radius)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            grown |= padded[dy:dy + height, dx:dx + width]
    return grown


__all__ = ["FORMAT_VERSION", "build_detection_demo", "build_segmentation_demo", "cache_folder"]
