"""``swinv2 eval``: top-1 / top-5 of any weights on an image folder (or the bundled digits),
at any resolution, with the crop policy that belongs to the weights."""

from __future__ import annotations

import json

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


def run(args) -> dict:
    overrides = {}
    if args.window:
        overrides["window_size"] = args.window
    model, pre, names = load_weights(args.checkpoint, args.model, overrides)
    if args.img_size:
        pre.img_size = args.img_size
    if args.crop_pct is not None:
        pre.crop_pct = args.crop_pct
        pre.crop_mode = "center" if args.crop_pct < 1 else "squash"
    cfg = TrainConfig(batch_size=args.batch_size, workers=args.workers, amp=args.amp, device=args.device,
                      crop_pct=pre.crop_pct)
    env = setup(cfg.device)
    try:
        if args.data is None:
            dataset = D.DigitsDataset("val", seed=args.seed)
        else:
            train_root, val_root = D.resolve_folders(args.data, None)
            dataset = D.ImageFolderDataset(val_root or train_root, min_classes=1)
            D.require_readable(dataset, "evaluation")
        classes = list(dataset.classes)
        out = model.num_classes
        if out != len(classes):
            source = args.data or "the bundled digits"
            raise ValueError(f"the model has {out} outputs but {source} has {len(classes)} classes")
        if names is not None and list(names) != classes:
            raise ValueError(f"the weights were trained on classes {names[:10]}..., the data has {classes[:10]}...")
        tf = eval_transform(pre.img_size, crop_pct=pre.crop_pct, crop_mode=pre.crop_mode,
                            interpolation=pre.interpolation)
        model.to(env.device)
        loader = _SkipCounter(eval_loader(dataset, tf, cfg, env))
        metrics = evaluate_classifier(model, loader, env, cfg, len(classes))
        skipped = torch.tensor(float(loader.skipped), dtype=torch.float64, device=env.device)
        all_reduce_sum(skipped)
        require_images(metrics, dataset, "evaluation")
        return dict(metrics, skipped_images=int(skipped), img_size=pre.img_size, crop_pct=pre.crop_pct,
                    crop_mode=pre.crop_mode, window=model.window_size[0], checkpoint=args.checkpoint,
                    model=args.model)
    finally:
        teardown()


class _SkipCounter:
    """Iterates a loader of ``(images, targets, n_skipped)`` batches, adding up ``n_skipped``."""

    def __init__(self, loader):
        self.loader, self.skipped = loader, 0

    def __iter__(self):
        for batch in self.loader:
            self.skipped += int(batch[-1])
            yield batch


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"top-1 {result['top1'] * 100:.2f}%  top-5 {result['top5'] * 100:.2f}%  loss {result['loss']:.4f}  "
              f"on {result['images']} images at {result['img_size']}px ({result['crop_mode']} crop "
              f"{result['crop_pct']}, window {result['window']})"
              + (f"; {result['skipped_images']} unreadable images skipped" if result["skipped_images"] else ""))
    return 0
