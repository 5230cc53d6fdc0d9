"""Window attention in fewer passes over memory: the same attention as
:class:`swinv2.layers.WindowAttention`, the same values up to float rounding.

- q, k and v come from one GEMM with the q/v biases in its output pass (oneDNN on the CPU).
- The cosine normalisation of q and k and the logit scale are applied in place inside that
  GEMM's output, one norm over q and k together and one multiply (:func:`scale_qk_`); in
  training through :class:`CosineQK`, whose backward is a few passes instead of the chain of
  F.normalize and the scale. In reduced precision the norms and factors are float32.
- Two matmuls with the bias added in place and broadcast over the images
  (:func:`matmul_attention`) where that is faster (bf16/fp16 training on a CPU) or where
  scaled_dot_product_attention would copy the (nW, nH, N, N) shifted-window bias for every image
  (accelerators); scaled_dot_product_attention elsewhere.
- The native kernel (:mod:`swinv2.fast.native`, opt-in) for CPU inference with 32-wide heads.
- In inference on the CPU the position bias is computed once and reused while the weights it
  comes from hold the same values (a copy of them is compared on every call, so any change is
  seen: an optimizer step, loading, ``p.data.mul_()``, ``p.data = ...``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..cache import CONSTANT_CACHE_BYTES, BoundedCache
from ..layers import NORM_EPS, WindowAttention
from ..windows import Size2, mask_rows
from . import native
from .capture import recording
from .hooks import unhooked
from .onednn import OneDNNLinear, linear

# dtypes for which the fused path on a CPU, with gradients, uses plain matmuls with a broadcast
# bias instead of scaled_dot_product_attention (faster there, see benchmarks/)
CPU_MATMUL_DTYPES = (torch.bfloat16, torch.float16)


class FastWindowAttention(WindowAttention):
    """:class:`~swinv2.layers.WindowAttention` with the passes above; ``use_native`` and
    ``cache_bias`` are set by :func:`swinv2.fast.apply`. The explicit (``fused_attn=False``)
    path and exports run the plain computation."""

    use_native = False
    cache_bias = True

    def forward(self, x: torch.Tensor, window: Size2, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fused_attn or recording() == "export":
            return super().forward(x, window, mask)
        B_, N, C = x.shape
        nH = self.num_heads
        qkv = self._qkv(x.reshape(B_ * N, C))  # (B_*N, 3C), this call's own buffer
        split = lambda t: t.view(B_, N, 3, nH, C // nH).permute(2, 0, 3, 1, 4).unbind(0)  # noqa: E731
        q, k, v = split(qkv)  # (B_, nH, N, d) each
        normalized = False  # the native kernel normalises q and k as it reads them
        if not self._takes_native(q, k, v):
            qkv, normalized = self._normalize_qk(qkv)
            q, k, v = split(qkv)
        rel = self.relative_bias(window)  # (nH, N, N) or None
        chunk = self.windows_per_chunk(B_, N, q.dtype)
        if chunk < B_:  # sequential attention (§3.5)
            outs = []
            for start in range(0, B_, chunk):
                end = min(start + chunk, B_)
                args = (q[start:end], k[start:end], v[start:end], rel,
                        None if mask is None else mask_rows(mask, start, end - start), normalized)
                outs.append(checkpoint(self._fast_attend, *args, use_reentrant=False)
                            if torch.is_grad_enabled() else self._fast_attend(*args))
            x = torch.cat(outs)
        else:
            x = self._fast_attend(q, k, v, rel, mask, normalized)
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(M, C) -> (M, 3C): the q/v biases added in the GEMM when nothing watches ``qkv``
        (on oneDNN where the Linear layers are, else F.linear)."""
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        if type(self.qkv) is OneDNNLinear and unhooked(self.qkv):
            return linear(x, self.qkv.weight, bias)
        if type(self.qkv) is torch.nn.Linear and unhooked(self.qkv):
            return F.linear(x, self.qkv.weight, bias)
        qkv = self.qkv(x)  # through the module: its hooks (or a wrapper) see the call
        # a new tensor either way: q and k are scaled in place, and a hook may hold the output
        return qkv.clone() if bias is None else qkv + bias.to(qkv.dtype)

    def _takes_native(self, q, k, v) -> bool:
        drop = self.attn_drop.p if self.training else 0.0
        return self.use_native and not drop and native.applies(q, k, v)

    def _normalize_qk(self, qkv: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Scale q and k of ``qkv`` in place (cosine attention) and say so; otherwise, or under
        compile and tracing (which fuse the plain form themselves), return it as it is."""
        if self.attn_type != "cosine":
            return qkv, False
        scale = self.logit_scale_value()  # (nH, 1, 1)
        if not torch.is_grad_enabled():
            scale_qk_(qkv, scale, self.num_heads)
            return qkv, True
        if scale.dtype != qkv.dtype and qkv.device.type == "cpu":
            return qkv, False  # CPU autocast training keeps the plain form, which is faster there
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return qkv, False
        return CosineQK.apply(qkv, scale, self.num_heads), True

    def _fast_attend(self, q, k, v, rel, mask, normalized: bool) -> torch.Tensor:
        """softmax(q kᵀ + bias + mask) v. (B_, nH, N, d) each -> (B_, nH, N, d)."""
        B_, nH, N, d = q.shape
        cpu = q.device.type == "cpu"
        matmul = (cpu and q.dtype in CPU_MATMUL_DTYPES and torch.is_grad_enabled()) or (not cpu and mask is not None)
        use_native = self._takes_native(q, k, v)
        cosine_scale = None  # the native kernel's: it normalises q and k itself
        if self.attn_type != "cosine":
            q = q * d**-0.5
        elif not normalized and use_native:
            cosine_scale = self.logit_scale_value()
        elif not normalized:  # autocast training on a CPU, compile, tracing
            scale = self.logit_scale_value()
            q, k = F.normalize(q, dim=-1) * (scale.to(q.dtype) if matmul and cpu else scale), F.normalize(k, dim=-1)
        bias_dtype = torch.float32 if use_native else q.dtype  # the kernel adds the bias in float32
        bias = None if rel is None else rel.unsqueeze(0).to(bias_dtype)  # (1, nH, N, N)
        if mask is not None:
            m = mask[:, None].to(bias_dtype)  # (nW, 1, N, N)
            bias = m if bias is None else bias + m  # (nW, nH | 1, N, N)
        drop = self.attn_drop.p if self.training else 0.0
        if use_native:
            bias = None if bias is None else bias.expand(bias.shape[0], nH, N, N)
            return native.window_attention(q, k, v, bias, cosine_scale, NORM_EPS)
        if matmul:
            return matmul_attention(q, k, v, bias, drop, self.training)
        if bias is not None and mask is not None:  # one additive term per (window, head)
            bias = bias.expand(B_ // bias.shape[0], bias.shape[0], nH, N, N).reshape(B_, nH, N, N)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, scale=1.0)

    def relative_bias(self, window: Size2) -> torch.Tensor | None:
        """As the plain module's; in CPU inference computed once while the weights stay (a copy
        of them is compared on every call; off the CPU the comparison would stall the device),
        kept per autocast dtype (the MLP runs in it, as in the official code). Hooks on the bias
        modules see every call, and a captured graph computes the bias from its weights (nothing
        is reused then)."""
        params = [p for p in (self.relative_position_bias_table,) if p is not None]
        params += [] if self.cpb_mlp is None else list(self.cpb_mlp.parameters())
        watched = [] if self.cpb_mlp is None else list(self.cpb_mlp.modules())
        if (not self.cache_bias or torch.is_grad_enabled() or recording() is not None or not params
                or params[0].device.type != "cpu" or not unhooked(*watched)):
            return super().relative_bias(window)
        cache = self.__dict__.setdefault("_bias_cache", BoundedCache(entries=4, max_bytes=CONSTANT_CACHE_BYTES))
        key = (tuple(window), torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        kept = cache.lookup(key)
        if kept is not None and _same_values(kept[0], params):
            return kept[1]
        with torch.inference_mode(False), torch.no_grad():  # usable later by training, whoever fills it
            bias = super().relative_bias(window)
            cache.put(key, ([p.detach().clone() for p in params], bias))
        return bias


def _same_values(saved: list[torch.Tensor], params: list[torch.Tensor]) -> bool:
    """Whether ``params`` hold exactly the values saved (same shapes, dtypes and devices)."""
    return len(saved) == len(params) and all(
        s.shape == p.shape and s.dtype == p.dtype and s.device == p.device and torch.equal(s, p.detach())
        for s, p in zip(saved, params))


def _qk_view(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The q and k of ``qkv`` (M, 3C) as an (M, 2, nH, d) view."""
    M, C3 = qkv.shape
    return qkv.view(M, 3, num_heads, C3 // (3 * num_heads))[:, :2]


def scale_qk_(qkv: torch.Tensor, scale: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale q and k of ``qkv`` (M, 3C) in place to ``scale``/||q|| and 1/||k|| (norms floored
    at NORM_EPS, as F.normalize does); return their norms and the factors applied, both
    (M, 2, nH, 1). The norms and the multiply run over all of qkv's rows, v's included (its
    factor is exactly 1): one contiguous run of d-long rows, faster than the strided q/k view.

    For bfloat16 or float16 ``qkv`` the norms are accumulated and the factors computed in
    float32, then rounded to bfloat16 for the multiply (a mixed-dtype in-place multiply is much
    slower on a CPU; as close to float64 as F.normalize in bfloat16). float16 keeps float32
    factors: ``scale / ||x||`` of a short row (a zero query, or subnormals) exceeds its range."""
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
    factors[:, :2] = factor
    rows.mul_(factors)
    return norm, factor


class CosineQK(torch.autograd.Function):
    """:func:`scale_qk_` with a hand-written backward, for training.

    For a row ``y = c x / max(||x||, eps)`` (``c`` the head's scale for q, 1 for k) the gradient
    is ``dx = f (g - y <g, y> / c^2)`` with ``f = c / ||x||``, and just ``f g`` where the floor is
    active; ``dc`` sums ``<g, y> / c`` over q's rows. q and k are scaled inside qkv (the GEMM's
    output, which its backward does not need), so no second copy is kept.
    """

    @staticmethod
    def forward(ctx, qkv, scale, num_heads):
        norm, factor = scale_qk_(qkv, scale, num_heads)
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
        # <g, y> per row (M, 2, nH, 1), accumulated in float32 whatever qkv's dtype: the scale's
        # gradient sums it over every token, which float16 could not hold
        dot = torch.sum(g_qk * y_qk, dim=-1, keepdim=True, dtype=torch.promote_types(y.dtype, torch.float32))
        inv_c2 = torch.ones(2, nH, 1, dtype=dot.dtype, device=y.device)
        inv_c2[0] = scale.view(nH, 1).to(dot.dtype).square().reciprocal()
        coef = (dot * inv_c2).masked_fill_(norm < NORM_EPS, 0.0)
        out = torch.empty_like(y)
        out_qk = _qk_view(out, nH)
        torch.addcmul(g_qk, y_qk, coef, value=-1.0, out=out_qk)
        out_qk.mul_(factor)
        M = y.shape[0]
        out.view(M, 3, -1)[:, 2].copy_(g.reshape(M, 3, -1)[:, 2])
        dscale = None
        if ctx.needs_input_grad[1]:
            dscale = (dot[:, 0].sum(0) / scale.view(nH, 1).to(dot.dtype)).view_as(scale).to(scale.dtype)
        return out, dscale, None


def matmul_attention(q, k, v, bias, drop: float, training: bool) -> torch.Tensor:
    """softmax(q kᵀ + bias) v with two matmuls; q, k, v (B_, nH, N, d), bias (nW | 1, nH | 1, N, N)
    added in place and broadcast over the images, never expanded to (B_, nH, N, N). In backward
    it keeps one score-sized tensor, the probabilities."""
    B_, nH, N, _ = q.shape
    attn = q @ k.transpose(-2, -1)  # (B_, nH, N, N)
    if bias is not None:
        nb = bias.shape[0]
        # in place: the matmul's backward does not need its output, so autograd allows it
        attn = attn.view(B_ // nb, nb, nH, N, N).add_(bias.to(attn.dtype)).view(B_, nH, N, N)
    device = attn.device.type
    if device != "cpu" and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        # Autocast would run the softmax in float32: a float32 copy of the scores, kept for
        # backward. Its kernels accumulate in float32 anyway, and the probabilities are rounded
        # to the scores' dtype for the product with v either way.
        with torch.autocast(device, enabled=False):
            attn = attn.softmax(dim=-1)
    else:
        attn = attn.softmax(dim=-1)
    return F.dropout(attn, drop, training) @ v  # (B_, nH, N, d)
