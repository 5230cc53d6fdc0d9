"""Training steps of SwinV2-H (658M parameters) sharded over two CPU processes with FSDP2, each
process under a memory budget that the model's unsharded training state (fp32 weights,
gradients and AdamW states: 16 bytes a parameter, 9.8 GiB) does not fit.

    python benchmarks/sharded_budget.py --budget-gib 8 --single --out RESULT.json

Each process (gloo, one thread) warms torch's runtime on the debug model, builds SwinV2-H on
the meta device, shards it block by block with ``swinv2.train.distributed.wrap_model(...,
"fsdp")``, materialises only its own shards (``to_empty`` + ``init_weights``) and runs AdamW
steps on a random batch. Peak resident memory is read from ``/proc/self/status`` (``VmHWM``,
the counter ``getrusage``'s ``ru_maxrss`` reports), reset before each phase through
``/proc/self/clear_refs``; the increase over the warmed process is what ``swinv2.memory``
predicts, the absolute peak is what the budget limits. ``--single`` also runs the same steps
unsharded in one process, to measure what the budget would have to hold without sharding.
The end prints the estimate for SwinV2-G at 1536x1536, window 32, across world sizes (not run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import swinv2
from swinv2.memory import estimate_training_memory, rss_kb, trim_heap
from swinv2.train.distributed import Dist, wrap_model

GiB = 2**30


def _peak_since_reset() -> int:
    return rss_kb("VmHWM") * 1024


def _reset_peak() -> None:
    trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS


def _warm(rank: int, world: int) -> None:
    """Load torch's kernels, thread pools and (sharded) the gloo buffers, so that the increase
    measured afterwards is the model's own memory."""
    model = swinv2.create_model("swinv2_debug", img_size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    F.cross_entropy(model(torch.randn(1, 3, 64, 64)), torch.zeros(1).long()).backward()
    opt.step()
    if world > 1:
        dist.all_reduce(torch.zeros(1024))
    del model, opt


def _worker(rank: int, world: int, port: int, args, out_dir: str) -> None:
    # DTensor warns that a CPU mesh has no distributed RNG: each shard is seeded apart below.
    warnings.filterwarnings("ignore", message="DTensor random operators")
    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    _warm(rank, world)
    trim_heap()
    base = rss_kb("VmRSS") * 1024
    phases = {}

    _reset_peak()
    t0 = time.perf_counter()
    model = swinv2.create_model(
        args.model, device="meta", img_size=args.img_size, window_size=args.window, num_classes=1000, drop_path_rate=0.0
    )
    n_params = sum(p.numel() for p in model.parameters())
    if world > 1:
        wrap_model(model, Dist(rank, world, rank, torch.device("cpu")), "fsdp")
    model.to_empty(device="cpu")
    torch.manual_seed(args.seed + rank)  # DTensor on a CPU draws each shard from this process's generator
    model.init_weights()
    model.train()
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
    held = sum(local(p).numel() for p in model.parameters())
    phases["build, shard, init"] = dict(
        seconds=time.perf_counter() - t0, peak=_peak_since_reset() - base, rss_after=rss_kb("VmRSS") * 1024 - base
    )

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    before = {name: local(p).detach().flatten()[:256].clone() for name, p in model.named_parameters()}
    steps = []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(args.seed * 1000 + step * world + rank)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
        y = torch.randint(0, 1000, (args.batch_size,), generator=g)
        _reset_peak()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seconds = time.perf_counter() - t0
        backward_peak = _peak_since_reset() - base
        _reset_peak()
        t1 = time.perf_counter()
        opt.step()
        seconds += time.perf_counter() - t1
        step_peak = _peak_since_reset() - base
        with_grad = sum(int(bool(local(p.grad).ne(0).any())) for p in model.parameters() if p.grad is not None)
        stats = torch.tensor([float(loss.detach()), float(with_grad)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats)  # loss summed over processes; a tensor counts once per shard holding it
        steps.append(
            dict(
                seconds=seconds,
                peak=max(backward_peak, step_peak),
                peak_forward_backward=backward_peak,
                peak_optimizer_step=step_peak,
                loss=float(stats[0]) / world,
                tensors_with_nonzero_grad_shards=int(stats[1]),
            )
        )
    changed = sum(
        int(not torch.equal(before[name], local(p).detach().flatten()[:256])) for name, p in model.named_parameters()
    )
    result = dict(
        rank=rank,
        world=world,
        n_params=n_params,
        params_held=held,
        base_rss=base,
        phases=phases,
        steps=steps,
        tensors=len(before),
        tensors_changed_here=changed,
        lifetime_peak_abs=base + max([phases["build, shard, init"]["peak"]] + [s["peak"] for s in steps]),
    )
    with open(os.path.join(out_dir, f"{world}-{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        return [json.load(open(os.path.join(out, f"{world}-{r}.json"))) for r in range(world)]


def _predict(model, **kw) -> dict:
    est = estimate_training_memory(model, **kw)
    return dict(peak=est.peak, breakdown=est.breakdown, num_params=est.num_params)


def _giant_table() -> list[dict]:
    """SwinV2-G at the paper's 1536x1536 / window 32 with its memory options (bf16 autocast,
    checkpointing, sequential attention in stages 0-1), one image a device: estimate only."""
    meta = swinv2.create_model("swinv2_giant_window12_192", device="meta", img_size=1536, window_size=32)
    rows = []
    for label, kw in [
        ("1 process", {}),
        *[(f"ZeRO-1 x{n}", dict(zero_world_size=n)) for n in (8, 16, 64)],
        *[(f"FSDP x{n}", dict(fsdp_world_size=n)) for n in (8, 16, 64)],
    ]:
        est = estimate_training_memory(
            meta, batch_size=1, dtype="bf16", grad_checkpointing=True, sequential_attention=[0, 1], **kw
        )
        rows.append(dict(case=label, peak=est.peak, breakdown=est.breakdown))
    return [dict(num_params=sum(p.numel() for p in meta.parameters()))] + rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="swinv2_huge_window12_192")
    p.add_argument("--img-size", type=int, default=192)
    p.add_argument("--window", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--steps", type=int, default=2, help="the first creates the AdamW states")
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--single", action="store_true", help="also run unsharded in one process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    # glibc hands freed large blocks back at once, so RSS follows what tensors hold (as bench.py)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

    meta = swinv2.create_model(
        args.model, device="meta", img_size=args.img_size, window_size=args.window, num_classes=1000, drop_path_rate=0.0
    )
    kw = dict(batch_size=args.batch_size, dtype="fp32")
    predicted = dict(
        single=_predict(meta, **kw),
        fsdp=_predict(meta, fsdp_world_size=args.world_size, **kw),
        zero1=_predict(meta, zero_world_size=args.world_size, **kw),
    )
    budget = args.budget_gib * GiB
    print(
        f"{args.model} {args.img_size}px w{args.window} batch {args.batch_size}: "
        f"{predicted['single']['num_params'] / 1e6:.1f}M parameters; budget {args.budget_gib:.1f} GiB a process"
    )
    for k, v in predicted.items():
        print(f"  predicted peak increase, {k}: {v['peak'] / GiB:.2f} GiB")

    sharded = _run(args.world_size, args)
    single = None
    if args.single:
        args_single = argparse.Namespace(**{**vars(args), "threads": args.threads * args.world_size})
        single = _run(1, args_single)
    for label, results in [("sharded", sharded), ("single", single)]:
        if results is None:
            continue
        pred = predicted["fsdp" if label == "sharded" else "single"]["peak"]
        for r in results:
            measured = max(s["peak"] for s in r["steps"])
            times = ", ".join(f"{s['seconds']:.1f}" for s in r["steps"])
            losses = ", ".join(f"{s['loss']:.4f}" for s in r["steps"])
            print(
                f"{label} rank {r['rank']}: holds {r['params_held'] / 1e6:.1f}M of {r['n_params'] / 1e6:.1f}M "
                f"parameters; step peak increase {measured / GiB:.2f} GiB (predicted {pred / GiB:.2f}, "
                f"{(pred - measured) / measured:+.1%}); lifetime peak RSS {r['lifetime_peak_abs'] / GiB:.2f} GiB "
                f"({'within' if r['lifetime_peak_abs'] <= budget else 'over'} the budget); "
                f"step times {times} s; losses {losses}; "
                f"changed {r['tensors_changed_here']} of {r['tensors']} tensors here"
            )
    giant = _giant_table()
    print(
        f"\nswinv2_giant_window12_192 built on the meta device: {giant[0]['num_params'] / 1e9:.3f}B parameters; "
        "predicted peak at 1536px w32, batch 1 a device, bf16, checkpointing + sequential attention 0-1:"
    )
    for row in giant[1:]:
        print(f"  {row['case']:<12} {row['peak'] / GiB:7.2f} GiB")
    if args.out:
        env = dict(
            python=sys.version.split()[0],
            torch=torch.__version__,
            platform=platform.platform(),
            cpu=_cpu_name(),
            cores=os.cpu_count(),
            ram_gib=_ram() / GiB,
        )
        with open(args.out, "w") as f:
            json.dump(
                dict(args=vars(args), env=env, predicted=predicted, sharded=sharded, single=single, giant=giant),
                f,
                indent=1,
            )


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")


def _ram() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


if __name__ == "__main__":
    main()
