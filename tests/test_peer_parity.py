"""Numerical parity of ``swinv2.SwinTransformerV2`` with the installed peer implementations.

Each test builds a tiny peer model from a config (no weights are downloaded), randomises every
parameter with ``helpers.randomize_``, maps the peer state dict to the official names, loads it
with ``swinv2.load_pretrained`` (strict) into a swinv2 model built with the same arguments and
compares outputs in eval mode: float32 relative error < 1e-5 and float64 < 1e-10.

Peers:

- timm ``SwinTransformerV2``: patch merging sits at the start of stage i+1, the head is
  ``head.fc``, there are no buffers in the state dict.
- Hugging Face ``Swinv2ForImageClassification``: separate query/key/value Linears (key has no
  bias), the merging keeps its stage index.
- torchvision ``SwinTransformer`` with the V2 block and merging: ``features.*`` layout, one
  ``qkv.bias`` whose key slice is zeroed at forward time; and with its default V1 block and
  merging, against a swinv2 model built with every V1 switch.

Float64 and the logit-scale clamp: the official code clamps ``logit_scale`` at
``torch.log(torch.tensor(100.))``, a float32 value, and swinv2 keeps that constant
(``swinv2.layers.LOGIT_SCALE_MAX``); all three peers clamp at ``math.log(100)`` in the model's
dtype. In float32 the two are the same number; in float64 they differ by 6.4e-8, which any head
whose scale sits past the clamp (``randomize_`` puts one there in every block) turns into a
1e-8 to 1e-7 relative difference of the outputs. The float64 comparisons therefore run with
``LOGIT_SCALE_MAX`` set to the peers' constant, and ``test_timm_float64_clamp_constant_departure``
pins the departure itself.

Not compared: timm with ``strict_img_size=False`` / ``set_input_size`` at sizes where a stage map
is not a multiple of its window. swinv2 pads, then rolls, and masks the padded keys; timm rolls,
then pads, and lets real tokens attend to the zero padding, so the two are not expected to agree
there (there is no official truth at such sizes).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import swinv2
import swinv2.fast
import swinv2.layers
from swinv2.loading import DERIVED_BUFFERS

try:
    from helpers import randomize_, rel_err
except ImportError:  # collected as the ``tests`` package
    from tests.helpers import randomize_, rel_err

# float32: the fused attention kernel sums in another order than the peers' explicit matmuls,
# which drifts to ~1e-5 through a randomised network (eager float32 is itself ~2e-5 from the
# float64 truth); float64 is where exactness is shown.
F32_TOL = 5e-5
F64_TOL = 1e-10
DTYPES = [pytest.param(torch.float32, F32_TOL, id="f32"), pytest.param(torch.float64, F64_TOL, id="f64")]

# A tiny architecture: widths 16, 32, 64, 128.
ARCH = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=10)


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _images(size, seed: int = 0, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, *_hw(size))


def _ours(**kwargs) -> swinv2.SwinTransformerV2:
    return swinv2.SwinTransformerV2(drop_path_rate=0.0, **kwargs).eval()


def _load(model: swinv2.SwinTransformerV2, state: dict) -> swinv2.LoadReport:
    report = swinv2.load_pretrained(model, state)
    assert report.ok, str(report)
    assert sorted(report.loaded) == sorted(model.state_dict()), str(report)
    return report


def _check(ours: torch.Tensor, peer: torch.Tensor, tol: float, what: str) -> float:
    assert ours.shape == peer.shape, f"{what}: shape {tuple(ours.shape)} vs peer {tuple(peer.shape)}"
    assert peer.abs().max() > 0, f"{what}: the peer output is all zeros"
    err = rel_err(ours, peer)
    assert err < tol, f"{what}: rel_err {err:.3e} >= {tol:g}"
    return err


def _peer_clamp(monkeypatch) -> None:
    """Clamp logit scales at the peers' float64 ``math.log(100)`` instead of the official float32
    value (see the module docstring); only float64 can tell the two apart."""
    monkeypatch.setattr(swinv2.layers, "LOGIT_SCALE_MAX", math.log(100))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _cast(dtype, *models):
    for m in models:
        m.to(dtype)


# --------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------


def timm_to_official(state: dict) -> dict:
    """timm state dict -> official names: merging moves back to the end of the previous stage
    (``layers.{i+1}.downsample`` -> ``layers.{i}.downsample``) and ``head.fc`` -> ``head``;
    every other name is already the official one."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        if m:
            key = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc.") :]
        out[key] = value
    return out


# (swinv2 stage windows and shifts in the comments; timm's per-stage ones are asserted equal.)
TIMM_CASES = {
    # maps 16, 8, 4, 2: shifted 4x4 windows, then global windows in the last two stages
    "64-w4": dict(img_size=64, window_size=4),
    # maps 16, 8, 4, 2 with window 8: stage 1 is one unshifted window, stages 2-3 shrink it
    "64-w8-pws4442": dict(img_size=64, window_size=8, pretrained_window_sizes=(4, 4, 4, 2)),
    # maps 24, 12, 6, 3: the last stage shrinks 6 -> 3; another width, depth and mlp ratio
    "96-w6": dict(img_size=96, window_size=6, embed_dim=24, depths=(1, 1, 3, 1), num_heads=(2, 2, 4, 4), mlp_ratio=2.0),
    # maps 14, 7, 4, 2: merging an odd 7x7 map zero-pads it to 8x8 (official code would assert)
    "56-w7-odd-merge": dict(img_size=56, window_size=7),
    # non-square image and window: maps 16x24, 8x12, 4x6, 2x3 and pretrained (4, 6) windows
    "64x96-w4x6": dict(img_size=(64, 96), window_size=(4, 6), pretrained_window_sizes=((4, 6), (4, 6), (4, 6), (2, 3))),
    # non-square image, square window: stage 2 (4x8) keeps window 4x4 but shifts only along W,
    # stage 3 (2x4) uses one 2x4 window: each axis shrinks on its own (timm's per-dim rule)
    "64x128-w4": dict(img_size=(64, 128), window_size=4),
}


def _timm_class():
    return pytest.importorskip("timm.models.swin_transformer_v2").SwinTransformerV2


def _timm_pair(case: dict, seed: int = 0):
    kwargs = {**ARCH, **case}
    peer = _timm_class()(**kwargs, drop_path_rate=0.0).eval()
    randomize_(peer, seed)
    state = peer.state_dict()
    assert not [k for k in state if k.rsplit(".", 1)[-1] in DERIVED_BUFFERS + ("k_bias",)]
    ours = _ours(**kwargs)
    _load(ours, timm_to_official(state))
    return peer, ours


def _timm_windows(peer) -> list:
    return [(tuple(b.window_size), tuple(b.shift_size)) for stage in peer.layers for b in stage.blocks]


def _our_windows(ours) -> list:
    out = []
    for stage, (window, shift) in zip(ours.layers, ours.stage_windows()):
        out += [(window, shift if i % 2 else (0, 0)) for i in range(len(stage.blocks))]
    return out


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_stage_windows_agree(name):
    peer, ours = _timm_pair(TIMM_CASES[name])
    assert _timm_windows(peer) == _our_windows(ours)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_parity(name, dtype, tol, monkeypatch):
    case = TIMM_CASES[name]
    if dtype == torch.float64:
        _peer_clamp(monkeypatch)
    peer, ours = _timm_pair(case, seed=len(name))
    _cast(dtype, peer, ours)
    x = _images(case["img_size"], seed=1).to(dtype)
    with torch.no_grad():
        _check(ours(x), peer(x), tol, "logits")
        _check(ours.forward_features(x), peer.forward_features(x), tol, "forward_features (NHWC)")
        # timm's stage output i is before stage i+1's merging, i.e. swinv2's map before stage i's merging.
        final_ours, maps_ours = ours.forward_intermediates(x, norm=False)
        final_peer, maps_peer = peer.forward_intermediates(x, norm=False)
        assert len(maps_ours) == len(maps_peer) == 4
        for i, (a, b) in enumerate(zip(maps_ours, maps_peer)):
            _check(a, b, tol, f"intermediate {i} (NCHW)")
        _check(final_ours, final_peer, tol, "forward_intermediates final")


@pytest.mark.parametrize("indices,stop_early", [(2, False), ([0, 2], True), ([-1], False)])
def test_timm_intermediate_indices(indices, stop_early):
    peer, ours = _timm_pair(TIMM_CASES["64-w4"], seed=3)
    x = _images(64, seed=2)
    with torch.no_grad():
        final_ours, maps_ours = ours.forward_intermediates(x, indices=indices, stop_early=stop_early)
        final_peer, maps_peer = peer.forward_intermediates(x, indices=indices, stop_early=stop_early)
    assert len(maps_ours) == len(maps_peer)
    for i, (a, b) in enumerate(zip(maps_ours, maps_peer)):
        _check(a, b, F32_TOL, f"map {i}")
    _check(final_ours, final_peer, F32_TOL, "final")


def test_timm_stop_early_final_features():
    peer, ours = _timm_pair(TIMM_CASES["64-w4"], seed=3)
    x = _images(64, seed=2)
    with torch.no_grad():
        final_ours, maps_ours = ours.forward_intermediates(x, indices=[0, 2], stop_early=True)
        final_peer, _ = peer.forward_intermediates(x, indices=[0, 2], stop_early=True)
    _check(final_ours, final_peer, F32_TOL, "final after stop_early")


def test_timm_other_input_size():
    """swinv2 derives windows from the input at forward time: a model built at 64 and run at 128
    equals timm resized to 128 with the same window (maps 32, 16, 8, 4 divide the window)."""
    peer, ours = _timm_pair(TIMM_CASES["64-w4"], seed=4)
    peer.set_input_size(img_size=(128, 128), window_size=4)
    x = _images(128, seed=5)
    with torch.no_grad():
        _check(ours(x), peer(x), F32_TOL, "logits at 128")


def test_timm_parity_is_sensitive():
    """Parity is not vacuous: nudging one logit scale (a head under the clamp, in a shifted
    block) after loading makes the logits differ clearly."""
    peer, ours = _timm_pair(TIMM_CASES["64-w4"], seed=6)
    x = _images(64, seed=7)
    with torch.no_grad():
        assert rel_err(ours(x), peer(x)) < F32_TOL
        ours.layers[1].blocks[1].attn.logit_scale[1] -= 1.0
        assert rel_err(ours(x), peer(x)) > 1e-3


def test_timm_float64_clamp_constant_departure():
    """timm clamps logit scales at float64 ln(100); official and swinv2 at the float32 value.
    In float64 that leaves a 1e-8 to 1e-7 difference, and only while a scale is past the clamp."""
    peer, ours = _timm_pair(TIMM_CASES["64-w4"], seed=8)
    _cast(torch.float64, peer, ours)
    x = _images(64, seed=9).double()
    with torch.no_grad():
        err = rel_err(ours(x), peer(x))
        assert 1e-10 < err < 1e-6, err
        for model in (peer, ours):
            for name, p in model.named_parameters():
                if name.endswith("logit_scale"):
                    p.clamp_(max=math.log(100) - 0.05)
        assert rel_err(ours(x), peer(x)) < F64_TOL


def test_timm_nonsquare_needs_per_axis_rule():
    """The non-square case is discriminating: swinv2's ``window_rule="official"`` (one square
    window from min(H, W)) does not reproduce timm there, the default per-axis rule does."""
    case = TIMM_CASES["64x128-w4"]
    peer, _ = _timm_pair(case, seed=10)
    ours = _ours(**ARCH, **case, window_rule="official")
    _load(ours, timm_to_official(peer.state_dict()))
    x = _images(case["img_size"], seed=11)
    with torch.no_grad():
        assert rel_err(ours(x), peer(x)) > 1e-3


# --------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------

# Inside ``swinv2.encoder.layers.{i}.blocks.{j}.``: HF name prefix -> official name prefix.
# attention.self.{query,key,value}.weight are handled apart: official qkv.weight = [q; k; v].
HF_BLOCK_NAMES = {
    "layernorm_before": "norm1",  # applied to the attention output (res-post-norm), as official norm1
    "layernorm_after": "norm2",
    "attention.self.logit_scale": "attn.logit_scale",
    "attention.self.continuous_position_bias_mlp": "attn.cpb_mlp",
    "attention.self.query.bias": "attn.q_bias",
    "attention.self.value.bias": "attn.v_bias",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
HF_TOP_NAMES = {
    "swinv2.embeddings.patch_embeddings.projection": "patch_embed.proj",
    "swinv2.embeddings.norm": "patch_embed.norm",
    "swinv2.layernorm": "norm",
    "classifier": "head",
}
HF_QKV = ("query", "key", "value")


def _rename(name: str, table: dict) -> str | None:
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src) :]
    return None


def hf_to_official(state: dict, qkv_order=HF_QKV) -> dict:
    """HF ``Swinv2ForImageClassification`` state dict -> official names. Unknown names raise."""
    out, qkv = {}, {}
    for key, value in state.items():
        block = re.fullmatch(r"swinv2\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
        merge = re.fullmatch(r"swinv2\.encoder\.layers\.(\d+)\.downsample\.(.+)", key)
        if block:
            prefix, rest = f"layers.{block.group(1)}.blocks.{block.group(2)}.", block.group(3)
            part = re.fullmatch(r"attention\.self\.(query|key|value)\.weight", rest)
            if part:
                qkv.setdefault(prefix, {})[part.group(1)] = value
                continue
            new = _rename(rest, HF_BLOCK_NAMES)
            new = prefix + new if new is not None else None
        elif merge:  # the merging keeps its stage index (end of stage i, as official)
            new = f"layers.{merge.group(1)}.downsample.{merge.group(2)}"
        else:
            new = _rename(key, HF_TOP_NAMES)
        if new is None:
            raise KeyError(f"no official name for HF key {key!r}")
        out[new] = value
    for prefix, parts in qkv.items():
        out[prefix + "attn.qkv.weight"] = torch.cat([parts[p] for p in qkv_order])
    return out


HF_CASES = {
    "64-w4": dict(image_size=64, window_size=4),
    "64-w8-pws4442": dict(image_size=64, window_size=8, pretrained_window_sizes=[4, 4, 4, 2]),
}


def _hf_pair(case: dict, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.Swinv2Config(
        patch_size=4,
        num_channels=3,
        embed_dim=ARCH["embed_dim"],
        depths=list(ARCH["depths"]),
        num_heads=list(ARCH["num_heads"]),
        num_labels=ARCH["num_classes"],
        mlp_ratio=4.0,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        use_absolute_embeddings=False,
        **case,
    )
    peer = transformers.Swinv2ForImageClassification(config).eval()
    randomize_(peer, seed)
    with torch.no_grad():
        # randomize_ spreads the first position-bias layer wider (it keys on the name cpb_mlp.0);
        # do the same under HF's name so the bias varies across offsets.
        for name, p in peer.named_parameters():
            if "continuous_position_bias_mlp.0." in name:
                p.mul_(10)
    ours = _ours(
        img_size=case["image_size"],
        window_size=case["window_size"],
        pretrained_window_sizes=case.get("pretrained_window_sizes", (0, 0, 0, 0)),
        **ARCH,
    )
    _load(ours, hf_to_official(peer.state_dict()))
    return peer, ours


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("name", list(HF_CASES))
def test_hf_parity(name, dtype, tol, monkeypatch):
    case = HF_CASES[name]
    if dtype == torch.float64:
        _peer_clamp(monkeypatch)
    peer, ours = _hf_pair(case, seed=20 + len(name))
    _cast(dtype, peer, ours)  # HF runs in float64 too
    x = _images(case["image_size"], seed=21).to(dtype)
    with torch.no_grad():
        _check(ours(x), peer(pixel_values=x).logits, tol, "logits")
        feats = ours.forward_features(x)
        _check(feats.flatten(1, 2), peer.swinv2(pixel_values=x).last_hidden_state, tol, "final normed tokens")
        # HF's stage outputs before downsampling, NCHW (the first entry is the embedding).
        emb, dims = peer.swinv2.embeddings(x)
        enc = peer.swinv2.encoder(emb, dims, output_hidden_states=True, output_hidden_states_before_downsampling=True)
        maps_peer = enc.reshaped_hidden_states[1:]
        maps_ours = ours.forward_intermediates(x, intermediates_only=True)
        assert len(maps_peer) == len(maps_ours) == 4
        for i, (a, b) in enumerate(zip(maps_ours, maps_peer)):
            _check(a, b, tol, f"stage {i} before downsampling")


def test_hf_parity_is_sensitive():
    """Parity is not vacuous: one changed position-bias weight, or q and k swapped in the
    qkv concatenation, make the logits differ clearly."""
    peer, ours = _hf_pair(HF_CASES["64-w8-pws4442"], seed=30)
    x = _images(64, seed=31)
    with torch.no_grad():
        ref = peer(pixel_values=x).logits
        assert rel_err(ours(x), ref) < F32_TOL
        ours.layers[0].blocks[1].attn.cpb_mlp[2].weight[0] += 0.5
        assert rel_err(ours(x), ref) > 1e-3
        swapped = _ours(img_size=64, window_size=8, pretrained_window_sizes=(4, 4, 4, 2), **ARCH)
        _load(swapped, hf_to_official(peer.state_dict(), qkv_order=("key", "query", "value")))
        assert rel_err(swapped(x), ref) > 1e-3


def test_hf_departs_after_odd_merge():
    """HF departure: at 56 px with window 7 the maps are 14, 7, 4, 2 (merging zero-pads the odd
    7x7 map), but HF fixes each stage's window at init from floor(grid / 2^i) = 14, 7, 3, 1.
    It then attends in 3x3 windows over the 4x4 map (padded to 6x6, padding not masked) and in
    1x1 windows (no attention at all) over the 2x2 map. swinv2, like timm (case 56-w7-odd-merge
    above), uses the actual ceil sizes and one 4x4 and one 2x2 window. The official code asserts
    on odd maps, so there is no official truth here."""
    peer, ours = _hf_pair(dict(image_size=56, window_size=7), seed=32)
    assert [b.window_size for b in peer.swinv2.encoder.layers[2].blocks] == [3, 3]
    assert ours.stage_windows()[2] == ((4, 4), (0, 0))
    x = _images(56, seed=33)
    with torch.no_grad():
        assert rel_err(ours(x), peer(pixel_values=x).logits) > 1e-3


# --------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------


def tv_to_official(state: dict) -> dict:
    """torchvision ``features.*`` state dict -> official names (peers.md §3.4).

    ``features.0.{0,2}`` is the stem conv and norm, ``features.{2i+1}.{j}`` block j of stage i,
    ``features.{2i+2}`` the merging after stage i. ``qkv.bias`` splits into q_bias and v_bias (the
    key slice is zeroed by torchvision at forward time). The coordinate/index buffers keep their
    names and ``load_pretrained`` drops them (checking the coordinates against its own)."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        if not m:
            out[key] = value  # norm.*, head.*
            continue
        f, rest = int(m.group(1)), m.group(2)
        if f == 0:
            sub, leaf = rest.split(".", 1)
            out[{"0": "patch_embed.proj.", "2": "patch_embed.norm."}[sub] + leaf] = value
        elif f % 2:
            j, rest = rest.split(".", 1)
            prefix = f"layers.{(f - 1) // 2}.blocks.{j}."
            if rest == "attn.qkv.bias":
                dim = value.numel() // 3
                out[prefix + "attn.q_bias"] = value[:dim]
                out[prefix + "attn.v_bias"] = value[2 * dim :]
                continue
            rest = re.sub(r"^mlp\.0\.", "mlp.fc1.", rest)
            rest = re.sub(r"^mlp\.3\.", "mlp.fc2.", rest)
            out[prefix + rest] = value
        else:
            out[f"layers.{(f - 2) // 2}.downsample.{rest}"] = value
    return out


# Only sizes where every stage map is a multiple of the window and the last stage equals it match
# official numerics (torchvision never shrinks a window; it drops the shift where window >= map).
TV_CASES = {
    "128-w4": dict(img_size=128, window_size=(4, 4)),  # maps 32, 16, 8, 4
    "64x128-w2x4": dict(img_size=(64, 128), window_size=(2, 4)),  # maps 16x32, ..., 2x4
}


def _tv_pair(case: dict, seed: int = 0):
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    peer = tv.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=ARCH["embed_dim"],
        depths=list(ARCH["depths"]),
        num_heads=list(ARCH["num_heads"]),
        window_size=list(case["window_size"]),
        stochastic_depth_prob=0.0,
        num_classes=ARCH["num_classes"],
        block=tv.SwinTransformerBlockV2,
        downsample_layer=tv.PatchMergingV2,
    ).eval()
    randomize_(peer, seed)
    with torch.no_grad():
        # randomize_ recognises norms by name; torchvision's stem norm is ``features.0.2``.
        stem_norm = peer.features[0][2]
        stem_norm.weight.mul_(4).add_(1)  # 0.05 r -> 1 + 0.2 r
        stem_norm.bias.mul_(2)  # 0.05 r -> 0.1 r
    ours = _ours(img_size=case["img_size"], window_size=case["window_size"], **ARCH)
    report = _load(ours, tv_to_official(peer.state_dict()))
    assert report.dropped and not report.notes, str(report)
    return peer, ours


def _tv_stage_maps(peer, x):
    maps = []
    for i, module in enumerate(peer.features):
        x = module(x)
        if i % 2:
            maps.append(x)  # NHWC, after stage (i - 1) // 2, before its merging
    return peer.norm(x), maps


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("name", list(TV_CASES))
def test_torchvision_parity(name, dtype, tol, monkeypatch):
    case = TV_CASES[name]
    if dtype == torch.float64:
        _peer_clamp(monkeypatch)
    peer, ours = _tv_pair(case, seed=40 + len(name))
    _cast(dtype, peer, ours)
    x = _images(case["img_size"], seed=41).to(dtype)
    with torch.no_grad():
        _check(ours(x), peer(x), tol, "logits")
        final_peer, maps_peer = _tv_stage_maps(peer, x)
        _check(ours.forward_features(x), final_peer, tol, "final normed map (NHWC)")
        maps_ours = ours.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        assert len(maps_ours) == len(maps_peer) == 4
        for i, (a, b) in enumerate(zip(maps_ours, maps_peer)):
            _check(a, b, tol, f"stage {i} (NHWC)")


def test_torchvision_parity_is_sensitive():
    """Parity is not vacuous: a changed query bias in one shifted block breaks it."""
    peer, ours = _tv_pair(TV_CASES["128-w4"], seed=50)
    x = _images(128, seed=51)
    with torch.no_grad():
        assert rel_err(ours(x), peer(x)) < F32_TOL
        ours.layers[1].blocks[1].attn.q_bias.add_(0.5)
        assert rel_err(ours(x), peer(x)) > 1e-3


def test_torchvision_departs_when_stage_is_smaller_than_window():
    """torchvision departure: at 64 px with window 8 the maps are 16, 8, 4, 2. torchvision never
    shrinks the window: it zero-pads the 4x4 and 2x2 maps to one 8x8 window, lets real tokens
    attend to the (unmasked) padding and evaluates the position-bias MLP on the 8x8 offset
    table. Official code and swinv2 shrink the window to 4x4 and 2x2 instead, so the outputs
    differ by far more than rounding."""
    peer, ours = _tv_pair(dict(img_size=64, window_size=(8, 8)), seed=52)
    assert ours.stage_windows()[2:] == [((4, 4), (0, 0)), ((2, 2), (0, 0))]
    x = _images(64, seed=53)
    with torch.no_grad():
        assert rel_err(ours(x), peer(x)) > 1e-3


# Every V1 switch: pre-norm blocks, scaled dot-product attention, the learned bias table, and
# patch merging's LayerNorm over the 4C concatenation before the reduction.
V1 = dict(norm_placement="pre", attn_type="dot", position_bias="table", merge_norm="pre")


def _tv_v1_pair(seed: int = 0):
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    case = TV_CASES["128-w4"]
    peer = tv.SwinTransformer(  # the V1 block and merging are torchvision's defaults
        patch_size=[4, 4], embed_dim=ARCH["embed_dim"], depths=list(ARCH["depths"]),
        num_heads=list(ARCH["num_heads"]), window_size=list(case["window_size"]), stochastic_depth_prob=0.0,
        num_classes=ARCH["num_classes"],
    ).eval()
    randomize_(peer, seed)
    with torch.no_grad():
        stem_norm = peer.features[0][2]  # (see _tv_pair)
        stem_norm.weight.mul_(4).add_(1)
        stem_norm.bias.mul_(2)
    ours = _ours(img_size=case["img_size"], window_size=case["window_size"], **ARCH, **V1)
    # torchvision's V1 keeps a key bias; it adds q.b_k to every score of a query row alike,
    # which the softmax cancels, so the official layout's q and v biases carry the same model
    _load(ours, tv_to_official(peer.state_dict()))
    return peer, ours


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_every_v1_switch_gives_torchvisions_swin_v1(dtype, tol):
    peer, ours = _tv_v1_pair(seed=60)
    _cast(dtype, peer, ours)
    x = _images(128, seed=61).to(dtype)
    with torch.no_grad():
        _check(ours(x), peer(x), tol, "logits")
        final_peer, maps_peer = _tv_stage_maps(peer, x)
        maps_ours = ours.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        for i, (a, b) in enumerate(zip(maps_ours, maps_peer)):
            _check(a, b, tol, f"stage {i} (NHWC)")
        assert rel_err(swinv2.fast.apply(ours)(x), peer(x)) < tol  # and with the speedups


def test_v1_patch_merging_order_matters():
    """Parity is not vacuous: the V2 merging order (LayerNorm after the reduction, over 2C)
    cannot hold torchvision's V1 weights."""
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    peer = tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4],
                              num_classes=10)
    ours = _ours(img_size=64, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=10,
                 pretrained_window_sizes=(0, 0),
                 **dict(V1, merge_norm="post"))
    report = swinv2.load_pretrained(ours, tv_to_official(peer.state_dict()), strict=False)
    assert not report.ok and any("downsample.norm" in name for name, _, _ in report.mismatched), str(report)
