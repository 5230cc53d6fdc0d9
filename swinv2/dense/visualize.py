"""Pictures and JSON of dense predictions: detections drawn on their image, label maps beside theirs.

Colours come from :func:`palette`, one per class index, the same on every run, so a class keeps its
colour across images and files. Drawing uses torchvision's ``draw_segmentation_masks`` and
``draw_bounding_boxes`` (captions in Pillow's built-in font: nothing is downloaded); PNGs are encoded
by Pillow and written atomically. Masks in JSON are COCO compressed run-length encodings (``pycocotools.mask.decode``
reads them back).
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..fileio import write_bytes
from .metrics import masks_to_rle

_GOLDEN = 0.618033988749895  # hue step: consecutive colours land far apart on the wheel, for any n
_SATURATIONS = (0.85, 0.55, 1.0)  # once hues crowd (large n), these tell neighbours apart
_VALUES = (0.95, 0.7)


def palette(n: int, seed: int = 0) -> Tensor:
    """``n`` distinct colours, uint8 ``(n, 3)``, a pure function of ``(n, seed)``: hues step by the
    golden ratio from an offset set by ``seed``, with saturation and brightness cycling so that
    colours of close hues still differ. Every colour is saturated (none grey), since class 0 is a
    real class in most segmentation sets."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"palette size must be a non-negative int, got {n!r}")
    i = torch.arange(n, dtype=torch.float64)
    hue = (seed * _GOLDEN * 0.5 + 0.05 + i * _GOLDEN) % 1.0
    sat = torch.tensor(_SATURATIONS, dtype=torch.float64)[torch.arange(n) % len(_SATURATIONS)]
    val = torch.tensor(_VALUES, dtype=torch.float64)[torch.arange(n) // len(_SATURATIONS) % len(_VALUES)]
    return (_hsv_to_rgb(hue, sat, val) * 255).round().to(torch.uint8)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """HSV in [0, 1] to RGB in [0, 1], ``(n,) x 3 -> (n, 3)``: each channel falls from V to
    V(1 - S) as the hue moves away from its own sector of the wheel (red at 0, green 1/3, blue 2/3)."""
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=h.dtype)
    k = (h[:, None] * 6 + offsets) % 6  # (n, 3)
    ramp = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] * (1 - s[:, None] * ramp)


def _check_image(image: Tensor) -> Tensor:
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a uint8 tensor (3, H, W), got {got}")
    return image.detach().cpu()


def _colour(table: Tensor, index: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in table[index])


def _detections(prediction: dict, score_threshold: float, num_names: int) -> dict[str, Tensor]:
    """The prediction's entries scoring at least ``score_threshold``, on the CPU, masks as bool
    ``(N, H, W)``; labels checked against the names (label ``l`` is ``class_names[l - 1]``)."""
    for key in ("boxes", "labels", "scores"):
        if key not in prediction:
            raise ValueError(f"prediction has no {key!r} (keys: {sorted(prediction)})")
    scores = prediction["scores"].detach().cpu().reshape(-1)
    masks = prediction.get("masks")
    sizes = {key: len(prediction[key]) for key in ("boxes", "labels", "masks") if prediction.get(key) is not None}
    if any(n != len(scores) for n in sizes.values()):
        raise ValueError(f"prediction has {len(scores)} scores but {sizes}: one entry per detection")
    keep = scores >= score_threshold
    out = {key: prediction[key].detach().cpu()[keep] for key in ("boxes", "labels", "scores")}
    labels = out["labels"]
    if len(labels) and (labels.min() < 1 or labels.max() > num_names):
        bad = int(labels.min() if labels.min() < 1 else labels.max())
        raise ValueError(f"prediction label {bad} has no name: class_names has {num_names} entries "
                         "(label l is named class_names[l - 1])")
    if masks is not None:
        masks = masks.detach()
        masks = masks[:, 0] if masks.ndim == 4 and masks.shape[1] == 1 else masks  # (N, 1, H, W) -> (N, H, W)
        if masks.ndim != 3:
            raise ValueError(f"prediction masks must be (N, H, W) or (N, 1, H, W), got {tuple(masks.shape)}")
        out["masks"] = (masks > 0.5 if masks.is_floating_point() else masks.ne(0)).cpu()[keep]
    return out


def draw_detections(image: Tensor, prediction: dict, class_names: list[str], score_threshold: float = 0.5,
                    mask_alpha: float = 0.5) -> Tensor:
    """``image`` uint8 (3, H, W) with the detections scoring at least ``score_threshold``: masks
    (cut at 0.5) blended in their class's colour, boxes outlined in it, captioned "name score".

    Where masks overlap, the higher-scoring one is shown (torchvision alone would paint overlaps
    black). Returns a new uint8 (3, H, W) tensor.
    """
    image = _check_image(image)
    found = _detections(prediction, score_threshold, len(class_names))
    colours = palette(len(class_names) + 1)  # index = label; 0 (background) is unused
    labels = found["labels"].tolist()
    if not labels:
        return image.clone()
    if "masks" in found:
        if found["masks"].shape[-2:] != image.shape[-2:]:
            raise ValueError(f"masks are {tuple(found['masks'].shape[-2:])} but the image is "
                             f"{tuple(image.shape[-2:])}")
        order = found["scores"].argsort(descending=True)
        taken = torch.zeros(image.shape[-2:], dtype=torch.bool)
        shown = torch.empty_like(found["masks"])
        for i in order.tolist():  # each pixel goes to the highest-scoring mask covering it
            shown[i] = found["masks"][i] & ~taken
            taken |= found["masks"][i]
        image = draw_segmentation_masks(image, shown, alpha=mask_alpha, colors=[_colour(colours, la) for la in labels])
    captions = [f"{class_names[la - 1]} {s:.2f}" for la, s in zip(labels, found["scores"].tolist())]
    # captions in black on a patch of the box's colour: readable over any image
    return draw_bounding_boxes(image, found["boxes"], labels=captions, colors=[_colour(colours, la) for la in labels],
                               width=2, fill_labels=True)


def draw_segmentation(image: Tensor, labels: Tensor, class_names: list[str], ignore_index: int = 255,
                      alpha: float = 0.6, legend: bool = True) -> Tensor:
    """The image (left) beside the label map blended over it (right): uint8 (3, H, 2W).

    Pixels labelled ``ignore_index`` stay as in the image. With ``legend``, a black strip below
    both names the classes present in their colours, most frequent first: (3, H + strip, 2W). The
    strip hides nothing of the picture, which matters for small images.
    """
    image = _check_image(image)
    labels = _check_labels(labels, image.shape[-2:], len(class_names), ignore_index)
    present, counts = labels[labels != ignore_index].unique(return_counts=True)
    colours = palette(len(class_names))
    right = image
    if len(present):
        masks = labels[None] == present[:, None, None]  # (P, H, W): one disjoint mask per class present
        right = draw_segmentation_masks(image, masks, alpha=alpha, colors=[_colour(colours, c) for c in present])
    pair = torch.cat([image, right], dim=2)  # (3, H, W) x 2 -> (3, H, 2W)
    if legend and len(present):
        by_frequency = present[counts.argsort(descending=True, stable=True)].tolist()
        pair = torch.cat([pair, _legend_strip(pair.shape[-1], [(class_names[c], _colour(colours, c))
                                                               for c in by_frequency])], dim=1)
    return pair


def _check_labels(labels: Tensor, size, num_classes: int, ignore_index: int) -> Tensor:
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.is_floating_point() or labels.ndim != 2:
        raise ValueError(f"labels must be an integer tensor (H, W), got {labels.dtype} {tuple(labels.shape)}")
    if size is not None and labels.shape != size:
        raise ValueError(f"labels are {tuple(labels.shape)} but the image is {tuple(size)}")
    labels = labels.long()
    valid = labels[labels != ignore_index]
    if len(valid) and (valid.min() < 0 or valid.max() >= num_classes):
        bad = int(valid.min() if valid.min() < 0 else valid.max())
        raise ValueError(f"label {bad} has no name: class_names has {num_classes} entries "
                         f"(and ignore_index is {ignore_index})")
    return labels


def _legend_strip(width: int, entries: list[tuple[str, tuple[int, int, int]]]) -> Tensor:
    """A black strip (3, h, width) with ``entries`` (name, colour) written left to right, wrapping."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = max(measure.textbbox((0, 0), "Ag", font=font)[3], 1) + 2
    places, x, y = [], 3, 2
    for name, colour in entries:
        size = int(measure.textlength(name, font=font)) + 16  # unhinted glyphs run a little past the measure
        if x > 3 and x + size > width:  # wrap to the next line
            x, y = 3, y + line
        places.append((x, y, name, colour))
        x += size
    canvas = Image.new("RGB", (width, y + line + 2), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"  # no anti-aliasing: each name is drawn in exactly its class's colour
    for x, y, name, colour in places:
        draw.text((x, y), name, fill=colour, font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)  # (h, width, 3) -> (3, h, width)


def save_png(image: Tensor, path: str | os.PathLike) -> None:
    """Write a uint8 (3, H, W) or (1, H, W) image as a PNG, atomically (a reader never sees half)."""
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"save_png {path}: image must be a uint8 tensor (3, H, W) or (1, H, W), got {got}")
    pixels = image.detach().cpu().permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def save_label_png(labels: Tensor, path: str | os.PathLike) -> None:
    """Write a label map (H, W) as an 8-bit grayscale PNG whose pixel values are the class
    indices (the ignore label, e.g. 255, kept as it is), for tools that read label PNGs."""
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.is_floating_point() or labels.ndim != 2:
        raise ValueError(f"save_label_png {path}: labels must be an integer tensor (H, W), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() > 255):
        bad = int(labels.min() if labels.min() < 0 else labels.max())
        raise ValueError(f"save_label_png {path}: label {bad} does not fit an 8-bit PNG (0..255)")
    save_png(labels.to(torch.uint8)[None], path)  # (H, W) -> (1, H, W)


def detections_to_json(prediction: dict, class_names: list[str], score_threshold: float = 0.0) -> list[dict]:
    """The detections scoring at least ``score_threshold`` as json-ready dicts: ``class`` (name),
    ``label``, ``score`` (to 1e-4), ``box`` [x0, y0, x1, y1] in pixels (to 0.01) and, when the
    prediction has masks, ``mask`` as COCO compressed RLE (``{"size": [H, W], "counts": str}``)."""
    found = _detections(prediction, score_threshold, len(class_names))
    rles = masks_to_rle(found["masks"]) if "masks" in found else None
    out = []
    for k, (label, score, box) in enumerate(zip(found["labels"].tolist(), found["scores"].tolist(),
                                                found["boxes"].tolist())):
        entry = {"class": class_names[label - 1], "label": label, "score": round(score, 4),
                 "box": [round(v, 2) for v in box]}
        if rles is not None:
            entry["mask"] = rles[k]
        out.append(entry)
    return out


def segmentation_to_json(labels: Tensor, class_names: list[str], ignore_index: int = 255) -> dict:
    """A label map as a self-contained json-ready dict: ``height``, ``width``, ``ignored`` (pixels
    labelled ``ignore_index``) and ``classes``, one entry per class present with ``label``,
    ``class``, ``pixels``, ``fraction`` (of all H x W pixels) and ``mask`` as COCO compressed RLE.
    RLE rather than a side file keeps the map with its numbers in one place; the classes' masks
    are disjoint, so they rebuild the map exactly."""
    labels = _check_labels(labels, None, len(class_names), ignore_index)
    height, width = labels.shape
    present, counts = labels[labels != ignore_index].unique(return_counts=True)
    rles = masks_to_rle(labels[None] == present[:, None, None]) if len(present) else []  # (P, H, W)
    total = max(height * width, 1)
    classes = [{"label": int(c), "class": class_names[int(c)], "pixels": int(n), "fraction": int(n) / total,
                "mask": rle} for c, n, rle in zip(present.tolist(), counts.tolist(), rles)]
    return {"height": int(height), "width": int(width), "ignored": int((labels == ignore_index).sum()),
            "classes": classes}
