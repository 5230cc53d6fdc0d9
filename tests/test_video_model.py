"""The video network: image weights inflate into it exactly, Video Swin V1 is its special case
(torchvision's swin3d), and its 3D shifted, padded windows match a token-by-token oracle."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchvision
from helpers import randomize_, rel_err
from torch import nn

import swinv2
from swinv2 import fast
from swinv2.layers import LOGIT_SCALE_MAX
from swinv2.video import VideoSwinTransformerV2, to_3tuple
from swinv2.windows import effective_window

SMALL = dict(embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4), num_classes=5, drop_path_rate=0.0)
V1 = dict(norm_placement="pre", attn_type="dot", position_bias="table", merge_norm="pre")


def _image_and_video(window3, frames, img=64, pretrained=(0, 0, 0), **switches):
    image = swinv2.SwinTransformerV2(img_size=img, window_size=window3[1:], pretrained_window_sizes=pretrained,
                                     **SMALL, **switches)
    randomize_(image, seed=1)
    # Logit scales drawn in [5, 25] rather than up to the clamp at 100: the shift mask is the
    # official -100, not -inf, so a masked key still weighs exp(logit - 100). A time shift puts
    # other multiples of the masked keys in a 3D window than in the 2D one, which shows once
    # logits span close to 100 (scale 100: up to 2e-8 apart); below that the leak is < 1e-20.
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in image.iter_blocks():
            if block.attn.logit_scale is not None:
                block.attn.logit_scale.copy_(torch.empty_like(block.attn.logit_scale).uniform_(
                    math.log(5), math.log(25), generator=gen))
    video = VideoSwinTransformerV2(img_size=img, num_frames=frames, window_size=window3,
                                   pretrained_window_sizes=pretrained, **SMALL, **switches)
    return image.double().eval(), video.double().eval()


# -- inflation -------------------------------------------------------------------------------


@pytest.mark.parametrize("window3, frames, pretrained, switches", [
    ((2, 4, 4), 8, (0, 0, 0), {}),                         # shifts in time and space
    ((3, 4, 4), 10, (6, 6, 3), {}),                        # 5 token frames: padded, masked keys
    ((4, 8, 8), 4, (0, 0, 0), {}),                         # global windows, no shift
    ((2, 4, 4), 6, (0, 0, 0), {"position_bias": "linear_cpb"}),
    ((2, 4, 4), 8, (0, 0, 0), V1),                         # V1 table repeated over time offsets
])
def test_identical_frames_give_the_image_models_logits(window3, frames, pretrained, switches):
    image, video = _image_and_video(window3, frames, pretrained=pretrained, **switches)
    report = swinv2.load_pretrained(video, image.state_dict())
    torch.manual_seed(0)
    assert any("patch embedding" in n for n in report.notes)
    assert any(("zero time column" in n) or ("over the time offsets" in n) for n in report.notes)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    clip = x.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()
    want = image(x)
    assert rel_err(video(clip), want) < 1e-10
    # the frames matter once they differ: the property is not a constant of the network
    moving = clip.clone()
    moving[:, :, frames // 2 :] = torch.roll(moving[:, :, frames // 2 :], 8, dims=-1)
    assert rel_err(video(moving), want) > 1e-4


def test_inflation_reads_timm_image_weights():
    timm = pytest.importorskip("timm")
    peer = timm.models.swin_transformer_v2.SwinTransformerV2(
        img_size=64, window_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4), num_classes=5)
    randomize_(peer, seed=3)
    peer = peer.double().eval()
    video = VideoSwinTransformerV2(img_size=64, num_frames=4, window_size=(2, 4, 4), **SMALL).double().eval()
    report = swinv2.load_pretrained(video, peer.state_dict())
    assert report.format == "timm"
    image = swinv2.SwinTransformerV2(img_size=64, window_size=4, pretrained_window_sizes=(0, 0, 0),
                                     **SMALL).double().eval()
    swinv2.load_pretrained(image, peer.state_dict())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert rel_err(video(x.unsqueeze(2).expand(-1, -1, 4, -1, -1)), image(x)) < 1e-10
    assert rel_err(image(x), peer(x)) < 1e-6  # timm's ln 100 clamp is not the official float32 one


# -- Video Swin V1 = torchvision's swin3d ------------------------------------------------------


def _torchvision_video(depths, heads, window, embed=16, classes=7, seed=0):
    tv = torchvision.models.video.SwinTransformer3d(
        patch_size=[2, 4, 4], embed_dim=embed, depths=list(depths), num_heads=list(heads), window_size=list(window),
        stochastic_depth_prob=0.0, num_classes=classes)
    randomize_(tv, seed=seed)
    with torch.no_grad():  # torchvision's key bias cancels in the softmax: make it count anyway
        for name, p in tv.named_parameters():
            if name.endswith("qkv.bias"):
                p.normal_(0, 0.5)
    return tv.eval()


@pytest.mark.parametrize("depths, heads, window, shapes", [
    ((2, 2, 2), (2, 2, 4), (2, 4, 4), [(2, 3, 8, 64, 64), (1, 3, 4, 64, 128), (1, 3, 12, 64, 64)]),
    ((2, 4), (2, 4), (4, 3, 3), [(2, 3, 16, 48, 48), (1, 3, 8, 24, 48)]),
    ((1, 1, 3, 1), (1, 2, 2, 4), (2, 2, 2), [(1, 3, 8, 64, 64)]),
])
def test_v1_switches_reproduce_torchvision_swin3d(depths, heads, window, shapes):
    tv = _torchvision_video(depths, heads, window)
    video = VideoSwinTransformerV2(
        img_size=shapes[0][-1], num_frames=shapes[0][2], embed_dim=16, depths=depths, num_heads=heads,
        window_size=window, num_classes=7, drop_path_rate=0.0, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-5),
        **V1).eval()
    report = swinv2.load_pretrained(video, tv.state_dict())
    assert report.format == "torchvision_video" and not report.missing
    assert any("key slice" in n for n in report.notes)
    for shape in shapes:
        x = torch.randn(*shape)
        assert rel_err(video(x), tv(x)) < 1e-5, shape


def _swin3d_t_pair():
    tv = torchvision.models.video.swin3d_t()
    randomize_(tv, seed=4)
    video = swinv2.create_model("video_swin_tiny_patch244_window877", fast=False)
    swinv2.load_pretrained(video, tv.state_dict())  # strict: every key placed
    return tv.eval(), video.eval()


def test_registered_v1_variant_holds_a_swin3d_t_state_dict():
    tv, video = _swin3d_t_pair()
    key_biases = sum(b.numel() // 3 for n, b in tv.named_parameters() if n.endswith("qkv.bias"))
    assert sum(p.numel() for p in video.parameters()) == sum(p.numel() for p in tv.parameters()) - key_biases


@pytest.mark.slow
def test_registered_v1_variant_gives_swin3d_t_logits():
    tv, video = _swin3d_t_pair()
    for m in video.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-5  # torchvision's LayerNorm eps
    x = torch.randn(1, 3, 2, 224, 224)  # one token frame: the temporal window shrinks to it
    with torch.no_grad():
        assert rel_err(video(x), tv(x)) < 1e-5


# -- 3D windows against a token-by-token oracle ------------------------------------------------


def _oracle_attention(attn, x, window, shift):
    """Window attention of (B, T, H, W, C) one query token at a time: the keys are the real
    tokens in the query's shifted window, those of another shift region 100 lower."""
    B, *size, C = x.shape
    nH, d = attn.num_heads, C // attn.num_heads
    wq, wk, wv = attn.qkv.weight.split(C, dim=0)
    q = (x @ wq.T + attn.q_bias).view(B, *size, nH, d)
    k = (x @ wk.T).view(B, *size, nH, d)
    v = (x @ wv.T + attn.v_bias).view(B, *size, nH, d)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    scale = torch.clamp(attn.logit_scale.view(nH), max=LOGIT_SCALE_MAX).exp()
    rel = attn.relative_bias(window)  # (nH, N, N)
    padded = [math.ceil(s / w) * w for s, w in zip(size, window)]

    def place(pos):  # window id, index in the window, shift region of a real token
        rolled = [(p - s) % P for p, s, P in zip(pos, shift, padded)]
        region = tuple(0 if s == 0 else (0 if r < P - w else 1 if r < P - s else 2)
                       for r, s, w, P in zip(rolled, shift, window, padded))
        index = 0
        for r, w in zip(rolled, window):
            index = index * w + r % w
        return tuple(r // w for r, w in zip(rolled, window)), index, region

    tokens = list(itertools.product(*(range(s) for s in size)))
    info = {t: place(t) for t in tokens}
    out = torch.empty(B, *size, C, dtype=x.dtype)
    for t in tokens:
        win, n, reg = info[t]
        keys = [u for u in tokens if info[u][0] == win]
        kn = torch.tensor([info[u][1] for u in keys])
        penalty = torch.tensor([0.0 if info[u][2] == reg else -100.0 for u in keys], dtype=x.dtype)
        kk = torch.stack([k[(slice(None), *u)] for u in keys], 1)  # (B, K, nH, d)
        vv = torch.stack([v[(slice(None), *u)] for u in keys], 1)
        logits = torch.einsum("bhd,bkhd->bhk", q[(slice(None), *t)], kk) * scale[None, :, None]
        p = torch.softmax(logits + rel[:, n, kn][None] + penalty, dim=-1)
        out[(slice(None), *t)] = torch.einsum("bhk,bkhd->bhd", p, vv).reshape(B, C)
    return attn.proj(out)


@pytest.mark.parametrize("size, window", [((3, 6, 5), (2, 4, 4)), ((4, 5, 6), (4, 4, 4)), ((2, 3, 9), (2, 2, 4))])
def test_3d_shifted_padded_windows_match_the_oracle(size, window):
    video = VideoSwinTransformerV2(img_size=32, num_frames=8, window_size=window, **SMALL)
    randomize_(video, seed=2)
    video = video.double()
    stage = video.layers[0]
    win, shift = effective_window(size, window)
    assert any(shift) and any(s % w for s, w in zip(size, win))  # shifted and padded
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    masks = stage.masks(size, x.device)
    for i, block in enumerate(stage.blocks):
        s = shift if i % 2 else (0, 0, 0)
        got = block.window_attention(x, win, s, masks[s])
        assert rel_err(got, _oracle_attention(block.attn, x, win, s)) < 1e-10
    # the oracle tells a shift mask from none
    wrong = stage.blocks[1].window_attention(x, win, shift, None if masks[(0, 0, 0)] is None else masks[(0, 0, 0)])
    assert rel_err(wrong, _oracle_attention(stage.blocks[1].attn, x, win, shift)) > 1e-3


# -- the network's contract --------------------------------------------------------------------


def test_views_shapes_and_errors():
    model = swinv2.create_model("video_swinv2_debug", num_classes=4, fast=False, img_size=32).eval()
    x = torch.randn(2, 3, 8, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 4, 1, 1, 256)
    assert torch.equal(model.forward_head(feats, pre_logits=True), feats.mean(dim=(1, 2, 3)))
    maps = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 8, 8), (2, 64, 4, 4, 4), (2, 128, 4, 2, 2),
                                               (2, 256, 4, 1, 1)]
    final, maps = model.forward_intermediates(x, norm=True, output_fmt="NTHWC")
    assert torch.allclose(final, feats) and torch.allclose(maps[-1], feats)
    assert model(torch.randn(1, 3, 5, 36, 20)).shape == (1, 4)  # padded to whole patches
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    with pytest.raises(ValueError, match=r"add a time axis"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="channels before time"):
        model(torch.randn(2, 8, 3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 8, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="three ints"):
        to_3tuple((2, 4))


def test_config_rebuilds_and_save_load_round_trip(tmp_path):
    model = swinv2.create_model("video_swinv2_debug", fast=False, window_size=(4, 4, 4), sequential_attention=[0],
                                img_size=32)
    randomize_(model, seed=5)
    again = VideoSwinTransformerV2(**model.config)
    again.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 8, 64, 64)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))
    path = tmp_path / "video.safetensors"
    swinv2.save_pretrained(model, path)
    loaded = swinv2.load_model(path)
    assert isinstance(loaded, VideoSwinTransformerV2) and loaded.window_size == (4, 4, 4)
    assert torch.equal(loaded.eval()(x), model(x))


def test_memory_levers_keep_outputs_and_gradients():
    model = swinv2.create_model("video_swinv2_debug", fast=False, drop_path_rate=0.0, img_size=32)
    randomize_(model, seed=6)
    x = torch.randn(1, 3, 8, 32, 32)

    def grads():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    ref_out, ref_grads = grads()
    model.set_grad_checkpointing(True)
    model.set_sequential_attention([0, 1], chunk_windows=3)
    out, gs = grads()
    assert rel_err(out, ref_out) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(gs, ref_grads)) < 1e-4


def test_speedups_and_window_change():
    model = swinv2.create_model("video_swinv2_debug", fast=False, img_size=32)
    randomize_(model, seed=7)
    model.eval()
    x = torch.randn(2, 3, 8, 32, 32)
    plain = model(x)
    fast.apply(model)
    assert fast.is_applied(model) and rel_err(model(x), plain) < 1e-5
    fast.remove(model)
    model.set_input_size(window_size=(4, 8, 8))  # the log-spaced CPB takes any window
    assert model.layers[0].window_size == (4, 8, 8) and rel_err(model(x), plain) > 1e-3
    v1 = VideoSwinTransformerV2(img_size=64, num_frames=8, window_size=(2, 4, 4), **SMALL, **V1)
    v1.set_input_size(window_size=(4, 8, 8))
    assert v1.layers[0].blocks[0].attn.relative_position_bias_table.shape == (7 * 15 * 15, 2)


def test_video_variants_build():
    for name in swinv2.list_models("video*"):
        model = swinv2.create_model(name, device="meta")
        assert isinstance(model, VideoSwinTransformerV2), name
    giant = swinv2.create_model("video_swinv2_giant_window16_256", device="meta")
    assert 2.9e9 < sum(p.numel() for p in giant.parameters()) < 3.1e9
    assert giant.layers[2].blocks[5].norm3 is not None  # the extra norm every 6 blocks (§3.2)
