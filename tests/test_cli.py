"""The swinv2 command line."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from swinv2.cli import main
from swinv2.train.config import SECTIONS, TrainConfig, flag
from swinv2.variants import VARIANTS


def test_list_table(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in VARIANTS:
        assert name in out
    tiny = next(line for line in out.splitlines() if line.startswith("swinv2_tiny_window8_256 "))
    assert "28.35M" in tiny and "5.93" in tiny
    assert "3.00B" in out and "12,12,12,6" in out


def test_list_json_and_filter(capsys):
    assert main(["list", "*large*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [n for n in VARIANTS if "large" in n]
    assert main(["list", "nothing*"]) == 1


def test_forward_any_size(capsys):
    assert main(["forward", "--model", "swinv2_debug", "--img-size", "36x52", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "logits (2, 10), finite: True" in out
    assert "stage 0: map 9x13, window 4x4, shift 2,2, padded to 12x16" in out


def test_forward_bad_size_is_a_clear_error(capsys):
    assert main(["forward", "--model", "swinv2_debug", "--img-size", "30"]) == 2
    assert "multiple of the patch size" in capsys.readouterr().err


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "swinv2.cli", "list", "swinv2_debug"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "swinv2_debug" in proc.stdout


def test_convert_timm_checkpoint_both_ways(tmp_path, capsys):
    import torch
    from helpers import randomize_, rel_err

    import swinv2

    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
    peer = randomize_(timm_v2.SwinTransformerV2(img_size=64, window_size=4, embed_dim=32, depths=(2, 2, 2, 2),
                                                num_heads=(2, 4, 8, 16), num_classes=10), 3).eval()
    torch.save(peer.state_dict(), tmp_path / "timm.pth")
    x = torch.randn(2, 3, 64, 64)

    assert main(["convert", str(tmp_path / "timm.pth"), str(tmp_path / "own.safetensors"),
                 "--to", "swinv2", "--model", "swinv2_debug"]) == 0
    assert "timm layout" in capsys.readouterr().out
    ours = swinv2.create_model(pretrained=tmp_path / "own.safetensors").eval()
    with torch.no_grad():
        assert rel_err(ours(x), peer(x)) < 5e-5

    assert main(["convert", str(tmp_path / "own.safetensors"), str(tmp_path / "back.pth"), "--to", "timm"]) == 0
    again = timm_v2.SwinTransformerV2(img_size=64, window_size=4, embed_dim=32, depths=(2, 2, 2, 2),
                                      num_heads=(2, 4, 8, 16), num_classes=10).eval()
    again.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True))
    with torch.no_grad():
        assert torch.equal(again(x), peer(x))


def test_convert_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert main(["convert", str(tmp_path / "bad.pth"), str(tmp_path / "o.pth"), "--to", "timm"]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.pth"), "--to", "timm"]) == 2


def test_pretrained_table(capsys):
    assert main(["pretrained", "*384*"]) == 0
    out = capsys.readouterr().out
    assert "swinv2_large_window12to24_192to384.ms_in22k_ft_in1k" in out and "87.6" in out
    assert "resize 384" in out and "swinv2_tiny" not in out


def test_train_help_lists_the_flags_by_section(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    starts = [out.index(f"\n{section}:\n") for section in SECTIONS]
    assert starts == sorted(starts), "sections out of order"
    ends = starts[1:] + [len(out)]
    for f in dataclasses.fields(TrainConfig):
        if f.name == "command":  # fixed by the subcommand
            continue
        i = SECTIONS.index(f.metadata["section"])
        at = re.search(rf"\n  {re.escape(flag(f.name))}[ ,\n]", out)
        assert at and starts[i] < at.start() < ends[i], f"{flag(f.name)} is not listed under {SECTIONS[i]}"
