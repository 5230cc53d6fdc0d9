"""Mixup/CutMix with timm's ``Mixup`` (the official code's), made reproducible per step, and the
matching losses (timm's, as the official code uses).

timm draws every mixing decision (mixup or CutMix, lambda, box position) from numpy's global
RNG, so :func:`apply_mixup` seeds numpy, and for safety Python's and torch's CPU generators,
from (seed, step) for the duration of the call and then restores them.
"""

from __future__ import annotations

import torch

from .loader import derive_seed, seeded


def build_mixup(num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0,
                switch_prob: float = 0.5, label_smoothing: float = 0.1):
    """timm ``Mixup`` in per-batch mode with the official settings, or None when both alphas are 0
    (the caller then uses :func:`train_criterion`'s label-smoothed CE on hard targets)."""
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup}, {cutmix}")
    if mixup == 0 and cutmix == 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode="batch",
                 label_smoothing=label_smoothing, num_classes=num_classes)


def apply_mixup(mixup, x: torch.Tensor, y: torch.Tensor, seed: int, step=0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mixed images, soft targets (B, num_classes))``, a pure function of (x, y, seed, step).

    ``step`` is an int or a tuple of ints (e.g. ``(update, micro_batch, rank)``) naming the call.
    timm mixes ``x`` in place (it is also returned). Per-batch mode pairs the batch with its
    reverse and so needs an even size: an odd batch (a skipped image, a short last batch) is
    not mixed and gets label-smoothed one-hot targets, the same targets timm gives an unmixed
    batch. An empty batch returns empty (0, num_classes) targets.
    """
    from timm.data.mixup import mixup_target

    parts = step if isinstance(step, (tuple, list)) else (step,)
    if x.shape[0] % 2 or x.shape[0] == 0:
        return x, mixup_target(y, mixup.num_classes, 1.0, mixup.label_smoothing)
    with seeded(derive_seed("mixup", seed, *parts)):
        return mixup(x, y)


def train_criterion(mixup, label_smoothing: float = 0.1) -> torch.nn.Module:
    """The training loss, as the official code picks it: soft-target CE under mixup (the
    smoothing is already in the mixed targets), else label-smoothed CE, else plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return torch.nn.CrossEntropyLoss()


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))`` (timm's SoftTargetCrossEntropy)."""
    from timm.loss import SoftTargetCrossEntropy

    return SoftTargetCrossEntropy()(logits, targets)
