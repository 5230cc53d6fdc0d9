"""swinv2.convert: format detection, conversion to and from the official layout, and
``load_pretrained`` on every format (head options included).

The timm, transformers and torchvision peers are built from tiny random configurations (every
parameter randomised with ``helpers.randomize_``); their raw state dicts go straight into
``swinv2.load_pretrained`` (format detected) and the outputs are compared, then swinv2's state
dict is written back with ``from_official`` and loaded strictly into a fresh peer. mmpretrain is
not installed: its conversion is checked as an exact round trip and, for the patch-merging
reduction, against an ``nn.Unfold`` emulation of its merging. SimMIM uses the official fixture.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import official_fixture, randomize_, rel_err

import swinv2
import swinv2.layers
from swinv2.convert import (
    DERIVED_BUFFERS,
    FORMATS,
    ConversionError,
    UnknownFormatError,
    detect_format,
    from_official,
    to_official,
)
from swinv2.loading import StateDictMismatchError

F32_TOL, F64_TOL = 5e-5, 1e-10
DTYPES = [pytest.param(torch.float32, F32_TOL, id="f32"), pytest.param(torch.float64, F64_TOL, id="f64")]
ARCH = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=10)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _ours(**kwargs) -> swinv2.SwinTransformerV2:
    kwargs.setdefault("pretrained_window_sizes", (0,) * len(kwargs.get("depths", (2, 2, 6, 2))))
    return swinv2.SwinTransformerV2(**{**kwargs, "drop_path_rate": 0.0}).eval()


def _images(size, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(2, 3, *hw)


def _equal_dicts(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------
# Peers: (model, swinv2 constructor arguments, image size, forward)
# --------------------------------------------------------------------------------------


def _timm(seed: int):
    T = pytest.importorskip("timm.models.swin_transformer_v2")
    kwargs = dict(**ARCH, img_size=64, window_size=8, pretrained_window_sizes=(4, 4, 4, 2))
    peer = T.SwinTransformerV2(**kwargs, drop_path_rate=0.0).eval()
    return randomize_(peer, seed), kwargs, 64, peer


def _hf(seed: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.Swinv2Config(
        image_size=64, patch_size=4, num_channels=3, embed_dim=ARCH["embed_dim"], depths=list(ARCH["depths"]),
        num_heads=list(ARCH["num_heads"]), num_labels=ARCH["num_classes"], window_size=8,
        pretrained_window_sizes=[4, 4, 4, 2], mlp_ratio=4.0, qkv_bias=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0, use_absolute_embeddings=False,
    )
    peer = randomize_(transformers.Swinv2ForImageClassification(config).eval(), seed)
    with torch.no_grad():  # spread the position-bias input layer as randomize_ does under the name cpb_mlp
        for name, p in peer.named_parameters():
            if "continuous_position_bias_mlp.0." in name:
                p.mul_(10)
    kwargs = dict(**ARCH, img_size=64, window_size=8, pretrained_window_sizes=(4, 4, 4, 2))
    return peer, kwargs, 64, lambda x: peer(pixel_values=x).logits


def _torchvision(seed: int):
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    peer = tv.SwinTransformer(
        patch_size=[4, 4], embed_dim=ARCH["embed_dim"], depths=list(ARCH["depths"]), num_heads=list(ARCH["num_heads"]),
        window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=ARCH["num_classes"],
        block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2,
    ).eval()
    randomize_(peer, seed)
    with torch.no_grad():  # the stem norm is features.0.2, which randomize_ does not see as a norm
        peer.features[0][2].weight.mul_(4).add_(1)
        peer.features[0][2].bias.mul_(2)
        for name, p in peer.named_parameters():  # torchvision zero-inits the key bias and never updates it
            if name.endswith("attn.qkv.bias"):
                p.view(3, -1)[1].zero_()
    # maps 32, 16, 8, 4: every map a multiple of the window, the last equal to it
    return peer, dict(**ARCH, img_size=128, window_size=4), 128, peer


PEERS = {"timm": _timm, "hf": _hf, "torchvision": _torchvision}


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("fmt", list(PEERS))
def test_peer_state_dict_loads_by_detection(fmt, dtype, tol, monkeypatch):
    if dtype == torch.float64:  # the peers clamp at float64 ln 100, official at the float32 value
        monkeypatch.setattr(swinv2.layers, "LOGIT_SCALE_MAX", math.log(100))
    peer, kwargs, size, forward = PEERS[fmt](seed=len(fmt))
    state = peer.state_dict()
    assert detect_format(state) == fmt
    ours = _ours(**kwargs)
    report = swinv2.load_pretrained(ours, state)
    assert report.ok and report.format == fmt, str(report)
    assert sorted(report.loaded) == sorted(ours.state_dict()), str(report)
    assert f"({fmt} layout)" in str(report)
    peer.to(dtype)
    ours.to(dtype)
    x = _images(size, seed=1).to(dtype)
    with torch.no_grad():
        expected = forward(x)
        assert expected.abs().max() > 0
        err = rel_err(ours(x), expected)
    assert err < tol, f"{fmt} {dtype}: rel_err {err:.3e}"


@pytest.mark.parametrize("fmt", list(PEERS))
def test_round_trip_back_into_the_peer(fmt):
    """swinv2 state dict -> from_official -> a fresh, differently randomised peer, strict: every
    tensor and the outputs equal the original peer's exactly."""
    peer, kwargs, size, forward = PEERS[fmt](seed=3)
    ours = _ours(**kwargs)
    swinv2.load_pretrained(ours, peer.state_dict())
    fresh, _, _, fresh_forward = PEERS[fmt](seed=4)
    template = fresh.state_dict() if fmt == "torchvision" else None
    written = from_official(ours.state_dict(), fmt, template=template)
    fresh.load_state_dict(written, strict=True)
    _equal_dicts(fresh.state_dict(), peer.state_dict())
    x = _images(size, seed=5)
    with torch.no_grad():
        assert torch.equal(fresh_forward(x), forward(x))


def test_torchvision_needs_its_buffers_from_a_template():
    """torchvision keeps its coordinate/index buffers in the state dict: without a template the
    written dict lacks exactly those, and nothing else."""
    peer, kwargs, _, _ = _torchvision(seed=6)
    ours = _ours(**kwargs)
    swinv2.load_pretrained(ours, peer.state_dict())
    result = peer.load_state_dict(from_official(ours.state_dict(), "torchvision"), strict=False)
    assert result.missing_keys and not result.unexpected_keys
    assert {k.rsplit(".", 1)[-1] for k in result.missing_keys} == {"relative_coords_table", "relative_position_index"}


def test_torchvision_buffers_convert_to_the_official_shapes():
    peer, *_ = _torchvision(seed=7)
    official, notes = to_official(peer.state_dict())
    index = official["layers.0.blocks.0.attn.relative_position_index"]
    assert index.shape == (16, 16) and torch.equal(index.flatten(), peer.features[1][0].attn.relative_position_index)
    assert official["layers.0.blocks.0.attn.q_bias"].shape == (16,)
    assert any("split qkv.bias" in n for n in notes)
    assert not any("nonzero key slice" in n for n in notes)


def test_torchvision_nonzero_key_bias_is_noted():
    peer, *_ = _torchvision(seed=8)
    state = peer.state_dict()
    state["features.3.1.attn.qkv.bias"] = state["features.3.1.attn.qkv.bias"].clone()
    state["features.3.1.attn.qkv.bias"][40] = 0.5  # C = 32: entries 32..63 are the key slice
    _, notes = to_official(state)
    assert any("features.3.1.attn.qkv.bias" in n and "nonzero key slice" in n for n in notes)


def test_hf_masked_image_modeling_drops_decoder_and_mask_token():
    transformers = pytest.importorskip("transformers")
    config = transformers.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                       window_size=4, encoder_stride=8)
    mim = transformers.Swinv2ForMaskedImageModeling(config)
    state = mim.state_dict()
    assert detect_format(state) == "hf"
    ours = _ours(img_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=0)
    report = swinv2.load_pretrained(ours, state)
    assert report.ok, str(report)
    assert sorted(report.discarded) == ["decoder.0.bias", "decoder.0.weight", "swinv2.embeddings.mask_token"]
    assert torch.equal(ours.norm.weight, mim.swinv2.layernorm.weight)


def test_hf_incomplete_qkv_is_an_error():
    peer, *_ = _hf(seed=9)
    state = peer.state_dict()
    del state["swinv2.encoder.layers.1.blocks.0.attention.self.key.weight"]
    with pytest.raises(ConversionError, match=r"layers\.1\.blocks\.0\.attention\.self\.key\.weight"):
        to_official(state)


# --------------------------------------------------------------------------------------
# Every format: detection and exact round trips through the official layout
# --------------------------------------------------------------------------------------

# what each format does not store: derived buffers (all of them, or only the shift masks), the head
NOT_STORED = {
    "official": (),
    "swinv2": DERIVED_BUFFERS,
    "simmim": ("head.weight", "head.bias"),
    "timm": DERIVED_BUFFERS,
    "hf": DERIVED_BUFFERS,
    "torchvision": ("attn_mask",),
    "torchvision_video": (),
    "mmpretrain": ("attn_mask",),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_official_round_trip_is_exact_and_detected(fmt):
    _, official, _ = official_fixture("official_w8_from_pretrained_w4_img64")
    written = from_official(official, fmt)
    assert detect_format(written) == fmt
    back, _ = to_official(written)  # detected again
    skip = NOT_STORED[fmt]
    expected = {k: v for k, v in official.items() if k.rsplit(".", 1)[-1] not in skip and k not in skip}
    _equal_dicts(back, expected)
    if fmt not in ("official", "swinv2"):
        assert set(written) != set(official)  # the names really change


def test_mmpretrain_key_names():
    model = randomize_(_ours(**ARCH, img_size=64, window_size=4, ape=True, extra_norm_period=2), 10)
    own = model.state_dict()
    mm = from_official(own, "mmpretrain")
    for key in [
        "backbone.patch_embed.projection.weight",
        "backbone.patch_embed.norm.bias",
        "backbone.absolute_pos_embed",
        "backbone.stages.0.blocks.1.attn.w_msa.qkv.weight",
        "backbone.stages.0.blocks.1.attn.w_msa.q_bias",
        "backbone.stages.0.blocks.1.attn.w_msa.logit_scale",
        "backbone.stages.0.blocks.1.attn.w_msa.cpb_mlp.2.weight",
        "backbone.stages.2.blocks.0.ffn.layers.0.0.weight",
        "backbone.stages.2.blocks.0.ffn.layers.1.bias",
        "backbone.stages.3.blocks.1.norm3.weight",  # extra norm after every 2nd block
        "backbone.stages.1.downsample.reduction.weight",  # official layers.0.downsample
        "backbone.stages.3.downsample.norm.weight",
        "backbone.norm3.weight",  # output norm of the last stage = official final norm
        "head.fc.weight",
    ]:
        assert key in mm, key
    assert len(mm) == len(own)
    assert not [k for k in mm if k.startswith(("layers.", "norm.")) or ".mlp." in k or "stages.0.downsample" in k]
    for i in range(3):
        official_w = own[f"layers.{i}.downsample.reduction.weight"]
        mm_w = mm[f"backbone.stages.{i + 1}.downsample.reduction.weight"]
        assert not torch.equal(mm_w, official_w)  # the columns really move ...
        assert torch.equal(mm_w.sort(dim=1).values, official_w.sort(dim=1).values)  # ... and only move
    back, _ = to_official(mm)
    _equal_dicts(back, own)


def _official_merge(x: torch.Tensor) -> torch.Tensor:
    """The official concatenation: x0 (0,0), x1 (1,0), x2 (0,1), x3 (1,1) along channels."""
    return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)


def _unfold_merge(x: torch.Tensor) -> torch.Tensor:
    """mmpretrain's PatchMerging gathering: NHWC -> NCHW -> nn.Unfold(2, stride 2) -> (B, L, 4C)."""
    B, H, W, _ = x.shape
    cols = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2)  # (B, 4C, L), channel-major
    return cols.transpose(1, 2).reshape(B, H // 2, W // 2, -1)


def test_mmpretrain_reduction_matches_unfold_emulation():
    from swinv2.convert.mmpretrain import reduction_to_unfold_order

    torch.manual_seed(11)
    C = 6
    x = torch.randn(2, 8, 10, C, dtype=torch.float64)
    merging = swinv2.layers.PatchMerging(C).double()
    randomize_(merging, 12)
    with torch.no_grad():
        ours = merging(x)  # swinv2's merging in official order
        assert torch.allclose(merging.norm(merging.reduction(_official_merge(x))), ours, atol=1e-12, rtol=0)
        (w_mm,) = reduction_to_unfold_order(merging.reduction.weight)
        emulated = merging.norm(F.linear(_unfold_merge(x), w_mm))
        unconverted = merging.norm(F.linear(_unfold_merge(x), merging.reduction.weight))
    assert rel_err(emulated, ours) < 1e-13
    assert rel_err(unconverted, ours) > 1e-2  # the permutation is needed


def test_mmpretrain_bare_backbone_and_extra_output_norms():
    model = randomize_(_ours(**ARCH, img_size=64, window_size=4), 13)
    mm = from_official(model.state_dict(), "mmpretrain")
    bare = {k[len("backbone."):]: v for k, v in mm.items() if k.startswith("backbone.")}
    bare["norm1.weight"] = torch.ones(32)  # out_indices (1, 3): an output norm the official model lacks
    bare["norm1.bias"] = torch.zeros(32)
    assert detect_format(bare) == "mmpretrain"
    target = _ours(**{**ARCH, "num_classes": 0}, img_size=64, window_size=4)
    report = swinv2.load_pretrained(target, bare)
    assert report.ok and report.format == "mmpretrain", str(report)
    assert sorted(report.discarded) == ["backbone.norm1.bias", "backbone.norm1.weight"]
    assert torch.equal(target.layers[1].downsample.reduction.weight, model.layers[1].downsample.reduction.weight)


# --------------------------------------------------------------------------------------
# SimMIM
# --------------------------------------------------------------------------------------


def _simmim_state(model: swinv2.SwinTransformerV2) -> dict:
    state = {"encoder." + k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    state["encoder.mask_token"] = torch.randn(1, 1, 32)
    state["decoder.0.weight"] = torch.randn(32 * 32 * 3, 256, 1, 1)
    state["decoder.0.bias"] = torch.randn(32 * 32 * 3)
    old = "encoder.layers.1.blocks.0.attn.cpb_mlp.0.weight"
    state[old.replace("cpb_mlp", "rpe_mlp")] = state.pop(old)
    return state


def test_simmim_pretraining_loads_into_a_classifier():
    src = randomize_(swinv2.create_model("swinv2_debug"), 14)
    state = _simmim_state(src)
    assert detect_format(state) == "simmim"
    dst = swinv2.create_model("swinv2_debug")
    head_before = dst.head.weight.clone()
    with pytest.raises(StateDictMismatchError, match="head.weight") as err:
        swinv2.load_pretrained(dst, state)  # head="keep": the missing head is an error
    assert "head='auto'" in str(err.value)
    report = swinv2.load_pretrained(dst, state, head="auto")
    assert report.ok and report.format == "simmim", str(report)
    assert sorted(report.discarded) == ["decoder.0.bias", "decoder.0.weight", "encoder.mask_token"]
    assert "no head" in report.head and "initialisation" in report.head
    assert any("rpe_mlp" in n for n in report.notes)
    assert torch.equal(dst.head.weight, head_before)
    assert torch.equal(dst.layers[1].blocks[0].attn.cpb_mlp[0].weight, src.layers[1].blocks[0].attn.cpb_mlp[0].weight)
    assert sorted(report.loaded) == sorted(k for k in dst.state_dict() if not k.startswith("head."))


def test_official_simmim_fixture_encoder():
    """The official SimMIM fixture: the encoder loads strictly (decoder and mask token reported
    dropped) and, with the checkpoint's mask token put back by hand, reproduces the official
    encoder output in float64."""
    config, state, extras = official_fixture("official_simmim_img64")
    assert detect_format(state) == "simmim"
    model = _ours(**config["official_encoder_args"])
    report = swinv2.load_pretrained(model, state)
    assert report.ok and report.format == "simmim", str(report)
    assert sorted(report.discarded) == ["decoder.0.bias", "decoder.0.weight", "encoder.mask_token"]
    assert report.dropped  # the official buffers
    assert any("decoder" in n for n in report.notes) and any("mask token" in n for n in report.notes)
    model.double()
    with torch.no_grad():
        tokens = model.patch_embed(extras["__input__"].double())  # (B, H/4, W/4, C) after the patch norm
        w = extras["__mask__"].unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - w) + state["encoder.mask_token"].double().view(1, 1, 1, -1) * w
        out = model.forward_tokens(tokens).permute(0, 3, 1, 2)
    assert rel_err(out, extras["__encoder_out_f64__"]) < 1e-9


# --------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------


def _head_pair(classes: int, seed: int = 15):
    src = randomize_(swinv2.create_model("swinv2_debug"), seed)  # 10 classes
    dst = swinv2.create_model("swinv2_debug", num_classes=classes)
    return src, dst


def test_class_count_mismatch_drops_the_head_with_auto():
    src, dst = _head_pair(7)
    head_before = dst.head.weight.clone()
    with pytest.raises(StateDictMismatchError, match=r"head\.weight: \(10, 256\) vs \(7, 256\)"):
        swinv2.load_pretrained(dst, src.state_dict())
    report = swinv2.load_pretrained(dst, src.state_dict(), head="auto")
    assert report.ok, str(report)
    assert sorted(report.discarded) == ["head.bias", "head.weight"]
    assert "10 classes" in report.head and "7 classes" in report.head and "head: dropped" in str(report)
    assert torch.equal(dst.head.weight, head_before)
    assert torch.equal(dst.norm.weight, src.norm.weight)


def test_auto_keeps_a_fitting_head_and_drop_never_loads_it():
    src, dst = _head_pair(10)
    report = swinv2.load_pretrained(dst, src.state_dict(), head="auto")
    assert report.ok and not report.discarded and not report.head
    assert torch.equal(dst.head.weight, src.head.weight)
    _, dst = _head_pair(10)
    head_before = dst.head.weight.clone()
    report = swinv2.load_pretrained(dst, src.state_dict(), head="drop")
    assert report.ok and sorted(report.discarded) == ["head.bias", "head.weight"]
    assert torch.equal(dst.head.weight, head_before) and not torch.equal(dst.head.weight, src.head.weight)


def test_auto_drops_the_head_for_a_headless_model():
    src, _ = _head_pair(10)
    dst = swinv2.create_model("swinv2_debug", num_classes=0)
    with pytest.raises(StateDictMismatchError, match="head.weight"):
        swinv2.load_pretrained(dst, src.state_dict())
    report = swinv2.load_pretrained(dst, src.state_dict(), head="auto")
    assert report.ok and "model has no head" in report.head


def test_head_map_selects_rows(tmp_path):
    src, dst = _head_pair(4)
    rows = [7, 2, 2, 0]
    report = swinv2.load_pretrained(dst, src.state_dict(), head_map=rows)
    assert report.ok and "selected 4 of the checkpoint's 10 head rows" in report.head, str(report)
    assert torch.equal(dst.head.weight, src.head.weight[rows])
    assert torch.equal(dst.head.bias, src.head.bias[rows])
    # the official map22kto1k.txt form: one index per line
    (tmp_path / "map.txt").write_text("3\n1\n4\n1\n")
    _, dst = _head_pair(4)
    swinv2.load_pretrained(dst, src.state_dict(), head="auto", head_map=tmp_path / "map.txt")
    assert torch.equal(dst.head.bias, src.head.bias[[3, 1, 4, 1]])
    with pytest.raises(ValueError, match="head_map indices"):
        swinv2.load_pretrained(dst, src.state_dict(), head_map=[0, 1, 2, 10])
    with pytest.raises(ValueError, match="head='drop'"):
        swinv2.load_pretrained(dst, src.state_dict(), head="drop", head_map=rows)


def test_head_map_22k_to_1k_in_a_peer_format():
    """A 21841-class timm checkpoint into a 1000-class model, rows chosen by head_map."""
    T = pytest.importorskip("timm.models.swin_transformer_v2")
    kwargs = dict(img_size=32, window_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 1))
    peer = randomize_(T.SwinTransformerV2(**kwargs, num_classes=21841), 16)
    rows = torch.randperm(21841, generator=torch.Generator().manual_seed(0))[:1000]
    dst = _ours(**kwargs, num_classes=1000)
    report = swinv2.load_pretrained(dst, peer.state_dict(), head="auto", head_map=rows)
    assert report.ok and report.format == "timm", str(report)
    assert torch.equal(dst.head.weight, peer.head.fc.weight[rows])


# --------------------------------------------------------------------------------------
# Errors and odd inputs
# --------------------------------------------------------------------------------------


def test_unknown_format_is_a_clear_error():
    state = {"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}
    with pytest.raises(UnknownFormatError, match=r"'conv1\.weight'.*known: official"):
        detect_format(state)
    with pytest.raises(UnknownFormatError, match=r"state dict: .*'fc\.bias'"):
        swinv2.load_pretrained(swinv2.create_model("swinv2_debug"), state)
    with pytest.raises(ValueError, match="unknown format 'keras'"):
        to_official(state, "keras")


def test_timm_cr_is_refused():
    T = pytest.importorskip("timm.models.swin_transformer_v2_cr")
    cr = T.SwinTransformerV2Cr(img_size=32, window_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 1))
    with pytest.raises(ConversionError, match="SwinTransformerV2Cr"):
        detect_format(cr.state_dict())


def test_conflicting_keys_are_an_error():
    peer, *_ = _timm(seed=17)
    state = peer.state_dict()
    state["head.weight"] = state["head.fc.weight"]  # both names of the official head
    with pytest.raises(ConversionError, match=r"'head\.fc\.weight'.*'head\.weight'|'head\.weight'.*'head\.fc\.weight'"):
        to_official(state)


def test_ddp_prefix_and_explicit_format():
    peer, kwargs, _, _ = _timm(seed=18)
    state = {"module." + k: v for k, v in peer.state_dict().items()}
    assert detect_format(state) == "timm"
    ours = _ours(**kwargs)
    report = swinv2.load_pretrained(ours, {"state_dict": state}, fmt="timm")
    assert report.ok and any("module." in n for n in report.notes), str(report)
    # the wrong explicit format leaves timm's names in place, and the strict load names them
    with pytest.raises(StateDictMismatchError, match=r"layers\.3\.downsample\.reduction\.weight"):
        swinv2.load_pretrained(_ours(**kwargs), peer.state_dict(), fmt="swinv2")


def test_from_official_refuses_other_layouts():
    peer, *_ = _timm(seed=19)
    with pytest.raises(ConversionError, match="'timm'"):
        from_official(peer.state_dict(), "hf")


def test_unknown_keys_are_kept_and_noted():
    peer, kwargs, _, _ = _timm(seed=20)
    state = peer.state_dict()
    state["layers.0.blocks.0.attn.extra"] = torch.zeros(2)
    official, notes = to_official(state)
    assert "layers.0.blocks.0.attn.extra" in official  # the block rule carries unknown leaves over
    state = peer.state_dict()
    state["something.else"] = torch.zeros(2)
    official, notes = to_official(state)
    assert "something.else" in official and any("kept unchanged: something.else" in n for n in notes)
    with pytest.raises(StateDictMismatchError, match="something.else"):
        swinv2.load_pretrained(_ours(**kwargs), state)
