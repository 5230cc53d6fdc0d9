"""Hugging Face ``save_pretrained`` folders: read by ``create_model`` / ``load_pretrained`` /
the CLI, written by ``swinv2 convert --to hf`` and read back by transformers' ``from_pretrained``.

The transformers models are tiny random configurations with every parameter randomised
(``helpers.randomize_``), so that a wrong mapping of any tensor or config field shows in the
logits, which are compared with those of the other library on the same images.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import randomize_, rel_err

import swinv2
from swinv2 import hub
from swinv2.cli import main
from swinv2.hf_folder import class_names, hf_stage_windows, read_hf_weights, save_hf_folder

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # float32, relative (in practice the two agree to about 1e-7)
NAMES = ["cat", "dog", "fox", "owl", "elk"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _hf_config(**kw) -> transformers.Swinv2Config:
    base = dict(
        image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
        pretrained_window_sizes=[3, 2], num_labels=len(NAMES), id2label=dict(enumerate(NAMES)),
        label2id={n: i for i, n in enumerate(NAMES)}, drop_path_rate=0.0, layer_norm_eps=1e-5,
    )
    return transformers.Swinv2Config(**{**base, **kw})


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    randomize_(model, seed)
    with torch.no_grad():  # spread the position-bias input layer as randomize_ does under the name cpb_mlp
        for name, p in model.named_parameters():
            if "continuous_position_bias_mlp.0." in name:
                p.mul_(10)
    return model.eval()


def _images(size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_classifier():
    return _randomised(transformers.Swinv2ForImageClassification(_hf_config()), seed=11)


@pytest.fixture(scope="module")
def hf_folder(hf_classifier, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    hf_classifier.save_pretrained(folder)
    return folder


def _hf_logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def _our_logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_create_model_rebuilds_an_hf_folder(hf_classifier, hf_folder):
    model = swinv2.create_model(pretrained=hf_folder)
    assert model.num_classes == len(NAMES) and model.depths == (2, 2) and model.window_size == (4, 4)
    assert model.pretrained_window_sizes == ((3, 3), (2, 2))
    x = _images()
    expected = _hf_logits(hf_classifier, x)
    assert expected.abs().max() > 0
    assert rel_err(_our_logits(model, x), expected) < TOL
    assert class_names(json.loads((hf_folder / "config.json").read_text())) == NAMES


def test_load_pretrained_reads_a_folder_and_notes_config_differences(hf_classifier, hf_folder):
    model = swinv2.SwinTransformerV2(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                                     num_classes=len(NAMES), pretrained_window_sizes=(3, 2))
    report = swinv2.load_pretrained(model, hf_folder)
    assert report.ok and report.format == "hf" and "config.json" not in str(report), str(report)
    x = _images()
    assert rel_err(_our_logits(model, x), _hf_logits(hf_classifier, x)) < TOL
    other = swinv2.SwinTransformerV2(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=8,
                                     num_classes=len(NAMES), pretrained_window_sizes=(0, 0))
    notes = swinv2.load_pretrained(other, hf_folder).notes
    assert any("window_size 4 in config.json" in n for n in notes)
    assert any("pretrained_window_sizes [3, 2] in config.json" in n for n in notes)


def test_sharded_and_pickled_folders(hf_classifier, hf_folder, tmp_path):
    sharded = tmp_path / "sharded"
    hf_classifier.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf_folder / "config.json", pickled)
    torch.save(hf_classifier.state_dict(), pickled / "pytorch_model.bin")
    reference = read_hf_weights(hf_folder)
    x = _images()
    expected = _our_logits(swinv2.create_model(pretrained=hf_folder), x)
    for folder in (sharded, pickled):
        state = read_hf_weights(folder)
        assert sorted(state) == sorted(reference) and all(torch.equal(state[k], reference[k]) for k in state)
        assert torch.equal(_our_logits(swinv2.create_model(pretrained=folder), x), expected)


def test_bare_model_folder_without_head(tmp_path):
    hf = _randomised(transformers.Swinv2Model(_hf_config(layer_norm_eps=1e-6)), seed=12)
    hf.save_pretrained(tmp_path / "bare")
    model = swinv2.create_model(pretrained=tmp_path / "bare")
    assert model.num_classes == 0 and model.norm.eps == 1e-6 and model.patch_embed.norm.eps == 1e-5
    x = _images(seed=2)
    with torch.no_grad():
        expected = hf(pixel_values=x).pooler_output
    assert rel_err(_our_logits(model, x), expected) < TOL


def test_convert_to_an_hf_folder_loads_in_transformers(tmp_path, capsys):
    ours = randomize_(swinv2.SwinTransformerV2(
        img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=3,
        pretrained_window_sizes=(2, 2), drop_path_rate=0.0,
    ), seed=13).eval()
    names = {"class_names": json.dumps(["a", "b", "c"])}
    src = hub.save_pretrained(ours, tmp_path / "ours.safetensors", metadata=names)
    assert main(["convert", str(src), str(tmp_path / "hf_out"), "--to", "hf"]) == 0
    assert "Hugging Face folder" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "hf_out").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    assert config["architectures"] == ["Swinv2ForImageClassification"] and config["model_type"] == "swinv2"
    hf, info = transformers.Swinv2ForImageClassification.from_pretrained(tmp_path / "hf_out", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c"}
    x = _images(seed=3)
    expected = _our_logits(ours, x)
    assert expected.abs().max() > 0
    assert rel_err(_hf_logits(hf.eval(), x), expected) < TOL
    # and back: the folder as convert input keeps the weights and the class names
    assert main(["convert", str(tmp_path / "hf_out"), str(tmp_path / "back.safetensors"), "--to", "swinv2"]) == 0
    back = swinv2.create_model(pretrained=tmp_path / "back.safetensors", fast=False)  # as ``ours``
    assert torch.equal(_our_logits(back, x), expected)
    assert json.loads(hub.read_metadata(tmp_path / "back.safetensors")["class_names"]) == ["a", "b", "c"]


def test_headless_model_writes_a_bare_swinv2model(tmp_path):
    ours = randomize_(swinv2.SwinTransformerV2(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                               window_size=4, num_classes=0, pretrained_window_sizes=(0, 0)), seed=14)
    save_hf_folder(ours, tmp_path / "bare")
    hf, info = transformers.Swinv2Model.from_pretrained(tmp_path / "bare", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x = _images(seed=4)
    with torch.no_grad():
        assert rel_err(hf.eval()(pixel_values=x).pooler_output, _our_logits(ours, x)) < TOL


def test_single_file_hf_output_is_unchanged(tmp_path):
    ours = swinv2.SwinTransformerV2(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                                    num_classes=3, pretrained_window_sizes=(0, 0))
    src = hub.save_pretrained(ours, tmp_path / "ours.safetensors")
    assert main(["convert", str(src), str(tmp_path / "sd.safetensors"), "--to", "hf"]) == 0
    from safetensors.torch import load_file

    assert "classifier.weight" in load_file(tmp_path / "sd.safetensors")


def test_convert_raw_state_dict_to_a_folder_needs_the_architecture(tmp_path, capsys):
    ours = swinv2.SwinTransformerV2(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                                    num_classes=3, pretrained_window_sizes=(0, 0))
    torch.save(ours.state_dict(), tmp_path / "raw.pth")
    assert main(["convert", str(tmp_path / "raw.pth"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "needs --model NAME" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_save_refuses_what_transformers_cannot_express_and_foreign_folders(tmp_path):
    kw = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), pretrained_window_sizes=(0, 0))
    with pytest.raises(ValueError, match="window_size=\\(4, 8\\)"):
        save_hf_folder(swinv2.SwinTransformerV2(**kw, window_size=(4, 8)), tmp_path / "a")
    with pytest.raises(ValueError, match="norm_placement='pre'"):
        save_hf_folder(swinv2.SwinTransformerV2(**kw, window_size=4, norm_placement="pre"), tmp_path / "b")
    assert not list(tmp_path.iterdir())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_hf_folder(swinv2.SwinTransformerV2(**kw, window_size=4), busy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no temporary folder left


def test_save_replaces_an_earlier_write_atomically(tmp_path, monkeypatch):
    kw = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=3,
              pretrained_window_sizes=(0, 0))
    first, second = swinv2.SwinTransformerV2(**kw), swinv2.SwinTransformerV2(**kw, drop_rate=0.25)
    save_hf_folder(first, tmp_path / "out")
    import swinv2.hf_folder as module

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf_folder(second, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_dropout_prob"] == 0.0
    monkeypatch.undo()
    save_hf_folder(second, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_dropout_prob"] == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert module.SAFETENSORS_NAME in {p.name for p in (tmp_path / "out").iterdir()}


def test_not_an_hf_folder_is_a_clear_error(hf_folder, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(hf_folder / "model.safetensors", no_config)
    with pytest.raises(swinv2.CheckpointError, match="no_config is not a Hugging Face model folder: it has no "
                                                     "config.json .*model.safetensors"):
        swinv2.create_model(pretrained=no_config)

    vit = tmp_path / "vit"
    shutil.copytree(hf_folder, vit)
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 16}))
    with pytest.raises(swinv2.CheckpointError, match="vit/config.json describes a model of type 'vit', not 'swinv2'"):
        swinv2.create_model(pretrained=vit)

    truncated = tmp_path / "truncated"
    shutil.copytree(hf_folder, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(swinv2.CheckpointError,
                       match="truncated/model.safetensors is a truncated or damaged safetensors file"):
        swinv2.create_model(pretrained=truncated)

    empty = tmp_path / "weightless"
    empty.mkdir()
    shutil.copy(hf_folder / "config.json", empty)
    with pytest.raises(swinv2.CheckpointError, match="weightless has a config.json but no weights"):
        swinv2.load_pretrained(swinv2.create_model("swinv2_debug"), empty)


def test_build_time_window_difference_warns(hf_folder, tmp_path):
    """At 36 px the 9x9 grid halves to 4 in transformers (rounded down: window 4, no shift) and
    to 5 in swinv2 (window 4, shift 2): the mismatch is named, not hidden."""
    odd = tmp_path / "odd"
    shutil.copytree(hf_folder, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "image_size": 36}))
    assert hf_stage_windows(config | {"image_size": 36}) == [(4, 2), (4, 0)]
    with pytest.warns(UserWarning, match=r"stage 1: window 4, shift 0 vs \(4, 4\), \(2, 2\)"):
        swinv2.create_model(pretrained=odd)


def test_predict_eval_and_finetune_take_a_folder(hf_classifier, hf_folder):
    """The commands that take --checkpoint: predict/export (load_for_inference), eval
    (load_weights) and finetune (its pretrained windows, then load_pretrained)."""
    from swinv2.predict import load_for_inference
    from swinv2.tasks.evaluate import load_weights
    from swinv2.tasks.supervised import checkpoint_windows

    x = _images(seed=5)
    expected = _hf_logits(hf_classifier, x)
    loaded = load_for_inference(checkpoint=hf_folder)
    assert loaded.class_names == NAMES and not loaded.random_weights
    assert rel_err(_our_logits(loaded.model, x), expected) < TOL
    net, _, names = load_weights(str(hf_folder), None, {})
    assert names == NAMES and rel_err(_our_logits(net, x), expected) < TOL
    assert checkpoint_windows(str(hf_folder)) == [4, 4]


def test_writing_a_model_transformers_would_window_differently_warns(tmp_path):
    ours = swinv2.SwinTransformerV2(img_size=(32, 48), embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                                    num_classes=3, pretrained_window_sizes=(0, 0))
    with pytest.warns(UserWarning, match="at \\(32, 48\\) they differ"):
        save_hf_folder(ours, tmp_path / "wide")
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["image_size"] == [32, 48]


def test_written_folder_files_get_the_mode_open_would_give(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        model = swinv2.create_model("swinv2_debug", img_size=32, window_size=4, num_classes=3)
        folder = save_hf_folder(model, tmp_path / "hf")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {"config.json": 0o640,
                                                                          "model.safetensors": 0o640}
