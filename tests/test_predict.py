"""swinv2.predict and ``swinv2 predict``: real photos, broken files, every output format, and
the preprocessing that belongs to the weights."""

from __future__ import annotations

import csv
import io
import json
import shutil

import pytest
import torch
from helpers import randomize_
from PIL import Image

import swinv2
from swinv2 import predict as P
from swinv2 import weights as W
from swinv2.cli import main
from swinv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from swinv2.weights import PretrainedWeights

DEBUG = "swinv2_debug"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """china.jpg and sub/flower.jpg (scikit-learn's sample photos), a truncated JPEG, a text
    file named .jpg, and a file that is not an image by its extension (not picked up)."""
    datasets = pytest.importorskip("sklearn.datasets")
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    files = {p.rsplit("/", 1)[-1]: p for p in datasets.load_sample_images().filenames}
    shutil.copy(files["china.jpg"], root / "china.jpg")
    shutil.copy(files["flower.jpg"], root / "sub" / "flower.jpg")
    (root / "broken.jpg").write_bytes((root / "china.jpg").read_bytes()[:3000])
    (root / "notes.jpg").write_text("not an image\n")
    (root / "readme.txt").write_text("skipped by the folder walk\n")
    return root


@pytest.fixture(scope="module")
def model():
    return randomize_(swinv2.create_model(DEBUG), seed=2).eval()


def test_rows_are_the_softmax_of_the_models_own_logits(photos, model):
    tf = P.Preprocess(64).transform()
    names = [f"n{i}" for i in range(10)]
    rows = P.predict(model, [photos], transform=tf, class_names=names, topk=4, batch_size=3)
    assert [r["path"].split("photos")[-1][1:].split("/", 1)[-1] for r in rows] == [
        "broken.jpg", "china.jpg", "notes.jpg", "sub/flower.jpg"]
    assert [r["ok"] for r in rows] == [False, True, False, True]
    assert "truncated" in rows[0]["error"].lower() and "UnidentifiedImageError" in rows[2]["error"]
    for row, name in ((rows[1], "china.jpg"), (rows[3], "sub/flower.jpg")):
        with Image.open(photos / name) as img:
            x = tf(img)[None]
        with torch.no_grad():
            probs = model(x).softmax(-1)[0]
        top = probs.topk(4)
        got = row["topk"]
        assert [p["rank"] for p in got] == [1, 2, 3, 4]
        assert [p["index"] for p in got] == top.indices.tolist()
        assert [p["label"] for p in got] == [names[i] for i in top.indices.tolist()]
        assert torch.allclose(torch.tensor([p["prob"] for p in got]), top.values, atol=1e-6)
        assert all(a["prob"] >= b["prob"] for a, b in zip(got, got[1:]))
    # The photos differ, so must their predictions (a constant output would pass the rest).
    assert rows[1]["topk"][0]["prob"] != rows[3]["topk"][0]["prob"]


def test_topk_beyond_the_classes_and_bad_arguments(photos, model):
    tf = P.Preprocess(64).transform()
    rows = P.predict(model, [photos / "china.jpg"], transform=tf, topk=50)
    assert len(rows[0]["topk"]) == 10 and abs(sum(p["prob"] for p in rows[0]["topk"]) - 1) < 1e-5
    with pytest.raises(ValueError, match="topk"):
        P.predict(model, [photos], transform=tf, topk=0)
    with pytest.raises(FileNotFoundError, match="no such image or folder"):
        P.predict(model, [photos / "missing.jpg"], transform=tf)
    empty = photos.parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="no images"):
        P.find_images([empty])


def test_class_names():
    names = P.class_names_for(1000)
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    assert P.class_names_for(3) == ["class 0", "class 1", "class 2"]
    assert P.class_names_for(2, ["cat", "dog"]) == ["cat", "dog"]
    with pytest.raises(ValueError, match="2 classes but the model has 3"):
        P.class_names_for(3, ["cat", "dog"])


def test_cli_json_csv_table_and_the_random_weights_warning(photos, tmp_path, capsys):
    args = ["predict", str(photos), "--model", DEBUG, "--topk", "3", "--batch-size", "2", "--quiet"]
    torch.manual_seed(0)  # the same random model in every run below
    assert main([*args, "--format", "json", "--output", str(tmp_path / "p.json")]) == 0
    err = capsys.readouterr().err
    assert "RANDOMLY INITIALISED" in err and "MEANINGLESS" in err
    assert "skipping" in err and "broken.jpg" in err and "2 of 4 images could not be read" in err
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["ok"] for r in rows] == [False, True, False, True]
    assert rows[1]["topk"][0]["label"].startswith("class ") and len(rows[1]["topk"]) == 3

    torch.manual_seed(0)
    assert main([*args, "--format", "csv"]) == 0
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(records) == 2 + 2 * 3
    assert [r["ok"] for r in records].count("false") == 2
    assert all(r["error"] for r in records if r["ok"] == "false")
    china = [r for r in records if r["path"].endswith("china.jpg")]
    assert [int(r["rank"]) for r in china] == [1, 2, 3]
    assert [float(r["prob"]) for r in china] == pytest.approx([p["prob"] for p in rows[1]["topk"]], abs=1e-5)

    assert main([*args]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "rank", "class", "prob"]
    assert any("broken.jpg" in line and "error:" in line for line in table)
    assert len({line.index(" 1 ") for line in table if " 1  class" in line}) == 1  # aligned


def test_cli_clear_errors(photos, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope.jpg"), "--model", DEBUG]) == 2
    assert "no such image or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--model", DEBUG]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["predict", str(photos)]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["predict", str(photos / "notes.jpg"), "--model", DEBUG, "--quiet"]) == 1  # nothing readable
    assert main(["predict", str(photos), "--model", "swinv2_nothing"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_checkpoint_metadata_gives_class_names_and_preprocessing(photos, model, tmp_path, capsys, monkeypatch):
    names = [f"flower{i}" for i in range(10)]
    meta = {"class_names": json.dumps(names),
            "preprocess": json.dumps(dict(img_size=96, crop_pct=1.0, crop_mode="squash", interpolation="bilinear"))}
    ckpt = swinv2.save_pretrained(model, tmp_path / "w.safetensors", metadata=meta)
    seen = []
    real = P.eval_transform
    monkeypatch.setattr(P, "eval_transform", lambda *a, **kw: seen.append((a, kw)) or real(*a, **kw))
    assert main(["predict", str(photos / "china.jpg"), "--checkpoint", str(ckpt), "--format", "json",
                 "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["topk"][0]["label"].startswith("flower")
    assert seen[-1][0] == (96,) and seen[-1][1]["crop_mode"] == "squash" and seen[-1][1]["interpolation"] == "bilinear"

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"L{i}" for i in range(10)) + "\n")
    assert main(["predict", str(photos / "china.jpg"), "--checkpoint", str(ckpt), "--labels", str(labels),
                 "--format", "json", "--quiet", "--img-size", "64"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["topk"][0]["label"].startswith("L")
    assert seen[-1][0] == ((64, 64),)  # --img-size replaces the size, the crop policy stays
    labels.write_text("a\nb\n")
    assert main(["predict", str(photos), "--checkpoint", str(ckpt), "--labels", str(labels)]) == 2
    assert "2 labels but the model has 10 classes" in capsys.readouterr().err


def _register(monkeypatch, tag, **kw):
    weights = PretrainedWeights(arch=DEBUG, tag=tag, file=f"{DEBUG}_{tag}.pth", img_size=64, window_size=4,
                                num_classes=10, dataset="fixture", url=f"http://127.0.0.1:9/{tag}.pth", **kw)
    monkeypatch.setitem(W.PRETRAINED, weights.name, weights)
    return weights


@pytest.mark.parametrize("tag, crop, size", [("center", {}, 64),
                                             ("squash", dict(crop_pct=1.0, crop_mode="squash"), 64)])
def test_registered_weights_bring_their_crop_policy(photos, model, tmp_path, monkeypatch, capsys, tag, crop, size):
    # A registered tag whose file is already in the cache ($SWINV2_HOME): download() finds it
    # and never contacts the (unreachable) URL, as after an earlier download.
    monkeypatch.setenv("SWINV2_HOME", str(tmp_path / "cache"))
    weights = _register(monkeypatch, tag, **crop)
    (tmp_path / "cache").mkdir()
    torch.save({"model": model.state_dict()}, tmp_path / "cache" / weights.file)
    seen = []
    real = P.eval_transform
    monkeypatch.setattr(P, "eval_transform", lambda *a, **kw: seen.append((a, kw)) or real(*a, **kw))
    assert main(["predict", str(photos / "china.jpg"), "--model", weights.name, "--format", "json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    err = capsys.readouterr().err
    assert "RANDOMLY" not in err
    assert seen == [((size,), dict(crop_pct=weights.crop_pct, crop_mode=weights.crop_mode,
                                   interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD))]
    # The loaded weights are the cached file's: the same probabilities as the model itself.
    with Image.open(photos / "china.jpg") as img:
        x = real(size, crop_pct=weights.crop_pct, crop_mode=weights.crop_mode)(img)[None]
    with torch.no_grad():
        best = model(x).softmax(-1)[0].max()
    assert rows[0]["topk"][0]["prob"] == pytest.approx(float(best), abs=1e-6)


def test_registered_weights_offline_is_a_clear_error(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWINV2_HOME", str(tmp_path / "cache"))
    weights = _register(monkeypatch, "offline")
    assert main(["predict", str(photos / "china.jpg"), "--model", weights.name]) == 2
    err = capsys.readouterr().err
    assert "cannot download" in err and weights.file in err
