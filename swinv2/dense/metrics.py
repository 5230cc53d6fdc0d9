"""Dense-prediction metrics: COCO box and mask AP, and semantic segmentation IoU as mmseg reports it.

Both metrics accumulate over a whole evaluation set and compute once at the end, on every process
of a distributed run (each process must call ``compute``: it is a collective):

- :class:`DetectionMetric` keeps torchmetrics' ``MeanAveragePrecision`` as the accumulator (boxes on
  the CPU, masks run-length encoded as they arrive, a few bytes per object) and evaluates with
  ``faster_coco_eval`` or ``pycocotools``. Its states are gathered in one ``all_gather_object``:
  torchmetrics' own gather issues one collective per image, so processes holding different numbers
  of images (or none) would deadlock or abort; one object per process works for any count.
- :class:`SegmentationMetric` sums a confusion matrix (torchmetrics' ``MulticlassConfusionMatrix``),
  one tensor of fixed shape, which torchmetrics sums across processes; a process that saw no image
  contributes zeros.

The libraries come with the ``dense`` extra; without them, constructing a metric raises one line
naming it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

INSTALL_HINT = "pip install 'swinv2[dense]'"

try:
    from torchmetrics.classification import MulticlassConfusionMatrix
    from torchmetrics.detection import MeanAveragePrecision
except ImportError as err:
    MulticlassConfusionMatrix = MeanAveragePrecision = None
    _TORCHMETRICS_ERROR: str | None = f"{err}"
else:
    _TORCHMETRICS_ERROR = None

# The COCO backends, fastest first; each brings its own mask run-length encoder.
_COCO_MASKS = {}
try:
    from faster_coco_eval.core import mask as _faster_mask
except ImportError:
    pass
else:
    _COCO_MASKS["faster_coco_eval"] = _faster_mask
try:
    from pycocotools import mask as _pycoco_mask
except ImportError:
    pass
else:
    _COCO_MASKS["pycocotools"] = _pycoco_mask

IOU_TYPES = ("bbox", "segm")
# Our names for COCOeval's twelve summary numbers, in the order of ``COCOeval.stats``, each with
# torchmetrics' key for it.
COCO_STATS = (("AP", "map"), ("AP50", "map_50"), ("AP75", "map_75"), ("APs", "map_small"),
              ("APm", "map_medium"), ("APl", "map_large"), ("AR1", "mar_1"), ("AR10", "mar_10"),
              ("AR100", "mar_100"), ("ARs", "mar_small"), ("ARm", "mar_medium"), ("ARl", "mar_large"))
_EARLY_COMPUTE = r".*was called before the ``update`` method.*"  # normal on a process that saw no image


def _require_torchmetrics(what: str) -> None:
    if _TORCHMETRICS_ERROR is not None:
        raise ImportError(f"{what} needs torchmetrics ({_TORCHMETRICS_ERROR}): {INSTALL_HINT}")


def _pick_backend(backend: str | None) -> str:
    """``faster_coco_eval`` when installed (the same numbers as pycocotools, several times faster),
    else ``pycocotools``; a named backend must be installed."""
    if backend is None:
        if not _COCO_MASKS:
            raise ImportError(f"COCO evaluation needs faster-coco-eval or pycocotools: {INSTALL_HINT}")
        return next(iter(_COCO_MASKS))
    if backend not in ("faster_coco_eval", "pycocotools"):
        raise ValueError(f"backend must be 'faster_coco_eval', 'pycocotools' or None, got {backend!r}")
    if backend not in _COCO_MASKS:
        raise ImportError(f"backend {backend!r} is not installed: {INSTALL_HINT}")
    return backend


def masks_to_rle(masks: Tensor) -> list[dict]:
    """COCO compressed run-length encodings of binary masks ``(N, H, W)`` (nonzero = inside), one
    ``{"size": [H, W], "counts": str}`` per mask: json-ready, and what ``pycocotools.mask.decode``
    reads back."""
    if not _COCO_MASKS:
        raise ImportError(f"mask run-length encoding needs pycocotools or faster-coco-eval: {INSTALL_HINT}")
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    api = _COCO_MASKS.get("pycocotools") or next(iter(_COCO_MASKS.values()))
    # COCO's encoder reads column-major (H, W, N) uint8
    array = np.asfortranarray(masks.detach().cpu().ne(0).permute(1, 2, 0).numpy().astype(np.uint8))
    rles = api.encode(array) if len(masks) else []
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def _binary_masks(masks: Tensor, where: str) -> Tensor:
    """Masks as bool ``(N, H, W)`` on the CPU: probabilities are cut at 0.5 (``> 0.5``, as
    torchvision's COCO evaluation does), integers and bools mean inside where nonzero. The cut is
    made before the copy to the CPU, which then moves a quarter of the bytes of float masks."""
    masks = torch.as_tensor(masks).detach()
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]  # (N, 1, H, W) -> (N, H, W)
    if masks.ndim != 3:
        raise ValueError(f"{where} masks must be (N, H, W) or (N, 1, H, W), got shape {tuple(masks.shape)}")
    return (masks > 0.5 if masks.is_floating_point() else masks.ne(0)).cpu()


def _get(item: Mapping, key: str, where: str, cpu: bool = True) -> Tensor:
    if not isinstance(item, Mapping):
        raise TypeError(f"{where} must be a dict of tensors, got {type(item).__name__}")
    if key not in item:
        raise ValueError(f"{where} has no {key!r} (keys: {sorted(item)})")
    value = torch.as_tensor(item[key]).detach()
    return value.cpu() if cpu else value


def _image_id(target: Mapping) -> int:
    """The target's ``image_id`` when it has one, else -1 (never merged with another image)."""
    if "image_id" not in target:
        return -1
    value = torch.as_tensor(target["image_id"]).reshape(-1)
    return int(value[0]) if value.numel() == 1 else -1


if MeanAveragePrecision is not None:

    class _GatheredMeanAP(MeanAveragePrecision):
        """torchmetrics' mean AP with a gather that works for any number of images per process,
        and images seen twice (a sampler padding its last batch) evaluated once."""

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.add_state("image_ids", default=[], dist_reduce_fx=None)

        def update(self, preds: list[dict], target: list[dict]) -> None:
            super().update(preds, target)
            self.image_ids.extend(torch.tensor(_image_id(t)) for t in target)

        def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
            group = process_group or self.process_group
            local = {name: list(getattr(self, name)) for name in self._defaults}
            gathered: list[dict | None] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, local, group=group)
            for name in local:  # rank-major: rank 0's images, then rank 1's...
                setattr(self, name, [item for part in gathered for item in part[name]])

        def compute(self) -> dict:
            ids = [int(i) for i in self.image_ids]
            first: dict[int, int] = {}  # image id -> position of its first occurrence
            keep = [k for k, i in enumerate(ids) if i < 0 or first.setdefault(i, k) == k]
            if len(keep) == len(ids):
                return {**super().compute(), "images": torch.tensor(len(ids))}
            # per-image states hold one entry per image (masks only when evaluated): drop repeats for
            # the evaluation, then restore, since more images may still come
            saved = {name: getattr(self, name) for name in self._defaults}
            try:
                for name, values in saved.items():
                    if len(values) == len(ids):
                        setattr(self, name, [values[k] for k in keep])
                return {**super().compute(), "images": torch.tensor(len(keep))}
            finally:
                for name, values in saved.items():
                    setattr(self, name, values)


class DetectionMetric:
    """COCO box and mask AP of torchvision-style detections.

    ``update(preds, targets)`` takes one dict per image. Predictions: ``boxes`` (N, 4) xyxy,
    ``scores`` (N,), ``labels`` (N,), and for ``segm`` ``masks`` (N, 1, H, W) probabilities (cut at
    0.5) or (N, H, W) bool. Targets: ``boxes``, ``labels``, for ``segm`` ``masks`` (N, H, W) (nonzero
    inside), optionally ``iscrowd``, ``area`` (COCO's size buckets use the annotation's area; without
    it the mask area, or the box area when only boxes are evaluated) and ``image_id`` (an image
    given twice, as a padding sampler does, counts once). Everything is moved to the CPU.

    ``compute()`` returns fractions: ``{t}_AP, {t}_AP50, {t}_AP75, {t}_APs, {t}_APm, {t}_APl`` and
    the recalls ``{t}_AR1, {t}_AR10, {t}_AR100, {t}_ARs, {t}_ARm, {t}_ARl`` for each ``t`` in
    ``iou_types``, plus ``images``. COCO's -1 (no ground truth of that size, or no image at all)
    becomes NaN.

    Boxes are evaluated even when only ``segm`` is asked for: torchmetrics leaves an image
    without masks out of a mask-only evaluation, so false positives on images without objects
    would go uncounted; with boxes alongside, every image takes part, as in COCO.

    Distributed: states are gathered in ``compute`` when a process group is initialised (never on
    ``update``); every process must call ``compute``, with any number of images, none included,
    and all get the same result. ``process_group`` limits the gather to a subgroup; with NCCL the
    gather (``all_gather_object``) needs each process's CUDA device set (``torch.cuda.set_device``).
    The numbers carry torchmetrics' float32 precision.
    """

    def __init__(self, iou_types: str | Sequence[str] = ("bbox", "segm"), backend: str | None = None,
                 process_group=None):
        _require_torchmetrics("DetectionMetric")
        iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
        if not iou_types or len(set(iou_types)) != len(iou_types) or not set(iou_types) <= set(IOU_TYPES):
            raise ValueError(f"iou_types must be distinct entries of {IOU_TYPES}, got {iou_types!r}")
        self.iou_types = iou_types
        self.backend = _pick_backend(backend)
        self._masks = "segm" in iou_types
        self._map = _GatheredMeanAP(iou_type=("bbox", "segm") if self._masks else "bbox", backend=self.backend,
                                    process_group=process_group)

    def update(self, preds: Sequence[Mapping], targets: Sequence[Mapping]) -> None:
        """Add a batch: one prediction dict and one target dict per image."""
        if len(preds) != len(targets):
            raise ValueError(f"update got {len(preds)} predictions for {len(targets)} targets")
        tm_preds, tm_targets = [], []
        for k, (pred, target) in enumerate(zip(preds, targets)):
            tm_preds.append(self._image(pred, f"prediction {k}", scores=True))
            tm_targets.append(self._image(target, f"target {k}", scores=False))
            if self._masks and tm_preds[-1]["masks"].shape[-2:] != tm_targets[-1]["masks"].shape[-2:]:
                raise ValueError(f"prediction {k} masks are {tuple(tm_preds[-1]['masks'].shape[-2:])} but its "
                                 f"target's are {tuple(tm_targets[-1]['masks'].shape[-2:])}: give both at one size")
        for item, target in zip(tm_targets, targets):
            if "image_id" in target:
                item["image_id"] = target["image_id"]
        self._map.update(tm_preds, tm_targets)

    def _image(self, item: Mapping, where: str, scores: bool) -> dict[str, Tensor]:
        boxes = _get(item, "boxes", where).float().reshape(-1, 4)
        labels = _get(item, "labels", where).long().reshape(-1)
        if len(labels) != len(boxes):
            raise ValueError(f"{where} has {len(boxes)} boxes but {len(labels)} labels")
        out = {"boxes": boxes, "labels": labels}
        if scores:
            out["scores"] = _get(item, "scores", where).float().reshape(-1)
            if len(out["scores"]) != len(boxes):
                raise ValueError(f"{where} has {len(boxes)} boxes but {len(out['scores'])} scores")
        else:
            for key, dtype in (("iscrowd", torch.long), ("area", torch.float)):
                if key in item:
                    out[key] = _get(item, key, where).to(dtype).reshape(-1)
                    if len(out[key]) != len(boxes):
                        raise ValueError(f"{where} has {len(boxes)} boxes but {len(out[key])} {key} values")
        if self._masks:
            out["masks"] = _binary_masks(_get(item, "masks", where, cpu=False), where)  # (N, H, W) bool
            if len(out["masks"]) != len(boxes):
                raise ValueError(f"{where} has {len(boxes)} boxes but {len(out['masks'])} masks")
        return out

    def compute(self) -> dict[str, float | int]:
        """The COCO numbers over everything added since the last reset (gathered across processes)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EARLY_COMPUTE)
            raw = self._map.compute()
        out: dict[str, float | int] = {}
        for iou_type in self.iou_types:
            prefix = f"{iou_type}_" if self._masks else ""  # torchmetrics prefixes only with two types
            for name, key in COCO_STATS:
                value = float(raw[prefix + key])
                out[f"{iou_type}_{name}"] = math.nan if value < 0 else value
        out["images"] = int(raw["images"])
        return out

    def reset(self) -> None:
        """Forget everything added: start a new evaluation."""
        self._map.reset()


class SegmentationMetric:
    """Semantic segmentation IoU and accuracy over a whole set, computed as mmseg's ``IoUMetric``.

    One confusion matrix is summed over every pixel whose label is not ``ignore_index`` (on the
    device of the inputs, and across processes). Per class, with TP its diagonal entry, FN the rest
    of its row (its pixels predicted as another class) and FP the rest of its column:

    - ``IoU = TP / (TP + FP + FN)`` and ``Acc = TP / (TP + FN)``;
    - a class absent from the ground truth has ``Acc`` 0/0 = NaN, and ``IoU`` 0 when it was
      predicted (its union is its false positives) or NaN when it was not predicted either;
    - ``mIoU`` and ``mAcc`` are the means over the classes whose value is not NaN (mmseg's
      ``nanmean``), ``aAcc`` is all TP over all labelled pixels.

    ``compute()`` returns fractions: ``mIoU, mAcc, aAcc``, the per-class lists ``IoU`` and ``Acc``
    (NaN entries as above) and ``pixels``, the number of labelled pixels counted.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, process_group=None):
        _require_torchmetrics("SegmentationMetric")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class index (num_classes {num_classes}): "
                             "give a value outside [0, num_classes), or None")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        # the inputs are checked here, once, with messages naming them
        self._matrix = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False,
                                                 process_group=process_group)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` class indices (B, H, W) or logits (B, K, H, W); ``target`` (B, H, W)."""
        pred, target = torch.as_tensor(pred).detach(), torch.as_tensor(target).detach()
        if pred.is_floating_point():
            if pred.ndim != target.ndim + 1 or pred.shape[1] != self.num_classes:
                raise ValueError(f"logits must be (B, {self.num_classes}, H, W) for target {tuple(target.shape)}, "
                                 f"got {tuple(pred.shape)}")
            pred = pred.argmax(1)  # (B, K, H, W) -> (B, H, W)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(f"target must hold integer class indices, got {target.dtype}")
        pred, target = pred.long(), target.long().to(pred.device)
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"pred holds class {int(pred.min() if pred.min() < 0 else pred.max())}, "
                             f"outside [0, {self.num_classes})")
        labelled = target if self.ignore_index is None else target[target != self.ignore_index]
        if labelled.numel() and (labelled.min() < 0 or labelled.max() >= self.num_classes):
            bad = int(labelled.min() if labelled.min() < 0 else labelled.max())
            raise ValueError(f"target holds label {bad}, neither a class in [0, {self.num_classes}) nor "
                             f"ignore_index {self.ignore_index}")
        self._matrix.to(pred.device)
        self._matrix.update(pred, target)

    def compute(self) -> dict:
        """The set's numbers (summed across processes): mIoU, mAcc, aAcc, IoU, Acc, pixels."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EARLY_COMPUTE)
            matrix = self._matrix.compute().double().cpu()  # (K, K): rows ground truth, columns prediction
        tp = matrix.diagonal()
        label, predicted = matrix.sum(1), matrix.sum(0)
        iou = tp / (label + predicted - tp)  # 0/0 = NaN for a class neither present nor predicted
        acc = tp / label  # 0/0 = NaN for a class absent from the ground truth
        return {"mIoU": float(iou.nanmean()), "mAcc": float(acc.nanmean()), "aAcc": float(tp.sum() / label.sum()),
                "IoU": iou.tolist(), "Acc": acc.tolist(), "pixels": int(label.sum())}

    def reset(self) -> None:
        """Forget everything added: start a new evaluation."""
        self._matrix.reset()


def coco_results(preds: Sequence[Mapping], image_ids: Sequence[int], category_ids: Sequence[int]) -> list[dict]:
    """Detections in COCO's results format (a json-ready list, as the COCO server takes it).

    ``preds`` are torchvision-style dicts (``boxes`` xyxy, ``scores``, ``labels`` in 1..K, optional
    ``masks`` cut at 0.5), one per image of ``image_ids``; label ``l`` becomes the dataset's category
    ``category_ids[l - 1]``. Each entry: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
    ``score`` and, with masks, ``segmentation`` as compressed RLE with ``counts`` a str.
    """
    if len(preds) != len(image_ids):
        raise ValueError(f"coco_results got {len(preds)} predictions for {len(image_ids)} image ids")
    categories = [int(c) for c in category_ids]
    results = []
    for k, (pred, image_id) in enumerate(zip(preds, image_ids)):
        where = f"prediction {k}"
        boxes = _get(pred, "boxes", where).double().reshape(-1, 4)
        scores, labels = _get(pred, "scores", where).reshape(-1), _get(pred, "labels", where).long().reshape(-1)
        if not len(scores) == len(labels) == len(boxes):
            raise ValueError(f"{where} has {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
        if len(labels) and (labels.min() < 1 or labels.max() > len(categories)):
            bad = int(labels.min() if labels.min() < 1 else labels.max())
            raise ValueError(f"{where} has label {bad}; category_ids maps labels 1..{len(categories)}")
        rles = masks_to_rle(_binary_masks(pred["masks"], where)) if "masks" in pred else None
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)  # (N, 4) xyxy -> x, y, w, h
        for j in range(len(labels)):
            entry = {"image_id": int(image_id), "category_id": categories[int(labels[j]) - 1],
                     "bbox": xywh[j].tolist(), "score": float(scores[j])}
            if rles is not None:
                entry["segmentation"] = rles[j]
            results.append(entry)
    return results
