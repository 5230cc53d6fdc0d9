"""Bad command lines, missing extras and unwritable outputs: each is one line on stderr
(``swinv2: error: ...``), exit code 2, and nothing done or left behind."""

from __future__ import annotations

import builtins
import dataclasses
import errno
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

import swinv2
from swinv2 import cli
from swinv2 import predict as P
from swinv2.cli import main
from swinv2.fileio import WriteError
from swinv2.train.config import MAX_IMG_SIZE, TrainConfig
from swinv2.train.distributed import check_device

DEBUG = "swinv2_debug"
# Keeps a run short should a check fail to stop it (flags given later override these).
FAST = ["--epochs", "1", "--max-steps", "1", "--workers", "0", "--img-size", "32", "--batch-size", "2"]
OPTIONAL = ("timm", "yaml", "sklearn", "tensorboard", "matplotlib", "onnx", "onnxruntime", "onnxscript",
            "deepspeed", "transformers")
COMMANDS = ("list", "forward", "convert", "pretrained", "bench", "predict", "export", "memory", "train",
            "finetune", "pretrain", "eval", "reconstruct")


def error_line(capsys) -> str:
    """The one line a failed command printed on stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swinv2: error: "), lines
    return lines[0]


@pytest.fixture
def data(tmp_path):
    """A two-class image folder of 40 px RGB images."""
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (60 * i, 100 if c == "a" else 200, 30)).save(tmp_path / "data" / c / f"{i}.png")
    return tmp_path / "data"


@pytest.fixture
def without(monkeypatch):
    """Make modules look uninstalled, as ``import`` and ``importlib.util.find_spec`` see it."""

    def block(*names):
        for name in names:
            for key in [k for k in sys.modules if k.startswith(name + ".")]:
                monkeypatch.setitem(sys.modules, key, None)
            monkeypatch.setitem(sys.modules, name, None)

    return block


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder whose writes fail with EROFS, as on a read-only mount (chmod does not stop root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    inside = str(folder)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(inside) and set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if os.fspath(path).startswith(inside) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if os.fspath(path).startswith(inside):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return swinv2.save_pretrained(swinv2.create_model(DEBUG), tmp_path_factory.mktemp("weights") / "w.safetensors")


# -- optional extras ---------------------------------------------------------------------------


def test_every_command_is_listed_and_says_which_extra_without_them(tmp_path):
    # A fresh interpreter where no optional dependency can be imported, as after `pip install .`.
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None
        from swinv2.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["--help"])
            except SystemExit:
                pass
        print("HELP", out.getvalue().replace("\\n", " "))
        print("TRAIN", main(["train", "--output", {str(tmp_path / "run")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    help_text = next(line for line in proc.stdout.splitlines() if line.startswith("HELP"))
    for command in COMMANDS:
        assert f" {command} " in help_text, command
    assert "TRAIN 2" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1:] == [
        "swinv2: error: swinv2 train needs pyyaml (pip install 'swinv2[train]')"]
    assert not (tmp_path / "run").exists()


def test_every_module_imports_without_the_extras():
    """The command line imports every command's module to list it, so no module of the package may
    need an optional dependency to be imported: each imports its extras where it uses them."""
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        for name in {(*OPTIONAL, "huggingface_hub")!r}:
            sys.modules[name] = None
        import swinv2
        for module in pkgutil.walk_packages(swinv2.__path__, "swinv2."):
            if not module.name.endswith("__main__"):  # runs the command line
                importlib.import_module(module.name)
        print("IMPORTED", len(sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "IMPORTED" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("command, missing, needs", [
    (["train"], "timm", "swinv2 train needs timm (pip install 'swinv2[train]')"),
    (["train"], "yaml", "swinv2 train needs pyyaml (pip install 'swinv2[train]')"),
    (["train", "--config", "digits"], "sklearn", "swinv2 train needs scikit-learn for the bundled digits"),
    (["finetune", "--checkpoint", "w.pth"], "timm", "swinv2 finetune needs timm"),
    (["pretrain"], "yaml", "swinv2 pretrain needs pyyaml"),
    (["pretrain", "--data", "DATA"], "matplotlib", "swinv2 pretrain needs matplotlib"),
    (["train", "--data", "DATA", "--sharding", "deepspeed"], "deepspeed",
     "swinv2 train needs deepspeed for --sharding deepspeed (pip install 'swinv2[deepspeed]')"),
    (["eval", "--model", DEBUG], "sklearn", "swinv2 eval needs scikit-learn"),
    (["export", "--model", DEBUG, "--format", "onnx", "--output", "m.onnx"], "onnxscript",
     "swinv2 export --format onnx needs onnxscript (pip install 'swinv2[export]')"),
    (["train", "--task", "detection"], "torchmetrics", "swinv2 train needs torchmetrics (pip install 'swinv2[dense]')"),
    (["train", "--task", "detection"], "pycocotools", "swinv2 train needs pycocotools (pip install 'swinv2[dense]')"),
    (["train", "--task", "segmentation"], "skimage",
     "swinv2 train needs scikit-image for the bundled demo images used without --data (pip install 'swinv2[dense]')"),
    (["finetune", "--task", "segmentation", "--checkpoint", "w.pth"], "torchmetrics", "swinv2 finetune needs "
     "torchmetrics"),
])
def test_a_missing_extra_is_named_before_any_work(command, missing, needs, without, data, tmp_path, capsys):
    without(missing)
    argv = [str(data) if a == "DATA" else a for a in command]
    if argv[0] in ("train", "finetune", "pretrain"):
        argv += ["--output", str(tmp_path / "run")]
    assert main(argv) == 2
    assert needs in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_missing_extra_found_while_running_is_one_line(monkeypatch, capsys):
    def needs_tensorboard(args):
        import tensorboard  # noqa: F401

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setattr(cli.models, "cmd_list", needs_tensorboard)
    assert main(["list"]) == 2
    assert error_line(capsys) == "swinv2: error: swinv2 list needs tensorboard (pip install 'swinv2[train]')"


def test_core_commands_work_without_the_extras(without, data, weights, tmp_path, monkeypatch, capsys):
    from swinv2 import bench

    without(*OPTIONAL)
    monkeypatch.setattr(bench, "matmul_rates", lambda dtype, device="cpu", **kw: {"matmul": 1e9})
    monkeypatch.setattr(bench, "matmul_rate", lambda *a, **kw: 1e9)
    assert main(["predict", str(data), "--model", DEBUG, "--quiet"]) == 0
    assert main(["convert", str(weights), str(tmp_path / "t.pth"), "--to", "timm"]) == 0
    assert main(["memory", "--model", DEBUG, "--img-size", "64"]) == 0
    assert main(["bench", "--model", DEBUG, "--img-size", "32", "--batch-size", "1", "--rounds", "1",
                 "--impls", "swinv2", "timm", "--out", ""]) == 0
    assert "timm: skipped" in capsys.readouterr().out
    assert main(["export", "--model", DEBUG, "--format", "torchscript", "--output", str(tmp_path / "m.pt"),
                 "--no-dynamic-batch"]) == 0
    two = swinv2.save_pretrained(swinv2.create_model(DEBUG, num_classes=2), tmp_path / "two.safetensors")
    assert main(["eval", "--checkpoint", str(two), "--data", str(data), "--workers", "0", "--img-size", "32"]) == 0


# -- sizes, windows and every training field ------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["train"], ["predict", "DATA", "--model", DEBUG], ["eval", "--model", DEBUG], ["forward", "--model", DEBUG],
    ["export", "--model", DEBUG, "--format", "torchscript", "--output", "OUT/m.pt"],
    ["convert", "W", "OUT/c.safetensors", "--to", "swinv2", "--model", DEBUG], ["memory", "--model", DEBUG],
    ["bench", "--model", DEBUG], ["reconstruct", "W", "DATA"],
])
@pytest.mark.parametrize("size", ["100000", "0", "64x100000", "-64"])
def test_image_size_out_of_bounds(command, size, data, weights, tmp_path, capsys):
    argv = [str(data) if a == "DATA" else str(weights) if a == "W" else a.replace("OUT", str(tmp_path / "out"))
            for a in command] + [f"--img-size={size}"]
    if argv[0] == "train":
        argv = argv[:1] + [*FAST, "--data", str(data), "--output", str(tmp_path / "out")] + argv[1:]
    assert main(argv) == 2
    line = error_line(capsys)
    assert "--img-size" in line and (str(MAX_IMG_SIZE) in line or "int value" in line), line
    assert not (tmp_path / "out").exists()


def test_image_size_that_does_not_suit_the_model(data, capsys):
    assert main(["predict", str(data), "--model", DEBUG, "--img-size", "30"]) == 2
    assert error_line(capsys) == ("swinv2: error: --img-size 30x30 is not a multiple of the patch size 4x4 "
                                  "(e.g. 28x28)")
    assert main(["eval", "--model", DEBUG, "--img-size", "64x32"]) == 2
    assert "one number" in error_line(capsys)


@pytest.mark.parametrize("command", [
    ["train"], ["finetune", "--checkpoint", "W"], ["pretrain"], ["eval", "--model", DEBUG],
    ["forward", "--model", DEBUG], ["convert", "W", "OUT/c.safetensors", "--to", "swinv2", "--model", DEBUG],
    ["memory", "--model", DEBUG],
])
def test_window_zero_is_refused(command, data, weights, tmp_path, capsys):
    argv = [str(weights) if a == "W" else a.replace("OUT", str(tmp_path / "out")) for a in command]
    if argv[0] in ("train", "finetune", "pretrain"):
        argv += [*FAST, "--data", str(data), "--output", str(tmp_path / "out")]
    argv += ["--window", "0"]
    assert main(argv) == 2
    assert "--window" in error_line(capsys)
    assert not (tmp_path / "out").exists()


# One value out of range for every numeric field (and the enumerations), as typed on the command line.
BAD = {
    "img_size": "100000", "window": "0", "drop_path": "2", "pretrained_windows": "-1", "sequential_attention": "-1",
    "val_fraction": "1", "train_fraction": "0", "workers": "-1", "color_jitter": "-0.1", "reprob": "1.5",
    "crop_scale": "0", "hflip": "2", "mixup": "-1", "cutmix": "-1", "label_smoothing": "5", "crop_pct": "0",
    "mask_ratio": "1", "mask_patch": "0", "norm_target_window": "4", "epochs": "0", "warmup_epochs": "-1",
    "batch_size": "0", "accum_steps": "0", "lr": "0", "warmup_lr": "-1", "min_lr": "-1", "weight_decay": "-1",
    "betas": "0.9", "eps": "0", "clip_grad": "0", "layer_decay": "1.5", "milestones": "-1", "gamma": "0",
    "ema": "1", "seed": "-1", "threads": "-4", "eval_every": "0", "save_every_steps": "-1", "log_every": "0",
    "max_steps": "0", "amp": "fp8", "scheduler": "linear", "sharding": "zero3", "device": "gpu",
    "auto_augment": "bogus", "output": "", "task": "pose", "eval_mode": "tile", "frozen_stages": "-2",
    "eval_window": "0", "aux_weight": "-1", "short_sides": "0", "max_side": "0", "test_short_side": "0",
    "crop_size": "0", "base_size": "0", "ratio_range": "0", "eval_scales": "0", "fpn_channels": "0",
    "box_samples": "0", "decoder_channels": "1",
    "extra_norm_period": "-1", "attn_type": "flash", "norm_placement": "post_ln", "position_bias": "rope",
    "merge_norm": "mid", "temporal_window": "0", "frames": "0", "frame_interval": "0", "short_side": "0",
    "test_clips": "0", "test_crops": "2",
}
NOT_NUMERIC = {"command", "task", "eval_mode", "eval_flip", "model", "checkpoint", "data", "val", "auto_augment",
               "device", "output", "resume", "deepspeed_config", "grad_checkpointing", "scale_lr", "compile",
               "tensorboard", "progress", "amp", "scheduler", "sharding", "norm_placement", "attn_type",
               "position_bias", "merge_norm", "video_root"}


def test_every_numeric_field_has_a_range():
    for f in dataclasses.fields(TrainConfig):
        if f.name not in NOT_NUMERIC:
            assert {"ge", "gt", "le", "lt"} & set(f.metadata), f"{f.name} has no valid range"
            assert f.name in BAD, f"{f.name}: add a bad value to BAD"


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_training_flag_is_refused_at_start(name, data, tmp_path, capsys):
    flag = "--" + name.replace("_", "-")
    assert main(["train", *FAST, "--data", str(data), "--output", str(tmp_path / "run"), f"{flag}={BAD[name]}"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"swinv2: error: {flag} "), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, rule", [
    ("eval_every", "0", "eval_every must be >= 1, got 0"),
    ("window", "0", "window must be in [1, 8192], got 0"),
    ("lr", "abc", "lr must be a number, got 'abc'"),
    ("auto_augment", "bogus", "auto_augment must be a policy timm knows"),
])
def test_bad_recipe_value_names_the_recipe(field, value, rule, data, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"model: {DEBUG}\n{field}: {value}\n")
    assert main(["train", "--config", str(recipe), *FAST, "--data", str(data), "--output", str(tmp_path / "run")]) == 2
    assert error_line(capsys).startswith(f"swinv2: error: recipe {recipe}: {rule}")
    assert not (tmp_path / "run").exists()
    if field != "auto_augment":  # timm's parser runs when a run starts
        with pytest.raises(ValueError, match=re.escape(f"recipe {recipe}: {rule}")):
            TrainConfig.from_file(recipe)


def test_a_flag_over_a_recipe_is_named_as_the_flag(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval_every: 0\nlog_every: 5\n")
    assert TrainConfig.from_file(recipe, eval_every=2).eval_every == 2  # the flag replaces the bad value
    with pytest.raises(ValueError, match=r"^--log-every must be >= 1, got 0$"):
        TrainConfig.from_file(recipe, eval_every=2, log_every=0)


def test_recipe_numbers_as_yaml_spells_them(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 5e-4\nepochs: 30.0\n")  # YAML reads 5e-4 as a string
    cfg = TrainConfig.from_file(recipe)
    assert cfg.lr == 5e-4 and cfg.epochs == 30 and isinstance(cfg.epochs, int)


@pytest.mark.parametrize("spec", ["bogus", "rand-m9-bogus", "rand-m9-mstd", "rand-mX", "rand-m9-n-3", "augmix-zz"])
def test_bad_augmentation_spec(spec, data, tmp_path, capsys):
    assert main(["train", *FAST, "--data", str(data), "--output", str(tmp_path / "run"), "--auto-augment", spec]) == 2
    assert error_line(capsys).startswith("swinv2: error: --auto-augment must ")
    assert not (tmp_path / "run").exists()


# -- devices and precision ----------------------------------------------------------------------


def test_device_checks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") == torch.device("cpu") and check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA device"):
        check_device("cuda")
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        check_device("gpu")
    with pytest.raises(ValueError, match="'meta' is not a device"):
        check_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        check_device("cuda:2")


@pytest.mark.parametrize("command", [
    ["train", *FAST, "--data", "DATA", "--output", "OUT"], ["eval", "--model", DEBUG],
    ["predict", "DATA", "--model", DEBUG],
    ["bench", "--model", DEBUG, "--out", "OUT"],
])
def test_device_without_a_gpu_is_refused_at_start(command, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [str(data) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main([*argv, "--device", "cuda"]) == 2
    assert error_line(capsys).startswith("swinv2: error: --device cuda: this machine has no CUDA device")
    assert not (tmp_path / "out").exists()


def test_fp16_on_a_cpu_is_refused_at_start(data, tmp_path, capsys):
    assert main(["train", *FAST, "--data", str(data), "--output", str(tmp_path / "run"), "--device", "cpu",
                 "--amp", "fp16"]) == 2
    assert error_line(capsys) == ("swinv2: error: --amp must be bf16 or none on cpu (fp16 needs a CUDA GPU for its "
                                  "loss scaling), got 'fp16'")
    assert not (tmp_path / "run").exists()


def test_usage_errors_are_one_line(capsys):
    assert main(["forward", "--batch-size", "0"]) == 2
    assert "argument --batch-size: expected an integer >= 1, got '0'" in error_line(capsys)
    assert main(["train", "--eval-every", "abc"]) == 2
    assert "argument --eval-every" in error_line(capsys)
    assert main(["nonsense"]) == 2
    assert "invalid choice" in error_line(capsys)


# -- outputs that cannot be written ---------------------------------------------------------------


def _must_not_load(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(P, "load_for_inference", boom)


def test_predict_output_under_a_file(data, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    _must_not_load(monkeypatch)
    assert main(["predict", str(data), "--model", DEBUG, "--output", str(tmp_path / "file" / "p.csv")]) == 2
    assert error_line(capsys) == (f"swinv2: error: --output {tmp_path / 'file' / 'p.csv'}: cannot create it, "
                                  f"{tmp_path / 'file'} is a file, not a folder")


def test_predict_output_read_only(data, read_only, monkeypatch, capsys):
    _must_not_load(monkeypatch)
    out = read_only / "sub" / "p.csv"
    assert main(["predict", str(data), "--model", DEBUG, "--output", str(out)]) == 2
    assert error_line(capsys) == f"swinv2: error: --output {out}: cannot write in {read_only} (read-only file system)"


def test_export_output_read_only(read_only, monkeypatch, capsys):
    _must_not_load(monkeypatch)
    out = read_only / "m.pt"
    assert main(["export", "--model", DEBUG, "--format", "torchscript", "--output", str(out)]) == 2
    assert error_line(capsys) == f"swinv2: error: --output {out}: cannot write in {read_only} (read-only file system)"


def test_export_write_failure_is_not_a_conversion_failure(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from swinv2 import export as E

    def full_disk(model, args, f, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(f))

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    with pytest.raises(WriteError, match=f"^no space left on device writing {tmp_path / 'm.onnx'}$"):
        E.export(swinv2.create_model(DEBUG), tmp_path / "m.onnx", "onnx")
    assert os.listdir(tmp_path) == []


def test_train_output_read_only(data, read_only, capsys):
    assert main(["train", *FAST, "--data", str(data), "--output", str(read_only / "run")]) == 2
    assert error_line(capsys).endswith(f"cannot write in {read_only} (read-only file system)")


def test_convert_output_read_only(weights, read_only, tmp_path, capsys):
    out = read_only / "t.pth"
    assert main(["convert", str(weights), str(out), "--to", "timm"]) == 2
    assert error_line(capsys) == f"swinv2: error: output {out}: cannot write in {read_only} (read-only file system)"
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")  # the output is checked before reading
    assert main(["convert", str(tmp_path / "garbage.pth"), str(out), "--to", "timm"]) == 2
    assert "read-only file system" in error_line(capsys)


def test_other_os_errors_are_one_line_but_bugs_are_not(data, weights, tmp_path, monkeypatch, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    assert main(["predict", str(data), "--checkpoint", str(weights), "--labels", str(labels), "--quiet"]) == 2
    assert error_line(capsys) == f"swinv2: error: {labels}: Is a directory"

    def bug(args):
        raise TypeError("a programming error")

    monkeypatch.setattr(cli.models, "cmd_list", bug)
    with pytest.raises(TypeError):
        main(["list"])


# -- convert: existing outputs, --from ---------------------------------------------------------------


def test_convert_does_not_overwrite_without_force(weights, tmp_path, capsys):
    out = tmp_path / "t.pth"
    out.write_bytes(b"precious")
    assert main(["convert", str(weights), str(out), "--to", "timm"]) == 2
    assert error_line(capsys) == f"swinv2: error: {out} exists: add --force to replace it (or choose another output)"
    assert out.read_bytes() == b"precious"
    assert main(["convert", str(weights), str(out), "--to", "timm", "--force"]) == 0
    assert "head.fc.weight" in torch.load(out, weights_only=True)

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["convert", str(weights), str(folder), "--to", "hf"]) == 2
    assert "exists: add --force" in error_line(capsys)
    assert os.listdir(folder) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", str(weights), str(empty), "--to", "hf"]) == 0


def test_convert_full_disk_leaves_the_old_file(weights, tmp_path, monkeypatch, capsys):
    out = tmp_path / "t.pth"
    out.write_bytes(b"precious")
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data[:100]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def small_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if "w" in mode and os.path.dirname(os.fspath(file)) == str(tmp_path) else f

    monkeypatch.setattr(builtins, "open", small_disk)
    assert main(["convert", str(weights), str(out), "--to", "timm", "--force"]) == 2
    assert error_line(capsys) == f"swinv2: error: no space left on device writing {out}"
    assert out.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["t.pth"]  # no temporary left


def test_convert_from_is_checked(weights, tmp_path, capsys):
    assert main(["convert", str(weights), str(tmp_path / "o.pth"), "--to", "timm", "--from", "bogus"]) == 2
    assert "argument --from: invalid choice: 'bogus'" in error_line(capsys)
    assert main(["convert", str(weights), str(tmp_path / "o.pth"), "--to", "timm", "--from", "timm"]) == 2
    assert error_line(capsys) == (f"swinv2: error: --from timm does not match {weights}: it is a swinv2 file "
                                  "(swinv2 layout)")
    assert main(["convert", str(weights), str(tmp_path / "t.pth"), "--to", "timm"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "t.pth"), str(tmp_path / "o.pth"), "--to", "official",
                 "--from", "hf"]) == 2
    assert error_line(capsys) == (f"swinv2: error: --from hf does not match {tmp_path / 't.pth'}: its keys are in "
                                  "the timm layout (leave out --from to use it)")
    assert main(["convert", str(tmp_path / "t.pth"), str(tmp_path / "o.pth"), "--to", "official",
                 "--from", "timm"]) == 0
