"""Accelerator readiness of swinv2 in one run: parity, reduced-precision training, memory, speed.

    bash scripts/gpu_check.sh                 # on a CUDA machine: under 8 minutes on one GPU
    bash scripts/gpu_check.sh --device cpu    # the same checks, small, on the CPU (what CI runs)

1. Parity: the official reference outputs (tests/fixtures/official) reproduced on the device,
   and a SwinV2 with every parameter randomised (shifted, padded and global windows) on the
   device in float32, bfloat16 and float16 autocast, outputs and gradients, against the same
   model in float64 on the CPU.
2. Training steps: a few AdamW updates of that model on a fixed batch with bfloat16 autocast
   and with float16 autocast plus a GradScaler; each loss must be finite and the last below the
   first; the peak memory of a step (CUDA).
3. Peak memory of a training step, swinv2 beside timm's SwinV2 at the same configuration (CUDA).
4. Speed: swinv2 beside timm, interleaved, with medians and ratios (swinv2.bench).

The exit status is 1 when a parity or training check fails, 0 otherwise; ``--json`` writes
every number to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import swinv2
from swinv2 import bench

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "official"

# Largest relative error ||out - ref|| / ||ref|| allowed in float32 against the float64 model.
TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def randomize_(model: torch.nn.Module, seed: int = 0, mild: bool = False) -> torch.nn.Module:
    """Every parameter random, so that every path matters (a fresh model's zeroed branch norms
    make its blocks identities): norms 1 +- 0.2, logit scales around ln 10 with one head past
    the ln 100 clamp, the position-bias MLP's input layer wide, the rest small. ``mild``: logit
    scales ln 10 +- 0.3 and none at the clamp, for the reduced-precision checks (cosine logits
    times 100 amplify the rounding of q and k past what any comparison can read)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            parent = name.rsplit(".", 2)[-2] if "." in name else ""
            if name.endswith("logit_scale") and mild:
                v = math.log(10) + 0.3 * r.clamp(-1, 1)
            elif name.endswith("logit_scale"):
                v = math.log(10) + 1.5 * r.clamp(-1, 1)
                v.view(-1)[0] = math.log(100) + 0.7
            elif "norm" in parent:
                v = (1 + 0.2 * r) if name.endswith("weight") else 0.1 * r
            elif "cpb_mlp.0" in name:
                v = 0.5 * r
            else:
                v = 0.05 * r
            p.copy_(v.to(p.dtype))
    return model


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Checks:
    def __init__(self):
        self.results: dict = {}
        self.failed: list[str] = []

    def record(self, section: str, name: str, value, limit=None, below: bool = True) -> None:
        ok = limit is None or (value < limit if below else value > limit)
        if isinstance(value, float) and not math.isfinite(value):
            ok = False
        self.results.setdefault(section, {})[name] = value
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        bound = "" if limit is None else f" ({'<' if below else '>'} {limit:g})"
        print(f"  {name:<52} {shown}{bound}{'' if ok else '  FAILED'}")
        if not ok:
            self.failed.append(f"{section}: {name}")


def check_official(device: torch.device, checks: Checks) -> None:
    print("official reference outputs, reproduced on the device")
    for name in ("official_tiny_w4_img64", "official_w8_from_pretrained_w4_img64"):
        config = json.loads((FIXTURES / f"{name}.json").read_text())
        tensors = load_file(FIXTURES / f"{name}.safetensors")
        extras = {k: tensors.pop(k) for k in list(tensors) if k.startswith("__")}
        model = swinv2.SwinTransformerV2(**config["official_constructor_args"]).eval()
        swinv2.load_pretrained(model, tensors)
        with torch.no_grad():
            logits = model.to(device)(extras["__input__"].to(device))
        checks.record("official", f"{name} float32 logits vs float64", rel_err(logits, extras["__logits_f64__"]),
                      TOLERANCE)


def check_parity(model_name: str, size: tuple[int, int], batch: int, device: torch.device, checks: Checks,
                 dtypes=(torch.float32,), mild: bool = False) -> None:
    """Errors against the float64 model on the CPU. float32 is held to fixed bounds; in bfloat16
    and float16 the model's own path is held to the explicit step-by-step computation of the
    official code run on the same device in the same dtype: at most 3 times its error."""
    print(f"{model_name} at {size[0]}x{size[1]}, every parameter random{' (mild logit scales)' if mild else ''}, "
          "against float64 on the CPU")
    model = swinv2.create_model(model_name, num_classes=10, img_size=size, drop_path_rate=0.0)
    model = randomize_(model, seed=1, mild=mild)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(2))
    ref_model = model.double().eval()
    x64 = x.double().requires_grad_()
    ref = ref_model(x64)
    ref.square().sum().backward()
    ref_grads = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
    ref_x_grad = x64.grad.clone()
    model = model.float().to(device)

    def errors(dtype, fused: bool) -> dict[str, float]:
        model.set_fused_attn(fused)
        model.zero_grad()
        xd = x.to(device).requires_grad_()
        with _autocast(device, dtype):
            out = model.train()(xd)
        out.float().square().sum().backward()
        grads = torch.cat([p.grad.flatten().cpu().double() for p in model.parameters()])
        with torch.no_grad(), _autocast(device, dtype):
            infer = model.eval()(x.to(device))
        return {"logits": rel_err(out, ref), "parameter gradients": rel_err(grads, ref_grads),
                "input gradient": rel_err(xd.grad, ref_x_grad), "inference logits": rel_err(infer, ref)}

    for dtype in dtypes:
        label = str(dtype).removeprefix("torch.")
        got = errors(dtype, fused=True)
        if dtype == torch.float32:
            for what, err in got.items():
                checks.record("parity", f"{label} {what}", err, TOLERANCE if "logits" in what else GRAD_TOLERANCE)
            continue
        reference = errors(dtype, fused=False)
        for what, err in got.items():
            checks.record("parity", f"{label} {what} (explicit path: {reference[what]:.3g})", err,
                          max(3 * reference[what], 1e-3))
    model.set_fused_attn(True)


def check_training(model_name: str, size: tuple[int, int], batch: int, steps: int, device: torch.device,
                   checks: Checks) -> None:
    print(f"training steps: {model_name} at {size[0]}x{size[1]}, batch {batch}, {steps} AdamW updates")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, *size, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    for dtype in (torch.bfloat16, torch.float16):
        label = str(dtype).removeprefix("torch.")
        if device.type == "cpu" and dtype == torch.float16:
            continue
        torch.manual_seed(0)
        model = swinv2.create_model(model_name, num_classes=10, img_size=size).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        losses = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype):
                loss = F.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt)
            scaler.update()
            losses.append(loss.detach())
        _sync(device)
        elapsed = time.perf_counter() - t0
        losses = [float(v) for v in losses]
        finite = all(math.isfinite(v) for v in losses)
        checks.record("training", f"{label}: first loss", losses[0])
        checks.record("training", f"{label}: last loss / first loss", losses[-1] / losses[0] if finite else math.nan,
                      1.0)
        checks.record("training", f"{label}: seconds per step", elapsed / steps)
        if dtype == torch.float16:
            checks.record("training", "float16: final loss scale", float(scaler.get_scale()))
        if device.type == "cuda":
            checks.record("training", f"{label}: peak memory (MiB)", torch.cuda.max_memory_allocated(device) / 2**20)
        del model, opt


def check_memory(case: bench.Case, checks: Checks) -> None:
    print(f"peak memory of one step: {case.label()}")
    peaks = {}
    for impl in ("swinv2", "timm"):
        try:
            peaks[impl] = bench.peak_memory_here(case, impl) / 2**20
        except ImportError as err:
            print(f"  {impl}: skipped ({err})")
            continue
        torch.cuda.empty_cache()
        checks.record("memory", f"{impl} (MiB above the model and optimizer state)", peaks[impl])
    if len(peaks) == 2:
        checks.record("memory", "swinv2 / timm", peaks["swinv2"] / peaks["timm"])


def check_speed(cases: list[bench.Case], rounds: int, checks: Checks) -> None:
    for case in cases:
        print(f"speed: {case.label()}, {rounds} interleaved rounds")
        run = bench.run_speed(case, impls=("swinv2", "timm"), rounds=rounds, warmup=2, log=lambda *_: None,
                              rate_n=1024)
        res = run["results"]
        for impl, r in res.items():
            checks.record("speed", f"{case.dtype} {case.mode}: {impl} median ms", r["median_s"] * 1e3)
        if "timm" in res and "swinv2" in res:
            checks.record("speed", f"{case.dtype} {case.mode}: timm / swinv2 time",
                          res["timm"]["median_s"] / res["swinv2"]["median_s"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args(argv)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here (use --device cpu)", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # parity is measured in true float32
        torch.backends.cudnn.allow_tf32 = False
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"device: CPU, torch {torch.__version__} (CUDA-only checks skipped: peak memory, speed)")
    checks = Checks()
    t0 = time.perf_counter()
    check_official(device, checks)
    if gpu:
        # padded, shifted and global windows
        check_parity("swinv2_tiny_window8_256", (232, 328), 2, device, checks)
        check_parity("swinv2_tiny_window8_256", (232, 328), 2, device, checks, (torch.bfloat16, torch.float16), True)
        check_training("swinv2_tiny_window8_256", (256, 256), 32, 8, device, checks)
        check_memory(bench.Case(model="swinv2_base_window16_256", batch_size=64, dtype="bf16", mode="train",
                                device=name), checks)
        torch.backends.cuda.matmul.allow_tf32 = True  # as users run
        torch.backends.cudnn.allow_tf32 = True
        check_speed([bench.Case(batch_size=128, dtype=d, mode=m, device=name)
                     for d in ("fp32", "bf16") for m in ("infer", "train")], rounds=5, checks=checks)
    else:
        check_parity("swinv2_debug", (36, 52), 2, device, checks)
        check_parity("swinv2_debug", (36, 52), 2, device, checks, (torch.bfloat16,), mild=True)
        check_training("swinv2_debug", (32, 32), 4, 2, device, checks)
    checks.results["seconds"] = time.perf_counter() - t0
    print(f"{len(checks.failed)} check(s) failed" if checks.failed else "every check passed",
          f"in {checks.results['seconds']:.0f} s")
    for failure in checks.failed:
        print(f"  FAILED {failure}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=str(device), failed=checks.failed, **checks.results),
                                              indent=2, default=str))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
