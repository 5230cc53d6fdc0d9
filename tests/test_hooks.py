"""Hooks on any module of the model fire once per call, with the whole batch, on the plain model
and on the fast one whatever speedup it would otherwise take (oneDNN Linear, fused GELU, q, k
and v in one GEMM, batch chunks, the bias cache)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_, rel_err
from torch import nn
from torch.nn.modules import module as module_hooks

import swinv2

B = 3


def _model(fast: bool, **kw):
    model = swinv2.create_model("swinv2_debug", num_classes=5, fast=fast, **kw)
    return randomize_(model, seed=3)


def _chunk_all(model) -> None:
    """A tiny budget: every stage of a fast model would run its batch in chunks."""
    if hasattr(model, "set_batch_chunking"):
        model.set_batch_chunking(0.001)


both = pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])


def _x(dtype=torch.float32):
    return torch.randn(B, 3, 36, 52, generator=torch.Generator().manual_seed(1)).to(dtype)


def _rows(model, name: str) -> int:
    """Leading size of what ``name`` sees for the whole batch: images, except inside attention,
    which works on windows (B*nW, N, C); for qkv the number of tokens B*nW*N (the fast model
    takes the windows flattened, (B*nW*N, C))."""
    if ".attn." not in name:
        return B
    i = int(name.split(".")[1])
    h, w = model.stage_resolutions((36, 52))[i]
    (wh, ww), _ = model.layers[i].window_and_shift((h, w))
    windows = B * -(-h // wh) * -(-w // ww)
    return windows * wh * ww if name.endswith("qkv") else windows


LINEARS = ["layers.0.blocks.0.mlp.fc1", "layers.0.blocks.0.mlp.fc2", "layers.0.blocks.1.attn.proj",
           "layers.1.blocks.1.attn.qkv", "layers.0.downsample.reduction", "head"]


@pytest.mark.parametrize("fast, chunked", [(False, False), (True, False), (True, True)],
                         ids=["plain", "fast-whole", "fast-batch-chunks"])
def test_full_backward_hooks_fire_once_with_the_whole_batch(fast, chunked):
    model = _model(fast)
    if fast:
        model.set_batch_chunking(0.001 if chunked else None)
    seen: dict[str, list] = {name: [] for name in LINEARS + ["layers.0.blocks.1", "layers.2"]}
    for name in seen:
        model.get_submodule(name).register_full_backward_hook(
            lambda m, gin, gout, name=name: seen[name].append(gout[0].shape))
    model(_x()).square().sum().backward()
    for name, shapes in seen.items():
        assert len(shapes) == 1, (name, shapes)
        rows = shapes[0][:-1].numel() if name.endswith("qkv") else shapes[0][0]
        assert rows == _rows(model, name), (name, shapes)


@both
def test_forward_hooks_fire_once_with_the_whole_batch_under_chunks(fast):
    model = _model(fast).eval()
    _chunk_all(model)
    calls = []
    model.layers[0].blocks[1].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    model.patch_embed.register_forward_pre_hook(lambda m, i: calls.append(("embed", i[0].shape[0])))
    with torch.no_grad():
        model(_x())
    assert calls == [("embed", B), B]


@both
@pytest.mark.parametrize("kind", ["forward", "backward", "inference"])
def test_global_hooks_see_every_module_once(kind, fast):
    """Forward and backward with gradients, and inference (where the fast model would fuse
    GELU into fc1, reuse the position bias and run q, k, v as one GEMM)."""
    model = _model(fast)
    _chunk_all(model)
    counts: dict[nn.Module, int] = {}

    def hook(module, *args):
        counts[module] = counts.get(module, 0) + 1

    register = (module_hooks.register_module_forward_hook if kind != "backward"
                else module_hooks.register_module_full_backward_hook)
    handle = register(hook)
    try:
        if kind == "inference":
            with torch.no_grad():
                model.eval()(_x())
        else:
            model(_x()).square().sum().backward()
    finally:
        handle.remove()
    # every Linear of every block (cpb_mlp included), every LayerNorm, the GELUs
    watched = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm, nn.GELU))]
    assert watched and all(counts.get(m) == 1 for m in watched), sorted(
        (n, counts.get(m)) for n, m in model.named_modules() if m in watched and counts.get(m) != 1)


@both
def test_hooked_outputs_are_the_modules_own_and_stay_unmodified(fast):
    """The qkv hook sees x W^T (the module has no bias; q/v biases are added after it), the fc1
    hook sees the pre-GELU output, the GELU's hook its output; later in-place work on the
    attention inputs must not change what a hook holds."""
    model = _model(fast).eval()
    got = {}
    for name in ("layers.0.blocks.0.attn.qkv", "layers.0.blocks.0.mlp.fc1", "layers.0.blocks.0.mlp.act"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: got.__setitem__(name, (i[0], o, o.clone())))
    with torch.no_grad():
        model(_x())
    for name, (_, out, at_hook_time) in got.items():
        assert torch.equal(out, at_hook_time), f"{name}'s output was changed after its hook ran"
    qkv = model.layers[0].blocks[0].attn.qkv
    inp, out, _ = got["layers.0.blocks.0.attn.qkv"]
    torch.testing.assert_close(out, F.linear(inp, qkv.weight))
    inp, out, _ = got["layers.0.blocks.0.mlp.fc1"]
    torch.testing.assert_close(out, F.linear(inp, model.layers[0].blocks[0].mlp.fc1.weight,
                                             model.layers[0].blocks[0].mlp.fc1.bias))
    torch.testing.assert_close(got["layers.0.blocks.0.mlp.act"][1], F.gelu(out))


@both
def test_hooks_do_not_change_the_result(fast):
    model = _model(fast).double().eval()
    x = _x(torch.float64)
    plain = model(x)
    for name in LINEARS + ["layers.0.blocks.0.mlp.act", "layers.0.blocks.1"]:
        model.get_submodule(name).register_full_backward_hook(lambda *a: None)
        model.get_submodule(name).register_forward_hook(lambda *a: None)
    assert rel_err(model(x), plain) < 1e-12


@both
def test_patched_forward_is_called(fast):
    """Wrappers that replace an instance's ``forward`` (offloading, profiling) are honoured."""
    model = _model(fast).eval()
    fc2 = model.layers[0].blocks[0].mlp.fc2
    calls = []
    original = fc2.forward

    def wrapped(x):
        calls.append(x.shape[0])
        return original(x)

    fc2.forward = wrapped
    with torch.no_grad():
        model(_x())
    assert calls == [B]


@both
def test_position_bias_hooks_fire_on_every_forward_in_eval(fast):
    """The fast model's inference reuses the position bias while the weights stay; a hook on
    its MLP still sees every forward."""
    model = _model(fast).eval()
    calls = []
    model.layers[0].blocks[0].attn.cpb_mlp.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(_x())
        model(_x())
    assert len(calls) == 2


@both
def test_hooked_or_replaced_linear_layers_are_called(fast):
    """A hooked, subclassed or wrapped Linear runs as a module, so its hooks and overrides act."""
    model = _model(fast).eval()
    x = _x()[:1]
    with torch.no_grad():
        before = model(x)
        calls = []
        fc1 = model.layers[0].blocks[0].mlp.fc1
        handle = fc1.register_forward_hook(lambda m, i, o: calls.append(1) or o.zero_())
        hooked = model(x)
        handle.remove()

        class Flipped(nn.Linear):  # (a scaling would vanish in the res-post LayerNorm)
            def forward(self, t):
                return super().forward(t).flip(-1)

        for name in ("proj", "qkv"):
            layer = getattr(model.layers[1].blocks[1].attn, name)
            flipped = Flipped(layer.in_features, layer.out_features, bias=layer.bias is not None)
            flipped.load_state_dict(layer.state_dict())
            setattr(model.layers[1].blocks[1].attn, name, flipped)
            replaced = model(x)
            assert rel_err(replaced, before) > 1e-3, name
            setattr(model.layers[1].blocks[1].attn, name, layer)
    assert calls == [1]
    assert rel_err(hooked, before) > 1e-3
