"""scripts/gpu_check.sh keeps working on machines without CUDA (it runs small on the CPU)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(SCRIPT.with_suffix(".sh")), "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["failed"] == []
    assert result["official"] and all(v < 1e-4 for v in result["official"].values())
    assert result["parity"]["float32 logits"] < 1e-4
    assert any(k.startswith("bfloat16 logits") for k in result["parity"])
    assert result["training"]["bfloat16: last loss / first loss"] < 1


def test_gpu_check_fails_when_parity_breaks(monkeypatch, capsys):
    """A wrong shifted-window mask value breaks the official outputs: the check must say so."""
    import swinv2.windows

    gpu_check = _module()
    monkeypatch.setattr(swinv2.windows, "SHIFT_MASK_VALUE", 0.0)
    checks = gpu_check.Checks()
    gpu_check.check_official(gpu_check.torch.device("cpu"), checks)
    assert checks.failed and "FAILED" in capsys.readouterr().out


def test_gpu_check_refuses_cuda_without_a_gpu(capsys):
    gpu_check = _module()
    if gpu_check.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
