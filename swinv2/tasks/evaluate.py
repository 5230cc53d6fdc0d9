"""``swinv2 eval``: top-1 / top-5 of any weights on an image folder (or the bundled digits),
at any resolution, with the crop policy that belongs to the weights."""

from __future__ import annotations

import torch

from ..data import datasets as D
from ..data.transforms import eval_transform
from ..predict import Preprocess
from ..reading import read_weights
from ..train.config import TrainConfig
from ..train.distributed import all_reduce_sum, setup, teardown
from ..variants import create_model
from ..weights import HF_HUB_PREFIX, get_pretrained
from .common import evaluate_classifier
from .supervised import eval_loader, require_images


def load_weights(checkpoint: str | None, model: str | None, overrides: dict):
    """(model, preprocessing, class names) for a checkpoint, released weights (``--model
    arch.tag``, or ``arch`` for its default tag), or a checkpoint with its architecture.

    The preprocessing and class names are those the weights state (see
    :func:`swinv2.predict.load_for_inference`), else the official default at the model's size."""
    if checkpoint is None:
        if model is None:
            raise ValueError("eval needs --checkpoint PATH, or --model TAG of registered weights")
        weights = read_weights(model if model.startswith(HF_HUB_PREFIX) else get_pretrained(model))
        net = create_model(pretrained=weights, **overrides)
    else:
        weights = read_weights(checkpoint, arch=model)
        net = create_model(model, pretrained=weights, **overrides)
    fields = dict(weights.preprocess or {})
    fields.setdefault("img_size", net.img_size[0])
    return net, Preprocess(**fields), weights.class_names


def evaluate_weights(checkpoint: str | None = None, model: str | None = None, data: str | None = None, *,
                     img_size: int | None = None, window: int | None = None, crop_pct: float | None = None,
                     batch_size: int = 64, workers: int = 2, amp: str = "none", device: str = "auto",
                     seed: int = 0) -> dict:
    """Top-1, top-5 (fractions), loss, images and skipped images of the weights (see
    :func:`load_weights`) on the image folder ``data`` (its ``val/`` subfolder when it has one),
    or on the validation split of the bundled digits (``seed`` picks the split).

    ``img_size``, ``window`` and ``crop_pct`` replace the weights' own; the result also states
    the resolution, crop and window used."""
    net, pre, names = load_weights(checkpoint, model, {"window_size": window} if window else {})
    if img_size:
        pre.img_size = img_size
    if crop_pct is not None:
        pre.crop_pct = crop_pct
        pre.crop_mode = "center" if crop_pct < 1 else "squash"
    cfg = TrainConfig(batch_size=batch_size, workers=workers, amp=amp, device=device, crop_pct=pre.crop_pct)
    env = setup(cfg.device)
    try:
        if data is None:
            dataset = D.DigitsDataset("val", seed=seed)
        else:
            train_root, val_root = D.resolve_folders(data, None)
            dataset = D.ImageFolderDataset(val_root or train_root, min_classes=1)
            D.require_readable(dataset, "evaluation")
        classes = list(dataset.classes)
        if net.num_classes != len(classes):
            source = data or "the bundled digits"
            raise ValueError(f"the model has {net.num_classes} outputs but {source} has {len(classes)} classes")
        if names is not None and list(names) != classes:
            raise ValueError(f"the weights were trained on classes {names[:10]}..., the data has {classes[:10]}...")
        tf = eval_transform(pre.img_size, crop_pct=pre.crop_pct, crop_mode=pre.crop_mode,
                            interpolation=pre.interpolation)
        net.to(env.device)
        loader = SkipCounter(eval_loader(dataset, tf, cfg, env))
        metrics = evaluate_classifier(net, loader, env, cfg, len(classes))
        skipped = torch.tensor(float(loader.skipped), dtype=torch.float64, device=env.device)
        all_reduce_sum(skipped)
        require_images(metrics, dataset, "evaluation")
        return dict(metrics, skipped_images=int(skipped), img_size=pre.img_size, crop_pct=pre.crop_pct,
                    crop_mode=pre.crop_mode, window=net.window_size[0], checkpoint=checkpoint, model=model)
    finally:
        teardown()


class SkipCounter:
    """Iterates a loader of ``(images, targets, n_skipped)`` batches, adding up ``n_skipped``."""

    def __init__(self, loader):
        self.loader, self.skipped = loader, 0

    def __iter__(self):
        for batch in self.loader:
            self.skipped += int(batch[-1])
            yield batch
