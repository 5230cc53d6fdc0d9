"""``swinv2 eval`` and ``swinv2 predict`` for detection and segmentation models.

Both rebuild the network from a dense run's ``model-*.safetensors`` or ``checkpoint-*.pt``
(:func:`swinv2.tasks.dense.read_dense`), with the run's own evaluation settings unless told
otherwise: ``img_size`` is the test short side (detection) or the base short side
(segmentation), ``window`` enlarges the window at test time with the weights unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from .. import fileio
from ..data.dense_transforms import segmentation_eval_transform
from ..data.images import open_rgb
from ..dense.visualize import (
    detections_to_json,
    draw_detections,
    draw_segmentation,
    save_label_png,
    save_png,
    segmentation_to_json,
)
from ..predict import find_images
from ..train.config import TrainConfig
from ..train.distributed import setup, teardown
from . import detection, segmentation
from .dense import build_dense, detection_sizes, read_dense, segmentation_sizes


def _settings(weights, img_size: int | None, batch_size: int, workers: int, amp: str, device: str) -> TrainConfig:
    cfg = weights.config.replace(batch_size=batch_size, workers=workers, amp=amp, device=device, resume=False)
    if img_size:
        cfg = cfg.replace(test_short_side=img_size) if weights.task == "detection" else cfg.replace(base_size=img_size)
    return cfg


def evaluate_dense(checkpoint: str, data: str | None = None, *, task: str | None = None, img_size: int | None = None,
                   window: int | None = None, batch_size: int = 2, workers: int = 2, amp: str = "none",
                   device: str = "auto") -> dict:
    """COCO box/mask AP (detection) or mIoU/mAcc/aAcc (segmentation), as fractions, of the dense
    model in ``checkpoint`` on ``data`` (its validation split; default: the bundled demo)."""
    weights = read_dense(checkpoint, task)
    cfg = _settings(weights, img_size, batch_size, workers, amp, device).replace(data=data)
    env = setup(cfg.device)
    try:
        model = build_dense(weights).to(env.device)
        if weights.task == "detection":
            _, val, classes, category_ids = detection.load_data(cfg)
            _check_classes(classes, weights.class_names, cfg.data)
            _, _, test_side = detection_sizes(cfg)
            result = detection.evaluate(model, detection.eval_loader(val, cfg, env), env, cfg, test_side, window)
            used = dict(short_side=test_side)
        else:
            _, val, classes = segmentation.load_data(cfg)
            _check_classes(classes, weights.class_names, cfg.data)
            result = segmentation.evaluate(model, segmentation.eval_loader(val, cfg, env), env, cfg,
                                           len(classes), window)
            used = dict(base_size=segmentation_sizes(cfg)[1], eval_mode=cfg.eval_mode,
                        scales=list(cfg.eval_scales), flip=cfg.eval_flip)
        if not result.get("images"):
            raise ValueError(f"no readable image in the validation data of {cfg.data or 'the bundled demo'}")
        return dict(result, task=weights.task, window=window or cfg.eval_window or model.encoder.window_size[0],
                    checkpoint=os.fspath(checkpoint), **used)
    finally:
        teardown()


def _check_classes(classes: list[str], trained: list[str], data) -> None:
    if list(classes) != list(trained):
        raise ValueError(f"{data or 'the bundled demo'} has classes {classes[:8]}..., the model was trained on "
                         f"{trained[:8]}... ({len(classes)} vs {len(trained)})")


def predict_dense(checkpoint: str, paths: list[str], output: str, *, task: str | None = None,
                  img_size: int | None = None, window: int | None = None, score_threshold: float = 0.5,
                  device: str = "cpu") -> list[dict]:
    """Pictures and a JSON of the predictions for every image under ``paths``: boxes, masks,
    class names and scores drawn (detection), or the colour-coded classes beside the image
    and a PNG of class indices (segmentation). Returns what predictions.json holds."""
    weights = read_dense(checkpoint, task)
    cfg = _settings(weights, img_size, 1, 0, "none", device)
    images = find_images(paths)
    out = Path(output)
    fileio.check_writable(out, "--output", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    model = build_dense(weights, window).to(device).eval()
    records = []
    with torch.no_grad():
        for path in images:
            try:
                pil = open_rgb(path)
            except (OSError, ValueError) as err:
                records.append(dict(image=os.fspath(path), error=str(err)))
                continue
            pixels = TF.pil_to_tensor(pil)  # (3, H, W) uint8
            stem = _unique_stem(Path(path), records)
            if weights.task == "detection":
                _, _, test_side = detection_sizes(cfg)
                with detection.evaluation_setting(model, test_side, None):
                    pred = {k: v.cpu() for k, v in model([TF.to_dtype(pixels, torch.float32, scale=True).to(device)])[0]
                            .items()}
                save_png(draw_detections(pixels, pred, weights.class_names, score_threshold=score_threshold),
                         out / f"{stem}.png")
                found = detections_to_json(pred, weights.class_names, score_threshold=score_threshold)
                records.append(dict(image=os.fspath(path), picture=f"{stem}.png", objects=found))
            else:
                _, base = segmentation_sizes(cfg)
                image = _segmentation_input(pixels, base)
                labels = segmentation.predict_labels(model, image.to(device), tuple(pixels.shape[-2:]), cfg).cpu()
                save_png(draw_segmentation(pixels, labels, weights.class_names), out / f"{stem}.png")
                save_label_png(labels, out / f"{stem}_labels.png")
                records.append(dict(image=os.fspath(path), picture=f"{stem}.png", labels=f"{stem}_labels.png",
                                    **segmentation_to_json(labels, weights.class_names)))
    fileio.write_text(out / "predictions.json", json.dumps(dict(task=weights.task, checkpoint=os.fspath(checkpoint),
                                                               images=records), indent=1) + "\n")
    return records


def _segmentation_input(pixels: torch.Tensor, base: int) -> torch.Tensor:
    """The evaluation input of one image, as validation makes it: rescaled with its ratio kept
    to fit (4 x base, base), normalised with the ImageNet statistics."""
    mask = torch.zeros(pixels.shape[-2:], dtype=torch.int64)  # the transform takes the pair
    image, _ = segmentation_eval_transform(scale=(base * segmentation.LONG_SIDE_RATIO, base))(
        tv_tensors.Image(pixels), tv_tensors.Mask(mask))
    return image


def _unique_stem(path: Path, records: list[dict]) -> str:
    taken = {r.get("picture", "").removesuffix(".png") for r in records}
    stem, n = path.stem, 1
    while stem in taken:
        n += 1
        stem = f"{path.stem}_{n}"
    return stem
