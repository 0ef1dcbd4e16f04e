"""Plot the committed GPU results (benchmarks/results/*.json) as PNGs in docs/img/.

Inputs (each optional: a missing or malformed file is reported and skipped, never fatal):

- fusion-kernel-h200.json: rows with ``site``, ``M``, ``fused_us`` (or ``op_us``, as bench_fusion_kernel.py
  writes), ``unfused_us``, ``floor_us``, optionally ``cublas_us`` (a list, or a dict holding the list under
  "rows" / "results"; rows with an "error" and no times are skipped) -> fusion_kernel_h200.png: microseconds per
  call vs M (log-log), one panel per site: fused op, unfused, cuBLAS alone, bytes floor.
- latency-h200.json (bench_latency.py) -> latency_h200.png: TPOT and TTFT vs batch size per engine mode.
- latency-ab-h200.json (bench_ab_latency.py) -> latency_ab_h200.png: decode step of the two engines per batch size
  and the per-pair step ratio B/A (median, min-max).
- throughput-h200.json (bench_throughput.py) -> throughput_h200.png: output tokens/s of each engine mode, the
  transformers peer and the bandwidth floor.
- decode-profile-h200.json (profile_decode.py) -> decode_profile_h200.png: one stacked bar per (mode, batch):
  GPU kernel time per category plus the host-overhead estimate (wall - GPU busy), ms per decode step, with the
  step's roofline floor marked; a second panel shows the same as shares of the bar.

Usage::

    python benchmarks/plot_results.py [--results benchmarks/results] [--out docs/img]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

MODE_STYLE: dict[str, dict[str, Any]] = {
    "fusion": {"label": "compile_fusion=True (coconut)", "color": "tab:green", "marker": "o"},
    "nofusion": {"label": "compile_fusion=False (Inductor)", "color": "tab:blue", "marker": "s"},
    "eager": {"label": "enforce_eager=True", "color": "tab:gray", "marker": "^"},
    "fusion-ms8": {"label": "coconut, num_scheduler_steps=8", "color": "darkgreen", "marker": "o", "linestyle": "--"},
    "nofusion-ms8": {"label": "Inductor, num_scheduler_steps=8", "color": "navy", "marker": "s", "linestyle": "--"},
}


def _load(path: str) -> Any | None:
    """Parsed JSON, or None (with a message) when the file is missing or not valid JSON."""
    if not os.path.exists(path):
        print(f"[plot] skip: {path} not found")
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as e:  # noqa: BLE001
        print(f"[plot] skip: {path}: {type(e).__name__}: {e}")
        return None


def _rows(data: Any) -> list[dict[str, Any]]:
    """The list of row dicts of the fusion-kernel JSON (a list, or under 'rows' / 'results' / 'sites')."""
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        for key in ("rows", "results", "sites", "data"):
            if isinstance(data.get(key), list):
                return [r for r in data[key] if isinstance(r, dict)]
    return []


def _num(v: Any) -> float | None:
    """float(v) for a positive finite number, else None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f > 0 and f == f and f != float("inf") else None


def _gpu(data: Any) -> str:
    """The GPU name recorded in a result's metadata ('' when absent)."""
    if isinstance(data, dict):
        meta = data.get("meta") or {}
        gpu = meta.get("gpu") if isinstance(meta, dict) else None
        if isinstance(gpu, dict):
            return str(gpu.get("name", ""))
        if isinstance(gpu, str):
            return gpu
        if isinstance(data.get("gpu"), str):
            return data["gpu"]
    return ""


def _plain_log_axes(ax: Any) -> None:
    """Label log-scaled axes with plain numbers (1, 2, 4, 8 / 5, 10, 20) instead of powers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fmt = FuncFormatter(lambda v, _pos: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            if axis is ax.yaxis:  # 1-2-5 steps, so that a range inside one decade still gets labels
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(fmt)
            axis.set_minor_formatter(NullFormatter())


def plot_fusion_kernel(data: Any, out: str, plt: Any) -> bool:
    """Microseconds per call vs M for each site: fused, unfused, bytes floor. Returns True if a PNG was written."""
    rows = _rows(data)
    sites: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "site" in r and _num(r.get("M")):
            sites.setdefault(str(r["site"]), []).append(r)
    if not sites:
        print("[plot] fusion kernel: no rows with site and M")
        return False
    n = len(sites)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for ax, (site, rs) in zip(axes.flat, sites.items()):
        rs = sorted(rs, key=lambda r: float(r["M"]))
        for keys, label, style in (
                (("unfused_us",), "unfused (Inductor norm + cuBLAS)", dict(color="tab:blue", marker="s")),
                (("cublas_us",), "cuBLAS linear alone", dict(color="tab:purple", marker=".", linestyle=":")),
                (("fused_us", "op_us"), "coconut op (dispatched)", dict(color="tab:green", marker="o")),
                (("floor_us",), "bytes floor", dict(color="black", linestyle="--", marker=""))):
            key = next((k for k in keys if any(k in r for r in rs)), keys[0])
            pts = [(float(r["M"]), _num(r.get(key))) for r in rs]
            pts = [(m, v) for m, v in pts if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(site)
        ax.set_xlabel("M (rows = tokens)")
        ax.set_ylabel("µs per call")
        ax.grid(True, which="both", alpha=0.3)
        _plain_log_axes(ax)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"RMSNorm -> Linear site, time per call{', ' + _gpu(data) if _gpu(data) else ''}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def plot_latency(data: Any, out: str, plt: Any) -> bool:
    """TPOT (left) and TTFT (right) vs batch size, one line per engine mode. Returns True if a PNG was written."""
    modes = data.get("modes", {}) if isinstance(data, dict) else {}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    drew = False
    for name, m in modes.items():
        batches = (m or {}).get("batches") or {}
        pts = sorted((int(b), v) for b, v in batches.items() if isinstance(v, dict))
        if not pts:
            continue
        st = MODE_STYLE.get(name, {"label": name})
        for ax, key in ((a1, "decode_step_ms"), (a2, "ttft_ms")):
            # the engine's own decode-step timer; the generate()-difference TPOT is noisy at large batches
            xy = [(b, _num(v.get(key, v.get("tpot_ms")))) for b, v in pts]
            xy = [(b, y) for b, y in xy if y is not None]
            if xy:
                ax.plot([p[0] for p in xy], [p[1] for p in xy], **st)
                drew = True
    if not drew:
        plt.close(fig)
        print("[plot] latency: no mode with batch figures")
        return False
    sp = [(k, _num(data.get(f"batch1_tpot_speedup{k}"))) for k in ("", "_ms8")]
    sp_text = ", ".join(f"{v:.2f}x{' (ms8)' if k else ''}" for k, v in sp if v)
    for ax, title in ((a1, "TPOT: decode step time (engine timer)" + (f"; batch-1 TPOT speedup {sp_text}" if sp_text
                                                                     else "")),
                      (a2, "TTFT (prefill of the whole batch)")):
        ax.set_yscale("log")
        _batch_axes(ax, title, "ms")
        _plain_log_axes(ax)
    model = os.path.basename(str(data.get("model", "")).rstrip("/"))
    _save(fig, out, plt, f"{model}: prompt {data.get('prompt_len')} tokens, T={data.get('max_tokens')} {_gpu(data)}")
    return True


def _batch_axes(ax: Any, title: str, ylabel: str) -> None:
    """A panel against batch size (log2 x axis): labels, title, grid, legend."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig: Any, out: str, plt: Any, suptitle: str) -> None:
    fig.suptitle(suptitle.strip())
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_throughput(data: Any, out: str, plt: Any) -> bool:
    """Horizontal bars of output tokens/s: engine modes, the transformers peer, the floor."""
    if not isinstance(data, dict):
        return False
    bars: list[tuple[str, float, str]] = []
    for name, m in (data.get("modes") or {}).items():
        v = _num((m or {}).get("output_tokens_per_s"))
        if v:
            bars.append((f"nano-vllm-coconut\n{MODE_STYLE.get(name, {}).get('label', name)}", v,
                         MODE_STYLE.get(name, {}).get("color", "tab:green")))
    peer = data.get("peer") or {}
    if _num(peer.get("output_tokens_per_s")):
        bars.append((f"transformers generate\n(first {peer.get('num_seqs', '?')} requests)",
                     float(peer["output_tokens_per_s"]), "tab:orange"))
    floor = data.get("floor") or {}
    if _num(floor.get("output_tokens_per_s")):
        bars.append(("bandwidth floor", float(floor["output_tokens_per_s"]), "lightgray"))
    if not bars:
        print("[plot] throughput: nothing to plot")
        return False
    fig, ax = plt.subplots(figsize=(9, 0.8 * len(bars) + 1.5))
    ys = range(len(bars))
    ax.barh(list(ys), [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_yticks(list(ys), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    for y, (_, v, _) in zip(ys, bars):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_xlabel("output tokens / s")
    w = data.get("workload") or {}
    ax.set_title(f"nano-vLLM workload: {w.get('num_seqs', '?')} requests, {w.get('output_tokens', '?')} output "
                 f"tokens {_gpu(data)}".strip(), fontsize=10)
    ax.set_xlim(0, max(b[1] for b in bars) * 1.18)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


DECODE_CATEGORIES: list[tuple[str, str, str]] = [  # (key in the JSON, label, colour), bottom to top
    ("fused_norm_linear", "fused norm+linear (coconut Triton)", "tab:green"),
    ("gemm", "GEMM (cuBLAS)", "tab:blue"),
    ("attention", "attention", "tab:red"),
    ("kv_store", "KV store", "tab:pink"),
    ("inductor", "Inductor elementwise / norms", "tab:cyan"),
    ("sampler", "sampler", "tab:orange"),
    ("memcpy", "memcpy / memset / copies", "tab:brown"),
    ("other", "other kernels", "tab:olive"),
]


def plot_decode_profile(data: Any, out: str, plt: Any) -> bool:
    """Stacked bars, one per (mode, batch): kernel ms per category + host overhead; the step floor as a black tick.

    Returns True if a PNG was written.
    """
    if not isinstance(data, dict):
        return False
    bars: list[tuple[str, dict[str, Any]]] = []
    for mode, m in (data.get("modes") or {}).items():
        batches = (m or {}).get("batches") or {}
        for b, case in sorted(batches.items(), key=lambda kv: int(kv[0])):
            if isinstance(case, dict) and "error" not in case and _num(case.get("wall_ms")):
                bars.append((f"{mode}\nB={b}", case))
    if not bars:
        print("[plot] decode profile: no (mode, batch) case with figures")
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(2 * max(6.5, 0.95 * len(bars) + 2.5), 5.2))
    xs = list(range(len(bars)))
    for ax, share in ((a1, False), (a2, True)):
        bottom = [0.0] * len(bars)
        segments = [(lab, col, [float(((c.get("categories") or {}).get(key) or {}).get("ms") or 0.0) for _, c in bars])
                     for key, lab, col in DECODE_CATEGORIES]
        segments.append(("host overhead (wall - GPU busy, estimate)", "lightgray",
                         [max(float(c.get("host_ms") or 0.0), 0.0) for _, c in bars]))
        totals = [sum(seg[2][i] for seg in segments) or 1.0 for i in xs]
        for lab, col, vals in segments:
            ys = [v / totals[i] * 100 if share else v for i, v in enumerate(vals)]
            if any(y > 0 for y in ys):
                ax.bar(xs, ys, bottom=bottom, color=col, label=lab, width=0.7,
                       hatch="//" if col == "lightgray" else None, edgecolor="white", linewidth=0.5)
            bottom = [b + y for b, y in zip(bottom, ys)]
        if not share:
            for i, (_, c) in enumerate(bars):
                floor = _num(c.get("floor_ms"))
                if floor:
                    ax.hlines(floor, i - 0.42, i + 0.42, colors="black", linewidth=2.2,
                              label="roofline floor of the step" if i == 0 else None)
                frac = _num(c.get("fraction_of_floor"))
                ax.text(i, bottom[i], f"{float(c['wall_ms']):.2f} ms" + (f"\n{frac:.0%} of floor" if frac else ""),
                        ha="center", va="bottom", fontsize=7)
            ax.set_ylabel("ms per decode step")
            ax.set_ylim(0, max(bottom) * 1.15)
            ax.set_title("time per decode step (kernel time by category + host overhead)", fontsize=10)
        else:
            ax.set_ylabel("% of the bar")
            ax.set_ylim(0, 100)
            ax.set_title("shares", fontsize=10)
        ax.set_xticks(xs, [lab for lab, _ in bars], fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = a1.get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="center right", fontsize=8)
    model = os.path.basename(str(data.get("model", "")).rstrip("/"))
    fig.suptitle(f"{model}: decode step profile, prompt {data.get('prompt_len')} tokens, {data.get('steps')} steps "
                 f"{_gpu(data)}".strip())
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def plot_latency_ab(data: Any, out: str, plt: Any) -> bool:
    """bench_ab_latency.py: per batch size the decode step of engine A and B (medians over the interleaved pairs,
    left) and the per-pair ratio B/A (right: median with min-max bars; 1.0 = equal, above = A faster, the dashed
    line at 0.99 = A 1 % slower; with the prefill timer, the median prefill ratio too). Returns True if a PNG was
    written."""
    rows = [r for r in (data.get("rows") or []) if isinstance(r, dict) and "ratio_median" in r] \
        if isinstance(data, dict) else []
    if not rows:
        print("[plot] latency A/B: no rows with ratios")
        return False
    modes = data.get("modes") or ["A", "B"]
    bs = [int(r["batch"]) for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for role, name in zip(("A", "B"), modes):
        st = dict(MODE_STYLE.get(name, {"label": name}))
        st["label"] = f"{role} = {st.get('label', name)}"
        a1.plot(bs, [r[role]["decode_step_ms_median"] for r in rows], **st)
    med = [r["ratio_median"] for r in rows]
    lo = [r["ratio_median"] - r["ratio_min"] for r in rows]
    hi = [r["ratio_max"] - r["ratio_median"] for r in rows]
    a2.errorbar(bs, med, yerr=[lo, hi], fmt="o-", color="tab:green", capsize=3, label="B/A per pair: median, min-max")
    pre = [(b, r["prefill_ratio_median"]) for b, r in zip(bs, rows) if r.get("prefill_ratio_median") is not None]
    if pre:  # since session 7 the script also times the prefill steps of each call
        a2.plot([b for b, _ in pre], [v for _, v in pre], "s--", color="tab:purple", label="prefill B/A, median")
    a2.axhline(1.0, color="black", linewidth=0.8)
    a2.axhline(0.99, color="tab:red", linestyle="--", linewidth=0.8, label="A 1 % slower")
    _batch_axes(a1, "decode step (engine timer), median of the pairs", "ms")
    _batch_axes(a2, f"step ratio B/A ({modes[1]} / {modes[0]})", "ratio")
    a1.set_yscale("log")
    _plain_log_axes(a1)
    a2.set_xticks(bs)
    a2.set_xticklabels([str(b) for b in bs])
    _save(fig, out, plt, f"interleaved A/B decode latency: prompt {data.get('prompt_len')} tokens, "
                         f"T={data.get('max_tokens')} {_gpu(data)}")
    return True


PLOTS: list[tuple[str, str, Callable[[Any, str, Any], bool]]] = [
    ("fusion-kernel-h200.json", "fusion_kernel_h200.png", plot_fusion_kernel),
    ("fusion-skinny-h200.json", "fusion_skinny_h200.png", plot_fusion_kernel),
    ("fusion-skinny-fixup-h200.json", "fusion_skinny_fixup_h200.png", plot_fusion_kernel),
    ("latency-h200.json", "latency_h200.png", plot_latency),
    ("latency-h200-s4.json", "latency_h200_s4.png", plot_latency),
    ("latency-ab-h200.json", "latency_ab_h200.png", plot_latency_ab),
    ("latency-ab-h200-ms1.json", "latency_ab_h200_ms1.png", plot_latency_ab),
    ("latency-h200-s5a.json", "latency_h200_s5a.png", plot_latency),
    ("latency-h200-s3c.json", "latency_h200_s3c.png", plot_latency),
    ("latency-h200-round1.json", "latency_h200_round1.png", plot_latency),
    ("latency-h200-round2.json", "latency_h200_round2.png", plot_latency),
    ("throughput-h200.json", "throughput_h200.png", plot_throughput),
    ("decode-profile-h200.json", "decode_profile_h200.png", plot_decode_profile),
    ("decode-profile-h200-s2.json", "decode_profile_h200_s2.png", plot_decode_profile),
]


def main(argv: list[str] | None = None) -> int:
    """Write every plot whose input exists; always exits 0 unless matplotlib is missing (exit 0 too, with a note)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="folder of the result JSONs")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "img"), help="folder for the PNGs")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"[plot] matplotlib not usable ({type(e).__name__}: {e}); nothing plotted")
        return 0
    os.makedirs(args.out, exist_ok=True)
    for src, dst, fn in PLOTS:
        data = _load(os.path.join(args.results, src))
        if data is None:
            continue
        path = os.path.join(args.out, dst)
        try:
            if fn(data, path, plt):
                print(f"[plot] wrote {path}")
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
            print(f"[plot] {src}: {type(e).__name__}: {e}")
            plt.close("all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
