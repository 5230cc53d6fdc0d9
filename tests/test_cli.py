"""The swinv2 command line."""

import json
import subprocess
import sys

from swinv2.cli import main
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
