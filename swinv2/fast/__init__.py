"""Speedups applied to a built model from outside, each named, switchable and deletable.

``swinv2.SwinTransformerV2(...)`` builds the plain model of the paper; ``apply(model)`` swaps
faster versions of some of its modules in (``module.__class__``: the same parameters, state dict
and names), so hooks, PEFT/LoRA wrappers, quantisation and FSDP still see ordinary modules called
through ``module.__call__``; ``remove(model)`` swaps them back. Every speedup computes the same
values as the plain model, up to float rounding (the tests hold each one to it), and steps aside
where it would not (exports, hooks, subclassed tensors, devices it does not know).
``swinv2.create_model(..., fast=True)`` (the default) applies the defaults.

| name | what | default |
|---|---|---|
| ``onednn`` | Linear layers on oneDNN's inner product (CPU), GELU fused into the MLP's first GEMM | on |
| ``attention`` | one GEMM for q, k, v with their biases; cosine normalisation in place; broadcast masks | on |
| ``bias_cache`` | the position bias computed once in CPU inference while the weights stay | on |
| ``blocks`` | shifted windows by one gather instead of roll + partition; in-place residual sums | on |
| ``batch_chunk_mb`` | stages run the batch in chunks of images on a CPU (32 MiB per tensor) | 32 |
| ``native`` | a C kernel for window attention on AVX-512 CPUs (compiles C code here) | opt-in |

Process-wide and opt-in: :func:`swinv2.fast.allocator.keep_freed_memory`. :func:`status` says
which are on here and why.
"""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import SwinTransformerV2Block, SwinTransformerV2Stage
from ..layers import DropPath, Mlp, WindowAttention
from ..model import SwinTransformerV2
from ..video import VideoSwinTransformerV2
from . import allocator, native, onednn
from .attention import FastWindowAttention
from .blocks import DEFAULT_BATCH_CHUNK_MB, ChunkedDropPath, ChunkedStage, ChunkedSwinTransformerV2, FastBlock
from .onednn import FusedGeluMlp, OneDNNLinear

# fast class -> the plain class it replaces
_PLAIN = {OneDNNLinear: nn.Linear, FusedGeluMlp: Mlp, FastWindowAttention: WindowAttention, FastBlock:
          SwinTransformerV2Block, ChunkedStage: SwinTransformerV2Stage, ChunkedDropPath: DropPath,
          ChunkedSwinTransformerV2: SwinTransformerV2}
_STATE = ("_bias_cache", "_order_cache", "batch_chunk_mb", "use_native", "cache_bias")


def apply(model: nn.Module, *, onednn: bool = True, attention: bool = True, bias_cache: bool = True,
          blocks: bool = True, batch_chunk_mb: float | None = DEFAULT_BATCH_CHUNK_MB,
          native: bool | None = None) -> nn.Module:
    """Swap the speedups in (see the module's table) and return ``model``. Only modules of
    exactly the plain classes are swapped (a subclass of the user's is left as it is), so apply
    it before wrapping the model (FSDP, PEFT). ``native``: True (asks for the kernel in this
    process) or False, for this model; None follows ``SWINV2_NATIVE``. Batch chunks need the
    fast blocks (``blocks=True``)."""
    if native:  # False leaves other models that asked for the kernel with it
        _native_switch(True)
    if isinstance(model, VideoSwinTransformerV2):
        blocks = False  # the fast blocks' gather and chunks are written for images
    chunks = bool(batch_chunk_mb) and blocks
    for module in model.modules():
        kind = type(module)
        if onednn and kind is nn.Linear:
            module.__class__ = OneDNNLinear
        elif onednn and kind is Mlp:
            module.__class__ = FusedGeluMlp
        elif attention and kind is WindowAttention:
            module.__class__ = FastWindowAttention
        elif blocks and kind is SwinTransformerV2Block:
            module.__class__ = FastBlock
        elif chunks and kind is SwinTransformerV2Stage:
            module.__class__ = ChunkedStage
        elif chunks and kind is DropPath:
            module.__class__ = ChunkedDropPath
        elif chunks and kind is SwinTransformerV2:
            module.__class__ = ChunkedSwinTransformerV2
        if isinstance(module, FastWindowAttention):
            module.use_native = _native_on(native)
            module.cache_bias = bias_cache
        if isinstance(module, ChunkedStage):
            module.batch_chunk_mb = float(batch_chunk_mb) if chunks else None
    return model


def remove(model: nn.Module) -> nn.Module:
    """Swap every speedup out again: the plain model, same parameters. Returns ``model``."""
    for module in model.modules():
        plain = _PLAIN.get(type(module))
        if plain is not None:
            module.__class__ = plain
            for name in _STATE:
                module.__dict__.pop(name, None)
    return model


def is_applied(model: nn.Module) -> bool:
    return any(type(m) in _PLAIN for m in model.modules())


def _native_switch(on: bool) -> None:
    native.enable(on)


def _native_on(asked: bool | None) -> bool:
    return native.enabled() if asked is None else bool(asked)


def status() -> list[tuple[str, bool, str]]:
    """(name, on by default here, why) for every speedup, on this machine and process."""
    has_onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    dtypes = [str(d).removeprefix("torch.") for d in (torch.float32, torch.bfloat16) if has_onednn and onednn.runs(d)]
    return [
        ("onednn", bool(dtypes), f"CPU Linear layers on oneDNN's inner product in {', '.join(dtypes)}" if dtypes
         else "this PyTorch has no working oneDNN inner product: F.linear"),
        ("attention", True, "one GEMM for q, k and v, cosine scaling in place, masks broadcast (any device)"),
        ("bias_cache", True, "position bias reused in CPU inference while the weights stay"),
        ("blocks", True, "shifted windows by one gather, in-place residual sums"),
        ("batch_chunk_mb", True, f"CPU stages in chunks of at most {DEFAULT_BATCH_CHUNK_MB:g} MiB per block tensor"),
        ("native", native.enabled() and native.available(), f"C kernel for window attention: {native.status()}"),
        ("keep_freed_memory", allocator.is_kept(), "glibc keeps freed memory for reuse: "
         + ("on" if allocator.is_kept() else "off (opt-in: swinv2.fast.allocator.keep_freed_memory())")),
    ]


def describe() -> str:
    """:func:`status` as text, one line per speedup (for reports)."""
    return "\n".join(f"{name}: {'on' if on else 'off'} ({why})" for name, on, why in status())


__all__ = ["DEFAULT_BATCH_CHUNK_MB", "apply", "describe", "is_applied", "remove", "status"]
