"""Data side: bundled digits, image folders (bad files, clear errors), resume- and rank-exact
loaders with augmentation, reproducible mixup."""

from __future__ import annotations

import collections
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from swinv2.data.datasets import (
    DigitsDataset,
    ImageFolderDataset,
    MissingFolderError,
    check_same_classes,
    resolve_folders,
    split_holdout,
    subset_fraction,
)
from swinv2.data.loader import EpochSampler, TransformedDataset, build_loader, collate_skip
from swinv2.data.mixup import apply_mixup, build_mixup, soft_target_cross_entropy, train_criterion
from swinv2.data.transforms import eval_transform, train_transform

# -- bundled digits ----------------------------------------------------------------------


def test_digits_split_sizes_stratified_deterministic():
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert len(train) + len(val) == 1797
    assert not set(train.indices) & set(val.indices)
    assert len(val) == pytest.approx(0.2 * 1797, abs=10)
    assert train.classes == [str(i) for i in range(10)]
    per_class = collections.Counter(train.targets) + collections.Counter(val.targets)
    for c, n in collections.Counter(val.targets).items():
        assert abs(n - 0.2 * per_class[c]) <= 1  # every class held out in proportion
    again = DigitsDataset("val")
    assert again.indices == val.indices and again.targets == val.targets
    assert DigitsDataset("val", seed=1).indices != val.indices


def test_digits_are_real_pixels():
    from sklearn.datasets import load_digits

    ds = DigitsDataset("train", size=32)
    img, target = ds[5]
    a = np.asarray(img)
    assert img.mode == "RGB" and img.size == (32, 32) and 0 <= target <= 9
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert a.max() > 200 and 0.1 < (a > 64).mean() < 0.9  # strokes on a dark background, not blank
    # Shrunk back to 8x8 the image matches the original scan (0..16 scaled to 0..255).
    original = load_digits().images[ds.indices[5]] * 255 / 16
    small = np.asarray(img.convert("L").resize((8, 8), Image.BOX), dtype=np.float64)
    assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.9


# -- image folders -----------------------------------------------------------------------


def _png_bytes(seed: int, size: int = 12) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, spec: dict[str, list[str]]):
    """Class subfolders of files: 'ok' a valid PNG, 'empty' zero bytes, 'text' not an image,
    'trunc' a PNG cut in half."""
    for cls, kinds in spec.items():
        (root / cls).mkdir(parents=True)
        for i, kind in enumerate(kinds):
            data = {"ok": _png_bytes(i), "empty": b"", "text": b"not an image\n", "trunc": _png_bytes(i)[:150]}[kind]
            (root / cls / f"{i}.{'png' if kind in ('ok', 'trunc') else 'jpg'}").write_bytes(data)
    return root


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_images_are_skipped_through_the_loader(tmp_path, workers):
    root = _folder(tmp_path / "imgs", {"a": ["ok"] * 4, "b": ["empty", "text", "trunc", "ok"]})
    (root / "b" / "notes.txt").write_text("ignored: not an image extension")
    ds = ImageFolderDataset(root, min_classes=2)
    assert len(ds) == 8 and ds.classes == ["a", "b"]
    assert [ds[i][0] is None for i in range(8)] == [False] * 4 + [True, True, True, False]
    loader = build_loader(TransformedDataset(ds, eval_transform(8, crop_pct=1.0, crop_mode="squash")),
                          batch_size=2, train=False, workers=workers, seed=0)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    assert [b[2] for b in batches] == [0, 0, 2, 1]
    images, targets, skipped = batches[2]  # both files unreadable: an empty batch, not an error
    assert images.numel() == 0 and targets.shape == (0,) and targets.dtype == torch.long
    assert batches[3][0].shape == (1, 3, 8, 8) and batches[3][1].tolist() == [1]


def test_collate_skip():
    x = torch.ones(3, 2, 2)
    images, targets, skipped = collate_skip([None, (x, 1), (x * 2, 0)])
    assert images.shape == (2, 3, 2, 2) and targets.tolist() == [1, 0] and skipped == 1
    images, targets, skipped = collate_skip([None, None])
    assert len(targets) == 0 and skipped == 2


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not found") as err:
        ImageFolderDataset(tmp_path / "missing")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, MissingFolderError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataset(tmp_path / "empty")
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "x.png").write_bytes(_png_bytes(0))
    with pytest.raises(ValueError, match=r"no class subfolders \(1 loose files\)"):
        ImageFolderDataset(loose)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(tmp_path / "noimg")
    one = _folder(tmp_path / "one", {"cat": ["ok", "ok"]})
    assert len(ImageFolderDataset(one)) == 2  # fine to evaluate
    with pytest.raises(ValueError, match="at least 2 classes"):
        ImageFolderDataset(one, min_classes=2)
    hole = _folder(tmp_path / "hole", {"cat": ["ok"], "dog": []})
    with pytest.raises(ValueError, match="'dog'.*hold no images"):
        ImageFolderDataset(hole)


def test_resolve_folders_and_class_mismatch(tmp_path):
    assert resolve_folders(None, None) == (None, None)
    with pytest.raises(ValueError, match="not found"):
        resolve_folders(tmp_path / "nope", None)
    flat = _folder(tmp_path / "flat", {"a": ["ok"], "b": ["ok"]})
    assert resolve_folders(flat, None) == (flat, None)
    nested = _folder(tmp_path / "nested", {"train/a": ["ok"], "train/b": ["ok"], "val/a": ["ok"], "val/c": ["ok"]})
    assert resolve_folders(nested, None) == (nested / "train", nested / "val")
    assert resolve_folders(nested, flat) == (nested / "train", flat)
    with pytest.raises(ValueError, match="validation folder not found"):
        resolve_folders(nested, tmp_path / "nope")
    only_val = _folder(tmp_path / "onlyval", {"val/a": ["ok"]})
    with pytest.raises(ValueError, match="no train/ subfolder"):
        resolve_folders(only_val, None)
    train, val = (ImageFolderDataset(p) for p in resolve_folders(nested, None))
    with pytest.raises(ValueError, match=r"only in training: \['b'\].*only in validation: \['c'\]"):
        check_same_classes(train, val)
    check_same_classes(train, ImageFolderDataset(flat))


def test_holdout_and_fraction():
    ds = DigitsDataset("all")
    tr, va = split_holdout(ds, 0.1, seed=3)
    assert len(tr) + len(va) == len(ds) and not set(tr.indices) & set(va.indices)
    assert sorted(set(va.targets)) == list(range(10)) and va.classes == ds.classes
    assert split_holdout(ds, 0.1, seed=3)[1].indices == va.indices
    small = subset_fraction(tr, 0.05, seed=0)
    counts = collections.Counter(small.targets)
    assert set(counts) == set(range(10)) and all(7 <= n <= 10 for n in counts.values())
    assert [small[i][1] for i in range(3)] == small.targets[:3]  # labels survive nesting
    flat = subset_fraction(tr, 0.05, seed=0, per_class=False)
    assert len(flat) == round(0.05 * len(tr))
    assert subset_fraction(tr, 1.0, seed=0) is tr
    with pytest.raises(ValueError):
        split_holdout(ds, 0.0, seed=0)


# -- sampling: resume and rank split ---------------------------------------------------------


def _keys(n, B, W, drop_last, epoch=0, seed=0, start=0):
    out = []
    for r in range(W):
        s = EpochSampler(n, shuffle=True, seed=seed, rank=r, world_size=W, drop_last=drop_last, batch_size=B)
        s.set_epoch(epoch, start)
        keys = list(s)
        assert len(keys) == len(s) or start
        out.append(keys)
    return out


@pytest.mark.parametrize("n,B,W,drop_last", [(50, 4, 2, True), (50, 4, 2, False), (37, 3, 4, False), (3, 2, 4, False)])
def test_sampler_global_batch_mapping(n, B, W, drop_last):
    (single,) = _keys(n, B * W, 1, drop_last)
    ranks = _keys(n, B, W, drop_last)
    nb = -(-len(ranks[0]) // B)
    assert all(-(-len(k) // B) == nb for k in ranks)  # every rank sees the same number of batches
    G = B * W
    for b in range(nb):
        last = b == nb - 1 and not drop_last
        share = (len(ranks[0]) - b * B) if last else B
        joined = [key for k in ranks for key in k[b * B : b * B + share]]
        assert joined[: len(single[b * G : (b + 1) * G])] == single[b * G : (b + 1) * G]
    seen = {i for k in ranks for _, i in k}
    assert seen == set(range(n)) if not drop_last else len(seen) == (n // G) * G
    assert _keys(n, B, W, drop_last, epoch=1) != ranks  # a new permutation each epoch


def test_sampler_resume_and_errors():
    (full,) = _keys(50, 4, 1, True, epoch=2)
    (tail,) = _keys(50, 4, 1, True, epoch=2, start=5)
    assert tail == full[5 * 4 :]
    with pytest.raises(ValueError, match="no full global batch"):
        EpochSampler(5, shuffle=True, seed=0, world_size=2, drop_last=True, batch_size=4)
    with pytest.raises(ValueError, match="start_batch"):
        EpochSampler(50, shuffle=True, seed=0, drop_last=True, batch_size=4).set_epoch(0, 99)


@pytest.fixture(scope="module")
def small_digits():
    return subset_fraction(DigitsDataset("train", size=32), 0.04, seed=0)  # ~58 real images


def _batches(ds, *, batch_size, epoch, start=0, rank=0, world_size=1, workers=0, drop_last=None):
    loader = build_loader(TransformedDataset(ds, train_transform(32), seed=7), batch_size=batch_size, train=True,
                          workers=workers, seed=7, rank=rank, world_size=world_size, drop_last=drop_last)
    loader.sampler.set_epoch(epoch, start)
    return [(x, y) for x, y, _ in loader]


def test_resume_mid_epoch_gives_the_same_augmented_batches(small_digits):
    torch.manual_seed(123)
    rng_before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    full = _batches(small_digits, batch_size=8, epoch=3)
    # Loading in the main process leaves the caller's random streams alone.
    assert torch.equal(torch.get_rng_state(), rng_before[0])
    assert (np.random.get_state()[1] == rng_before[1]).all() and random.getstate() == rng_before[2]
    assert len(full) == len(small_digits) // 8
    tail = _batches(small_digits, batch_size=8, epoch=3, start=4, workers=2)  # and another worker count
    assert len(tail) == len(full) - 4
    for (x, y), (x2, y2) in zip(full[4:], tail):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = _batches(small_digits, batch_size=8, epoch=4)
    assert not torch.equal(other[0][0], full[0][0])  # a new epoch draws new order and augmentation


def test_two_ranks_equal_one_process_with_the_global_batch(small_digits):
    for drop_last in (True, False):
        single = _batches(small_digits, batch_size=8, epoch=1, drop_last=drop_last)
        r0 = _batches(small_digits, batch_size=4, epoch=1, rank=0, world_size=2, drop_last=drop_last)
        r1 = _batches(small_digits, batch_size=4, epoch=1, rank=1, world_size=2, drop_last=drop_last)
        assert len(single) == len(r0) == len(r1)
        for (x, y), (x0, y0), (x1, y1) in zip(single, r0, r1):
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_transformed_dataset_is_keyed_by_epoch_and_index(small_digits):
    ds = TransformedDataset(small_digits, train_transform(32), seed=0)
    a, b = ds[(0, 3)], ds[(0, 3)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] == small_digits[3][1]
    assert not torch.equal(ds[(1, 3)][0], a[0])
    assert torch.equal(ds[3][0], a[0])  # a plain index means epoch 0
    with pytest.raises(TypeError, match="TransformedDataset"):
        build_loader(small_digits, batch_size=4, train=True, workers=0, seed=0)


# -- mixup -------------------------------------------------------------------------------


def test_mixup_is_reproducible_per_step():
    mixup = build_mixup(10)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    state = np.random.get_state()[1].copy()
    a = apply_mixup(mixup, x.clone(), y, seed=1, step=5)
    b = apply_mixup(mixup, x.clone(), y, seed=1, step=5)
    assert (np.random.get_state()[1] == state).all()  # numpy's global stream is restored
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].shape == (8, 10) and torch.allclose(a[1].sum(1), torch.ones(8))
    others = [apply_mixup(mixup, x.clone(), y, seed=1, step=(s, 0, 0))[0] for s in range(4)]
    assert any(not torch.equal(o, a[0]) for o in others)
    loss = soft_target_cross_entropy(torch.randn(8, 10), a[1])
    assert torch.isfinite(loss)


def test_mixup_odd_batch_and_off():
    mixup = build_mixup(10, label_smoothing=0.1)
    x = torch.randn(7, 3, 8, 8)
    mixed, target = apply_mixup(mixup, x.clone(), torch.arange(7), seed=0, step=0)
    assert torch.equal(mixed, x)  # not mixed
    assert torch.allclose(target.max(1).values, torch.full((7,), 0.91))  # 1 - 0.1 + 0.1 / 10
    assert target.argmax(1).tolist() == list(range(7))
    assert build_mixup(10, mixup=0.0, cutmix=0.0) is None
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    assert isinstance(train_criterion(mixup, 0.1), SoftTargetCrossEntropy)
    assert isinstance(train_criterion(None, 0.1), LabelSmoothingCrossEntropy)
    assert isinstance(train_criterion(None, 0.0), torch.nn.CrossEntropyLoss)
