"""Dense-prediction data: COCO and ADE20K readers (masks, crowd, degenerate boxes, bad files,
clear errors), joint transforms, collates, the resumable loader and the bundled demo sets."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.transforms.v2 import functional as F

from swinv2.data import dense_demo
from swinv2.data.ade20k import ADE20KSegmentation
from swinv2.data.coco import CocoDetection
from swinv2.data.datasets import MissingFolderError
from swinv2.data.dense_demo import build_detection_demo, build_segmentation_demo
from swinv2.data.dense_transforms import (
    JointTransformedDataset,
    _scale_saturation,
    build_dense_loader,
    collate_detection,
    collate_segmentation,
    collate_segmentation_lists,
    detection_train_transform,
    keep_ratio_size,
    segmentation_eval_transform,
    segmentation_train_transform,
)
from swinv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# pycocotools' decoder passes copy=False to numpy's __array__, which numpy 2 reports on every call
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DEMO = {"image_size": 64, "train_images": 10, "val_images": 8, "seed": 3}


@pytest.fixture(scope="module")
def coco_demo(tmp_path_factory):
    return build_detection_demo(tmp_path_factory.mktemp("coco") / "set", **DEMO)


@pytest.fixture(scope="module")
def ade_demo(tmp_path_factory):
    return build_segmentation_demo(tmp_path_factory.mktemp("ade") / "set", **DEMO)


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """XYXY pixel-extent boxes (x2, y2 one past the last set column/row) of (N, H, W) masks."""
    boxes = []
    for m in masks.bool():
        rows, cols = torch.nonzero(m.any(1)).flatten(), torch.nonzero(m.any(0)).flatten()
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


# -- the demo sets -------------------------------------------------------------------------


def test_coco_demo_masks_are_the_painted_pixels_and_boxes_their_tight_boxes(coco_demo):
    kinds = set()
    for split in ("train", "val"):
        ds = CocoDetection(coco_demo, split, keep_crowd=True)
        reference = COCO(os.fspath(coco_demo / "annotations" / f"instances_{split}2017.json"))
        assert ds.classes == [str(d) for d in range(10)] and ds.category_ids == list(range(1, 11))
        for i in range(len(ds)):
            image, target = ds[i]
            anns = reference.loadAnns(reference.getAnnIds(imgIds=target["image_id"]))
            kinds |= {"polygon" if isinstance(a["segmentation"], list) else type(a["segmentation"]["counts"]).__name__
                      for a in anns}
            masks = target["masks"]
            assert len(masks) == len(anns)
            for m, a in zip(masks.bool(), anns):
                assert torch.equal(m, torch.from_numpy(reference.annToMask(a)).bool())  # pycocotools' decoding
                colours = image[:, m].T.unique(dim=0)
                ring = torch.nn.functional.max_pool2d(m[None, None].float(), 3, 1, 1)[0, 0].bool() & ~m
                # one painted colour fills the mask, and the pixels round it are not painted
                assert len(colours) == 1 and not (image[:, ring].T == colours[0]).all(1).any()
            if len(masks):
                assert torch.equal(target["boxes"], tight_boxes(masks))
                assert torch.equal(target["area"], masks.flatten(1).sum(1).float())
    assert kinds == {"polygon", "str", "list"}  # polygons, compressed and uncompressed (crowd) RLE


def test_coco_demo_crowd_only_in_val_and_empty_images_kept(coco_demo):
    val_json = json.loads((coco_demo / "annotations" / "instances_val2017.json").read_text())
    crowd = [a for a in val_json["annotations"] if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    train = CocoDetection(coco_demo, "train")
    val_train_mode, val_eval_mode = CocoDetection(coco_demo, "val"), CocoDetection(coco_demo, "val", keep_crowd=True)
    n_crowd = sum(int(val_eval_mode[i][1]["iscrowd"].sum()) for i in range(len(val_eval_mode)))
    assert n_crowd == len(crowd)
    assert sum(int(val_train_mode[i][1]["iscrowd"].sum()) for i in range(len(val_train_mode))) == 0
    counts = [len(val_train_mode[i][1]["labels"]) + int(val_eval_mode[i][1]["iscrowd"].sum()) for i in range(8)]
    assert counts == [len(val_eval_mode[i][1]["labels"]) for i in range(8)]
    assert len(train) == DEMO["train_images"] and any(len(train[i][1]["labels"]) == 0 for i in range(len(train)))


def test_ade_demo_labels_ring_and_classes(ade_demo):
    ds = ADE20KSegmentation(ade_demo, "training")
    assert ds.classes == [*dense_demo._TEXTURES, "digit"] and len(ds) == DEMO["train_images"]
    raw = ADE20KSegmentation(ade_demo, "training", reduce_zero_label=False)
    assert raw.classes == ["other", *ds.classes]
    seen = set()
    for i in range(len(ds)):
        image, mask = ds[i]
        _, unreduced = raw[i]
        assert torch.equal(mask, torch.where(unreduced == 0, 255, unreduced - 1))
        seen |= set(mask.unique().tolist())
        digits = mask == 8
        regions = mask[(mask != 255) & ~digits].unique()
        assert 1 <= len(regions) <= 2  # two textures split by a line (one may be hidden under digits)
        grown = torch.nn.functional.max_pool2d(digits[None, None].float(), 3, 1, 1)[0, 0].bool()
        assert torch.equal(mask == 255, grown & ~digits)  # the ignored ring is exactly one pixel round the digits
    assert 8 in seen and 255 in seen and seen - {255} <= set(range(9)) and len(seen) >= 6


def test_demo_is_deterministic_and_cached(tmp_path, monkeypatch):
    small = {"image_size": 48, "train_images": 3, "val_images": 2, "seed": 7}

    def digest(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    for build in (build_detection_demo, build_segmentation_demo):
        a, b = build(tmp_path / f"{build.__name__}-a", **small), build(tmp_path / f"{build.__name__}-b", **small)
        assert digest(a) == digest(b) and len(digest(a)) > 5
        assert digest(build(tmp_path / "other-seed", **{**small, "seed": 8})) != digest(a)
        (tmp_path / "other-seed").rename(tmp_path / f"other-seed-{build.__name__}")
    monkeypatch.setenv("SWINV2_CACHE_DIR", os.fspath(tmp_path / "cache"))
    first = build_detection_demo(**small)
    assert first.parent == tmp_path / "cache" / "demo" and first.name.startswith("coco-digits-")
    stamp = (first / "demo.json").stat().st_mtime_ns
    assert build_detection_demo(**small) == first and (first / "demo.json").stat().st_mtime_ns == stamp  # reused
    assert build_detection_demo(**{**small, "seed": 1}) != first
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="busy is not empty"):
        build_detection_demo(tmp_path / "busy", **small)


# -- hand-written COCO folders ---------------------------------------------------------------

H, W = 5, 6


def _coco_folder(tmp_path, edit=None, *, split="train"):
    """A 3-image COCO folder: masks and counts written out by hand."""
    (tmp_path / f"{split}2017").mkdir(parents=True, exist_ok=True)
    (tmp_path / "annotations").mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((H, W, 3), 40, np.uint8)).save(tmp_path / f"{split}2017" / name)
    (tmp_path / f"{split}2017" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt
    compressed_mask = np.zeros((H, W), np.uint8)
    compressed_mask[2:5, 4:6] = 1
    compressed = mask_utils.encode(np.asfortranarray(compressed_mask))
    data = {
        "images": [{"id": 10, "file_name": "a.png", "height": H, "width": W},
                   {"id": 11, "file_name": "b.png", "height": H, "width": W},
                   {"id": 12, "file_name": "c.png", "height": H, "width": W}],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
        "annotations": [
            # polygon on pixel edges: columns 1..3, rows 1..2
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 1, 3, 2], "area": 6, "iscrowd": 0,
             "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]},
            # uncompressed RLE, column-major: 5 zeros, then column 0 rows... -> pixels 5,6,7 = column 1 rows 0..2
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [1, 0, 1, 3], "area": 3, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": [5, 3, 22]}},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [4, 2, 2, 3], "area": 6, "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": compressed["counts"].decode()}},
            # 0.5 pixel wide: degenerate
            {"id": 4, "image_id": 10, "category_id": 7, "bbox": [0, 0, 0.5, 4], "area": 2, "iscrowd": 0,
             "segmentation": [[0, 0, 0.5, 0, 0.5, 4, 0, 4]]},
            # runs past the image: clipped to columns 5..6
            {"id": 5, "image_id": 12, "category_id": 7, "bbox": [5, 0, 9, 2], "area": 2, "iscrowd": 0,
             "segmentation": [[5, 0, 6, 0, 6, 2, 5, 2]]},
        ],
    }
    if edit is not None:
        edit(data)
    path = tmp_path / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_hand_counted_masks_labels_crowd_and_degenerate(tmp_path):
    _coco_folder(tmp_path)
    ds = CocoDetection(tmp_path, "train")
    assert len(ds) == 3 and ds.classes == ["three", "seven"] and ds.category_ids == [3, 7]
    assert ds.class_names == ["__background__", "three", "seven"]
    assert ds.degenerate == 1 and ds.dropped_boxes == 0
    image, target = ds[0]
    assert ds.dropped_boxes == 1 and image.shape == (3, H, W) and image.dtype == torch.uint8
    assert target["labels"].tolist() == [2, 1] and target["iscrowd"].tolist() == [0, 0]  # crowd dropped
    assert target["boxes"].tolist() == [[1, 1, 4, 3], [4, 2, 6, 5]] and target["boxes"].canvas_size == (H, W)
    expected = np.zeros((2, H, W), np.uint8)
    expected[0, 1:3, 1:4] = 1
    expected[1, 2:5, 4:6] = 1
    assert np.array_equal(target["masks"].numpy(), expected) and target["area"].tolist() == [6, 6]
    empty = ds[1][1]  # no objects: kept, with empty targets of the right shapes
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, H, W) and empty["image_id"] == 11
    with pytest.warns(UserWarning, match="c.png"):
        assert ds[2] is None
    assert ds.skipped == 1

    val = CocoDetection(tmp_path, "train", keep_crowd=True, masks=False)
    _, target = val[0]
    assert target["iscrowd"].tolist() == [0, 1, 0] and "masks" not in target
    assert target["boxes"][1].tolist() == [1, 0, 2, 3]
    crowd = CocoDetection(tmp_path, "train", keep_crowd=True)[0][1]["masks"][1]
    expected_crowd = np.zeros((H, W), np.uint8)
    expected_crowd[0:3, 1] = 1  # column-major pixels 5, 6, 7
    assert np.array_equal(crowd.numpy(), expected_crowd)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("categories"), "not a COCO instances file: no 'categories'"),
    (lambda d: d["annotations"][0].update(category_id=99), "annotation 1 has category_id 99"),
    (lambda d: d["annotations"][0].update(image_id=55), "annotation 1 refers to image id 55"),
    (lambda d: d["annotations"][2]["segmentation"].update(size=[W, H]), "masks of the wrong size"),
    (lambda d: d["images"][0].pop("width"), "image 10 has no width"),
])
def test_coco_json_errors_name_the_file(tmp_path, edit, message):
    path = _coco_folder(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as err:
        CocoDetection(tmp_path, "train")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_coco_folder_errors(tmp_path):
    with pytest.raises(MissingFolderError, match=r"instances_val2017.json.*expected root/annotations"):
        CocoDetection(tmp_path, "val")
    _coco_folder(tmp_path, split="val")
    (tmp_path / "val2017").rename(tmp_path / "elsewhere")
    with pytest.raises(MissingFolderError, match="val2017"):
        CocoDetection(tmp_path, "val")
    (tmp_path / "elsewhere").rename(tmp_path / "val2017")
    path = _coco_folder(tmp_path, lambda d: d["images"][0].update(height=9), split="val")
    ds = CocoDetection(tmp_path, "val", masks=False)
    with pytest.raises(ValueError, match=f"a.png is 6x5 pixels but {path} says 6x9"):
        ds[0]


# -- hand-written ADE20K folders -------------------------------------------------------------


def _ade_folder(root, labels: dict, split="training", size=(4, 3)):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for stem, label in labels.items():
        Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(root / "images" / split / f"{stem}.jpg")
        Image.fromarray(np.asarray(label, np.uint8)).save(root / "annotations" / split / f"{stem}.png")


def test_ade_reduce_zero_label_and_class_sources(tmp_path):
    label = [[0, 1, 2], [3, 255, 1], [2, 2, 0], [1, 1, 1]]
    _ade_folder(tmp_path, {"x": label})
    scanned = ADE20KSegmentation(tmp_path)  # no class file: the largest training label (3) gives 3 classes
    assert scanned.classes == ["class 0", "class 1", "class 2"]
    image, mask = scanned[0]
    assert image.shape == (3, 4, 3) and mask.dtype == torch.int64
    assert mask.tolist() == [[255, 0, 1], [2, 255, 0], [1, 1, 255], [0, 0, 0]]
    assert ADE20KSegmentation(tmp_path, reduce_zero_label=False)[0][1].tolist() == label
    assert len(ADE20KSegmentation(tmp_path, reduce_zero_label=False).classes) == 4

    (tmp_path / "classes.txt").write_text("sky\ntree\nroad\n")
    assert ADE20KSegmentation(tmp_path).classes == ["sky", "tree", "road"]
    assert ADE20KSegmentation(tmp_path, reduce_zero_label=False).classes == ["other", "sky", "tree", "road"]
    (tmp_path / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n2\t0.1\t5\t1\tbuilding, edifice\n1\t0.2\t9\t2\twall\n3\t0.1\t1\t1\tsky\n")
    assert ADE20KSegmentation(tmp_path).classes == ["wall", "building", "sky"]
    (tmp_path / "objectInfo150.csv").write_text(
        "Idx,Ratio,Train,Val,Name\n1,0.2,9,2,floor;flooring\n2,0.1,5,1,tree\n3,0.1,1,1,ceiling\n")
    assert ADE20KSegmentation(tmp_path).classes == ["floor", "tree", "ceiling"]
    assert ADE20KSegmentation(tmp_path, reduce_zero_label=False).classes == ["other", "floor", "tree", "ceiling"]
    with pytest.raises(ValueError, match="num_classes=5 but .*objectInfo150.csv names 3"):
        ADE20KSegmentation(tmp_path, num_classes=5)


def test_ade_errors_and_unreadable_files(tmp_path):
    with pytest.raises(MissingFolderError, match="images/training .*expected"):
        ADE20KSegmentation(tmp_path)
    _ade_folder(tmp_path, {"a": np.ones((4, 3)), "b": np.full((4, 3), 9)})
    ds = ADE20KSegmentation(tmp_path, num_classes=3)
    with pytest.raises(ValueError, match=r"b.png holds label 9, beyond the 3 classes"):
        ds[1]
    Image.fromarray(np.ones((5, 3), np.uint8)).save(tmp_path / "annotations" / "training" / "a.png")
    with pytest.raises(ValueError, match=r"a.png is 3x5 but its image a.jpg is 3x4"):
        ds[0]
    Image.fromarray(np.ones((4, 3, 3), np.uint8)).save(tmp_path / "annotations" / "training" / "a.png")
    with pytest.raises(ValueError, match="a.png has pixel mode RGB"):
        ds[0]
    Image.fromarray(np.ones((4, 3), np.uint8)).save(tmp_path / "annotations" / "training" / "a.png")
    (tmp_path / "images" / "training" / "a.jpg").write_bytes(b"\xff\xd8\xff truncated")
    with pytest.warns(UserWarning, match="a.jpg"):
        assert ds[0] is None
    assert ds.skipped == 1
    Image.fromarray(np.zeros((4, 3, 3), np.uint8)).save(tmp_path / "images" / "training" / "c.png")
    with pytest.raises(ValueError, match=r"image .*c.png has no annotation: .*annotations/training/c.png"):
        ADE20KSegmentation(tmp_path)


# -- transforms ------------------------------------------------------------------------------


def test_detection_flip_moves_boxes_with_masks(coco_demo):
    ds = CocoDetection(coco_demo, "train")
    i = next(i for i in range(len(ds)) if len(ds[i][1]["labels"]) >= 2)
    image, target = ds[i]
    flipped, moved = detection_train_transform(hflip=1.0)(image, target)
    assert flipped.dtype == torch.float32 and torch.allclose(flipped, image.flip(-1).float() / 255)
    assert torch.equal(moved["masks"], target["masks"].flip(-1))
    assert torch.equal(moved["boxes"], tight_boxes(moved["masks"]))
    assert not torch.equal(moved["boxes"], target["boxes"])
    assert torch.equal(moved["labels"], target["labels"]) and moved["image_id"] == target["image_id"]
    kept, same = detection_train_transform(hflip=0.0)(image, target)
    assert torch.equal(same["boxes"], target["boxes"]) and torch.allclose(kept * 255, image.float())


def test_rescale_follows_mmseg_and_pads_with_ignore():
    assert keep_ratio_size(300, 400, (2048, 512)) == (512, 683)
    assert keep_ratio_size(400, 300, (2048, 512)) == (683, 512)  # the short side gets 512 in either orientation
    assert keep_ratio_size(300, 400, (512, 2048)) == (512, 683) and keep_ratio_size(10, 1000, (64, 32)) == (1, 64)
    image = torch.randint(0, 256, (3, 30, 10), dtype=torch.uint8)
    mask = torch.ones(30, 10, dtype=torch.int64)
    t = segmentation_train_transform(crop=(64, 64), scale=(64, 32), ratio_range=(1, 1), cat_max_ratio=1.0,
                                     hflip=0.0, photometric=False)
    out, out_mask = t(image, mask)
    assert out.shape == (3, 64, 64) and out_mask.shape == (64, 64) and out_mask.dtype == torch.int64
    assert (out_mask[:, :21] == 1).all() and (out_mask[:, 21:] == 255).all()  # 30x10 -> 64x21, then padded
    resized = F.resize(image, [64, 21], antialias=True).float() / 255
    expected = F.normalize(resized, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(out[:, :, :21], expected, atol=1e-6) and (out[:, :, 21:] == 0).all()
    eval_image, eval_mask = segmentation_eval_transform((64, 32))(image, mask)
    assert eval_image.shape == (3, 64, 21) and torch.equal(eval_mask, mask)


def test_crop_avoids_one_class_dominating():
    # Columns 0..63 class 1 (top half ignored), 64..127 class 2: most 64x64 crops fail the 0.75 ratio.
    mask = torch.ones(64, 128, dtype=torch.int64)
    mask[:, 64:] = 2
    mask[:32, :64] = 255
    image = torch.zeros(3, 64, 128, dtype=torch.uint8)

    def balanced(m):
        labels, counts = m.unique(return_counts=True)
        counts = counts[labels != 255]
        return len(counts) > 1 and counts.max() < 0.75 * counts.sum()

    def share(ratio):
        t = segmentation_train_transform(crop=(64, 64), scale=(128, 64), ratio_range=(1, 1), cat_max_ratio=ratio,
                                         photometric=False)
        ok = 0
        for s in range(40):
            torch.manual_seed(s)
            ok += balanced(t(image, mask)[1])
        return ok / 40

    assert share(0.75) >= 0.95 and share(1.0) < 0.6


def test_saturation_matches_hsv_reference():
    from skimage.color import hsv2rgb, rgb2hsv

    x = torch.rand(3, 9, 11, dtype=torch.float64)
    x[:, 0, 0] = 0.4  # grey: no saturation to scale
    for factor in (0.5, 1.3, 4.0):
        hsv = rgb2hsv(x.permute(1, 2, 0).numpy())
        hsv[..., 1] = np.minimum(hsv[..., 1] * factor, 1.0)
        expected = torch.from_numpy(hsv2rgb(hsv)).permute(2, 0, 1)
        assert torch.allclose(_scale_saturation(x, factor), expected, atol=1e-9)


def test_joint_dataset_is_a_function_of_seed_epoch_index(ade_demo):
    base = ADE20KSegmentation(ade_demo, "training")
    t = segmentation_train_transform(crop=(32, 32), scale=(96, 48), ratio_range=(0.5, 2.0))
    ds = JointTransformedDataset(base, t, seed=5)
    state = torch.get_rng_state()
    a, b = ds[(2, 3)], ds[(2, 3)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    other = ds[(3, 3)]
    assert not torch.equal(a[0], other[0])
    assert not torch.equal(a[0], JointTransformedDataset(base, t, seed=6)[(2, 3)][0])
    assert torch.equal(ds[4][0], ds[(0, 4)][0])


def test_collates_count_skipped_samples():
    img, mask = torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long)
    images, masks, skipped = collate_segmentation([None, (img, mask), (img + 1, mask + 1), None])
    assert images.shape == (2, 3, 4, 4) and masks.shape == (2, 4, 4) and skipped == 2
    assert images[1].max() == 1 and masks[1].max() == 1
    images, masks, skipped = collate_segmentation([None, None])
    assert images.numel() == 0 and masks.numel() == 0 and skipped == 2
    with pytest.raises(ValueError, match="collate_segmentation_lists"):
        collate_segmentation([(img, mask), (torch.zeros(3, 5, 4), mask)])
    listed = collate_segmentation_lists([(img, mask), None, (torch.zeros(3, 5, 4), mask)])
    assert [x.shape[1] for x in listed[0]] == [4, 5] and listed[2] == 1
    target = {"boxes": torch.zeros(0, 4)}
    assert collate_detection([None, (img, target), None]) == ([img], [target], 2)
    assert collate_detection([None]) == ([], [], 1)


def test_dense_loader_resumes_mid_epoch(ade_demo):
    base = ADE20KSegmentation(ade_demo, "training")
    ds = JointTransformedDataset(base, segmentation_train_transform(crop=(32, 32), scale=(64, 32)), seed=1)
    loader = build_dense_loader(ds, collate=collate_segmentation, batch_size=2, train=True, workers=0, seed=4)
    assert len(loader) == DEMO["train_images"] // 2
    loader.sampler.set_epoch(1)
    full = list(loader)
    loader.sampler.set_epoch(1, start_batch=2)
    resumed = list(loader)
    assert len(resumed) == len(full) - 2
    for (xa, ya, na), (xb, yb, nb) in zip(full[2:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and na == nb == 0
    loader.sampler.set_epoch(2)
    assert not torch.equal(next(iter(loader))[0], full[0][0])
    with pytest.raises(TypeError, match="JointTransformedDataset"):
        build_dense_loader(base, collate=collate_segmentation, batch_size=2, train=True, workers=0, seed=0)
