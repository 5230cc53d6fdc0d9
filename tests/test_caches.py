"""What the model keeps between calls (masks, relative indices and coordinates, and on the fast
model token orders and position biases) is bounded whatever sizes it sees, and never outlives
the weights it was computed from."""

import copy

import pytest
import torch
from helpers import randomize_, rel_err

import swinv2
import swinv2.blocks
from swinv2 import fast
from swinv2.cache import CONSTANT_CACHE_BYTES, BoundedCache
from swinv2.windows import attention_mask

CACHES = ("_mask_cache", "_order_cache", "_index", "_coords", "_bias_cache")
both = pytest.mark.parametrize("is_fast", [False, True], ids=["plain", "fast"])


def _model(is_fast=True, **kw):
    return randomize_(swinv2.create_model("swinv2_debug", num_classes=5, fast=is_fast, **kw), seed=4).eval()


def _caches(model):
    """(module name, cache name, cache) of every cache the model holds."""
    return [(n, c, getattr(m, c)) for n, m in model.named_modules() for c in CACHES
            if isinstance(getattr(m, c, None), BoundedCache)]


def _x(h=36, w=52, seed=1):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_bounded_cache_keeps_the_most_recent_within_its_bounds():
    cache = BoundedCache(entries=3, max_bytes=100)
    built = []

    def build(n):
        built.append(n)
        return torch.zeros(n, dtype=torch.uint8)

    for n in (10, 20, 30, 10, 40):
        cache.get(n, lambda n=n: build(n))
    assert built == [10, 20, 30, 40]  # 10 was served from the cache the second time
    assert len(cache) == 3 and 20 not in cache and cache.nbytes <= 100  # 20 was the least recently used
    cache.get(90, lambda: build(90))  # evicts until the bytes fit
    assert cache.nbytes <= 100 and 90 in cache
    cache.get(200, lambda: build(200))  # larger than the whole budget: built, returned, not kept
    assert 200 not in cache and cache.nbytes <= 100


@both
def test_many_input_sizes_keep_bounded_caches(is_fast):
    """A detector or a server sees a new padded size almost every batch."""
    model = _model(is_fast)
    with torch.no_grad():
        for i in range(12):
            model(_x(32 + 4 * i, 48 + 8 * (i % 5)))
    caches = _caches(model)
    kinds = {c for _, c, _ in caches}
    assert kinds == (set(CACHES) if is_fast else set(CACHES) - {"_order_cache", "_bias_cache"})
    full = [(n, c) for n, c, cache in caches if len(cache) == cache.entries]
    assert full  # twelve sizes filled some of them...
    assert all(len(cache) <= cache.entries and cache.nbytes <= cache.max_bytes for _, _, cache in caches)


def test_large_masks_are_built_per_call_not_kept():
    """At 800x1333 with window 16, stage 0's mask is ~70 MB: it must not stay in memory."""
    stage = _model(window_size=16).layers[0]
    resolution = (200, 334)  # 800x1333 after the 4x4 patch embedding, padded to 16
    window, shift = stage.window_and_shift(resolution)
    mask = stage.masks(resolution, torch.device("cpu"))[shift]
    assert mask.numel() * mask.element_size() > 4 * CONSTANT_CACHE_BYTES
    assert len(stage._mask_cache) == 0
    assert torch.equal(mask, attention_mask(resolution, window, shift))


@both
def test_masks_are_built_once_per_stage_call(is_fast):
    model = _model(is_fast)
    calls = []
    original = swinv2.blocks.attention_mask

    def counting(*args, **kwargs):
        calls.append(args[:3])
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(swinv2.blocks, "attention_mask", counting)
        with torch.no_grad():
            model(_x())
            first = len(calls)
            model(_x())
    # one per (stage, shift) on the first call, whatever the number of blocks; none after
    assert first == sum(len({(0, 0), s.window_and_shift(r)[1]}) for s, r in
                        zip(model.layers, model.stage_resolutions((36, 52))))
    assert len(calls) == first


EDITS = {
    "data-mul": lambda p: p.data.mul_(1.5),
    "data-assign": lambda p: setattr(p, "data", p.data * 1.5),
    "no-grad-copy": lambda p: p.copy_(p * 1.5),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_position_bias_cache_follows_the_weights(edit):
    """However the weights change, the fast model's inference afterwards equals a fresh model
    with those weights (and the plain model)."""
    model = _model()
    x = _x()
    with torch.no_grad():
        before = model(x)  # fills the bias caches
        for block in model.layers[0].blocks:
            EDITS[edit](block.attn.cpb_mlp[2].weight)
        after = model(x)
        fresh = copy.deepcopy(model)
        for module in fresh.modules():
            if hasattr(module, "_bias_cache"):
                module._bias_cache.clear()
        expected = fresh(x)
        plain = fast.remove(copy.deepcopy(model))(x)
    assert rel_err(after, expected) < 1e-6 and rel_err(after, plain) < 5e-5
    assert rel_err(before, expected) > 1e-3  # the edit matters


@both
def test_load_state_dict_and_table_bias_are_followed(is_fast):
    model = _model(is_fast, position_bias="table")
    other = _model(is_fast, position_bias="table")
    randomize_(other, seed=9)
    x = _x()
    with torch.no_grad():
        model(x)
        model.load_state_dict(other.state_dict())
        assert rel_err(model(x), other(x)) < 1e-6


def test_bias_is_reused_while_the_weights_stay():
    model = _model()
    attn = model.layers[0].blocks[0].attn
    calls = []
    original = attn.bias_table  # what the bias is gathered from, computed by the position-bias MLP
    attn.bias_table = lambda window: calls.append(window) or original(window)
    with torch.no_grad():
        model(_x())
        model(_x(seed=2))
    assert len(calls) == 1
    model.train()
    model(_x())  # with gradients the bias is part of the graph: computed every call
    assert len(calls) == 2


def test_bias_cache_is_kept_per_autocast_dtype():
    model = _model()
    x = _x()
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        assert torch.equal(model(x), fp32)


@both
def test_capturing_a_graph_leaves_the_caches_alone(is_fast):
    """torch.export traces with placeholder tensors: none may be kept and served to eager calls."""
    model = _model(is_fast)
    x = _x()
    program = torch.export.export(model, (x,))
    assert not [(n, c) for n, c, cache in _caches(model) if len(cache)]
    with torch.no_grad():
        assert rel_err(program.module()(x), model(x)) < 1e-4  # float32: other kernels, same math


@both
def test_inference_mode_then_training(is_fast):
    """Constants cached during inference_mode must not poison a later training step."""
    model = _model(is_fast)
    with torch.inference_mode():
        model.eval()(_x())
    assert any(len(cache) for _, _, cache in _caches(model))
    model.train()(_x()).sum().backward()
    assert model.layers[0].blocks[1].attn.cpb_mlp[0].weight.grad is not None
