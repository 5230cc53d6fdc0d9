"""Object detection and instance segmentation on COCO-layout data: ``swinv2 train --task detection``.

Mask R-CNN with FPN from torchvision around the SwinV2 backbone. The detector resizes its
inputs itself (torchvision's transform: a random short side of ``--short-sides`` per batch in
training, ``--test-short-side`` in evaluation, the long side capped at ``--max-side``), so the
data pipeline only flips. Box and mask AP come from COCO's evaluation (torchmetrics with
faster-coco-eval or pycocotools). Reads top-down: data, loop pieces, evaluation, the run.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.coco import CocoDetection
from ..data.dense_demo import build_detection_demo
from ..data.dense_transforms import (
    JointTransformedDataset,
    build_dense_loader,
    collate_detection,
    detection_eval_transform,
    detection_train_transform,
)
from ..dense.metrics import DetectionMetric
from ..train.config import TrainConfig
from ..train.distributed import Dist, all_reduce_sum, unwrap
from ..train.engine import Loop, autocast
from .dense import detection_sizes, epoch_batches, same_buffers_everywhere, to_device_targets

SELECT = ("bbox_AP", True)


def load_data(cfg: TrainConfig):
    """(train, val, class names, COCO category ids): ``--data`` in the COCO layout, or the
    bundled demo (digits pasted on real textures) without it."""
    root = cfg.data if cfg.data is not None else build_detection_demo()
    train = CocoDetection(root, "train", masks=True, keep_crowd=False)
    val = CocoDetection(root, "val", masks=True, keep_crowd=True)  # crowd regions: matches there are ignored
    for split in (train, val):
        missing = "categories" if not split.category_ids else "images" if not len(split) else None
        if missing:
            raise ValueError(f"{split.annotation_file} lists no {missing}: nothing to train or validate on")
    if list(val.category_ids) != list(train.category_ids):
        raise ValueError(f"{root}: instances_train2017.json and instances_val2017.json list different categories")
    return train, val, list(train.classes), list(train.category_ids)


def make_loop(cfg: TrainConfig, env: Dist, train, val, classes: list[str], category_ids: list[int]) -> Loop:
    _, _, test_side = detection_sizes(cfg)
    train_set = JointTransformedDataset(train, detection_train_transform(hflip=cfg.hflip), seed=cfg.seed)
    loader = build_dense_loader(train_set, collate=collate_detection, batch_size=cfg.batch_size, train=True,
                                workers=cfg.workers, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                                pin_memory=env.device.type == "cuda")
    val_loader = eval_loader(val, cfg, env)

    def objective(model, inputs, seed):
        images, targets = inputs
        images = [im.to(env.device, non_blocking=True) for im in images]
        losses = model(images, to_device_targets(targets, env.device))  # RPN, box, class and mask losses
        return sum(losses.values()), len(images)

    return Loop(
        objective=objective,
        loader_for=epoch_batches(loader),
        batches_per_epoch=len(loader),
        evaluate=lambda model: evaluate(model, val_loader, env, cfg, test_side),
        select=SELECT,
        extra_state=lambda: dict(class_names=list(classes), dense_extra=dict(category_ids=list(category_ids))),
    )


def eval_loader(dataset, cfg: TrainConfig, env: Dist) -> DataLoader:
    """Each process evaluates every world_size-th image, at its own size."""
    keyed = JointTransformedDataset(dataset, detection_eval_transform(), seed=cfg.seed)
    indices = [(0, i) for i in range(env.rank, len(dataset), env.world_size)]
    return DataLoader(keyed, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.workers,
                      collate_fn=collate_detection)


@contextlib.contextmanager
def evaluation_setting(detector: nn.Module, short_side: int | None, window: int | None):
    """The detector at its evaluation short side and window, restored afterwards."""
    transform = detector.model.transform
    sizes, net = (transform.min_size, transform.max_size), detector.encoder
    old_window = net.window_size
    try:
        if short_side:
            detector.set_sizes(short_side, transform.max_size)
        if window:
            detector.set_window(window)
        yield detector
    finally:
        detector.set_sizes(*sizes)
        if window:
            detector.set_window(old_window)


def evaluate(model: nn.Module, loader, env: Dist, cfg: TrainConfig, short_side: int | None = None,
             window: int | None = None) -> dict:
    """COCO box and mask AP (fractions) over ``loader``, gathered from every process, and the
    number of images and of unreadable images skipped."""
    detector = unwrap(model)
    was_training = detector.training
    detector.eval()
    same_buffers_everywhere(detector)
    metric = DetectionMetric()
    skipped = 0
    with torch.no_grad(), evaluation_setting(detector, short_side, window or cfg.eval_window):
        for images, targets, n_skipped in loader:
            skipped += int(n_skipped)
            if not images:
                continue
            with autocast(cfg, env.device):
                preds = detector([im.to(env.device) for im in images])
            metric.update([{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in p.items()}
                           for p in preds], targets)
    result = metric.compute()
    counts = torch.tensor([skipped], dtype=torch.float64, device=env.device)
    all_reduce_sum(counts)
    detector.train(was_training)
    return dict(result, skipped_images=int(counts[0]))
