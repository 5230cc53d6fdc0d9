"""Side-by-side throughput and memory of swinv2 and the peer SwinV2 implementations.

Every implementation is built at the same configuration and timed in one run, interleaved
(one iteration of each in turn, the order rotating every round), so that the machine's
noise hits all of them alike; medians and ratios are reported. The machine's own matrix-
multiply rate is measured in the same run, to say how close the model gets to it.
Peak memory is measured per implementation in a fresh subprocess (peak resident set on the
CPU, ``max_memory_allocated`` on a GPU).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import fileio
from .memory import reset_peak_rss, rss_kb, trim_heap
from .train.precision import native_bf16
from .variants import create_model, get_variant

try:  # the speedups are a package of their own: without it swinv2 is timed as the plain model
    from . import fast
except ModuleNotFoundError as missing:
    if missing.name != f"{__package__}.fast":
        raise
    fast = None

IMPLS = ("swinv2", "timm", "torchvision", "transformers")
# torchvision ships SwinV2 T/S/B at 256 with window 8 only.
_TV = {"swinv2_tiny_window8_256": "swin_v2_t", "swinv2_small_window8_256": "swin_v2_s",
       "swinv2_base_window8_256": "swin_v2_b"}


@dataclasses.dataclass
class Case:
    model: str = "swinv2_tiny_window8_256"
    img_size: int = 256
    batch_size: int = 32
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    mode: str = "infer"  # infer | train
    compile: bool = False
    device: str = "cpu"

    def label(self) -> str:
        return (f"{self.model} {self.img_size}px batch {self.batch_size} {self.dtype} {self.mode}"
                f"{' compiled' if self.compile else ''} on {self.device}")


def build(impl: str, case: Case) -> torch.nn.Module:
    """The implementation's SwinV2 at the case's configuration, with random weights."""
    v = get_variant(case.model)
    if impl == "swinv2":
        return create_model(case.model, img_size=case.img_size, drop_path_rate=0.1)
    if impl == "timm":
        from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

        # Built from the same numbers (timm registers no debug, H or G variants; it has no
        # extra main-branch norm, so H and G compare a slightly cheaper network there).
        return TimmSwinV2(
            img_size=case.img_size, embed_dim=v.embed_dim, depths=v.depths, num_heads=v.num_heads,
            window_size=v.window_size, pretrained_window_sizes=v.pretrained_window_sizes,
            num_classes=v.num_classes, drop_path_rate=0.1,
        )
    if impl == "torchvision":
        if case.model not in _TV or case.img_size != 256:
            raise LookupError("torchvision has SwinV2 T/S/B at 256 px with window 8 only")
        import torchvision

        return getattr(torchvision.models, _TV[case.model])()  # its own stochastic depth (0.2)
    if impl == "transformers":
        from transformers import Swinv2Config, Swinv2ForImageClassification

        cfg = Swinv2Config(
            image_size=case.img_size, patch_size=4, embed_dim=v.embed_dim, depths=list(v.depths),
            num_heads=list(v.num_heads), window_size=v.window_size, drop_path_rate=0.1,
            pretrained_window_sizes=list(v.pretrained_window_sizes), num_labels=v.num_classes,
        )
        return _Logits(Swinv2ForImageClassification(cfg))
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


class _Logits(torch.nn.Module):
    """Makes a transformers model return a logits tensor like the others."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


class Runner:
    """One implementation, ready to time one iteration of the case."""

    def __init__(self, impl: str, case: Case):
        self.case = case
        device = torch.device(case.device)
        model = build(impl, case).to(device)
        self.model = model.train() if case.mode == "train" else model.eval()
        self.fn = torch.compile(self.model) if case.compile else self.model
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(case.batch_size, 3, case.img_size, case.img_size, generator=gen).to(device)
        self.y = torch.randint(0, 1000, (case.batch_size,), generator=gen).to(device)
        if case.mode == "train":
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)

    def _autocast(self):
        if self.case.dtype == "bf16":
            return torch.autocast(self.case.device.split(":")[0], dtype=torch.bfloat16)
        return nullcontext()

    def step(self) -> None:
        if self.case.mode == "infer":
            with torch.inference_mode(), self._autocast():
                self.fn(self.x)
        else:
            self.opt.zero_grad(set_to_none=True)
            with self._autocast():
                loss = torch.nn.functional.cross_entropy(self.fn(self.x).float(), self.y)
            loss.backward()
            self.opt.step()
        if self.case.device.startswith("cuda"):
            torch.cuda.synchronize()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_rates(dtype: torch.dtype, device: str = "cpu", n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of an n x n x n matrix multiply on this machine, per kernel that can do it
    (median of repeats, the kernels interleaved): ``torch.matmul`` (BLAS on a CPU, cuBLAS on
    a GPU) and, on a CPU with oneDNN, oneDNN's inner product, which can be much faster where
    BLAS picks a narrower vector code path than the CPU has."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    kernels = {"torch.matmul": lambda: a @ b}
    if (device == "cpu" and fast is not None and torch.backends.mkldnn.is_available()
            and fast.onednn.runs(dtype)):  # a @ b.T: the same FLOPs
        kernels["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    times = {name: [] for name in kernels}
    for fn in kernels.values():
        fn(), sync()
    for _ in range(repeats):
        for name, fn in kernels.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: 2 * n**3 / statistics.median(ts) for name, ts in times.items()}


def matmul_rate(dtype: torch.dtype, device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """This machine's matrix-multiply rate: the fastest kernel's, from :func:`matmul_rates`."""
    return max(matmul_rates(dtype, device, n, repeats).values())


def machine_rates(dtypes, device: str = "cpu") -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(the machine's matmul rate per dtype, every kernel's rate per dtype) for fp32 and, when
    ``dtypes`` holds it, bf16: see :func:`matmul_rates`."""
    kernels = {"fp32": matmul_rates(torch.float32, device)}
    if "bf16" in dtypes:
        kernels["bf16"] = matmul_rates(torch.bfloat16, device)
    return {k: max(v.values()) for k, v in kernels.items()}, kernels


def forward_times(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[torch.Tensor, list[float]]:
    """(logits, seconds of each of ``repeats`` inference forward passes of ``x``)."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            logits = model(x)
            times.append(time.perf_counter() - t0)
    return logits, times


def run_case(case: Case, impls=IMPLS, rounds: int = 7, memory: bool = False, log=print) -> dict:
    """One row of the report: :func:`run_speed` of the case and, with ``memory``, each timed
    implementation's :func:`peak_memory`."""
    row = dict(case=dataclasses.asdict(case), label=case.label(), **run_speed(case, impls, rounds, log=log))
    if memory:
        row["memory"] = {impl: peak_memory(case, impl) for impl in row["results"]}
    return row


def run_speed(case: Case, impls=IMPLS, rounds: int = 7, warmup: int = 2, log=print,
              rate_n: int = 2048) -> dict:
    """Interleaved timing of each implementation; returns per-implementation results and
    ``matmul_rate``, the machine's rate for the case's dtype (:func:`matmul_rate`, one sample
    per round, taken between the implementations, median), so that the fraction of it each
    implementation reaches compares the same stretch of a shared, noisy machine."""
    runners, skipped = {}, {}
    for impl in impls:
        try:
            runners[impl] = Runner(impl, case)
        except (ImportError, LookupError) as err:
            skipped[impl] = str(err)
            log(f"  {impl}: skipped ({err})")
    for impl, r in runners.items():
        log(f"  warming up {impl}")
        for _ in range(warmup):
            r.step()
    times = {impl: [] for impl in runners}
    order = list(runners)
    rate_dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    rate_samples = []
    for i in range(rounds):
        for impl in order[i % len(order):] + order[: i % len(order)]:
            times[impl].append(_timed(runners[impl].step))
            if impl == order[0] and runners:
                rate_samples.append(matmul_rate(rate_dtype, case.device, rate_n, repeats=1))
        log(f"  round {i + 1}/{rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()))
    flops = 2 * create_model(case.model, img_size=case.img_size, device="meta").flops(case.img_size)
    if case.mode == "train":
        flops *= 3  # forward + backward (about twice the forward)
    results = {}
    for impl, ts in times.items():
        med = statistics.median(ts)
        results[impl] = dict(
            median_s=med, min_s=min(ts), max_s=max(ts), images_per_s=case.batch_size / med,
            flop_rate=flops * case.batch_size / med,
        )
    rate = statistics.median(rate_samples) if rate_samples else None
    return dict(results=results, skipped=skipped, matmul_rate=rate)


def peak_memory(case: Case, impl: str) -> int | None:
    """Peak memory of one iteration, in bytes, measured in a fresh subprocess."""
    code = (
        "import json, sys, dataclasses; from swinv2.bench import Case, peak_memory_here; "
        f"print(json.dumps(peak_memory_here(Case(**{dataclasses.asdict(case)!r}), {impl!r})))"
    )
    # A fixed mmap threshold makes glibc return large freed blocks to the OS at once, so the
    # resident set follows the tensors that are alive.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_memory_here(case: Case, impl: str) -> int | None:
    """In this process: build, run one warm-up iteration, then the peak of one iteration
    above the memory held before it (model, optimizer state and inputs excluded)."""
    runner = Runner(impl, case)
    runner.step()
    if case.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runner.step()
        return torch.cuda.max_memory_allocated() - base
    trim_heap()  # memory freed by the warm-up goes back to the OS, so the step cannot hide in it
    reset_peak_rss()
    base = rss_kb("VmRSS")
    runner.step()
    return (rss_kb("VmHWM") - base) * 1024


def swinv2_settings() -> str:
    """The speedups of :mod:`swinv2.fast` the bench ran swinv2 with, and why each is on or off."""
    if fast is None:
        return "none (swinv2.fast is not installed: the plain model)"
    return "; ".join(f"{name} {'on' if on else 'off'} ({why})" for name, on, why in fast.status())


def cpu_description(cpuinfo: str = "/proc/cpuinfo", cache_root: str = "/sys/devices/system/cpu/cpu0/cache") -> str:
    """The CPU's model name with its family and model numbers and its L2 and L3 caches, e.g.
    ``NAME (family F, model M; L2 1024K, L3 32768K)``: virtual machines often report only a
    product line, whose generations can run the same code at different rates (vector units of
    full or half width), so a report says which it was timed on."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    details = []
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']}, model {fields['model']}")
    caches = []
    for index in sorted(Path(cache_root).glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if level in ("2", "3") and kind in ("Unified", "Data"):
            caches.append(f"L{level} {size}")
    if caches:
        details.append(", ".join(caches))
    return f"{name} ({'; '.join(details)})" if details else name


def environment(device: str = "cpu") -> dict:
    info = dict(
        date=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), python=platform.python_version(),
        torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(), machine=platform.machine(),
    )
    info["cpu"] = cpu_description()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["vector"] = torch.backends.cpu.get_cpu_capability()
    info["native bf16"] = "yes" if native_bf16(device) else "no (bf16 cases run on a slow generic kernel)"
    info["swinv2"] = swinv2_settings()
    for pkg in ("timm", "torchvision", "transformers"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = "not installed"
    return info


def save_report(folder: str | os.PathLike, env: dict, command: str, rows: list[dict], rates: dict,
                kernels: dict | None = None) -> str:
    """Write the report (:func:`report_markdown`) and its data as ``DATE-MODEL-DEVICE.md`` and
    ``.json`` in ``folder``; a later run the same day is named with its time (and a number
    within the same minute), so that earlier reports stay. ``rows`` (one model on one device,
    at least one case) name the files. Returns the path without suffix."""
    os.makedirs(folder, exist_ok=True)
    case = rows[0]["case"]
    name = f"{case['model']}-{case['device'].split(':')[0]}"
    day, hhmm = env["date"][:10], env["date"][11:16].replace(":", "")
    stem, n = os.path.join(folder, f"{day}-{name}"), 1
    while os.path.exists(stem + ".md") or os.path.exists(stem + ".json"):
        n += 1
        stem = os.path.join(folder, f"{day}-{hhmm}{'' if n == 2 else f'-{n - 1}'}-{name}")
    fileio.write_text(stem + ".md", report_markdown(env, command, rows, rates, kernels))
    fileio.write_text(stem + ".json", json.dumps(
        dict(environment=env, command=command, matmul_rate=rates, matmul_kernels=kernels, rows=rows), indent=1))
    return stem


def report_markdown(env: dict, command: str, rows: list[dict], rates: dict, kernels: dict | None = None) -> str:
    """The report; ``rates`` maps a dtype to the machine's matmul rate, ``kernels`` (optional)
    to the rate of each kernel it was the best of."""
    kernels = kernels or {}

    def rate_text(k: str, v: float) -> str:
        per = kernels.get(k, {})
        detail = f" (fastest of {', '.join(f'{n} {r / 1e9:.0f}' for n, r in per.items())})" if len(per) > 1 else ""
        return f"{k} {v / 1e9:.0f} GFLOP/s{detail}"

    lines = [
        f"# swinv2 bench, {env['date']}",
        "",
        f"Command: `{command}`",
        "",
        "Machine: " + ", ".join(f"{k} {env[k]}" for k in ("cpu", "cpus", "threads", "machine", "vector", "native bf16")
                                  if k in env)
        + (f", GPU {env['gpu']}" if "gpu" in env else ""),
        "Versions: " + ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "timm", "torchvision", "transformers")),
        *([f"Allocator: {env['allocator']}"] if "allocator" in env else []),
        *([f"swinv2 settings: {env['swinv2']}"] if "swinv2" in env else []),
        "",
        "Matrix-multiply rate measured in this run (2048^3): "
        + ", ".join(rate_text(k, v) for k, v in rates.items()),
        "",
        "Medians of interleaved iterations; `x swinv2` is the implementation's time over swinv2's"
        " (above 1: swinv2 is faster). `of matmul rate`: model FLOPs per second (official count,"
        " training step = 3x forward) over the rate for that dtype sampled once per round during"
        " the case (`rate` column; the run-start rate above where a case has none).",
        "",
        "| case | implementation | images/s | median ms | x swinv2 | of matmul rate | rate GFLOP/s | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        res, ref = row["results"], row["results"].get("swinv2")
        rate = row.get("matmul_rate") or rates.get("bf16" if row["case"]["dtype"] == "bf16" else "fp32")
        for impl, r in res.items():
            ratio = f"{r['median_s'] / ref['median_s']:.2f}" if ref else "-"
            frac = f"{r['flop_rate'] / rate:.0%}" if rate else "-"
            mem = row.get("memory", {}).get(impl)
            mem = f"{mem / 2**20:.0f} MiB" if mem else "-"
            rate_text_ = f"{rate / 1e9:.0f}" if rate else "-"
            lines.append(f"| {row['label']} | {impl} | {r['images_per_s']:.1f} | {r['median_s'] * 1e3:.0f} | "
                         f"{ratio} | {frac} | {rate_text_} | {mem} |")
        for impl, why in row.get("skipped", {}).items():
            lines.append(f"| {row['label']} | {impl} | skipped: {why} | | | | | |")
    return "\n".join(lines) + "\n"
