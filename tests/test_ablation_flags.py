"""The paper's ablation switches as run flags: they parse, reach the network, are saved with
the run and rebuild it from every checkpoint; V1 bias tables load at a larger window resized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_

import swinv2
from swinv2.cli import build_parser, main
from swinv2.cli.training import config_from_args
from swinv2.layers import ATTN_TYPES, NORM_PLACEMENTS, POSITION_BIASES
from swinv2.model import MERGE_NORMS
from swinv2.tasks import supervised
from swinv2.train import config as C
from swinv2.train.config import TrainConfig

V1 = ["--norm-placement", "pre", "--attn-type", "dot", "--position-bias", "table", "--merge-norm", "pre"]
# Tiny and deterministic: 32 px digits, fp32, no worker processes, a few updates.
QUICK = ["--model", "swinv2_debug", "--img-size", "32", "--batch-size", "16", "--epochs", "1", "--train-fraction",
         "0.1", "--workers", "0", "--amp", "none", "--threads", "1", "--no-progress", "--no-tensorboard"]


def _last_val(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "val"][-1]


def _eval(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", "--json", "--workers", "0", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_choices_match_the_model():
    """The config's lists (kept torch-free) are the model's own."""
    assert (C.NORM_PLACEMENTS, C.ATTN_TYPES, C.POSITION_BIASES, C.MERGE_NORMS) == (
        NORM_PLACEMENTS, ATTN_TYPES, POSITION_BIASES, MERGE_NORMS)


def test_flags_reach_the_network(one_thread):
    args = build_parser().parse_args(["train", *V1, "--extra-norm-period", "1", "--output", "unused"])
    cfg = config_from_args(args, task="train")
    assert (cfg.norm_placement, cfg.attn_type, cfg.position_bias, cfg.extra_norm_period, cfg.merge_norm) == (
        "pre", "dot", "table", 1, "pre")
    model, _ = supervised.build_classifier(cfg, 10)
    blocks = list(model.iter_blocks())
    assert {b.norm_placement for b in blocks} == {"pre"}
    assert all(b.attn.logit_scale is None and b.attn.relative_position_bias_table is not None
               and getattr(b.attn, "cpb_mlp", None) is None for b in blocks)
    assert all(b.norm3 is not None for b in blocks)  # an extra norm after every block
    merge = model.layers[0].downsample
    assert merge.norm.normalized_shape == (4 * model.embed_dim,)  # V1 normalises the 4C before reducing
    # unset flags keep the variant's V2 design
    v2, _ = supervised.build_classifier(TrainConfig(), 10)
    b = next(v2.iter_blocks())
    assert b.norm_placement == "res_post" and b.attn.logit_scale is not None and b.norm3 is None
    assert v2.layers[0].downsample.norm.normalized_shape == (2 * v2.embed_dim,)


def test_recipe_fields_and_bad_values(tmp_path, capsys):
    recipe = tmp_path / "v1.yaml"
    recipe.write_text("norm_placement: sandwich\nattn_type: dot\nposition_bias: linear_cpb\nextra_norm_period: 2\n")
    cfg = TrainConfig.from_flags({"attn_type": "cosine"}, recipe=recipe, command="train")
    assert (cfg.norm_placement, cfg.attn_type, cfg.position_bias, cfg.extra_norm_period) == (
        "sandwich", "cosine", "linear_cpb", 2)
    assert TrainConfig.from_dict(cfg.to_dict()).position_bias == "linear_cpb"  # what the run folder keeps
    bad = tmp_path / "bad.yaml"
    bad.write_text("position_bias: rope\n")
    with pytest.raises(ValueError, match=r"^recipe .*bad.yaml: position_bias must be one of log_cpb, linear_cpb"):
        TrainConfig.from_flags({}, recipe=bad, command="train")
    for flags, named in ((["--attn-type", "flash"], "--attn-type must be one of cosine, dot, got 'flash'"),
                         (["--norm-placement", "post_ln"], "--norm-placement must be one of"),
                         (["--extra-norm-period", "-1"], "--extra-norm-period must be >= 0, got -1"),
                         (["--merge-norm", "mid"], "--merge-norm must be one of post, pre")):
        capsys.readouterr()
        assert main(["train", *flags, "--output", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "never").exists()


def test_v1_run_is_rebuilt_from_its_files(tmp_path, capsys, one_thread):
    """A pre-norm / dot / table / pre-merge run: eval of each saved file equals the run's own
    validation; a larger size and window give another, finite result; resume and fine-tune
    keep the switches; a fine-tune asking other switches is one line."""
    run = tmp_path / "v1"
    assert main(["train", *QUICK, *V1, "--max-steps", "3", "--output", str(run)]) == 0
    val = _last_val(run)
    for name in ("model-best.safetensors", "model-last.safetensors", "checkpoint-last.pt"):
        got = _eval(capsys, "--checkpoint", str(run / name))
        assert got["top1"] == pytest.approx(val["top1"]) and got["loss"] == pytest.approx(val["loss"], rel=1e-5)
    big = _eval(capsys, "--checkpoint", str(run / "model-best.safetensors"), "--img-size", "64", "--window", "8")
    assert big["window"] == 8 and big["img_size"] == 64
    assert torch.isfinite(torch.tensor(big["loss"])) and big["loss"] != pytest.approx(val["loss"], rel=1e-4)

    assert main(["train", *QUICK, "--max-steps", "4", "--resume", "--output", str(run)]) == 0
    resumed = swinv2.create_model(pretrained=str(run / "model-last.safetensors"))
    assert {k: resumed.config[k] for k in ("norm_placement", "attn_type", "position_bias", "merge_norm")} == dict(
        norm_placement="pre", attn_type="dot", position_bias="table", merge_norm="pre")

    capsys.readouterr()
    ft = TrainConfig(command="finetune", checkpoint=str(run / "checkpoint-last.pt"), img_size=64, window=8)
    model, report = supervised.build_classifier(ft, 10)
    assert "architecture switches of the checkpoint: norm_placement=pre, attn_type=dot" in report
    assert "resized 8 V1 position-bias tables" in report
    assert next(model.iter_blocks()).norm_placement == "pre" and model.layers[0].downsample.norm_first
    assert main(["finetune", "--checkpoint", str(run / "checkpoint-last.pt"), "--norm-placement", "res_post",
                 "--output", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err.strip()
    assert "norm_placement 'pre', not the --norm-placement res_post asked" in err and len(err.splitlines()) == 1


def test_table_checkpoint_loads_resized_at_a_larger_window(tmp_path, one_thread):
    """A V1 table saved at window 4 is resized bicubically on load (checked against a direct
    interpolation) and the model equals one resized in place; a CPB checkpoint needs nothing."""
    for bias in ("table", "log_cpb"):
        src = randomize_(swinv2.create_model("swinv2_debug", img_size=32, position_bias=bias, attn_type="dot"))
        path = tmp_path / f"{bias}.safetensors"
        swinv2.save_pretrained(src, path)
        loaded = swinv2.create_model(pretrained=str(path), window_size=8).eval()
        src.set_input_size(window_size=8)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(loaded(x), src.eval()(x))
    table = swinv2.create_model("swinv2_debug", img_size=32, position_bias="table")
    randomize_(table)
    path = tmp_path / "t.safetensors"
    swinv2.save_pretrained(table, path)
    saved = table.layers[0].blocks[0].attn.relative_position_bias_table.detach()  # (7*7, heads)
    loaded = swinv2.create_model(pretrained=str(path), window_size=8)
    grid = saved.T.reshape(1, -1, 7, 7)
    expect = F.interpolate(grid, size=(15, 15), mode="bicubic", align_corners=False).reshape(grid.shape[1], -1).T
    torch.testing.assert_close(loaded.layers[0].blocks[0].attn.relative_position_bias_table.detach(), expect)


def test_predict_takes_a_window_for_classification(tmp_path, capsys, one_thread):
    from PIL import Image

    model = randomize_(swinv2.create_model("swinv2_debug", img_size=32, position_bias="table"))
    path = tmp_path / "m.safetensors"
    swinv2.save_pretrained(model, path)
    image = tmp_path / "x.png"
    Image.fromarray((torch.rand(48, 48, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy()).save(
        image)
    probs = {}
    for window in (None, 8):
        capsys.readouterr()
        extra = ["--window", str(window)] if window else []
        assert main(["predict", str(image), "--checkpoint", str(path), "--img-size", "64", "--format", "json",
                     "--quiet", "--topk", "10", *extra]) == 0
        out = capsys.readouterr()
        assert f"window {window or 4};" in out.err
        rows = json.loads(out.out)
        probs[window] = {p["index"]: p["prob"] for p in rows[0]["topk"]}
    # the same image and weights through the library, with the window set in place
    loaded = swinv2.predict.load_for_inference(checkpoint=str(path))
    loaded.preprocess.img_size = (64, 64)
    loaded.model.set_input_size(window_size=8)
    x = loaded.preprocess.transform()(Image.open(image).convert("RGB"))[None]
    expect = loaded.model.eval()(x).softmax(-1)[0]
    got = torch.tensor([probs[8][i] for i in range(10)])
    torch.testing.assert_close(got, expect.detach(), atol=1e-4, rtol=0)
    assert any(abs(probs[8][k] - probs[None][k]) > 1e-4 for k in probs[8])
