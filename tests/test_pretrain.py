"""SimMIM pre-training runs on the shared loop, and its checkpoints feed finetune and reconstruct."""

import json
from pathlib import Path

import torch

from swinv2.tasks import pretrain, supervised
from swinv2.train.config import TrainConfig

FAST = dict(model="swinv2_debug", img_size=32, window=4, batch_size=8, epochs=1, warmup_epochs=0.0, lr=1e-2,
            drop_path=0.0, mask_patch=16, mask_ratio=0.5, norm_target_window=7, amp="none", workers=0,
            progress=False, tensorboard=False, log_every=1, train_fraction=0.1, threads=1)


def test_pretrain_then_finetune_and_reconstruct(tmp_path, capsys):
    cfg = TrainConfig(command="pretrain", output=str(tmp_path / "pt"), max_steps=6, **FAST)
    assert pretrain.main(cfg) == 0
    run = Path(cfg.output)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 6 and all(0 < x < 10 for x in losses)
    assert (run / "reconstruction.png").stat().st_size > 0
    state = torch.load(run / "checkpoint-last.pt", weights_only=True)
    assert "mask_token" in state["model"] and "decoder.0.weight" in state["model"]

    # fine-tune at twice the size and window: pretrained windows come from the pre-training run
    ft = TrainConfig(command="finetune", checkpoint=str(run / "checkpoint-last.pt"), output=str(tmp_path / "ft"),
                     max_steps=2, layer_decay=0.8, **{**FAST, "img_size": 64, "window": 8, "mixup": 0.0,
                                                     "cutmix": 0.0})
    model, report = supervised.build_classifier(ft, 10)
    assert "mask token" in report and "decoder" in report
    assert [s.blocks[0].attn.pretrained_window_size for s in model.layers] == [(4, 4), (4, 4), (2, 2), (1, 1)]
    enc = state["model"]["encoder.layers.0.blocks.0.attn.qkv.weight"]
    assert torch.equal(model.layers[0].blocks[0].attn.qkv.weight, enc)
    assert supervised.main(ft) == 0

    img = tmp_path / "digit.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (255, 255, 255)).save(img)
    from swinv2.cli import main

    capsys.readouterr()
    assert main(["reconstruct", str(run / "checkpoint-last.pt"), str(img), "--output", str(tmp_path / "r.png")]) == 0
    assert "masked L1 loss" in capsys.readouterr().out and (tmp_path / "r.png").stat().st_size > 0
    assert main(["reconstruct", str(tmp_path / "ft" / "checkpoint-last.pt"), str(img)]) == 2  # not SimMIM
