"""swinv2 bench: the numbers it reports are computed correctly from what it measures."""

import subprocess
import sys

import pytest
import torch

from swinv2 import bench
from swinv2.cli import main


def test_run_speed_interleaves_and_reports_ratios():
    pytest.importorskip("timm")
    case = bench.Case(model="swinv2_debug", img_size=64, batch_size=2)
    out = bench.run_speed(case, impls=("swinv2", "timm", "torchvision"), rounds=3, warmup=1, log=lambda *_: None)
    assert set(out["results"]) == {"swinv2", "timm"}
    assert "torchvision" in out["skipped"] and "window 8" in out["skipped"]["torchvision"]
    for r in out["results"].values():
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["images_per_s"] == pytest.approx(2 / r["median_s"])
    assert out["matmul_rate"] > 1e8  # sampled during the rounds


def test_run_speed_samples_the_matmul_rate_once_per_round(monkeypatch):
    samples = iter([1e9, 5e9, 2e9, 4e9, 3e9])
    seen = []
    monkeypatch.setattr(bench, "matmul_rate", lambda *a, **k: seen.append(a) or next(samples))
    case = bench.Case(model="swinv2_debug", img_size=64, batch_size=1)
    out = bench.run_speed(case, impls=("swinv2",), rounds=5, warmup=0, log=lambda *_: None)
    assert out["matmul_rate"] == 3e9 and len(seen) == 5 and seen[0][0] is torch.float32


def test_same_network_across_implementations():
    """The peers are built at the case's configuration: same parameter count as swinv2."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    case = bench.Case(model="swinv2_debug", img_size=64, batch_size=1)
    counts = {impl: sum(p.numel() for p in bench.build(impl, case).parameters())
              for impl in ("swinv2", "timm", "transformers")}
    assert len(set(counts.values())) == 1, counts


def test_report_ratios_and_rate_fraction():
    rows = [dict(case=dict(dtype="fp32"), label="c", results={
        "swinv2": dict(median_s=0.5, images_per_s=4.0, flop_rate=50e9),
        "timm": dict(median_s=0.75, images_per_s=2.67, flop_rate=33e9),
    }, memory={"swinv2": 3 * 2**20}, skipped={"torchvision": "no such variant"})]
    text = bench.report_markdown(bench.environment(), "swinv2 bench", rows, {"fp32": 100e9})
    assert "| c | swinv2 | 4.0 | 500 | 1.00 | 50% | 100 | 3 MiB |" in text
    assert "| c | timm | 2.7 | 750 | 1.50 | 33% | 100 | - |" in text
    assert "skipped: no such variant" in text
    rows[0]["matmul_rate"] = 200e9  # the case's own rate, sampled during its rounds, wins
    text = bench.report_markdown(bench.environment(), "swinv2 bench", rows, {"fp32": 100e9})
    assert "| c | swinv2 | 4.0 | 500 | 1.00 | 25% | 200 | 3 MiB |" in text


def test_peak_memory_grows_with_batch():
    small = bench.peak_memory_here(bench.Case(model="swinv2_debug", img_size=64, batch_size=1), "swinv2")
    large = bench.peak_memory_here(bench.Case(model="swinv2_debug", img_size=64, batch_size=32), "swinv2")
    assert 0 < small < large


def test_matmul_rate_is_the_fastest_kernels():
    rates = bench.matmul_rates(torch.float32, n=256, repeats=3)
    assert "torch.matmul" in rates and all(r > 1e8 for r in rates.values())
    if torch.backends.mkldnn.is_available():
        assert "oneDNN" in rates
    text = bench.report_markdown(bench.environment(), "swinv2 bench", [], {"fp32": 300e9},
                                 {"fp32": {"torch.matmul": 120e9, "oneDNN": 300e9}})
    assert "fp32 300 GFLOP/s (fastest of torch.matmul 120, oneDNN 300)" in text


def test_cli_writes_a_dated_report(tmp_path, capsys):
    assert main(["bench", "--model", "swinv2_debug", "--img-size", "64", "--batch-size", "2", "--rounds", "2",
                 "--impls", "swinv2", "--out", str(tmp_path)]) == 0
    reports = list(tmp_path.glob("*-swinv2_debug-cpu.md"))
    assert len(reports) == 1 and (tmp_path / reports[0].name.replace(".md", ".json")).exists()
    text = reports[0].read_text()
    assert "Matrix-multiply rate" in text and "| swinv2 |" in text
    assert "Allocator: as the system sets it" in text
    # the speedups the run used, each with why it is on or off
    assert f"swinv2 settings: {bench.swinv2_settings()}" in text
    from swinv2 import fast
    from swinv2.fast import native

    assert all(f"{name} {'on' if on else 'off'} ({why})" in text for name, on, why in fast.status())
    assert "batch_chunk_mb on" in text and f"(C kernel for window attention: {native.status()})" in text
    # later runs the same day (even the same minute) write beside the first report, not over it
    for _ in range(2):
        assert main(["bench", "--model", "swinv2_debug", "--img-size", "64", "--batch-size", "2", "--rounds", "1",
                     "--impls", "swinv2", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*-swinv2_debug-cpu.md"))) == 3 and reports[0].read_text() == text
    assert len(list(tmp_path.glob("*-swinv2_debug-cpu.json"))) == 3


_FAULTS = """
import resource, sys, torch
from swinv2.fast.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():  # one 128 MiB block, above any mmap threshold
    t = torch.empty(2**25)
    t.fill_(1)
    del t
# a warm-up: small allocations between the steps may split a freed block, and the heap grows
# until it holds enough memory for both (how far depends on what the imports left in it)
for _ in range(8):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_refaulting_large_blocks():
    """Freed 128 MiB blocks are faulted in again page by page (32k faults each) under
    glibc's defaults, and reused without a fault once freed memory is kept (after a warm-up:
    where small allocations split a freed block the heap first grows)."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        applied, count = out.stdout.split()
        return applied, int(count)

    applied, kept = faults("keep")
    if applied != "True":
        pytest.skip("not glibc")
    _, system = faults("system")
    block = 2**25 * 4 // 4096
    assert system > 5 * block  # (nearly) every page of the six blocks
    assert kept < 2 * block


def test_cpu_description_names_family_model_and_caches(tmp_path):
    from swinv2.bench import cpu_description

    (tmp_path / "cpuinfo").write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\n"
        "processor\t: 1\ncpu family\t: 99\nmodel\t\t: 99\nmodel name\t: other\n")
    for i, (level, kind, size) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "32K"),
                                             ("2", "Unified", "1024K"), ("3", "Unified", "32768K")]):
        d = tmp_path / "cache" / f"index{i}"
        d.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (d / name).write_text(value + "\n")
    text = cpu_description(str(tmp_path / "cpuinfo"), str(tmp_path / "cache"))
    assert text == "AMD EPYC (family 26, model 2; L2 1024K, L3 32768K)"
    # nothing readable: still a name, never an error
    assert cpu_description(str(tmp_path / "missing"), str(tmp_path / "missing"))
