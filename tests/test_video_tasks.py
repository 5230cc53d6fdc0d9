"""Video runs end to end on a small set of real mp4 clips: golden losses, resume equal to an
uninterrupted run, eval of the written files equal to the run's own validation, fine-tuning
from an image checkpoint (inflated), Kinetics CSVs, predict, and the errors."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

import swinv2
from swinv2.cli import main
from swinv2.data.video_demo import prepare_video_demo
from swinv2.tasks import video
from swinv2.train.config import TrainConfig

GOLDEN = Path(__file__).parent / "assets" / "golden_losses_video.json"
# Small and deterministic: fp32, one thread, no worker processes; stochastic depth, crops and
# flips on, so their seeding is pinned too; two clips per video in validation.
FAST = dict(task="video", model="video_swinv2_debug", img_size=32, frames=4, frame_interval=2, short_side=36,
            epochs=1, warmup_epochs=0.3, scale_lr=False, lr=2e-4, drop_path=0.1, hflip=0.5, mixup=0.0, cutmix=0.0,
            batch_size=2, test_clips=2, amp="none", workers=0, progress=False, tensorboard=False, log_every=1,
            threads=1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return prepare_video_demo(tmp_path_factory.mktemp("clips"), train_clips=8, val_clips=4, frames=10, size=32,
                              seed=1)


def _cfg(root, out, **kw) -> TrainConfig:
    return TrainConfig(**{**FAST, "data": str(root), "output": str(out), **kw})


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _losses(run) -> list[float]:
    return [r["loss"] for r in _records(run) if r["split"] == "train"]


@pytest.fixture(scope="module")
def run(clips, tmp_path_factory):
    """One finished run (4 updates), shared by the tests that read its files."""
    cfg = _cfg(clips, tmp_path_factory.mktemp("runs") / "video")
    assert video.main(cfg) == 0
    return Path(cfg.output)


def test_golden_losses(run):
    """Per-update losses of a short run are pinned: clip sampling, decoding, the joint crop and
    flip, the 3D network's numerics, schedule and optimizer all show up here."""
    losses = _losses(run)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("SWINV2_WRITE_GOLDEN"):
        golden["video"] = {"config": FAST, "losses": losses}
        GOLDEN.write_text(json.dumps(golden, indent=1))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(golden["video"]["losses"]), rtol=2e-4, atol=0)


def test_resume_equals_an_uninterrupted_run(clips, run, tmp_path):
    staged = _cfg(clips, tmp_path / "staged", max_steps=2)
    assert video.main(staged) == 0
    again = TrainConfig(output=staged.output, resume=True, max_steps=4, progress=False, workers=0, tensorboard=False,
                        threads=1)
    assert video.main(again) == 0
    assert _losses(staged.output) == _losses(run)  # bit for bit
    a = torch.load(run / "checkpoint-last.pt", weights_only=True)["model"]
    b = torch.load(Path(staged.output) / "checkpoint-last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("file", ["model-last.safetensors", "checkpoint-last.pt"])
def test_eval_of_the_written_files_equals_the_runs_validation(file, clips, run, capsys):
    assert main(["eval", "--checkpoint", str(run / file), "--data", str(clips), "--json", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = [r for r in _records(run) if r["split"] == "val"][-1]
    assert (result["clips"], result["views"], result["frames"], result["interval"]) == (4, 2, 4, 2)
    for key in ("top1", "top5", "loss"):
        torch.testing.assert_close(torch.tensor(result[key]), torch.tensor(last[key]))
    # more views change the score's inputs: three crops per clip
    assert main(["eval", "--checkpoint", str(run / file), "--data", str(clips), "--json", "--workers", "0",
                 "--crops", "3"]) == 0
    three = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert three["views"] == 6 and three["loss"] != result["loss"]


def test_finetune_inflates_an_image_checkpoint(clips, tmp_path, capsys):
    image = swinv2.create_model("swinv2_debug", img_size=32, num_classes=10)
    swinv2.save_pretrained(image, tmp_path / "image.safetensors")
    assert main(["finetune", "--task", "video", "--checkpoint", str(tmp_path / "image.safetensors"),
                 "--data", str(clips), "--output", str(tmp_path / "ft"), "--model", "video_swinv2_debug",
                 "--img-size", "32", "--frames", "4", "--short-side", "36", "--epochs", "1", "--max-steps", "1",
                 "--batch-size", "2", "--workers", "0", "--amp", "none", "--no-progress", "--no-tensorboard"]) == 0
    out = capsys.readouterr().out
    assert "inflated the patch embedding over 2 frames" in out and "zero time column" in out
    tuned = swinv2.load_model(tmp_path / "ft" / "model-last.safetensors")
    assert isinstance(tuned, swinv2.VideoSwinTransformerV2) and tuned.num_classes == 4
    # the image weights arrived: the first block's attention is the image model's
    torch.testing.assert_close(tuned.layers[0].blocks[0].attn.qkv.weight,
                               image.layers[0].blocks[0].attn.qkv.weight, atol=1e-2, rtol=0)


def test_kinetics_csv_trains_and_evaluates(clips, tmp_path, capsys):
    """Kinetics annotation CSVs (label, youtube_id, time_start, time_end, split), the clips named
    as the download scripts name them."""
    root = tmp_path / "k400"
    for split, source in (("train", clips / "train"), ("val", clips / "val")):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            for n, clip in enumerate(sorted(source.rglob("*.mp4"))):
                label = clip.parent.name
                name = f"vid{split}{n:04d}"
                target = root / split / label / f"{name}_000000_000010.mp4"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(clip.read_bytes())
                writer.writerow([label, name, 0, 10, split])
    cfg = _cfg(tmp_path / "train.csv", tmp_path / "run", val=str(tmp_path / "val.csv"), video_root=str(root),
               max_steps=1)
    assert video.main(cfg) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "model-last.safetensors"), "--data",
                 str(tmp_path / "val.csv"), "--video-root", str(root), "--json", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = [r for r in _records(tmp_path / "run") if r["split"] == "val"][-1]
    assert result["clips"] == 4 and result["top1"] == last["top1"]


def test_predict_gives_the_top_classes(clips, run, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    out = tmp_path / "predictions.json"
    code = main(["predict", "--checkpoint", str(run / "model-last.safetensors"), str(clips / "val"), str(bad),
                 "--format", "json", "--topk", "2", "--output", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 5 and "unreadable clip" in rows[-1]["error"]
    for row in rows[:-1]:
        assert [t["name"] for t in row["top"]][0] in ("down", "left", "right", "up")
        assert abs(sum(t["prob"] for t in row["top"]) - 1) < 1 and row["top"][0]["prob"] >= row["top"][1]["prob"]


@pytest.mark.parametrize("args, message", [
    (["--model", "swinv2_debug"], "needs a video model"),
    (["--cutmix", "1.0"], "CutMix cuts image boxes"),
    (["--test-crops", "2"], "test-crops"),
])
def test_errors_are_one_line(args, message, clips, tmp_path, capsys):
    code = main(["train", "--task", "video", "--data", str(clips), "--output", str(tmp_path / "x"), "--workers", "0",
                 "--max-steps", "1", "--no-progress", "--img-size", "32", "--frames", "4", *args])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
