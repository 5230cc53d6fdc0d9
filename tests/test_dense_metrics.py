"""Dense metrics against the references of the field, and the pictures and JSON drawn from predictions.

COCO AP is checked against pycocotools' own ``COCO`` + ``COCOeval`` run on the same case written
as COCO JSON; segmentation IoU against a confusion matrix counted by hand; under torch.distributed
(two gloo processes) every process gets the single-process numbers, whatever it holds.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

metrics = pytest.importorskip("swinv2.dense.metrics")
pytest.importorskip("pycocotools")
pytest.importorskip("faster_coco_eval")
from pycocotools import mask as coco_mask  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from swinv2.dense import visualize  # noqa: E402

SIZE = 128  # big enough for a "large" COCO object (area >= 96^2)
AP_KEYS = [name for name, _ in metrics.COCO_STATS]


def _ellipse(box: tuple[float, float, float, float]) -> torch.Tensor:
    """A filled ellipse inscribed in ``box`` (xyxy): masks that are not their boxes, so box and
    mask IoUs differ."""
    x0, y0, x1, y1 = box
    yy, xx = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


def _target(objects, image_id: int) -> dict:
    """objects: (label, box, iscrowd)."""
    boxes = torch.tensor([o[1] for o in objects], dtype=torch.float32).reshape(-1, 4)
    masks = torch.stack([_ellipse(o[1]) for o in objects]) if objects else torch.zeros(0, SIZE, SIZE, dtype=torch.bool)
    return {"boxes": boxes, "labels": torch.tensor([o[0] for o in objects], dtype=torch.long),
            "masks": masks.to(torch.uint8), "iscrowd": torch.tensor([o[2] for o in objects], dtype=torch.long),
            "image_id": torch.tensor(image_id)}


def _prediction(objects) -> dict:
    """objects: (label, box, score, mask box); masks as torchvision gives them: (N, 1, H, W)
    probabilities, here 0.9 inside the mask box's ellipse, exactly 0.5 on a band below it (outside
    once cut at 0.5) and 0.2 elsewhere."""
    probs = torch.full((len(objects), 1, SIZE, SIZE), 0.2)
    for k, (_, _, _, mbox) in enumerate(objects):
        probs[k, 0, int(mbox[3]):int(mbox[3]) + 3, int(mbox[0]):int(mbox[2])] = 0.5
        probs[k, 0][_ellipse(mbox)] = 0.9
    return {"boxes": torch.tensor([o[1] for o in objects], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor([o[2] for o in objects], dtype=torch.float32),
            "labels": torch.tensor([o[0] for o in objects], dtype=torch.long), "masks": probs}


def _case() -> tuple[list[dict], list[dict]]:
    """Four images, three classes, all scores distinct (COCO breaks score ties by input order)."""
    targets = [
        _target([(1, (4, 4, 124, 126), 0), (2, (20, 100, 27, 106), 0)], 42),  # large + small
        _target([(2, (30, 20, 75, 70), 0), (1, (80, 70, 125, 125), 1), (3, (5, 5, 25, 15), 0)], 7),  # crowd, missed 3
        _target([], 100),  # no ground truth at all
        _target([(1, (40, 40, 90, 80), 0), (3, (100, 5, 112, 20), 0)], 5),  # medium + small
    ]
    preds = [
        _prediction([(1, (6, 3, 122, 127), 0.91, (5, 4, 124, 125)), (2, (21, 101, 28, 107), 0.62, (20, 100, 28, 106)),
                     (3, (60, 20, 90, 50), 0.55, (60, 20, 90, 50))]),  # the class-3 box is a false positive
        _prediction([(2, (35, 28, 78, 76), 0.74, (36, 30, 80, 76)), (1, (85, 75, 120, 120), 0.83, (85, 75, 120, 120))]),
        _prediction([(1, (10, 10, 50, 50), 0.97, (10, 10, 50, 50))]),  # false positive on an empty image
        _prediction([(1, (42, 44, 92, 78), 0.66, (40, 40, 90, 80)), (3, (100, 4, 111, 21), 0.31, (100, 5, 112, 20)),
                     (2, (0, 0, 10, 10), 0.12, (0, 0, 10, 10))]),
    ]
    return preds, targets


def _pycocotools_stats(preds, targets, iou_type: str) -> list[float]:
    """COCOeval's twelve numbers, with the case written as COCO JSON (areas of masks, as COCO's
    annotations have them) and results in the server's format; nothing of ours is used."""
    images, annotations = [], []
    for target in targets:
        image_id = int(target["image_id"])
        images.append({"id": image_id, "height": SIZE, "width": SIZE})
        for box, label, mask, crowd in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"],
                                           target["iscrowd"].tolist()):
            rle = coco_mask.encode(np.asfortranarray(mask.numpy()))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "area": float(coco_mask.area(rle)), "iscrowd": crowd,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    results = []
    for pred, target in zip(preds, targets):
        for box, score, label, prob in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist(),
                                           pred["masks"][:, 0]):
            entry = {"image_id": int(target["image_id"]), "category_id": label, "score": score}
            if iou_type == "bbox":
                entry["bbox"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            else:
                rle = coco_mask.encode(np.asfortranarray((prob > 0.5).numpy().astype(np.uint8)))
                entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            results.append(entry)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def _ours(result: dict, iou_type: str) -> list[float]:
    return [result[f"{iou_type}_{name}"] for name in AP_KEYS]


def _assert_stats_equal(got: list[float], want: list[float]) -> None:
    want = [math.nan if v < 0 else v for v in want]  # COCO's -1 is our NaN
    assert np.allclose(got, want, atol=1e-6, rtol=0, equal_nan=True), (got, want)


@pytest.fixture(scope="module")
def case():
    return _case()


@pytest.fixture(scope="module")
def reference(case):
    return {t: _pycocotools_stats(*case, t) for t in ("bbox", "segm")}


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_detection_ap_equals_pycocotools_on_coco_json(case, reference, backend):
    preds, targets = case
    metric = metrics.DetectionMetric(backend=backend)
    metric.update(preds, targets)
    result = metric.compute()
    assert result["images"] == 4
    for iou_type in ("bbox", "segm"):
        _assert_stats_equal(_ours(result, iou_type), reference[iou_type])
    assert 0 < result["bbox_AP"] < 1 and 0 < result["segm_AP"] < 1  # a case that can tell errors apart
    assert result["bbox_AP"] != result["segm_AP"]


def test_one_iou_type_alone_matches_too(case, reference):
    """Masks alone still count the false positive on the image without ground truth; boxes alone
    take the annotations' areas from ``area`` (COCO's size buckets use them, not the box area)."""
    preds, targets = case
    segm = metrics.DetectionMetric(iou_types="segm")
    segm.update(preds, targets)
    _assert_stats_equal(_ours(segm.compute(), "segm"), reference["segm"])
    bbox = metrics.DetectionMetric(iou_types=("bbox",))
    with_area = [{**t, "area": t["masks"].flatten(1).sum(1).float()} for t in targets]
    bbox.update([{k: v for k, v in p.items() if k != "masks"} for p in preds], with_area)
    result = bbox.compute()
    assert set(result) == {f"bbox_{k}" for k in AP_KEYS} | {"images"}
    _assert_stats_equal(_ours(result, "bbox"), reference["bbox"])


def test_two_updates_equal_one_and_reset_forgets(case):
    preds, targets = case
    whole = metrics.DetectionMetric()
    whole.update(preds, targets)
    parts = metrics.DetectionMetric()
    parts.update(preds[:1], targets[:1])
    parts.update(preds[1:], targets[1:])
    assert json.dumps(parts.compute()) == json.dumps(whole.compute())
    parts.reset()
    parts.update(preds[2:3], targets[2:3])  # a lone false positive, no ground truth anywhere
    result = parts.compute()
    assert result["images"] == 1 and math.isnan(result["bbox_AP"]) and math.isnan(result["segm_AP50"])


def test_known_answers():
    """Perfect predictions score 1; one prediction at IoU 0.62 (31 x 40 inside 50 x 40: 1240 / 2000)
    matches at thresholds 0.50, 0.55, 0.60 of the ten: AP50 = 1, AP75 = 0, AP = 3/10."""
    preds, targets = _case()
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(0.9, 0.5, len(t["labels"])),
                "masks": t["masks"].bool()} for t in targets if not t["iscrowd"].any()]
    metric = metrics.DetectionMetric()
    metric.update(perfect, [t for t in targets if not t["iscrowd"].any()])
    result = metric.compute()
    assert all(result[f"{t}_{k}"] == 1.0 for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75", "AR100"))

    gt_mask, pred_mask = torch.zeros(1, 64, 64, dtype=torch.uint8), torch.zeros(1, 1, 64, 64)
    gt_mask[0, 0:40, 0:50], pred_mask[0, 0, 0:40, 0:31] = 1, 0.8
    metric = metrics.DetectionMetric()
    metric.update([{"boxes": torch.tensor([[0.0, 0, 31, 40]]), "scores": torch.tensor([0.9]),
                    "labels": torch.tensor([1]), "masks": pred_mask}],
                  [{"boxes": torch.tensor([[0.0, 0, 50, 40]]), "labels": torch.tensor([1]), "masks": gt_mask}])
    result = metric.compute()
    for t in ("bbox", "segm"):
        assert result[f"{t}_AP50"] == 1.0 and result[f"{t}_AP75"] == 0.0
        assert result[f"{t}_AP"] == pytest.approx(0.3, abs=1e-6)
        assert result[f"{t}_APm"] == pytest.approx(0.3, abs=1e-6)  # 2000 pixels: medium
        assert math.isnan(result[f"{t}_APs"]) and math.isnan(result[f"{t}_APl"])  # COCO's -1


def test_detection_errors_are_one_line(case):
    preds, targets = case
    with pytest.raises(ValueError, match="iou_types"):
        metrics.DetectionMetric(iou_types=("bbox", "keypoints"))
    with pytest.raises(ValueError, match="backend"):
        metrics.DetectionMetric(backend="lvis")
    metric = metrics.DetectionMetric()
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        metric.update(preds[:2], targets[:1])
    with pytest.raises(ValueError, match="prediction 0 has no 'scores'"):
        metric.update([{k: v for k, v in preds[0].items() if k != "scores"}], targets[:1])
    with pytest.raises(ValueError, match="prediction 0 masks are"):
        metric.update([{**preds[0], "masks": preds[0]["masks"][..., :64]}], targets[:1])


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setattr(metrics, "_TORCHMETRICS_ERROR", "No module named 'torchmetrics'")
    with pytest.raises(ImportError, match=r"pip install 'swinv2\[dense\]'"):
        metrics.SegmentationMetric(3)
    monkeypatch.setattr(metrics, "_TORCHMETRICS_ERROR", None)
    monkeypatch.setattr(metrics, "_COCO_MASKS", {})
    with pytest.raises(ImportError, match=r"pip install 'swinv2\[dense\]'"):
        metrics.DetectionMetric()


def test_coco_results_format(case):
    preds, targets = case
    results = metrics.coco_results(preds, [int(t["image_id"]) for t in targets], category_ids=[18, 1, 90])
    results = json.loads(json.dumps(results))
    assert len(results) == sum(len(p["labels"]) for p in preds)
    first = results[0]  # image 42, label 1 -> category 18, box (6, 3, 122, 127)
    assert first["image_id"] == 42 and first["category_id"] == 18 and first["score"] == pytest.approx(0.91)
    assert first["bbox"] == pytest.approx([6, 3, 116, 124])
    decoded = coco_mask.decode({"size": first["segmentation"]["size"], "counts": first["segmentation"]["counts"]})
    assert np.array_equal(decoded, (preds[0]["masks"][0, 0] > 0.5).numpy())
    assert [r["category_id"] for r in results if r["image_id"] == 5] == [18, 90, 1]
    with pytest.raises(ValueError, match="label 3; category_ids maps labels 1..2"):
        metrics.coco_results(preds, [1, 2, 3, 4], category_ids=[1, 2])


# Segmentation, counted by hand. Classes 0..4, ignore 255; rows are ground truth, pred below each.
SEG_TARGET = [[0, 0, 1, 1],
              [0, 0, 1, 255],
              [3, 3, 3, 3]]
SEG_PRED = [[0, 1, 1, 1],
            [0, 0, 4, 2],    # the 2 sits on the ignored pixel: not counted
            [3, 3, 0, 4]]
# Labelled pixels: 11. Confusion (truth -> pred): 0->0 x3, 0->1 x1, 1->1 x2, 1->4 x1, 3->3 x2, 3->0 x1, 3->4 x1.
# class 0: TP 3, FN 1, FP 1 (a 3)      -> IoU 3/5, Acc 3/4
# class 1: TP 2, FN 1, FP 1 (a 0)      -> IoU 2/4, Acc 2/3
# class 2: absent, never predicted      -> IoU 0/0 = NaN, Acc NaN
# class 3: TP 2, FN 2, FP 0            -> IoU 2/4, Acc 2/4
# class 4: absent, predicted twice      -> IoU 0/2 = 0, Acc 0/0 = NaN
# mIoU = (3/5 + 2/4 + 2/4 + 0) / 4 = 0.4; mAcc = (3/4 + 2/3 + 2/4) / 3 = 23/36; aAcc = 7/11.
SEG_IOU = [3 / 5, 2 / 4, math.nan, 2 / 4, 0.0]
SEG_ACC = [3 / 4, 2 / 3, math.nan, 2 / 4, math.nan]


def test_segmentation_metric_equals_hand_count():
    target, pred = torch.tensor([SEG_TARGET]), torch.tensor([SEG_PRED])
    metric = metrics.SegmentationMetric(5)
    metric.update(pred, target)
    result = metric.compute()
    assert result["mIoU"] == pytest.approx(0.4) and result["mAcc"] == pytest.approx(23 / 36)
    assert result["aAcc"] == pytest.approx(7 / 11) and result["pixels"] == 11
    assert np.allclose(result["IoU"], SEG_IOU, equal_nan=True) and np.allclose(result["Acc"], SEG_ACC, equal_nan=True)

    logits = torch.nn.functional.one_hot(pred, 5).permute(0, 3, 1, 2).float() * 3 + torch.rand(1, 5, 3, 4)
    from_logits = metrics.SegmentationMetric(5)
    from_logits.update(logits, target)
    assert json.dumps(from_logits.compute()) == json.dumps(result)


def test_segmentation_accumulates_and_checks_inputs():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (4, 9, 11), generator=g)
    target[target == 5] = 255
    pred = torch.randint(0, 5, (4, 9, 11), generator=g)
    whole, parts = metrics.SegmentationMetric(5), metrics.SegmentationMetric(5)
    whole.update(pred, target)
    parts.update(pred[:1], target[:1])
    parts.update(pred[1:], target[1:])
    assert json.dumps(parts.compute()) == json.dumps(whole.compute())
    parts.reset()
    assert parts.compute()["pixels"] == 0
    with pytest.raises(ValueError, match="target holds label 7"):
        whole.update(pred[:1], torch.full_like(target[:1], 7))
    with pytest.raises(ValueError, match="pred holds class 5"):
        whole.update(torch.full_like(pred[:1], 5), target[:1])
    with pytest.raises(ValueError, match="logits must be"):
        whole.update(torch.rand(1, 4, 9, 11), target[:1])
    with pytest.raises(ValueError, match="ignore_index 2 is a class index"):
        metrics.SegmentationMetric(5, ignore_index=2)


def _distributed(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    preds, targets = _case()
    results = {}
    # uneven: 3 images and 1; all and none; image 42 given again by rank 1, as a padding sampler does
    for name, mine in (("uneven", [0, 1, 2] if rank == 0 else [3]), ("empty", [0, 1, 2, 3] if rank == 0 else []),
                       ("repeat", [0, 1, 2, 3] if rank == 0 else [0])):
        metric = metrics.DetectionMetric()
        if mine:
            metric.update([preds[k] for k in mine], [targets[k] for k in mine])
        results[name] = metric.compute()
    seg = metrics.SegmentationMetric(5)
    if rank == 1:
        seg.update(torch.tensor([SEG_PRED]), torch.tensor([SEG_TARGET]))
    results["segm"] = seg.compute()
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def test_distributed_gathers_any_number_of_images(tmp_path, case):
    """torchmetrics' own gather issues one collective per image (and deadlocks when processes hold
    different counts); every process here gets the single-process numbers."""
    out = str(tmp_path / "result")
    mp.spawn(_distributed, args=(f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    single = metrics.DetectionMetric()
    single.update(*case)
    want = json.dumps(single.compute())
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        for name in ("uneven", "empty", "repeat"):
            assert json.dumps(got[name]) == want, (rank, name)
        assert got["segm"]["pixels"] == 11 and got["segm"]["mIoU"] == pytest.approx(0.4)


# Pictures and JSON

def test_palette_is_distinct_and_deterministic():
    colours = visualize.palette(200)
    assert colours.dtype == torch.uint8 and colours.shape == (200, 3)
    assert len({tuple(c) for c in colours.tolist()}) == 200
    assert torch.equal(visualize.palette(10), colours[:10])  # a class keeps its colour whatever n
    assert not torch.equal(visualize.palette(10, seed=1), colours[:10])
    assert (colours.int().max(1).values - colours.int().min(1).values).min() > 40  # saturated: none grey


def _blend(image: torch.Tensor, colour, alpha: float) -> torch.Tensor:
    return (image.double() * (1 - alpha) + torch.tensor(colour, dtype=torch.float64)[:, None, None] * alpha).floor()


def test_draw_detections_blends_masks_in_class_colours():
    image = torch.full((3, 96, 96), 100, dtype=torch.uint8)
    masks = torch.zeros(3, 1, 96, 96)
    masks[0, 0, 30:70, 20:60] = 0.9
    masks[1, 0, 50:90, 40:80] = 0.7  # overlaps the first; lower score
    masks[2, 0, 5:10, 5:10] = 0.9  # below the score threshold: not drawn
    pred = {"boxes": torch.tensor([[10.0, 10, 70, 80], [35, 45, 90, 95], [2, 2, 12, 12]]),
            "scores": torch.tensor([0.9, 0.8, 0.3]), "labels": torch.tensor([2, 1, 1]), "masks": masks}
    out = visualize.draw_detections(image, pred, ["cat", "dog"], mask_alpha=0.4)
    colours = visualize.palette(3)
    assert out.shape == image.shape and out.dtype == torch.uint8
    inside = out[:, 30:44, 20:60]  # mask 0 only, away from box lines and captions
    assert (inside.double() - _blend(image[:, :1, :1], colours[2].tolist(), 0.4)).abs().max() <= 1
    overlap = out[:, 62:70, 40:60]  # both masks: the higher score (mask 0) is shown
    assert (overlap.double() - _blend(image[:, :1, :1], colours[2].tolist(), 0.4)).abs().max() <= 1
    only_second = out[:, 82:88, 72:79]
    assert (only_second.double() - _blend(image[:, :1, :1], colours[1].tolist(), 0.4)).abs().max() <= 1
    assert torch.equal(out[:, 5:10, 5:10], image[:, 5:10, 5:10])  # under threshold
    assert (out[:, 10, 30] == colours[2]).all()  # the box's top edge, in its class colour
    # the caption: a patch of the class colour in the box's top-left corner, with dark text on it
    caption = out[:, 12:26, 12:60]
    assert (caption == colours[2][:, None, None]).all(0).sum() > 100
    assert (caption.int().sum(0) < 120).sum() > 20
    plain = visualize.draw_detections(image, {k: v for k, v in pred.items() if k != "masks"}, ["cat", "dog"])
    assert torch.equal(plain[:, 30:44, 20:60], image[:, 30:44, 20:60])
    with pytest.raises(ValueError, match="label 2 has no name"):
        visualize.draw_detections(image, pred, ["cat"])


def test_draw_segmentation_changes_exactly_the_labelled_pixels():
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 80, 56), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (80, 56), generator=g)
    labels[torch.rand(80, 56, generator=g) < 0.3] = 255
    names = ["sky", "road", "tree", "car", "person"]
    out = visualize.draw_segmentation(image, labels, names, alpha=0.6, legend=False)
    assert out.shape == (3, 80, 112) and torch.equal(out[:, :, :56], image)
    right, colours = out[:, :, 56:], visualize.palette(5)
    ignored = labels == 255
    assert torch.equal(right[:, ignored], image[:, ignored])
    want = (image.double() * 0.4 + colours[labels.clamp(max=4)].permute(2, 0, 1).double() * 0.6).floor()
    assert (right.double() - want)[:, ~ignored].abs().max() <= 1
    assert (right != image).any(0)[~ignored].float().mean() > 0.95  # labelled pixels change (a few may round back)

    with_legend = visualize.draw_segmentation(image, labels, names, legend=True)
    assert torch.equal(with_legend[:, :80], out)  # the picture is untouched: the legend is a strip below
    strip = with_legend[:, 80:]
    assert strip.shape[1] > 0 and strip.shape[2] == 112
    for c in range(5):  # the names of the classes present, in exactly their colours
        drawn = (strip == colours[c][:, None, None]).all(0).any()
        assert bool(drawn) == (c < 4), c


def test_png_and_json_round_trip(tmp_path):
    from PIL import Image

    read = lambda path: torch.from_numpy(np.array(Image.open(path)))
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8, generator=g)
    visualize.save_png(image, tmp_path / "sub" / "image.png")
    assert torch.equal(read(tmp_path / "sub" / "image.png").permute(2, 0, 1), image)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["image.png"]  # no temporary left
    labels = torch.randint(0, 3, (17, 23), generator=g)
    labels[0, :5] = 255
    visualize.save_label_png(labels, tmp_path / "labels.png")
    assert Image.open(tmp_path / "labels.png").mode == "L"
    assert torch.equal(read(tmp_path / "labels.png").long(), labels)
    with pytest.raises(ValueError, match="label 300 does not fit"):
        visualize.save_label_png(torch.full((2, 2), 300), tmp_path / "bad.png")

    summary = json.loads(json.dumps(visualize.segmentation_to_json(labels, ["a", "b", "c"])))
    assert summary["height"] == 17 and summary["width"] == 23 and summary["ignored"] == 5
    rebuilt = torch.full((17, 23), 255)
    for entry in summary["classes"]:
        mask = torch.from_numpy(coco_mask.decode(entry["mask"])).bool()
        assert entry["pixels"] == int((labels == entry["label"]).sum()) == int(mask.sum())
        assert entry["fraction"] == pytest.approx(entry["pixels"] / (17 * 23))
        rebuilt[mask] = entry["label"]
    assert torch.equal(rebuilt, labels)

    masks = torch.zeros(2, 1, 17, 23)
    masks[0, 0, 2:9, 3:15], masks[1, 0, 10:16, 1:4] = 0.8, 0.6
    pred = {"boxes": torch.tensor([[3.004, 2.0, 15.0, 9.0], [1.0, 10.0, 4.0, 16.0]]),
            "scores": torch.tensor([0.912345, 0.2]), "labels": torch.tensor([1, 2]), "masks": masks}
    found = json.loads(json.dumps(visualize.detections_to_json(pred, ["a", "b"], score_threshold=0.5)))
    assert len(found) == 1
    assert found[0]["class"] == "a" and found[0]["label"] == 1 and found[0]["score"] == 0.9123
    assert found[0]["box"] == [3.0, 2.0, 15.0, 9.0]
    assert np.array_equal(coco_mask.decode(found[0]["mask"]), (masks[0, 0] > 0.5).numpy())
