"""``swinv2 eval``: top-1 / top-5 of any weights on an image folder (or the bundled digits),
at any resolution, with the crop policy that belongs to the weights."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .. import hub
from ..data import datasets as D
from ..data.transforms import eval_transform
from ..train.config import TrainConfig
from ..train.distributed import all_reduce_sum, setup, teardown
from ..variants import create_model
from .common import evaluate_classifier


@dataclass
class Preprocess:
    img_size: int
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"


def load_weights(checkpoint: str | None, model: str | None, overrides: dict):
    """(model, preprocessing, class names) for a checkpoint path, a weight tag or both."""
    names = None
    if checkpoint is None:
        if model is None:
            raise ValueError("eval needs --checkpoint PATH, or --model TAG of registered weights")
        weights = hub.get_pretrained(model)
        net = create_model(model, pretrained=True, **overrides)
        pre = Preprocess(weights.img_size, weights.crop_pct, weights.crop_mode, weights.interpolation)
        return net, pre, names
    if os.path.isdir(checkpoint):  # a Hugging Face folder: config.json rebuilds the model, id2label names
        from ..hf_folder import class_names, read_hf_config

        names = class_names(read_hf_config(checkpoint))
        net = create_model(model, pretrained=checkpoint, **overrides)
        return net, Preprocess(net.img_size[0]), names
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    meta = hub.read_metadata(checkpoint) if not checkpoint.endswith(".pt") else None
    net = create_model(model, pretrained=checkpoint, **overrides)
    pre = Preprocess(net.img_size[0])
    if meta:
        if meta.get("preprocess"):
            pre = Preprocess(**json.loads(meta["preprocess"]))
        if meta.get("class_names"):
            names = json.loads(meta["class_names"])
    elif checkpoint.endswith(".pt"):
        from ..train.checkpoint import load_checkpoint

        state = load_checkpoint(checkpoint)
        saved = TrainConfig.from_dict(state["config"])
        pre = Preprocess(saved.img_size or net.img_size[0], saved.crop_pct,
                         "center" if saved.crop_pct < 1 else "squash")
        names = state.get("class_names")
    return net, pre, names


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
        from .supervised import eval_loader, require_images

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
