"""Hostile and absurd files at every entry point that reads one.

- A pickle whose unpickling would run code (it would create a marker file) is refused with one
  line, and the marker never appears: bare, in a dict, mixed into a state dict and as a training
  checkpoint, through the Python API and every command that takes a checkpoint.
- A model config (swinv2 metadata, Hugging Face config.json, a training checkpoint's
  model_config) asking for an absurd model is refused with one line naming the file and the
  field, before anything is built: the constructor is patched to fail the test if it is asked
  for such a model, so that a regression fails here instead of eating the machine's memory.
"""

from __future__ import annotations

import functools
import inspect
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import swinv2
from swinv2 import hub
from swinv2.cli import main
from swinv2.files import CheckpointError
from swinv2.hf_folder import save_hf_folder
from swinv2.model import SwinTransformerV2
from swinv2.model_config import count_params_analytic
from swinv2.train.checkpoint import KIND

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

DEBUG = dict(img_size=32, window_size=4, num_classes=3)
FAST = ["--model", "swinv2_debug", "--img-size", "32", "--window", "4", "--batch-size", "4", "--workers", "0",
        "--threads", "1", "--no-progress", "--no-tensorboard", "--max-steps", "1", "--epochs", "1"]


class _RunsCode:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def model():
    return swinv2.create_model("swinv2_debug", **DEBUG).eval()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "x.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(path)
    return path


def _training_checkpoint(model, **entries) -> dict:
    return {"kind": KIND, "model": model.state_dict(), "model_config": dict(model.config),
            "config": {"model": "swinv2_debug", "img_size": 32}, "run": {"step": 1, "epoch": 0}, **entries}


def _hostile(kind: str, model, folder, marker, name: str | None = None):
    """A file of ``kind`` holding a code-running object; training checkpoints end in .pt."""
    evil = _RunsCode(marker)
    path = folder / (name or ("checkpoint-last.pt" if kind == "training" else f"{kind}.pth"))
    if kind == "bare":
        obj = evil
    elif kind == "in_dict":
        obj = {"model": evil, "epoch": 3}
    elif kind == "in_state_dict":
        obj = dict(model.state_dict(), **{"layers.0.blocks.0.attn.logit_scale": evil})
    else:
        obj = _training_checkpoint(model, rng=evil)
    torch.save(obj, path)
    return path


# Each entry point: a function (path, tmp_path, image) -> a CLI argv (run through main, exit 2
# expected) or None after calling the Python API (CheckpointError expected).
ENTRY_POINTS = {
    "load_pretrained": lambda p, t, i: swinv2.load_pretrained(swinv2.create_model("swinv2_debug", **DEBUG), p),
    "create_model": lambda p, t, i: swinv2.create_model("swinv2_debug", pretrained=p, **DEBUG),
    "create_model_unnamed": lambda p, t, i: swinv2.create_model(pretrained=p),
    "load_model": lambda p, t, i: swinv2.load_model(p),
    "predict": lambda p, t, i: ["predict", str(i), "--checkpoint", str(p), "--model", "swinv2_debug", "--quiet"],
    "eval": lambda p, t, i: ["eval", "--checkpoint", str(p), "--model", "swinv2_debug", "--img-size", "32",
                             "--workers", "0", "--threads", "1"],
    "convert": lambda p, t, i: ["convert", str(p), str(t / "out.pth"), "--to", "timm"],
    "finetune": lambda p, t, i: ["finetune", "--checkpoint", str(p), *FAST, "--output", str(t / "ft")],
    "train_resume": lambda p, t, i: ["train", "--resume", *FAST, "--output", str(p.parent)],
    "export": lambda p, t, i: ["export", "--checkpoint", str(p), "--model", "swinv2_debug", "--format",
                               "torchscript", "--output", str(t / "m.pt")],
}


def _one_line(text: str, *words: str) -> None:
    assert len(text.strip().splitlines()) == 1, text
    assert "weights_only" not in text, text  # never torch's advice to load with weights_only=False
    for word in words:
        assert word in text, text


def _refused(entry: str, path, tmp_path, image, capsys, *words: str) -> str:
    """Run ``entry`` on ``path``; assert the refusal is one line holding ``words``."""
    capsys.readouterr()
    try:
        argv = ENTRY_POINTS[entry](path, tmp_path, image)
    except CheckpointError as err:
        _one_line(str(err), *words)
        return str(err)
    assert argv is not None, f"{entry} read {path} without an error"
    assert main(argv) == 2
    err = capsys.readouterr().err
    _one_line(err, "swinv2: error: ", *words)
    return err


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("kind", ["bare", "in_dict", "in_state_dict", "training"])
def test_hostile_pickles_never_run(model, image, tmp_path, capsys, kind, entry):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "files"
    folder.mkdir()
    path = _hostile(kind, model, folder, marker, name="checkpoint-last.pt" if entry == "train_resume" else None)
    _refused(entry, path, tmp_path, image, capsys, "refused to load", os.fspath(path),
             "Python objects other than tensors", "posix.system")
    assert not marker.exists()


def test_hostile_pickle_in_a_hugging_face_folder(model, tmp_path):
    marker = tmp_path / "code-ran"
    folder = save_hf_folder(model, tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    torch.save({"classifier.weight": _RunsCode(marker)}, folder / "pytorch_model.bin")
    for load in (lambda: swinv2.create_model(pretrained=folder),
                 lambda: swinv2.load_pretrained(swinv2.create_model("swinv2_debug", **DEBUG), folder)):
        with pytest.raises(CheckpointError, match="refused to load .*pytorch_model.bin") as err:
            load()
        _one_line(str(err.value))
    assert not marker.exists()


def test_a_pickled_module_is_named(model, tmp_path):
    torch.save(model, tmp_path / "whole.pth")
    with pytest.raises(CheckpointError, match=r"refused to load .*whole.pth: .* other than tensors \(swinv2\."):
        swinv2.create_model("swinv2_debug", pretrained=tmp_path / "whole.pth", **DEBUG)


# -- absurd model configs --------------------------------------------------------------------

ABSURD = {  # field -> (swinv2 config change, config.json change, the field as named in the message)
    "depths": (dict(depths=[1_000_000, 2, 2, 2]), dict(depths=[1_000_000, 2, 2, 2]), "depths[0] = 1000000"),
    "embed_dim": (dict(embed_dim=10_000_000), dict(embed_dim=10_000_000), "embed_dim = 10000000"),
    "embed_dim_float": (dict(embed_dim=1e7), dict(embed_dim=1e7), "embed_dim must be an integer"),
    "img_size": (dict(img_size=1_000_000_000), dict(image_size=1_000_000_000), "img_size = 1000000000"),
}


@pytest.fixture
def no_absurd_build(monkeypatch):
    """Fail the test (instead of allocating) if a model with absurd numbers is constructed."""
    original = SwinTransformerV2.__init__

    defaults = {k: p.default for k, p in inspect.signature(original).parameters.items() if k != "self"}

    @functools.wraps(original)  # the checks read the constructor's signature
    def guarded(self, *args, **kwargs):
        config = {**defaults, **kwargs}
        sizes = config["img_size"]
        sides = [sizes] if isinstance(sizes, (int, float)) else list(sizes)
        if (any(d > 64 for d in config["depths"]) or config["embed_dim"] > 4096 or any(s > 8192 for s in sides)
                or count_params_analytic(config) > 1e9):
            pytest.fail(f"a model was built from an absurd config: {kwargs}")
        original(self, *args, **kwargs)

    monkeypatch.setattr(SwinTransformerV2, "__init__", guarded)


def _swinv2_file(model, folder, change: dict):
    path = hub.save_pretrained(model, folder / "model.safetensors")
    meta = hub.read_metadata(path)
    meta[hub.META_CONFIG] = json.dumps({**json.loads(meta[hub.META_CONFIG]), **change})
    save_file(model.state_dict(), path, metadata=meta)
    return path


def _training_file(model, folder, change: dict):
    path = folder / "checkpoint-last.pt"
    torch.save(dict(_training_checkpoint(model), model_config={**model.config, **change}), path)
    return path


def _hf_folder(model, folder, change: dict):
    path = save_hf_folder(model, folder / "hf")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    return path


CONFIG_ENTRIES = {
    "swinv2": (_swinv2_file, ["create_model", "create_model_unnamed", "load_model", "predict", "eval", "convert",
                              "export"]),
    "training": (_training_file, ["create_model", "create_model_unnamed", "predict", "eval", "export", "finetune"]),
    "hf": (_hf_folder, ["create_model", "create_model_unnamed", "load_pretrained", "predict", "eval", "convert"]),
}
CONFIG_CASES = [(source, entry) for source, (_, entries) in CONFIG_ENTRIES.items() for entry in entries]


@pytest.mark.usefixtures("no_absurd_build")
@pytest.mark.parametrize("field", list(ABSURD))
@pytest.mark.parametrize("source, entry", CONFIG_CASES)
def test_absurd_configs_are_refused_before_building(model, image, tmp_path, capsys, source, entry, field):
    if entry == "convert":  # convert writes next to the file it reads; a fresh folder each time
        tmp_path = tmp_path / "out"
        tmp_path.mkdir()
    ours, theirs, named = ABSURD[field]
    if source == "hf":
        named = named.replace("img_size", "image_size")
    write, _ = CONFIG_ENTRIES[source]
    folder = tmp_path / "files"
    folder.mkdir()
    path = write(model, folder, theirs if source == "hf" else ours)
    shown = os.fspath(path / "config.json") if source == "hf" else os.fspath(path)
    _refused(entry, path, tmp_path, image, capsys, shown, named)


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(depths=[2, 2, 2, 2, 2, 2, 2, 2, 2]), "depths has 9 entries"),
        (dict(depths=[2, 2, "2", 2]), "depths[2] must be an integer"),
        (dict(num_heads=[3, 4, 8, 16]), "num_heads[0] = 3 does not divide stage 0's width 32"),
        (dict(window_size=0), "window_size = 0 is out of range"),
        (dict(window_size=[4, 4, 4]), "window_size must be an integer or a pair"),
        (dict(img_size=30), "img_size [30, 30] is not a multiple of the patch size [4, 4]"),
        (dict(patch_size=128), "patch_size = 128 is out of range (1..64)"),
        (dict(mlp_ratio=float("nan")), "mlp_ratio must be a finite number"),
        (dict(mlp_ratio=100), "mlp_ratio = 100 is out of range"),
        (dict(num_classes=10**9), "num_classes = 1000000000 is out of range (0..1000000)"),
        (dict(in_chans=0), "in_chans = 0 is out of range (1..64)"),
        (dict(drop_path_rate=5), "drop_path_rate = 5 is out of range"),
        (dict(qkv_bias="yes"), "qkv_bias must be true or false"),
        (dict(attn_type="flash"), "attn_type must be one of 'cosine', 'dot'"),
        (dict(grad_checkpointing=[7]), "grad_checkpointing = 7 is out of range (0..3 stage indices)"),
        (dict(sequential_attention={"0": 0}), "sequential_attention = 0 is out of range"),
        (dict(pretrained_window_sizes=[0, 0]), "pretrained_window_sizes has 2 entries"),
        (dict(embed_dim=4096, depths=[2, 2, 60, 2], num_heads=[4, 8, 16, 32]), "describes 2.24e+11 parameters"),
        (dict(embed_dim=64), "describes 9,121,286 parameters but the file holds only 2,321,190 values"),
        (dict(new_setting=1), "unknown model setting 'new_setting'"),
    ],
)
@pytest.mark.usefixtures("no_absurd_build")
def test_every_config_field_is_checked(tmp_path, change, named):
    model = swinv2.create_model("swinv2_debug")
    path = _swinv2_file(model, tmp_path, change)
    with pytest.raises(CheckpointError) as err:
        swinv2.create_model(pretrained=path)
    _one_line(str(err.value), os.fspath(path), named)


def test_real_configs_pass(tmp_path):
    """Every registered variant (SwinV2-G included) and the constructor's options stay within the bounds."""
    from swinv2.model_config import check_model_config
    from swinv2.variants import VARIANTS

    for name, variant in VARIANTS.items():
        check_model_config(variant.kwargs(), name)
    model = swinv2.create_model("swinv2_debug", ape=True, position_bias="table", norm_placement="sandwich",
                                global_pool="", num_classes=0, grad_checkpointing=[0, 2],
                                sequential_attention=True, merge_norm="pre")
    check_model_config(json.loads(json.dumps(model.config)), "a JSON round trip")
    # configs saved while batch chunks were a model setting still read
    check_model_config({**model.config, "batch_chunk_mb": 32.0}, "an older file")
    path = hub.save_pretrained(model, tmp_path / "options.safetensors")
    assert swinv2.create_model(pretrained=path).config == model.config


def test_every_constructor_setting_has_a_check():
    """A new constructor argument needs a bound in swinv2.model_config, else files holding it
    would be refused as unknown."""
    from swinv2 import model_config

    source = inspect.getsource(model_config.check_model_config)
    params = set(inspect.signature(SwinTransformerV2.__init__).parameters) - {"self", "norm_layer"}
    unchecked = sorted(p for p in params if f'"{p}"' not in source)
    assert not unchecked, unchecked


def test_a_training_checkpoint_copy_keeps_working(model, tmp_path):
    """The checks accept what training writes: a checkpoint of a real config rebuilds."""
    path = tmp_path / "checkpoint-best.pt"
    torch.save(_training_checkpoint(model), path)
    rebuilt = swinv2.create_model(pretrained=path)
    assert rebuilt.config["depths"] == model.config["depths"]
