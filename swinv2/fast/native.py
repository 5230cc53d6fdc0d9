"""A native window-attention kernel for AVX-512 CPUs (inference, float32 and bfloat16); opt-in.

PyTorch's CPU attention kernel and its batched matmuls run SwinV2's small per-(window, head)
products far below the machine's GEMM rate: each pays call overheads, and on AMD CPUs the BLAS
they call takes a narrower code path. ``kernels/window_attention.c`` does the whole
softmax(q kᵀ + bias) v of a (window, head) in registers and a few cache lines (``benchmarks/``).
bfloat16 q, k and v (autocast inference) are widened as they are read and computed in
float32, so only the output is rounded to bfloat16.

It compiles C code inside the user's process, so it runs only when asked:
``swinv2.fast.apply(model, native=True)``, :func:`enable`, or ``SWINV2_NATIVE=1``. Then it is
compiled on first use with the system's C compiler (``$CC``, else ``cc``/``gcc``) into a
per-user cache (``$SWINV2_CACHE_DIR``, else ``~/.cache/swinv2``), saying once that it does and
where; a cache folder that other users can write is refused (a library placed there would run
in this process). It is written atomically, so that concurrent processes never load a
half-written library, loaded with :mod:`ctypes`, and checked against
``F.scaled_dot_product_attention`` on random inputs before first use. Nothing here is
required: without an x86-64 CPU with AVX-512 (F and DQ) or a compiler, :func:`available` is
False, a warning says so once, and the model uses PyTorch's kernels; :func:`status` says why.
Whatever goes wrong while building, loading or checking it (a broken compiler, a damaged cached
library, a failed self-test) turns it off for the rest of the process, with the reason, and is
not tried again on every call; :func:`rebuild` tries again.

Every call into the library goes through the same input checks (:func:`_check_raw`): the C
code trusts the shapes, dtypes and strides it is given, so a tensor it would misread is
refused in Python before any pointer is handed over.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .capture import graph_constant, recording

HEAD_DIM = 32  # the kernel's head width (every SwinV2 size uses 32)
NORM_EPS = 1e-12  # the floor of the q and k norms in cosine attention (F.normalize's default)
_SOURCE = Path(__file__).with_name("kernels") / "window_attention.c"
_FLAGS = ["-O3", "-std=gnu11", "-mavx512f", "-mavx512dq", "-mfma", "-fPIC", "-shared", "-fopenmp"]
_CPU_FLAGS = ("avx512f", "avx512dq", "fma")

_lock = threading.Lock()
_state: dict = {}  # "fn": the ctypes function or None, "why": reason when None, "path": library
_switch: dict = {}  # "on": set by enable(); without it, SWINV2_NATIVE decides
OFF_NOTE = ("opt-in: it compiles C code on this machine; swinv2.fast.apply(model, native=True) or "
            "SWINV2_NATIVE=1 turns it on")


def enabled() -> bool:
    """Whether the kernel was asked for: :func:`enable`, else ``SWINV2_NATIVE=1``."""
    if "on" in _switch:
        return _switch["on"]
    return os.environ.get("SWINV2_NATIVE", "").strip().lower() in ("1", "true", "on", "yes")


def enable(on: bool = True) -> None:
    """Ask for the kernel (it is compiled on first use) or stop using it, for this process."""
    _switch["on"] = bool(on)


def _cpu_supported() -> str | None:
    """None when this CPU runs the kernel, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU features unknown (no /proc/cpuinfo)"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    missing = [f for f in _CPU_FLAGS if f not in flags]
    return f"CPU lacks {', '.join(missing)}" if missing else None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    root = os.environ.get("SWINV2_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "swinv2")
    return Path(root) / "kernels"


def _private_folder(folder: Path) -> None:
    """Create ``folder`` for this user alone, or check that nobody else can write it or the
    folder above it: a library in a folder others can write could be replaced and would then
    run in this process. RuntimeError naming the folder otherwise."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in (folder, folder.parent):
        info = path.stat()
        sticky_shared = info.st_mode & stat.S_ISVTX and path != folder  # /tmp-like: others cannot replace ours
        if info.st_uid != os.getuid() and not sticky_shared:
            raise RuntimeError(f"the kernel cache {path} belongs to another user: set SWINV2_CACHE_DIR to a "
                               "folder of your own")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_shared:
            raise RuntimeError(f"the kernel cache {path} is writable by other users: make it private "
                               f"(chmod go-w {path}) or set SWINV2_CACHE_DIR to a folder of your own")


def _build(cc: str, force: bool = False) -> Path:
    """Compile the kernel into the cache (once per source, flags and compiler, or again when
    ``force``) and return it."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *_FLAGS]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"window_attention-{key}.so"
    _private_folder(out.parent)
    if out.exists() and not force:
        info = out.stat()
        if info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return out
    print(f"swinv2: compiling the native attention kernel with {cc} into {out.parent} (once per machine)",
          file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"{Path(cc).name} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        os.replace(tmp, out)  # atomic: another process sees the old state or the whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(path: Path):
    fn = ctypes.CDLL(str(path)).window_attention
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_float, ctypes.c_int] + [ctypes.c_int64] * 4
                   + [ctypes.POINTER(ctypes.c_int64), ctypes.c_int])
    return fn


# The kernel's element types, and the largest error its self-test allows for each: float32
# computes like PyTorch's float32 kernels; bfloat16 inputs are exact in float32, and the
# output's rounding to bfloat16 costs at most 2^-9 of each value.
DTYPES = {torch.float32: 1e-5, torch.bfloat16: 4e-3}


def _self_test(fn) -> str | None:
    """None when the kernel matches scaled_dot_product_attention in float64 on random inputs,
    as given and as cosine attention, in float32 and in bfloat16. Every tensor has its dtype
    and device spelled out: the first call may come under ``torch.set_default_dtype`` or a
    default device, and the kernel reads its bias and scales as float32 CPU memory."""
    g = torch.Generator(device="cpu").manual_seed(0)
    f32 = dict(generator=g, dtype=torch.float32, device="cpu")
    for dtype, tol in DTYPES.items():
        for B, H, N, nb, cosine in ((6, 3, 64, 3, False), (4, 2, 49, 1, False), (2, 2, 81, 2, False),
                                    (6, 3, 64, 3, True), (2, 2, 81, 1, True)):
            qkv = torch.randn(B, N, 3, H, HEAD_DIM, **f32).to(dtype)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            bias = torch.randn(nb, H, N, N, **f32) * 4
            scale = torch.rand(H, **f32) * 99 + 1 if cosine else None
            q64, k64 = q.double(), k.double()
            if cosine:
                q64 = F.normalize(q64, dim=-1) * scale.double().view(H, 1, 1)
                k64 = F.normalize(k64, dim=-1)
            want = F.scaled_dot_product_attention(
                q64, k64, v.double(), scale=1.0, attn_mask=bias.double().repeat(B // nb, 1, 1, 1),
            )
            got = _call(fn, q, k, v, bias, scale)
            if got is None:
                return "the kernel failed on its self-test"
            if got.dtype != dtype:
                return f"the kernel returned {got.dtype} for {dtype} inputs"
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            if not err < tol:
                return f"the kernel's self-test error was {err:.1e} in {str(dtype).split('.')[-1]}"
    return None


def _call(fn, q, k, v, bias, scale=None, eps: float = NORM_EPS) -> torch.Tensor | None:
    """The kernel on (B, H, N, 32) inputs: the (B, H, N, 32) output (a transposed view), or
    None when it failed."""
    out = _call_raw(fn, q, k, v, bias, scale, eps)
    return None if out is None else out.transpose(1, 2)


def _call_raw(fn, q, k, v, bias, scale=None, eps: float = NORM_EPS) -> torch.Tensor | None:
    """:func:`_call`'s output as the kernel writes it, a contiguous (B, N, H, 32) CPU tensor.
    The only place the library is called: the inputs are checked first (ValueError)."""
    _check_raw(q, k, v, bias, scale)
    B, H, N, _ = q.shape
    out = torch.empty(B, N, H, HEAD_DIM, dtype=q.dtype, device="cpu")
    if out.numel() == 0:
        return out
    strides = (ctypes.c_int64 * 12)(
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], out.stride(0), out.stride(2), out.stride(1)
    )
    nb = 1 if bias is None else bias.shape[0]
    status = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
                0 if scale is None else scale.data_ptr(), eps, int(q.dtype == torch.bfloat16),
                B, H, N, nb, strides, torch.get_num_threads())
    return None if status else out


def _describe(err: BaseException) -> str:
    """An exception in a few words: swinv2's own RuntimeErrors by their message, others with
    their type (an OSError from ctypes, a compiler's TimeoutExpired, a bug)."""
    text = " ".join(str(err).split())  # one line, as status() promises
    if type(err) is RuntimeError and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _init(force: bool = False) -> dict:
    """Build (again when ``force``), load and check the kernel: the outcome for ``_state``,
    the function or None and why (and the library's path once loaded). Any Exception is an
    outcome, kept so that it is not met again on every call; KeyboardInterrupt and SystemExit
    pass through."""
    fn, why, outcome = None, None, {}
    try:
        why = _cpu_supported()
        cc = _compiler() if why is None else None
        if why is None and cc is None:
            why = "no C compiler found (set CC)"
    except Exception as err:  # any failure leaves PyTorch's kernels in use
        why = f"could not inspect this machine: {_describe(err)}"
    if why is None:
        try:
            path = _build(cc, force=force)
            try:
                fn = _load(path)
            except OSError:  # a damaged cached library (say, cut short): build it again
                path = _build(cc, force=True)
                fn = _load(path)
            outcome["path"] = str(path)
        except Exception as err:
            why = f"could not build or load it: {_describe(err)}"
    if why is None:
        try:
            why = _self_test(fn)
        except Exception as err:
            why = f"its self-test failed: {_describe(err)}"
    return dict(outcome, fn=None if why else fn, why=why)


def _function():
    """The kernel, built on the first call once enabled; None (with a warning, once) when it
    cannot be had here."""
    if not enabled():
        return None
    if "fn" not in _state:
        with _lock:
            if "fn" not in _state:
                _state.update(_init())
                if _state["fn"] is None:
                    warnings.warn(f"swinv2's native attention kernel is off ({_state['why']}); PyTorch's "
                                  "attention is used instead", RuntimeWarning, stacklevel=3)
    return _state["fn"]


def rebuild() -> bool:
    """Forget this process's outcome (a failure included), compile the kernel afresh, load and
    check it again; whether it is available now. For after fixing what :func:`status` named
    (a compiler, a cache folder): a failure is otherwise final for the process."""
    with _lock:
        outcome = _init(force=True)
        _state.pop("path", None)
        _state.update(outcome)  # replaced, never emptied: other threads may be reading it
    return outcome["fn"] is not None


def available() -> bool:
    """Whether the native kernel is asked for, built, loaded and checked on this machine
    (builds it on the first call once enabled)."""
    return _function() is not None


_available_in_graph = graph_constant(available)


def status() -> str:
    """One line: the kernel in use, or why not."""
    if not enabled():
        return f"off ({OFF_NOTE})"
    return "on" if available() else f"off ({_state['why']})"


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`window_attention` takes these (B_, nH, N, d) inputs: float32 or
    bfloat16 (all three alike) on the CPU, 32-wide heads with unit stride, no gradient needed,
    not while exporting or tracing (those record PyTorch's own operators; under
    ``torch.compile`` the kernel is a custom operator of the graph), and the kernel available."""
    if q.device.type != "cpu" or q.dtype not in DTYPES or q.shape[-1] != HEAD_DIM:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    mode = recording()
    if mode == "export":
        return False
    if not all(t.dtype == q.dtype and t.shape == q.shape and t.stride(-1) == 1 for t in (k, v)):
        return False
    if q.stride(-1) != 1:
        return False
    return _available_in_graph() if mode == "compile" else available()


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     cosine_scale: torch.Tensor | None = None, eps: float = NORM_EPS) -> torch.Tensor:
    """softmax(q kᵀ + bias) v for q, k, v (B_, nH, N, 32) CPU tensors of one dtype, float32 or
    bfloat16 (any strides; a unit last one is read in place), ``bias`` None or (nb, nH, N, N)
    with window ``b`` using row ``b % nb`` (nb = 1: shared; nb = nW: the shifted-window masks),
    used in float32. Returns (B_, nH, N, 32) in q's dtype, a transposed view of a contiguous
    (B_, N, nH, 32) tensor. Inputs of the wrong shape, dtype or device raise ValueError.

    bfloat16 inputs are computed in float32 (normalisation, products, softmax, bias), and only
    the output is rounded to bfloat16.

    With ``cosine_scale`` (nH values, one per head) this is SwinV2's cosine attention: q
    becomes ``F.normalize(q, eps=eps)`` times its head's scale and k ``F.normalize(k, eps=eps)``
    inside the kernel, as they are read (no pass over q and k before it).

    NaN and infinities end where scaled_dot_product_attention puts them (a NaN score makes its
    row NaN, a NaN or infinite v its output column), and a row whose scores are all -inf (fully
    masked) gets weights 0, as there."""
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    if cosine_scale is not None:
        cosine_scale = cosine_scale.detach().to(torch.float32).reshape(-1).contiguous()
    out = torch.ops.swinv2.window_attention(q, k, v, bias, cosine_scale, float(eps))  # (B_, N, nH, 32)
    return out.transpose(1, 2)


def _check(q, k, v, bias, scale) -> None:
    """The operator's inputs, as the kernel reads them; ValueError naming what is wrong (on
    real and on traced tensors alike, so a compiled graph fails where eager would)."""
    given = [t for t in (q, k, v, bias, scale) if t is not None]
    if any(t.layout != torch.strided for t in given):
        raise ValueError(f"the inputs must be dense tensors, got layouts {[str(t.layout) for t in given]}")
    if q.dim() != 4 or q.shape[-1] != HEAD_DIM or any(t.shape != q.shape for t in (k, v)):
        raise ValueError(f"q, k and v must be (B_, nH, N, {HEAD_DIM}) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not all(t.device.type == "cpu" and t.dtype == q.dtype for t in (q, k, v)) or q.dtype not in DTYPES:
        raise ValueError("q, k and v must be CPU tensors of one dtype, float32 or bfloat16; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype} on {q.device}, {k.device}, {v.device}")
    B, H, N, _ = q.shape
    if bias is not None and (bias.dim() != 4 or bias.shape[1:] != (H, N, N) or bias.shape[0] == 0
                             or B % bias.shape[0] or bias.dtype != torch.float32 or bias.device.type != "cpu"):
        raise ValueError(f"bias must be float32 (nb, {H}, {N}, {N}) on the CPU with nb dividing {B}, "
                         f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}")
    if scale is not None and (scale.numel() != H or scale.dtype != torch.float32 or scale.device.type != "cpu"):
        raise ValueError(f"cosine_scale must hold one float32 value per head ({H}) on the CPU, "
                         f"got {scale.dtype} {tuple(scale.shape)} on {scale.device}")


def _check_raw(q, k, v, bias, scale) -> None:
    """:func:`_check`, and the layouts the C code assumes: q, k and v rows of 32 contiguous
    elements (any other strides, 64-bit), bias and scale contiguous. ValueError otherwise."""
    _check(q, k, v, bias, scale)
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k and v must have a unit last stride, got strides "
                         f"{q.stride()}, {k.stride()}, {v.stride()}")
    if bias is not None and not bias.is_contiguous():
        raise ValueError(f"bias must be contiguous, got strides {bias.stride()}")
    if scale is not None and not scale.is_contiguous():
        raise ValueError(f"cosine_scale must be contiguous, got strides {scale.stride()}")


@torch.library.custom_op(
    "swinv2::window_attention", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? scale, float eps) -> Tensor",
)
def _window_attention_op(q, k, v, bias, scale, eps):
    """The kernel as an operator, so that torch.compile keeps it in its graph. Returns the
    contiguous (B_, N, nH, 32) output. Layouts the kernel cannot read in place (a last
    stride other than 1, as a compiled graph may hand over) are made contiguous first."""
    _check(q, k, v, bias, scale)
    fn = _function()
    if fn is None:
        raise RuntimeError(f"the native window-attention kernel is {status()}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bias = None if bias is None else bias.contiguous()
    scale = None if scale is None else scale.contiguous()
    out = _call_raw(fn, q, k, v, bias, scale, eps)
    if out is None:
        raise MemoryError("the native window-attention kernel could not allocate its scratch memory")
    return out


@_window_attention_op.register_fake
def _(q, k, v, bias, scale, eps):
    _check(q, k, v, bias, scale)
    B, H, N, d = q.shape
    return q.new_empty(B, N, H, d)
