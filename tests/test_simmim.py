"""SimMIM: mask generation, the masked L1 loss, local target normalisation, the official fixture."""

import math

import pytest
import torch
from helpers import official_fixture, randomize_, rel_err

import swinv2
from swinv2.simmim import MaskGenerator, SimMIM, local_normalize


def test_mask_generator_rounding_grid_and_seed():
    gen = MaskGenerator(192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    m = gen(torch.Generator().manual_seed(0))
    assert m.shape == (48, 48) and gen.count == 22  # ceil(36 * 0.6)
    cells = m[::8, ::8]
    assert int(cells.sum()) == 22 and torch.equal(m, cells.repeat_interleave(8, 0).repeat_interleave(8, 1))
    again = gen(torch.Generator().manual_seed(0))
    assert torch.equal(m, again) and not torch.equal(m, gen(torch.Generator().manual_seed(1)))
    wide = MaskGenerator((64, 96), mask_patch_size=32, mask_ratio=0.5)
    assert wide(torch.Generator().manual_seed(0)).shape == (16, 24) and wide.count == 3
    with pytest.raises(ValueError, match="multiple of the mask patch"):
        MaskGenerator(100, 32)
    with pytest.raises(ValueError, match="model patch"):
        MaskGenerator(96, 32, model_patch_size=5)


def _model(norm=None, seed=0):
    enc = swinv2.create_model("swinv2_debug", num_classes=0, img_size=64)
    sim = SimMIM(enc, norm_target_window=norm)
    return randomize_(sim, seed=seed).eval()  # no stochastic depth: reruns must agree


def test_loss_is_the_l1_error_on_hidden_pixels_only():
    torch.manual_seed(0)
    sim = _model().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = MaskGenerator(64, 16).batch(2, torch.Generator().manual_seed(3))
    loss = sim(x, mask)
    rec, _ = sim.reconstruct(x, mask)
    total, count = 0.0, 0
    for b in range(2):  # pixel by pixel: hidden if its 4x4 token is hidden
        for i in range(64):
            for j in range(64):
                if mask[b, i // 4, j // 4]:
                    total += (x[b, :, i, j] - rec[b, :, i, j]).abs().sum().item()
                    count += 3
    assert loss.item() == pytest.approx(total / count, rel=1e-12)
    # visible pixels never count: noise added to the prediction there leaves the loss as it is,
    # while noise on hidden pixels changes it
    real = sim.reconstruct
    pixels = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).double()
    noise = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    sim.reconstruct = lambda x, m: (real(x, m)[0] + noise * (1 - pixels), real(x, m)[1])
    assert sim(x, mask).item() == pytest.approx(loss.item(), rel=1e-12)
    sim.reconstruct = lambda x, m: (real(x, m)[0] + noise * pixels, real(x, m)[1])
    assert sim(x, mask).item() != pytest.approx(loss.item(), rel=1e-3)
    assert sim.no_weight_decay() >= {"mask_token"}


def test_local_normalisation_matches_a_direct_computation():
    x = torch.randn(1, 2, 9, 11, dtype=torch.float64)
    out = local_normalize(x, 5)
    for c in range(2):
        for i in range(9):
            for j in range(11):
                patch = x[0, c, max(0, i - 2):i + 3, max(0, j - 2):j + 3].flatten()
                ref = (x[0, c, i, j] - patch.mean()) / (patch.var(unbiased=True) + 1e-6).sqrt()
                assert out[0, c, i, j].item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)


def test_gradients_reach_mask_token_encoder_and_decoder_at_a_non_square_size():
    sim = _model(norm=7)
    x = torch.randn(2, 3, 64, 96)
    mask = MaskGenerator((64, 96), 16).batch(2, torch.Generator().manual_seed(0))
    sim(x, mask).backward()
    for name in ("mask_token", "encoder.layers.0.blocks.0.attn.qkv.weight", "decoder.0.weight"):
        grad = dict(sim.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="does not match the token grid"):
        sim(x, mask[:, :8])


def test_encoder_with_a_head_is_refused():
    with pytest.raises(ValueError, match="num_classes=0"):
        SimMIM(swinv2.create_model("swinv2_debug"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_official_simmim_fixture(dtype, monkeypatch):
    config, state, extra = official_fixture("official_simmim_img64")
    args = config["official_encoder_args"]
    enc = swinv2.SwinTransformerV2(**args)
    sim = SimMIM(enc, norm_target_window=config["norm_target"]["patch_size"] if config["norm_target"]["enable"]
                 else None)
    notes = sim.load_pretrained(state)
    assert any("derived" in n for n in notes)
    sim = sim.to(dtype).eval()
    x, mask = extra["__input__"].to(dtype), extra["__mask__"]
    with torch.no_grad():
        enc_out = sim.encode(x, mask)
        loss = sim(x, mask)
    tol = 1e-10 if dtype == torch.float64 else 5e-5
    assert rel_err(enc_out.double(), extra["__encoder_out_f64__"]) < tol
    assert abs(loss.double().item() - extra["__loss_f64__"].item()) / extra["__loss_f64__"].item() < tol
    # the encoder alone loads the same checkpoint as a classifier backbone (decoder, token dropped)
    plain = swinv2.SwinTransformerV2(**args)
    report = swinv2.load_pretrained(plain, state)
    assert report.ok and any("mask token" in n for n in report.notes)
    assert math.isfinite(loss.item())
