"""The native window-attention kernel (swinv2.fast.native), float32 and bfloat16: against
PyTorch's attention in float64, inside the fast model against the plain model and against timm
at 32-wide heads (the width every SwinV2 size uses, and the only one the kernel takes), and its
fallbacks: not asked for (the default), no compiler, a cache folder others can write, a corrupt
cached library, a kernel that computes the wrong thing."""

from __future__ import annotations

import copy
import stat
import warnings

import pytest
import torch
import torch.nn.functional as F

import swinv2
from swinv2 import fast
from swinv2.fast import native, onednn
from swinv2.fast.attention import FastWindowAttention
from swinv2.layers import WindowAttention

try:
    from helpers import export_holding_only_pytorch_operators, native_kernel_here, randomize_, rel_err
    from test_peer_parity import _load, _timm_class, timm_to_official
except ImportError:  # collected as the ``tests`` package
    from tests.helpers import export_holding_only_pytorch_operators, native_kernel_here, randomize_, rel_err
    from tests.test_peer_parity import _load, _timm_class, timm_to_official

needs_kernel = pytest.mark.skipif(not native_kernel_here(), reason=f"native kernel {native.status()}")


@pytest.fixture(autouse=True)
def asked_for(monkeypatch):
    """The kernel is opt-in: asked for during each test here (and the switch restored after)."""
    monkeypatch.setattr(native, "_switch", {"on": True})

# d = 32 in every stage (widths 64..512)
ARCH32 = dict(embed_dim=64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), num_classes=10)


def _qkv(B, H, N, seed=0, scale=10.0):
    """Cosine-attention-like q, k, v: strided (B, H, N, 32) views of one qkv tensor."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, 32, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    s = torch.full((H, 1, 1), scale)
    s[0] = 100.0  # a head at the clamp: the largest logits the model can produce
    return F.normalize(q, dim=-1) * s, F.normalize(k, dim=-1), v


def _truth(q, k, v, bias):
    B = q.shape[0]
    mask = None if bias is None else bias.double().repeat(B // bias.shape[0], 1, 1, 1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=1.0)


@needs_kernel
@pytest.mark.parametrize("N", [1, 7, 16, 49, 63, 64, 81, 144, 256])
@pytest.mark.parametrize("bias_kind", ["none", "shared", "per-window"])
def test_kernel_matches_float64_attention(N, bias_kind):
    B, H, nW = 6, 3, 3
    q, k, v = _qkv(B, H, N, seed=N)
    g = torch.Generator().manual_seed(1)
    bias = None
    if bias_kind != "none":
        bias = 16 * torch.rand(1 if bias_kind == "shared" else nW, H, N, N, generator=g)
        if bias_kind == "per-window":  # shifted-window masks: -100 between regions
            bias[:, :, : N // 2, N // 2 :] -= 100.0
    want = _truth(q, k, v, bias)
    got = native.window_attention(q, k, v, bias)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert got.transpose(1, 2).is_contiguous()  # (B, N, H, d) memory: the projection reads it as is
    assert rel_err(got, want) < 1e-6
    # as close to the truth as PyTorch's own float32 kernel (with margin)
    mask = None if bias is None else bias.repeat(B // bias.shape[0], 1, 1, 1)
    ref32 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    assert rel_err(got, want) < 3 * rel_err(ref32, want) + 1e-7


@needs_kernel
def test_kernel_rejects_a_bias_of_the_wrong_shape():
    q, k, v = _qkv(4, 2, 16)
    with pytest.raises(ValueError, match=r"bias must be float32 \(nb, 2, 16, 16\) on the CPU with nb dividing 4"):
        native.window_attention(q, k, v, torch.zeros(3, 2, 16, 16))
    with pytest.raises(ValueError, match="bias must be"):
        native.window_attention(q, k, v, torch.zeros(1, 2, 16, 15))
    with pytest.raises(ValueError, match="bias must be"):
        native.window_attention(q, k, v, torch.zeros(0, 2, 16, 16))


@needs_kernel
def test_kernel_rejects_inputs_it_would_misread():
    q, k, v = _qkv(4, 2, 16)
    with pytest.raises(ValueError, match=r"must be \(B_, nH, N, 32\) of one shape"):
        native.window_attention(q[..., :16], k[..., :16], v[..., :16], None)
    with pytest.raises(ValueError, match="of one shape"):
        native.window_attention(q, k[:, :, :8], v, None)
    with pytest.raises(ValueError, match="one dtype, float32 or bfloat16; got torch.float64"):
        native.window_attention(q.double(), k.double(), v.double(), None)
    with pytest.raises(ValueError, match="got torch.float16"):
        native.window_attention(q.half(), k.half(), v.half(), None)
    with pytest.raises(ValueError, match="got torch.bfloat16, torch.float32, torch.float32"):
        native.window_attention(q.bfloat16(), k, v, None)  # mixed: a 2-byte q read as 4-byte rows


@needs_kernel
def test_the_operator_checks_its_inputs_when_called_directly():
    """torch.ops.swinv2.window_attention is public: wrong shapes, a bias or scale of the wrong
    dtype or size get a ValueError instead of being read out of bounds."""
    q, k, v = _qkv(2, 2, 16)
    op = torch.ops.swinv2.window_attention
    with pytest.raises(ValueError, match="of one shape, got .*\\(2, 2, 8, 32\\)"):
        op(q, k, torch.randn(2, 2, 8, 32), None, None, 1e-12)
    with pytest.raises(ValueError, match="bias must be float32"):
        op(q, k, v, torch.zeros(1, 2, 64, 64), None, 1e-12)
    with pytest.raises(ValueError, match="bias must be float32 .* got torch.float64"):
        op(q, k, v, torch.zeros(1, 2, 16, 16, dtype=torch.float64), None, 1e-12)
    with pytest.raises(ValueError, match=r"cosine_scale must hold one float32 value per head \(2\)"):
        op(q, k, v, None, torch.ones(3), 1e-12)
    with pytest.raises(ValueError, match="one float32 value per head"):
        native.window_attention(q, k, v, None, torch.ones(3))


@needs_kernel
def test_kernel_takes_any_layout():
    """A last stride other than 1 (as a compiled graph may hand over) is copied, not refused."""
    q, k, v = _qkv(4, 2, 16)
    v_strided = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last stride 16
    assert v_strided.stride(-1) != 1
    assert torch.equal(native.window_attention(q, k, v_strided, None), native.window_attention(q, k, v, None))


def test_the_operator_says_when_the_kernel_is_off(monkeypatch):
    monkeypatch.setattr(native, "_state", {"fn": None, "why": "turned off by SWINV2_NATIVE"})
    q, k, v = _qkv(2, 2, 16)
    with pytest.raises(RuntimeError, match=r"kernel is off \(turned off by SWINV2_NATIVE\)"):
        native.window_attention(q, k, v, None)


def test_applies_only_to_float32_or_bfloat16_inference_with_32_wide_heads():
    q, k, v = _qkv(2, 2, 16)
    if not native.available():
        assert not native.applies(q, k, v)
        return
    assert native.applies(q, k, v)
    assert native.applies(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert not native.applies(q.double(), k.double(), v.double())
    assert not native.applies(q.half(), k.half(), v.half())
    assert not native.applies(q.bfloat16(), k, v)
    assert not native.applies(q[..., :16], k[..., :16], v[..., :16])
    assert not native.applies(q, k, v.transpose(-1, -2))  # no unit stride on the last dim
    qg = q.detach().requires_grad_()
    assert not native.applies(qg, k, v)
    with torch.no_grad():
        assert native.applies(qg, k, v)


@needs_kernel
@pytest.mark.parametrize("N", [1, 16, 49, 64, 81, 144])
def test_kernel_cosine_attention_matches_float64(N):
    """With per-head scales the kernel normalises q and k itself: against F.normalize and the
    scale in float64, with a head at the clamp (100), a zero q row and a zero k row (the norm
    floor: F.normalize makes them 0), and as close as PyTorch's float32 path."""
    B, H, nW = 4, 3, 2
    g = torch.Generator().manual_seed(N)
    qkv = torch.randn(B, N, 3, H, 32, generator=g) * 3
    qkv[1, 0, 0] = 0.0  # a zero q row
    qkv[2, N - 1, 1] = 0.0  # a zero k row
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = torch.tensor([100.0, 12.5, 1.0])
    bias = 16 * torch.rand(nW, H, N, N, generator=g)
    bias[:, :, : N // 2, N // 2 :] -= 100.0
    s64 = scale.double().view(H, 1, 1)
    want = _truth(F.normalize(q.double(), dim=-1) * s64, F.normalize(k.double(), dim=-1), v, bias)
    got = native.window_attention(q, k, v, bias, scale)
    assert rel_err(got, want) < 1e-6
    ref32 = F.scaled_dot_product_attention(
        F.normalize(q, dim=-1) * scale.view(H, 1, 1), F.normalize(k, dim=-1), v,
        attn_mask=bias.repeat(B // nW, 1, 1, 1), scale=1.0)
    assert rel_err(got, want) < 3 * rel_err(ref32, want) + 1e-7
    if N > 1:  # the scales matter (one token's softmax is 1 whatever they are)
        assert rel_err(native.window_attention(q, k, v, bias), want) > 1e-2
    with pytest.raises(ValueError, match="one float32 value per head"):
        native.window_attention(q, k, v, bias, scale[:2])


def _bf16_case(B, H, N, nW, seed):
    """bfloat16 q, k, v (strided views of one qkv tensor, with a zero q row and a zero k row),
    per-head scales with one at the clamp, and float32 shifted-window-like biases."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, N, 3, H, 32, generator=g) * 3).bfloat16()
    qkv[1 % B, 0, 0] = 0.0
    qkv[2 % B, N - 1, 1] = 0.0
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = torch.tensor([100.0, 12.5, 1.0])[:H]
    bias = 16 * torch.rand(nW, H, N, N, generator=g)
    bias[:, :, : N // 2, N // 2 :] -= 100.0
    return q, k, v, scale, bias


@needs_kernel
@pytest.mark.parametrize("N", [1, 16, 49, 64, 81, 144])
@pytest.mark.parametrize("cosine", [False, True])
def test_kernel_bfloat16_is_float32_math_rounded_once(N, cosine):
    """bfloat16 q, k, v are widened exactly and computed in float32: the output is the float64
    attention of the same bfloat16 inputs rounded once to bfloat16, up to float32 noise, and
    closer to it than PyTorch's bfloat16 path (normalisation and attention in bfloat16)."""
    B, H, nW = 4, 3, 2
    q, k, v, scale, bias = _bf16_case(B, H, N, nW, seed=N)
    s = scale if cosine else None
    q64, k64 = q.double(), k.double()
    if cosine:
        q64, k64 = F.normalize(q64, dim=-1) * scale.double().view(H, 1, 1), F.normalize(k64, dim=-1)
    want = _truth(q64, k64, v, bias)
    got = native.window_attention(q, k, v, bias, s)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert got.transpose(1, 2).is_contiguous()
    # bit for bit the float32 kernel on the widened inputs, rounded to nearest even once
    assert torch.equal(got, native.window_attention(q.float(), k.float(), v.float(), bias, s).bfloat16())
    once = want.bfloat16()  # the exact result, rounded once
    assert (got == once).float().mean() > 0.99
    assert rel_err(got, want) < 1.05 * rel_err(once, want) + 1e-7
    q16, k16 = q, k
    if cosine:
        q16 = F.normalize(q, dim=-1) * scale.view(H, 1, 1).bfloat16()
        k16 = F.normalize(k, dim=-1)
    torch_bf16 = F.scaled_dot_product_attention(
        q16, k16, v, attn_mask=bias.bfloat16().repeat(B // nW, 1, 1, 1), scale=1.0)
    assert rel_err(got, want) <= rel_err(torch_bf16, want) + 1e-7


@needs_kernel
def test_kernel_bfloat16_rounds_to_nearest_even_and_keeps_nan():
    """Outputs that are exact in float32 and fall halfway between two bfloat16 values go to
    the even one (as torch's conversion does); a NaN stays NaN."""
    N, H = 4, 1
    q = torch.zeros(1, H, N, 32, dtype=torch.bfloat16)  # all scores 0: only the bias decides
    k = torch.zeros(1, H, N, 32, dtype=torch.bfloat16)
    v = torch.zeros(1, H, N, 32, dtype=torch.bfloat16)
    bias = torch.full((1, H, N, N), float("-inf"))
    bias[..., :2] = 0.0  # keys 0 and 1 get 1/2 each, exactly
    v[0, 0, 0, 0] = 1.0
    # bfloat16 steps are 2^-8 just above 0.5: 0.5 + 2^-9 is a tie between 0.5 (even) and 0.5 + 2^-8
    v[0, 0, 1, 0] = 2.0**-8
    assert native.window_attention(q, k, v, bias)[0, 0, 0, 0].item() == 0.5
    # 0.5 + 3 * 2^-9: a tie between 0.5 + 2^-8 (odd) and 0.5 + 2^-7 (even)
    v[0, 0, 1, 0] = 3 * 2.0**-8
    assert native.window_attention(q, k, v, bias)[0, 0, 0, 0].item() == 0.5 + 2**-7
    # 0.5 + 2^-9 + 2^-15: just above the tie, so up
    v[0, 0, 1, 0] = 2.0**-8 + 2.0**-14
    assert native.window_attention(q, k, v, bias)[0, 0, 0, 0].item() == 0.5 + 2**-8
    v[0, 0, 0, 1] = float("nan")
    assert torch.isnan(native.window_attention(q, k, v, bias)[0, 0, :, 1]).all()


def _count_calls(monkeypatch) -> list:
    calls = []
    real = native.window_attention

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(native, "window_attention", counting)
    return calls


def _attentions(model):
    return [m for m in model.modules() if isinstance(m, FastWindowAttention)]


def _plain(seed=1, **kw):
    """The plain model with 32-wide heads."""
    kw = dict(dict(img_size=64, window_size=4), **kw)
    return randomize_(swinv2.SwinTransformerV2(drop_path_rate=0.0, **ARCH32, **kw), seed).eval()


def _with_kernel(model):
    """A copy of ``model`` with the speedups and the native kernel."""
    return fast.apply(copy.deepcopy(model), native=True)


@needs_kernel
@pytest.mark.parametrize("img,window", [(64, 4), (128, 8), (112, 7)])
def test_model_with_kernel_matches_the_plain_model(img, window, monkeypatch):
    plain = _plain(3, img_size=img, window_size=window)
    model = _with_kernel(plain)
    x = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(2))
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        got = model(x)
        blocks = sum(len(s.blocks) for s in model.layers)
        assert len(calls) == blocks  # every block, shifted or not, took the kernel
        plain.set_fused_attn(False)  # the official step-by-step computation
        reference = plain(x)
        truth = copy.deepcopy(plain).double()(x.double())
        for m in _attentions(model):
            m.use_native = False  # PyTorch's fused kernel
        fused = model(x)
    assert len(calls) == blocks
    # float32 through a randomised network drifts ~1e-5 whichever kernel (see test_peer_parity);
    # the kernel is as close to the float64 truth as PyTorch's two float32 paths
    assert rel_err(got, reference) < 5e-5 and rel_err(got, fused) < 5e-5
    assert rel_err(got, truth) < 1.5 * max(rel_err(fused, truth), rel_err(reference, truth))


@needs_kernel
def test_model_with_kernel_matches_timm(monkeypatch):
    kwargs = dict(ARCH32, img_size=128, window_size=8)
    peer = randomize_(_timm_class()(**kwargs, drop_path_rate=0.0).eval(), 5)
    ours = swinv2.SwinTransformerV2(drop_path_rate=0.0, **kwargs).eval()
    _load(ours, timm_to_official(peer.state_dict()))
    fast.apply(ours, native=True)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        assert rel_err(ours(x), peer(x)) < 5e-5
    assert len(calls) == 8


@needs_kernel
@pytest.mark.parametrize("img,window", [(64, 4), (112, 7)])
def test_model_under_bfloat16_autocast_takes_the_kernel(img, window, monkeypatch):
    """bfloat16 autocast inference: every block takes the kernel, and the network is as close
    to its float64 self as with PyTorch's bfloat16 kernels (fused and step by step)."""
    plain = _plain(3, img_size=img, window_size=window)
    model = _with_kernel(plain)
    x = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(2))
    truth = copy.deepcopy(plain).double()(x.double()).detach()
    calls = _count_calls(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
        blocks = sum(len(s.blocks) for s in model.layers)
        assert len(calls) == blocks
        for m in _attentions(model):
            m.use_native = False
        fused = model(x)
        model.set_fused_attn(False)  # the plain step-by-step attention, between the same Linear layers
        reference = model(x)
    assert len(calls) == blocks
    assert got.dtype == torch.bfloat16
    # bfloat16 Linear layers dominate the error of a randomised network (~10%); the kernel's
    # float32 attention must not add to it
    assert rel_err(got, truth) < 1.15 * min(rel_err(fused, truth), rel_err(reference, truth))


@needs_kernel
def test_attention_module_under_bfloat16_autocast_is_closer_with_the_kernel():
    """One attention module under bfloat16 autocast (the same bfloat16 qkv GEMM either way):
    the kernel's float32 normalisation, softmax and bias beat PyTorch's bfloat16 ones."""
    torch.manual_seed(0)
    plain = randomize_(WindowAttention(64, 2), 4).eval()
    attn = _with_kernel(plain)
    x = torch.randn(8, 64, 64)
    mask = torch.zeros(4, 64, 64)
    mask[:, :32, 32:] = -100.0
    with torch.no_grad():
        truth = copy.deepcopy(plain).double()(x.double(), (8, 8), mask.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert native.applies(*[torch.zeros(1, 2, 64, 32, dtype=torch.bfloat16)] * 3)
            got = attn(x, (8, 8), mask)
            attn.use_native = False
            fused = attn(x, (8, 8), mask)
            plain.fused_attn = False
            reference = plain(x, (8, 8), mask)
    assert rel_err(got, truth) < min(rel_err(fused, truth), rel_err(reference, truth))


@needs_kernel
def test_kernel_is_not_used_for_training_or_float16(monkeypatch):
    model = _with_kernel(_plain())
    x = torch.randn(2, 3, 64, 64)
    calls = _count_calls(monkeypatch)
    model.train()
    model(x).sum().backward()  # gradients: PyTorch's kernels (the native one has no backward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        model(x)
    assert calls == []
    with torch.no_grad():
        model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    assert len(calls) == 16


def _graph_ops(seen: list):
    """A torch.compile backend that records the operators of each captured graph and runs it
    as it is."""

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    return backend


@pytest.mark.slow
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_inference_keeps_the_kernels_as_graph_operators(dtype):
    """Under torch.compile (whole graph) inference calls the native attention and oneDNN's
    inner product as the custom operators swinv2::window_attention and swinv2::linear, with the
    same results; compiled training keeps PyTorch's differentiable operators."""
    if not onednn.ready(dtype):
        pytest.skip(f"oneDNN's inner product does not run {dtype} here")
    model = _with_kernel(_plain())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    seen: list = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad(), autocast:
        want = model(x)
        got = torch.compile(model, backend=_graph_ops(seen), fullgraph=True)(x)
        # the fake implementations hold under AOT tracing too (shapes, dtypes, strides)
        aot = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum("swinv2.window_attention" in t for t in seen) == 8
    assert sum("swinv2.linear" in t for t in seen) == linears  # the position-bias MLP's and the head's too
    assert got.dtype == want.dtype and rel_err(got, want) < 1e-6 and rel_err(aot, want) < 1e-6
    seen.clear()
    model.train()
    with autocast:
        torch.compile(model, backend=_graph_ops(seen), fullgraph=True)(x).float().sum().backward()
    torch._dynamo.reset()
    assert seen and not any("swinv2" in t for t in seen)


# -- building, loading and falling back ----------------------------------------------------


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A fresh native state (restored afterwards) building into an empty cache."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SWINV2_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_available_wherever_it_can_be_built():
    # The kernel tests skip when the kernel is off; a kernel that fails its own self-test is
    # off too, so on a machine that can build it, being off is itself a failure.
    import os

    if native._cpu_supported() or native._compiler() is None or os.environ.get("SWINV2_NATIVE") == "0":
        pytest.skip("this machine cannot run the native kernel")
    assert native.available(), native.status()


@pytest.mark.parametrize("env", [None, "0", "1"])
def test_asked_for_by_enable_or_the_environment(fresh, monkeypatch, env):
    monkeypatch.setattr(native, "_switch", {})
    if env is None:
        monkeypatch.delenv("SWINV2_NATIVE", raising=False)
    else:
        monkeypatch.setenv("SWINV2_NATIVE", env)
    assert native.enabled() == (env == "1")
    if env != "1":
        assert not native.available() and native.status() == f"off ({native.OFF_NOTE})"
        assert not list(fresh.rglob("*"))  # nothing compiled, not even the cache folder made
    model = swinv2.create_model("swinv2_debug", **ARCH32)
    assert all(m.use_native == (env == "1") for m in _attentions(model))
    native.enable(env != "1")  # enable() decides over the environment
    assert native.enabled() == (env != "1")
    assert all(m.use_native == (env != "1") for m in _attentions(swinv2.create_model("swinv2_debug", **ARCH32)))


def test_off_by_default_and_says_so(fresh, monkeypatch):
    """Nobody asked: the fast model runs PyTorch's attention, nothing is compiled, and
    swinv2.fast.status() says the kernel is opt-in."""
    monkeypatch.setattr(native, "_switch", {})
    monkeypatch.delenv("SWINV2_NATIVE", raising=False)
    calls = _count_calls(monkeypatch)
    model = randomize_(swinv2.create_model("swinv2_debug", img_size=64, window_size=4, **ARCH32), 1).eval()
    assert _attentions(model) and not any(m.use_native for m in _attentions(model))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert calls == [] and "fn" not in native._state and not list(fresh.rglob("*"))
    [(on, why)] = [(on, why) for name, on, why in fast.status() if name == "native"]
    assert not on and "opt-in" in why and "SWINV2_NATIVE=1" in why


def test_asking_for_it_says_once_that_it_compiles_and_where(fresh, capsys):
    if native._cpu_supported() or native._compiler() is None:
        pytest.skip("this machine cannot build the native kernel")
    assert native.available(), native.status()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "compiling the native attention kernel" in lines[0]
    assert str(fresh / "kernels") in lines[0]
    native._state.clear()  # a new process: the cached library is loaded, not compiled
    assert native.available() and capsys.readouterr().err == ""


@pytest.mark.parametrize("mode", [0o777, 0o770], ids=["others", "group"])
@pytest.mark.parametrize("which", ["cache", "kernels"])
def test_a_cache_folder_others_can_write_is_refused(fresh, monkeypatch, mode, which):
    """A library in a folder others can write could be replaced and would then run in this
    process: the kernel stays off, with the reason, and one warning says so."""
    monkeypatch.setattr(native, "_cpu_supported", lambda: None)
    monkeypatch.setattr(native, "_compiler", lambda: "/usr/bin/cc")
    folder = fresh if which == "cache" else fresh / "kernels"
    folder.mkdir(exist_ok=True)
    folder.chmod(mode)
    with pytest.warns(RuntimeWarning, match="native attention kernel is off .*writable by other users"):
        assert not native.available()
    assert native.status().startswith("off (") and f"{folder} is writable by other users" in native.status()
    [(on, why)] = [(on, why) for name, on, why in fast.status() if name == "native"]
    assert not on and "writable by other users" in why
    assert not list(fresh.rglob("*.so"))
    assert stat.S_IMODE(folder.stat().st_mode) == mode  # left as it was


def test_falling_back_warns_once(fresh, monkeypatch, one_thread):
    """Asked for where it cannot be had: one RuntimeWarning, then PyTorch's attention, quietly."""
    monkeypatch.setattr(native, "_cpu_supported", lambda: "CPU lacks avx512f")
    plain = _plain()
    model = _with_kernel(plain)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match=r"native attention kernel is off \(CPU lacks avx512f\)"):
            got = model(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = model(x)
            assert not native.available()
        assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
        for m in _attentions(model):
            m.use_native = False
        assert torch.equal(got, again) and torch.equal(got, model(x))
        assert rel_err(got, plain(x)) < 5e-5


def test_a_failing_compiler_falls_back_with_the_reason(fresh, monkeypatch):
    if native._cpu_supported():
        pytest.skip(native._cpu_supported())
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    with pytest.warns(RuntimeWarning, match="native attention kernel is off"):
        assert not native.available()
    assert native.status().startswith("off (could not build or load it: false failed")
    assert not list(fresh.rglob("*"))[1:]  # the kernels folder only: no half-written library left
    # and the model runs on PyTorch's kernels
    model = _with_kernel(_plain())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 64, 64))).all()


@needs_kernel
def test_builds_once_into_the_cache_and_rebuilds_a_damaged_library(fresh, monkeypatch, tmp_path_factory):
    assert native.available()
    libs = list(fresh.rglob("*.so"))
    assert len(libs) == 1 and native._state["path"] == str(libs[0])
    stamp = libs[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    assert native.available() and libs[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    # A damaged library in another cache (a loaded one must not be overwritten in place):
    # loading it fails, so it is built again over it, atomically.
    other = tmp_path_factory.mktemp("damaged")
    monkeypatch.setenv("SWINV2_CACHE_DIR", str(other))
    damaged = other / "kernels" / libs[0].name
    damaged.parent.mkdir()
    damaged.write_bytes(b"not a shared library")
    monkeypatch.setattr(native, "_state", {})
    assert native.available() and native._state["path"] == str(damaged)
    assert damaged.read_bytes()[:4] == b"\x7fELF" and sorted(p.name for p in damaged.parent.iterdir()) == [damaged.name]


@needs_kernel
def test_self_test_catches_a_wrong_kernel(fresh, monkeypatch):
    real = native._call

    def off_by_a_little(fn, *args):
        out = real(fn, *args)
        return out * (1 + 1e-4)

    monkeypatch.setattr(native, "_call", off_by_a_little)
    assert not native.available()
    assert "self-test error was 1.0e-04" in native.status()


@needs_kernel
def test_self_test_checks_the_bfloat16_kernel(fresh, monkeypatch):
    real = native._call

    def bfloat16_off(fn, q, *args):
        out = real(fn, q, *args)
        return out * (1 + 2**-6) if q.dtype == torch.bfloat16 else out  # two bfloat16 steps

    monkeypatch.setattr(native, "_call", bfloat16_off)
    assert not native.available()
    assert "in bfloat16" in native.status()
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_call", lambda fn, q, *a: None if q.dtype == torch.bfloat16 else real(fn, q, *a))
    assert not native.available() and "failed on its self-test" in native.status()
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_call", lambda fn, q, *a: real(fn, q, *a).float())
    assert not native.available() and "returned torch.float32 for torch.bfloat16" in native.status()


@needs_kernel
def test_self_test_checks_the_cosine_attention(fresh, monkeypatch):
    real = native._call

    def unscaled_keys(fn, q, k, v, bias, scale=None, eps=native.NORM_EPS):
        # right without the cosine factors, wrong with them: k left unnormalised
        if scale is None:
            return real(fn, q, k, v, bias)
        return real(fn, F.normalize(q, dim=-1) * scale.view(-1, 1, 1), k, v, bias)

    monkeypatch.setattr(native, "_call", unscaled_keys)
    assert not native.available()
    assert "self-test error" in native.status()


@needs_kernel
@pytest.mark.parametrize("grad", [False, True])
def test_exported_programs_hold_only_pytorch_operators(grad):
    """torch.export records a graph to run elsewhere: with 32-wide heads (where the kernel
    applies) and with or without autograd, it holds neither swinv2's operators nor oneDNN's,
    and computes what the model does."""
    model = _with_kernel(_plain())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    program = export_holding_only_pytorch_operators(model, x, grad)
    with torch.no_grad():
        assert rel_err(program.module()(x), model(x)) < 1e-5


# -- memory safety and a failing start -------------------------------------------------------


@pytest.fixture
def unloaded(monkeypatch):
    """A fresh native state (restored afterwards), loading from the usual cache."""
    monkeypatch.setattr(native, "_state", {})


@pytest.mark.parametrize("default", ["bfloat16 dtype", "float64 dtype", "meta device"])
def test_self_test_spells_out_its_dtypes_and_devices(unloaded, default):
    """The first call may come under another default dtype or device. The self-test builds
    every tensor as float32 on the CPU, and the kernel reads bias and scales as float32 CPU
    memory: under a bfloat16 default it once read 2-byte tensors as 4-byte ones (past their
    end, and the kernel failed its self-test), under a meta default device it crashed."""
    if native._cpu_supported() or native._compiler() is None:
        pytest.skip("this machine cannot run the native kernel")
    saved = torch.get_default_dtype()
    try:
        if default == "meta device":
            with torch.device("meta"):
                assert native.available(), native.status()
        else:
            torch.set_default_dtype(torch.bfloat16 if default.startswith("bfloat16") else torch.float64)
            assert native.available(), native.status()
    finally:
        torch.set_default_dtype(saved)


@needs_kernel
def test_output_is_cpu_memory_whatever_the_default_device():
    q, k, v = _qkv(2, 2, 16)
    want = native.window_attention(q, k, v, None)
    with torch.device("meta"):
        got = native._call(native._function(), q, k, v, None)
    assert got.device.type == "cpu" and torch.equal(got, want)


@needs_kernel
def test_every_call_into_the_library_is_checked():
    """The raw call (the self-test's, the operator's) runs the operator's checks and the
    layout ones the C code relies on: what it would misread raises instead."""
    fn = native._function()
    q, k, v = _qkv(2, 2, 16)
    bias = torch.zeros(1, 2, 16, 16)

    def call(*args):
        return native._call_raw(fn, *args)

    with pytest.raises(ValueError, match="bias must be float32 .* got torch.bfloat16"):
        call(q, k, v, bias.bfloat16())  # 2-byte elements read as 4
    with pytest.raises(ValueError, match="bias must be contiguous"):
        call(q, k, v, torch.zeros(1, 1, 16, 16).expand(1, 2, 16, 16))  # one head's memory for two
    with pytest.raises(ValueError, match="cosine_scale must hold one float32 value per head"):
        call(q, k, v, None, torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="cosine_scale must be contiguous"):
        call(q, k, v, None, torch.ones(4)[::2])
    with pytest.raises(ValueError, match="unit last stride"):
        call(q, k, v.transpose(-1, -2).contiguous().transpose(-1, -2), None)
    with pytest.raises(ValueError, match="of one shape"):
        call(q, k[:, :, :8], v, None)
    with pytest.raises(ValueError, match="dense tensors"):
        call(q, k, v, bias.to_sparse())
    assert torch.equal(call(q, k, v, bias), native.window_attention(q, k, v, bias).transpose(1, 2))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_reads_keys_more_than_2_gib_apart(dtype):
    """Keys whose byte offsets within a block of 16 do not fit 32 bits (the gathers' index
    width; 15 steps past 2^31 bytes overflowed and read far outside the tensor) are read with
    64-bit offsets: the result is that of the same keys made contiguous. The tensor is real,
    2.1 GiB of address space of which only the 16 rows used are ever touched (the rest is
    never paged in, so it costs no memory)."""
    esz = torch.finfo(dtype).bits // 8
    step = 2**31 // (15 * esz) + 64  # elements between keys
    try:
        big = torch.empty(16 * step, dtype=dtype)
    except RuntimeError as err:  # address space limited (ulimit -v, strict overcommit)
        pytest.skip(f"cannot reserve {16 * step * esz / 2**30:.1f} GiB of address space: {err}")
    k = big.as_strided((1, 1, 16, 32), (0, 0, step, 1))  # inside big: 15 * step + 32 <= 16 * step
    g = torch.Generator().manual_seed(0)
    k.copy_(torch.randn(1, 1, 16, 32, generator=g))
    q, v = torch.randn(2, 1, 1, 16, 32, generator=g).to(dtype).unbind(0)
    for scale in (None, torch.tensor([10.0])):
        want = native.window_attention(q, k.contiguous(), v, None, scale)
        assert torch.equal(native.window_attention(q, k, v, None, scale), want)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 2, 16, 32), (2, 0, 16, 32), (2, 2, 0, 32)])
def test_kernel_takes_empty_inputs(shape, dtype):
    """No windows, heads or tokens: an empty output, without asking the C code for scratch
    memory of size 0 (which a C library may refuse)."""
    q = torch.zeros(shape, dtype=dtype)
    B, H, N, _ = shape
    out = native.window_attention(q, q, q, torch.zeros(1, H, N, N), torch.ones(H))
    assert out.shape == shape and out.dtype == dtype


class _BrokenToolchain(Exception):
    """Stands for anything a build may raise that nobody listed."""


@pytest.mark.parametrize("stage,error", [
    ("_build", OSError(28, "No space left on device")),
    ("_build", _BrokenToolchain("the compiler crashed")),
    ("_load", OSError("invalid ELF header")),  # a damaged library, even once rebuilt
    ("_load", AttributeError("undefined symbol: window_attention")),
    ("_self_test", ValueError("the self-test itself went wrong")),
])
def test_a_failing_start_is_remembered_with_its_reason(fresh, monkeypatch, stage, error, one_thread):
    """Whatever fails while building, loading or checking the kernel turns it off for the
    process with the reason, is not tried again on later calls, and the model gives PyTorch's
    result."""
    monkeypatch.setattr(native, "_cpu_supported", lambda: None)
    monkeypatch.setattr(native, "_compiler", lambda: "/usr/bin/cc")
    monkeypatch.setattr(native, "_build", lambda cc, force=False: fresh / "window_attention.so")
    monkeypatch.setattr(native, "_load", lambda path: object())
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        raise error

    monkeypatch.setattr(native, stage, failing)
    assert not native.available()
    tries = len(calls)
    assert tries == (2 if isinstance(error, OSError) and stage == "_load" else 1)  # one rebuild
    assert native.status().startswith("off (") and f"{type(error).__name__}: {error}" in native.status()
    model = _with_kernel(_plain())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = model(x)
        for m in _attentions(model):
            m.use_native = False
        want = model(x)
    assert not native.available() and len(calls) == tries  # nothing tried again
    assert torch.equal(got, want)


def test_an_interrupted_start_passes_the_interrupt_on(fresh, monkeypatch):
    """KeyboardInterrupt is not a failure of the kernel: it propagates, and nothing is
    recorded (the next call starts again)."""
    monkeypatch.setattr(native, "_cpu_supported", lambda: None)
    monkeypatch.setattr(native, "_compiler", lambda: "/usr/bin/cc")

    def interrupted(cc, force=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(native, "_build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        native.available()
    assert "fn" not in native._state


@needs_kernel
def test_rebuild_tries_again_after_a_failure(fresh, monkeypatch):
    real = native._build

    def broken(cc, force=False):
        raise _BrokenToolchain("cc died")

    monkeypatch.setattr(native, "_build", broken)
    assert not native.available() and "_BrokenToolchain: cc died" in native.status()
    monkeypatch.setattr(native, "_build", real)  # the toolchain is fixed
    assert not native.available()  # remembered...
    assert native.rebuild() and native.available() and native.status() == "on"  # ...until asked
    assert native._state["path"].startswith(str(fresh))
