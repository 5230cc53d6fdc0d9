"""The top-k classes of images (or folders of images), preprocessed the way the weights were
evaluated (``swinv2 predict``).

The preprocessing belongs to the weights, not to the command: a registered weight tag brings
its official crop policy (centre crop at 256, squash at 384), a file written by
:func:`swinv2.save_pretrained` may carry its own (``preprocess`` metadata, as ``swinv2 train``
writes it) and its class names (``class_names`` metadata), and everything else falls back to
the official default (centre crop at ``crop_pct`` 0.875 of the model's own size).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.images import is_regular_file, open_rgb
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from .layers import to_2tuple
from .reading import Weights, read_weights
from .variants import create_model, get_variant
from .weights import HF_HUB_PREFIX, PRETRAINED, get_pretrained

# What a folder walk picks up (case-insensitive). A file named explicitly is always tried.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
FORMATS = ("table", "json", "csv")


@dataclass
class Preprocess:
    """How the weights expect images: the arguments of :func:`eval_transform`."""

    img_size: int | tuple[int, int]
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def transform(self):
        return eval_transform(self.img_size, crop_pct=self.crop_pct, crop_mode=self.crop_mode,
                              interpolation=self.interpolation, mean=self.mean, std=self.std)

    def describe(self) -> str:
        h, w = to_2tuple(self.img_size)
        if self.crop_mode == "center":
            rh, rw = (math.floor(s / self.crop_pct + 1e-6) for s in (h, w))
            resize = f"{rh} (shorter side)" if h == w else f"{rh}x{rw}"
            return f"resize {self.interpolation} to {resize}, centre-crop {h}x{w}"
        return f"resize {self.interpolation} to {h}x{w}"


@dataclass
class LoadedModel:
    """A model ready for inference with the preprocessing and class names of its weights."""

    model: torch.nn.Module
    preprocess: Preprocess
    class_names: list[str] | None  # None: not known from the weights
    source: str  # where the weights came from, for messages
    random_weights: bool = False


def load_for_inference(
    model: str | None = None, checkpoint: str | os.PathLike | None = None, device=None
) -> LoadedModel:
    """Build the model for ``--model TAG_OR_NAME`` and/or ``--checkpoint PATH``.

    - ``model="arch.tag"`` (released weights, or ``hf-hub:REPO`` for timm's copy): downloaded
      into the cache, with the release's preprocessing;
    - ``model="arch"`` alone: random weights (``random_weights=True``: the caller must warn);
    - ``checkpoint``: anything :func:`swinv2.reading.read_weights` reads; a source that carries
      its model config (a swinv2 file, a training checkpoint, a Hugging Face folder) rebuilds
      the model, any other is loaded into the architecture ``model`` names.

    The preprocessing and class names are those the weights state (a swinv2 file's metadata, a
    training run's settings and classes, a folder's ``id2label``, the release a local copy of a
    release file is), else the official default at the model's own size.
    """
    if model is None and checkpoint is None:
        raise ValueError("give --model TAG_OR_NAME (see 'swinv2 pretrained' and 'swinv2 list') or --checkpoint PATH")
    if checkpoint is None:
        if "." not in model and not model.startswith(HF_HUB_PREFIX):
            get_variant(model)  # ValueError naming the known models
            net = create_model(model)
            return LoadedModel(net, Preprocess(net.img_size), None, model, random_weights=True)
        # ValueError naming the released tags for an unknown one
        weights = read_weights(model if model.startswith(HF_HUB_PREFIX) else get_pretrained(model))
        return _loaded(create_model(pretrained=weights), weights, model)
    weights = read_weights(checkpoint, arch=model)
    net = create_model(model, pretrained=weights)
    return _loaded(net, weights, os.fspath(checkpoint), PRETRAINED.get(model or ""))


def _loaded(net: torch.nn.Module, weights: Weights, source: str, named=None) -> LoadedModel:
    """``net`` with the preprocessing and class names ``weights`` state (or the release
    ``named`` on the command line states), at the model's own size where they name none."""
    fields = dict(weights.preprocess or (named.preprocess if named is not None else {}))
    fields.setdefault("img_size", net.img_size)
    return LoadedModel(net, Preprocess(**fields), weights.class_names, source)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, in index order (shipped with torchvision)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_names_for(num_classes: int, known: Sequence[str] | None = None, labels_file=None) -> list[str]:
    """``labels_file`` (one name a line), else ``known`` (the weights' own), else the
    ImageNet-1k names for 1000 classes, else ``class N``."""
    if labels_file is not None:
        lines = Path(labels_file).read_text(encoding="utf-8").splitlines()
        names = [line.strip() for line in lines if line.strip()]
        if len(names) != num_classes:
            raise ValueError(f"{labels_file} has {len(names)} labels but the model has {num_classes} classes")
        return names
    if known:
        if len(known) != num_classes:
            raise ValueError(f"the weights name {len(known)} classes but the model has {num_classes} outputs")
        return list(known)
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class {i}" for i in range(num_classes)]


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named explicitly (whatever their extension), and the images under each folder
    (recursively, by extension, sorted so that runs are reproducible).

    In a folder, entries named like images that are no regular files (FIFOs, sockets, devices,
    broken links: opening a FIFO blocks) are skipped and counted on stderr; named explicitly,
    such an entry is an error."""
    found: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            named = [f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and not f.is_dir()]
            files = sorted((f for f in named if is_regular_file(f)), key=lambda f: f.as_posix())
            if len(files) < len(named):
                other = sorted(f.as_posix() for f in named if not is_regular_file(f))
                print(f"swinv2: skipping {len(other)} entries under {path} named like images but not regular files "
                      f"(FIFO, socket, device or broken link), e.g. {other[0]}", file=sys.stderr)
            if not files:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the folder {path}")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise ValueError(f"{path} is not an image file but a FIFO, socket or device")
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    seen: set[Path] = set()
    return [f for f in found if not (f in seen or seen.add(f))]


def _load_image(path: Path, transform) -> torch.Tensor:
    return transform(open_rgb(path))  # decoded now: a truncated file fails here, not in the transform


def predict(
    model: torch.nn.Module,
    paths: Iterable[str | os.PathLike],
    *,
    transform,
    class_names: Sequence[str] | None = None,
    topk: int = 5,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[dict]:
    """Classify images; folders are expanded with :func:`find_images`.

    Returns one dict per image, in order: ``path``, ``ok``, ``error`` (the reason an image
    could not be read, else None) and ``topk``, a list of ``{rank, index, label, prob}`` by
    decreasing probability (softmax over all classes). An unreadable image is reported on
    stderr and skipped; the others go on.
    """
    from tqdm.auto import tqdm

    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    num_classes = getattr(model, "num_classes", None)
    if num_classes == 0:
        raise ValueError("the model has no classifier head (num_classes=0): nothing to predict")
    files = find_images(paths)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=None if progress else True)
    try:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            tensors, slots = [], []
            for path in chunk:
                row = dict(path=os.fspath(path), ok=True, error=None, topk=[])
                try:
                    tensors.append(_load_image(path, transform))
                    slots.append(row)
                except Exception as err:  # noqa: BLE001 - any decoder failure: report the file, go on
                    row.update(ok=False, error=f"{type(err).__name__}: {err}")
                    tqdm.write(f"swinv2: skipping {path}: {row['error']}", file=sys.stderr)
                rows.append(row)
            if tensors:
                batch = torch.stack(tensors).to(device=device, dtype=next(model.parameters()).dtype)
                with torch.inference_mode():
                    probs = model(batch).float().softmax(dim=-1).cpu()
                k = min(topk, probs.shape[-1])
                values, indices = probs.topk(k, dim=-1)  # sorted by decreasing probability
                for row, vals, idxs in zip(slots, values.tolist(), indices.tolist()):
                    row["topk"] = [
                        dict(rank=r + 1, index=i, label=class_names[i] if class_names else str(i), prob=v)
                        for r, (v, i) in enumerate(zip(vals, idxs))
                    ]
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return rows


# -- output -----------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    """One line per image and rank, columns aligned; unreadable images show their error."""
    width = max([len("image")] + [len(r["path"]) for r in rows])
    label_w = max([len("class")] + [len(p["label"]) for r in rows for p in r["topk"]])
    lines = [f"{'image':<{width}}  {'rank':>4}  {'class':<{label_w}}  {'prob':>7}"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"{r['path']:<{width}}  {'-':>4}  error: {r['error']}")
            continue
        for p in r["topk"]:
            name = r["path"] if p["rank"] == 1 else ""
            lines.append(f"{name:<{width}}  {p['rank']:>4}  {p['label']:<{label_w}}  {p['prob']:>7.4f}")
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict]) -> str:
    """Long format: one record per image and rank; an unreadable image is one record with its error."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "ok", "error", "rank", "index", "label", "prob"])
    for r in rows:
        if not r["ok"]:
            writer.writerow([r["path"], "false", r["error"], "", "", "", ""])
        for p in r["topk"]:
            writer.writerow([r["path"], "true", "", p["rank"], p["index"], p["label"], f"{p['prob']:.6g}"])
    return out.getvalue()


def format_rows(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        return format_csv(rows)
    if fmt == "table":
        return format_table(rows)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


__all__ = [
    "IMAGE_EXTENSIONS", "LoadedModel", "Preprocess", "class_names_for", "find_images", "format_rows",
    "imagenet_class_names", "load_for_inference", "predict",
]
