"""load_pretrained: formats, reports, and clear errors that leave the model untouched."""

import pytest
import torch
from helpers import randomize_

import swinv2
from swinv2.loading import CheckpointError, StateDictMismatchError


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
