"""Shared test utilities."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a random value, so that every path of the network matters.

    Norm weights ~ 1 +- 0.2 and biases ~ N(0, 0.1); each ``logit_scale`` ~ ln 10 +- 1.5 with
    its first head set past the ln 100 clamp; everything else ~ N(0, 0.05) (larger for the
    position-bias MLP input layer so the bias varies across offsets). Fresh SwinV2 models have
    zeroed residual-branch norms, which would make every block an identity.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            leaf = name.rsplit(".", 1)[-1]
            parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            if leaf == "logit_scale" or name.endswith("logit_scale"):
                v = math.log(10) + 1.5 * r.clamp(-1, 1)
                v.view(-1)[0] = math.log(100) + 0.7
            elif "norm" in parent and leaf == "weight":
                v = 1 + 0.2 * r
            elif "norm" in parent and leaf == "bias":
                v = 0.1 * r
            elif "cpb_mlp.0" in name:
                v = 0.5 * r
            else:
                v = 0.05 * r
            p.copy_(v.to(p.dtype))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# The official reference outputs ship with the tests (tests/fixtures/official, see its README);
# SWINV2_FIXTURES points elsewhere, e.g. at a newer set of cases.
FIXTURES = Path(os.environ.get("SWINV2_FIXTURES", Path(__file__).resolve().parent / "fixtures" / "official"))


def official_fixture(name: str):
    """(json config, official state dict, the ``__name__`` extra tensors) of a fixture case.

    A missing fixture is an error: the files are part of the repository."""
    import pytest
    from safetensors.torch import load_file

    if not (FIXTURES / f"{name}.safetensors").exists():
        pytest.fail(f"fixture {name} not found under {FIXTURES} (set SWINV2_FIXTURES)")
    config = json.loads((FIXTURES / f"{name}.json").read_text())
    tensors = load_file(FIXTURES / f"{name}.safetensors")
    extras = {k: tensors.pop(k) for k in list(tensors) if k.startswith("__")}
    return config, tensors, extras


def poison_loss_after(monkeypatch, calls: int) -> None:
    """Make the training criterion return NaN from its ``calls + 1``-th call on."""
    from swinv2.data import mixup as sampling

    real = sampling.train_criterion

    def poisoned(mixup, smoothing):
        loss_fn, seen = real(mixup, smoothing), []

        def fn(logits, targets):
            seen.append(1)
            loss = loss_fn(logits, targets)
            return loss * float("nan") if len(seen) > calls else loss

        return fn

    monkeypatch.setattr(sampling, "train_criterion", poisoned)


def native_kernel_here() -> bool:
    """Whether swinv2's opt-in native attention kernel can be had on this machine. Asks for it
    (so it is built into the cache once, as for a user who turned it on), then puts the switch
    back as it was."""
    from swinv2.fast import native

    switch = dict(native._switch)
    native.enable(True)
    try:
        return native.available()
    finally:
        native._switch.clear()
        native._switch.update(switch)


def assert_compiles_whole(model: nn.Module) -> None:
    """torch.compile(fullgraph=True) fails on any graph break; the eager backend checks capture
    only. A padded size exercises padding, shift and mask code; training (with gradients) must be
    captured whole too."""
    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 36, 52)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    model.train()
    compiled(x).sum().backward()
    assert model.layers[0].blocks[0].attn.cpb_mlp[0].weight.grad is not None
    torch._dynamo.reset()


def export_holding_only_pytorch_operators(model: nn.Module, x: torch.Tensor, grad: bool):
    """``torch.export`` of ``model`` on ``x``, checked to hold PyTorch's operators only (none of
    swinv2's, none of oneDNN's): exported graphs run elsewhere, where the speedups do not exist."""
    with torch.set_grad_enabled(grad):
        program = torch.export.export(model, (x,))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("aten" in op for op in ops)
    assert not any("swinv2" in op or "mkldnn" in op for op in ops), sorted(ops)
    return program
