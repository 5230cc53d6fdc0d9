"""``swinv2 eval`` and ``swinv2 predict`` for video checkpoints: top-1/top-5 over clip folders
or Kinetics CSVs with multi-view testing, and the top classes of single clips."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..data import datasets as D
from ..data.video import KineticsClips, VideoFolder, VideoViewsDataset, frame_count
from ..data.video_demo import prepare_video_demo
from ..data.video_transforms import video_eval_transform
from ..files import is_safetensors, read_safetensors_metadata
from ..hub import META_FORMAT, config_from_metadata
from ..reading import read_weights
from ..train.config import TrainConfig
from ..train.distributed import all_reduce_sum, setup, teardown
from ..variants import create_model
from ..video import VideoSwinTransformerV2
from .evaluate import SkipCounter
from .video import ClipList, evaluate_views, require_clips, views_loader


def is_video_checkpoint(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a swinv2 file or training checkpoint of a video network. A damaged
    file raises its one-line CheckpointError here, before any other work."""
    if path is None or not Path(path).is_file():
        return False
    if is_safetensors(path):
        meta, _ = read_safetensors_metadata(path)
        return "num_frames" in (config_from_metadata(path, meta) if meta.get(META_FORMAT) else {})
    config = read_weights(path).config
    return config is not None and "num_frames" in config


def load_video_weights(checkpoint: str, window=None) -> tuple[VideoSwinTransformerV2, dict, list[str] | None]:
    """(network, clip settings, class names) of a video run's checkpoint. The settings are the
    run's (frames, interval, crop size, short side, test views): from the ``video`` metadata of a
    ``model-*.safetensors``, or the run config of a ``checkpoint-*.pt``; the network's own
    frames and size otherwise."""
    weights = read_weights(checkpoint)
    if weights.config is None or "num_frames" not in weights.config:
        raise ValueError(f"{checkpoint} does not hold a video network")
    overrides = {"window_size": window} if window else {}
    net = create_model(pretrained=weights, **overrides)
    settings = None
    if is_safetensors(checkpoint):
        meta, _ = read_safetensors_metadata(checkpoint)
        settings = json.loads(meta["video"]) if meta.get("video") else None
    elif weights.run_config:
        run = TrainConfig.from_dict(weights.run_config)
        img = run.img_size or net.img_size[0]
        settings = dict(frames=run.frames or net.num_frames, interval=run.frame_interval, img_size=img,
                        short_side=run.short_side or round(img * 8 / 7), test_clips=run.test_clips,
                        test_crops=run.test_crops)
    if settings is None:
        img = net.img_size[0]
        settings = dict(frames=net.num_frames, interval=2, img_size=img, short_side=round(img * 8 / 7),
                        test_clips=1, test_crops=1)
    return net, settings, weights.class_names


def evaluate_video_weights(checkpoint: str, data: str | None = None, *, frames: int | None = None,
                           interval: int | None = None, clips: int | None = None, crops: int | None = None,
                           img_size: int | None = None, window=None, video_root: str | None = None,
                           batch_size: int = 8, workers: int = 2, amp: str = "none", device: str = "auto") -> dict:
    """Top-1, top-5 (fractions) and loss of a video checkpoint on ``data`` (a folder of class
    subfolders, its ``val/`` when it has one; or a Kinetics CSV with clips under ``video_root``),
    default the bundled demo's validation clips, with every clip's probabilities averaged over
    ``clips x crops`` views. The result states the views, frames, interval, size and window."""
    net, settings, names = load_video_weights(checkpoint, window)
    for key, value in (("frames", frames), ("interval", interval), ("test_clips", clips), ("test_crops", crops),
                       ("img_size", img_size)):
        if value:
            settings[key] = value
    if img_size:
        settings["short_side"] = round(img_size * 8 / 7)
    cfg = TrainConfig(batch_size=batch_size, workers=workers, amp=amp, device=device)
    env = setup(cfg.device)
    try:
        source = _eval_source(data, video_root, names)
        if names is not None and list(names) != list(source.classes):
            raise ValueError(f"the weights were trained on classes {names[:10]}..., the data has "
                             f"{list(source.classes)[:10]}...")
        if net.num_classes != len(source.classes):
            raise ValueError(f"the model has {net.num_classes} outputs but the data has {len(source.classes)} classes")
        net.to(env.device)
        loader = SkipCounter(views_loader(source, settings, 1, workers, 0, env))
        metrics = evaluate_views(net, loader, env, cfg, len(source.classes), clips_per_forward=batch_size)
        skipped = torch.tensor(float(loader.skipped), dtype=torch.float64, device=env.device)
        all_reduce_sum(skipped)
        require_clips(metrics, source, "evaluation")
        return dict(metrics, skipped_clips=int(skipped), clips_per_video=settings["test_clips"],
                    crops=settings["test_crops"], frames=settings["frames"], interval=settings["interval"],
                    img_size=settings["img_size"], window=list(net.window_size), checkpoint=checkpoint)
    finally:
        teardown()


def _eval_source(data: str | None, video_root: str | None, names):
    if data is None:
        return VideoFolder(prepare_video_demo() / "val")
    if data.lower().endswith(".csv"):
        return KineticsClips(data, Path(video_root or os.path.dirname(os.path.abspath(data))), classes=names)
    train_root, val_root = D.resolve_folders(data, None)
    return VideoFolder(val_root or train_root)


def predict_clips(checkpoint: str, paths: list[str], *, topk: int = 5, window=None, clips: int | None = None,
                  crops: int | None = None, device: str = "cpu") -> list[dict]:
    """The ``topk`` classes (name, probability) of each clip, its views averaged; a clip that
    cannot be decoded gives ``{"clip": path, "error": ...}`` instead."""
    net, settings, names = load_video_weights(checkpoint, window)
    if clips:
        settings["test_clips"] = clips
    if crops:
        settings["test_crops"] = crops
    names = names or [str(i) for i in range(net.num_classes)]
    tf = video_eval_transform(settings["img_size"], short_side=settings["short_side"],
                              num_crops=settings["test_crops"])
    files = ClipList([(str(p), 0) for p in paths], ["?"])
    views = VideoViewsDataset(files, tf, clip_len=settings["frames"], interval=settings["interval"],
                              num_clips=settings["test_clips"])
    net.to(device).eval()
    out = []
    for i, path in enumerate(paths):
        if not Path(path).is_file():
            out.append(dict(clip=str(path), error="no such file"))
            continue
        with warnings.catch_warnings(record=True) as caught:  # the reason goes into the row instead
            warnings.simplefilter("always")
            item = views[(0, i)]
        if item is None:
            reason = str(caught[-1].message).split(": ", 2)[-1] if caught else "unreadable"
            out.append(dict(clip=str(path), error=f"unreadable clip ({reason})"))
            continue
        with torch.no_grad():
            probs = net(item[0].to(device)).float().softmax(-1).mean(0)  # views averaged
        top = probs.topk(min(topk, probs.numel()))
        out.append(dict(clip=str(path), frames=frame_count(path), top=[
            dict(name=names[j], index=int(j), prob=float(p)) for p, j in zip(top.values, top.indices)]))
    return out
