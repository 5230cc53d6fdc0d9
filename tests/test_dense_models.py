"""Dense-prediction models: the backbone adapter against forward_intermediates + its norms,
freezing and window enlargement, torchvision Mask R-CNN / Faster R-CNN on the backbone, UPerNet
and the FCN head against transformers' implementation, layer ids for layer-wise decay, and
sliding / multi-scale inference against loops written out by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN

import swinv2
from swinv2.dense import (
    Detector,
    FCNHead,
    Segmenter,
    SwinV2Backbone,
    UPerHead,
    multiscale_inference,
    slide_inference,
    state_dict_from_transformers,
)
from swinv2.train.optim import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int = 0, **kwargs) -> swinv2.SwinTransformerV2:
    return randomize_(swinv2.create_model("swinv2_debug", num_classes=0, **kwargs), seed=seed)


def _randomize_norms_(norms: nn.ModuleList, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=gen))
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=gen))


# -- backbone ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, -1)])
def test_backbone_maps_are_intermediates_then_output_norms(out_indices):
    net = _net()
    reference = copy.deepcopy(net).eval()
    final = (net.norm.weight.detach().clone(), net.norm.bias.detach().clone())
    backbone = SwinV2Backbone(net, out_indices=out_indices).eval()
    assert backbone.body is net and isinstance(net.norm, nn.Identity) and isinstance(net.head, nn.Identity)
    # the classifier's (randomised) final norm starts the last stage's output norm
    assert torch.equal(backbone.norms[-1].weight, final[0]) and torch.equal(backbone.norms[-1].bias, final[1])
    _randomize_norms_(backbone.norms, seed=1)
    stages = [i % 4 for i in out_indices]
    runs = {i: 0 for i in range(4)}
    for i, stage in enumerate(net.layers):
        stage.blocks[0].register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))

    x = torch.randn(2, 3, 96, 160)  # stage maps 24x40 .. 3x5: not multiples of the window 4
    with torch.no_grad():
        maps = backbone(x)
        want = reference.forward_intermediates(x, indices=stages, output_fmt="NHWC", intermediates_only=True)
    assert list(maps) == [str(j) for j in range(len(stages))]
    assert runs == {i: int(i <= max(stages)) for i in range(4)}  # one pass, nothing after the last output
    for j, (stage, m) in enumerate(zip(stages, want)):
        norm = backbone.norms[j]
        ref = F.layer_norm(m, m.shape[-1:], norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
        assert maps[str(j)].shape == (2, 32 * 2**stage, 96 // (4 * 2**stage), 160 // (4 * 2**stage))
        assert maps[str(j)].is_contiguous()
        torch.testing.assert_close(maps[str(j)], ref, rtol=1e-5, atol=1e-5)
    assert backbone.out_channels == [32 * 2**s for s in stages] and backbone.strides == [4 * 2**s for s in stages]


def test_backbone_rejects_bad_arguments():
    with pytest.raises(ValueError, match="frozen_stages"):
        SwinV2Backbone(_net(), frozen_stages=5)
    with pytest.raises(ValueError, match="frozen_stages"):
        SwinV2Backbone(_net(), frozen_stages=-2)
    with pytest.raises(ValueError, match="out_indices"):
        SwinV2Backbone(_net(), out_indices=(0, 4))
    with pytest.raises(ValueError, match="increasing"):
        SwinV2Backbone(_net(), out_indices=(2, 1))
    with pytest.raises(TypeError, match="SwinTransformerV2"):
        SwinV2Backbone(nn.Linear(2, 2))


def test_frozen_stages_get_no_gradient_and_stay_in_eval():
    backbone = SwinV2Backbone(_net(ape=True), frozen_stages=2)
    _randomize_norms_(backbone.norms, seed=2)
    backbone.train()
    body = backbone.body
    frozen = [body.patch_embed, body.layers[0], body.layers[1], backbone.norms[0], backbone.norms[1]]
    live = [body.layers[2], body.layers[3], backbone.norms[2], backbone.norms[3]]
    assert all(not m.training for f in frozen for m in f.modules())
    assert all(m.training for f in live for m in f.modules())
    assert not body.absolute_pos_embed.requires_grad
    sum(m.square().mean() for m in backbone(torch.randn(2, 3, 64, 64)).values()).backward()
    for module in frozen:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    for module in live:
        assert all(p.grad is not None for p in module.parameters())
        assert any(p.grad.abs().sum() > 0 for p in module.parameters())
    # the optimizer sees only what trains
    groups = param_groups(backbone, 0.05)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in backbone.parameters())


def test_set_window_enlarges_the_window_with_the_same_weights():
    backbone = SwinV2Backbone(_net()).eval()
    _randomize_norms_(backbone.norms, seed=3)
    x = torch.randn(1, 3, 128, 128)  # stage 0 is 32x32: room for an 8x8 window
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    with torch.no_grad():
        before = backbone(x)
        backbone.set_window(8)
        after = backbone(x)
    assert backbone.body.window_size == (8, 8)
    assert not torch.allclose(before["0"], after["0"], atol=1e-3)
    assert state.keys() == backbone.state_dict().keys()
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        backbone.set_window(4)
        again = backbone(x)
    torch.testing.assert_close(again["0"], before["0"], rtol=0, atol=0)


# -- detection --------------------------------------------------------------------------------------


def _targets(sizes, masks: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for (h, w), boxes in zip(sizes, ([[4, 6, 40, 50]], [[10, 8, 30, 28], [2, 30, 60, 66]])):
        t = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.randint(1, 4, (len(boxes),),
                                                                                          generator=gen)}
        if masks:
            m = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes):
                m[k, y1:y2, x1:x2] = 1
            t["masks"] = m
        out.append(t)
    return out


@pytest.mark.parametrize("masks", [True, False])
def test_detector_trains_and_predicts(masks):
    backbone = SwinV2Backbone(_net(drop_path_rate=0.0))
    _randomize_norms_(backbone.norms, seed=4)
    det = Detector(backbone, num_classes=3, masks=masks, min_size=64, max_size=128, box_score_thresh=0.0,
                   rpn_batch_size_per_image=32, box_batch_size_per_image=16)
    assert isinstance(det.model, MaskRCNN if masks else FasterRCNN)
    assert det.backbone is backbone and det.encoder is backbone.body
    assert det.model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    sizes = [(64, 80), (72, 64)]
    images = [torch.rand(3, *s) for s in sizes]
    torch.manual_seed(0)
    det.train()
    losses = det(images, _targets(sizes, masks))
    want = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} | ({"loss_mask"} if masks
                                                                                          else set())
    assert set(losses) == want and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, p in backbone.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2
    for o, (h, w) in zip(out, sizes):
        n = len(o["boxes"])
        assert n > 0 and o["boxes"].shape == (n, 4) and o["scores"].shape == o["labels"].shape == (n,)
        assert ((o["labels"] >= 1) & (o["labels"] <= 3)).all()
        assert (o["boxes"][:, 0::2] <= w).all() and (o["boxes"][:, 1::2] <= h).all() and (o["boxes"] >= 0).all()
        if masks:
            assert o["masks"].shape == (n, 1, h, w) and 0 <= o["masks"].min() and o["masks"].max() <= 1
        else:
            assert "masks" not in o


def test_detector_sizes_and_errors():
    det = Detector(SwinV2Backbone(_net()), num_classes=2, min_size=(48, 64), max_size=100)
    det.eval()
    images = [torch.rand(3, 40, 60)]
    assert det.model.transform(images)[0].image_sizes == [(64, 96)]  # evaluation: the last min_size
    assert det.model.transform(images)[0].tensors.shape[-2:] == (64, 96)  # padded to 32
    det.set_sizes(32)
    assert det.model.transform(images)[0].image_sizes == [(32, 48)] and det.model.transform.max_size == 100
    det.set_sizes(64, 80)  # the long side caps the scale: 60 * 80/60
    assert det.model.transform(images)[0].image_sizes == [(53, 80)]
    with pytest.raises(ValueError, match="num_classes"):
        Detector(SwinV2Backbone(_net()), num_classes=0)
    with pytest.raises(ValueError, match="size_divisible"):
        Detector(SwinV2Backbone(_net()), num_classes=2, size_divisible=30)
    with pytest.raises(ValueError, match="min_size"):
        det.set_sizes((64, -1))
    with pytest.raises(TypeError, match="list"):
        det(torch.rand(1, 3, 64, 64))


# -- segmentation -----------------------------------------------------------------------------------


def _segmenter(**kwargs) -> Segmenter:
    seg = Segmenter(SwinV2Backbone(_net(drop_path_rate=0.0)), num_classes=5, channels=32, aux_channels=16, **kwargs)
    _randomize_norms_(seg.backbone.norms, seed=5)
    return seg


def test_segmenter_trains_and_ignores_255():
    seg = _segmenter()
    x = torch.randn(2, 3, 64, 96)
    masks = torch.randint(0, 5, (2, 64, 96))
    masks[0, :10] = 255
    seg.train()
    losses = seg.loss(x, masks)
    assert set(losses) == {"loss", "loss_main", "loss_aux"}
    torch.testing.assert_close(losses["loss"], losses["loss_main"] + 0.4 * losses["loss_aux"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in seg.parameters())

    seg.eval()  # one labelled pixel: each loss is that pixel's cross-entropy
    single = torch.full_like(masks, 255)
    single[1, 10, 17] = 3
    with torch.no_grad():
        losses = seg.loss(x, single)
        logits = seg(x)
        aux = seg.auxiliary_head(list(seg.backbone(x).values())[2])
        aux = F.interpolate(aux, size=(64, 96), mode="bilinear", align_corners=False)
    assert logits.shape == (2, 5, 64, 96)
    label = torch.tensor([3])
    main = F.cross_entropy(logits[1:2, :, 10, 17], label)
    extra = F.cross_entropy(aux[1:2, :, 10, 17], label)
    torch.testing.assert_close(losses["loss_main"], main)
    torch.testing.assert_close(losses["loss_aux"], extra)
    torch.testing.assert_close(losses["loss"], main + 0.4 * extra)
    assert seg.loss(x, torch.full_like(masks, 255))["loss"] == 0  # nothing labelled: 0, not 0/0


def test_segmenter_without_aux_odd_sizes_and_errors():
    seg = _segmenter(aux_weight=0.0).eval()
    assert seg.auxiliary_head is None
    x = torch.randn(1, 3, 66, 98)  # not multiples of the patch: padded for the backbone, cut from the logits
    masks = torch.randint(0, 5, (1, 66, 98))
    with torch.no_grad():
        logits = seg(x)
        padded = seg(F.pad(x, (0, 2, 0, 2)))
        losses = seg.loss(x, masks)
    assert logits.shape == (1, 5, 66, 98)
    torch.testing.assert_close(logits, padded[..., :66, :98])
    assert set(losses) == {"loss", "loss_main"}
    torch.testing.assert_close(losses["loss"], F.cross_entropy(logits, masks))
    with pytest.raises(ValueError, match="label 7"):
        seg.loss(x, torch.full_like(masks, 7))
    with pytest.raises(TypeError, match="integer"):
        seg.loss(x, masks.float())
    with pytest.raises(ValueError, match="do not match"):
        seg.loss(x, masks[:, :64])
    with pytest.raises(ValueError, match="aux_index"):
        Segmenter(SwinV2Backbone(_net(), out_indices=(2, 3)), num_classes=5, aux_index=2)


def _randomize_head_(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            r = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5)
            elif t.ndim == 4:  # conv weights scaled by fan-in: activations stay O(1) through the head
                t.copy_(r / t[0].numel() ** 0.5)
            else:  # BatchNorm weights, biases, running means, conv biases
                t.copy_(1 + 0.3 * r if name.endswith("norm.weight") or name.endswith("bn.weight") else 0.3 * r)


@pytest.mark.parametrize("num_convs,concat", [(1, False), (2, True)])
def test_heads_match_transformers_upernet(num_convs, concat):
    transformers = pytest.importorskip("transformers")
    upernet = transformers.models.upernet.modeling_upernet
    in_channels, channels, aux_channels, classes = [8, 16, 32, 64], 16, 8, 5
    config = transformers.UperNetConfig(hidden_size=channels, num_labels=classes, pool_scales=[1, 2, 3, 6],
                           auxiliary_channels=aux_channels, auxiliary_num_convs=num_convs,
                           auxiliary_concat_input=concat)
    theirs = upernet.UperNetHead(config, in_channels=in_channels).double().eval()
    theirs_aux = upernet.UperNetFCNHead(config, in_channels=in_channels, in_index=2).double().eval()
    _randomize_head_(theirs, seed=6)
    _randomize_head_(theirs_aux, seed=7)
    ours = UPerHead(in_channels, channels, num_classes=classes).double().eval()
    ours_aux = FCNHead(32, aux_channels, num_classes=classes, num_convs=num_convs, concat_input=concat).double().eval()
    ours.load_state_dict(state_dict_from_transformers(theirs.state_dict()))
    ours_aux.load_state_dict(state_dict_from_transformers(theirs_aux.state_dict()))

    gen = torch.Generator().manual_seed(8)
    maps = [torch.randn(2, c, h, w, generator=gen, dtype=torch.float64)
            for c, (h, w) in zip(in_channels, [(24, 40), (12, 20), (6, 10), (3, 5)])]
    with torch.no_grad():
        out, want = ours(maps), theirs(maps)
        out_aux, want_aux = ours_aux(maps[2]), theirs_aux(maps)
    assert out.shape == (2, classes, 24, 40) and out_aux.shape == (2, classes, 6, 10)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(out_aux, want_aux, rtol=0, atol=1e-10)
    # the same renaming under a full model's prefixes
    full = {f"decode_head.{k}": v for k, v in theirs.state_dict().items()}
    assert set(state_dict_from_transformers(full)) == {f"decode_head.{k}" for k in ours.state_dict()}


# -- layer ids and the optimizer --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["detector", "segmenter"])
def test_layer_ids_follow_stages_and_heads_get_the_top(kind):
    backbone = SwinV2Backbone(_net())
    model = Detector(backbone, num_classes=2, min_size=64, max_size=64) if kind == "detector" else \
        Segmenter(backbone, num_classes=3, channels=16, aux_channels=8)
    prefix = "model.backbone.body." if kind == "detector" else "backbone."
    top = model.num_layer_ids - 1
    assert top == sum(backbone.body.depths) + 1 == 9
    by_stage: dict[int, set[int]] = {}
    for name, _ in model.named_parameters():
        lid = model.layer_id(name)
        if not name.startswith(prefix):
            assert lid == top, name
            continue
        rest = name[len(prefix):]
        if rest.startswith("body.patch_embed"):
            assert lid == 0
        elif rest.startswith("body.layers."):
            parts = rest.split(".")
            by_stage.setdefault(int(parts[2]), set()).add(lid)
            if parts[3] == "blocks":
                assert lid == 2 * int(parts[2]) + int(parts[4]) + 1, name  # every stage of the debug net has 2
        elif rest.startswith("norms."):
            assert lid == 2 * (int(rest.split(".")[1]) + 1), name  # the last block of its stage
    stages = sorted(by_stage)
    assert stages == [0, 1, 2, 3]
    assert all(max(by_stage[a]) <= min(by_stage[b]) for a, b in zip(stages, stages[1:]))

    groups = param_groups(model, 0.05, 0.9)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    head = next(n for n in names if not n.startswith(prefix))
    assert scale[head] == 1.0
    assert scale[f"{prefix}body.patch_embed.proj.weight"] == pytest.approx(0.9**top)
    assert decay[f"{prefix}body.layers.0.blocks.0.attn.cpb_mlp.0.weight"] == 0.0  # named exemption
    assert decay[f"{prefix}body.layers.0.blocks.0.attn.qkv.weight"] == 0.05


# -- sliding and multi-scale inference --------------------------------------------------------------


class _Ramp(nn.Module):
    """A toy segmenter that is neither translation- nor flip-equivariant: a 1x1 conv plus a
    ramp over the input's own coordinates, steeper for each class (so a softmax sees it)."""

    def __init__(self, ramp: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.ramp, self.sizes = ramp, []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        h, w = x.shape[-2:]
        pos = torch.arange(h).view(h, 1) * 0.3 + torch.arange(w).view(1, w)
        return self.conv(x) + self.ramp * torch.arange(4).view(4, 1, 1) * pos


def _starts(length: int, crop: int, stride: int) -> list[int]:
    starts = list(range(0, max(length - crop, 0) + 1, stride))
    return starts + [length - crop] if starts[-1] + crop < length else starts


def _slide_by_hand(model, x, crop, stride):
    (H, W), total, count = x.shape[-2:], 0, torch.zeros(x.shape[-2:])
    for y in _starts(H, crop, stride):
        for x0 in _starts(W, crop, stride):
            window = x[:, :, y : y + crop, x0 : x0 + crop]
            h, w = window.shape[-2:]
            out = model(F.pad(window, (0, crop - w, 0, crop - h)))[:, :, :h, :w]
            total = total + F.pad(out, (x0, W - x0 - w, y, H - y - h))
            count[y : y + h, x0 : x0 + w] += 1
    assert (count > 0).all()
    return total / count


@pytest.mark.parametrize("size", [(50, 77), (72, 72), (20, 25)])
def test_slide_inference(size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    conv = _Ramp(ramp=0.0)  # position-free: sliding must give the whole-image logits
    torch.testing.assert_close(slide_inference(conv, x, crop=32, stride=20), conv(x), rtol=1e-5, atol=1e-5)
    ramp = _Ramp()
    got = slide_inference(ramp, x, crop=32, stride=20)
    torch.testing.assert_close(got, _slide_by_hand(ramp, x, 32, 20), rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 4, *size) and torch.isfinite(got).all()
    assert all(s == (32, 32) for s in ramp.sizes)  # small images are padded up to the crop
    with pytest.raises(ValueError, match="stride"):
        slide_inference(ramp, x, crop=16, stride=20)


def test_multiscale_inference_scales_and_flips():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 40, 60)
    conv, ramp = _Ramp(ramp=0.0), _Ramp()
    with torch.no_grad():
        # a flip-equivariant model: flipping changes nothing
        torch.testing.assert_close(multiscale_inference(conv, x, flip=True), conv(x).softmax(1))
        flipped = (ramp(x).softmax(1) + ramp(x.flip(-1)).flip(-1).softmax(1)) / 2
        torch.testing.assert_close(multiscale_inference(ramp, x, flip=True), flipped)
        assert not torch.allclose(multiscale_inference(ramp, x), flipped, atol=1e-3)

        ramp.sizes.clear()
        got = multiscale_inference(ramp, x, scales=(0.5, 1.0), base_size=32)
        assert ramp.sizes == [(16, 24), (32, 48)]  # short side base_size * scale, aspect kept
        resize = lambda t, size: F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        want = sum(resize(ramp(resize(x, s)), (40, 60)).softmax(1) for s in [(16, 24), (32, 48)]) / 2
        torch.testing.assert_close(got, want)
        slid = multiscale_inference(ramp, x, crop=32, stride=16)
        torch.testing.assert_close(slid, slide_inference(ramp, x, crop=32, stride=16).softmax(1))

    seg = _segmenter().eval()
    probs = multiscale_inference(seg, torch.randn(1, 3, 48, 72), scales=(0.75, 1.0), flip=True, base_size=64,
                                 crop=64, stride=48)
    assert probs.shape == (1, 5, 48, 72)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 48, 72))
    with pytest.raises(ValueError, match="scales"):
        multiscale_inference(seg, x, scales=(0.0,))
