"""Semantic segmentation on ADE20K-layout data: ``swinv2 train --task segmentation``.

UPerNet with its auxiliary FCN head around the SwinV2 backbone, trained on random crops of
images rescaled around ``--base-size`` (mmseg's ADE20K pipeline), validated on whole images
(or sliding crops, several scales, flips) with mIoU, mAcc and aAcc from one confusion matrix
over the whole validation set. Reads top-down: data, loop pieces, evaluation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data.ade20k import ADE20KSegmentation
from ..data.dense_demo import build_segmentation_demo
from ..data.dense_transforms import (
    JointTransformedDataset,
    build_dense_loader,
    collate_segmentation,
    collate_segmentation_lists,
    segmentation_eval_transform,
    segmentation_train_transform,
)
from ..dense.metrics import SegmentationMetric
from ..dense.segmentation import multiscale_inference
from ..train.config import TrainConfig
from ..train.distributed import Dist, all_reduce_sum, unwrap
from ..train.engine import Loop, autocast
from .dense import epoch_batches, same_buffers_everywhere, segmentation_sizes

SELECT = ("mIoU", True)
IGNORE = 255
LONG_SIDE_RATIO = 4  # mmseg's ADE20K scale (2048, 512): the long side at most 4x the short one


def load_data(cfg: TrainConfig):
    """(train, val, class names): ``--data`` in the ADE20K layout, or the bundled demo."""
    root = cfg.data if cfg.data is not None else build_segmentation_demo()
    train = ADE20KSegmentation(root, "training")
    val = ADE20KSegmentation(root, "validation", num_classes=len(train.classes))
    return train, val, list(train.classes)


def make_loop(cfg: TrainConfig, env: Dist, train, val, classes: list[str]) -> Loop:
    crop, base = segmentation_sizes(cfg)
    tf = segmentation_train_transform(crop=(crop, crop), scale=(base * LONG_SIDE_RATIO, base),
                                      ratio_range=tuple(cfg.ratio_range), hflip=cfg.hflip, ignore_index=IGNORE)
    train_set = JointTransformedDataset(train, tf, seed=cfg.seed)
    loader = build_dense_loader(train_set, collate=collate_segmentation, batch_size=cfg.batch_size, train=True,
                                workers=cfg.workers, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                                pin_memory=env.device.type == "cuda")
    val_loader = eval_loader(val, cfg, env)

    def objective(model, inputs, seed):
        images, masks = (t.to(env.device, non_blocking=True) for t in inputs)
        return unwrap_loss(model, images, masks), images.shape[0]

    return Loop(
        objective=objective,
        loader_for=epoch_batches(loader),
        batches_per_epoch=len(loader),
        evaluate=lambda model: scalars(evaluate(model, val_loader, env, cfg, len(classes))),
        select=SELECT,
        extra_state=lambda: dict(class_names=list(classes)),
    )


def scalars(metrics: dict) -> dict:
    """The numbers a run logs per validation (the per-class lists are for ``swinv2 eval``)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, tuple))}


def unwrap_loss(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The total loss of a batch. Through the (possibly DDP-wrapped) model's ``forward`` in
    training mode, which returns the loss dict when given masks, so DDP sees the call."""
    return model(images, masks)["loss"]


def eval_loader(dataset, cfg: TrainConfig, env: Dist) -> DataLoader:
    _, base = segmentation_sizes(cfg)
    keyed = JointTransformedDataset(dataset, segmentation_eval_transform(scale=(base * LONG_SIDE_RATIO, base)),
                                    seed=cfg.seed)
    indices = [(0, i) for i in range(env.rank, len(dataset), env.world_size)]
    return DataLoader(keyed, batch_size=1, sampler=indices, num_workers=cfg.workers,
                      collate_fn=collate_segmentation_lists)


@contextlib.contextmanager
def window_for_evaluation(segmenter: nn.Module, window: int | None):
    net = segmenter.encoder
    old = net.window_size
    try:
        if window:
            segmenter.set_window(window)
        yield segmenter
    finally:
        if window:
            segmenter.set_window(old)


def predict_labels(segmenter: nn.Module, image: torch.Tensor, size: tuple[int, int], cfg: TrainConfig) -> torch.Tensor:
    """Class per pixel (H, W) at ``size`` for one normalised image (3, h, w): the scales and
    flips of ``cfg``, whole images or sliding crops, probabilities averaged then resized."""
    crop, _ = segmentation_sizes(cfg)
    slide = cfg.eval_mode == "slide"
    probs = multiscale_inference(segmenter, image[None], scales=tuple(cfg.eval_scales), flip=cfg.eval_flip,
                                 crop=(crop, crop) if slide else None,
                                 stride=(crop * 2 // 3, crop * 2 // 3) if slide else None)
    probs = F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)
    return probs[0].argmax(0)


def evaluate(model: nn.Module, loader, env: Dist, cfg: TrainConfig, num_classes: int,
             window: int | None = None) -> dict:
    """mIoU, mAcc, aAcc (fractions) over ``loader`` at each annotation's own resolution, summed
    over every process, and the number of images and of unreadable ones skipped."""
    segmenter = unwrap(model)
    was_training = segmenter.training
    segmenter.eval()
    same_buffers_everywhere(segmenter)
    metric = SegmentationMetric(num_classes, ignore_index=IGNORE)
    counts = torch.zeros(2, dtype=torch.float64, device=env.device)  # images, skipped
    with torch.no_grad(), window_for_evaluation(segmenter, window or cfg.eval_window):
        for images, masks, n_skipped in loader:
            counts[1] += int(n_skipped)
            for image, mask in zip(images, masks):
                with autocast(cfg, env.device):
                    labels = predict_labels(segmenter, image.to(env.device), tuple(mask.shape[-2:]), cfg)
                metric.update(labels[None].cpu(), mask[None].as_subclass(torch.Tensor))
                counts[0] += 1
    result = metric.compute()
    all_reduce_sum(counts)
    segmenter.train(was_training)
    return dict(result, images=int(counts[0]), skipped_images=int(counts[1]))
