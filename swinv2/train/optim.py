"""AdamW parameter groups and the learning-rate schedule of the official recipe.

The schedule is a pure function of the update step, so resuming needs no scheduler state and
the value at any step can be checked by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig


def _skips_decay(name: str, param: torch.Tensor, names: set[str], keywords: set[str]) -> bool:
    # Official rule (optimizer.py set_weight_decay): every 1-D tensor (biases, norm weights,
    # q/v biases), every ".bias", named exemptions, and keyword matches (cpb_mlp, logit_scale).
    return param.ndim <= 1 or name.endswith(".bias") or name in names or any(k in name for k in keywords)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Two groups (decay / no decay), or with ``layer_decay < 1`` one pair per layer id whose
    ``lr_scale`` is ``layer_decay ** (num_layer_ids - 1 - id)`` (official SimMIM fine-tune).

    The scale is stored, not pre-applied to ``lr``: :func:`set_lr` applies it exactly once.
    """
    names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    layered = layer_decay < 1.0
    if layered and not hasattr(model, "layer_id"):
        raise ValueError(f"layer_decay needs a model with layer_id(); {type(model).__name__} has none")
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = _skips_decay(name, param, names, keywords)
        layer = model.layer_id(name) if layered else 0
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (model.num_layer_ids - 1 - layer) if layered else 1.0
            groups[key] = dict(
                params=[], names=[], weight_decay=0.0 if no_decay else weight_decay, lr_scale=scale, layer=layer
            )
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for g in groups:
        del g["names"]  # an optimizer's state dict should hold tensors and numbers only
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class Schedule:
    """Learning rate per optimizer update: linear warmup from ``warmup_lr`` to ``peak``, then
    cosine to ``min_lr`` (official ``WARMUP_PREFIX=True``: the cosine starts after warmup),
    or linearly to ``min_lr`` (``poly``, mmseg's polynomial decay with power 1, the dense
    recipes' schedule), or step decays at ``milestones`` (updates), or constant."""

    peak: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps_per_epoch: int, global_batch: int) -> Schedule:
        # Linear scaling per 512 images, as the official main.py; the global batch counts
        # accumulation, so the same recipe gives the same lr however the batch is split.
        scale = global_batch / 512 if cfg.scale_lr else 1.0
        return cls(
            peak=cfg.lr * scale,
            warmup_lr=cfg.warmup_lr * scale,
            min_lr=cfg.min_lr * scale,
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
            total_steps=cfg.epochs * steps_per_epoch,
            kind=cfg.scheduler,
            milestones=tuple(round(m * steps_per_epoch) for m in cfg.milestones),
            gamma=cfg.gamma,
        )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        if self.kind == "multistep":
            return self.peak * self.gamma ** sum(step >= m for m in self.milestones)
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(step - self.warmup_steps, span)
        if self.kind == "poly":
            return self.min_lr + (self.peak - self.min_lr) * (1 - t / span)
        return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1 + math.cos(math.pi * t / span))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
