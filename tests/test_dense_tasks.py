"""Detection and segmentation runs end to end on small demo sets in the COCO and ADE20K layouts:
golden losses, resume equal to an uninterrupted run, eval of the written files equal to the
run's own validation, predict's pictures, and errors for checkpoints of another task."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from swinv2.cli import main
from swinv2.data.dense_demo import build_detection_demo, build_segmentation_demo
from swinv2.tasks import dense_train
from swinv2.train.config import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under numpy 2

GOLDEN = Path(__file__).parent / "assets" / "golden_losses_dense.json"
# Small and deterministic: fp32, one thread, no worker processes; stochastic depth and flips on,
# so their seeding is pinned too.
COMMON = dict(model="swinv2_debug", img_size=64, epochs=1, warmup_epochs=0.3, scale_lr=False, drop_path=0.1,
              hflip=0.5, amp="none", workers=0, progress=False, tensorboard=False, log_every=1, threads=1)
FAST = {
    "detection": dict(COMMON, task="detection", batch_size=2, lr=2e-4, fpn_channels=32, box_samples=32),
    "segmentation": dict(COMMON, task="segmentation", batch_size=2, lr=6e-4, scheduler="poly", min_lr=0.0,
                         decoder_channels=32),
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("dense")
    return {
        "detection": build_detection_demo(base / "coco", image_size=64, train_images=8, val_images=3, seed=1),
        "segmentation": build_segmentation_demo(base / "ade", image_size=64, train_images=8, val_images=3, seed=1),
    }


def _cfg(task, roots, out, **kw) -> TrainConfig:
    return TrainConfig(**{**FAST[task], "data": str(roots[task]), "output": str(out), **kw})


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _losses(run) -> list[float]:
    return [r["loss"] for r in _records(run) if r["split"] == "train"]


@pytest.fixture(scope="module")
def runs(roots, tmp_path_factory):
    """One finished run of each task (4 updates), shared by the tests that read its files."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for task in FAST:
        cfg = _cfg(task, roots, base / task)
        assert dense_train.main(cfg) == 0
        out[task] = Path(cfg.output)
    return out


@pytest.mark.parametrize("task", sorted(FAST))
def test_golden_losses(task, runs):
    """Per-update losses of a short run are pinned: data order, joint augmentation, the heads'
    initialisation and numerics, schedule and optimizer all show up here."""
    losses = _losses(runs[task])
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("SWINV2_WRITE_GOLDEN"):
        golden[task] = {"config": FAST[task], "losses": losses}
        GOLDEN.write_text(json.dumps(golden, indent=1))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(golden[task]["losses"]), rtol=2e-4, atol=0)


@pytest.mark.parametrize("task", sorted(FAST))
def test_resume_equals_an_uninterrupted_run(task, roots, runs, tmp_path):
    staged = _cfg(task, roots, tmp_path / "staged", max_steps=2)
    assert dense_train.main(staged) == 0
    again = TrainConfig(output=staged.output, resume=True, max_steps=4, progress=False, workers=0, tensorboard=False,
                        threads=1)
    assert dense_train.main(again) == 0
    assert _losses(staged.output) == _losses(runs[task])  # bit for bit
    a = torch.load(runs[task] / "checkpoint-last.pt", weights_only=True)["model"]
    b = torch.load(Path(staged.output) / "checkpoint-last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task, keys", [("detection", ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")),
                                        ("segmentation", ("mIoU", "mAcc", "aAcc"))])
@pytest.mark.parametrize("file", ["model-last.safetensors", "checkpoint-last.pt"])
def test_eval_of_the_written_files_equals_the_runs_validation(task, keys, file, roots, runs, capsys):
    assert main(["eval", "--checkpoint", str(runs[task] / file), "--data", str(roots[task]), "--json",
                 "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = [r for r in _records(runs[task]) if r["split"] == "val"][-1]
    assert result["task"] == task and result["images"] == 3
    for key in keys:
        assert 0.0 <= result[key] <= 1.0 or result[key] != result[key], key  # a fraction, or NaN
        torch.testing.assert_close(torch.tensor(result[key]), torch.tensor(last[key]), equal_nan=True)


@pytest.mark.parametrize("task", sorted(FAST))
def test_predict_writes_pictures_and_json(task, roots, runs, tmp_path, capsys):
    folder = roots[task] / ("val2017" if task == "detection" else "images/validation")
    out = tmp_path / "pictures"
    assert main(["predict", "--checkpoint", str(runs[task] / "model-last.safetensors"), str(folder),
                 "--output", str(out), "--score-threshold", "0.01", "--device", "cpu"]) == 0
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["task"] == task and len(saved["images"]) == 3
    from PIL import Image

    for record in saved["images"]:
        with Image.open(out / record["picture"]) as picture:
            source = Image.open(record["image"])
            if task == "detection":
                assert picture.size == source.size
            else:  # the image beside its classes, a legend strip below
                assert picture.width == 2 * source.width and picture.height > source.height
        if task == "segmentation":
            with Image.open(out / record["labels"]) as labels:
                assert labels.size == source.size


def test_a_checkpoint_of_another_task_is_refused(runs, roots, capsys):
    det = runs["detection"] / "checkpoint-last.pt"
    assert main(["eval", "--checkpoint", str(det), "--task", "segmentation", "--data",
                 str(roots["segmentation"])]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(det) in line and "detection model, not a segmentation one" in line


def test_classes_of_other_data_are_refused(runs, roots, capsys):
    assert main(["eval", "--checkpoint", str(runs["segmentation"] / "model-last.safetensors"), "--data",
                 str(roots["detection"])]) == 2
    assert "swinv2: error:" in capsys.readouterr().err


def test_test_time_window_is_used(runs, roots, capsys):
    """--window enlarges the window at test time: the windows of the first stage (16x16 tokens
    at 64 px) change from the debug variant's 4 to 16, and so does the segmentation."""
    args = ["eval", "--checkpoint", str(runs["segmentation"] / "model-last.safetensors"), "--data",
            str(roots["segmentation"]), "--json", "--workers", "0"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--window", "16"]) == 0
    wide = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plain["window"], wide["window"]) == (4, 16)
    assert plain["IoU"] != wide["IoU"]


def test_a_folder_of_another_layout_is_refused_before_any_work(roots, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "detection", "--data", str(roots["segmentation"]), "--output", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "instances_train2017.json" in line and str(roots["segmentation"]) in line
    assert not out.exists()


def test_configs_written_before_dense_tasks_still_read():
    """Run folders and checkpoints of earlier versions name the subcommand ``task``."""
    cfg = TrainConfig.from_dict({"task": "finetune", "checkpoint": "w.pth"})
    assert (cfg.command, cfg.task) == ("finetune", "classification")
    with pytest.raises(ValueError, match="--task must be one of"):
        TrainConfig(task="train")


@pytest.mark.parametrize("task", sorted(FAST))
def test_two_processes_validate_every_image_once(task, roots, tmp_path, capsys):
    """Under torchrun each process evaluates its share of the validation images; the gathered
    metrics equal a one-process evaluation of the same weights."""
    import subprocess
    import sys

    flags = []
    for k, v in {**FAST[task], "data": str(roots[task]), "max_steps": 2}.items():
        flag = "--" + k.replace("_", "-")
        flags += ([flag] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [flag, str(v)])
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    port = "29743" if task == "detection" else "29744"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           port, "-m", "swinv2", "train", *flags, "--output", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    val = [r for r in _records(out) if r["split"] == "val"][-1]
    assert main(["eval", "--checkpoint", str(out / "checkpoint-last.pt"), "--data", str(roots[task]), "--json",
                 "--workers", "0"]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert val["images"] == alone["images"] == 3
    key = "bbox_AR100" if task == "detection" else "aAcc"
    torch.testing.assert_close(torch.tensor(val[key]), torch.tensor(alone[key]), equal_nan=True)


@pytest.mark.parametrize("name, values", [
    ("mask_rcnn_swinv2_tiny_coco_1x", dict(task="detection", lr=1e-4, weight_decay=0.05, epochs=12,
                                           milestones=[8, 11], scheduler="multistep")),
    ("mask_rcnn_swinv2_tiny_coco_3x", dict(task="detection", lr=1e-4, weight_decay=0.05, epochs=36,
                                           milestones=[27, 33], scheduler="multistep")),
    ("upernet_swinv2_tiny_ade20k_160k", dict(task="segmentation", lr=4e-5, weight_decay=0.05, layer_decay=0.95,
                                             max_steps=160000, drop_path=0.3, crop_size=512, scheduler="poly")),
])
def test_paper_recipes_state_the_appendix_settings(name, values):
    """Appendix A1.2 / the ADE20K ablation: AdamW at a global batch of 16 (8 GPUs x 2), window 16,
    the lr not rescaled (it is the paper's for that batch); each recipe says what to expect."""
    import yaml

    from swinv2.tasks.common import recipe_path
    from swinv2.train.config import read_recipe

    path = recipe_path(name)
    cfg = TrainConfig.from_file(path)
    for key, value in values.items():
        assert getattr(cfg, key) == pytest.approx(value) if isinstance(value, float) else \
            list(getattr(cfg, key)) == value if isinstance(value, list) else getattr(cfg, key) == value, key
    assert (cfg.window, cfg.batch_size, cfg.scale_lr) == (16, 2, False)
    about = yaml.safe_load(Path(path).read_text())["about"]
    assert about["global_batch"] == 16 and "--checkpoint swinv2_tiny_window16_256.ms_in1k" in about["command"]
    assert all(str(about[k]).strip() for k in ("paper", "expected", "hardware", "time", "weights"))
    assert "checkpoint" not in read_recipe(path)  # the starting weights are given on the command line


def test_a_whole_dense_model_is_not_taken_for_backbone_weights(runs, roots, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "segmentation", "--data", str(roots["segmentation"]), "--checkpoint",
                 str(runs["detection"] / "model-last.safetensors"), "--output", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is a whole detection model" in line and "--resume" in line
    assert not out.exists()


def test_an_empty_coco_split_is_refused_naming_the_file(tmp_path, capsys):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir()
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    assert main(["train", "--task", "detection", "--data", str(root), "--output", str(tmp_path / "run")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "instances_train2017.json lists no images" in line and not (tmp_path / "run").exists()
