"""Loaders whose every random choice is a function of the seed and a position in the run.

* Sample order: a permutation of (seed, epoch). Global batch ``b`` is permutation entries
  ``[b*G, (b+1)*G)`` with ``G = batch_size * world_size``, and process ``r`` takes the
  contiguous slice ``[r*batch_size, (r+1)*batch_size)`` of it. So N processes with batch B/N
  see exactly the images one process with batch B sees, and resuming at batch ``k`` of an
  epoch just starts the batch sampler at ``k`` (skipped images are never loaded).
* Augmentation: before transforming sample ``i`` of epoch ``e`` the torch, numpy and Python
  RNGs are seeded from (seed, e, i), whatever worker, process or resume point loads it.
* Mixup/CutMix: numpy and Python RNGs are seeded per call from a seed the caller derives
  from (seed, update, micro-batch, rank).
"""

from __future__ import annotations

import contextlib
import hashlib
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _seed(*parts: int) -> int:
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch, numpy and Python's RNGs for a block, then restore them (so the caller's
    random streams are not disturbed when this runs in the main process)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % (1 << 32))
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class TransformedDataset(Dataset):
    """``base[i]`` -> ``(transform(image), target)`` with randomness fixed by (seed, epoch, i).

    Indexed by ``(epoch, i)`` pairs (what :class:`EpochBatchSampler` yields); an unreadable
    image (None from the base) stays None for the collate function to drop.
    """

    def __init__(self, base, transform, seed: int = 0):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        image, target = self.base[index]
        if image is None:
            return None
        with seeded(_seed(self.seed, epoch, index)):
            return self.transform(image), target


class EpochBatchSampler(Sampler):
    """Batches of ``(epoch, index)`` for one process; see the module docstring for the layout."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if n == 0:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(
                f"{n} images make no full batch of {batch_size} x {world_size} process(es): lower --batch-size"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        G = self.batch_size * self.world_size
        return self.n // G if self.drop_last else -(-self.n // G)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        G = self.batch_size * self.world_size
        for b in range(self.start_batch, len(self)):
            chunk = order[b * G:(b + 1) * G]
            mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            yield [(self.epoch, i) for i in mine]


def collate_skip(batch):
    """Stack the readable samples: ``(images, targets, n_skipped)``. A batch whose every image
    was unreadable gives empty tensors (the training loop then contributes a zero gradient)."""
    kept = [s for s in batch if s is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([s[0] for s in kept])
    targets = torch.tensor([s[1] for s in kept], dtype=torch.long)
    return images, targets, skipped


def build_loader(dataset: TransformedDataset, *, batch_size: int, train: bool, workers: int, seed: int,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """A training loader (shuffled, full global batches only) over a :class:`TransformedDataset`."""
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed, rank=rank,
                                world_size=world_size, drop_last=train)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_skip,
                      pin_memory=pin_memory, persistent_workers=False)


# -- mixup / cutmix ------------------------------------------------------------------------


def build_mixup(num_classes: int, *, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0,
                switch_prob: float = 0.5, label_smoothing: float = 0.1):
    """timm's Mixup with the official settings (per-batch mode), or None when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode="batch",
                 label_smoothing=label_smoothing, num_classes=num_classes)


def apply_mixup(mixup, images: torch.Tensor, targets: torch.Tensor, seed: int):
    """Mix a batch reproducibly. Per-batch mixing pairs the batch with its reverse, which needs
    an even size: an odd batch (a skipped image) gets smoothed one-hot targets, unmixed."""
    if images.shape[0] % 2:
        from timm.data.mixup import mixup_target

        return images, mixup_target(targets, mixup.num_classes, 1.0, mixup.label_smoothing)
    with seeded(seed):
        return mixup(images, targets)


def train_criterion(mixup, label_smoothing: float):
    """Soft-target CE under mixup (smoothing is folded into its targets), else smoothed CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(label_smoothing)
    return torch.nn.CrossEntropyLoss()
