"""Peak memory and step time of SwinV2-B training at 1536x1536 with window 32 on a CPU
(batch 1, bf16 autocast, AdamW), for the paper's memory options (§3.5), beside the estimate
of ``swinv2.memory``. Cases predicted above ``LIMIT_GIB`` are not run (prediction only).

    python benchmarks/memory_swinv2_base_1536.py

Each case runs in a fresh subprocess: torch's runtime is warmed with the same network at
64 px first, then the peak RSS increase of building the model and two training steps is
measured (the second step has optimizer states), and both steps are timed.
"""

import json
import os
import subprocess
import sys

import swinv2
from swinv2.memory import MiB, estimate_training_memory

LIMIT_GIB = 14.0
CASES = [
    ("baseline", False, False),
    ("checkpointing", True, False),
    ("sequential attention [0, 1]", False, [0, 1]),
    ("checkpointing + sequential attention [0, 1]", True, [0, 1]),
]
CODE = r"""
import gc, json, time, torch, swinv2
from swinv2.memory import rss_kb, trim_heap
kw = dict(img_size=1536, window_size=32, drop_path_rate=0.0, num_classes=1000, grad_checkpointing={ck!r},
          sequential_attention={sq!r})
warm = swinv2.create_model("swinv2_base_window12_192", **dict(kw, img_size=64)).train()
with torch.autocast("cpu", dtype=torch.bfloat16):
    warm(torch.randn(1, 3, 64, 64)).float().sum().backward()
del warm; gc.collect()
trim_heap(); base = rss_kb("VmRSS")
model = swinv2.create_model("swinv2_base_window12_192", **kw).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
x, y = torch.randn(1, 3, 1536, 1536), torch.zeros(1).long()
times = []
for _ in range(2):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
print(json.dumps(dict(peak=(rss_kb("VmHWM") - base) * 1024, times=times)))
"""


def main() -> None:
    meta = swinv2.create_model("swinv2_base_window12_192", num_classes=1000, img_size=1536, window_size=32,
                               device="meta")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    print("| case | predicted peak GiB | measured peak GiB | error | step time s (1st, 2nd) |")
    print("|---|---|---|---|---|")
    for label, ck, sq in CASES:
        est = estimate_training_memory(meta, batch_size=1, dtype="bf16", grad_checkpointing=ck, sequential_attention=sq)
        pred = est.peak / 2**30
        if pred > LIMIT_GIB:
            print(f"| {label} | {pred:.2f} | not run (predicted above {LIMIT_GIB} GiB) | | |", flush=True)
            continue
        proc = subprocess.run([sys.executable, "-c", CODE.format(ck=ck, sq=sq)], capture_output=True, text=True,
                              env=env, timeout=3600)
        if proc.returncode:
            print(f"| {label} | {pred:.2f} | failed: {proc.stderr.strip().splitlines()[-1]} | | |", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        meas = r["peak"] / 2**30
        print(f"| {label} | {pred:.2f} | {meas:.2f} | {(pred - meas) / meas:+.1%} | "
              f"{r['times'][0]:.0f}, {r['times'][1]:.0f} |", flush=True)
    print(f"\nlargest attention scores alive (predicted): {est.attention_scores / MiB:.0f} MiB")


if __name__ == "__main__":
    main()
