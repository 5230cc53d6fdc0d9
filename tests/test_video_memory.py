"""The training-memory estimate of the video network: what autograd keeps, the image case, the command."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import swinv2
from swinv2.blocks import SwinTransformerV2Block
from swinv2.cli import main
from swinv2.fast import apply as apply_speedups
from swinv2.memory import (
    _WINDOW_TC_IN_PLACE,
    _WINDOW_TC_SEQUENTIAL,
    MiB,
    block_saved_bytes,
    estimate_training_memory,
)
from swinv2.windows import attention_mask, effective_window


def _randomise(model: torch.nn.Module) -> None:
    """Every parameter random (norms included: zero-initialised res-post norms make blocks identities)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)


def _saved(fn, params) -> dict[int, int]:
    """{storage: bytes} of the floating tensors autograd keeps while ``fn`` runs, weights left
    out (the integer index of the position-bias gather is a constant each attention module caches)."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights and t.is_floating_point():
            saved[st.data_ptr()] = st.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def _without(saved: dict[int, int], constants) -> int:
    """Bytes of ``saved`` beyond the cached ``constants`` (masks: the estimate counts them apart)."""
    skip = {t.untyped_storage().data_ptr() for t in constants}
    return sum(n for ptr, n in saved.items() if ptr not in skip)


@pytest.mark.parametrize("sequential", [False, True])
def test_video_block_counts_are_what_autograd_keeps(sequential):
    """One shifted block on a map padded in time, height and width, in float32: the estimate's
    per-block list (3D window, padded tokens, the (2w-1)^3 bias MLP layer, q/k norms) against
    saved_tensors_hooks, for a stage-0 block of Video SwinV2-T with the speedups create_model
    gives a video network (the fast attention; the image-only fast block stays out)."""
    block = SwinTransformerV2Block(96, 3, pretrained_window_size=(0, 0, 0))
    block = apply_speedups(block, blocks=False).train()
    _randomise(block)
    if sequential:  # whole clips' windows per chunk (8 per clip): no mask rows gathered
        block.attn.sequential, block.attn.chunk_windows = True, 4
    size, window, shift = (6, 12, 14), (4, 8, 8), (2, 4, 4)  # padded to (8, 16, 16): 2 x 2 x 2 windows
    assert effective_window(size, window) == (window, shift)
    mask = attention_mask(size, window, shift)
    x = torch.randn(2, *size, 96)
    got = _without(_saved(lambda: block(x, window, shift, mask), block.parameters()), [mask])
    T, Tp, C, nH, N = 2 * 6 * 12 * 14, 2 * 8 * 16 * 16, 96, 3, 256
    rows = 2 * 8 * nH * N  # q and k norms: float32 normalises before chunking, so they stay
    scores = 0 if sequential else 2 * 8 * nH * N * N
    cpb = 7 * 15 * 15 * 512
    window_tc = _WINDOW_TC_SEQUENTIAL if sequential else _WINDOW_TC_IN_PLACE
    expected = block_saved_bytes(T, Tp, C, rows, scores, cpb, 4, window_tc)
    if sequential:  # the chunks also keep the (nH, N, N) bias they share, which the estimate leaves out
        expected += 4 * nH * N * N
    assert got == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("settings", [{}, dict(grad_checkpointing=True), dict(sequential_attention={0: 4, 1: 2})],
                         ids=["plain", "checkpointing", "sequential"])
def test_video_network_counts_are_what_autograd_keeps(settings):
    """The debug video network on a clip padded in every axis (6 frames, 56 px: token maps 3 x 14
    x 14 .. 3 x 2 x 2 with windows 2 x 4 x 4, shifted in stages 0-1): the estimate's activations
    (embedding with the clip, blocks, spatial patch merging) against everything the forward
    leaves for backward, beyond the final norm, which the estimate does not count."""
    model = swinv2.create_model("video_swinv2_debug", img_size=56, num_frames=6, drop_path_rate=0.0, **settings)
    model = model.train()
    _randomise(model)
    x = torch.randn(2, 3, 6, 56, 56)
    sizes = model.stage_resolutions()
    assert sizes == [(3, 14, 14), (3, 7, 7), (3, 4, 4), (3, 2, 2)]  # time keeps its resolution
    saved = _saved(lambda: model(x), model.parameters())
    # the stages' cached masks: the very tensors forward used
    masks = [m for stage, size in zip(model.layers, sizes)
             for m in stage.masks(size, torch.device("cpu")).values() if m is not None]
    est = estimate_training_memory(model, batch_size=2)
    tail = 4 * 2 * 12 * 256  # the final LayerNorm's input (3 x 2 x 2 tokens of 256 channels)
    assert est.activations == pytest.approx(_without(saved, masks) - tail, rel=0.02)
    # the masks the estimate counts: one per stage where windows shift or pad (two where both)
    assert est.breakdown["attention masks (cached, fp32)"] == sum(m.numel() * 4 for m in masks)


def test_single_token_frame_clip_is_the_image_estimate():
    """A 2-frame clip through a 2-frame temporal patch is one token frame: every stage's map,
    window, masks and activations are the image network's; only the embedding keeps the second
    frame's pixels, and the weights differ by the conv's second frame and the bias MLPs' time input."""
    image = estimate_training_memory("swinv2_debug", img_size=64, batch_size=3)
    video = estimate_training_memory("video_swinv2_debug", img_size=64, num_frames=2, batch_size=3)
    assert video.case["token_maps"] == [[1, 16, 16], [1, 8, 8], [1, 4, 4], [1, 2, 2]]
    assert video.activations_per_stage == image.activations_per_stage
    assert video.attention_scores == image.attention_scores and video.workspace == image.workspace
    assert video.breakdown["attention masks (cached, fp32)"] == image.breakdown["attention masks (cached, fp32)"]
    assert video.activations - image.activations == 3 * 3 * 64 * 64 * 4  # one more frame of the clip
    blocks = sum(swinv2.create_model("swinv2_debug", device="meta").depths)
    assert video.num_params - image.num_params == 32 * 3 * 4 * 4 + blocks * 512
    assert video.peak == pytest.approx(image.peak, rel=0.03)
    # and time is counted: four token frames keep about four times the block activations
    four = estimate_training_memory("video_swinv2_debug", img_size=64, num_frames=8, batch_size=3)
    assert four.activations_per_stage[0] == pytest.approx(4 * image.activations_per_stage[0], rel=0.15)


def test_video_window_and_frames_validation():
    with pytest.raises(ValueError, match="image model"):
        estimate_training_memory("swinv2_debug", num_frames=4)
    with pytest.raises(ValueError, match="three sides"):
        estimate_training_memory("swinv2_debug", window=(2, 4, 4))
    est = estimate_training_memory("video_swinv2_debug", window=(1, 8, 8), num_frames=4)
    assert est.case["window"] == [1, 8, 8] and est.case["num_frames"] == 4


def test_cli_prints_a_video_breakdown(capsys):
    assert main(["memory", "--model", "video_swinv2_debug", "--img-size", "64", "--frames", "4", "--window", "2x8x8",
                 "--batch-size", "2", "--checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "4 frames x 64px, window 2x8x8, batch 2" in out
    assert "token maps (T' x H' x W') per stage: 2x16x16, 2x8x8, 2x4x4, 2x2x2" in out
    est = estimate_training_memory("video_swinv2_debug", img_size=64, num_frames=4, window=(2, 8, 8), batch_size=2,
                                   grad_checkpointing=True)
    peak = next(line for line in out.splitlines() if line.startswith("peak total"))
    assert math.isclose(float(peak.split()[-1]), est.peak / MiB, abs_tol=0.05)
    assert main(["memory", "--model", "swinv2_debug", "--frames", "4"]) == 2
    assert main(["memory", "--model", "swinv2_debug", "--window", "2x4x4"]) == 2
    assert main(["memory", "--model", "video_swinv2_debug", "--window", "4x4"]) == 2
    err = capsys.readouterr().err
    assert "--frames is for video models" in err and "three sides" in err and "expected N or TxHxW" in err
