"""The training-memory estimate: parameter count, what autograd keeps, scaling, measurement."""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import swinv2
from swinv2.memory import (
    _WINDOW_TC,
    _WINDOW_TC_IN_PLACE,
    _WINDOW_TC_SEQUENTIAL,
    MiB,
    block_saved_bytes,
    count_params_analytic,
    estimate_training_memory,
    measure_training_memory,
)
from swinv2.train.precision import native_bf16
from swinv2.variants import VARIANTS, count_parameters


@pytest.mark.parametrize("name", list(VARIANTS))
def test_analytic_parameter_count_equals_the_model(name):
    model = swinv2.create_model(name, device="meta")
    assert count_params_analytic(model.config) == count_parameters(model)


@pytest.mark.parametrize(
    "switch", [dict(position_bias="table"), dict(attn_type="dot"), dict(norm_placement="sandwich"),
               dict(extra_norm_period=1), dict(qkv_bias=False), dict(ape=True), dict(num_classes=0)],
    ids=str,
)
def test_analytic_parameter_count_with_switches(switch):
    model = swinv2.create_model("swinv2_debug", device="meta", **switch)
    assert count_params_analytic(model.config) == count_parameters(model)


def _saved_bytes(block, x, window, shift, mask, dtype):
    """Bytes of the distinct storages autograd keeps for one block's backward (weights excluded)."""
    # weights, and the stage's mask (one tensor shared by all its blocks)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()} | {mask.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights and t.numel() > 64:  # activations, not weights or scales
            saved[st.data_ptr()] = st.nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
    with saved_tensors_hooks(pack, lambda t: t), ctx:
        block(x, window, shift, mask)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("sequential", [False, True])
def test_per_block_counts_are_what_autograd_keeps(dtype, sequential):
    """The estimate's per-block list of kept tensors, checked against saved_tensors_hooks on a
    shifted, padded stage-0 block of SwinV2-T (the autocast weight copies are counted apart)."""
    model = swinv2.create_model("swinv2_tiny_window8_256", drop_path_rate=0.0).train()
    if sequential:
        model.set_sequential_attention([0], chunk_windows=5)
    stage, block = model.layers[0], model.layers[0].blocks[1]
    x = torch.randn(2, 36, 44, 96)  # padded to 40 x 48: 5 x 6 windows per image
    (window, shift), res = stage.window_and_shift((36, 44)), (36, 44)
    mask = stage.masks(res, x.device)[shift]
    s = 4 if dtype == "fp32" else 2
    T, Tp, C, S = 2 * 36 * 44, 2 * 40 * 48, 96, 2 * 30 * 3 * 64 * 64
    window_tc = _WINDOW_TC_SEQUENTIAL if sequential else _WINDOW_TC_IN_PLACE if dtype == "fp32" else _WINDOW_TC
    scores = 0 if sequential else S  # chunks keep no scores
    # q/k norms: float32 normalises before chunking; under autocast each chunk recomputes them
    rows = 0 if sequential and dtype == "bf16" else 2 * 30 * 3 * 64
    expected = block_saved_bytes(T, Tp, C, rows, scores, 15 * 15 * 512, s, window_tc)
    got = _saved_bytes(block, x, window, shift, mask, dtype)
    if dtype == "bf16":
        got -= 2 * (4 * C * C + 8 * C * C)  # the low-precision copies of qkv, proj, fc1, fc2 weights
    assert got == pytest.approx(expected, rel=0.01)


def test_estimate_scales_as_expected():
    base = estimate_training_memory("swinv2_tiny_window8_256", batch_size=4)
    assert base.params == 4 * count_parameters(swinv2.create_model("swinv2_tiny_window8_256", device="meta"))
    assert base.optimizer_states == 2 * base.params and base.grads == base.params
    zero = estimate_training_memory("swinv2_tiny_window8_256", batch_size=4, zero_world_size=2)
    assert zero.optimizer_states == base.optimizer_states // 2 and zero.params == base.params
    fsdp = estimate_training_memory("swinv2_tiny_window8_256", batch_size=4, fsdp_world_size=4)
    assert fsdp.params == base.params // 4 and fsdp.optimizer_states == base.optimizer_states // 4
    double = estimate_training_memory("swinv2_tiny_window8_256", batch_size=8)
    assert double.activations == pytest.approx(2 * base.activations, rel=0.01)  # all but the bias MLP
    bf16 = estimate_training_memory("swinv2_tiny_window8_256", batch_size=4, dtype="bf16")
    assert bf16.activations < 0.55 * base.activations and bf16.autocast_weights == base.params // 2
    ckpt = estimate_training_memory("swinv2_tiny_window8_256", batch_size=4, grad_checkpointing=True)
    assert ckpt.activations < 0.25 * base.activations and ckpt.peak < base.peak
    seq = estimate_training_memory("swinv2_tiny_window8_256", batch_size=4, sequential_attention={0: 4})
    assert seq.activations_per_stage[0] < base.activations_per_stage[0]
    assert seq.activations_per_stage[1:] == base.activations_per_stage[1:]
    assert seq.attention_scores < base.attention_scores
    model = swinv2.create_model("swinv2_debug", sequential_attention=[0], grad_checkpointing=[1])
    assert estimate_training_memory(model).case["grad_checkpointing"] == [1]  # a model's own settings
    with pytest.raises(ValueError, match="dtype"):
        estimate_training_memory("swinv2_debug", dtype="int8")


def test_fsdp_backward_holds_the_units_around_a_block():
    """FSDP2 as wrap_model applies it (each block a unit, the rest the root): SwinV2-H's peak is
    in the backward of stage 3's first block, which holds its own full weights and gradients,
    the prefetched weights of stage 2's last block and the reduce-scatter input of stage 3's
    second block, while the root's weights stay gathered. Measured at 192 px on 2 processes:
    5.76 GiB against 5.66 predicted (benchmarks/2026-12-01-sharded-budget-cpu.md)."""
    model = swinv2.create_model("swinv2_huge_window12_192", device="meta", num_classes=1000, drop_path_rate=0.0)
    blocks = [count_parameters(stage.blocks[0]) for stage in model.layers]  # block 0: no extra norm
    root = count_parameters(model) - sum(d * b for d, b in zip(model.depths, blocks))
    est = estimate_training_memory(model, fsdp_world_size=2)
    assert est.breakdown["FSDP gathered (root, blocks)"] == (4 * root - 4 * root // 2) + 4 * (3 * blocks[3] + blocks[2])
    assert est.breakdown["gradients alive at the peak"] == 4 * blocks[3] // 2  # stage 3's second block, sharded
    assert estimate_training_memory(model).breakdown["FSDP gathered (root, blocks)"] == 0


# Each case: a fresh subprocess with a few AdamW steps; the estimate is within 15% of peak RSS.
MEASURED = [
    ("swinv2_debug", 128, 4, "fp32", False, False),
    ("swinv2_tiny_window8_256", 128, 2, "bf16", False, False),
    ("swinv2_tiny_window8_256", 128, 2, "fp32", [0, 1], {0: 4}),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", MEASURED, ids=lambda c: f"{c[0]}-{c[1]}px-b{c[2]}-{c[3]}-ck{c[4]}-seq{c[5]}")
def test_estimate_within_15_percent_of_measured_peak(case):
    name, size, batch, dtype, ckpt, seq = case
    if dtype == "bf16" and not native_bf16("cpu"):
        # The bf16 runtime terms are calibrated where bf16 runs on native kernels; the generic
        # kernels of other CPUs keep other workspaces (AVX2: 465 MiB measured, 540 predicted).
        pytest.skip("bf16 memory is calibrated for CPUs with native bf16 (AVX-512 BF16 or AMX)")
    est = estimate_training_memory(name, img_size=size, batch_size=batch, dtype=dtype, grad_checkpointing=ckpt,
                                   sequential_attention=seq)
    measured = measure_training_memory(name, size, None, batch, dtype, ckpt, seq)
    assert est.peak == pytest.approx(measured, rel=0.15), f"{est.peak / MiB:.0f} vs {measured / MiB:.0f} MiB"


def test_cli_prints_a_breakdown(capsys):
    from swinv2.cli import main

    assert main(["memory", "--model", "swinv2_debug", "--img-size", "64", "--batch-size", "2", "--dtype", "bf16",
                 "--checkpointing", "--sequential", "0", "1", "--zero", "2"]) == 0
    out = capsys.readouterr().out
    assert "optimizer states (adamw, sharded)" in out and "peak total" in out
