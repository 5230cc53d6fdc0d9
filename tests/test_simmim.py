"""SimMIM: mask generation, the masked L1 loss against loop-based references, local target
normalisation, loading official pre-training checkpoints (fixture parity), pictures and the CLI."""

import math

import numpy as np
import pytest
import torch
from helpers import official_fixture, randomize_, rel_err

import swinv2
from swinv2.cli import build_parser
from swinv2.loading import StateDictMismatchError
from swinv2.reconstruct import load_simmim, save_reconstruction_grid
from swinv2.simmim import MaskGenerator, SimMIM, local_normalize, local_stats

FIXTURE = "official_simmim_img64"


def _sim(norm=None, seed=0, **encoder_kwargs) -> SimMIM:
    enc = swinv2.create_model("swinv2_debug", num_classes=0, **encoder_kwargs)
    return randomize_(SimMIM(enc, norm_target_window=norm), seed=seed).eval()  # eval: no stochastic depth


# -- masks ------------------------------------------------------------------------------


def test_mask_generator_rounding_grid_and_seed():
    gen = MaskGenerator(192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    m = gen(torch.Generator().manual_seed(0))
    assert m.shape == gen.grid == (48, 48) and m.dtype == torch.int64
    assert gen.count == 22  # ceil(36 * 0.6) = ceil(21.6): the official rounding, 61% hidden
    cells = m[::8, ::8]
    assert int(cells.sum()) == 22 and torch.equal(m, cells.repeat_interleave(8, 0).repeat_interleave(8, 1))
    assert torch.equal(m, gen(torch.Generator().manual_seed(0)))
    assert not torch.equal(m, gen(torch.Generator().manual_seed(1)))
    # a seeded generator is a reproducible stream of distinct masks
    a, b = MaskGenerator(192, seed=5).batch(4), MaskGenerator(192, seed=5).batch(4)
    assert a.shape == (4, 48, 48) and torch.equal(a, b) and not torch.equal(a[0], a[1])
    assert MaskGenerator(64, 16, mask_ratio=0.3).count == math.ceil(16 * 0.3) == 5


def test_mask_generator_non_square_and_errors():
    wide = MaskGenerator((64, 96), mask_patch_size=32, mask_ratio=0.5, seed=0)
    m = wide()
    assert m.shape == (16, 24) and wide.count == 3 and int(m.sum()) == 3 * 8 * 8
    assert MaskGenerator((32, 64), 32, mask_ratio=1.0)().all()
    with pytest.raises(ValueError, match="multiple of the mask patch"):
        MaskGenerator(100, 32)
    with pytest.raises(ValueError, match="multiple of the mask patch"):
        MaskGenerator((64, 80), 32)
    with pytest.raises(ValueError, match="model patch"):
        MaskGenerator(96, 32, model_patch_size=5)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskGenerator(96, 32, mask_ratio=0.0)


# -- the loss against references written out by hand -----------------------------------


def _naive_local_normalize(x: np.ndarray, window: int) -> np.ndarray:
    """Pixel by pixel: standardise by the unbiased statistics of the window cut at the border."""
    out, r = np.empty_like(x), window // 2
    B, C, H, W = x.shape
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    patch = x[b, c, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
                    out[b, c, i, j] = (x[b, c, i, j] - patch.mean()) / math.sqrt(patch.var(ddof=1) + 1e-6)
    return out


def _naive_loss(sim: SimMIM, x: torch.Tensor, mask: torch.Tensor) -> float:
    """The official recipe spelt out without SimMIM's code: token replacement in a loop, the
    decoder as an explicit per-location linear map, the loss summed pixel by pixel."""
    enc, p, s = sim.encoder, sim.patch_size, sim.stride
    with torch.no_grad():
        tokens = enc.patch_embed(x).clone()  # (B, h, w, C) after the patch norm
        for b, i, j in mask.nonzero().tolist():
            tokens[b, i, j] = sim.mask_token.view(-1)
        feats = enc.forward_tokens(enc.add_pos_embed(tokens))  # (B, h', w', F)
        conv = sim.decoder[0]
        C = sim.in_chans
        weight = conv.weight.view(C, s, s, -1)  # output channel c*s*s + u*s + v -> pixel (c, u, v) of a cell
        rec = torch.einsum("cuvf,bijf->bciujv", weight, feats) + conv.bias.view(C, s, s)[None, :, None, :, None, :]
        B, _, hh, _, ww, _ = rec.shape
        rec = rec.reshape(B, C, hh * s, ww * s).numpy()
    target = x.numpy() if sim.norm_target_window is None else _naive_local_normalize(x.numpy(), sim.norm_target_window)
    total, hidden = 0.0, 0
    m = mask.numpy()
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                if m[b, i // p, j // p]:
                    total += np.abs(target[b, :, i, j] - rec[b, :, i, j]).sum()
                    hidden += 1
    return total / hidden / C


@pytest.mark.parametrize("norm", [None, 5])
def test_loss_equals_a_loop_based_reference(norm):
    # every parameter random (norms, logit scales, position-bias MLP, mask token, decoder), with
    # an absolute position embedding so that the token replacement must come before it
    sim = _sim(norm=norm, seed=1, ape=True, img_size=64).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    mask = MaskGenerator(64, 16, mask_ratio=0.4).batch(2, g)
    with torch.no_grad():
        loss = sim(x, mask).item()
    assert loss == pytest.approx(_naive_loss(sim, x, mask), rel=1e-10)


def test_only_hidden_pixels_count():
    sim = _sim().double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    mask = MaskGenerator(64, 16).batch(2, g)
    pixels = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).double()  # (B, 1, H, W)
    noise = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    with torch.no_grad():
        base = sim(x, mask).item()
        for where, changes in ((1 - pixels, False), (pixels, True)):
            hook = sim.decoder.register_forward_hook(lambda mod, inp, out, w=where: out + noise * w)
            moved = sim(x, mask).item()
            hook.remove()
            assert (moved != pytest.approx(base, rel=1e-6)) if changes else moved == pytest.approx(base, rel=1e-13)
    # nothing hidden: the official 1e-5 in the denominator keeps the loss at 0
    assert sim(x, torch.zeros_like(mask)).item() == 0.0


def test_local_normalisation_matches_a_per_pixel_loop_and_inverts():
    x = torch.randn(1, 2, 9, 11, dtype=torch.float64)
    out = local_normalize(x, 5)
    assert np.allclose(out.numpy(), _naive_local_normalize(x.numpy(), 5), rtol=1e-9, atol=1e-12)
    mean, std = local_stats(x, 5)
    assert torch.allclose(out * std + mean, x, atol=1e-12)  # what the pictures use to show predictions
    with pytest.raises(ValueError, match="odd"):
        local_normalize(x, 4)


# -- training behaviour and errors --------------------------------------------------------


def test_gradients_reach_mask_token_encoder_and_decoder_at_a_non_square_size():
    sim = _sim(norm=7).train()
    x = torch.randn(2, 3, 64, 96)
    mask = MaskGenerator((64, 96), 16, seed=0).batch(2)
    sim(x, mask).backward()
    grads = {n: p.grad for n, p in sim.named_parameters()}
    for name in ("mask_token", "encoder.patch_embed.proj.weight", "encoder.layers.0.blocks.0.attn.qkv.weight",
                 "encoder.layers.3.blocks.1.attn.cpb_mlp.0.weight", "encoder.norm.weight", "decoder.0.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_sizes_that_do_not_divide_by_the_stride():
    sim = _sim()
    x = torch.randn(1, 3, 80, 48)  # token grid 20x12 -> final map 3x2 (padded merges): 96x64 predicted
    mask = MaskGenerator((80, 48), 16, seed=0).batch(1)
    rec, pixels = sim.reconstruct(x, mask)
    assert rec.shape == (1, 3, 80, 48) and pixels.shape == (1, 1, 80, 48)
    assert math.isfinite(sim(x, mask).item())


def test_errors_and_weight_decay_names():
    sim = _sim()
    x = torch.randn(2, 3, 64, 64)
    mask = MaskGenerator(64, 16, seed=0).batch(2)
    with pytest.raises(ValueError, match="does not match the token grid"):
        sim(x, mask[:, :8])
    with pytest.raises(ValueError, match="bool or integer"):
        sim(x, mask.float())
    with pytest.raises(ValueError, match="num_classes=0"):
        SimMIM(swinv2.create_model("swinv2_debug"))
    with pytest.raises(ValueError, match="in_chans"):
        SimMIM(swinv2.create_model("swinv2_debug", num_classes=0), in_chans=1)
    names = dict(sim.named_parameters())
    nwd = sim.no_weight_decay()
    assert "mask_token" in nwd and nwd <= set(names)
    assert "encoder.layers.0.blocks.0.attn.logit_scale" in nwd
    assert sim.stride == 32 and sim.decoder[0].out_channels == 32 * 32 * 3


# -- official checkpoints -----------------------------------------------------------------


def _fixture_sim():
    config, state, extra = official_fixture(FIXTURE)
    norm = config["norm_target"]["patch_size"] if config["norm_target"]["enable"] else None
    return SimMIM(swinv2.SwinTransformerV2(**config["official_encoder_args"]), norm_target_window=norm), \
        config, state, extra


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 5e-5)])
def test_official_simmim_fixture(dtype, tol, tmp_path):
    sim, config, state, extra = _fixture_sim()
    path = tmp_path / "simmim.pth"
    torch.save({"model": state, "epoch": 3}, path)  # the official file layout
    report = swinv2.load_pretrained(sim, path)
    assert report.ok and report.dropped and {"mask_token", "decoder.0.weight"} <= set(report.loaded), report
    sim = sim.to(dtype).eval()
    x, mask = extra["__input__"].to(dtype), extra["__mask__"]
    with torch.no_grad():
        enc_out, loss = sim.encode(x, mask), sim(x, mask)
    ref = extra["__loss_f64__"].item()
    assert rel_err(enc_out, extra["__encoder_out_f64__"]) < tol
    assert abs(loss.item() - ref) / ref < tol


def test_simmim_state_dicts_round_trip_and_feed_a_plain_encoder():
    sim, config, state, extra = _fixture_sim()
    swinv2.load_pretrained(sim, state)
    x, mask = extra["__input__"], extra["__mask__"]
    copy = SimMIM(swinv2.SwinTransformerV2(**config["official_encoder_args"]), norm_target_window=None)
    assert swinv2.load_pretrained(copy, {"model": sim.state_dict()}).ok
    with torch.no_grad():
        assert sim.eval()(x, mask).item() == copy.eval()(x, mask).item()
    # the encoder alone, as a fine-tuning backbone: the mask token and decoder are left out, with a note
    for source in (state, sim.state_dict()):
        plain = swinv2.SwinTransformerV2(**config["official_encoder_args"])
        report = swinv2.load_pretrained(plain, source)
        assert report.ok and any("mask token" in n for n in report.notes) and len(report.discarded) == 3


def test_a_checkpoint_that_does_not_fit_is_refused_whole():
    sim, _, state, _ = _fixture_sim()
    before = {k: v.clone() for k, v in sim.state_dict().items()}
    no_decoder = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    with pytest.raises(StateDictMismatchError, match="decoder.0.weight"):
        swinv2.load_pretrained(sim, no_decoder)
    bad_encoder = dict(state, **{"encoder.norm.weight": torch.zeros(7)})
    with pytest.raises(StateDictMismatchError, match="norm.weight"):
        swinv2.load_pretrained(sim, bad_encoder)
    assert all(torch.equal(v, before[k]) for k, v in sim.state_dict().items())  # nothing was loaded
    report = swinv2.load_pretrained(sim, no_decoder, strict=False)
    assert report.missing == ["decoder.0.bias", "decoder.0.weight"]


# -- pictures and the command -------------------------------------------------------------


def test_reconstruction_grid_png(tmp_path):
    import matplotlib.image as mpimg

    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 64, generator=g)
    masks = MaskGenerator(64, 16, seed=0).batch(3)
    out = save_reconstruction_grid(images, masks, local_normalize(images, 7), tmp_path / "grid.png",
                                   norm_target_window=7)
    picture = mpimg.imread(out)
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 400  # 3 rows x 4 columns
    gray = torch.randn(2, 1, 32, 48, generator=g)
    save_reconstruction_grid(gray, MaskGenerator((32, 48), 16, seed=1).batch(2), gray, tmp_path / "g.png",
                             mean=(0.5,), std=(0.5,))
    assert mpimg.imread(tmp_path / "g.png").ndim == 3
    with pytest.raises(ValueError, match="do not fit"):
        save_reconstruction_grid(images, masks[:, :5], images, tmp_path / "x.png")


def _images(tmp_path, n=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (50 + 10 * i, 70, 3), dtype=np.uint8)).save(paths[-1])
    return [str(p) for p in paths]


def _run_cli(argv):
    args = build_parser().parse_args(["reconstruct", *argv])
    return args.func(args)


def test_reconstruct_command_on_an_own_and_an_official_checkpoint(tmp_path, capsys):
    sim = _sim(norm=7)
    own = tmp_path / "checkpoint-last.pt"
    torch.save({"model": sim.state_dict(), "model_config": sim.encoder.config,
                "config": {"model": "swinv2_debug", "img_size": 64, "mask_patch": 16, "mask_ratio": 0.5,
                           "norm_target_window": 7}}, own)
    loaded, settings = load_simmim(own)
    assert settings == dict(img_size=64, mask_patch=16, mask_ratio=0.5, norm_target_window=7, model="swinv2_debug")
    assert all(torch.equal(v, sim.state_dict()[k]) for k, v in loaded.state_dict().items())
    images = _images(tmp_path)
    assert _run_cli([str(own), *images, "--output", str(tmp_path / "own.png"), "--seed", "3"]) == 0
    assert (tmp_path / "own.png").stat().st_size > 0 and "masked L1 loss" in capsys.readouterr().out

    _, state, _ = official_fixture(FIXTURE)[0:3]
    official = tmp_path / "official.pth"
    torch.save({"model": state}, official)
    with pytest.raises(ValueError, match="--model"):
        _run_cli([str(official), *images])
    argv = [str(official), *images, "--model", "swinv2_debug", "--norm-target-window", "none",
            "--output", str(tmp_path / "official.png"), "--mask-patch", "16"]
    assert _run_cli(argv) == 0 and (tmp_path / "official.png").exists()
    assert load_simmim(official, model="swinv2_debug")[0].encoder.window_size == (4, 4)  # from the buffers
    with pytest.raises(ValueError, match="no SimMIM decoder"):
        bare = tmp_path / "encoder.pth"
        torch.save({k: v for k, v in state.items() if not k.startswith("decoder.")}, bare)
        load_simmim(bare, model="swinv2_debug")
