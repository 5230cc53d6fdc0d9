"""Loaders whose every random choice is a pure function of the seed and a position in the run.

That is what makes exact resume and "N processes x B/N == 1 process x B" hold:

* **Order.** Epoch ``e`` visits ``perm_e = randperm(n)`` drawn from (seed, e). With
  ``G = batch_size * world_size`` (the global batch), global batch ``b`` is
  ``perm_e[b*G : (b+1)*G]`` and process ``r`` takes the contiguous slice
  ``[b*G + r*B, b*G + (r+1)*B)`` of it. Concatenating the ranks' b-th batches in rank order
  gives exactly the b-th batch of one process with batch size G.
  ``drop_last=True`` (training): ``n // G`` batches; the ``n % G`` tail of each permutation is
  skipped (a different tail every epoch). ``drop_last=False``: ``ceil(n / G)`` batches;
  like DistributedSampler the permutation is padded with its own first entries up to a
  multiple of ``world_size``, and the last, shorter global batch (``L`` entries, a multiple
  of ``world_size``) is split into ``L / world_size`` contiguous entries per rank; with one
  process nothing is padded.
* **Resume.** ``set_epoch(e, start_batch=k)`` starts at batch ``k``; skipped samples are never
  loaded, and the rest are bit-identical to an uninterrupted epoch.
* **Augmentation.** The sampler yields ``(epoch, index)`` keys; :class:`TransformedDataset`
  seeds torch (CPU), numpy and Python's ``random`` from (seed, epoch, index) around each
  transform, so a sample's augmentation does not depend on worker count, batch composition,
  rank or resume point.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


def derive_seed(*parts) -> int:
    """A 63-bit seed from any ints/strings (blake2b: nearby inputs give unrelated seeds, unlike
    ``seed + epoch`` where epoch 1 of seed 0 equals epoch 0 of seed 1)."""
    text = "/".join(str(int(p)) if not isinstance(p, str) else p for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's CPU generator, numpy's and Python's global RNGs for a block, then restore
    them, so the caller's streams (model init, dropout) are untouched when this runs in the
    main process (``workers=0``). Only the CPU generator: ``torch.manual_seed`` would also
    reseed the CUDA generators, which nothing here restores."""
    seed = int(seed)
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed((seed >> 31) & 0xFFFFFFFF)  # numpy's legacy seed takes 32 bits
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


class TransformedDataset(Dataset):
    """``ds[(epoch, i)] -> (transform(base[i] image), target)``, or None for an unreadable image.

    The transform runs inside :func:`seeded` with ``derive_seed("aug", seed, epoch, i)``. A plain
    int key means epoch 0 (handy for evaluation, whose transform has no randomness).
    """

    def __init__(self, base, transform, seed: int = 0):
        self.base, self.transform, self.seed = base, transform, int(seed)

    @property
    def classes(self):
        return self.base.classes

    @property
    def targets(self):
        return self.base.targets

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else key
        image, target = self.base[index]
        if image is None:
            return None
        if self.transform is None:
            return image, target
        with seeded(derive_seed("aug", self.seed, epoch, index)):
            return self.transform(image), target


class EpochSampler(Sampler):
    """This process's ``(epoch, index)`` keys of one epoch, in batch order (module docstring).

    ``batch_size`` is per process. ``len()`` is the number of keys this process yields in a full
    epoch; :attr:`num_batches` the number of its batches (the same on every rank).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool,
                 batch_size: int):
        if n <= 0:
            raise ValueError("the dataset is empty")
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size > 0 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.n, self.shuffle, self.seed, self.drop_last = n, shuffle, int(seed), drop_last
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.global_batch = batch_size * world_size
        self.epoch, self.start_batch = 0, 0
        if self.num_batches == 0:
            raise ValueError(
                f"{n} images make no full global batch of {batch_size} x {world_size} process(es) = "
                f"{self.global_batch}: lower the batch size"
            )

    @property
    def num_batches(self) -> int:
        G = self.global_batch
        return self.n // G if self.drop_last else -(-self.n // G)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch the next iteration draws, starting at its batch ``start_batch`` (resume)."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(derive_seed("order", self.seed, self.epoch))
        return torch.randperm(self.n, generator=gen).tolist()

    def _bounds(self, b: int) -> tuple[int, int]:
        """[start, stop) in the (padded) permutation of this rank's part of global batch b."""
        G, B, W = self.global_batch, self.batch_size, self.world_size
        if self.drop_last or b < self.num_batches - 1:
            start = b * G + self.rank * B
            return start, start + B
        last = -(-self.n // W) * W - b * G  # entries of the padded last global batch, a multiple of W
        share = last // W
        start = b * G + self.rank * share
        return start, start + share

    def __len__(self) -> int:
        lo, hi = self._bounds(self.num_batches - 1)
        return (self.num_batches - 1) * self.batch_size + (hi - lo)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()
        if not self.drop_last:
            padded = -(-self.n // self.world_size) * self.world_size
            while len(order) < padded:  # repeat from the start (more than once only if n < world_size)
                order += order[: padded - len(order)]
        for b in range(self.start_batch, self.num_batches):
            lo, hi = self._bounds(b)
            for i in order[lo:hi]:
                yield self.epoch, i


def collate_skip(batch):
    """``(images, targets, n_skipped)`` from a list of samples, dropping the None ones.

    A batch whose every image was unreadable gives ``images = torch.empty(0)``,
    ``targets = torch.empty(0, dtype=torch.long)`` and ``n_skipped = len(batch)``: the
    training loop recognises it by ``len(targets) == 0``.
    """
    kept = [s for s in batch if s is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = default_collate(kept)  # stacks tensors (or tuples of them) and int targets
    return images, targets, skipped


def build_loader(
    dataset: TransformedDataset,
    *,
    batch_size: int,
    train: bool,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader of ``(images, targets, n_skipped)`` batches over a :class:`TransformedDataset`.

    ``batch_size`` is per process. ``train``: shuffled, and ``drop_last`` defaults to True (full
    global batches only, as the official recipe). Call ``loader.sampler.set_epoch(epoch,
    start_batch)`` before iterating each epoch. ``len(loader)`` is the number of batches of a
    full epoch, the same on every rank.
    """
    if not isinstance(dataset, TransformedDataset):
        raise TypeError(
            f"build_loader needs a TransformedDataset (keys are (epoch, index) pairs), got {type(dataset).__name__}"
        )
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size,
                           drop_last=train if drop_last is None else drop_last, batch_size=batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,  # the sampler already dropped or padded: DataLoader's drop_last stays False
        num_workers=workers,
        collate_fn=collate_skip,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and workers > 0,
        # Each iterator draws a base seed for its workers; from a private generator it does not
        # consume the global torch RNG, so resuming (one more iterator) cannot shift model randomness.
        generator=torch.Generator().manual_seed(derive_seed("loader", seed, rank)),
    )
