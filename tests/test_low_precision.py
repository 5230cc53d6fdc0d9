"""The fast model's in-place cosine normalisation of q and k (swinv2.fast.attention.CosineQK) in
reduced precision with a float32 logit scale (the case of autocast on accelerators), checked on
the CPU against float64 autograd through F.normalize, as the plain model computes it."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from swinv2.fast.attention import CosineQK

NH, D = 3, 32


def _reference(qkv: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    M = qkv.shape[0]
    q, k, v = qkv.view(M, 3, NH, D).unbind(1)
    q = F.normalize(q, dim=-1) * scale.view(NH, 1)
    k = F.normalize(k, dim=-1)
    return torch.stack((q, k, v), 1).view(M, 3 * NH * D)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_cosine_qk_in_low_precision_with_a_float32_scale(dtype, tol):
    g = torch.Generator().manual_seed(0)
    M = 4096
    qkv64 = torch.randn(M, 3 * NH * D, generator=g, dtype=torch.float64)
    qkv64[7, :D] = 0  # a zero query: the norm floor
    scale64 = (torch.rand(NH, 1, 1, generator=g, dtype=torch.float64) * 90 + 10).requires_grad_()
    # gradients large enough that their sum over the tokens would overflow float16
    grad64 = 30 * torch.randn(M, 3 * NH * D, generator=g, dtype=torch.float64)

    x64 = qkv64.clone().requires_grad_()
    ref = _reference(x64, scale64)
    ref.backward(grad64)

    x = qkv64.to(dtype).requires_grad_()
    scale = scale64.detach().float().requires_grad_()
    out = CosineQK.apply(x.clone(), scale, NH)
    out.backward(grad64.to(dtype))
    assert out.dtype == dtype and x.grad.dtype == dtype and scale.grad.dtype == torch.float32
    assert rel_err(out, ref) < tol
    # the zero query's gradient is scale * g / eps (~1e15): beyond float16, as F.normalize's is
    rows = torch.arange(M) != 7
    assert rel_err(x.grad[rows], x64.grad[rows]) < tol
    assert x.grad[7, :D].abs().min() >= min(torch.finfo(dtype).max, x64.grad[7, :D].abs().min())
    assert torch.isfinite(scale.grad).all() and rel_err(scale.grad, scale64.grad) < tol
