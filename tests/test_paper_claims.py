"""The smallest pieces of benchmarks/paper_claims.py, so that the script cannot rot: the scenes,
the amplitude hooks (checked against a hand computation), the test-time window copies and
the report's arithmetic."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from helpers import randomize_

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_claims.py"


@pytest.fixture(scope="module")
def claims():
    spec = importlib.util.spec_from_file_location("paper_claims", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scenes_are_seeded_and_splits_differ(claims):
    a, la = claims.make_scenes(6, "train", seed=3)
    b, lb = claims.make_scenes(6, "train", seed=3)
    v, _ = claims.make_scenes(6, "val", seed=3)
    assert a.shape == (6, 1, claims.BASE, claims.BASE) and a.dtype == torch.uint8
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, v)
    assert la.min() >= 0 and la.max() <= 9
    x = claims.at_size(a, 32)
    assert x.shape == (6, 1, 32, 32)
    # area resizing of an 80 px scene to 40 px is the mean of each 2x2 block
    half = claims.at_size(a, 40)
    torch.testing.assert_close(half, (a.float() / 255).unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)).sub(0.5) / 0.25)


@pytest.mark.parametrize("placement", ["pre", "res_post"])
def test_amplitudes_match_a_hand_computation(claims, placement, one_thread):
    """With every attention projection and second MLP layer zeroed, each block adds a known
    vector to the main branch: its two biases (pre-norm), or their LayerNorms (res-post-norm).
    The hooks' mean and max |x| after block k of stage 0 must be those of x0 + k-th partial sum."""
    torch.manual_seed(0)
    model = randomize_(claims.build(32, 4, depths=(6, 2, 2, 2), norm_placement=placement, attn_type="dot"))
    with torch.no_grad():
        for block in model.iter_blocks():
            block.attn.proj.weight.zero_()
            block.mlp.fc2.weight.zero_()
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    rows = claims.block_amplitudes(model, x)
    assert len(rows) == sum(model.depths)
    assert [(r["stage"], r["block"]) for r in rows] == [(i, j) for i, d in enumerate(model.depths) for j in range(d)]
    with torch.no_grad():
        h = model.embed(x)  # (3, 8, 8, C)
        for k, block in enumerate(model.layers[0].blocks):
            a, m = block.attn.proj.bias, block.mlp.fc2.bias
            h = h + (a + m if placement == "pre" else block.norm1(a) + block.norm2(m))
            assert rows[k]["mean"] == pytest.approx(float(h.abs().mean()), rel=1e-5)
            assert rows[k]["max"] == pytest.approx(float(h.abs().max()), rel=1e-5)
    # pre-norm adds the same vector six times over: the amplitude grows with depth
    if placement == "pre":
        assert rows[5]["mean"] > rows[0]["mean"]
    # the attention of every block then outputs its projection bias, whatever the input
    share = claims.attention_share(model, x)
    assert len(share) == len(rows)
    for k, block in enumerate(model.layers[0].blocks):
        assert share[k] == pytest.approx(float(block.attn.proj.bias.abs().mean()) / rows[k]["mean"], rel=1e-5)


def test_hooks_agree_with_the_stage_outputs(claims, one_thread):
    torch.manual_seed(0)
    model = randomize_(claims.build(32, 4)).eval()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    rows = claims.block_amplitudes(model, x)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
    last = [max(b for b, r in enumerate(rows) if r["stage"] == s) for s in range(4)]
    for stage, b in enumerate(last):
        assert rows[b]["mean"] == pytest.approx(float(maps[stage].abs().mean()), rel=1e-5)
    assert all(not h for h in (blk._forward_hooks for blk in model.iter_blocks()))  # hooks removed


def test_test_time_window_copies(claims, one_thread):
    """A copy at a larger window keeps the trained coordinates' divisor (extrapolation); the
    rescaled copy divides by the new window; both leave the trained model untouched."""
    torch.manual_seed(0)
    model = randomize_(claims.build(32, 4))
    assert [b.attn.pretrained_window_size for b in (s.blocks[0] for s in model.layers)] == [
        (4, 4), (4, 4), (2, 2), (1, 1)]
    x = claims.at_size(claims.make_scenes(4, "val", 0)[0], 64)
    same = claims.at_window(model, 64, 8)
    rescaled = claims.at_window(model, 64, 8, rescale=True)
    assert model.window_size == (4, 4) and same.window_size == (8, 8)
    assert rescaled.layers[0].blocks[0].attn.pretrained_window_size == (0, 0)
    with torch.no_grad():
        assert not torch.allclose(same.eval()(x), rescaled.eval()(x))
        # at the training window, dividing by the training window or by "the window" is the same
        torch.testing.assert_close(claims.at_window(model, 32, 4, rescale=True).eval()(x[..., :32, :32]),
                                   model.eval()(x[..., :32, :32]))


def test_report_states_mean_and_spread(claims, tmp_path):
    seeds = [0, 1]
    tested = {}
    for test in claims.TESTS:
        tested.update({claims.key(*test): 0.4, f"{claims.key(*test)} ft": 0.6})
    t1 = {f: {b: [{"seed": s, "32/W4": 0.5 + 0.2 * s, **tested} for s in seeds] for b in claims.BIASES}
          for f in claims.FAMILIES}
    amp = [{"seed": s, "trained": [{"stage": i, "block": j, "mean": 1.0 + i, "max": 3.0} for i in range(4)
                                   for j in range(2)]} for s in seeds]
    top = {name: [{"seed": s, "top1": 0.8} for s in seeds] for name in claims.TABLE6}
    results = dict(seeds=seeds, train_images=10, val_images=5, epochs=1, ft_epochs=1, ft_images=5, deep_epochs=1,
                   table1=t1,
                   table6=dict(top1=top, amplitude=dict.fromkeys(claims.TABLE6, amp)),
                   figure2=dict(top1=top, amplitude=dict.fromkeys(list(claims.TABLE6)[:2], amp)))
    text = claims.report(results, "cmd", 1.0)
    spread = 100 * 0.2 / math.sqrt(2)  # sample std of 0.5 and 0.7
    assert f"| V1 block | log_cpb | 60.0 ± {spread:.1f} | 40.0 ± 0.0 / 60.0 ± 0.0 |" in text
    # block means 1, 1, 2, 2, 3, 3, 4, 4: flat within each stage, 4x from the lowest to the highest
    assert "| 2-2-2-2 | pre-norm + dot (V1) | 1.00 | 2.00 | 3.00 | 4.00 | 1.00 | 4.0 |" in text
    paths = claims.plots(results, tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == [f.name for f in sorted(tmp_path.glob("*.png"), key=lambda f: (
        ["paper-table1.png", "paper-table6.png", "paper-figure2.png"].index(f.name)))]


def test_runs_of_other_seeds_join(claims):
    part = dict(seeds=[0], epochs=8, command="a", minutes=3.0, table6=dict(top1={"arm": [{"seed": 0, "top1": 0.5}]}),
                figure2=dict(depths=[2, 2, 14, 2]))
    other = dict(part, seeds=[1], command="b", minutes=5.0, table6=dict(top1={"arm": [{"seed": 1, "top1": 0.7}]}))
    joined = claims._join_all([part, other])
    assert joined["seeds"] == [0, 1] and joined["epochs"] == 8 and joined["figure2"]["depths"] == [2, 2, 14, 2]
    assert [r["top1"] for r in joined["table6"]["top1"]["arm"]] == [0.5, 0.7]
    assert joined["command"] == ["a", "b"] and joined["minutes"] == 5.0
    with pytest.raises(ValueError, match="settings differ"):
        claims._join_all([part, dict(other, epochs=9)])
