"""ONNX, TorchScript or ``torch.export`` files, verified in the same call (``swinv2 export``).

Every export is loaded back from the file it wrote and run against the eager model: at the
export shape, at another batch size when the batch is dynamic, and at another image size when a
dynamic size is asked for. The model derives its windows, shifts, padding and masks from the
input shape at forward time, with Python logic on the sizes; tracers bake such logic into the
graph for the traced size, so a file can load fine and still be wrong at another size. Only the
comparison tells, which is why it is not optional.

Dynamic image size: ``torch.export`` (and the ONNX exporter built on it) refuses it today, because
the stages key their mask caches on the feature-map size (a symbolic size cannot be a dict key)
and choose a global window or a shifted one by comparing the size with the window; TorchScript
tracing specialises silently. When a dynamic size is asked for, the attempt is made, checked at
a second size, and reported as not supported when it fails (the file is then exported at the
fixed size).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import fileio

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # the exporter's graph builders and the checking runtime
DEFAULT_OPSET = 18  # the dynamo-based ONNX exporter's minimum
TORCHSCRIPT_ONNX_OPSET = 17  # the TorchScript-based ONNX exporter's default
# ||exported - eager|| / ||eager|| allowed: float32 round-off of a reordered computation is
# ~1e-5 here (eager float32 itself is 1e-5 from float64); bf16/fp16 carry 3-4 significant digits.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 5e-3}


class ExportVerificationError(ValueError):
    """The exported file does not reproduce the eager model (its ``report`` says where)."""

    def __init__(self, message: str, report: ExportReport):
        super().__init__(message)
        self.report = report


@dataclass
class Check:
    """One comparison of the exported file with the eager model."""

    batch: int
    size: tuple[int, int]
    max_abs: float = float("nan")  # max |exported - eager|
    rel: float = float("nan")  # ||exported - eager|| / ||eager||
    error: str | None = None  # the exported file failed to run at this shape

    def passed(self, tolerance: float) -> bool:
        return self.error is None and self.rel <= tolerance

    def label(self) -> str:
        return f"batch {self.batch}, {self.size[0]}x{self.size[1]}"


@dataclass
class ExportReport:
    path: Path
    format: str
    exporter: str  # which tool wrote the file (e.g. the ONNX exporter used after a fallback)
    dynamic_batch: bool
    dynamic_size: bool  # True only when verified at a second image size
    tolerance: float
    opset: int | None = None
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.passed(self.tolerance) for c in self.checks)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=float("nan"))

    @property
    def max_rel(self) -> float:
        return max((c.rel for c in self.checks), default=float("nan"))

    def lines(self) -> list[str]:
        size = self.path.stat().st_size / 2**20 if self.path.exists() else 0.0
        opset = f", opset {self.opset}" if self.opset else ""
        out = [
            f"wrote {self.path} ({self.format} by {self.exporter}{opset}, {size:.1f} MiB) in {self.seconds:.1f} s",
            f"dynamic batch: {'yes' if self.dynamic_batch else 'no'}; "
            f"dynamic size: {'yes' if self.dynamic_size else 'no'}",
            f"  {'check against eager':<26} {'max abs err':>12} {'rel err':>10}",
        ]
        for c in self.checks:
            verdict = "ok" if c.passed(self.tolerance) else "FAILED"
            if c.error:
                out.append(f"  {c.label():<26} {'-':>12} {'-':>10}  FAILED: {c.error}")
            else:
                out.append(f"  {c.label():<26} {c.max_abs:>12.2e} {c.rel:>10.2e}  {verdict}")
        out.append(f"  tolerance: rel err <= {self.tolerance:.0e} (||exported - eager|| / ||eager||)")
        out.extend(f"note: {n}" for n in self.notes)
        return out


# -- writers and loaders -----------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    """The root cause in one line: exporters wrap it in several layers of advice."""
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _dims(model, example: torch.Tensor, dynamic_batch: bool, dynamic_size: bool):
    """``torch.export`` dynamic shapes for the one positional input, or None."""
    Dim = torch.export.Dim
    spec = {}
    if dynamic_batch:
        spec[0] = Dim("batch", min=1, max=4096)
    if dynamic_size:
        # Sizes stay multiples of the network's total stride, the least that every stage needs.
        stride = model.patch_size[0] * 2 ** (model.num_layers - 1), model.patch_size[1] * 2 ** (model.num_layers - 1)
        for axis, s, name in ((2, stride[0], "h"), (3, stride[1], "w")):
            spec[axis] = s * Dim(f"{name}_blocks", min=1, max=max(64, 4 * example.shape[axis] // s))
    return (spec,) if spec else None


@contextlib.contextmanager
def _reference_attention(model):
    """Run the explicit (unfused) attention while exporting, then restore each module's choice."""
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield
    finally:
        for m, value in saved:
            m.fused_attn = value


def _quiet():
    """The exporters print progress to stdout and warn about every traced size; the
    comparison afterwards is what decides whether the file is right."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _write_onnx(model, example, path, dynamic_batch, dynamic_size, opset, notes):
    """The dynamo-based exporter on the reference (unfused) attention, then on the fused one,
    last the TorchScript-based exporter. The reference path comes first because torch's ONNX
    decomposition of the fused ``scaled_dot_product_attention`` can fail on this model (a view of
    its non-contiguous output), and ONNX Runtime runs the attention as plain ops either way: the
    two paths are the same math (the explicit product and softmax, or the fused call)."""
    attempts = [
        ("torch.onnx dynamo exporter (reference attention path)", True, True),
        ("torch.onnx dynamo exporter (fused attention)", True, False),
        ("torch.onnx TorchScript-based exporter", False, False),
    ]
    for i, (name, dynamo, reference) in enumerate(attempts):
        version = opset or (DEFAULT_OPSET if dynamo else TORCHSCRIPT_ONNX_OPSET)
        kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=version)
        if dynamo:
            kwargs.update(dynamo=True, dynamic_shapes=_dims(model, example, dynamic_batch, dynamic_size),
                          external_data=False, verbose=False)
        else:
            axes = ({0: "batch"} if dynamic_batch else {}) | ({2: "height", 3: "width"} if dynamic_size else {})
            kwargs.update(dynamo=False, dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"} if dynamic_batch
                                                      else {}} if axes else None)
        try:
            with _quiet(), (_reference_attention(model) if reference else contextlib.nullcontext()):
                torch.onnx.export(model, (example,), os.fspath(path), **kwargs)
            return name, version
        except Exception as err:  # noqa: BLE001 - the next exporter is tried; the reason is reported
            written = _write_failure(err)
            if written is not None:  # the file could not be written: no other exporter would fare better
                raise written from err
            notes.append(f"{name} failed ({_first_line(err)})" + ("; trying the next" if i < 2 else ""))
    raise ValueError("no ONNX exporter could convert the model: " + "; ".join(notes))


def _write_failure(err: BaseException) -> OSError | None:
    """The OSError with an errno (read-only file system, disk full, ...) behind an exporter's
    failure, if that is what it was."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _load_onnx(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # constant-folding chatter about CastLike nodes is not news
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: x.detach().cpu().numpy()})[0])

    return run


def _write_torchscript(model, example, path, dynamic_batch, dynamic_size, opset, notes):
    with _quiet():
        # Traced with autograd on, so that the position-bias MLP is recorded as ops on the
        # parameters rather than as the cached bias that inference mode reuses (a constant).
        traced = torch.jit.trace(model, (example,), check_trace=False)
    traced.save(os.fspath(path))
    return "torch.jit.trace", None


def _load_torchscript(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but still the format asked for
        module = torch.jit.load(os.fspath(path), map_location="cpu")
    return lambda x: module(x)


def _write_exported_program(model, example, path, dynamic_batch, dynamic_size, opset, notes):
    with _quiet():
        program = torch.export.export(model, (example,), dynamic_shapes=_dims(model, example, dynamic_batch,
                                                                               dynamic_size))
    torch.export.save(program, os.fspath(path))
    return "torch.export", None


def _load_exported_program(path):
    module = torch.export.load(os.fspath(path)).module()
    return lambda x: module(x)


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "exported-program": _write_exported_program}
# The verification runs what these return; tests replace one to prove that a bad file fails.
_LOADERS = {"onnx": _load_onnx, "torchscript": _load_torchscript, "exported-program": _load_exported_program}


def _compare(run, model, batch: int, size: tuple[int, int], seed: int) -> Check:
    """Run the exported file and the eager model on the same random batch."""
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    x = torch.randn(batch, model.in_chans, *size, generator=gen).to(device=param.device, dtype=param.dtype)
    check = Check(batch, size)
    with torch.no_grad():
        ref = model(x).double().cpu()
    try:
        with torch.no_grad(), _quiet():
            out = run(x.cpu() if param.device.type != "cpu" else x)
        out = torch.as_tensor(out).double().cpu()
        if out.shape != ref.shape:
            raise ValueError(f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    except Exception as err:  # noqa: BLE001 - recorded in the check, which then fails
        check.error = _first_line(err)
        return check
    check.max_abs = float((out - ref).abs().max())
    check.rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    if not torch.isfinite(out).all():
        check.rel = float("inf")
    return check


def second_size(model, size: tuple[int, int]) -> tuple[int, int]:
    """Another valid input size for checking a dynamic-size export: one more window of the
    last stage on each side (so every stage's map grows)."""
    total = [p * 2 ** (model.num_layers - 1) for p in model.patch_size]
    return tuple(s + t * w for s, t, w in zip(size, total, model.window_size))


def export(
    model: torch.nn.Module,
    path: str | os.PathLike,
    fmt: str,
    *,
    example: torch.Tensor | None = None,
    dynamic_batch: bool = True,
    dynamic_size: bool = False,
    opset: int | None = None,
    tolerance: float | None = None,
    strict: bool = True,
) -> ExportReport:
    """Export ``model`` to ``path`` as ``fmt`` (``onnx``, ``torchscript``, ``exported-program``)
    and verify the file against the eager model.

    ``example``: the input to trace with (default: 2 random images at ``model.img_size``).
    ``dynamic_batch``: any batch size; checked at a second batch size. ``dynamic_size``: asked
    for, checked at :func:`second_size`, and reported as not supported (with the reason, the
    file being exported at the fixed size) when the exporter refuses or the file specialises.
    ``tolerance``: the largest ``||exported - eager|| / ||eager||`` allowed (default by dtype).
    ``strict``: raise :class:`ExportVerificationError` (``path`` left as it was) when a check fails;
    otherwise return the report with ``ok`` False and the file written.

    The file is written and checked under a temporary name beside ``path`` and renamed onto it at
    the end, so ``path`` never holds a partial or unchecked file. A file that cannot be written
    raises :class:`~swinv2.fileio.WriteError` (it is not reported as a failure of the exporters).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    missing = [m for m in ONNX_MODULES if fmt == "onnx" and importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"ONNX export needs {', '.join(missing)} (pip install 'swinv2[export]')",
                                  name=missing[0])
    path = Path(path)
    with fileio.atomic_path(path) as tmp:
        report = _export(model, path, tmp, fmt, example, dynamic_batch, dynamic_size, opset, tolerance)
        if strict and not report.ok:
            failed = [c for c in report.checks if not c.passed(report.tolerance)]
            detail = "; ".join(f"{c.label()}: " + (c.error or f"rel err {c.rel:.2e}, max abs {c.max_abs:.2e}")
                               for c in failed)
            raise ExportVerificationError(
                f"the {fmt} export ({report.exporter}) does not reproduce the model within rel err "
                f"{report.tolerance:.0e} ({detail}); nothing was written to {path}", report)
    return report


def _export(model, path: Path, tmp: Path, fmt: str, example, dynamic_batch: bool, dynamic_size: bool, opset,
            tolerance) -> ExportReport:
    """:func:`export`'s work: write ``tmp``, load it back, compare; the report names ``path``."""
    param = next(model.parameters())
    if example is None:
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(2, model.in_chans, *model.img_size, generator=gen)
    example = example.to(device=param.device, dtype=param.dtype)
    if dynamic_batch and example.shape[0] == 1:
        # torch.export treats a size-1 dimension as the constant 1; trace with two images instead.
        example = torch.cat([example, example.flip(-1)])
    tolerance = TOLERANCE.get(param.dtype, 1e-4) if tolerance is None else tolerance
    was_training = model.training
    model.eval()
    batch, size = int(example.shape[0]), (int(example.shape[2]), int(example.shape[3]))
    with torch.no_grad():
        model(example)  # a clear ValueError for a bad size; fills the size caches outside tracing
    writer, loader = _WRITERS[fmt], _LOADERS[fmt]
    notes: list[str] = []
    start = time.perf_counter()
    try:
        dyn_size_ok = False
        size_check = None
        if dynamic_size:
            other = second_size(model, size)
            try:
                exporter, used_opset = writer(model, example, tmp, dynamic_batch, True, opset, notes)
                size_check = _compare(loader(tmp), model, batch, other, seed=3)
                dyn_size_ok = size_check.passed(tolerance)
                why = size_check.error or f"rel err {size_check.rel:.1e} at {other[0]}x{other[1]}"
            except Exception as err:  # noqa: BLE001 - reported, and the fixed-size export follows
                if _write_failure(err) is not None:
                    raise
                why = _first_line(err)
            if not dyn_size_ok:
                notes.append(f"dynamic size: not supported for this export format ({why}); exported at "
                             f"{size[0]}x{size[1]} only")
        if not dyn_size_ok:
            exporter, used_opset = writer(model, example, tmp, dynamic_batch, False, opset, notes)
        run = loader(tmp)
        checks = [_compare(run, model, batch, size, seed=1)]
        if dynamic_batch:
            checks.append(_compare(run, model, batch + 3, size, seed=2))
        if dyn_size_ok:
            checks.append(size_check)
    finally:
        model.train(was_training)
    notes = list(dict.fromkeys(notes))  # the dynamic-size attempt and the fixed one may fail alike
    return ExportReport(path, fmt, exporter, dynamic_batch, dyn_size_ok, tolerance, used_opset, checks, notes,
                        time.perf_counter() - start)


__all__ = ["FORMATS", "Check", "ExportReport", "ExportVerificationError", "export", "second_size"]
