"""Where the time of a SwinV2-T step goes, for swinv2 and timm, and what that bounds.

Three parts, each a subcommand (``all`` runs them in turn):

``profile``  One step of each implementation under ``torch.profiler`` (CPU), after warm-up
             steps, for fp32 and bf16 inference and the fp32 training step. Every profiled
             event's self-CPU time is charged to a category, decided by the outermost aten op
             (or backward node) it runs inside: the Linear GEMMs (qkv, proj, fc1, fc2, patch
             merging reduction, head; named from the weight shape), attention matmuls
             (bmm / matmul on scores, or the fused SDPA kernel), softmax, layer_norm, gelu,
             the cosine normalisation of q and k, copies and layout (permute, reshape, roll,
             contiguous, cat, pad, casts), the continuous position-bias MLP (with its gather
             and sigmoid), element-wise arithmetic (residual adds, bias and mask adds,
             scales), and other. Time between ops (Python) is the step's wall time under the
             profiler minus the ops' total.
``gemm``     The Linear GEMMs of SwinV2-T at the batch's token counts, stage by stage,
             timed alone (``F.linear`` with bias, as the models call it), as GFLOP/s beside
             the 2048^3 matmul rate.
``bound``    From the two: the Amdahl bound on swinv2's speedup over timm if the shared
             Linear GEMMs keep their time, and the ceiling on the "fraction of the matmul rate"
             metric given the rate those GEMM shapes reach.

Results go to a JSON file (``--out``); ``--report`` prints markdown tables from it.

    .venv/bin/python benchmarks/profile_breakdown.py all --batch-size 32 --out /tmp/breakdown.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from swinv2.bench import Case, Runner, matmul_rate
from swinv2.variants import create_model, get_variant

MODEL = "swinv2_tiny_window8_256"
SCOPE = "cat::"  # record_function scopes that name their category outright
STEP = "breakdown::step"
# Inside a GEMM or attention op, these are data movement (autocast casts, matmul's reshapes).
MOVES = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"}

CATEGORIES = (
    "linear_gemm", "attn_matmul", "softmax", "layer_norm", "gelu", "normalize", "copy_layout",
    "cpb_mlp", "elementwise", "stem_conv", "optimizer", "other",
)
LABELS = {
    "linear_gemm": "Linear GEMMs (qkv, proj, fc1, fc2, reduction, head)",
    "attn_matmul": "attention matmuls (bmm / SDPA kernel)",
    "softmax": "softmax",
    "layer_norm": "layer_norm",
    "gelu": "gelu",
    "normalize": "normalize (cosine q, k)",
    "copy_layout": "copies / permute / roll / contiguous / cat / pad / casts",
    "cpb_mlp": "CPB MLP (+ gather, sigmoid)",
    "elementwise": "element-wise (residual, bias/mask add, scale)",
    "stem_conv": "patch-embed conv",
    "optimizer": "optimizer step + grad accumulation",
    "other": "other (pool, loss, ...)",
}

COPY_OPS = {
    "copy_", "contiguous", "clone", "permute", "reshape", "view", "_unsafe_view", "roll", "cat",
    "pad", "constant_pad_nd", "slice", "transpose", "unbind", "select", "expand", "as_strided",
    "to", "_to_copy", "zeros_like", "zeros", "empty", "empty_like", "flatten", "unsqueeze",
    "squeeze", "t", "narrow", "split", "chunk", "stack", "index_select", "new_empty", "fill_",
    "zero_", "detach", "alias", "lift_fresh", "resolve_conj", "resolve_neg", "expand_as", "view_as",
}
ELEMENTWISE_OPS = {"add", "add_", "mul", "mul_", "div", "div_", "exp", "clamp", "clamp_max", "sub",
                   "rsub", "where", "masked_fill", "bernoulli_", "dropout", "relu", "relu_"}
BACKWARD_COPY = {"Roll", "Permute", "Clone", "View", "UnsafeView", "Transpose", "Slice", "Cat",
                 "Unbind", "ConstantPadNd", "Copy", "ToCopy", "ReshapeAlias", "Select", "Split",
                 "Stack", "Unsqueeze", "Squeeze", "AsStrided", "Expand", "T", "Alias", "Narrow",
                 "CopySlices", "SplitWithSizes"}
BACKWARD_ELEMENTWISE = {"Add", "Mul", "Div", "Exp", "Clamp", "Sub", "Rsub", "Where", "MaskedFill",
                        "Relu", "Threshold", "Neg"}


# --------------------------------------------------------------------------------------
# Shapes of SwinV2-T: which Linear a weight shape belongs to
# --------------------------------------------------------------------------------------


def linear_names(model_name: str = MODEL) -> dict[tuple[int, int], str]:
    """(out, in) weight shape -> layer name, for every Linear of the variant."""
    v = get_variant(model_name)
    names = {}
    for i in range(len(v.depths)):
        C = v.embed_dim * 2**i
        names[(3 * C, C)] = f"qkv s{i}"
        names[(C, C)] = f"proj s{i}"
        names[(4 * C, C)] = f"fc1 s{i}"
        names[(C, 4 * C)] = f"fc2 s{i}"
        if i < len(v.depths) - 1:
            names[(2 * C, 4 * C)] = f"reduction s{i}"
        names[(v.num_heads[i], 512)] = "cpb fc2"
    names[(512, 2)] = "cpb fc1"
    names[(v.num_classes, v.embed_dim * 2 ** (len(v.depths) - 1))] = "head"
    return names


def cpb_shapes(model_name: str = MODEL) -> set[tuple[int, ...]]:
    """Tensor shapes that only the position-bias computation produces (table rows, (nH, N, N))."""
    v = get_variant(model_name)
    w = v.window_size
    rows = (2 * w - 1) ** 2
    out = {(1, 2 * w - 1, 2 * w - 1, 2), (1, 2 * w - 1, 2 * w - 1, 512), (rows, 512), (rows, 2)}
    for nH in v.num_heads:
        out |= {(rows, nH), (w * w * w * w, nH), (w * w, w * w, nH), (nH, w * w, w * w),
                (1, 2 * w - 1, 2 * w - 1, nH)}
    return out


# --------------------------------------------------------------------------------------
# Classification of profiler events
# --------------------------------------------------------------------------------------


class Classifier:
    def __init__(self, model_name: str = MODEL):
        self.names = linear_names(model_name)
        self.cpb = cpb_shapes(model_name)
        self.gemm_detail = defaultdict(float)  # layer name -> us, forward Linear GEMMs only

    def _is_cpb(self, shapes) -> bool:
        return any(tuple(s) in self.cpb for s in shapes if s)

    def _linear_name(self, shapes) -> str | None:
        for s in shapes:
            if len(s) == 2 and tuple(s) in self.names:
                return self.names[tuple(s)]
            if len(s) == 2 and (s[1], s[0]) in self.names:  # mm(x, w.t())
                return self.names[(s[1], s[0])]
        return None

    def top(self, ev) -> str:
        """Category of an outermost forward op (an aten op not inside another one)."""
        name = ev.name.removeprefix("aten::").removeprefix("mkldnn::")
        shapes = [list(s) for s in (ev.input_shapes or [])]
        # _linear_pointwise: swinv2's CPU inference Linears on oneDNN (fc1's GELU fused in)
        if name in ("linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "_linear_pointwise"):
            weightlike = [s for s in shapes if len(s) == 2]
            if name in ("linear", "addmm", "mm", "_linear_pointwise") or (name == "matmul" and weightlike):
                lname = self._linear_name(shapes)
                if lname and lname.startswith("cpb"):
                    return "cpb_mlp"
                return "linear_gemm"
            return "attn_matmul"
        if name.startswith(("scaled_dot_product", "_scaled_dot_product")):
            return "attn_matmul"
        if name in ("softmax", "_softmax", "_safe_softmax"):
            return "softmax"
        if name in ("layer_norm", "native_layer_norm"):
            return "layer_norm"
        if name == "gelu":
            return "gelu"
        if name in ("linalg_vector_norm", "norm", "clamp_min"):  # q's norm, taken outside F.normalize
            return "normalize"
        if name in ("conv2d", "convolution", "_convolution"):
            return "stem_conv"
        if name in ("sigmoid", "index") or self._is_cpb(shapes):
            return "cpb_mlp" if self._is_cpb(shapes) or name == "sigmoid" else "other"
        if name in COPY_OPS:
            return "copy_layout"
        if name in ELEMENTWISE_OPS:
            return "elementwise"
        return "other"

    def backward(self, node: str, ev) -> str:
        """Category of a backward node (``XBackward0``), from its kind and its ops' shapes."""
        kind = node.split("::")[-1]
        for suffix in ("Backward0", "Backward1", "Backward2", "Backwards", "Backward"):
            if kind.endswith(suffix):
                kind = kind[: -len(suffix)]
                break
        shapes = [list(s) for e in _subtree(ev) for s in (e.input_shapes or [])]
        if kind in ("Addmm", "Mm", "Linear", "MkldnnLinear"):
            return "cpb_mlp" if self._is_cpb(shapes) or (self._linear_name(shapes) or "").startswith("cpb") \
                else "linear_gemm"
        if kind in ("Bmm", "Baddbmm") or "ScaledDotProduct" in kind or "Attention" in kind:
            return "attn_matmul"
        if kind in ("Softmax", "SafeSoftmax"):
            return "softmax"
        if kind == "NativeLayerNorm":
            return "layer_norm"
        if kind == "Gelu":
            return "gelu"
        if kind in ("LinalgVectorNorm", "Norm", "ClampMin"):
            return "normalize"
        if kind in ("Sigmoid", "Index") or self._is_cpb(shapes):
            return "cpb_mlp"
        if kind == "Convolution":
            return "stem_conv"
        if "AccumulateGrad" in node:
            return "optimizer"
        if kind in BACKWARD_COPY:
            return "copy_layout"
        if kind in BACKWARD_ELEMENTWISE:
            return "elementwise"
        return "other"


def _subtree(ev):
    yield ev
    for child in ev.cpu_children:
        yield from _subtree(child)


def categorise(events, classifier: Classifier) -> dict:
    """Self-CPU time (us) per category, plus the forward GEMM time per Linear layer."""
    totals = defaultdict(float)
    gemm_layers = defaultdict(float)
    ops = defaultdict(float)  # "category: outermost op" -> us
    step_us = 0.0

    def charge(ev, cat, layer=None):
        compute = cat in ("linear_gemm", "attn_matmul")
        stack = [(ev, False)]
        while stack:
            e, moving = stack.pop()
            # Inside a GEMM or attention op, casts and contiguous copies of its inputs are data
            # movement; a bare copy_ directly under addmm is the bias written into the output
            # before the GEMM accumulates onto it, part of the Linear itself.
            moving = moving or (compute and e.name in MOVES and not (
                e.name == "aten::copy_" and e.cpu_parent is not None and e.cpu_parent.name == "aten::addmm"))
            us = e.self_cpu_time_total
            if moving:
                totals["copy_layout"] += us
                ops[f"copy_layout: inputs of {ev.name}"] += us
            else:
                totals[cat] += us
                ops[f"{cat}: {ev.name}"] += us
                if layer:
                    gemm_layers[layer] += us
                if e.name == "aten::copy_" and cat == "linear_gemm":
                    ops["linear_gemm: bias written into the output"] += us
            stack.extend((c, moving) for c in e.cpu_children)

    def visit(ev):
        name = ev.name
        if name.startswith(SCOPE):
            charge(ev, name[len(SCOPE):])
        elif name.startswith("autograd::engine::evaluate_function:"):
            charge(ev, classifier.backward(name.split(": ", 1)[-1].strip(), ev))
        elif name.startswith("Optimizer."):
            charge(ev, "optimizer")
        elif name.startswith("aten::") or name.startswith("mkldnn::"):
            cat = classifier.top(ev)
            layer = None
            if cat == "linear_gemm":
                layer = classifier._linear_name([list(s) for s in (ev.input_shapes or [])]) or "?"
            charge(ev, cat, layer)
        else:  # a user scope or profiler step: look inside, its own time is Python
            totals["python_scope"] += ev.self_cpu_time_total
            for child in ev.cpu_children:
                visit(child)

    for ev in events:
        if ev.cpu_parent is None:
            if ev.name == STEP:
                step_us += ev.cpu_time_total
            visit(ev)
    return dict(totals=dict(totals), gemm_layers=dict(gemm_layers), step_us=step_us, ops=dict(ops))


# --------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def scoped_normalize():
    """F.normalize is several aten ops; wrap it so its time is charged to one category."""
    original = F.normalize

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        with record_function(SCOPE + "normalize"):
            return original(*args, **kwargs)

    F.normalize = wrapped
    try:
        yield
    finally:
        F.normalize = original


def scope_cpb(model: torch.nn.Module) -> None:
    """Charge every position-bias MLP call to the CPB category."""
    for name, module in model.named_modules():
        if name.endswith("cpb_mlp"):
            forward = module.forward

            def wrapped(*args, _forward=forward, **kwargs):
                with record_function(SCOPE + "cpb_mlp"):
                    return _forward(*args, **kwargs)

            module.forward = wrapped


def profile_case(impl: str, case: Case, warmup: int, steps: int, timed: int) -> dict:
    torch.manual_seed(0)
    runner = Runner(impl, case)
    scope_cpb(runner.model)
    classifier = Classifier(case.model)
    with scoped_normalize():
        for _ in range(warmup):
            runner.step()
        plain = []
        for _ in range(timed):  # unprofiled, to see the profiler's overhead
            t0 = time.perf_counter()
            runner.step()
            plain.append(time.perf_counter() - t0)
        results = []
        for _ in range(steps):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                t0 = time.perf_counter()
                with record_function(STEP):
                    runner.step()
                wall = time.perf_counter() - t0
            res = categorise(prof.events(), classifier)
            res["wall_us"] = wall * 1e6
            results.append(res)
    # the profiled step with the median wall time
    res = sorted(results, key=lambda r: r["wall_us"])[len(results) // 2]
    ops_us = sum(v for k, v in res["totals"].items() if k != "python_scope")
    res["ops_us"] = ops_us
    res["python_us"] = res["wall_us"] - ops_us
    res["plain_median_us"] = statistics.median(plain) * 1e6 if plain else None
    del runner
    gc.collect()
    return res


def run_profile(args) -> dict:
    cases = [("fp32", "infer"), ("bf16", "infer"), ("fp32", "train")]
    if args.bf16_train:
        cases.append(("bf16", "train"))
    if args.cases:
        cases = [tuple(c.split("-")) for c in args.cases]
    out = {}
    for dtype, mode in cases:
        batch = args.bf16_batch_size if dtype == "bf16" and args.bf16_batch_size else args.batch_size
        case = Case(MODEL, 256, batch, dtype, mode)
        for impl in args.impls:
            key = f"{dtype} {mode} {impl}"
            print(f"profiling {key}", file=sys.stderr, flush=True)
            out[key] = profile_case(impl, case, args.warmup, args.steps, args.timed)
            out[key]["batch_size"] = batch
            r = out[key]
            print(f"  wall {r['wall_us'] / 1e3:.0f} ms (unprofiled {r['plain_median_us'] / 1e3:.0f} ms), "
                  f"linear {r['totals'].get('linear_gemm', 0) / 1e3:.0f} ms", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------
# GEMM shapes timed alone
# --------------------------------------------------------------------------------------


def gemm_shapes(batch: int, model_name: str = MODEL, img: int = 256) -> list[dict]:
    """Every Linear of the network: name, M (tokens), K, N and how many times it runs."""
    v = get_variant(model_name)
    out = []
    side = img // 4
    for i, depth in enumerate(v.depths):
        C = v.embed_dim * 2**i
        M = batch * side * side
        for name, K, N in (("qkv", C, 3 * C), ("proj", C, C), ("fc1", C, 4 * C), ("fc2", 4 * C, C)):
            out.append(dict(name=f"{name} s{i}", M=M, K=K, N=N, count=depth, bias=True))
        if i < len(v.depths) - 1:
            out.append(dict(name=f"reduction s{i}", M=M // 4, K=4 * C, N=2 * C, count=1, bias=False))
            side //= 2
    C = v.embed_dim * 2 ** (len(v.depths) - 1)
    out.append(dict(name="head", M=batch, K=C, N=v.num_classes, count=1, bias=True))
    return out


def time_gemm(shape: dict, dtype: torch.dtype, repeats: int, reference: int = 0) -> tuple[float, float | None]:
    """Median seconds of the shape's F.linear; with ``reference`` = n, each repeat also times an
    n^3 matmul just before it, and the median ratio of the two FLOP rates is returned too, so
    that a machine whose speed drifts (shared cores) still gives a fair fraction."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape["M"], shape["K"], generator=gen).to(dtype)
    w = (torch.randn(shape["N"], shape["K"], generator=gen) * 0.02).to(dtype)
    b = torch.zeros(shape["N"], dtype=dtype) if shape["bias"] else None
    if reference:
        a = torch.randn(reference, reference, generator=gen).to(dtype)
        a @ a
    F.linear(x, w, b)
    times, ratios = [], []
    flops = 2 * shape["M"] * shape["K"] * shape["N"]
    for _ in range(repeats):
        if reference:
            t0 = time.perf_counter()
            a @ a
            t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        F.linear(x, w, b)
        times.append(time.perf_counter() - t0)
        if reference:
            ratios.append((flops / times[-1]) / (2 * reference**3 / t_ref))
    return statistics.median(times), (statistics.median(ratios) if ratios else None)


def run_gemm(args, previous: dict | None = None) -> dict:
    dtypes = args.gemm_dtypes
    rates = {"fp32": matmul_rate(torch.float32)}
    rates["bf16"] = (matmul_rate(torch.bfloat16, n=args.bf16_rate_n) if "bf16" in dtypes
                     else (previous or {}).get("rates", {}).get("bf16"))
    old_rows = {r["name"]: r for r in (previous or {}).get("shapes", [])}
    rows = []
    bf16_batch = args.bf16_batch_size or args.batch_size
    for shape, small in zip(gemm_shapes(args.batch_size), gemm_shapes(bf16_batch)):
        row = dict(shape)
        flops = 2 * shape["M"] * shape["K"] * shape["N"]
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if name not in dtypes:  # keep an earlier run's numbers
                row.update({k: v for k, v in old_rows.get(shape["name"], {}).items() if k.startswith(name)})
                continue
            # bf16 may be timed at fewer tokens (slow where the CPU has no bf16 instructions);
            # the time is scaled to the full token count
            timed = small if name == "bf16" else shape
            t, rel = time_gemm(timed, dtype, args.gemm_repeats, reference=2048 if name == "fp32" else 0)
            t *= shape["M"] / timed["M"]
            row[f"{name}_s"] = t
            row[f"{name}_gflops"] = flops / t / 1e9
            row[f"{name}_of_rate"] = rel
        rows.append(row)
        print(f"  {shape['name']:>14} M={shape['M']:>6} K={shape['K']:>4} N={shape['N']:>4}: "
              f"fp32 {row.get('fp32_gflops', 0):.0f} ({row.get('fp32_of_rate') or 0:.0%} of 2048^3 beside it), "
              f"bf16 {row.get('bf16_gflops', 0):.1f} GFLOP/s", file=sys.stderr, flush=True)
    out = dict(rates=rates, shapes=rows, bf16_batch_size=bf16_batch, bf16_rate_n=args.bf16_rate_n)
    if "bf16" not in dtypes and previous:
        out.update({k: previous[k] for k in ("bf16_batch_size", "bf16_rate_n") if k in previous})
    return out


def linear_fraction(gemm: dict) -> float | None:
    """FLOP rate of all the Linear GEMMs of a forward, as a fraction of the 2048^3 rate, from the
    per-shape fractions measured beside a 2048^3 matmul: 1 / sum(flop share / fraction)."""
    rows = gemm["shapes"]
    if any(r.get("fp32_of_rate") is None for r in rows):
        return None
    total = sum(2 * r["M"] * r["K"] * r["N"] * r["count"] for r in rows)
    return 1 / sum(2 * r["M"] * r["K"] * r["N"] * r["count"] / total / r["fp32_of_rate"] for r in rows)


def gemm_batch(data: dict) -> int:
    return data.get("gemm_batch_size", 32)


# --------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------


def bounds(data: dict) -> dict:
    prof, gemm = data.get("profile", {}), data.get("gemm")
    out = {}
    per_image = 2 * create_model(MODEL, img_size=256, device="meta").flops(256)
    for key in {k.rsplit(" ", 1)[0] for k in prof}:
        s, t = prof.get(f"{key} swinv2"), prof.get(f"{key} timm")
        if not (s and t):
            continue
        batch = s["batch_size"]
        flops = per_image * batch

        def scaled(r, cat):  # a category's share of the step, applied to the unprofiled time
            return r["totals"].get(cat, 0.0) / r["wall_us"] * r["plain_median_us"]

        t_total, s_total = t["plain_median_us"], s["plain_median_us"]
        t_gemm, s_gemm = scaled(t, "linear_gemm"), scaled(s, "linear_gemm")
        gemm_floor = min(t_gemm, s_gemm)
        row = dict(
            timm_ms=t_total / 1e3, swinv2_ms=s_total / 1e3, speedup_now=t_total / s_total,
            timm_gemm_ms=t_gemm / 1e3, swinv2_gemm_ms=s_gemm / 1e3,
            amdahl_bound=t_total / gemm_floor,
            bound_keeping_attention=t_total / (gemm_floor + scaled(s, "attn_matmul")),
        )
        frac = linear_fraction(gemm) if gemm else None
        if frac and key == "fp32 infer":
            # With every op but the Linear GEMMs free, and those at the fraction of the 2048^3
            # rate that their shapes reach: model FLOPs over Linear FLOPs, times that fraction.
            linear_flops = sum(2 * r["M"] * r["K"] * r["N"] * r["count"] for r in gemm["shapes"])
            linear_flops *= batch / gemm_batch(data)
            row["linear_fraction"] = frac
            row["model_over_linear_flops"] = flops / linear_flops
            row["metric_ceiling"] = flops / linear_flops * frac
            # the metric now, if the Linear GEMMs ran at that fraction and took the profiled share
            row["metric_now_est"] = row["metric_ceiling"] * s["totals"].get("linear_gemm", 0.0) / s["wall_us"]
        out[key] = row
    return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _frac(row: dict, rates: dict) -> str:
    rel = row.get("fp32_of_rate")
    return f"{rel:.0%}" if rel is not None else f"{row['fp32_gflops'] * 1e9 / rates['fp32']:.0%}"


def report(data: dict) -> str:
    lines = []
    prof = data.get("profile", {})
    for key in dict.fromkeys(k.rsplit(" ", 1)[0] for k in prof):
        impls = [i for i in ("swinv2", "timm") if f"{key} {i}" in prof]
        batch = prof[f"{key} {impls[0]}"].get("batch_size", "?")
        lines += [f"### {key}, batch {batch}", "",
                  "| category | " + " | ".join(f"{i} ms | {i} %" for i in impls) + " |",
                  "|---|" + "---|---|" * len(impls)]
        rs = [prof[f"{key} {i}"] for i in impls]
        for cat in CATEGORIES:
            if not any(r["totals"].get(cat) for r in rs):
                continue
            cells = []
            for r in rs:
                v = r["totals"].get(cat, 0.0)
                cells.append(f"{v / 1e3:.0f} | {v / r['wall_us']:.1%}")
            lines.append(f"| {LABELS[cat]} | " + " | ".join(cells) + " |")
        cells = [f"{r['python_us'] / 1e3:.0f} | {r['python_us'] / r['wall_us']:.1%}" for r in rs]
        lines.append("| between ops (Python, dispatch) | " + " | ".join(cells) + " |")
        cells = [f"**{r['wall_us'] / 1e3:.0f}** | 100%" for r in rs]
        lines.append("| **step under the profiler** | " + " | ".join(cells) + " |")
        cells = [f"{r['plain_median_us'] / 1e3:.0f} | " for r in rs]
        lines.append("| step without the profiler (median) | " + " | ".join(cells) + " |")
        lines.append("")
        for impl, r in zip(impls, rs):
            top = sorted(r.get("ops", {}).items(), key=lambda kv: -kv[1])
            top = [(k, v) for k, v in top if not k.startswith("linear_gemm")][:8]
            if top:
                lines.append(f"Largest non-GEMM ops, {impl}: "
                             + "; ".join(f"{k} {v / 1e3:.0f} ms" for k, v in top) + "\n")
        layers = sorted({n for r in rs for n in r["gemm_layers"]})
        if layers and key.endswith("infer"):
            lines += ["Forward Linear GEMM time per layer (ms, summed over blocks): "
                      + "; ".join(f"{n} " + "/".join(f"{r['gemm_layers'].get(n, 0) / 1e3:.0f}" for r in rs)
                                  for n in layers) + f" ({'/'.join(impls)})", ""]
    gemm = data.get("gemm")
    if gemm:
        r = gemm["rates"]
        nb = gemm.get("bf16_rate_n", 2048)
        lines += [f"### Linear GEMMs alone (matmul rate: fp32 2048^3 {r['fp32'] / 1e9:.0f}, "
                  f"bf16 {nb}^3 {r['bf16'] / 1e9:.1f} GFLOP/s; bf16 timed at batch "
                  f"{gemm.get('bf16_batch_size')} and scaled)", "",
                  "| layer | M x K x N | runs | fp32 ms | fp32 GFLOP/s | of 2048^3 beside it "
                  "| bf16 ms | bf16 GFLOP/s | of bf16 rate |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in gemm["shapes"]:
            lines.append(
                f"| {s['name']} | {s['M']} x {s['K']} x {s['N']} | {s['count']} | {s['fp32_s'] * 1e3:.1f} | "
                f"{s['fp32_gflops']:.0f} | {_frac(s, r)} | {s['bf16_s'] * 1e3:.1f} | "
                f"{s['bf16_gflops']:.1f} | {s['bf16_gflops'] * 1e9 / r['bf16']:.0%} |")
        for dt in ("fp32", "bf16"):
            t = sum(s[f"{dt}_s"] * s["count"] for s in gemm["shapes"])
            f = sum(2 * s["M"] * s["K"] * s["N"] * s["count"] for s in gemm["shapes"])
            frac = linear_fraction(gemm) if dt == "fp32" else None
            frac = f"{frac:.0%} of the 2048^3 rate, from the per-shape fractions" if frac else \
                f"{f / t / r[dt]:.0%} of the {gemm.get('bf16_rate_n', 2048)}^3 rate"
            lines.append(f"\nAll Linear GEMMs of one forward, {dt}: {t * 1e3:.0f} ms, {f / t / 1e9:.1f} GFLOP/s "
                         f"({frac}).")
        lines.append("")
    b = data.get("bounds")
    if b:
        lines += ["### Bounds (step times without the profiler; GEMM time = the profiled share of it)", "",
                  "| case | timm ms | swinv2 ms | timm / swinv2 | timm Linear GEMM ms | swinv2 Linear GEMM ms "
                  "| bound: timm / GEMM | bound if attention stays too |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, row in b.items():
            lines.append(f"| {key} | {row['timm_ms']:.0f} | {row['swinv2_ms']:.0f} | {row['speedup_now']:.2f}x | "
                         f"{row['timm_gemm_ms']:.0f} | {row['swinv2_gemm_ms']:.0f} | {row['amdahl_bound']:.2f}x | "
                         f"{row['bound_keeping_attention']:.2f}x |")
            if "metric_ceiling" in row:
                lines.append(
                    f"\n{key}: the Linear GEMMs reach {row['linear_fraction']:.0%} of the 2048^3 rate together; "
                    f"model FLOPs (official count) are {row['model_over_linear_flops']:.2f}x the Linear FLOPs, so "
                    f"with everything else free the 'of matmul rate' metric is at most "
                    f"**{row['metric_ceiling']:.0%}**; with the profiled GEMM share it is about "
                    f"{row['metric_now_est']:.0%}.\n")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["profile", "gemm", "bound", "all", "report"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--impls", nargs="+", default=["swinv2", "timm"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="profiled steps per case (the median is kept)")
    p.add_argument("--timed", type=int, default=2, help="unprofiled steps timed per case")
    p.add_argument("--gemm-repeats", type=int, default=5)
    p.add_argument("--gemm-dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--bf16-train", action="store_true", help="also profile the bf16 training step")
    p.add_argument("--bf16-batch-size", type=int, default=0,
                   help="batch for the bf16 cases and bf16 GEMMs (default: --batch-size)")
    p.add_argument("--bf16-rate-n", type=int, default=2048,
                   help="size of the bf16 n^3 matmul rate (smaller where bf16 is emulated and slow)")
    p.add_argument("--cases", nargs="+", default=None, metavar="DTYPE-MODE",
                   help="profile only these, e.g. fp32-infer bf16-train (default: fp32 and bf16 infer, fp32 train)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/breakdown.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        with open(args.out) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    if args.what in ("profile", "all"):
        data["profile"] = {**data.get("profile", {}), **run_profile(args)} if args.cases else run_profile(args)
    if args.what in ("gemm", "all"):
        data["gemm"] = run_gemm(args, data.get("gemm"))
    if args.what in ("bound", "all", "profile", "gemm"):
        data["bounds"] = bounds(data)
    data.setdefault("gemm_batch_size", args.batch_size)
    if args.what in ("gemm", "all"):
        data["gemm_batch_size"] = args.batch_size
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(report(data))


if __name__ == "__main__":
    main()
