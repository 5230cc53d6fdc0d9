"""Training-memory estimate of a SwinV2 model, built from the architecture, and its measurement.

The estimate counts, per block, the tensors autograd keeps for backward (the same list that
``torch.autograd.graph.saved_tensors_hooks`` sees, checked in tests/test_memory.py), adds the
weights, gradients, optimizer states and autocast's low-precision weight copies, and walks the
backward pass block by block (activations are freed from the last block back while gradients
appear) to find the peak. Only the transient ``workspace`` of one block's backward and the
fixed ``runtime`` overhead of torch's CPU kernels are calibrated constants, fitted to measured
peak RSS (:func:`measure_training_memory`; the measurements are in benchmarks/).

Images and videos share one count: a stage works on a token map of any number of axes
((H', W') for images, (T', H', W') for clips) with the window that map uses, so tokens, padded
tokens, window sizes and position-bias tables are products over the axes.

``swinv2 memory --model NAME ... [--measure]`` prints the breakdown, and with ``--measure`` runs
real AdamW training steps in a subprocess and prints the measured peak beside the prediction.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext

import torch

from .layers import DEFAULT_ATTENTION_BUDGET_MB, SCORE_TENSORS
from .loading import network_class
from .model import stage_spec
from .model_config import count_params_analytic, parameter_count
from .variants import create_model, get_variant

__all__ = ["MemoryEstimate", "block_saved_bytes", "count_params_analytic", "estimate_training_memory",
           "measure_training_memory"]

MiB = 2**20
DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1}  # fp32 tensors per parameter (moments, momentum)

# Elements of (tokens x channels) that one block keeps for backward, from the saved-tensor list
# of the fused paths (tests/test_memory.py checks them against saved_tensors_hooks):
# on the feature map: fc1 input 1, GELU input 4, fc2 input 4, norm2 input 1;
_MAP_TC = 10
# on the padded windows: qkv input 1, qkv output 3, a scaled copy of q 1, the attention kernel's
# q, k, v 3, proj input 1, and norm1's input (a cropped view of the padded map) 1; with
# sequential attention each chunk is recomputed, keeping none of the kernel's 4. Cosine attention
# in float32 normalises q and k inside qkv (swinv2.fast.attention.CosineQK): no scaled copy, and their norms are
# kept even with sequential attention, which chunks after the normalisation.
_WINDOW_TC = 10
_WINDOW_TC_IN_PLACE = 9
_WINDOW_TC_SEQUENTIAL = 6
# Score-sized tensors (windows x heads x N x N) a block keeps: the probabilities.
_SAVED_SCORES = 1
# Calibrated (see the module docstring): a block's backward holds about this many extra
# (tokens x channels) tensors and two score-sized ones (their gradients) at its peak.
_WORKSPACE_TC = 8
_WORKSPACE_SCORES = 2
# Calibrated: memory a training step takes beyond the tensors counted here (allocator slack,
# kernel scratch buffers), once torch's runtime is warm (measure_training_memory warms it):
# the measured excess of the debug model at 32-128 px, where the counted tensors are tiny. It
# depends on the CPU, because the oneDNN and BLAS kernels keep scratch buffers sized to it; the
# values sit between the CPUs measured (the fits are in benchmarks/).
RUNTIME_MB = {"fp32": 14.0, "bf16": 36.0, "fp16": 36.0}


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per device. ``peak`` is the estimated peak of one training step (after the
    first, so optimizer states exist); ``breakdown`` lists the terms alive at that peak."""

    params: int
    grads: int
    optimizer_states: int
    autocast_weights: int
    activations: int
    activations_per_stage: list[int]
    attention_scores: int
    workspace: int
    runtime: int
    peak: int
    breakdown: dict[str, int]
    num_params: int
    case: dict

    def table(self) -> str:
        rows = [(k, v) for k, v in self.breakdown.items()] + [("peak total", self.peak)]
        lines = [f"{'term':<34} {'MiB':>10}", "-" * 45]
        lines += [f"{k:<34} {v / MiB:>10.1f}" for k, v in rows]
        lines.append("")
        lines.append("activations kept for backward, per stage: "
                     + ", ".join(f"{i}: {a / MiB:.1f}" for i, a in enumerate(self.activations_per_stage)) + " MiB")
        lines.append(f"largest attention scores alive at once: {self.attention_scores / MiB:.1f} MiB")
        return "\n".join(lines)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _model_config(model_or_name, img_size, window, num_frames=None) -> dict:
    """The config of the network to estimate: the variant's or the model's, with the overrides."""
    if isinstance(model_or_name, str):
        config = dict(create_model(model_or_name, device="meta").config)
        label = repr(model_or_name)
    else:
        config = dict(model_or_name.config)
        label = f"this {type(model_or_name).__name__}"
    video = "num_frames" in config
    if num_frames is not None:
        if not video:
            raise ValueError(f"num_frames is for video models; {label} is an image model")
        config["num_frames"] = num_frames
    if window is not None and not isinstance(window, int) and len(window) == 3 and not video:
        raise ValueError(f"window {tuple(window)} has three sides (time, height, width); {label} is an image model")
    if img_size is not None:
        config["img_size"] = img_size
    if window is not None:
        config["window_size"] = window
    return config


def _stage_maps(config: dict) -> tuple[tuple[int, ...], list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(patch, token map of each stage, window of each stage), from the network itself (built on
    the meta device, so the geometry is the one forward uses): 2 axes for images, 3 for clips."""
    with torch.device("meta"):
        net = network_class(config)(**config)
    config["window_size"] = list(net.window_size)  # as the model holds it: one side per axis
    return tuple(net.patch_size), net.stage_resolutions(), [w for w, _ in net.stage_windows()]


def estimate_training_memory(
    model_or_name,
    img_size: int | tuple[int, int] | None = None,
    window: int | tuple[int, ...] | None = None,
    batch_size: int = 1,
    dtype: str = "fp32",
    grad_checkpointing=None,
    sequential_attention=None,
    chunk_windows: int | None = None,
    memory_budget_mb: float | None = None,
    optimizer: str = "adamw",
    zero_world_size: int = 1,
    fsdp_world_size: int = 1,
    num_frames: int | None = None,
) -> MemoryEstimate:
    """Estimated peak memory of one training step on one device.

    ``model_or_name``: a variant name, a SwinTransformerV2 or a VideoSwinTransformerV2 (its
    config, including its checkpointing and sequential-attention settings, unless given here).
    ``window``: an int, or per axis ((time,) height, width). ``num_frames``: a video model's clip
    length (default: the model's); an image model takes none. ``dtype``: ``fp32``,
    or ``bf16`` / ``fp16`` autocast (fp32 weights, gradients and states; 2-byte activations).
    ``grad_checkpointing`` / ``sequential_attention``: False, True (all stages), stage list,
    or (sequential) a dict {stage: windows per chunk}. ``zero_world_size``: ZeRO-1 shards the
    optimizer states; ``fsdp_world_size``: FSDP2 as ``train.distributed.wrap_model`` applies it
    (each block a unit, the rest of the network the root unit) shards weights, gradients and
    states; the root's weights stay gathered through forward and backward, and during a block's
    backward its full weights and gradients, the next block's weights (prefetched) and the
    previous block's reduce-scatter input are alive (measured: benchmarks/, the sharded-budget report).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    if zero_world_size < 1 or fsdp_world_size < 1 or batch_size < 1:
        raise ValueError("batch_size, zero_world_size and fsdp_world_size must be at least 1")
    config = _model_config(model_or_name, img_size, window, num_frames)
    n_stages = len(config["depths"])
    ckpt = stage_spec(config.get("grad_checkpointing") if grad_checkpointing is None else grad_checkpointing,
                       n_stages, "grad_checkpointing")
    seq = stage_spec(config.get("sequential_attention") if sequential_attention is None else sequential_attention,
                      n_stages, "sequential_attention")
    if chunk_windows is not None:
        seq = dict.fromkeys(seq, chunk_windows)
    budget = memory_budget_mb or config.get("sequential_attention_budget_mb") or DEFAULT_ATTENTION_BUDGET_MB

    s = DTYPES[dtype]
    B = batch_size
    n_params = parameter_count(config)
    P = 4 * n_params
    patch, maps, windows = _stage_maps(config)
    C0 = config["embed_dim"]

    # Embedding: the conv keeps the image or clip (whole patches; a 2-byte copy under autocast),
    # the LayerNorm its input, the token map.
    pixels = math.prod(r * p for r, p in zip(maps[0], patch))  # H*W, or T*H*W of the (padded) clip
    embed = B * config.get("in_chans", 3) * pixels * s + B * math.prod(maps[0]) * C0 * s
    per_block: list[tuple[int, int, int, int, int]] = []  # (stage, saved, workspace, scores alive, grads)
    in_place = dtype == "fp32" and config.get("attn_type", "cosine") == "cosine"
    stage_acts, max_scores, masks = [], 0, 0
    depths, heads = config["depths"], config["num_heads"]
    block_params = _block_param_bytes(config)
    for i, (depth, nH) in enumerate(zip(depths, heads)):
        c = C0 * 2**i
        size, window = maps[i], windows[i]  # (H', W') or (T', H', W'), and the window the stage uses
        N = math.prod(window)
        padded_size = tuple(math.ceil(r / w) * w for r, w in zip(size, window))  # to whole windows
        T, Tp = B * math.prod(size), B * math.prod(padded_size)
        n_windows = Tp // N
        S = n_windows * nH * N * N  # score elements of one batched attention call
        batched_tc = _WINDOW_TC_IN_PLACE if in_place else _WINDOW_TC
        if i in seq:
            chunk = seq[i] or max(1, int(budget * MiB // (SCORE_TENSORS * nH * N * N * s)))
            S_alive = min(chunk, n_windows) * nH * N * N
            chunked = chunk < n_windows
            window_tc = _WINDOW_TC_SEQUENTIAL if chunked else batched_tc
            saved_scores = 0 if chunked else _SAVED_SCORES * S
        else:
            chunked, S_alive, window_tc, saved_scores = False, S, batched_tc, _SAVED_SCORES * S
        cpb = math.prod(2 * w - 1 for w in window) * config.get("cpb_hidden_dim", 512)  # MLP hidden layer
        rows = n_windows * nH * N if (in_place or not chunked) else 0  # q, k norms (recomputed in chunks)
        full = block_saved_bytes(T, Tp, c, rows, saved_scores, cpb, s, window_tc)
        # Cached fp32 masks of the stage (shifted blocks; with padding, unshifted ones too), one
        # window's rows per window of an image (or clip): large for big windows (1536 px, w32: 576 MiB).
        per_image = Tp // B // N
        shifted = any(r > w for r, w in zip(size, window)) and depth > 1
        padded = padded_size != size
        masks += 4 * per_image * N * N * (int(shifted or padded) + int(padded))
        # a block's backward: its gradient tensors, the score gradients and, with a mask, the
        # bias + mask term of the kernel (images share it: rows of one image, or of a chunk)
        bias_rows = min(chunk, per_image) if i in seq else per_image
        work = s * (_WORKSPACE_TC * T * c + _WORKSPACE_SCORES * S_alive
                    + (bias_rows * nH * N * N if (shifted or padded) else 0))
        if i in ckpt:
            saved, work = s * T * c, work + full  # keeps the block input; recomputes the rest in backward
        else:
            saved = full
        max_scores = max(max_scores, s * S_alive)
        for _ in range(depth):
            per_block.append((i, saved, work, s * S_alive, block_params[i]))
        acts = depth * saved
        if i < n_stages - 1:  # patch merging (spatial only) keeps its 4C input and its LayerNorm's 2C input
            merged_tokens = B * math.prod(maps[i + 1])
            acts += s * (merged_tokens * 4 * c + merged_tokens * 2 * c)
        stage_acts.append(acts)
    activations = embed + sum(stage_acts)

    grads = P
    states = OPTIMIZER_STATES[optimizer] * P
    autocast_w = n_params * s if s == 2 else 0  # low-precision weight copies, kept for backward
    P_dev, G_dev = P // fsdp_world_size, grads // fsdp_world_size
    O_dev = states // (zero_world_size * fsdp_world_size)
    A_dev_ac = autocast_w // fsdp_world_size
    # FSDP: the root unit's weights (embedding, patch merging, final norm, head) stay gathered,
    # and block k's backward holds fp32 full-size tensors of units around it (see the docstring).
    unit = [4 * b[4] for b in per_block]
    root = P - sum(unit) if fsdp_world_size > 1 else 0
    root_gathered = root - root // fsdp_world_size

    def gathered(k: int) -> int:
        if fsdp_world_size == 1:
            return 0
        nxt = unit[k - 1] if k > 0 else 0  # the block backward reaches next: prefetched weights
        prev = unit[k + 1] if k + 1 < len(unit) else 0  # the block before: its reduce-scatter input
        return root_gathered + 2 * unit[k] + nxt + prev

    # Backward walks blocks from the last to the first: block k's saved tensors are still alive
    # with those of every earlier block, and gradients exist for every later block.
    fixed = P_dev + O_dev + A_dev_ac + masks + int(RUNTIME_MB[dtype] * MiB)
    prefix = embed
    acts_before = []
    for _, saved, *_ in per_block:
        acts_before.append(prefix)
        prefix += saved
    peak, at = 0, None
    grads_after = 0
    merged = sum(stage_acts) + embed - sum(b[1] for b in per_block)  # merging layers, embedding
    for k in range(len(per_block) - 1, -1, -1):
        stage, saved, work, scores, gparams = per_block[k]
        alive = fixed + acts_before[k] + saved + merged + work + grads_after // fsdp_world_size + gathered(k)
        if alive > peak:
            peak, at = alive, (k, acts_before[k] + saved + merged, work, grads_after // fsdp_world_size,
                               gathered(k))
        grads_after += 4 * gparams
    end = fixed + G_dev  # after backward: every gradient, every unit sharded again
    if end > peak:
        peak, at = end, (None, 0, 0, G_dev, 0)
    _, acts_at, work_at, grads_at, gathered_at = at
    breakdown = {
        f"weights (fp32{', 1/' + str(fsdp_world_size) if fsdp_world_size > 1 else ''})": P_dev,
        "gradients alive at the peak": grads_at,
        f"optimizer states ({optimizer}{', sharded' if O_dev != states else ''})": O_dev,
        "autocast weight copies": A_dev_ac,
        "activations kept for backward": acts_at,
        "backward workspace (one block)": work_at,
        "FSDP gathered (root, blocks)": gathered_at,
        "attention masks (cached, fp32)": masks,
        "torch runtime (calibrated)": int(RUNTIME_MB[dtype] * MiB),
    }
    return MemoryEstimate(
        params=P_dev, grads=G_dev, optimizer_states=O_dev, autocast_weights=A_dev_ac, activations=activations,
        activations_per_stage=stage_acts, attention_scores=max_scores, workspace=max(b[2] for b in per_block),
        runtime=int(RUNTIME_MB[dtype] * MiB), peak=int(peak), breakdown=breakdown, num_params=n_params,
        case=dict(img_size=list(_pair(config["img_size"])), window=config["window_size"], batch_size=B, dtype=dtype,
                  num_frames=config.get("num_frames"), token_maps=[list(m) for m in maps],
                  grad_checkpointing=sorted(ckpt), sequential_attention={k: v for k, v in seq.items()},
                  optimizer=optimizer, zero_world_size=zero_world_size, fsdp_world_size=fsdp_world_size),
    )


def block_saved_bytes(T: int, Tp: int, C: int, rows: int, scores: int, cpb: int, s: int, window_tc: int) -> int:
    """Bytes one block keeps for backward: ``T`` map tokens, ``Tp`` padded-window tokens, ``C``
    channels, ``rows`` = windows x heads x N query rows, ``scores`` kept score elements,
    ``cpb`` elements of the position-bias MLP's hidden layer, ``s`` bytes per activation."""
    stats = 4 * (2 * 2 * T) + s * 4 * rows  # LayerNorm mean/rstd (fp32); q and k norms
    return s * (_MAP_TC * T * C + window_tc * Tp * C + scores + cpb) + stats


def _block_param_bytes(config: dict) -> list[int]:
    """Parameters of one block of each stage (as a 1-block, 1-stage model's count difference;
    image or video, whichever ``config`` describes)."""
    out = []
    for i in range(len(config["depths"])):
        one = dict(config, depths=[1 if j == i else 0 for j in range(len(config["depths"]))], extra_norm_period=0)
        none = dict(one, depths=[0] * len(config["depths"]))
        out.append(parameter_count(one) - parameter_count(none))
    return out


# -- measurement ---------------------------------------------------------------------------


def measure_training_memory(model_name: str, img_size: int, window: int | tuple[int, ...] | None, batch_size: int,
                            dtype: str, grad_checkpointing=None, sequential_attention=None, steps: int = 3,
                            num_frames: int | None = None) -> int:
    """Peak RSS increase (bytes) of AdamW training steps, from before the model is built, in a
    fresh subprocess (so nothing else in this process counts). The peak is taken over the last
    step, after optimizer states exist. A video model trains on clips of ``num_frames`` frames
    (default: the variant's)."""
    args = dict(model_name=model_name, img_size=img_size, window=window, batch_size=batch_size, dtype=dtype,
                grad_checkpointing=grad_checkpointing, sequential_attention=sequential_attention, steps=steps,
                num_frames=num_frames)
    code = f"import json; from swinv2.memory import _measure; print(json.dumps(_measure(**{args!r})))"
    # A fixed mmap threshold makes glibc hand freed large blocks back at once (as in bench.py).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_kb(field: str = "VmRSS") -> int:
    """This process's resident set in KiB (Linux): ``VmRSS`` now, ``VmHWM`` at its peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def trim_heap() -> None:
    """Hand memory that glibc's malloc keeps after frees back to the system, so that a later
    peak is not hidden in it (a no-op without glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak_rss() -> None:
    """Make the peak resident set (``VmHWM``) start again from the current one (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(model_name, img_size, window, batch_size, dtype, grad_checkpointing, sequential_attention, steps,
             num_frames=None):
    video = get_variant(model_name).is_video
    if num_frames is not None and not video:
        raise ValueError(f"num_frames is for video models; {model_name!r} is an image model")
    clip = dict(num_frames=num_frames or get_variant(model_name).num_frames) if video else {}
    kw = dict(drop_path_rate=0.0)
    if window:
        kw["window_size"] = window
    if grad_checkpointing:
        kw["grad_checkpointing"] = grad_checkpointing
    if sequential_attention:
        kw["sequential_attention"] = sequential_attention
    half = torch.bfloat16 if dtype == "bf16" else torch.float16
    ctx = (lambda: torch.autocast("cpu", dtype=half)) if dtype != "fp32" else nullcontext

    def step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    # Warm up torch's runtime (library code pages, kernel caches, thread pools: the same for any
    # model) with the same network at a small size (2 frames of a clip), so that the increase
    # measured below is the training step's own memory.
    small = create_model(model_name, img_size=64, **(dict(num_frames=2) if video else {}), **kw).train()
    x = torch.randn((1, 3, 2, 64, 64) if video else (1, 3, 64, 64))
    step(small, torch.optim.AdamW(small.parameters(), lr=1e-6), x, torch.zeros(1).long())
    del small, x
    gc.collect()
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, *clip.values(), img_size, img_size)  # (B, 3, H, W) or (B, 3, T, H, W)
    y = torch.randint(0, 10, (batch_size,))
    trim_heap()
    base = rss_kb("VmRSS")
    model = create_model(model_name, img_size=img_size, **clip, **kw).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for i in range(steps):
        if i == steps - 1:
            trim_heap()
            reset_peak_rss()
        step(model, opt, x, y)
    return (rss_kb("VmHWM") - base) * 1024
