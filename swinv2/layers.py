"""Building blocks of Swin Transformer V2.

Everything here works on channel-last maps: ``(B, H, W, C)`` for feature maps and
``(B*nW, N, C)`` for windows of ``N = wh*ww`` tokens. Window sizes are ``(wh, ww)`` tuples.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.utils.checkpoint import checkpoint

from . import native

Size2 = tuple[int, int]

# Logit-scale ceiling of scaled cosine attention (paper §3.3: tau > 0.01, so scale <= 100).
# The official code builds it as a float32 tensor, so the float32 value of ln(100) is kept
# here too: in float64 the two differ by 6e-8, which the reference outputs can see.
LOGIT_SCALE_MAX = float(torch.log(torch.tensor(100.0, dtype=torch.float32)))
# Added to the logits of token pairs that a shifted window joins across the image border.
# The official code uses -100 rather than -inf; with logit scales near 100 that is visible.
SHIFT_MASK_VALUE = -100.0
# Added to the logits of padded keys. Padding is always narrower than the window, so every
# window row keeps at least one real key and -inf can never give an all-masked row.
PAD_MASK_VALUE = float("-inf")
# F.normalize's floor on the norm of the cosine attention's q and k.
NORM_EPS = 1e-12
# Sequential attention sizes its chunks from a budget for score-sized tensors, (chunk, nH, N, N)
# each: the CPU matmul kernel holds at most this many of them at once (bias plus mask, logits,
# probabilities in forward; probabilities, their gradient and the logits' gradient in backward).
SCORE_TENSORS = 4
DEFAULT_ATTENTION_BUDGET_MB = 256.0

NORM_PLACEMENTS = ("res_post", "pre", "post", "sandwich")
ATTN_TYPES = ("cosine", "dot")
POSITION_BIASES = ("log_cpb", "linear_cpb", "table", "none")


def _as_int(value, name: str, whole) -> int:
    """An integer (Python, NumPy or a 0-d integer tensor); strings, bools and floats are errors:
    ``int()`` would read "64" as 64 and 64.7 as 64 without a word."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {whole!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {whole!r}") from None


def to_2tuple(value, name: str = "value") -> Size2:
    """(v, v) for an int, the pair itself for a pair of ints; anything else is an error
    (a string is not a pair: "64" would otherwise read as (6, 4))."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if not hasattr(value, "__iter__") or (isinstance(value, torch.Tensor) and value.ndim == 0):
        v = _as_int(value, name, value)
        return (v, v)
    items = list(value)
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (_as_int(items[0], name, value), _as_int(items[1], name, value))


# Largest tensor (or group of tensors) a model keeps per cache of derived constants, and so the
# largest kept per entry: bigger ones (windows of 32 and more at many heads) are recomputed.
CONSTANT_CACHE_BYTES = 16 * 2**20


_MISSING = object()


class BoundedCache:
    """Least-recently-used store for constants derived from the input size (masks, token
    orders, coordinate tables), at most ``entries`` values and ``max_bytes`` of tensor data.

    Any input size is allowed, so the keys are unbounded (a detector sees a new padded size
    almost every batch); without a bound the cache would grow for the life of the model. A
    value larger than ``max_bytes`` is built and returned without being kept.
    """

    def __init__(self, entries: int = 8, max_bytes: int = 64 * 2**20):
        self.entries, self.max_bytes = entries, max_bytes
        # a plain dict, in use order (re-inserted on every hit): torch.compile traces its
        # operations on every supported release, where OrderedDict.move_to_end is not
        self._items: dict = {}
        self._sizes: dict = {}

    def get(self, key: Hashable, build: Callable[[], object]):
        """The value kept for ``key``, or ``build()``'s, kept if it fits. While a graph is
        captured (torch.compile, torch.export, tracing) the cache is left alone: values built
        there are the tracer's placeholders, not tensors, and the graph computes its own."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return build()
        value = self.lookup(key, _MISSING)
        if value is _MISSING:
            # usable later by training, whoever fills it (inference_mode(False) alone would turn
            # gradients on)
            with torch.inference_mode(False), torch.no_grad():
                value = build()
            self.put(key, value)
        return value

    def lookup(self, key: Hashable, default=None):
        """The value kept for ``key`` (now the most recently used), or ``default``."""
        if key not in self._items:
            return default
        value = self._items.pop(key)
        self._items[key] = value
        return value

    def put(self, key: Hashable, value) -> None:
        """Keep ``value`` for ``key`` unless it is larger than the whole budget; drop the
        least recently used values until the bounds hold."""
        self._items.pop(key, None)
        self._sizes.pop(key, None)
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        self._items[key], self._sizes[key] = value, size
        while len(self._items) > self.entries or self.nbytes > self.max_bytes:
            old = next(iter(self._items))
            del self._items[old], self._sizes[old]

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items


def _same_values(saved: list[torch.Tensor], params: list[torch.Tensor]) -> bool:
    """Whether ``params`` hold exactly the values saved (same shapes, dtypes and devices)."""
    return len(saved) == len(params) and all(
        s.shape == p.shape and s.dtype == p.dtype and s.device == p.device and torch.equal(s, p.detach())
        for s, p in zip(saved, params))


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


# --------------------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------------------

# On the CPU the model's Linear layers run on oneDNN's inner product (the kernel that
# torch.compile's CPU backend uses after freezing) instead of F.linear's BLAS call.
# - Inference: one call, with the MLP's exact (erf) GELU applied in the GEMM's output pass,
#   saving a read and a write of the 4C-wide hidden activation. Measured 1.0-1.6x faster per
#   GEMM shape of SwinV2-T on a 2-core AVX2 CPU, 1.3-2.5x on a 2-core AVX-512 one.
# - Training: the op has no backward, so :class:`_OneDNNLinear` supplies one; the input's
#   gradient is another inner product and the weight's gradient takes oneDNN or BLAS by shape
#   (:func:`_weight_grad_on_onednn`). On the AVX-512 CPU the three products of SwinV2-T's
#   training step measured 1.2-2.8x (forward and input gradient) and 1.0-2.3x (weight
#   gradient where oneDNN is taken) faster than BLAS's.
# Same products, same values to float32 rounding (the tests compare against F.linear and
# float64). Set False to always use F.linear.
ONEDNN_LINEAR = True
_onednn_dtypes: dict = {}  # dtype -> whether oneDNN's inner product runs (and agrees) here


def _onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's inner product works for ``dtype`` on this CPU, probed once: it needs
    AVX-512 BF16 or AMX for bfloat16, for example, and raises without them."""
    if dtype not in _onednn_dtypes:
        ok = False
        try:  # whatever the caller's context: autocast would change the reference's dtype
            gen = torch.Generator().manual_seed(0)  # (on the CPU whatever the default device)
            with torch.autocast("cpu", enabled=False), torch.no_grad():
                x = torch.randn(5, 7, generator=gen, device="cpu").to(dtype)
                w = torch.randn(3, 7, generator=gen, device="cpu").to(dtype)
                b = torch.randn(3, generator=gen, device="cpu").to(dtype)
                got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "").double()
                want = F.linear(x.double(), w.double(), b.double())
            ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))
        except (RuntimeError, AttributeError, NotImplementedError):
            ok = False
        _onednn_dtypes[dtype] = ok
    return _onednn_dtypes[dtype]


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype to run oneDNN's inner product in for this call, or None for F.linear.

    Plain CPU tensors (no subclasses such as DTensor), with oneDNN enabled; not while
    exporting or tracing (which must see F.linear), nor in a compiled graph that needs
    gradients (inductor differentiates F.linear itself). In a compiled inference graph the
    product is the custom operator ``swinv2::linear``. Under CPU autocast the call runs in
    the autocast dtype, as F.linear would.
    """
    if not ONEDNN_LINEAR or x.device.type != "cpu" or weight.device.type != "cpu":
        return None
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter):
        return None
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return None  # F.linear says what is wrong; oneDNN's error names no shapes
    mode = native.recording()
    if mode == "export" or (mode == "compile" and torch.is_grad_enabled()):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    elif x.dtype == weight.dtype:
        dtype = x.dtype
    else:
        return None
    ready = _onednn_ready_in_graph(dtype) if mode == "compile" else _onednn_ready(dtype)
    return dtype if ready else None


def _onednn_ready(dtype: torch.dtype) -> bool:
    """The process-wide conditions of :func:`_onednn_applies`: oneDNN built and enabled,
    no distributed process group, and the inner product working for ``dtype`` here."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Distributed processes (DDP, FSDP, ZeRO) keep F.linear: one 2-process FSDP run on a
        # heavily loaded machine aborted with heap corruption while this path was on (not
        # reproduced in reruns); until that is understood they stay on the common kernel.
        return False
    return dtype in (torch.float32, torch.bfloat16, torch.float16) and _onednn_runs(dtype)


_onednn_ready_in_graph = native.graph_constant(_onednn_ready)


def _inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False):
    if torch.compiler.is_compiling():
        # inductor lowers oneDNN's op only for weights frozen into the graph: call it opaquely
        return torch.ops.swinv2.linear(x, weight, bias, gelu)
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op(
    "swinv2::linear", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? bias, bool gelu) -> Tensor"
)
def _linear_op(x, weight, bias, gelu):
    """oneDNN's inner product (then the exact GELU when ``gelu``) as an operator of compiled
    inference graphs. Takes whatever layouts the graph hands over."""
    _check_linear(x, weight, bias)
    return _inner_product(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), gelu)


@_linear_op.register_fake
def _(x, weight, bias, gelu):
    _check_linear(x, weight, bias)
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


def _check_linear(x, weight, bias) -> None:
    """ValueError naming the shapes and dtypes, where oneDNN's own error names none."""
    if (weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.dtype != weight.dtype
            or (bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype))):
        described = "no bias" if bias is None else f"bias {bias.dtype} {tuple(bias.shape)}"
        raise ValueError(f"swinv2::linear: input {x.dtype} {tuple(x.shape)}, weight {weight.dtype} "
                         f"{tuple(weight.shape)} and {described} do not fit (input (..., K), weight (N, K), "
                         "bias (N,), one dtype)")


# The weight gradient g^T x of an (M, K) -> (M, N) layer sums over the M tokens. oneDNN's
# inner product computes it faster than BLAS where both K and N are at least this wide, and
# BLAS is faster (up to 3.5x) where either is narrower (stage 0 of the T/S/B sizes, C = 96 or
# 128): 2-core AVX-512 CPU, SwinV2-T at batch 8 and 32.
ONEDNN_WEIGHT_GRAD_MIN_WIDTH = 192


def _weight_grad_on_onednn(K: int, N: int) -> bool:
    return min(K, N) >= ONEDNN_WEIGHT_GRAD_MIN_WIDTH


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad.T @ x`` for grad (M, N) and x (M, K): the (N, K) weight gradient."""
    N, K = grad.shape[1], x.shape[1]
    if not _weight_grad_on_onednn(K, N):
        return grad.t().mm(x)
    if N <= K:  # (N, M) x (K, M)^T: the wider operand is the kernel's weight
        return _inner_product(grad.t(), x.t(), None)
    return _inner_product(x.t(), grad.t(), None).t().contiguous()  # (K, N), transposed


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` on a 2-D input, with all three products on oneDNN's inner product where it
    is faster (see ``ONEDNN_LINEAR``). Saves what F.linear's backward saves: the input and
    the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _inner_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _inner_product(grad, weight.t().contiguous(), None)  # (M, N) x (N, K)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(grad, x)
        if ctx.needs_input_grad[2]:  # (False for a missing bias)
            db = grad.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gelu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, followed by the exact GELU when ``gelu``; on the CPU
    through oneDNN's inner product (see ``ONEDNN_LINEAR``), with the GELU fused in when no
    gradient is needed."""
    dtype = _onednn_applies(x, weight)
    if dtype is None:
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if not torch.is_grad_enabled():
        return _inner_product(x, weight, bias, gelu)
    if x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad):
        if x.dim() == 2:  # the Function's own output, not a view of it (see _CosineQK)
            y = _OneDNNLinear.apply(x, weight, bias)
        else:
            y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    else:
        y = _inner_product(x, weight, bias)
    return F.gelu(y) if gelu else y


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def unhooked(*modules: nn.Module) -> bool:
    """Nothing watches or replaces these modules' calls: no forward, forward-pre, backward or
    backward-pre hook on them nor a global one, and no ``forward`` patched onto the instance
    (as offloading and profiling wrappers do). Only then may a faster computation of the
    same values skip ``module.__call__`` or run the batch in parts; otherwise every hook must
    fire once, with the whole batch, as on the plain model."""
    if any(getattr(_module_hooks, name, None) for name in _GLOBAL_HOOKS):
        return False
    return not any(getattr(m, name, None) for m in modules for name in _MODULE_HOOKS) and not any(
        "forward" in m.__dict__ for m in modules)


def apply_linear(module: nn.Module, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """``module(x)`` (then the exact GELU when ``gelu``) for a model's Linear layer, through
    :func:`linear` when the module is a plain ``nn.Linear`` without hooks; anything else (a
    subclass, a wrapped or quantised layer, a hooked one) is called as it is."""
    if type(module) is nn.Linear and unhooked(module):
        return linear(x, module.weight, module.bias, gelu)
    y = module(x)
    return F.gelu(y) if gelu else y


# --------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window: Size2) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, wh*ww, C); windows ordered batch, window row, window column."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C)  # (B, nWh, wh, nWw, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)  # (B*nW, N, C)


def window_reverse(windows: torch.Tensor, window: Size2, H: int, W: int) -> torch.Tensor:
    """(B*nW, wh*ww, C) -> (B, H, W, C): the inverse of :func:`window_partition`."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C)  # (B, nWh, nWw, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)  # (B, H, W, C)


def shifted_window_order(resolution: Size2, window: Size2, shift: Size2) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order of the cyclically shifted windows of a ``(Hp, Wp)`` map, as two int64
    permutations of ``Hp*Wp``: ``order[i]`` is the row-major position in the map of token ``i``
    of ``window_partition(roll(x, -shift), window)``, and ``inverse`` undoes it.

    One gather with ``order`` (:func:`gather_tokens`) then replaces the roll and the partition,
    which are two full copies of the map (and ``torch.roll`` over two dims is slower than a
    copy); the values moved are the same, so the result is identical.
    """
    Hp, Wp = resolution
    pos = torch.arange(Hp * Wp).view(1, Hp, Wp, 1)
    pos = torch.roll(pos, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    order = window_partition(pos, window).reshape(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order, inverse


class _GatherTokens(torch.autograd.Function):
    """``x.index_select(1, order)`` whose backward is the inverse gather (a permutation's
    gradient is the inverse permutation), instead of index_select's scatter-add."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def gather_tokens(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, L, C) with tokens in ``order``; ``inverse`` is its inverse permutation."""
    # (TorchScript tracing cannot record a Python autograd Function; it needs no backward.)
    if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
        return _GatherTokens.apply(x, order, inverse)
    return x.index_select(1, order)


def effective_window(
    resolution: Size2, window: Size2, rule: str = "per_axis"
) -> tuple[Size2, Size2]:
    """The window and shift a stage uses on a map of ``resolution``.

    Where a map is not larger than the window, the stage uses one global window over that
    axis and does not shift it (note the ``<=``: equal sizes do not shift either).

    ``rule="per_axis"`` decides each axis on its own. ``rule="official"`` reproduces the
    official code, which compares ``min(H, W)`` with the window and then uses that square
    window on both axes; the two agree on every square map.
    """
    (H, W), (wh, ww) = resolution, window
    if rule == "official":
        if min(H, W) <= min(wh, ww):
            side = min(H, W)
            return (side, side), (0, 0)
        return (wh, ww), (wh // 2, ww // 2)
    if rule != "per_axis":
        raise ValueError(f"window rule must be 'per_axis' or 'official', got {rule!r}")
    win_h, shift_h = (H, 0) if H <= wh else (wh, wh // 2)
    win_w, shift_w = (W, 0) if W <= ww else (ww, ww // 2)
    return (win_h, win_w), (shift_h, shift_w)


def attention_mask(
    resolution: Size2, window: Size2, shift: Size2, device=None
) -> torch.Tensor | None:
    """Additive mask ``(nW, N, N)`` for a map of ``resolution`` padded to whole windows and
    cyclically shifted by ``shift``; None when neither padding nor shift needs one.

    Token pairs from different shift regions get -100 (the official value); padded keys get
    -inf, so real tokens never attend to padding. Padding goes at the bottom and right and
    is applied before the cyclic shift.
    """
    (H, W), (wh, ww), (sh, sw) = resolution, window, shift
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    padded = (Hp, Wp) != (H, W)
    if not padded and sh == 0 and sw == 0:
        return None
    # Per-token facts are built on the CPU (a map's worth); the (nW, N, N) mask, N times
    # larger, is built where it is used, never copied there.
    N = wh * ww
    mask = torch.zeros((Hp * Wp // N, N, N), dtype=torch.float32, device=device)
    if sh or sw:
        # Label the (up to) 3x3 regions that the cyclic shift brings together.
        labels = torch.zeros((1, Hp, Wp, 1), dtype=torch.int64)
        h_cuts = [0, Hp - wh, Hp - sh, Hp] if sh else [0, Hp]
        w_cuts = [0, Wp - ww, Wp - sw, Wp] if sw else [0, Wp]
        region = 0
        for h0, h1 in zip(h_cuts[:-1], h_cuts[1:]):
            for w0, w1 in zip(w_cuts[:-1], w_cuts[1:]):
                labels[:, h0:h1, w0:w1, :] = region
                region += 1
        lab = window_partition(labels, window).squeeze(-1).to(device)  # (nW, N)
        mask.masked_fill_(lab[:, None, :] != lab[:, :, None], SHIFT_MASK_VALUE)
    if padded:
        is_pad = torch.zeros((1, Hp, Wp, 1), dtype=torch.bool)
        is_pad[:, H:, :, :] = True
        is_pad[:, :, W:, :] = True
        is_pad = torch.roll(is_pad, shifts=(-sh, -sw), dims=(1, 2))
        pad_keys = window_partition(is_pad, window).squeeze(-1).to(device)  # (nW, N)
        mask.masked_fill_(pad_keys[:, None, :], PAD_MASK_VALUE)
    return mask


# --------------------------------------------------------------------------------------
# Relative positions
# --------------------------------------------------------------------------------------


def relative_position_index(window: Size2) -> torch.Tensor:
    """(N, N) int64: row-major index into the (2wh-1, 2ww-1) table of relative offsets."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def relative_coords_table(
    window: Size2, pretrained_window: Size2 = (0, 0), spacing: str = "log"
) -> torch.Tensor:
    """(1, 2wh-1, 2ww-1, 2) float32 inputs of the continuous position bias MLP (paper §3.4).

    Offsets are divided by ``pretrained_window - 1`` (or by ``window - 1`` when no pretrained
    window is given), so that the pre-training window spans [-1, 1] whatever window is used
    now. ``spacing="log"`` then scales to [-8, 8] and applies sign(t)*log2(1+|t|)/log2(8),
    as the official code does; ``spacing="linear"`` keeps the [-1, 1] coordinates (the
    paper's linear-spaced ablation). Computed in float32 like the official buffer; an axis of
    size 1 has only the offset 0 and is left undivided instead of becoming NaN.
    """
    wh, ww = window
    ph, pw = pretrained_window
    dh = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    dw = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(dh, dw, indexing="ij")).permute(1, 2, 0)  # (2wh-1, 2ww-1, 2)
    table = table.contiguous().unsqueeze(0)
    div_h, div_w = (ph - 1, pw - 1) if ph > 0 else (wh - 1, ww - 1)
    if div_h > 0:
        table[..., 0] /= div_h
    if div_w > 0:
        table[..., 1] /= div_w
    if spacing == "log":
        table *= 8
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
    elif spacing != "linear":
        raise ValueError(f"spacing must be 'log' or 'linear', got {spacing!r}")
    return table


def resize_bias_table(table: torch.Tensor, old: Size2, new: Size2) -> torch.Tensor:
    """Bicubic resize of a V1 bias table ``((2oh-1)(2ow-1), nH)`` to window ``new``."""
    nH = table.shape[1]
    grid = table.T.reshape(1, nH, 2 * old[0] - 1, 2 * old[1] - 1)
    grid = F.interpolate(grid, size=(2 * new[0] - 1, 2 * new[1] - 1), mode="bicubic")
    return grid.reshape(nH, -1).T


# --------------------------------------------------------------------------------------
# Attention, MLP, embedding, merging
# --------------------------------------------------------------------------------------


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a relative position bias.

    ``attn_type="cosine"`` (V2, paper §3.3): cos(q, k) times a learned per-head scale,
    ``exp(min(logit_scale, ln 100))``, with no 1/sqrt(d). ``attn_type="dot"`` is V1's
    ``q.k / sqrt(d)``. Queries and values have biases, keys do not (as in the official code).

    ``position_bias``:
    ``log_cpb`` / ``linear_cpb`` (V2, paper §3.4): a 2-layer MLP (2 -> 512 -> nH, ReLU, no
    output bias) on the log- or linear-spaced coordinate table, squashed to 16*sigmoid, so
    any window size works; ``table`` (V1): a learned ``(2wh-1)(2ww-1) x nH`` table built for
    ``table_window`` and bicubically resized for other windows; ``none``.
    """

    # dtypes for which the fused path on a CPU, with gradients, uses plain matmuls with a
    # broadcast bias instead of scaled_dot_product_attention (measurements: _matmul_attention)
    cpu_matmul_dtypes = (torch.bfloat16, torch.float16)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: Size2 = (0, 0),
        attn_type: str = "cosine",
        position_bias: str = "log_cpb",
        table_window: Size2 = (7, 7),
        cpb_hidden_dim: int = 512,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")
        if position_bias not in POSITION_BIASES:
            raise ValueError(f"position_bias must be one of {POSITION_BIASES}, got {position_bias!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.attn_type = attn_type
        self.position_bias = position_bias
        self.pretrained_window_size = tuple(pretrained_window_size)
        # coordinate tables and index maps by window, device and dtype; the bias by window
        self._cache = BoundedCache(entries=8, max_bytes=CONSTANT_CACHE_BYTES)
        self._bias_cache = BoundedCache(entries=4, max_bytes=CONSTANT_CACHE_BYTES)

        if attn_type == "cosine":
            self.logit_scale = nn.Parameter(torch.empty(num_heads, 1, 1))
        if position_bias in ("log_cpb", "linear_cpb"):
            self.cpb_mlp = nn.Sequential(
                nn.Linear(2, cpb_hidden_dim, bias=True),
                # not in place (unlike the official code): a full backward hook on the Linear
                # before it would otherwise fail, and the hidden layer is small
                nn.ReLU(),
                nn.Linear(cpb_hidden_dim, num_heads, bias=False),
            )
        elif position_bias == "table":
            self.table_window = tuple(table_window)
            th, tw = self.table_window
            self.relative_position_bias_table = nn.Parameter(torch.empty((2 * th - 1) * (2 * tw - 1), num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.empty(dim))
            self.v_bias = nn.Parameter(torch.empty(dim))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # True: one fused scaled_dot_product_attention call; False: the explicit reference
        # computation (matmul, bias, mask, softmax, matmul) as in the official code.
        self.fused_attn = True
        # On the fused path in float32 or bfloat16 inference on an AVX-512 CPU: the native
        # kernel of swinv2.native instead of scaled_dot_product_attention (when available).
        self.native = True
        self.reset_parameters()
        # Sequential attention (paper §3.5): windows are attended in chunks of
        # ``chunk_windows`` (or as many as ``memory_budget_mb`` of scores allows), one after
        # the other, each recomputed in backward. Off by default; set by the model.
        self.sequential = False
        self.chunk_windows: int | None = None
        self.memory_budget_mb: float | None = None

    # -- relative position bias --------------------------------------------------------


    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initial values of this module's own parameters: logit scale ln 10, zero
        q/v biases, a truncated-normal V1 table (the Linear layers are the model's to init)."""
        if self.attn_type == "cosine":
            self.logit_scale.fill_(math.log(10.0))
        if self.q_bias is not None:
            self.q_bias.zero_()
            self.v_bias.zero_()
        if self.position_bias == "table":
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _cached(self, kind: str, window: Size2, device, dtype=None) -> torch.Tensor:
        return self._cache.get((kind, window, device, dtype), lambda: self._constant(kind, window, device, dtype))

    def _constant(self, kind: str, window: Size2, device, dtype) -> torch.Tensor:
        if kind == "index":
            return relative_position_index(window).to(device)
        spacing = "log" if self.position_bias == "log_cpb" else "linear"
        return relative_coords_table(window, self.pretrained_window_size, spacing).to(device=device, dtype=dtype)

    def bias_table(self, window: Size2) -> torch.Tensor:
        """Bias for every relative offset of ``window``: ``((2wh-1)*(2ww-1), nH)``."""
        window = tuple(window)
        if self.position_bias == "table":
            table = self.relative_position_bias_table
            if window != self.table_window:
                table = resize_bias_table(table, self.table_window, window)
            return table
        weight = self.cpb_mlp[0].weight
        coords = self._cached("coords", window, weight.device, weight.dtype)
        return self.cpb_mlp(coords).view(-1, self.num_heads)

    def relative_bias(self, window: Size2) -> torch.Tensor | None:
        """The additive bias ``(nH, N, N)`` for a window, or None without position bias.

        It depends on the weights only, so on the CPU while no gradient is needed
        (evaluation, inference) it is computed once and reused while the weights it comes
        from hold the same values: a copy of them is kept and compared on every call, so any
        change (an optimizer step, loading, ``p.data.mul_()``, ``p.data = ...``) is seen.
        Elsewhere the comparison would stall the device, so the bias is computed each call.
        Under autocast the MLP runs in the autocast dtype, as the official code's does, so
        the cached bias is kept per autocast dtype too. Hooks on the bias modules see every
        call (nothing is cached then).
        """
        if self.position_bias == "none":
            return None
        window = tuple(window)
        params = [p for n, p in self.named_parameters() if n.startswith(("cpb_mlp", "relative_position"))]
        if (torch.is_grad_enabled() or torch.compiler.is_compiling() or not params
                or params[0].device.type != "cpu" or not unhooked(*self._bias_modules())):
            return self._relative_bias(window)
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        key = (window, autocast)
        cached = self._bias_cache.lookup(key)
        if cached is not None and _same_values(cached[0], params):
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():  # usable later by training, whoever fills it
            bias = self._relative_bias(window)
            self._bias_cache.put(key, ([p.detach().clone() for p in params], bias))
        return bias

    def _bias_modules(self) -> list[nn.Module]:
        return list(self.cpb_mlp.modules()) if hasattr(self, "cpb_mlp") else []

    def _relative_bias(self, window: Size2) -> torch.Tensor:
        N = window[0] * window[1]
        table = self.bias_table(window)
        if self.position_bias != "table":
            # bounded to (0, 16) (paper §3.4); element-wise, so applied to the table's
            # (2wh-1)(2ww-1) rows before the gather rather than to the N^2 gathered ones
            table = 16 * torch.sigmoid(table)
        index = self._cached("index", window, table.device)
        return table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)  # (nH, N, N)

    # -- attention ---------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, window: Size2, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B*nW, N, C) windows of size ``window``; mask: (nW, N, N) additive, or None."""
        B_, N, C = x.shape
        nH = self.num_heads
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        x2d = x.reshape(B_ * N, C)
        if type(self.qkv) is nn.Linear and unhooked(self.qkv):
            # 2-D, so that qkv is the GEMM's own output rather than a view of it (see _CosineQK)
            qkv = linear(x2d, self.qkv.weight, bias)  # (B_*N, 3C)
        else:  # through the module, so that its hooks (or a wrapper's computation) see the call
            qkv = self.qkv(x2d)
            # a new tensor either way: q and k are scaled in place below, and a hook may hold
            # the module's output
            qkv = qkv.clone() if bias is None else qkv + bias
        split = lambda t: t.view(B_, N, 3, nH, C // nH).permute(2, 0, 3, 1, 4).unbind(0)  # noqa: E731
        q, k, v = split(qkv)  # (B_, nH, N, d) each
        # The native kernel normalises q and k as it reads them; otherwise they are scaled here.
        normalized = False
        if not self._takes_native(q, k, v):
            qkv, normalized = self._normalize_qk(qkv)
            q, k, v = split(qkv)

        rel = self.relative_bias(window)  # (nH, N, N) or None
        chunk = self.windows_per_chunk(B_, N, q.dtype)
        if chunk < B_:
            x = self._sequential(q, k, v, rel, mask, chunk, normalized)
        else:
            x = self._attend(q, k, v, rel, mask, normalized)
        x = x.transpose(1, 2).reshape(B_, N, C)  # (B_, N, C)
        return self.proj_drop(apply_linear(self.proj, x))

    def logit_scale_value(self) -> torch.Tensor:
        """The per-head factor of the cosine similarities: exp(logit_scale) clamped at 100."""
        return torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()

    def _normalize_qk(self, qkv: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """On the fused cosine path: scale q and k of ``qkv`` (B_*N, 3C, this call's own
        buffer) to unit length, q also by the clamped logit scale, in place, and return it with
        True. One norm over q and k together in their stored order and one multiply, measured
        1.4-2x faster than normalising the (B_, nH, N, d) views one by one. With gradients this
        goes through :class:`_CosineQK`, whose backward is a few passes instead of the chain of
        ``F.normalize`` and the scale. Without gradients any dtype takes this path (under
        autocast the norms and factors are computed in float32, see :func:`_scale_qk_`). With
        gradients, where the scale's dtype differs from qkv's (autocast), or under compile or
        tracing (which fuse the reference form themselves), returns ``qkv`` as it is with
        False, and :meth:`_fused` normalises instead."""
        if not (self.fused_attn and self.attn_type == "cosine"):
            return qkv, False
        scale = self.logit_scale_value()  # (nH, 1, 1)
        if not torch.is_grad_enabled():
            _scale_qk_(qkv, scale, self.num_heads)
            return qkv, True
        if scale.dtype != qkv.dtype and qkv.device.type == "cpu":
            # CPU autocast training keeps the reference form (its speed was measured so); on
            # accelerators q and k are scaled here too, in qkv's dtype with float32 factors,
            # rather than through F.normalize, which autocast runs in float32 (a float32 copy
            # of q and k, then another cast for the products)
            return qkv, False
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
            return qkv, False
        return _CosineQK.apply(qkv, scale, self.num_heads), True

    def _takes_native(self, q, k, v) -> bool:
        """Whether :meth:`_fused` hands these (B_, nH, N, d) inputs to the native kernel."""
        drop = self.attn_drop.p if self.training else 0.0
        return self.fused_attn and self.native and not drop and native.applies(q, k, v)

    def _attend(self, q, k, v, rel, mask, normalized: bool = False) -> torch.Tensor:
        if self.fused_attn:
            return self._fused(q, k, v, rel, mask, normalized)
        return self._reference(q, k, v, rel, mask)

    def windows_per_chunk(self, num_windows: int, N: int, dtype: torch.dtype) -> int:
        """How many of ``num_windows`` windows of ``N`` tokens one attention call takes."""
        if not self.sequential:
            return num_windows
        if self.chunk_windows:
            return max(1, int(self.chunk_windows))
        budget = DEFAULT_ATTENTION_BUDGET_MB if self.memory_budget_mb is None else self.memory_budget_mb
        per_window = SCORE_TENSORS * self.num_heads * N * N * torch.finfo(dtype).bits // 8
        return max(1, int(budget * 2**20 // per_window))

    def _sequential(self, q, k, v, rel, mask, chunk: int, normalized: bool = False) -> torch.Tensor:
        """The attention of :meth:`_attend`, ``chunk`` windows at a time. (B_, nH, N, d) each
        -> (B_, nH, N, d).

        Chunking alone bounds the scores alive in inference only: in training autograd would
        keep every chunk's probabilities for backward, as much as the batched call does. So
        with gradients each chunk is checkpointed (non-reentrant, RNG state preserved): it
        keeps only its inputs (views of q, k, v, which the batched call keeps too) and
        recomputes its scores in backward, one chunk at a time.
        """
        B_ = q.shape[0]
        outs = []
        for start in range(0, B_, chunk):
            end = min(start + chunk, B_)
            m = None if mask is None else _mask_rows(mask, start, end - start)  # (nW | end-start, N, N)
            args = (q[start:end], k[start:end], v[start:end], rel, m, normalized)
            if torch.is_grad_enabled():
                outs.append(checkpoint(self._attend, *args, use_reentrant=False))
            else:
                outs.append(self._attend(*args))
        return torch.cat(outs)  # (B_, nH, N, d)

    def _reference(self, q, k, v, rel, mask) -> torch.Tensor:
        """(B_, nH, N, d) each -> (B_, nH, N, d), step by step as the official code does."""
        B_, nH, N, _ = q.shape
        if self.attn_type == "cosine":
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # (B_, nH, N, N)
            attn = attn * self.logit_scale_value()
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B_, nH, N, N)
        if rel is not None:
            attn = attn + rel.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, nH, N, N) + mask[None, :, None].to(attn.dtype)
            attn = attn.view(B_, nH, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return attn @ v

    def _fused(self, q, k, v, rel, mask, normalized: bool = False) -> torch.Tensor:
        """The same attention in fewer, fused kernels: the cosine normalisation and the
        clamped logit scale (or 1/sqrt(d)) are folded into q and k (already done when
        ``normalized``; inside the kernel on the native path), and position bias plus mask
        become one additive term.
        (B_, nH, N, d) each -> (B_, nH, N, d)."""
        B_, nH, N, d = q.shape
        # Two matmuls with the bias added in place and broadcast over the images
        # (_matmul_attention): on a CPU in bf16/fp16 with gradients, where it measured fastest
        # (decided on the dtype q arrives in, the autocast dtype: a float32 logit scale would
        # promote it below, so the scale is cast to q's dtype instead; without gradients
        # scaled_dot_product_attention measured ~4% faster); and on accelerators wherever a
        # mask is added, since scaled_dot_product_attention takes one additive term per
        # (window, head) and the (nW, nH, N, N) bias would be copied for every image.
        matmul = (q.device.type == "cpu" and q.dtype in self.cpu_matmul_dtypes and torch.is_grad_enabled()) or (
            q.device.type != "cpu" and mask is not None)
        use_native = self._takes_native(q, k, v)
        cosine_scale = None  # the native kernel's: it normalises q and k itself
        if self.attn_type != "cosine":
            q = q * d**-0.5
        elif not normalized and use_native:
            cosine_scale = self.logit_scale_value()
        elif not normalized:  # autocast, compile, tracing, or the reference
            scale = self.logit_scale_value()
            q = F.normalize(q, dim=-1) * (scale.to(q.dtype) if matmul and q.device.type == "cpu" else scale)
            k = F.normalize(k, dim=-1)
        # the native kernel adds the bias in float32 whatever q's dtype
        bias_dtype = torch.float32 if use_native else q.dtype
        bias = None if rel is None else rel.unsqueeze(0).to(bias_dtype)  # (1, nH, N, N)
        if mask is not None:
            m = mask[:, None].to(bias_dtype)  # (nW, 1, N, N)
            bias = m if bias is None else bias + m  # (nW, nH | 1, N, N)
        drop = self.attn_drop.p if self.training else 0.0
        if use_native:
            if bias is not None:
                bias = bias.expand(bias.shape[0], nH, N, N)  # (nW | 1, nH, N, N)
            return native.window_attention(q, k, v, bias, cosine_scale, NORM_EPS)
        if matmul:
            return _matmul_attention(q, k, v, bias, drop, self.training)
        if bias is not None and mask is not None:
            # The fused kernel takes one additive term per (window, head): expand over the batch.
            bias = bias.expand(B_ // bias.shape[0], bias.shape[0], nH, N, N).reshape(B_, nH, N, N)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, scale=1.0)


def _qk_view(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The q and k of ``qkv`` (M, 3C) as an (M, 2, nH, d) view."""
    M, C3 = qkv.shape
    return qkv.view(M, 3, num_heads, C3 // (3 * num_heads))[:, :2]


def _scale_qk_(qkv: torch.Tensor, scale: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale q and k of ``qkv`` (M, 3C) in place to ``scale``/||q|| and 1/||k|| (norms
    floored at NORM_EPS, as F.normalize does); return their norms and the factors applied,
    both (M, 2, nH, 1). For bfloat16 or float16 ``qkv`` the norm is accumulated in float32
    and the factors computed in float32, then rounded to bfloat16 for the multiply (a
    mixed-dtype in-place multiply is 6x slower on a CPU); that is as close to float64 as
    F.normalize in bfloat16 (0.28% rms at SwinV2-T's stage 0). float16 keeps float32 factors:
    ``scale / ||x||`` of a short row (a zero query, or one of subnormals) exceeds its range.

    The norms and the multiply run over all of qkv's rows, v's included (v's factor is
    exactly 1, so v is unchanged bit for bit): qkv is then one contiguous run of d-long rows,
    where the q/k view skips every third block of C. On 2 cores that measured 1.5-2x faster
    from SwinV2-T's stage 1 on, though it touches 1.5x the data."""
    M, C3 = qkv.shape
    rows = qkv.view(M, 3, num_heads, C3 // (3 * num_heads))
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)[:, :2]  # v's norms dropped
    factor_dtype = torch.float32 if qkv.dtype == torch.float16 else qkv.dtype
    factors = torch.empty(rows.shape[:-1] + (1,), dtype=factor_dtype, device=qkv.device)  # (M, 3, nH, 1)
    factors[:, 2] = 1.0
    if norm.dtype in (torch.bfloat16, torch.float16):
        norm = norm.float()
    factor = norm.clamp_min(NORM_EPS).reciprocal_()
    factor[:, 0].mul_(scale.view(-1, 1))  # q's rows: scale / ||q||
    factors[:, :2] = factor  # 1/d of qkv's size
    rows.mul_(factors)
    return norm, factor


class _CosineQK(torch.autograd.Function):
    """:func:`_scale_qk_` with a hand-written backward, for training.

    For a row ``y = c x / max(||x||, eps)`` (``c`` the head's scale for q, 1 for k) the
    gradient is ``dx = f (g - y <g, y> / c^2)`` with ``f = c / ||x||``, and just ``f g`` where
    the floor is active; ``dc`` sums ``<g, y> / c`` over q's rows. That is one reduction and
    two element-wise passes over q and k, where autograd through ``F.normalize`` and the
    scale takes about ten; v's gradient passes through. q and k are scaled inside qkv (the
    Linear's output, which its backward does not need), so no second copy is kept: the
    attention kernel's q and k are views of the tensor saved here.
    """

    @staticmethod
    def forward(ctx, qkv, scale, num_heads):
        norm, factor = _scale_qk_(qkv, scale, num_heads)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(qkv, norm, factor, scale)
        ctx.num_heads = num_heads
        return qkv

    @staticmethod
    def backward(ctx, grad):
        y, norm, factor, scale = ctx.saved_tensors
        nH = ctx.num_heads
        g = grad.reshape(y.shape)
        y_qk, g_qk = _qk_view(y, nH), _qk_view(g, nH)
        # <g, y> per row, (M, 2, nH, 1), accumulated in float32 whatever qkv's dtype: the scale's
        # gradient sums it over every token, which float16 could not hold
        dot = torch.sum(g_qk * y_qk, dim=-1, keepdim=True, dtype=torch.promote_types(y.dtype, torch.float32))
        inv_c2 = torch.ones(2, nH, 1, dtype=dot.dtype, device=y.device)
        inv_c2[0] = scale.view(nH, 1).to(dot.dtype).square().reciprocal()
        coef = (dot * inv_c2).masked_fill_(norm < NORM_EPS, 0.0)
        out = torch.empty_like(y)
        out_qk = _qk_view(out, nH)
        torch.addcmul(g_qk, y_qk, coef, value=-1.0, out=out_qk)
        out_qk.mul_(factor)
        M, C3 = y.shape
        out.view(M, 3, -1)[:, 2].copy_(g.reshape(M, 3, -1)[:, 2])
        dscale = None
        if ctx.needs_input_grad[1]:
            dscale = (dot[:, 0].sum(0) / scale.view(nH, 1).to(dot.dtype)).view_as(scale).to(scale.dtype)
        return out, dscale, None


def _matmul_attention(q, k, v, bias, drop: float, training: bool) -> torch.Tensor:
    """softmax(q kᵀ + bias) v with two matmuls; q, k, v (B_, nH, N, d), bias (nW | 1, nH | 1, N, N)
    added in place and broadcast over the images, never expanded to (B_, nH, N, N).

    Used on CPUs in bf16/fp16 with gradients (training), where it measured fastest: 2 cores,
    torch 2.14, forward+backward of one SwinV2-T block per stage, 80 ms against 82 ms for the
    reference path and 135 ms for scaled_dot_product_attention (which the bf16 training step
    used before); the whole SwinV2-T step got 1.16-1.25x faster. Without gradients
    scaled_dot_product_attention stays (4% faster over a whole forward). In backward it keeps
    one score-sized tensor, the probabilities.
    """
    B_, nH, N, _ = q.shape
    attn = q @ k.transpose(-2, -1)  # (B_, nH, N, N)
    if bias is not None:
        nb = bias.shape[0]
        # In place: the matmul's backward does not need its output, so autograd allows it.
        attn = attn.view(B_ // nb, nb, nH, N, N).add_(bias.to(attn.dtype)).view(B_, nH, N, N)
    device = attn.device.type
    if device != "cpu" and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        # Autocast would run the softmax in float32: a float32 copy of the scores, kept for
        # backward. Its kernels accumulate in float32 anyway, and the probabilities are
        # rounded to the scores' dtype for the product with v either way.
        with torch.autocast(device, enabled=False):
            attn = attn.softmax(dim=-1)
    else:
        attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, drop, training)
    return attn @ v  # (B_, nH, N, d)


def _mask_rows(mask: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """The mask rows of windows ``start .. start+count`` of a batch: (nW, N, N) -> (nW | count, N, N).

    Windows are ordered image by image, so window ``i`` uses mask row ``i % nW``. A chunk of
    whole images keeps the mask as it is; otherwise its rows are gathered (count x N x N, a
    fraction 1/nH of the chunk's scores).
    """
    nW = mask.shape[0]
    if start % nW == 0 and count % nW == 0:
        return mask
    first = start % nW
    if first + count <= nW:
        return mask[first : first + count]
    return mask[torch.arange(start, start + count, device=mask.device) % nW]


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.act) is nn.GELU and self.act.approximate == "none" and unhooked(self.act):
            h = apply_linear(self.fc1, x, gelu=True)
        else:
            h = self.act(apply_linear(self.fc1, x))
        return self.drop(apply_linear(self.fc2, self.drop(h)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    @property
    def active(self) -> bool:
        return self.p > 0.0 and self.training

    def draw(self, batch: int, ndim: int, device) -> torch.Tensor:
        """The 0/1 keep mask one call on a ``batch``-sized, ``ndim``-D input would draw,
        ``(batch, 1, ...)`` in float32, for :meth:`forward`'s ``keep``. It consumes the
        generator exactly as that call does (the draws do not depend on the dtype)."""
        return torch.empty((batch,) + (1,) * (ndim - 1), device=device).bernoulli_(1.0 - self.p)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep``: rows of a mask from :meth:`draw` for this batch, to apply instead of a
        fresh draw (a batch run in chunks then drops what the whole batch at once would)."""
        if not self.active:
            return x
        prob = 1.0 - self.p
        if keep is None:
            keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(prob)
        else:
            keep = keep.to(dtype=x.dtype, copy=True)
        return x * keep.div_(prob)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches: conv with stride = kernel = patch, then LayerNorm.

    (B, C_in, H, W) -> (B, H/p, W/p, C).
    """

    def __init__(self, patch_size: Size2, in_chans: int, embed_dim: int, norm: bool = True,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, C)
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation, bias-free 4C -> 2C linear, then LayerNorm (V2 order).

    Concatenation order follows the official code: (even row, even col), (odd, even),
    (even, odd), (odd, odd). An odd-sized map is zero-padded at the bottom/right first.
    (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C).
    """

    def __init__(self, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # (B, H/2, 2[row], W/2, 2[col], C) -> (B, H/2, W/2, 2[col], 2[row], C) so that the
        # flattened 4C reads x0 (0,0), x1 (1,0), x2 (0,1), x3 (1,1).
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5)
        x = x.reshape(B, H // 2, W // 2, 4 * C)  # (B, H/2, W/2, 4C)
        return self.norm(apply_linear(self.reduction, x))
