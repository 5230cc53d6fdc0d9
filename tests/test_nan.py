"""NaN in, NaN out: the native window-attention kernel puts NaN and infinities where PyTorch's
attention puts them, and a NaN pixel makes its own image's logits NaN (and no other image's)
on every attention path of the plain model and of the fast one."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import swinv2
from swinv2 import fast
from swinv2.fast import native
from swinv2.fast.attention import FastWindowAttention

try:
    from helpers import native_kernel_here, randomize_
except ImportError:  # collected as the ``tests`` package
    from tests.helpers import native_kernel_here, randomize_

needs_kernel = pytest.mark.skipif(not native_kernel_here(), reason=f"native kernel {native.status()}")


@pytest.fixture(autouse=True)
def asked_for(monkeypatch):
    """The kernel is opt-in: asked for during each test here (and the switch restored after)."""
    monkeypatch.setattr(native, "_switch", {"on": True})

NAN, INF = float("nan"), float("inf")
B, H, NW = 4, 3, 2  # windows, heads, bias windows (shifted-window masks)


def _inputs(N, dtype, seed):
    """Strided q, k, v views of one qkv tensor in ``dtype``, per-head scales (one at the clamp)
    and model-like biases: 16 sigmoid-bounded, -100 between shifted regions."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, 32, generator=g).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    bias = 16 * torch.rand(NW, H, N, N, generator=g)
    bias[:, :, : N // 2, N // 2 :] -= 100.0
    return q, k, v, bias, torch.tensor([100.0, 12.5, 1.0])


def _pytorch(q, k, v, bias, scale, explicit: bool):
    """PyTorch's attention on the kernel's inputs widened to float32 (as the kernel reads
    them): scaled_dot_product_attention, or the explicit softmax of the reference path."""
    q, k, v = q.float(), k.float(), v.float()
    if scale is not None:
        q, k = F.normalize(q, dim=-1) * scale.view(-1, 1, 1), F.normalize(k, dim=-1)
    else:
        q = q * 32**-0.5
    mask = bias.repeat(B // bias.shape[0], 1, 1, 1)
    if explicit:
        return (q @ k.transpose(-2, -1) + mask).softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def _native(q, k, v, bias, scale):
    return native.window_attention(q if scale is not None else q * 32**-0.5, k, v, bias, scale)


def _same_specials(got, want, dtype):
    """NaN exactly where ``want`` has it, the same infinities, and the finite values as close
    as the kernel's float32 (or its bfloat16 output's rounding) allows."""
    got = got.float()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (
        f"NaN at {torch.isnan(got).sum().item()} outputs, PyTorch {torch.isnan(want).sum().item()}")
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)])
    if finite.any():
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        peak = want[finite].abs().max().item()
        torch.testing.assert_close(got[finite], want[finite], rtol=tol, atol=tol * peak)


# Where a special value goes: (tensor, index). q and k rows cover a row in the first and in the
# last block of 16 keys (the padded one when N is not a multiple of 16).
PLACES = {
    "q": ("q", (1, 0, 3, 5)),
    "q-last": ("q", (3, 2, -1, 0)),
    "k": ("k", (2, 1, -1, 0)),
    "k-first": ("k", (0, 2, 0, 17)),
    "v": ("v", (0, 2, 7, 31)),
    "bias": ("bias", (1, 1, 2, -1)),
    "bias-masked": ("bias", (0, 0, 0, -1)),  # in the -100 region
}


def _place(tensors: dict, where: str, value: float) -> None:
    name, index = PLACES[where]
    tensors[name][index] = value


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("N", [16, 49, 81])  # one block, scores in registers, scores in memory
def test_kernel_puts_nan_and_inf_where_pytorch_does(N, cosine, dtype, one_thread):
    for (where, value), explicit in itertools.product(
            itertools.product(PLACES, [NAN, INF, -INF]), [False, True]):
        q, k, v, bias, scale = _inputs(N, dtype, seed=N)
        t = dict(q=q, k=k, v=v, bias=bias)
        _place(t, where, value)
        s = scale if cosine else None
        want = _pytorch(q, k, v, bias, s, explicit)
        if math.isnan(value) or where.startswith(("q", "k")) or (where == "bias" and value == INF):
            assert torch.isnan(want).any()  # the case means something
        try:
            _same_specials(_native(q, k, v, bias, s), want, dtype)
        except AssertionError as err:
            raise AssertionError(f"{value} in {where} ({'explicit softmax' if explicit else 'SDPA'}): {err}") from None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cosine", [False, True])
def test_kernel_with_several_specials_at_once(cosine, dtype):
    """A weight of exactly 0 (a -inf bias, or a score below float32's exp range) times an
    infinite v is NaN, as in PyTorch; a NaN logit scale makes its head NaN."""
    N = 49
    q, k, v, bias, scale = _inputs(N, dtype, seed=3)
    bias[0, 1, 5, 9] = -INF
    v[0, 1, 9, 4] = INF  # window 0, head 1: row 5 weighs key 9 by 0 -> NaN there only
    bias[1, 0, :, 20] = -1000.0  # e^-1000 is 0 in float32: the whole v column NaN...
    v[1, 0, 20, 6] = -INF  # ...in window 1 (bias window 1), head 0
    v[3, 2, 30, 0] = NAN  # a NaN v poisons its output column, weight 0 or not
    s = scale.clone()
    if cosine:
        s[2] = NAN
    for explicit in (False, True):
        want = _pytorch(q, k, v, bias, s if cosine else None, explicit)
        got = _native(q, k, v, bias, s if cosine else None)
        assert torch.isnan(want[0, 1, 5, 4]) and torch.isnan(want[1, 0, :, 6]).all()
        _same_specials(got, want, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_fully_masked_rows_are_zero_as_in_scaled_dot_product_attention(dtype):
    """A row whose every score is -inf gets weights 0 (not NaN from -inf + inf, not uniform
    weights): output 0, or NaN in the columns where v holds a NaN."""
    N = 81
    q, k, v, bias, _ = _inputs(N, dtype, seed=5)
    bias[0, 1, 4, :] = -INF
    bias[1, 2, N - 1, :] = -INF
    v[2, 1, 3, 7] = NAN  # window 2 uses bias window 0
    got = _native(q, k, v, bias, None).float()
    want = _pytorch(q, k, v, bias, None, explicit=False)
    assert torch.equal(got[0, 1, 4], torch.zeros(32)) and torch.equal(got[1, 2, N - 1], torch.zeros(32))
    assert torch.isnan(got[2, 1, :, 7]).all() and torch.isnan(got[2, 1]).sum() == N
    _same_specials(got, want, dtype)


# -- the whole model ------------------------------------------------------------------------

# 32-wide heads in every stage, where the native kernel applies
ARCH32 = dict(img_size=64, window_size=4, embed_dim=64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))


def _model(kind: str, sped_up: bool = True):
    """The plain model, or the fast one with the native kernel asked for."""
    if kind == "debug":  # 16-wide heads: PyTorch's kernels only
        model = randomize_(swinv2.create_model("swinv2_debug", num_classes=5, fast=False), 1)
    else:
        model = randomize_(swinv2.SwinTransformerV2(num_classes=5, **ARCH32), 1)
    return fast.apply(model, native=True) if sped_up else model


def _set_paths(model, native_on: bool, fused: bool, sequential: bool, chunking: bool) -> None:
    for m in model.modules():
        if isinstance(m, FastWindowAttention):
            m.use_native = native_on
    model.set_fused_attn(fused)
    model.set_sequential_attention(True if sequential else False, chunk_windows=1 if sequential else None)
    if hasattr(model, "set_batch_chunking"):
        model.set_batch_chunking(0.001 if chunking else None)


def _count_native_calls(monkeypatch) -> list:
    calls: list = []
    real = native.window_attention

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(native, "window_attention", counting)
    return calls


# (name, native, fused): the native kernel, PyTorch's fused attention, the explicit reference
ATTENTION = [("native", True, True), ("sdpa", False, True), ("reference", False, False)]
# (name, grad enabled, training)
MODES = [("inference", False, False), ("grad-eval", True, False), ("train", True, True)]


@pytest.mark.parametrize("sped_up", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("kind", ["debug", "heads32"])
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_a_nan_pixel_makes_its_own_image_nan_on_every_path(kind, bf16, sped_up, monkeypatch, one_thread):
    """Images are independent in SwinV2 (windows never mix images; no batch statistics), so a
    NaN pixel in image 1 makes image 1's logits NaN, all of them, and no other image's: on
    every attention path, sequential or batched, chunked batch or whole, with or without
    gradients."""
    model = _model(kind, sped_up)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x[1, 0, 10, 20] = NAN
    calls = _count_native_calls(monkeypatch)
    wrong = []
    paths = ATTENTION if sped_up else [a for a in ATTENTION if not a[1]]  # the kernel is a speedup
    for (att, native_on, fused), sequential, chunking, (mode, grad, train) in itertools.product(
            paths, [False, True], [False, True] if sped_up else [False], MODES):
        _set_paths(model, native_on, fused, sequential, chunking)
        model.train(train)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            nan = torch.isnan(model(x).float())
        if not (nan[1].all() and not nan[[0, 2]].any()):
            wrong.append(f"{att} sequential={sequential} chunked={chunking} {mode}: NaN per image "
                         f"{nan.sum(1).tolist()}")
    assert not wrong, "\n".join(wrong)
    if kind == "heads32" and sped_up and native.available():
        assert calls  # the native kernel was on the paths that take it


@needs_kernel
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("weight", ["logit_scale", "q_bias"])
def test_a_nan_reaching_only_q_makes_the_logits_nan(weight, bf16, monkeypatch, one_thread):
    """A NaN that reaches q but not v (a NaN logit scale or q bias of one head): every score of
    that head is NaN, and so is the output, with the native kernel as without it and on the
    plain model (a clamp before the exponential once turned such rows into uniform attention
    and finite logits)."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calls = _count_native_calls(monkeypatch)
    for sped_up, native_on in ((True, True), (True, False), (False, False)):
        model = _model("heads32", sped_up).eval()
        with torch.no_grad():
            getattr(model.layers[2].blocks[1].attn, weight).view(-1)[0] = NAN
        _set_paths(model, native_on, fused=True, sequential=False, chunking=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            assert torch.isnan(model(x).float()).all(), f"fast={sped_up} native={native_on}"
    assert calls
