"""Linear layers on oneDNN's inner product on the CPU (the kernel torch.compile's CPU backend
uses after freezing) instead of F.linear's BLAS call: the same products, the same values to
float32 rounding, faster on the GEMM shapes of SwinV2 (``benchmarks/``).

- Inference: one call, with the MLP's exact (erf) GELU applied in the GEMM's output pass, saving
  a read and a write of the 4C-wide hidden activation (:class:`FusedGeluMlp`).
- Training: the op has no backward, so :class:`_OneDNNLinear` supplies one; the input's gradient
  is another inner product and the weight's gradient takes oneDNN or BLAS by shape.

:class:`OneDNNLinear` is an ``nn.Linear`` whose ``forward`` does this; :func:`swinv2.fast.apply`
swaps it in for a model's Linear layers, so hooks, quantisation and wrappers still see Linear
modules called as usual. Anything the kernel does not take (GPU or subclassed tensors such as
FSDP's DTensor, mixed dtypes, exports) goes through F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Mlp
from .capture import graph_constant, recording
from .hooks import unhooked

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_probed: dict = {}  # dtype -> whether oneDNN's inner product runs (and agrees) here
# The weight gradient g^T x of an (M, K) -> (M, N) layer sums over the M tokens: oneDNN computes
# it faster than BLAS where both K and N are at least this wide, BLAS where either is narrower.
WEIGHT_GRAD_MIN_WIDTH = 192


def runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's inner product works for ``dtype`` on this CPU, probed once (bfloat16
    needs AVX-512 BF16 or AMX, for example, and raises without them)."""
    if dtype not in _probed:
        ok = False
        try:  # whatever the caller's context: autocast would change the reference's dtype
            gen = torch.Generator().manual_seed(0)
            with torch.autocast("cpu", enabled=False), torch.no_grad():
                x, w, b = (torch.randn(*shape, generator=gen, device="cpu").to(dtype)
                           for shape in ((5, 7), (3, 7), (3,)))
                got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "").double()
                want = F.linear(x.double(), w.double(), b.double())
            ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))
        except Exception:  # a build without the op, a CPU without the dtype: F.linear then
            ok = False
        _probed[dtype] = ok
    return _probed[dtype]


def ready(dtype: torch.dtype) -> bool:
    """The process-wide conditions: oneDNN built and enabled, the inner product working for
    ``dtype`` here."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return dtype in _DTYPES and runs(dtype)


_ready_in_graph = graph_constant(ready)


def applies(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype to run oneDNN's inner product in for this call, or None for F.linear: plain CPU
    tensors of one dtype (or CPU autocast, whose dtype is used, as F.linear would), not while
    exporting or tracing (which must see F.linear) nor in a compiled graph that needs gradients
    (inductor differentiates F.linear itself). In a compiled inference graph the product is the
    custom operator ``swinv2::linear``."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return None
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter):
        return None
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return None  # F.linear says what is wrong; oneDNN's error names no shapes
    mode = recording()
    if mode == "export" or (mode == "compile" and torch.is_grad_enabled()):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    elif x.dtype == weight.dtype:
        dtype = x.dtype
    else:
        return None
    return dtype if (_ready_in_graph(dtype) if mode == "compile" else ready(dtype)) else None


def inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False):
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
    _check(x, weight, bias)
    return inner_product(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), gelu)


@_linear_op.register_fake
def _(x, weight, bias, gelu):
    _check(x, weight, bias)
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


def _check(x, weight, bias) -> None:
    """ValueError naming the shapes and dtypes, where oneDNN's own error names none."""
    if (weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.dtype != weight.dtype
            or (bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype))):
        described = "no bias" if bias is None else f"bias {bias.dtype} {tuple(bias.shape)}"
        raise ValueError(f"swinv2::linear: input {x.dtype} {tuple(x.shape)}, weight {weight.dtype} "
                         f"{tuple(weight.shape)} and {described} do not fit (input (..., K), weight (N, K), "
                         "bias (N,), one dtype)")


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad.T @ x`` for grad (M, N) and x (M, K): the (N, K) weight gradient."""
    N, K = grad.shape[1], x.shape[1]
    if min(K, N) < WEIGHT_GRAD_MIN_WIDTH:
        return grad.t().mm(x)
    if N <= K:  # (N, M) x (K, M)^T: the wider operand is the kernel's weight
        return inner_product(grad.t(), x.t(), None)
    return inner_product(x.t(), grad.t(), None).t().contiguous()  # (K, N), transposed


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` on a 2-D input, with all three products on oneDNN's inner product where it
    is faster. Saves what F.linear's backward saves: the input and the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return inner_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = inner_product(grad, weight.t().contiguous(), None)  # (M, N) x (N, K)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(grad, x)
        if ctx.needs_input_grad[2]:  # (False for a missing bias)
            db = grad.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gelu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then the exact GELU when ``gelu``; through oneDNN's inner
    product where :func:`applies`, with the GELU fused in when no gradient is needed."""
    dtype = applies(x, weight)
    if dtype is None:
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if not torch.is_grad_enabled():
        return inner_product(x, weight, bias, gelu)
    if x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad):
        if x.dim() == 2:  # the Function's own output, not a view of it (the cosine scaling works in place)
            y = _OneDNNLinear.apply(x, weight, bias)
        else:
            y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    else:
        y = inner_product(x, weight, bias)
    return F.gelu(y) if gelu else y


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` computed by :func:`linear` (same parameters, same values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class FusedGeluMlp(Mlp):
    """:class:`~swinv2.layers.Mlp` whose first layer and exact GELU are one oneDNN call, where
    nothing watches them (their hooks would otherwise miss the pre-GELU output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (isinstance(self.fc1, OneDNNLinear) and type(self.act) is nn.GELU and self.act.approximate == "none"
                and unhooked(self.fc1, self.act)):
            h = linear(x, self.fc1.weight, self.fc1.bias, gelu=True)
        else:
            h = self.act(self.fc1(x))
        return self.drop(self.fc2(self.drop(h)))
