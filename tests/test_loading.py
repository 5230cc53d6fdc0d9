"""load_pretrained: formats, reports, and clear errors that leave the model untouched."""

import os

import pytest
import torch
from helpers import randomize_

import swinv2
from swinv2.files import CheckpointError
from swinv2.loading import StateDictMismatchError
from swinv2.train.checkpoint import load_checkpoint


def _pair():
    src = randomize_(swinv2.create_model("swinv2_debug"), 1)
    dst = swinv2.create_model("swinv2_debug")
    return src, dst


@pytest.mark.parametrize("fmt", ["pth", "pth_wrapped", "safetensors"])
def test_round_trip_through_files(tmp_path, fmt):
    src, dst = _pair()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(src.state_dict(), path)
    else:
        torch.save({"model": src.state_dict(), "epoch": 3} if fmt == "pth_wrapped" else src.state_dict(), path)
    report = swinv2.load_pretrained(dst, path)
    assert report.ok and len(report.loaded) == len(src.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), dst.eval()(x))


def test_mismatched_state_dict_names_every_key_and_changes_nothing():
    src, dst = _pair()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = src.state_dict()
    sd.pop("layers.1.blocks.0.attn.q_bias")
    sd["layers.9.blocks.0.extra.weight"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(5, 256)
    with pytest.raises(StateDictMismatchError) as err:
        swinv2.load_pretrained(dst, sd)
    msg = str(err.value)
    assert "layers.1.blocks.0.attn.q_bias" in msg and "missing" in msg
    assert "layers.9.blocks.0.extra.weight" in msg and "not in the model" in msg
    assert "head.weight: (5, 256) vs (10, 256)" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_non_strict_loads_what_fits():
    src, dst = _pair()
    sd = src.state_dict()
    sd["head.weight"] = torch.zeros(5, 256)
    report = swinv2.load_pretrained(dst, sd, strict=False)
    assert [k for k, *_ in report.mismatched] == ["head.weight"]
    assert torch.equal(dst.layers[0].blocks[0].attn.qkv.weight, src.layers[0].blocks[0].attn.qkv.weight)
    assert not torch.equal(dst.head.weight[:5], torch.zeros(5, 256))
    assert "head.weight" in str(report)


def test_old_rpe_mlp_name_is_renamed():
    src, dst = _pair()
    sd = {k.replace(".cpb_mlp.", ".rpe_mlp."): v for k, v in src.state_dict().items()}
    assert swinv2.load_pretrained(dst, sd).ok
    assert torch.equal(dst.layers[2].blocks[1].attn.cpb_mlp[2].weight, src.layers[2].blocks[1].attn.cpb_mlp[2].weight)


@pytest.mark.parametrize(
    "content, name",
    [
        (b"", "empty.pth"),
        (b"this is not a checkpoint at all", "garbage.pth"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": broken", "bad.safetensors"),
    ],
)
def test_corrupt_files_get_clear_errors(tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=name):
        swinv2.load_pretrained(swinv2.create_model("swinv2_debug"), path)


def test_truncated_checkpoint(tmp_path):
    src, dst = _pair()
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="w.pth"):
        swinv2.load_pretrained(dst, path)


def test_missing_file_and_non_tensor_content(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        swinv2.load_pretrained(swinv2.create_model("swinv2_debug"), tmp_path / "nope.pth")
    torch.save({"model": {"a": 1}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="not tensors"):
        swinv2.load_pretrained(swinv2.create_model("swinv2_debug"), tmp_path / "odd.pth")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth"):
        swinv2.load_pretrained(swinv2.create_model("swinv2_debug"), tmp_path / "evil.pth")


def test_create_model_pretrained_path(tmp_path):
    src, _ = _pair()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = swinv2.create_model("swinv2_debug", pretrained=tmp_path / "w.pth")
    assert torch.equal(model.norm.weight, src.norm.weight)
    with pytest.raises(ValueError, match="checkpoint path"):
        swinv2.create_model("swinv2_debug", pretrained=True)


# -- files that are not checkpoints: one line each, wherever a file is read --------------------


def _zip_without_pickle(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "not weights")


def _torch_file(obj):
    def write(path):
        torch.save(obj, path)

    return write


def _safetensors(tensors, cut=None):
    def write(path):
        from safetensors.torch import save_file

        save_file(tensors, path)
        if cut is not None:
            data = path.read_bytes()
            path.write_bytes(data[: cut(len(data))])

    return write


def _half_of_a_torch_file(path):
    torch.save({"w": torch.randn(4000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


UNREADABLE = {  # name -> (writer, words of the one-line error)
    "random.pth": (lambda p: p.write_bytes(bytes(range(256)) * 16), "is not a readable checkpoint (neither safetensors "
                   "nor a PyTorch file)"),
    "random.safetensors": (lambda p: p.write_bytes(b"\x93NUMPY" + bytes(range(200))), "is not a readable checkpoint"),
    "empty.pth": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "half.pth": (_half_of_a_torch_file, "is a truncated or damaged PyTorch file"),
    "archive.pth": (_zip_without_pickle, "is a zip archive but not a PyTorch file"),
    "cut_header.safetensors": (_safetensors({"w": torch.ones(50)}, cut=lambda n: 30), "is a truncated safetensors"),
    "cut_data.safetensors": (_safetensors({"w": torch.ones(50)}, cut=lambda n: n - 40),
                             "is a truncated or damaged safetensors file"),
    "no_tensors.pth": (_torch_file({}), "holds no tensors"),
    "no_tensors.safetensors": (_safetensors({}), "holds no tensors"),
    "a_number.pth": (_torch_file(5), "holds no state dict (got int"),
}
READERS = {
    "load_pretrained": lambda p: swinv2.load_pretrained(swinv2.create_model("swinv2_debug"), p),
    "create_model": lambda p: swinv2.create_model("swinv2_debug", pretrained=p),
    "create_model_unnamed": lambda p: swinv2.create_model(pretrained=p),
    "load_model": lambda p: swinv2.load_model(p),
    "read_weights": lambda p: swinv2.read_weights(p),
    "training_checkpoint": lambda p: load_checkpoint(p),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_files_get_one_line_each(tmp_path, name, reader):
    write, words = UNREADABLE[name]
    path = tmp_path / name
    write(path)
    if reader == "training_checkpoint" and ("no tensors" in words or "no state dict" in words):
        words = "is not a swinv2 training checkpoint"  # readable, but not what training writes
    with pytest.raises(CheckpointError) as err:
        READERS[reader](path)
    message = str(err.value)
    assert str(path) in message and words in message, message
    assert len(message.splitlines()) == 1 and "weights_only" not in message, message


def test_unreadable_file_through_the_cli(tmp_path, capsys):
    from swinv2.cli import main

    path = tmp_path / "random.pth"
    path.write_bytes(bytes(range(256)) * 16)
    for argv in (["convert", str(path), str(tmp_path / "out.pth"), "--to", "timm"],
                 ["predict", str(path), "--checkpoint", str(path), "--model", "swinv2_debug", "--quiet"]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"swinv2: error: {path} is not a readable checkpoint (neither safetensors nor a PyTorch file)"


def test_folders_and_special_files_are_not_checkpoints(tmp_path):
    from swinv2.files import read_checkpoint

    with pytest.raises(CheckpointError, match=f"^{tmp_path} is a folder, not a checkpoint file$"):
        read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        swinv2.load_model(tmp_path)
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    with pytest.raises(CheckpointError, match="pipe.pth is not a regular file"):
        read_checkpoint(fifo)
    with pytest.raises(CheckpointError, match="pipe.pth is not a regular file"):
        swinv2.load_model(fifo)


def test_older_torch_file_format_still_loads(tmp_path):
    src, dst = _pair()
    torch.save({"model": src.state_dict()}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert swinv2.load_pretrained(dst, tmp_path / "legacy.pth").ok
    assert torch.equal(dst.head.weight, src.head.weight)


# -- NaN and infinite weights -----------------------------------------------------------------


def test_nonfinite_weights_are_reported_and_warned_once(tmp_path):
    from swinv2.loading import NonFiniteWeightsWarning

    src, dst = _pair()
    sd = src.state_dict()
    sd["layers.0.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    sd["head.bias"][3] = float("inf")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    with pytest.warns(NonFiniteWeightsWarning) as caught:
        report = swinv2.load_pretrained(dst, path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message
    assert "2 tensors hold NaN or infinite values: head.bias, layers.0.blocks.0.attn.qkv.weight" in message
    assert report.nonfinite == ["head.bias", "layers.0.blocks.0.attn.qkv.weight"]
    assert "warning: 2 tensors hold NaN or infinite values: head.bias" in str(report)
    assert torch.isnan(dst.layers[0].blocks[0].attn.qkv.weight[0, 0])  # loaded as it is, not hidden


def test_many_nonfinite_tensors_are_counted(tmp_path):
    from swinv2.loading import NonFiniteWeightsWarning

    src, dst = _pair()
    sd = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    with pytest.warns(NonFiniteWeightsWarning, match=rf"{len(sd)} tensors hold NaN .*\({len(sd) - 5} more\)"):
        report = swinv2.load_pretrained(dst, sd)
    assert len(report.nonfinite) == len(sd)
    assert len([line for line in str(report).splitlines() if "NaN" in line]) == 1


def test_finite_weights_say_nothing(recwarn):
    src, dst = _pair()
    report = swinv2.load_pretrained(dst, src.state_dict())
    assert report.nonfinite == [] and "NaN" not in str(report)
    assert not [w for w in recwarn if "NaN" in str(w.message)]


def test_nonfinite_weights_warn_through_create_model_and_convert(tmp_path):
    """A swinv2 file with NaN warns once through create_model; ``swinv2 convert`` of a file with
    NaN prints one warning line on stderr and still converts."""
    import subprocess
    import sys

    from swinv2.loading import NonFiniteWeightsWarning

    src, _ = _pair()
    with torch.no_grad():
        src.norm.weight[0] = float("nan")
    path = swinv2.save_pretrained(src, tmp_path / "nan.safetensors")
    with pytest.warns(NonFiniteWeightsWarning, match="nan.safetensors: 1 tensor holds NaN .*: norm.weight") as caught:
        swinv2.create_model(pretrained=path)
    assert len(caught) == 1

    torch.save(src.state_dict(), tmp_path / "nan.pth")
    out = subprocess.run([sys.executable, "-m", "swinv2", "convert", str(tmp_path / "nan.pth"),
                          str(tmp_path / "out.pth"), "--to", "timm"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "NaN" in line]
    assert len(lines) == 1 and "nan.pth: 1 tensor holds NaN or infinite values: norm.weight" in lines[0], out.stderr
    assert (tmp_path / "out.pth").is_file()
