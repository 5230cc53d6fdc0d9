"""swinv2.read_weights, the one reader: each kind of source gives its state dict and what it
says about itself (model config, class names, preprocessing, release), and every entry point
(create_model, load_pretrained, predict, eval, finetune, reconstruct) goes through it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import randomize_
from safetensors.torch import save_file

import swinv2
from swinv2 import reading
from swinv2 import weights as W
from swinv2.hf_folder import save_hf_folder
from swinv2.reading import Weights, read_weights

DEBUG = "swinv2_debug"


@pytest.fixture(scope="module")
def model():
    return randomize_(swinv2.create_model(DEBUG, img_size=32, num_classes=3), 4).eval()


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_state_dict_and_a_plain_file(model, tmp_path):
    w = read_weights(model.state_dict())
    assert (w.kind, w.source, w.config, w.path) == ("state dict", "state dict", None, None)
    assert read_weights({"model": model.state_dict()}, name="mine").source == "mine"
    assert read_weights(w) is w  # read once, passed on
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    f = read_weights(tmp_path / "w.safetensors")
    assert (f.kind, f.path, f.config, f.class_names, f.preprocess) == ("file", str(tmp_path / "w.safetensors"),
                                                                       None, None, None)
    assert f.state.keys() == model.state_dict().keys()
    with pytest.raises(TypeError, match="cannot read weights from a int"):
        read_weights(3)


def test_a_swinv2_file_says_its_config_classes_and_preprocessing(model, tmp_path):
    meta = {"class_names": json.dumps(["a", "b", "c"]),
            "preprocess": json.dumps(dict(img_size=[32, 48], crop_pct=1.0, crop_mode="squash", mean=[0.5] * 3,
                                          other=1))}
    path = swinv2.save_pretrained(model, tmp_path / "w.safetensors", metadata=meta)
    w = read_weights(path)
    assert w.kind == "swinv2" and w.config["embed_dim"] == 32 and w.config["num_classes"] == 3
    assert w.class_names == ["a", "b", "c"]
    assert w.preprocess == dict(img_size=(32, 48), crop_pct=1.0, crop_mode="squash", mean=(0.5, 0.5, 0.5))
    save_file(model.state_dict(), tmp_path / "bad.safetensors",
              metadata={**swinv2.hub.read_metadata(path), "preprocess": "{not json"})
    with pytest.raises(swinv2.CheckpointError, match="bad.safetensors: unreadable preprocess metadata"):
        read_weights(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_training_checkpoint(model, tmp_path, in_memory):
    checkpoint = {"kind": "swinv2-train-checkpoint", "model": model.state_dict(), "model_config": dict(model.config),
                  "config": {"img_size": 48, "crop_pct": 0.9}, "class_names": ["x", "y", "z"]}
    torch.save(checkpoint, tmp_path / "checkpoint-best.pt")
    w = read_weights(checkpoint if in_memory else tmp_path / "checkpoint-best.pt")
    assert w.kind == "checkpoint" and w.config["img_size"] == [32, 32] and w.run_config["img_size"] == 48
    assert w.class_names == ["x", "y", "z"]
    assert w.preprocess == dict(img_size=48, crop_pct=0.9, crop_mode="center")
    rebuilt = swinv2.create_model(pretrained=w)
    assert _same(rebuilt, model)


def test_a_plain_state_dict_saved_as_pt_loads_into_a_named_model(model, tmp_path):
    """A .pt file is not taken for a training checkpoint because of its name."""
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert _same(swinv2.create_model(DEBUG, img_size=32, num_classes=3, pretrained=tmp_path / "weights.pt"), model)


def test_a_hugging_face_folder(model, tmp_path):
    folder = save_hf_folder(model, tmp_path / "hf", class_names=["a", "b", "c"])
    w = read_weights(folder)
    assert (w.kind, w.format, w.class_names, w.path) == ("hf folder", "hf", ["a", "b", "c"], str(folder))
    assert w.config["num_classes"] == 3 and w.hf_config["model_type"] == "swinv2"


@pytest.fixture
def release(monkeypatch, tmp_path, model):
    """Made-up released weights whose file is already in the cache, so nothing is fetched."""
    monkeypatch.setenv("SWINV2_HOME", str(tmp_path / "cache"))
    released = W.PretrainedWeights(arch=DEBUG, tag="read", file="swinv2_debug_read.pth", img_size=32,
                                   window_size=4, num_classes=3, dataset="fixture", crop_pct=1.0,
                                   crop_mode="squash", url="http://127.0.0.1:9/never-asked.pth")
    monkeypatch.setitem(W.PRETRAINED, released.name, released)
    (tmp_path / "cache").mkdir()
    torch.save({"model": model.state_dict()}, tmp_path / "cache" / released.file)
    return released


def test_released_weights_by_tag_need_no_model_name(release, model, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no file named like the tag here
    for source in (release.name, release):
        w = read_weights(source)
        assert w.release == release and w.arch == DEBUG and w.kind == "file"
        assert w.preprocess == dict(img_size=32, crop_pct=1.0, crop_mode="squash", interpolation="bicubic")
    built = swinv2.create_model(pretrained=release.name, img_size=32)  # the architecture comes from the table
    assert built.num_classes == 3 and _same(built, model)


def test_a_local_copy_of_a_release_file_is_recognised(release, tmp_path):
    copy = tmp_path / release.file
    copy.write_bytes((tmp_path / "cache" / release.file).read_bytes())
    assert read_weights(copy).release == release
    assert read_weights(copy, arch=DEBUG).release == release
    assert read_weights(copy, arch="swinv2_tiny_window8_256").release is None  # another architecture


def test_every_entry_point_reads_through_the_reader(model, tmp_path, monkeypatch):
    """create_model, load_pretrained, predict, eval, finetune's windows and reconstruct each
    call read_weights once per source."""
    from swinv2 import loading, predict, reconstruct, variants
    from swinv2.tasks import evaluate, supervised

    path = swinv2.save_pretrained(model, tmp_path / "w.safetensors")
    sim = swinv2.SimMIM(swinv2.create_model(DEBUG, img_size=32, num_classes=0), norm_target_window=None)
    torch.save({"model": sim.state_dict(), "model_config": sim.encoder.config}, tmp_path / "simmim.pt")
    calls = []
    real = reading.read_weights

    def counting(source, **kw):
        calls.append(source)
        return real(source, **kw)

    for module in (variants, loading, predict, evaluate, supervised, reconstruct):
        monkeypatch.setattr(module, "read_weights", counting)
    entries = {
        "create_model": lambda: swinv2.create_model(pretrained=path),
        "load_pretrained": lambda: swinv2.load_pretrained(swinv2.create_model(DEBUG, img_size=32, num_classes=3),
                                                          path),
        "predict": lambda: predict.load_for_inference(checkpoint=path),
        "eval": lambda: evaluate.load_weights(str(path), None, {}),
        "finetune windows": lambda: supervised.checkpoint_windows(str(path)),
        "reconstruct": lambda: reconstruct.load_simmim(tmp_path / "simmim.pt"),
    }
    for name, entry in entries.items():
        calls.clear()
        entry()
        assert calls and os.fspath(calls[0]) in (os.fspath(path), os.fspath(tmp_path / "simmim.pt")), name
        assert all(isinstance(c, Weights) for c in calls[1:]), (name, calls)  # read once, then passed on


def test_reader_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nothing.pth"):
        read_weights(tmp_path / "nothing.pth")
    (tmp_path / "x.pth").write_bytes(b"garbage")
    with pytest.raises(swinv2.CheckpointError) as err:
        read_weights(tmp_path / "x.pth")
    assert len(str(err.value).splitlines()) == 1
