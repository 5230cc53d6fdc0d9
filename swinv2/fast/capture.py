"""Whether the current call is being captured into a graph, and how: the speedups that call
CPU kernels outside PyTorch's operators (oneDNN's inner product, the native attention) must not
end up in an exported program, and inside torch.compile they run as custom operators."""

from __future__ import annotations

import torch


def recording() -> str | None:
    """None when the call simply runs; ``"compile"`` while ``torch.compile`` traces it (a graph
    that runs in this process, where swinv2's CPU kernels are custom operators like any other);
    ``"export"`` while ``torch.export``, an ONNX export or TorchScript records it (a graph for
    elsewhere: PyTorch's own operators only)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return "export"
    if torch.compiler.is_exporting():  # torch >= 2.7, the package's floor
        return "export"
    if torch.compiler.is_compiling():
        return "compile"
    return None


def graph_constant(fn):
    """``fn`` for torch.compile to call once while tracing and keep the answer as a constant of
    the graph (``torch.compiler.assume_constant_result``) instead of tracing into it: for the
    process-wide facts behind the CPU kernels (built? does oneDNN run this dtype?), whose code
    (a compiler run, a probe) a graph cannot hold."""
    return torch.compiler.assume_constant_result(fn)
