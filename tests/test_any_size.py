"""Any-size inputs: padding, per-axis windows, shifted-window masks, odd patch merging.

The oracle here is written from the promised semantics alone, token by token, without
swinv2's window helpers (``window_partition``, ``attention_mask``, ``effective_window``):

- per axis: a map side <= window side gets one global window of the map's side and no
  shift; otherwise the window side, and shift = window // 2 on odd-indexed blocks only;
- the map is zero-padded at the bottom/right to whole windows, then rolled by -shift;
- a real token attends to the real tokens of its window only (padded keys are excluded);
  keys from another region of the official 3x3 shift labelling (made on the padded, rolled
  map) get -100 added to the logit;
- patch merging zero-pads an odd map at the bottom/right first.

The only model pieces it borrows are per-token ones (qkv/proj weights, LayerNorms, MLP,
patch embedding) and ``attn.relative_bias(window)`` for the (nH, N, N) bias of a window,
which it indexes itself by in-window positions.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_, rel_err

import swinv2
import swinv2.blocks
import swinv2.windows

TOL = 1e-10
# The official clamp is built from a float32 tensor, so its ceiling is float32(ln 100),
# which differs from the float64 ln 100 by ~6e-8 (visible at a 1e-10 tolerance).
LN100_F32 = float(torch.log(torch.tensor(100.0, dtype=torch.float32)))
SHIFT_PENALTY = -100.0


# --------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------


def make_model(window, img_size=(32, 32), seed=0, **kwargs) -> swinv2.SwinTransformerV2:
    """A tiny randomised float64 model: C=16, 2 heads in stage 0. With the default log-CPB,
    every parameter shape is independent of window and size, so equal seeds give equal weights."""
    model = swinv2.SwinTransformerV2(
        img_size=img_size, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4),
        window_size=window, num_classes=0, drop_path_rate=0.0, **kwargs,
    )
    randomize_(model, seed)
    return model.double().eval()


def rand_map(B, H, W, C, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, W, C, generator=gen, dtype=torch.float64)


def as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# --------------------------------------------------------------------------------------
# Brute-force oracle
# --------------------------------------------------------------------------------------


def axis_rule(side: int, window: int) -> tuple[int, int]:
    """(window, shift) on one axis: global and unshifted when the map fits in the window."""
    return (side, 0) if side <= window else (window, window // 2)


def schedule(H, W, window, depth, rule="per_axis"):
    """[(window, shift)] for each block of a stage on an (H, W) map."""
    wh, ww = as_pair(window)
    if rule == "per_axis":
        (win_h, sh), (win_w, sw) = axis_rule(H, wh), axis_rule(W, ww)
        win, shift = (win_h, win_w), (sh, sw)
    else:  # official: compare min(H, W) with the (square) window; use it on both axes
        assert wh == ww
        win, shift = ((min(H, W),) * 2, (0, 0)) if min(H, W) <= wh else ((wh, wh), (wh // 2, wh // 2))
    return [(win, shift if i % 2 else (0, 0)) for i in range(depth)]


def region_label(i: int, padded: int, window: int, shift: int) -> int:
    """Official 3-slice labelling of one axis, in padded-and-rolled coordinates:
    [0, P-w) -> 0, [P-w, P-s) -> 1, [P-s, P) -> 2; a single label when unshifted."""
    if shift == 0:
        return 0
    return 0 if i < padded - window else (1 if i < padded - shift else 2)


def token_layout(H, W, window, shift):
    """For every real token (r, c): its window id, in-window index and shift region,
    read off the padded and rolled map; plus the real tokens of each window."""
    (wh, ww), (sh, sw) = window, shift
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    info, members = {}, {}
    for r in range(H):
        for c in range(W):
            # torch.roll(x, -s)[i] == x[(i + s) % P], so padded position r sits at (r - s) % P.
            rr, cc = (r - sh) % Hp, (c - sw) % Wp
            win = (rr // wh, cc // ww)
            n = (rr % wh) * ww + (cc % ww)
            reg = (region_label(rr, Hp, wh, sh), region_label(cc, Wp, ww, sw))
            info[(r, c)] = (win, n, reg)
            members.setdefault(win, []).append((r, c))
    return info, members


def ref_attention(block, x, window, shift, pad_value=None, shift_penalty=SHIFT_PENALTY):
    """Attention branch (B, H, W, C) -> (B, H, W, C), one query token at a time.

    ``pad_value``: None excludes padded keys (the promise); a number instead lets the
    padded zero tokens in as keys with that logit offset in place of any region penalty,
    as a mask filled with that value would (used to show the oracle can tell).
    """
    attn = block.attn
    B, H, W, C = x.shape
    nH = attn.num_heads
    d = C // nH
    wq, wk, wv = attn.qkv.weight.split(C, dim=0)
    q = (x @ wq.T + attn.q_bias).view(B, H, W, nH, d)
    k = (x @ wk.T).view(B, H, W, nH, d)  # no key bias
    v = (x @ wv.T + attn.v_bias).view(B, H, W, nH, d)
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    scale = torch.clamp(attn.logit_scale.view(nH), max=LN100_F32).exp()  # (nH,)
    rel = attn.relative_bias(window)  # (nH, N, N), in-window row-major indices
    (wh, ww), (sh, sw) = window, shift
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    info, members = token_layout(H, W, window, shift)

    # Padded tokens of each window (zeros before qkv: k = 0 so cos = 0, v = v_bias).
    pads = {}
    if pad_value is not None:
        for r in range(Hp):
            for c in range(Wp):
                if r >= H or c >= W:
                    rr, cc = (r - sh) % Hp, (c - sw) % Wp
                    pads.setdefault((rr // wh, cc // ww), []).append((rr % wh) * ww + cc % ww)

    out = torch.empty(B, H, W, C, dtype=x.dtype)
    for (r, c), (win, n, reg) in info.items():
        keys = members[win]
        kr = torch.tensor([t[0] for t in keys])
        kc = torch.tensor([t[1] for t in keys])
        kn = torch.tensor([info[t][1] for t in keys])
        penalty = torch.tensor(
            [0.0 if info[t][2] == reg else shift_penalty for t in keys], dtype=x.dtype
        )
        logits = torch.einsum("bhd,bkhd->bhk", q[:, r, c], k[:, kr, kc]) * scale[None, :, None]
        logits = logits + rel[:, n, kn][None] + penalty  # (B, nH, K)
        vals = v[:, kr, kc]  # (B, K, nH, d)
        if pads.get(win):
            pn = torch.tensor(pads[win])
            pad_logits = (rel[:, n, pn][None] + pad_value).expand(B, nH, len(pn))
            logits = torch.cat([logits, pad_logits], dim=-1)
            pad_vals = attn.v_bias.view(1, 1, nH, d).expand(B, len(pn), nH, d)
            vals = torch.cat([vals, pad_vals], dim=1)
        p = torch.softmax(logits, dim=-1)
        out[:, r, c] = torch.einsum("bhk,bkhd->bhd", p, vals).reshape(B, C)
    return attn.proj(out)


def ref_block(block, x, window, shift, **kwargs):
    assert block.norm_placement == "res_post" and block.norm3 is None
    x = x + block.norm1(ref_attention(block, x, window, shift, **kwargs))
    return x + block.norm2(block.mlp(x))


def ref_stage_blocks(stage, x, window, rule="per_axis", **kwargs):
    """The stage's blocks with windows and shifts chosen by the oracle's own rule."""
    plan = schedule(x.shape[1], x.shape[2], window, len(stage.blocks), rule)
    for block, (win, shift) in zip(stage.blocks, plan, strict=True):
        x = ref_block(block, x, win, shift, **kwargs)
    return x


def ref_merge(merge, x):
    """Zero-pad to even sides, concat (0,0), (1,0), (0,1), (1,1), reduce, norm."""
    B, H, W, C = x.shape
    xp = torch.zeros(B, H + H % 2, W + W % 2, C, dtype=x.dtype)
    xp[:, :H, :W] = x
    cat = torch.cat([xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], dim=-1)
    return merge.norm(cat @ merge.reduction.weight.T)


def ref_model_features(model, img, window):
    """Unpooled final features of the whole network (no APE), from the oracle."""
    x = model.patch_embed(img)
    for stage in model.layers:
        x = ref_stage_blocks(stage, x, window)
        if stage.downsample is not None:
            x = ref_merge(stage.downsample, x)
    return model.norm(x)


# --------------------------------------------------------------------------------------
# Official-style reference: the official code path, for maps the window divides
# --------------------------------------------------------------------------------------


def official_block(block, x, ws, shift):
    """Roll, view-partition into ws x ws windows, -100 mask from img_mask slices, attend."""
    attn = block.attn
    B, H, W, C = x.shape
    nH, N = attn.num_heads, ws * ws
    shortcut = x
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    win = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, N, C)
    mask = None
    if shift:
        img_mask = torch.zeros(1, H, W, 1)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                img_mask[:, hs, wsl, :] = cnt
                cnt += 1
        mw = img_mask.view(1, H // ws, ws, W // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, N)
        mask = (mw[:, None, :] - mw[:, :, None]).ne(0).double() * -100.0  # (nW, N, N)
    bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = F.linear(win, attn.qkv.weight, bias).reshape(-1, N, 3, nH, C // nH).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    a = a * torch.clamp(attn.logit_scale, max=LN100_F32).exp()
    a = a + attn.relative_bias((ws, ws)).unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        a = (a.view(-1, nW, nH, N, N) + mask[None, :, None]).view(-1, nH, N, N)
    out = attn.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(-1, N, C))
    out = out.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    x = shortcut + block.norm1(out)
    return x + block.norm2(block.mlp(x))


# --------------------------------------------------------------------------------------
# Stage outputs vs the oracle
# --------------------------------------------------------------------------------------

# (H, W, configured window): what each case exercises.
STAGE_CASES = [
    (8, 8, 4),          # divides, shift (2, 2); official semantics too
    (8, 12, 4),         # divides, non-square map, shift (2, 2); official semantics too
    (9, 8, 4),          # pad H only (3 != shift 2)
    (8, 10, 4),         # pad W only (2 == shift 2)
    (9, 9, 4),          # pad both (3 != shift)
    (10, 10, 4),        # pad both (2 == shift)
    (7, 10, 4),         # pad H 1, pad W 2
    (5, 13, (4, 6)),    # non-square window, pad H 3 (shift 2), pad W 5 (shift 3)
    (7, 11, (3, 5)),    # non-square odd window, pad H 2 (shift 1), pad W 4 (shift 2)
    (13, 13, 5),        # odd window, pad 2 == shift 2
    (3, 10, 4),         # H shrinks to a global 3-window, W padded and shifted
    (4, 11, 4),         # H equal to the window: global, no shift; W padded and shifted
    (11, 5, (4, 6)),    # W shrinks to 5, no shift; H padded (1) and shifted
    (1, 9, 4),          # a one-row map
]


@pytest.mark.parametrize("H,W,window", STAGE_CASES)
def test_stage_matches_bruteforce(H, W, window):
    stage = make_model(window).layers[0]
    x = rand_map(2, H, W, 16)
    with torch.no_grad():
        out = stage.forward_blocks(x)
        ref = ref_stage_blocks(stage, x, window)
    assert out.shape == x.shape
    err = rel_err(out, ref)
    assert err < TOL, f"{H}x{W} window {window}: rel_err {err:.3e}"


@pytest.mark.parametrize("H,W", [(8, 8), (8, 12), (16, 8)])
def test_divisible_maps_match_official_code_path(H, W):
    ws = 4
    stage = make_model(ws).layers[0]
    x = rand_map(2, H, W, 16, seed=3)
    with torch.no_grad():
        out = stage.forward_blocks(x)
        off = x
        for i, block in enumerate(stage.blocks):
            off = official_block(block, off, ws, ws // 2 if i % 2 else 0)
        ref = ref_stage_blocks(stage, x, ws)
    assert rel_err(out, off) < TOL
    assert rel_err(ref, off) < TOL  # the brute-force oracle agrees with the official path


# Note: the region mask only separates two REAL tokens on a padded axis when
# pad < window - shift; otherwise the cut-off region of the last window holds padding only.
# (7, 10, 4): H pad 1 < 2, so both masks matter; (13, 13, 5): pad 2 < 3 on both axes.
@pytest.mark.parametrize("H,W,window", [(7, 10, 4), (13, 13, 5)])
def test_oracle_detects_wrong_semantics(H, W, window, monkeypatch):
    """The comparison fails if padded keys are attended, if the shift region mask is
    dropped, or if the shift is skipped."""
    stage = make_model(window).layers[0]
    x = rand_map(2, H, W, 16)
    with torch.no_grad():
        good = ref_stage_blocks(stage, x, window)
        assert rel_err(stage.forward_blocks(x), good) < TOL
        # Oracle variants with the wrong semantics disagree with the model ...
        wrong_shift = x
        for block, (win, _) in zip(stage.blocks, schedule(H, W, window, 2), strict=True):
            wrong_shift = ref_block(block, wrong_shift, win, (0, 0))
        assert rel_err(wrong_shift, good) > 1e-3
        no_region_mask = ref_stage_blocks(stage, x, window, shift_penalty=0.0)
        assert rel_err(no_region_mask, good) > 1e-3
        attend_pad = ref_stage_blocks(stage, x, window, pad_value=0.0)
        assert rel_err(attend_pad, good) > 1e-3
        # ... and a model with padded keys let in (mask value 0) matches that variant only.
        monkeypatch.setattr(swinv2.windows, "PAD_MASK_VALUE", 0.0)
        stage.clear_masks()
        bad = stage.forward_blocks(x)
    assert rel_err(bad, good) > 1e-3
    assert rel_err(bad, attend_pad) < TOL


# --------------------------------------------------------------------------------------
# Locality and padding invariance
# --------------------------------------------------------------------------------------


def _block_call(stage, block_index, x):
    """Run one block of the stage the way forward_blocks calls it."""
    H, W = x.shape[1:3]
    window, shift = stage.window_and_shift((H, W))
    shift = shift if block_index % 2 else (0, 0)
    mask = swinv2.windows.attention_mask((H, W), window, shift)
    return stage.blocks[block_index](x, window, shift, mask)


@pytest.mark.parametrize("H,W,window,token", [(9, 9, 4, (0, 0)), (9, 9, 4, (5, 7)), (7, 10, (4, 6), (6, 1))])
def test_token_depends_only_on_its_window(H, W, window, token):
    stage = make_model(window).layers[0]
    (win, shift) = schedule(H, W, window, 2)[1]
    info, members = token_layout(H, W, win, shift)
    own = set(members[info[token][0]])
    assert 1 < len(own) < H * W
    x = rand_map(2, H, W, 16)
    outside = torch.ones(H, W, 1, dtype=torch.bool)
    for r, c in own:
        outside[r, c] = False
    noise = rand_map(2, H, W, 16, seed=9)
    with torch.no_grad():
        base = _block_call(stage, 1, x)
        moved = _block_call(stage, 1, torch.where(outside, x + noise, x))
        r, c = token
        assert torch.equal(base[:, r, c], moved[:, r, c])
        # Sensitivity: moving one other token of the same window and region changes the output.
        other = next(t for t in sorted(own) if t != token and info[t][2] == info[token][2])
        y = x.clone()
        y[:, other[0], other[1]] += 1.0
        changed = _block_call(stage, 1, y)
    assert (changed[:, r, c] - base[:, r, c]).abs().max() > 1e-4


class _RandomPadF:
    """Stand-in for torch.nn.functional in swinv2.blocks whose pad fills the new cells with
    random values instead of zeros."""

    def __init__(self, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = 0

    def __getattr__(self, name):
        return getattr(F, name)

    def pad(self, x, pad, *args, **kwargs):
        self.calls += 1
        out = F.pad(x, pad, *args, **kwargs)
        real = torch.zeros(out.shape[1:3] + (1,), dtype=torch.bool)
        real[: x.shape[1], : x.shape[2]] = True
        noise = 3 * torch.randn(out.shape, generator=self.gen, dtype=out.dtype)
        return torch.where(real, out, noise)


@pytest.mark.parametrize("H,W,window", [(9, 9, 4), (5, 13, (4, 6)), (3, 10, 4)])
def test_padding_values_do_not_matter(H, W, window, monkeypatch):
    x = rand_map(2, H, W, 16)
    stage = make_model(window).layers[0]
    with torch.no_grad():
        zero_pad = stage.forward_blocks(x)
        fake_f = _RandomPadF()
        monkeypatch.setattr(swinv2.blocks, "F", fake_f)
        noisy_pad = stage.forward_blocks(x)
        assert fake_f.calls == len(stage.blocks)  # every block padded, with noise
        assert rel_err(noisy_pad, zero_pad) < 1e-14
        # Sensitivity: once padded keys are attended, their values show through.
        monkeypatch.setattr(swinv2.windows, "PAD_MASK_VALUE", 0.0)
        stage.clear_masks()
        leaky_noisy = stage.forward_blocks(x)
        monkeypatch.setattr(swinv2.blocks, "F", F)
        leaky_zero = stage.forward_blocks(x)
    assert rel_err(leaky_noisy, leaky_zero) > 1e-3


# --------------------------------------------------------------------------------------
# Patch merging
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("H,W", [(7, 9), (7, 8), (8, 9), (1, 1), (6, 4)])
def test_odd_patch_merging_zero_pads(H, W):
    merge = make_model(4).layers[0].downsample
    x = rand_map(2, H, W, 16)
    xp = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    with torch.no_grad():
        out = merge(x)
        assert out.shape == (2, math.ceil(H / 2), math.ceil(W / 2), 32)
        assert torch.equal(out, merge(xp))
        assert rel_err(out, ref_merge(merge, x)) < TOL
        # Padding at the top/left instead would give a different result.
        if H % 2 or W % 2:
            assert rel_err(merge(F.pad(x, (0, 0, W % 2, 0, H % 2, 0))), out) > 1e-3


# --------------------------------------------------------------------------------------
# Whole network at sizes the windows do not divide
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,window", [((36, 52), 4), ((100, 68), (5, 3))])
def test_full_model_any_size(size, window):
    model = make_model(window)
    gen = torch.Generator().manual_seed(5)
    img = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        feats = model.forward_features(img)
        pooled = model(img)
        ref = ref_model_features(model, img, window)
    res = [(math.ceil(size[0] / 4 / 2**i), math.ceil(size[1] / 4 / 2**i)) for i in range(4)]
    assert model.stage_resolutions(size) == res
    assert model.stage_windows(size) == [schedule(h, w, window, 2)[1] for h, w in res]
    assert feats.shape == (2, *res[-1], 128) and pooled.shape == (2, 128)
    assert torch.isfinite(feats).all() and torch.isfinite(pooled).all()
    assert rel_err(feats, ref) < TOL
    assert rel_err(pooled, ref.mean(dim=(1, 2))) < TOL


# --------------------------------------------------------------------------------------
# set_input_size and window rules
# --------------------------------------------------------------------------------------


def test_set_input_size_changes_windows_and_output():
    img = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = make_model(8, img_size=64)
    res = [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert model.stage_windows() == [schedule(h, w, 8, 2)[1] for h, w in res]
    assert model.stage_windows()[0] == ((8, 8), (4, 4))
    with torch.no_grad():
        before = model.forward_features(img)
        model.set_input_size(img_size=(64, 64), window_size=(4, 6))
        after = model.forward_features(img)
        fresh = make_model((4, 6), img_size=64)
        fresh.load_state_dict(model.state_dict())
        expected = fresh.forward_features(img)
        ref = ref_model_features(model, img, (4, 6))
    windows = model.stage_windows()
    assert windows == [schedule(h, w, (4, 6), 2)[1] for h, w in res]
    assert windows[0] == ((4, 6), (2, 3)) and windows[2] == ((4, 4), (0, 0))
    assert rel_err(after, before) > 1e-3
    assert rel_err(after, expected) < TOL
    assert rel_err(after, ref) < TOL


@pytest.mark.parametrize("kwargs", [{}, {"ape": True, "position_bias": "table"}])
def test_set_input_size_equals_model_built_at_size(kwargs):
    size, window = (64, 48), 8
    built = make_model(window, img_size=size, **kwargs)
    other = make_model(4, img_size=(32, 32), seed=7, **kwargs)
    other.set_input_size(img_size=size, window_size=window)
    other.load_state_dict(built.state_dict())
    assert other.img_size == built.img_size == size
    assert other.stage_windows() == built.stage_windows()
    img = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        a, b = built(img), other(img)
        assert rel_err(b, a) < TOL
        # The weights matter: before loading, `other` (another seed) disagrees.
        fresh = make_model(4, img_size=(32, 32), seed=7, **kwargs)
        fresh.set_input_size(img_size=size, window_size=window)
        assert rel_err(fresh(img), a) > 1e-3


def test_official_vs_per_axis_window_rule():
    size = (32, 64)  # stage maps 8x16, 4x8, 2x4, 1x2
    per_axis = make_model(8, img_size=size)
    official = copy.deepcopy(per_axis)
    official.set_input_size(window_rule="official")
    built_official = make_model(8, img_size=size, window_rule="official")
    assert per_axis.stage_windows() == [((8, 8), (0, 4)), ((4, 8), (0, 0)), ((2, 4), (0, 0)), ((1, 2), (0, 0))]
    expected_official = [((8, 8), (0, 0)), ((4, 4), (0, 0)), ((2, 2), (0, 0)), ((1, 1), (0, 0))]
    assert official.stage_windows() == built_official.stage_windows() == expected_official
    img = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = rand_map(2, 8, 16, 16)
    with torch.no_grad():
        assert rel_err(official(img), per_axis(img)) > 1e-3
        assert rel_err(official(img), built_official(img)) < TOL
        # Stage 0 under each rule against the oracle with that rule's windows.
        s_off = official.layers[0].forward_blocks(x)
        s_per = per_axis.layers[0].forward_blocks(x)
        assert rel_err(s_off, ref_stage_blocks(official.layers[0], x, 8, rule="official")) < TOL
        assert rel_err(s_per, ref_stage_blocks(per_axis.layers[0], x, 8)) < TOL
    assert rel_err(s_off, s_per) > 1e-3
