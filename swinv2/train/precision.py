"""Which mixed precision a run gets when it asks for ``--amp auto``.

bf16 autocast pays off only where the hardware multiplies bf16 natively: CUDA GPUs that support
it, and CPUs with AVX-512 BF16 or AMX tiles. Elsewhere PyTorch falls back to a generic bf16
matrix multiply, far slower than its float32 one, so ``auto`` trains in float32 there.
"""

from __future__ import annotations

import torch


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_amp(mode: str, device: torch.device | str) -> str:
    """The concrete mode (``bf16``, ``fp16`` or ``none``) for a requested one (those or ``auto``)."""
    if mode != "auto":
        return mode
    return "bf16" if native_bf16(device) else "none"


def describe_amp(mode: str, device: torch.device | str) -> str:
    """One line for the run log: what was asked, what is used, and why for ``auto``."""
    used = resolve_amp(mode, device)
    if mode != "auto":
        return f"amp {used}"
    why = "native bf16 on this device" if used == "bf16" else "no native bf16 on this device, so float32"
    return f"amp auto -> {used} ({why})"
