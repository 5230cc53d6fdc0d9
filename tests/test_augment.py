"""The official training augmentation on real photographs: RandAugment's strongest posterize
(0 bits kept) gives a black image instead of an error, and nothing else changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data import auto_augment

from swinv2.data import transforms
from swinv2.data.loader import EpochSampler, TransformedDataset
from swinv2.train.config import TrainConfig


def real_photos(size: int = 96) -> list[Image.Image]:
    """Corner and centre crops of real photographs: scikit-learn's sample images, and
    scikit-image's bundled ones when it is installed."""
    from sklearn.datasets import load_sample_images

    arrays = list(load_sample_images().images)
    try:
        from skimage import data

        arrays += [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket",
                                                       "immunohistochemistry", "hubble_deep_field")]
    except ImportError:
        pass
    crops = []
    for a in arrays:
        h, w = a.shape[:2]
        for y, x in ((0, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)):
            crops.append(Image.fromarray(a[y:y + size, x:x + size, :3]))
    return crops


def default_train_transform(img_size: int):
    """What ``swinv2 train`` builds from the recipe defaults (supervised.make_loop)."""
    c = TrainConfig()
    return transforms.train_transform(img_size, auto_augment=c.auto_augment, color_jitter=c.color_jitter,
                                      reprob=c.reprob, scale=(c.crop_scale, 1.0), hflip=c.hflip)


def posterize_ops(tf) -> list:
    randaugment = [t for t in tf.transforms[1].transforms if isinstance(t, auto_augment.RandAugment)]
    assert len(randaugment) == 1, "the default recipe has RandAugment"
    ops = [op for op in randaugment[0].ops if op.name.startswith("Posterize")]
    assert ops, "the official RandAugment policy has a posterize op"
    return ops


def spy_on_posterize(tf) -> list:
    """Record (bits kept, output extrema) of every posterize the transform applies."""
    calls = []
    for op in posterize_ops(tf):
        def spy(img, bits, *args, _apply=op.aug_fn, **kwargs):
            out = _apply(img, bits, *args, **kwargs)
            calls.append((bits, out.getextrema()))
            return out

        op.aug_fn = spy
    return calls


def as_timm_builds_it(tf):
    """The same transform with timm's own posterize put back (the behaviour before the fix)."""
    for op in posterize_ops(tf):
        op.aug_fn = auto_augment.posterize
    return tf


def test_default_randaugment_on_real_photos_survives_zero_bit_posterize():
    photos = real_photos()
    assert len(photos) >= 6
    tf = default_train_transform(48)
    calls = spy_on_posterize(tf)
    plain = as_timm_builds_it(default_train_transform(48))
    keys = ((seed, epoch, i) for seed in range(1000) for epoch in range(10) for i in range(len(photos)))
    zero_bit_draws, compared, draws = [], 0, 0
    # The policy's magnitude is drawn around 9 (std 0.5) and clipped at 10, where the increasing
    # posterize keeps 0 bits: about 1 image in 700. Draw until that happened twice.
    while draws < 1500 or len(zero_bit_draws) < 2:
        seed, epoch, i = next(keys)
        ds = TransformedDataset([(p, 0) for p in photos], tf, seed=seed)
        before = len(calls)
        image, _ = ds[(epoch, i)]
        draws += 1
        assert image.shape == (3, 48, 48) and torch.isfinite(image).all()
        reference = TransformedDataset([(p, 0) for p in photos], plain, seed=seed)
        if any(bits <= 0 for bits, _ in calls[before:]):
            zero_bit_draws.append((seed, epoch, i))
            with pytest.raises(ValueError, match="bits"):
                reference[(epoch, i)]  # timm with this Pillow refuses 0 bits
        elif draws % 10 == 0:  # elsewhere the images are timm's, bit for bit
            assert torch.equal(image, reference[(epoch, i)][0])
            compared += 1
    assert compared >= 100
    blacks = [extrema for bits, extrema in calls if bits <= 0]
    assert len(blacks) >= 2 and all(extrema == ((0, 0), (0, 0), (0, 0)) for extrema in blacks)
    assert any(bits >= 1 for bits, _ in calls)  # the other posterize levels ran too


def test_zero_bit_posterize_is_what_pillow_computed():
    """Pillow's lookup table keeps ``i & ~(2 ** (8 - bits) - 1)``: nothing for 0 bits, and for
    1 to 8 bits what Pillow still gives."""
    img = real_photos()[0]
    assert transforms._posterize(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert transforms._posterize(img, -1).getextrema() == ((0, 0), (0, 0), (0, 0))
    for bits in range(1, 9):
        lut = [i & ~(2 ** (8 - bits) - 1) for i in range(256)] * 3
        assert transforms._posterize(img, bits).tobytes() == img.point(lut).tobytes()


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "original", "v0",
                                    "augmix-m5-w4-d2"])
def test_every_timm_policy_gets_the_defined_posterize(policy):
    tf = transforms.train_transform(32, auto_augment=policy)
    ops = []
    for step in tf.transforms[1].transforms:
        if isinstance(step, auto_augment.AutoAugment):
            ops += [op for sub in step.policy for op in sub]
        ops += list(getattr(step, "ops", []) or [])
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize and all(op.aug_fn is transforms._posterize for op in posterize)


def _photo_folder(root: Path, photos: list[Image.Image], classes: int = 3, per_class: int = 8) -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(per_class):
            img = photos[(c * per_class + k) % len(photos)].resize((40, 40))
            img.save(root / f"class{c}" / f"{k}.{'jpg' if k % 2 else 'png'}")
    return root


def _epoch_hits_zero_bits(cfg: TrainConfig, epoch: int) -> bool:
    """Whether a run with ``cfg`` meets a 0-bit posterize in ``epoch``: the run's own training
    split, sample order and per-sample seeds, through the spy."""
    from swinv2.tasks.supervised import load_datasets

    train, _, _ = load_datasets(cfg)
    tf = default_train_transform(cfg.img_size)
    calls = spy_on_posterize(tf)
    ds = TransformedDataset(train, tf, seed=cfg.seed)
    sampler = EpochSampler(len(train), shuffle=True, seed=cfg.seed, drop_last=True, batch_size=cfg.batch_size)
    sampler.set_epoch(epoch)
    for key in sampler:
        ds[key]
    return any(bits <= 0 for bits, _ in calls)


def test_train_and_resume_on_an_rgb_folder_with_the_default_recipe(tmp_path, capsys):
    """The default recipe (RandAugment, mixup, CutMix, random erasing) in a loader worker, on a
    folder of PNG and JPEG photos, with a seed whose second epoch meets a 0-bit posterize: the
    first epoch runs, then ``--resume`` runs through that image."""
    from swinv2.cli import main

    data = _photo_folder(tmp_path / "photos", real_photos())
    base = TrainConfig(data=str(data), img_size=32, batch_size=8)
    seed = next(s for s in range(300) if _epoch_hits_zero_bits(base.replace(seed=s), epoch=1))
    args = ["train", "--data", str(data), "--model", "swinv2_debug", "--img-size", "32", "--batch-size", "8",
            "--epochs", "2", "--workers", "1", "--threads", "1", "--seed", str(seed), "--no-progress",
            "--no-tensorboard", "--output", str(tmp_path / "run")]
    assert main(args + ["--max-steps", "2"]) == 0  # 21 training images: 2 batches of 8 per epoch
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["updates"] == 2
    assert main(args + ["--max-steps", "4", "--resume"]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["updates"] == 4 and summary["skipped_images"] == 0
    assert (tmp_path / "run" / "checkpoint-last.pt").stat().st_size > 0
    assert (tmp_path / "run" / "model-last.safetensors").stat().st_size > 0
