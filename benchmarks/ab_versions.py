"""One checkout's swinv2 step time beside timm's, interleaved in one process; prints JSON medians.

Compares two versions of swinv2 fairly on a shared machine: run it once per checkout, e.g.
``PYTHONPATH=/path/to/old python benchmarks/ab_versions.py infer fp32 5`` and the same with the new
checkout, alternating, and compare each version's ratio to timm measured in the same process
(absolute times drift between processes; the ratio does not). Arguments: mode (infer or train),
dtype (fp32 or bf16), timed iterations. SwinV2-T, window 8, 256 px, batch 32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmV2

import swinv2


def stepper(model: torch.nn.Module, mode: str, dtype: str, x: torch.Tensor, y: torch.Tensor):
    """A function running one inference batch or one AdamW training step of ``model``."""

    def precision():
        return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), precision():
                model(x)

        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        with precision():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("infer", "train"))
    parser.add_argument("dtype", choices=("fp32", "bf16"))
    parser.add_argument("iters", type=int)
    args = parser.parse_args()
    torch.manual_seed(0)
    ours = swinv2.create_model("swinv2_tiny_window8_256", drop_path_rate=0.1)
    peer = TimmV2(img_size=256, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=8,
                  drop_path_rate=0.1)
    x, y = torch.randn(32, 3, 256, 256), torch.randint(0, 1000, (32,))
    steps = {"swinv2": stepper(ours, args.mode, args.dtype, x, y), "timm": stepper(peer, args.mode, args.dtype, x, y)}
    for step in steps.values():  # warm-up: allocator, oneDNN primitives, position-bias caches
        step()
        step()
    times = {k: [] for k in steps}
    for i in range(args.iters):
        for name in list(steps) if i % 2 == 0 else list(steps)[::-1]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}))


if __name__ == "__main__":
    main()
