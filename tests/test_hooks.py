"""Hooks on any module of the model fire once per call, with the whole batch, whatever fast path
the model would otherwise take (oneDNN Linear, fused GELU, batch chunks, the bias cache)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_, rel_err
from torch import nn
from torch.nn.modules import module as module_hooks

import swinv2

B = 3


def _model(**kw):
    model = swinv2.create_model("swinv2_debug", num_classes=5, **kw)
    return randomize_(model, seed=3)


def _x(dtype=torch.float32):
    return torch.randn(B, 3, 36, 52, generator=torch.Generator().manual_seed(1)).to(dtype)


def _rows(model, name: str) -> int:
    """Leading size of what ``name`` sees for the whole batch: images, except inside attention,
    which works on windows (B*nW, N, C), and qkv, which takes them flattened (B*nW*N, C)."""
    if ".attn." not in name:
        return B
    i = int(name.split(".")[1])
    h, w = model.stage_resolutions((36, 52))[i]
    (wh, ww), _ = model.layers[i].window_and_shift((h, w))
    windows = B * -(-h // wh) * -(-w // ww)
    return windows * wh * ww if name.endswith("qkv") else windows


LINEARS = ["layers.0.blocks.0.mlp.fc1", "layers.0.blocks.0.mlp.fc2", "layers.0.blocks.1.attn.proj",
           "layers.1.blocks.1.attn.qkv", "layers.0.downsample.reduction", "head"]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "batch-chunks"])
def test_full_backward_hooks_fire_once_with_the_whole_batch(chunked):
    model = _model()
    model.set_batch_chunking(0.001 if chunked else None)  # a tiny budget: every stage would run in chunks
    seen: dict[str, list] = {name: [] for name in LINEARS + ["layers.0.blocks.1", "layers.2"]}
    for name in seen:
        model.get_submodule(name).register_full_backward_hook(
            lambda m, gin, gout, name=name: seen[name].append(gout[0].shape))
    model(_x()).square().sum().backward()
    for name, shapes in seen.items():
        assert len(shapes) == 1, (name, shapes)
        assert shapes[0][0] == _rows(model, name), (name, shapes)


def test_forward_hooks_fire_once_with_the_whole_batch_under_chunks():
    model = _model().eval()
    model.set_batch_chunking(0.001)
    calls = []
    model.layers[0].blocks[1].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    model.patch_embed.register_forward_pre_hook(lambda m, i: calls.append(("embed", i[0].shape[0])))
    with torch.no_grad():
        model(_x())
    assert calls == [("embed", B), B]


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_global_hooks_see_every_module_once(kind):
    model = _model()
    model.set_batch_chunking(0.001)
    counts: dict[nn.Module, int] = {}

    def hook(module, *args):
        counts[module] = counts.get(module, 0) + 1

    register = (module_hooks.register_module_forward_hook if kind == "forward"
                else module_hooks.register_module_full_backward_hook)
    handle = register(hook)
    try:
        model(_x()).square().sum().backward()
    finally:
        handle.remove()
    # every Linear of every block (cpb_mlp included), every LayerNorm, the GELUs
    watched = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm, nn.GELU))]
    assert watched and all(counts.get(m) == 1 for m in watched), sorted(
        (n, counts.get(m)) for n, m in model.named_modules() if m in watched and counts.get(m) != 1)


def test_hooked_outputs_are_the_modules_own_and_stay_unmodified():
    """The qkv hook sees x W^T (the module has no bias; q/v biases are added after it), the fc1
    hook sees the pre-GELU output, the GELU's hook its output; later in-place work on the
    attention inputs must not change what a hook holds."""
    model = _model().eval()
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


def test_hooks_do_not_change_the_result():
    model = _model().double().eval()
    x = _x(torch.float64)
    plain = model(x)
    for name in LINEARS + ["layers.0.blocks.0.mlp.act", "layers.0.blocks.1"]:
        model.get_submodule(name).register_full_backward_hook(lambda *a: None)
        model.get_submodule(name).register_forward_hook(lambda *a: None)
    assert rel_err(model(x), plain) < 1e-12


def test_patched_forward_is_called():
    """Wrappers that replace an instance's ``forward`` (offloading, profiling) are honoured."""
    model = _model().eval()
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


def test_position_bias_hooks_fire_on_every_forward_in_eval():
    """Inference reuses the position bias while the weights stay; a hook on its MLP still sees
    every forward."""
    model = _model().eval()
    calls = []
    model.layers[0].blocks[0].attn.cpb_mlp.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(_x())
        model(_x())
    assert len(calls) == 2
