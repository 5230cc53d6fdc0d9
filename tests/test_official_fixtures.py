"""Outputs of the official code (tests/fixtures/official) reproduced after loading its
state dicts: within 1e-9 relative error in float64 and 1e-4 in float32."""


import pytest
import torch
from helpers import official_fixture, rel_err

import swinv2

CLASSIFIERS = ["official_tiny_w4_img64", "official_w8_from_pretrained_w4_img64"]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_float64_logits_and_features(name):
    config, state, extras = official_fixture(name)
    model = swinv2.SwinTransformerV2(**config["official_constructor_args"]).eval()
    report = swinv2.load_pretrained(model, state)
    assert report.ok and report.dropped, report
    model.double()
    x = extras["__input__"].double()
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        pooled = model.forward_head(feats, pre_logits=True)
    assert rel_err(logits, extras["__logits_f64__"]) < 1e-9
    assert rel_err(pooled, extras["__features_f64__"]) < 1e-9


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_float32_logits(name):
    config, state, extras = official_fixture(name)
    model = swinv2.SwinTransformerV2(**config["official_constructor_args"]).eval()
    swinv2.load_pretrained(model, {"model": state})  # the wrapped form of official .pth files
    with torch.no_grad():
        logits = model(extras["__input__"])
    assert rel_err(logits, extras["__logits_f32__"]) < 1e-4
    assert rel_err(logits, extras["__logits_f64__"]) < 1e-4


def test_buffers_are_optional():
    config, state, extras = official_fixture(CLASSIFIERS[0])
    bare = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in swinv2.loading.DERIVED_BUFFERS}
    assert len(bare) < len(state)
    model = swinv2.SwinTransformerV2(**config["official_constructor_args"]).eval().double()
    report = swinv2.load_pretrained(model, bare)
    assert report.ok and not report.dropped
    with torch.no_grad():
        assert rel_err(model(extras["__input__"].double()), extras["__logits_f64__"]) < 1e-9


def test_wrong_pretrained_windows_are_noticed_and_matter():
    """Built without the checkpoint's pretrained_window_sizes, the model computes other
    position biases: the loader says so, and the outputs no longer match."""
    config, state, extras = official_fixture("official_w8_from_pretrained_w4_img64")
    args = dict(config["official_constructor_args"], pretrained_window_sizes=[0, 0, 0, 0])
    model = swinv2.SwinTransformerV2(**args).eval()
    report = swinv2.load_pretrained(model, state)
    assert any("pretrained_window_sizes" in n for n in report.notes)
    with torch.no_grad():
        assert rel_err(model(extras["__input__"]), extras["__logits_f32__"]) > 1e-3


def test_logit_scale_clamp_uses_float32_ln100():
    """The official clamp bound is a float32 tensor; in float64 the reference outputs tell
    it apart from math.log(100) (one head of every logit_scale sits past the clamp)."""
    import math

    from swinv2 import layers

    assert layers.LOGIT_SCALE_MAX == float(torch.tensor(100.0).log())
    assert layers.LOGIT_SCALE_MAX != math.log(100)
    config, state, extras = official_fixture(CLASSIFIERS[0])
    assert any((v > layers.LOGIT_SCALE_MAX).any() for k, v in state.items() if k.endswith("logit_scale"))
