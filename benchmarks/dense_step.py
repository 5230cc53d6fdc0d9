"""One Mask R-CNN training step at COCO's scale (800 x 1333), swinv2's SwinV2-T backbone beside
the peers that build the same detector: torchvision's ResNet-50 FPN Mask R-CNN, and timm's
SwinV2-T as the backbone of the same torchvision Mask R-CNN.

Each implementation runs in a fresh subprocess (so peak memory is its own): two warm-up steps,
then the median of ``--steps`` timed AdamW steps on a batch of synthetic images with objects;
peak memory is the process's maximum resident set (ru_maxrss). Writes a markdown report.

    python benchmarks/dense_step.py --out benchmarks
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

IMPLS = ("swinv2", "timm", "torchvision")
SIZE = (800, 1333)  # the COCO recipe's test scale: short side 800, long side at most 1333


def _targets(n: int, size: tuple[int, int], seed: int) -> tuple[list, list]:
    """``n`` images with three rectangles each (boxes, labels, masks), as a COCO batch."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    h, w = size
    for _ in range(n):
        images.append(torch.rand(3, h, w, generator=g))
        boxes = []
        masks = torch.zeros(3, h, w, dtype=torch.uint8)
        for k in range(3):
            x0, y0 = int(torch.randint(0, w // 2, (1,), generator=g)), int(torch.randint(0, h // 2, (1,), generator=g))
            x1, y1 = x0 + w // 4, y0 + h // 4
            boxes.append([x0, y0, x1, y1])
            masks[k, y0:y1, x0:x1] = 1
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor([1, 2, 3]),
                            masks=masks))
    return images, targets


class _TimmFPN(torch.nn.Module):
    """timm's SwinV2-T (window 16, features_only: NHWC maps) under torchvision's FPN."""

    def __init__(self):
        super().__init__()
        import timm
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = timm.create_model("swinv2_tiny_window16_256", features_only=True, img_size=(800, 1344),
                                      strict_img_size=False, drop_path_rate=0.2)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), 256, extra_blocks=LastLevelMaxPool())
        self.out_channels = 256  # what torchvision's detection heads read

    def forward(self, x):
        maps = {str(i): f.permute(0, 3, 1, 2).contiguous() for i, f in enumerate(self.body(x))}  # NHWC -> NCHW
        return self.fpn(maps)


def _build(impl: str):
    if impl == "swinv2":
        from swinv2.dense import Detector, SwinV2Backbone

        return Detector(SwinV2Backbone.from_variant("swinv2_tiny_window16_256", drop_path_rate=0.2), 80,
                        min_size=800, max_size=1333)
    if impl == "torchvision":
        from torchvision.models.detection import maskrcnn_resnet50_fpn

        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    from torchvision.models.detection import MaskRCNN

    return MaskRCNN(_TimmFPN(), num_classes=81, min_size=800, max_size=1333)


def run_one(impl: str, batch: int, steps: int, amp: str) -> dict:
    torch.manual_seed(0)
    model = _build(impl).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    images, targets = _targets(batch, SIZE, 0)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = sum(model(images, targets).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return dict(impl=impl, params_m=params / 1e6, median_s=statistics.median(times), times=times, peak_mib=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--amp", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)  # the subprocess
    parser.add_argument("--out", default="", help="folder for the dated report ('' to print only)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.steps, args.amp)))
        return
    rows = []
    for impl in args.impls:
        cmd = [sys.executable, __file__, "--one", impl, "--batch", str(args.batch), "--steps", str(args.steps),
               "--amp", args.amp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            rows.append(dict(impl=impl, error=proc.stderr.strip().splitlines()[-1]))
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ours = next((r for r in rows if r["impl"] == "swinv2" and "error" not in r), None)
    lines = [f"| {r['impl']} | {r['params_m']:.1f}M | {r['median_s']:.2f} s | "
             f"{(r['median_s'] / ours['median_s']) if ours else float('nan'):.2f}x | {r['peak_mib']:.0f} MiB |"
             if "error" not in r else f"| {r['impl']} | - | fails: {r['error'][:150]} | - | - |" for r in rows]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    report = "\n".join([
        f"# Mask R-CNN training step at {SIZE[0]}x{SIZE[1]} on a CPU ({time.strftime('%Y-%m-%d')})", "",
        f"Command: `python benchmarks/dense_step.py --batch {args.batch} --steps {args.steps} --amp {args.amp}`",
        f"Machine: {cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}.", "",
        "| implementation | parameters | median step | time / swinv2's | peak resident memory |",
        "|---|---|---|---|---|", *lines, ""])
    print(report)
    if args.out:
        path = Path(args.out) / f"{time.strftime('%Y-%m-%d')}-dense-step-cpu.md"
        path.write_text(report)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
