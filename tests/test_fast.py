"""swinv2.fast: each speedup against the plain model of the paper (float64 to 1e-12, float32 as
close to the float64 truth as the plain computation), the places where it steps aside, and the
one door it goes through (apply, remove, create_model, status). The native kernel has its own
file (test_native.py); hooks on both models are in test_hooks.py, caches in test_caches.py."""

from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_compiles_whole,
    export_holding_only_pytorch_operators,
    official_fixture,
    randomize_,
    rel_err,
)
from torch import nn

import swinv2
from swinv2 import fast
from swinv2.blocks import SwinTransformerV2Block, SwinTransformerV2Stage
from swinv2.fast import attention, onednn
from swinv2.fast.attention import CosineQK, FastWindowAttention
from swinv2.fast.blocks import (
    ChunkedDropPath,
    ChunkedStage,
    ChunkedSwinTransformerV2,
    FastBlock,
    gather_tokens,
    shifted_window_order,
)
from swinv2.fast.onednn import FusedGeluMlp, OneDNNLinear
from swinv2.layers import DropPath, Mlp, WindowAttention
from swinv2.windows import window_partition

DEBUG = "swinv2_debug"
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def plain_model(seed=0, **kw):
    return randomize_(swinv2.create_model(DEBUG, **{"drop_path_rate": 0.0, **kw}, fast=False), seed)


def fast_model(seed=0, **kw):
    return randomize_(swinv2.create_model(DEBUG, **{"drop_path_rate": 0.0, **kw}), seed)


def sped_up(model, **kw):
    """A copy of ``model`` with the speedups applied (same weights)."""
    return fast.apply(copy.deepcopy(model), **kw)


def _randn(*shape, dtype=torch.float32, seed=0):
    """Inputs that do not depend on which tests ran before (tolerances are checked on them)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _train_step(model, x):
    """Outputs, parameter gradients and input gradient of one backward of a fixed loss."""
    model.zero_grad()
    x = x.detach().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    return out.detach(), torch.cat([g.flatten() for g in grads]), x.grad


def _fast_classes(model) -> set[type]:
    return {type(m) for m in model.modules() if type(m).__module__.startswith("swinv2.fast")}


# -- one door: apply, remove, create_model, status -------------------------------------------


def test_apply_then_remove_round_trips_the_classes_and_the_state():
    model = plain_model(seed=1, ape=True, drop_path_rate=0.1).double().eval()
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = _randn(2, 3, 36, 52, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        assert fast.apply(model) is model and fast.is_applied(model)
        assert {FastWindowAttention, FastBlock, ChunkedStage, ChunkedDropPath, ChunkedSwinTransformerV2,
                FusedGeluMlp} <= _fast_classes(model)
        assert isinstance(model, swinv2.SwinTransformerV2)
        assert model.state_dict().keys() == state.keys()
        assert rel_err(model(x), before) < 1e-12  # (and its caches filled on the way)
        assert fast.remove(model) is model and not fast.is_applied(model)
        assert torch.equal(model(x), before)  # the plain computation again, bit for bit
    assert [type(m) for m in model.modules()] == classes
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # nothing of the speedups is left on the modules
    assert not {n for m in model.modules() for n in vars(m)} & {"_bias_cache", "_order_cache", "use_native",
                                                               "cache_bias", "batch_chunk_mb"}


def test_apply_swaps_only_the_plain_classes():
    """A user's subclass (a LoRA layer, a quantised Linear) and other modules are left alone,
    and parameters are the same objects: optimizers and wrappers built before still hold them."""

    class Flipped(nn.Linear):
        def forward(self, t):
            return super().forward(t).flip(-1)

    model = plain_model(seed=2)
    proj = model.layers[1].blocks[1].attn.proj
    model.layers[1].blocks[1].attn.proj = Flipped(proj.in_features, proj.out_features)
    params = list(model.parameters())
    fast.apply(model)
    assert type(model.layers[1].blocks[1].attn.proj) is Flipped
    assert all(a is b for a, b in zip(model.parameters(), params))
    expected = {nn.Linear: OneDNNLinear, Mlp: FusedGeluMlp, WindowAttention: FastWindowAttention,
                SwinTransformerV2Block: FastBlock, SwinTransformerV2Stage: ChunkedStage,
                swinv2.SwinTransformerV2: ChunkedSwinTransformerV2}
    assert not any(type(m) in expected for m in model.modules())


@pytest.mark.parametrize("switch, stays", [
    ("onednn", [nn.Linear, Mlp]), ("attention", [WindowAttention]),
    ("blocks", [SwinTransformerV2Block, SwinTransformerV2Stage]), ("batch_chunk_mb", [SwinTransformerV2Stage]),
])
def test_each_speedup_can_be_left_out(switch, stays):
    off = None if switch == "batch_chunk_mb" else False
    model = fast.apply(swinv2.create_model(DEBUG, fast=False), **{switch: off})
    kinds = {type(m) for m in model.modules()}
    assert all(kind in kinds for kind in stays)
    assert fast.is_applied(model)


def test_create_model_is_fast_unless_asked_otherwise():
    plain = swinv2.create_model(DEBUG, fast=False)
    assert not _fast_classes(plain) and not fast.is_applied(plain)
    assert type(plain) is swinv2.SwinTransformerV2 and not hasattr(plain, "set_batch_chunking")
    model = swinv2.create_model(DEBUG)
    assert {FastWindowAttention, FastBlock, ChunkedStage, ChunkedSwinTransformerV2, FusedGeluMlp} <= _fast_classes(
        model)
    assert isinstance(model, swinv2.SwinTransformerV2) and model.config == plain.config
    if torch.backends.mkldnn.is_available():
        assert OneDNNLinear in _fast_classes(model)
    # the constructor builds the plain model
    assert not _fast_classes(swinv2.SwinTransformerV2(img_size=64, window_size=4, embed_dim=16,
                                                      num_heads=(1, 2, 4, 8)))


def test_status_lists_every_speedup_with_a_reason():
    entries = fast.status()
    names = [name for name, _, _ in entries]
    assert len(names) == len(set(names))
    options = [p for p, spec in inspect.signature(fast.apply).parameters.items() if spec.kind == spec.KEYWORD_ONLY]
    assert set(options) <= set(names), set(options) - set(names)  # every switch of apply() is reported
    assert "keep_freed_memory" in names
    for name, on, why in entries:
        assert isinstance(on, bool) and isinstance(why, str) and why.strip() and "\n" not in why, name
    text = fast.describe()
    assert text.count("\n") == len(entries) - 1 and all(f"{name}: " in text for name in names)


def test_the_plain_model_needs_no_speedup_package(tmp_path):
    """With swinv2.fast unimportable, swinv2 and its command line import, create_model builds
    the plain model and the official outputs are reproduced."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["swinv2.fast"] = None  # as if the package were deleted
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        import swinv2
        import swinv2.cli
        from helpers import official_fixture, rel_err

        model = swinv2.create_model("swinv2_debug", num_classes=3).eval()
        assert not any(type(m).__module__.startswith("swinv2.fast") for m in model.modules())
        with torch.no_grad():
            assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
        config, state, extras = official_fixture("official_tiny_w4_img64")
        model = swinv2.SwinTransformerV2(**config["official_constructor_args"]).eval()
        assert swinv2.load_pretrained(model, state).ok
        with torch.no_grad():
            err = rel_err(model.double()(extras["__input__"].double()), extras["__logits_f64__"])
        assert err < 1e-9, err
        assert not [m for m in sys.modules if m.startswith("swinv2.fast") and sys.modules[m] is not None]
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(swinv2.__file__).parents[1]),
                                                      os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# -- the fast model equals the plain model ---------------------------------------------------

SWITCHES = [{}, dict(norm_placement="pre"), dict(norm_placement="post"), dict(norm_placement="sandwich"),
            dict(attn_type="dot"), dict(position_bias="linear_cpb"), dict(position_bias="table"),
            dict(position_bias="none"), dict(extra_norm_period=1), dict(merge_norm="pre"), dict(qkv_bias=False),
            dict(ape=True)]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()) or "v2")
def test_fast_model_equals_the_plain_model_in_float64(switch, one_thread):
    """Inference and training, padded, shifted and global windows, every ablation: outputs to
    1e-12, every gradient to 1e-10 (scores scaled by up to 100 show float64 rounding of
    differently ordered sums at ~1e-12)."""
    plain = plain_model(seed=3, **switch).double()
    model = sped_up(plain)
    x = _randn(3, 3, 36, 52, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model.eval()(x), plain.eval()(x)) < 1e-12
    out, grad, xgrad = _train_step(model.train(), x)
    out0, grad0, xgrad0 = _train_step(plain.train(), x)
    assert rel_err(out, out0) < 1e-12
    assert rel_err(grad, grad0) < 1e-10 and rel_err(xgrad, xgrad0) < 1e-10


def test_fast_model_in_float32_is_as_accurate_as_the_plain_model():
    """float32 inference and training against the float64 model: the fast model at most 3x as
    far from the truth as the plain one (over inputs the ratio of the two errors varies, up to
    ~2.3 seen)."""
    plain = plain_model(seed=5)
    model = sped_up(plain)
    truth_model = copy.deepcopy(plain).double()
    x = _randn(3, 3, 36, 52)
    with torch.no_grad():
        truth = truth_model.eval()(x.double())
        got, ref = model.eval()(x), plain.eval()(x)
    assert rel_err(got, ref) < 5e-5  # float32 sums in other orders drift ~1e-5 through a randomised network
    assert rel_err(got, truth) < max(3 * rel_err(ref, truth), 1e-6)
    results = [_train_step(m.train(), x.double() if m is truth_model else x) for m in (model, plain, truth_model)]
    for fast_t, plain_t, true_t in zip(*results):
        assert rel_err(fast_t, true_t) < max(3 * rel_err(plain_t, true_t), 1e-6)


def test_fast_model_under_bfloat16_autocast():
    """bfloat16 autocast inference and training run in bfloat16; randomised weights (logit
    scales up to 100) amplify bf16 rounding to ~0.16 here, as for timm's SwinV2; broken math
    lands near 1."""
    model = fast_model().eval()
    x = _randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) < 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(x)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and rel_err(out.detach().float(), ref) < 0.3
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["official_tiny_w4_img64", "official_w8_from_pretrained_w4_img64"])
def test_fast_model_reproduces_the_official_outputs(name):
    config, state, extras = official_fixture(name)
    model = fast.apply(swinv2.SwinTransformerV2(**config["official_constructor_args"]).eval())
    assert swinv2.load_pretrained(model, state).ok
    with torch.no_grad():
        assert rel_err(model(extras["__input__"]), extras["__logits_f64__"]) < 1e-4
        model.double()
        assert rel_err(model(extras["__input__"].double()), extras["__logits_f64__"]) < 1e-9


def test_inference_leaves_its_inputs_and_earlier_outputs_alone():
    """Inference adds the residual into the branch's buffer and normalises q and k in place:
    the input, every block's output (held by a hook) and the result all stay as computed, and
    equal what the same model gives with gradients on (where nothing is done in place)."""
    model = fast_model(seed=11).eval()
    x = _randn(2, 3, 36, 52, seed=2)
    x0 = x.clone()
    held = []
    for stage in model.layers:
        for block in stage.blocks:
            block.register_forward_hook(lambda m, i, o: held.append((o, o.clone())))
    with torch.no_grad():
        out = model(x)
    assert torch.equal(x, x0)
    assert len(held) == 8 and all(torch.equal(o, snapshot) for o, snapshot in held)
    with_grad = model(x)
    assert rel_err(out, with_grad.detach()) < 1e-5
    # a hook that keeps a branch norm's output (activation capture) sees it unchanged too
    norms = []
    model.layers[0].blocks[1].norm1.register_forward_hook(lambda m, i, o: norms.append((o, o.clone())))
    model.layers[2].blocks[0].norm2.register_forward_hook(lambda m, i, o: norms.append((o, o.clone())))
    with torch.no_grad():
        assert torch.equal(model(x), out)
    assert len(norms) == 2 and all(torch.equal(o, snapshot) for o, snapshot in norms)


# -- oneDNN Linear layers --------------------------------------------------------------------


@needs_onednn
@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("case", ["2d", "3d", "strided", "no-bias"])
def test_onednn_linear_equals_f_linear(case, gelu):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 50, 24, generator=gen)
    w, b = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    if case == "2d":
        x = x.reshape(-1, 24)
    elif case == "strided":
        x = x[:, ::3]  # not contiguous
    elif case == "no-bias":
        b = None
    with torch.no_grad():
        assert onednn.applies(x, w) is torch.float32  # the oneDNN kernel is the one tested
        got = onednn.linear(x, w, b, gelu=gelu)
        want = F.linear(x.double(), w.double(), None if b is None else b.double())
        want = F.gelu(want) if gelu else want
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) < 1e-6


def _count_inner_products(monkeypatch) -> list:
    calls = []
    inner = onednn.inner_product
    monkeypatch.setattr(onednn, "inner_product", lambda *a, **k: calls.append(a[0].shape) or inner(*a, **k))
    return calls


@needs_onednn
@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("case", ["3d", "wide-out", "wide-in", "narrow", "strided", "no-bias", "frozen-weight"])
def test_onednn_linear_gradients_equal_float64(monkeypatch, case, gelu):
    """With gradients the forward product, the input's gradient and (by shape) the weight's
    run on oneDNN: every gradient matches float64 as closely as F.linear's does."""
    K, N = {"wide-out": (200, 256), "wide-in": (256, 200), "narrow": (96, 288)}.get(case, (24, 40))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 70, K, generator=gen)
    if case == "strided":
        x = torch.randn(3, 210, K, generator=gen)[:, ::3]
    w, b = torch.randn(N, K, generator=gen) / K**0.5, torch.randn(N, generator=gen)
    g = torch.randn(3, 70, N, generator=gen)
    calls = _count_inner_products(monkeypatch)

    def grads(fn, dtype):
        xs = x.to(dtype, copy=True).requires_grad_()
        ws = w.to(dtype, copy=True).requires_grad_(case != "frozen-weight")
        bs = None if case == "no-bias" else b.to(dtype, copy=True).requires_grad_()
        fn(xs, ws, bs).backward(g.to(dtype))
        return [t.grad for t in (xs, ws, bs) if t is not None and t.requires_grad]

    def plain(xs, ws, bs):
        y = F.linear(xs, ws, bs)
        return F.gelu(y) if gelu else y

    got = grads(lambda *a: onednn.linear(*a, gelu=gelu), torch.float32)
    onednn_weight_grad = min(K, N) >= onednn.WEIGHT_GRAD_MIN_WIDTH and case != "frozen-weight"
    assert len(calls) == 2 + onednn_weight_grad  # forward, input gradient, weight gradient
    truth = grads(plain, torch.float64)
    blas = grads(plain, torch.float32)
    assert len(got) == len(truth) == (2 if case in ("no-bias", "frozen-weight") else 3)
    for a, ref, t in zip(got, blas, truth):
        assert a.dtype == torch.float32 and a.shape == t.shape
        assert rel_err(a, t) < max(3 * rel_err(ref, t), 1e-6)


@needs_onednn
def test_onednn_linear_weight_gradient_orientations(monkeypatch):
    """The weight gradient takes BLAS for narrow layers and one of two oneDNN orientations
    otherwise; all three equal float64."""
    gen = torch.Generator().manual_seed(6)
    calls = _count_inner_products(monkeypatch)
    for K, N, on_onednn in ((96, 288, False), (384, 192, True), (192, 576, True)):
        calls.clear()
        grad, x = torch.randn(500, N, generator=gen), torch.randn(500, K, generator=gen)
        got = onednn._weight_grad(grad, x)
        assert got.shape == (N, K) and got.is_contiguous()
        assert rel_err(got, grad.double().t() @ x.double()) < 1e-6
        assert len(calls) == on_onednn, (K, N)


def test_onednn_linear_with_gradients_returns_its_own_buffer_for_2d_inputs():
    """qkv is normalised in place by a Function that marks it dirty; were it a view of the
    GEMM's output, autograd would copy the whole gradient in backward."""
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    assert onednn.linear(x, w)._base is None
    assert onednn.linear(x.view(2, 5, 8), w).shape == (2, 5, 6)


class _Sub(torch.Tensor):
    pass


def test_onednn_linear_steps_aside(monkeypatch):
    x, w = torch.randn(6, 8), torch.randn(5, 8, requires_grad=True)
    with torch.no_grad():
        assert onednn.applies(x, w.detach().double()) is None  # mixed dtypes
        assert onednn.applies(x.double(), w.detach().double()) is None  # float64
        assert onednn.applies(x.as_subclass(_Sub), w.detach()) is None  # subclasses (DTensor...): F.linear
        assert onednn.applies(x.to("meta"), w.detach().to("meta")) is None  # other devices
        assert onednn.applies(torch.randn(6, 7), w.detach()) is None  # F.linear names the shapes

    def refuse(*args, **kwargs):
        raise AssertionError("left out")

    # left out of a model (the plain model, or apply(onednn=False)): F.linear, forward and backward
    monkeypatch.setattr(onednn, "inner_product", refuse)
    for model in (plain_model(seed=1), fast.apply(plain_model(seed=1), onednn=False)):
        assert not any(isinstance(m, (OneDNNLinear, FusedGeluMlp)) for m in model.modules())
        model(_randn(2, 3, 32, 32)).sum().backward()
        with torch.no_grad():
            model.eval()(_randn(2, 3, 32, 32))
        assert all(p.grad is not None for p in model.parameters())


def test_linear_with_mismatched_sizes_names_the_shapes():
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"3x7 and 8x5"):
        onednn.linear(torch.randn(3, 7), torch.randn(5, 8), torch.randn(5), gelu=True)
    # the compiled graphs' operator, public as torch.ops.swinv2.linear, names them too
    with pytest.raises(ValueError, match=r"input torch.float32 \(3, 7\), weight torch.float32 \(5, 8\)"):
        torch.ops.swinv2.linear(torch.randn(3, 7), torch.randn(5, 8), None, False)
    with pytest.raises(ValueError, match=r"bias torch.float32 \(4,\) do not fit"):
        torch.ops.swinv2.linear(torch.randn(3, 8), torch.randn(5, 8), torch.randn(4), True)
    with pytest.raises(ValueError, match="input torch.bfloat16"):
        torch.ops.swinv2.linear(torch.randn(3, 8).bfloat16(), torch.randn(5, 8), None, False)


@needs_onednn
def test_onednn_probe_ignores_the_callers_autocast(monkeypatch):
    """The probe runs once, from whatever context calls first: inside bf16 autocast and
    inference mode it must find what it finds outside (it once compared against an
    autocast-bf16 reference there and turned oneDNN off for good)."""
    outside = {}
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(onednn, "_probed", {})
        outside[dtype] = onednn.runs(dtype)
    assert outside[torch.float32]
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(onednn, "_probed", {})
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert onednn.runs(dtype) == outside[dtype]


def test_onednn_linear_under_bfloat16_autocast():
    """Runs in bf16 as F.linear does under autocast: on oneDNN where this CPU multiplies bf16,
    on F.linear where it does not (the probe decides)."""
    gen = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(64, 32, generator=gen), torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = onednn.linear(x, w, b, gelu=True)
        want = F.gelu(F.linear(x, w, b))
    assert got.dtype == want.dtype == torch.bfloat16
    assert rel_err(got, want) < 2e-2


def test_model_inference_on_onednn_equals_f_linear(monkeypatch):
    plain = plain_model(seed=9).eval()
    model = sped_up(plain)
    x = _randn(2, 3, 36, 52, seed=1)
    used = []
    applies = onednn.applies
    monkeypatch.setattr(onednn, "applies", lambda *a: used.append(applies(*a)) or used[-1])
    with torch.no_grad():
        truth = copy.deepcopy(plain).double()(x.double())
        model(x)  # the position bias is computed once (and then reused)
        used.clear()
        got, ref = model(x), plain(x)
    if torch.backends.mkldnn.is_available():
        # qkv, proj, fc1 (+GELU), fc2 in all 8 blocks, the 3 patch mergings and the head
        assert used.count(torch.float32) == 8 * 4 + 3 + 1
    assert rel_err(got, ref) < 1e-5
    assert rel_err(got, truth) < max(3 * rel_err(ref, truth), 1e-6)


# -- attention: q, k, v in one GEMM, cosine scaling in place, matmul attention ---------------


def _cosine_reference(qkv, scale, nH):
    """q, k, v of (M, 3C) qkv as the plain model normalises them, stacked back to (M, 3C)."""
    t = qkv.view(qkv.shape[0], 3, nH, -1)
    q = F.normalize(t[:, 0], dim=-1) * scale.view(nH, 1)
    k = F.normalize(t[:, 1], dim=-1)
    return torch.stack((q, k, t[:, 2]), 1).reshape(qkv.shape)


def test_cosine_qk_backward_is_the_gradient_of_f_normalize():
    """The training-time q/k normalisation (in place, hand-written backward) against autograd
    through F.normalize and the scale: a float64 gradcheck, and equal values and gradients on
    rows that are zero (a padded token's k) or below the norm floor."""
    nH, d, M = 3, 4, 10
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(M, 3 * nH * d, generator=gen, dtype=torch.float64)
    scale = (1 + 5 * torch.rand(nH, 1, 1, generator=gen, dtype=torch.float64)).requires_grad_()
    fast_qk = lambda t, s: CosineQK.apply(t.clone(), s, nH)  # noqa: E731  (it works in place)
    assert torch.autograd.gradcheck(fast_qk, (qkv.clone().requires_grad_(), scale))

    qkv.view(M, 3, nH, d)[0, 1, 2] = 0.0  # a zero k row
    qkv.view(M, 3, nH, d)[3, 0, 1] = 1e-14  # a q row under the floor (1e-12)
    qkv.requires_grad_()
    g = torch.randn(M, 3 * nH * d, generator=gen, dtype=torch.float64)
    out = fast_qk(qkv, scale)
    ref = _cosine_reference(qkv, scale, nH)
    assert rel_err(out, ref) < 1e-14
    got = torch.autograd.grad((out * g).sum(), (qkv, scale))
    want = torch.autograd.grad((ref * g).sum(), (qkv, scale))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    # the floored row's gradient is the scaled identity, not 0 (that would mean it was dropped)
    assert got[0].view(M, 3, nH, d)[3, 0, 1].abs().max() > 1e10


@pytest.mark.parametrize("shift", [False, True])
def test_attention_training_is_as_accurate_as_the_plain_module(shift):
    """float32 outputs and gradients (input and every parameter) of the fast attention with
    gradients, which normalises q and k through CosineQK, as close to float64 as the plain
    module's explicit computation; in float64 equal to it."""
    gen = torch.Generator().manual_seed(3)
    attn = WindowAttention(96, 3)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        attn.logit_scale.copy_(torch.tensor([4.0, 2.3, 5.0]).view(3, 1, 1))  # the last past the clamp
    x = torch.randn(8, 64, 96, generator=gen)
    g = torch.randn(8, 64, 96, generator=gen)
    mask = None
    if shift:
        mask = torch.zeros(4, 64, 64)
        mask[1:, :, 32:] = -100.0

    def run(dtype, sped):
        a = copy.deepcopy(attn).to(dtype)
        if sped:
            fast.apply(a)
        else:
            a.fused_attn = False
        xx = x.to(dtype).clone().requires_grad_()
        out = a(xx, (8, 8), None if mask is None else mask.to(dtype))
        out.backward(g.to(dtype))
        return [out.detach(), xx.grad, torch.cat([p.grad.flatten() for p in a.parameters()])]

    truth = run(torch.float64, False)
    for a, b in zip(run(torch.float64, True), truth):
        assert rel_err(a, b) < 1e-12
    for got, ref, t in zip(run(torch.float32, True), run(torch.float32, False), truth):
        assert rel_err(got, t) < max(1.5 * rel_err(ref, t), 1e-6)


@pytest.mark.parametrize("switch", [{}, dict(attn_type="dot"), dict(position_bias="none")], ids=str)
def test_cpu_half_precision_matmul_attention_equals_the_plain_model(switch, monkeypatch):
    """The matmul attention used for bf16/fp16 training on CPUs, run in float64 through the
    same code, equals the plain model, outputs and gradients; in bf16 it is as accurate as
    the plain model (whose two attention computations, explicit and one SDPA call, round at
    other points: through logit scales up to 100 either may land 2x from the other)."""
    plain = plain_model(seed=7, **switch).double().train()
    model = sped_up(plain)
    x = _randn(2, 3, 36, 52, dtype=torch.float64)  # padded, shifted and global windows
    calls = []
    kernel = attention.matmul_attention
    monkeypatch.setattr(attention, "matmul_attention", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(attention, "CPU_MATMUL_DTYPES", (torch.float64, torch.bfloat16))
    plain.set_fused_attn(False)
    truth, truth_grad, _ = _train_step(plain, x)
    out, grad, _ = _train_step(model, x)
    assert rel_err(out, truth) < 1e-12 and rel_err(grad, truth_grad) < 1e-10
    assert len(calls) == 8  # every block took the matmul kernel
    model.float()
    plain.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast16 = model(x.float()).detach()
        plain16 = rel_err(plain(x.float()).detach(), truth)
        plain.set_fused_attn(True)
        plain16 = max(plain16, rel_err(plain(x.float()).detach(), truth))
        with torch.no_grad():
            sdpa16 = model(x.float())  # without gradients the fast model stays on SDPA
    assert len(calls) == 16
    assert rel_err(fast16, truth) < 1.5 * plain16
    assert rel_err(sdpa16, truth) < 1.5 * plain16


def test_sequential_attention_on_the_fast_model_equals_the_batched_plain_model(monkeypatch):
    """The fast attention chunks windows itself (§3.5): chunks that split an image's windows,
    whole images (12 = the 3x4 windows of the 9x13 stage-0 map) and more give the batched
    plain model's outputs and gradients in float64, each chunk recomputed in backward."""
    x = _randn(2, 3, 36, 52, dtype=torch.float64)
    plain = plain_model(seed=12).double().train()
    out0, grad0, xgrad0 = _train_step(plain, x)
    sizes = []
    attend = FastWindowAttention._fast_attend
    monkeypatch.setattr(FastWindowAttention, "_fast_attend", lambda self, q, *a: sizes.append(q.shape[0]) or attend(
        self, q, *a))
    for chunk in (1, 5, 12, 13):
        model = sped_up(plain)
        model.set_sequential_attention([0, 1], chunk_windows=chunk)
        sizes.clear()
        out1, grad1, xgrad1 = _train_step(model, x)
        assert rel_err(out1, out0) < 1e-12
        assert rel_err(grad1, grad0) < 1e-10 and rel_err(xgrad1, xgrad0) < 1e-10
        per_block = [[min(chunk, n - s) for s in range(0, n, chunk)] for n in (24, 8)]
        expected_forward = per_block[0] * 2 + per_block[1] * 2 + [2, 2, 2, 2]  # stages 2, 3 batched
        assert sizes[: len(expected_forward)] == expected_forward, chunk
        recomputed = [c for chunks in per_block if len(chunks) > 1 for c in chunks * 2]
        assert sorted(sizes[len(expected_forward):]) == sorted(recomputed)
        with torch.no_grad():
            assert rel_err(model.eval()(x), plain.eval()(x)) < 1e-12
        plain.train()


# -- blocks: shifted windows by a gather -------------------------------------------------------


@pytest.mark.parametrize("resolution, window, shift", [((8, 12), (4, 4), (2, 2)), ((12, 16), (4, 8), (2, 4)),
                                                       ((6, 9), (6, 3), (0, 1))])
def test_gathered_windows_are_the_rolled_partition(resolution, window, shift):
    x = _randn(2, *resolution, 5, dtype=torch.float64).requires_grad_()
    order, inverse = shifted_window_order(resolution, window, shift)
    want = window_partition(torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2)), window)
    got = gather_tokens(x.reshape(2, -1, 5), order, inverse).view_as(want)
    assert torch.equal(got, want)
    assert torch.equal(gather_tokens(got.reshape(2, -1, 5), inverse, order).view_as(x), x)
    g = _randn(*want.shape, dtype=torch.float64, seed=1)
    (want_grad,) = torch.autograd.grad(want, x, g)
    (got_grad,) = torch.autograd.grad(got, x, g)
    assert torch.equal(got_grad, want_grad)


# -- the position bias computed once in inference --------------------------------------------


def test_position_bias_cache_follows_weight_changes():
    """In eval the bias is computed once, and recomputed after any weight update."""
    model = fast_model().eval()
    attn = model.layers[0].blocks[0].attn
    with torch.no_grad():
        first = attn.relative_bias((4, 4))
        assert attn.relative_bias((4, 4)) is first  # reused
        x = torch.randn(1, 3, 64, 64)
        before = model(x)
        attn.cpb_mlp[2].weight.mul_(2.0)  # an in-place update, as an optimizer makes
        changed = attn.relative_bias((4, 4))
        assert changed is not first and not torch.allclose(changed, first)
        assert not torch.allclose(model(x), before)
    with torch.enable_grad():
        assert attn.relative_bias((4, 4)).requires_grad  # training never uses the cache
    fast.apply(model, bias_cache=False)
    with torch.no_grad():
        assert attn.relative_bias((4, 4)) is not attn.relative_bias((4, 4))  # switched off


def test_position_bias_cache_is_kept_per_autocast_dtype():
    """A bias cached under bfloat16 autocast (computed in bfloat16, as the official code does)
    must not serve later float32 inference, nor the other way round."""
    model = fast_model().eval()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)  # fills the cache in bfloat16 first
        assert torch.equal(model(x), twin(x))  # float32 as if never run under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(x), mixed)
        attn = model.layers[0].blocks[0].attn
        assert attn.relative_bias((4, 4)).dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert attn.relative_bias((4, 4)).dtype == torch.bfloat16


# -- batch chunks --------------------------------------------------------------------------


def _count_block_batches(monkeypatch):
    """Records the batch size of every block call (forward and recomputation)."""
    sizes = []
    forward = FastBlock.forward
    monkeypatch.setattr(FastBlock, "forward", lambda self, x, *a, **k: sizes.append(x.shape[0]) or forward(
        self, x, *a, **k))
    return sizes


# stage 0 of the debug model on 36x52: 9x13 tokens x 128 hidden, 8 bytes: 3 images' worth
# (stage 1, 5x7 x 256, then takes all 5 images at once)
STAGE0_3_IMAGES_MB = 3 * 9 * 13 * 128 * 8 / 2**20 * 1.001


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("budget", [1e-9, STAGE0_3_IMAGES_MB], ids=["one-image-chunks", "stage0-uneven"])
def test_batch_chunks_equal_the_whole_batch(budget, checkpointing, dtype, monkeypatch):
    """With stochastic depth at 0.5 in every block and the same seed, a batch run in chunks
    gives the whole batch's outputs and gradients (and the plain model's): the masks are drawn
    for the whole batch, in its order, and the generator ends where the whole batch leaves it."""
    x = _randn(5, 3, 36, 52, dtype=dtype)
    plain = randomize_(swinv2.create_model(DEBUG, fast=False), seed=21).to(dtype).train()
    for stage in plain.layers:
        for block in stage.blocks:
            block.drop_path = DropPath(0.5)
    model = sped_up(plain)
    if dtype == torch.float32:  # the budget is in bytes: the same chunks as in float64
        budget /= 2
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for m in (plain, model):
        m.set_grad_checkpointing(checkpointing)
    torch.manual_seed(3)
    outp, gradp, _ = _train_step(plain, x)
    model.set_batch_chunking(None)
    torch.manual_seed(3)
    out0, grad0, xgrad0 = _train_step(model, x)
    rng0 = torch.get_rng_state()
    assert rel_err(out0, outp) < tol and rel_err(grad0, gradp) < 100 * tol  # the same branches dropped
    model.set_batch_chunking(budget)
    sizes = _count_block_batches(monkeypatch)
    torch.manual_seed(3)
    out1, grad1, xgrad1 = _train_step(model, x)
    assert torch.equal(torch.get_rng_state(), rng0)
    assert rel_err(out1, out0) < tol
    assert rel_err(grad1, grad0) < 100 * tol and rel_err(xgrad1, xgrad0) < 100 * tol
    if budget < 1e-6:
        assert sizes[:8] == [1] * 8 and max(sizes) == 1  # every stage, one image at a time
    else:  # stage 0 only: 5 images in chunks of 3 and 2, then the other stages whole
        assert sizes[:10] == [3, 3, 2, 2, 5, 5, 5, 5, 5, 5]
    assert sum(sizes) == 5 * 8 * (2 if checkpointing else 1)  # recomputed once when checkpointed


def test_batch_chunks_in_inference_and_intermediates(monkeypatch):
    x = _randn(4, 3, 36, 52)
    model = fast_model(seed=22).eval()
    with torch.no_grad():
        model.set_batch_chunking(None)
        whole, maps = model(x), model.forward_intermediates(x)[1]
        model.set_batch_chunking(1e-9)
        sizes = _count_block_batches(monkeypatch)
        embedded = []
        embed = swinv2.layers.PatchEmbed.forward
        monkeypatch.setattr(swinv2.layers.PatchEmbed, "forward",
                            lambda self, t: embedded.append(len(t)) or embed(self, t))
        chunked = model(x)
        assert embedded == [1, 1, 1, 1]  # each chunk embedded on its own, never the whole batch
        chunked_maps = model.forward_intermediates(x)[1]
    assert max(sizes) == 1 and len(sizes) == 2 * 4 * 8
    assert rel_err(chunked, whole) < 1e-6
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(chunked_maps, maps))


def _chunks(stage, t: torch.Tensor) -> int:
    return stage.chunk_count(t.shape, t.device, t.dtype)


def test_batch_chunk_count_follows_the_largest_tensor():
    """SwinV2-T at 256 px, batch 32, 32 MiB: per image the MLP hidden tensor (window 8) or
    the attention scores (window 16) decide; bfloat16 halves the bytes."""
    model = swinv2.create_model("swinv2_tiny_window8_256")
    inputs = [torch.empty(32, 64 >> i, 64 >> i, 96 << i) for i in range(4)]
    # hidden tokens x 4C: 6, 3, 1.5, 0.75 MiB per image -> 5, 10, 21, 42 images per chunk
    assert [_chunks(s, t) for s, t in zip(model.layers, inputs)] == [7, 4, 2, 1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [_chunks(s, t) for s, t in zip(model.layers, inputs)] == [4, 2, 1, 1]
    assert _chunks(model.layers[0], inputs[0][:1]) == 1  # one image
    model.set_batch_chunking(64)
    assert [_chunks(s, t) for s, t in zip(model.layers, inputs)] == [4, 2, 1, 1]
    w16 = swinv2.create_model("swinv2_tiny_window16_256")
    # 16 windows x 3 heads x 256^2 scores = 12 MiB per image at stage 0 -> 2 per chunk
    assert _chunks(w16.layers[0], inputs[0]) == 16
    assert _chunks(w16.layers[0], inputs[0].to("meta")) == 1  # CPU only


def test_batch_chunks_step_aside(monkeypatch):
    model = fast_model(seed=23)
    model.set_batch_chunking(1e-9)
    stage, x = model.layers[0], torch.empty(4, 16, 16, 32)
    assert _chunks(stage, x) == 4
    handle = stage.blocks[1].mlp.fc2.register_forward_hook(lambda *a: None)
    assert _chunks(stage, x) == 1  # a hook would see each chunk
    handle.remove()
    handle = stage.register_forward_hook(lambda *a: None)
    assert _chunks(stage, x) == 4  # the stage itself is called once
    handle.remove()
    dropout = swinv2.create_model(DEBUG, drop_rate=0.1)
    dropout.set_batch_chunking(1e-9)
    assert _chunks(dropout.layers[0].train(), x) == 1 and _chunks(dropout.layers[0].eval(), x) == 4
    with pytest.raises(ValueError, match=r"input shape \(4, 2, 32, 32\)"):  # the caller's batch
        model(torch.zeros(4, 2, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.zeros(4, 3, 30, 32))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _chunks(stage, x) == 1


def test_batch_chunking_options():
    model = swinv2.create_model(DEBUG)
    assert model.layers[2].batch_chunk_mb == fast.DEFAULT_BATCH_CHUNK_MB == 32.0
    assert "batch_chunk_mb" not in model.config  # a speedup, not part of the model
    unchunked = fast.apply(swinv2.create_model(DEBUG, fast=False), batch_chunk_mb=None)
    assert not any(isinstance(m, (ChunkedStage, ChunkedSwinTransformerV2)) for m in unchunked.modules())
    model.set_batch_chunking(8)
    assert all(s.batch_chunk_mb == 8.0 for s in model.layers)
    assert fast.apply(swinv2.create_model(DEBUG, fast=False), batch_chunk_mb=8).layers[3].batch_chunk_mb == 8.0
    model.set_batch_chunking(0)
    assert all(s.batch_chunk_mb is None for s in model.layers)
    assert _chunks(model.layers[0], torch.empty(64, 16, 16, 32)) == 1
    model.set_batch_chunking(True)  # the default budget
    assert model.layers[0].batch_chunk_mb == 32.0
    for bad in (-1, float("nan"), "32"):
        with pytest.raises(ValueError, match="batch_chunk_mb"):
            model.set_batch_chunking(bad)
    assert model.layers[0].batch_chunk_mb == 32.0  # a refused value changes nothing


# -- captured graphs: compiled, exported, traced ---------------------------------------------


def test_torch_compile_takes_the_whole_fast_forward():
    assert_compiles_whole(fast_model(seed=8))


@pytest.mark.slow
def test_sequential_attention_on_the_fast_model_compiles_whole():
    # the captured training graph runs F.linear: oneDNN left out, eager runs the same GEMMs
    model = fast.apply(plain_model(seed=15), onednn=False)
    model.set_sequential_attention([0, 1], chunk_windows=5)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = _randn(2, 3, 36, 52)
    with torch.no_grad():
        assert rel_err(compiled.eval()(x), model(x)) < 1e-6
    model.train()
    out = compiled(x)
    out.square().sum().backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    # The captured graph normalises q and k with F.normalize, eager with CosineQK: both are
    # held to the float64 model, the compiled one at most as far from it as eager (with margin).
    _, eager_grad, _ = _train_step(model, x)
    _, truth, _ = _train_step(fast.remove(copy.deepcopy(model)).double(), x.double())
    assert rel_err(grad, truth) < 1.5 * rel_err(eager_grad, truth) and rel_err(grad, eager_grad) < 1e-3
    torch._dynamo.reset()


@pytest.mark.parametrize("grad", [False, True])
def test_captured_graphs_hold_only_pytorch_operators(grad):
    """torch.export and tracing record a graph to run elsewhere: the speedups step aside (no
    oneDNN or swinv2 operators in it), and the graph computes what the model does."""
    model = fast_model(seed=5).eval()
    x = _randn(2, 3, 36, 52, seed=5)
    program = export_holding_only_pytorch_operators(model, x, grad)
    with torch.no_grad():
        want = model(x)  # (the position bias is now cached)
        assert rel_err(program.module()(x), want) < 1e-5
        traced = torch.jit.trace(model, (x,), check_trace=False)
        kinds = {n.kind() for n in traced.inlined_graph.nodes()}
        assert not any("mkldnn" in k or "swinv2" in k for k in kinds), sorted(kinds)
        assert rel_err(traced(x), want) < 1e-5
        # the graphs compute the position bias from the weights, not from the eager cache
        for block in model.iter_blocks():
            block.attn.cpb_mlp[2].weight.mul_(1.5)
        changed = model(x)
        assert rel_err(changed, want) > 1e-3
        assert rel_err(traced(x), changed) < 1e-5 and rel_err(program.module()(x), changed) < 1e-5


def test_a_saved_config_rebuilds_a_fast_model():
    model = fast_model(seed=1, grad_checkpointing=[1], sequential_attention={0: 3})
    rebuilt = fast.apply(swinv2.SwinTransformerV2(**json.loads(json.dumps(model.config))))
    assert rebuilt.config == model.config and _fast_classes(rebuilt) == _fast_classes(model)
