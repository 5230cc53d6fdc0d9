"""swinv2.export: every format written, loaded back and compared with the eager model."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_

import swinv2
from swinv2 import export as E
from swinv2.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def model():
    # randomize_: a fresh SwinV2 has zeroed residual-branch norms, so every block would be an
    # identity and any export would "match"; random weights make every path count.
    return randomize_(swinv2.create_model("swinv2_debug"), seed=4).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """Each format exported once (lazily) and shared by the tests that read the file."""
    done = {}

    def get(fmt):
        if fmt not in done:
            path = tmp_path_factory.mktemp(fmt) / f"m{E.SUFFIXES[fmt]}"
            done[fmt] = path, E.export(model, path, fmt, dynamic_batch=True)
        return done[fmt]

    return get


@pytest.mark.parametrize("fmt", E.FORMATS)
def test_every_format_matches_eager_at_two_batch_sizes(model, exported, fmt):
    path, report = exported(fmt)
    assert report.ok and path.is_file()
    assert [(c.batch, c.size) for c in report.checks] == [(2, (64, 64)), (5, (64, 64))]
    assert all(c.error is None and c.rel < 1e-4 and c.max_abs < 1e-3 for c in report.checks)
    assert report.max_rel == max(c.rel for c in report.checks)
    text = "\n".join(report.lines())
    assert "batch 5, 64x64" in text and "dynamic batch: yes" in text
    if fmt == "onnx":
        assert "dynamo" in report.exporter and report.opset == E.DEFAULT_OPSET
    if fmt != "onnx":  # ONNX freezes the weights anyway; these formats expose them as parameters
        _check_position_bias_mlp_is_live(model, path, fmt)
    # Loaded again independently: a batch size never seen by the export works too.
    run = E._LOADERS[fmt](path)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(run(x)), model(x), rtol=1e-4, atol=1e-4)


def _check_position_bias_mlp_is_live(model, path, fmt):
    # The eager model caches the position bias while no gradient is needed (export() runs it
    # under no_grad first); had the tracer picked up that cache, the graph would hold a
    # constant and ignore the CPB weights, which these formats expose as parameters.
    module = torch.export.load(path).module() if fmt == "exported-program" else torch.jit.load(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = module(x)
        for name, p in module.named_parameters():
            if "cpb_mlp.2" in name:
                p.mul_(1.5)
        after = module(x)
        changed = swinv2.create_model("swinv2_debug").eval()
        changed.load_state_dict(model.state_dict())
        for name, p in changed.named_parameters():
            if "cpb_mlp.2" in name:
                p.mul_(1.5)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, changed(x), rtol=1e-4, atol=1e-5)


def test_perturbed_output_fails_the_check_and_removes_the_file(model, tmp_path, monkeypatch):
    load = E._LOADERS["torchscript"]

    def perturbed(path):
        run = load(path)
        return lambda x: run(x) * (1 + 1e-3)  # 1e-3 relative: above the 1e-4 tolerance

    monkeypatch.setitem(E._LOADERS, "torchscript", perturbed)
    path = tmp_path / "m.pt"
    with pytest.raises(E.ExportVerificationError, match="does not reproduce") as info:
        E.export(model, path, "torchscript")
    assert not path.exists()
    assert not info.value.report.ok and 5e-4 < info.value.report.max_rel < 2e-3
    report = E.export(model, path, "torchscript", strict=False)  # the report, and the file kept
    assert not report.ok and path.exists() and "FAILED" in "\n".join(report.lines())


def test_a_failed_check_leaves_an_earlier_file_as_it_was(model, tmp_path, monkeypatch):
    # Written under a temporary name and renamed only once checked: a bad export replaces nothing.
    path = tmp_path / "m.pt"
    path.write_bytes(b"an earlier export")
    monkeypatch.setitem(E._LOADERS, "torchscript", lambda p: (lambda x: torch.zeros(x.shape[0], 10)))
    with pytest.raises(E.ExportVerificationError, match="nothing was written"):
        E.export(model, path, "torchscript", dynamic_batch=False)
    assert path.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_torchscript_size_specialisation_is_detected_not_claimed(model, tmp_path):
    # Tracing bakes the windows, padding and masks of 64x64 into the graph: at 192x192 the file
    # either fails or computes something else. Either way dynamic size must not be claimed.
    report = E.export(model, tmp_path / "m.pt", "torchscript", dynamic_size=True)
    assert report.ok and not report.dynamic_size
    assert any("dynamic size: not supported" in n for n in report.notes)
    assert E.second_size(model, (64, 64)) == (192, 192)


def test_static_batch(model, tmp_path):
    report = E.export(model, tmp_path / "m.pt", "torchscript", example=torch.randn(1, 3, 64, 64),
                      dynamic_batch=False)
    assert report.ok and [(c.batch, c.size) for c in report.checks] == [(1, (64, 64))]


def test_bad_arguments_are_clear_errors(model, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        E.export(model, tmp_path / "m.x", "tflite")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        E.export(model, tmp_path / "m.pt", "torchscript", example=torch.randn(2, 3, 30, 30))


def test_cli(tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["export", "--model", "swinv2_debug", "--format", "torchscript", "--output", str(out),
                 "--batch-size", "3", "--img-size", "96"]) == 0
    text = capsys.readouterr().out
    assert "batch 3, 96x96" in text and "batch 6, 96x96" in text and out.is_file()
    assert main(["export", "--checkpoint", str(tmp_path / "missing.safetensors"), "--format", "onnx",
                 "--output", str(tmp_path / "m.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["export", "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 2


def test_cli_exports_a_saved_checkpoint(model, tmp_path, capsys):
    ckpt = swinv2.save_pretrained(model, tmp_path / "w.safetensors")
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript",
                 "--output", str(tmp_path / "m.pt"), "--no-dynamic-batch"]) == 0
    text = capsys.readouterr().out
    assert "dynamic batch: no" in text and "batch 5" not in text


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["exported-program", "onnx"])
def test_dynamic_size_is_reported_as_not_supported(model, tmp_path, fmt):
    # The stages key their mask caches on the (symbolic) map size and compare it with the
    # window: torch.export refuses, and the TorchScript-based ONNX fallback specialises.
    report = E.export(model, tmp_path / f"m{E.SUFFIXES[fmt]}", fmt, dynamic_size=True)
    assert report.ok and not report.dynamic_size
    assert any("dynamic size: not supported" in n for n in report.notes)
