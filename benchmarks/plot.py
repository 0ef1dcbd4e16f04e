"""Plots from ``benchmarks/results/<gpu>/*.json`` into ``docs/img/``.

- ``latency_<gpu>.png``: decode step time against batch size, fusion and nofusion, with the bytes floor
  (from latency.json);
- ``step_floor_<gpu>.png``: the time of each kernel group of one batch-1 decode step against its bytes floor
  (from profile.json, part ``decode``, mode ``fusion``);
- ``decode_chain_<gpu>.png``: each kernel's share of the batch-1 decode chain against its bytes floor, us per layer
  (from decode-chain.json, key ``per_kernel_us_per_layer``, top level or under ``ablation``);
- ``throughput.png``: output tokens/s of the offline workload per GPU: fusion, nofusion, the transformers peer
  and the floor (from every throughput.json).

Each plot's title names the GPU, the date and the commit of the figures. A missing file skips its plot.

Usage::

    python benchmarks/plot.py                       # benchmarks/results -> docs/img
    python benchmarks/plot.py --results /out --img /out/img
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
    sys.path[0] = os.path.dirname(HERE)  # the repository root, not benchmarks/ (whose profile.py shadows the stdlib)
elif os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

import argparse  # noqa: E402
import json  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.harness import provenance, results_io  # noqa: E402


def load(path: str) -> dict[str, Any] | None:
    """The JSON at ``path``, or None when it does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def stamp(d: dict[str, Any]) -> str:
    """"GPU, date, commit" of a result, for a title."""
    return f"{d.get('gpu', '?')}, {str(d.get('date', '?'))[:10]}, commit {str(d.get('commit') or '?')[:8]}"


def save(fig: Any, ax: Any, out: str, plt: Any, grid: dict[str, str]) -> bool:
    """Legend, grid (``grid``: keywords of ``ax.grid``), layout, PNG at ``out``; closes the figure. Returns True."""
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3, **grid)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_latency(d: dict[str, Any], out: str, plt: Any) -> bool:
    """Decode step (ms) against batch size, fusion and nofusion, and the per-batch floor; False without rows."""
    rows = d.get("by_batch") or []
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bs = [r["batch"] for r in rows]
    for side, style in (("fusion", "o-"), ("nofusion", "s--")):
        ax.plot(bs, [r[side]["decode_step_ms_median"] for r in rows], style, label=side)
    ax.plot(bs, [r["floor_ms"] for r in rows], "k:", label="bytes floor (weights + KV at copy bandwidth)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"Decode step, {d.get('prompt_len', '?')}-token prompts\n{stamp(d)}", fontsize=9)
    return save(fig, ax, out, plt, grid=dict(which="both"))


def decode_case(d: dict[str, Any], mode: str = "fusion", batch: int = 1) -> dict[str, Any] | None:
    """The decode-profile case of ``mode`` at ``batch`` in a profile.json, or None."""
    part = (d.get("parts") or {}).get("decode") or {}
    m = (part.get("modes") or {}).get(mode) or {}
    return (m.get("batches") or {}).get(str(batch))


def plot_step_floor(d: dict[str, Any], out: str, plt: Any) -> bool:
    """Per kernel group of one batch-1 fusion decode step: measured time against its bytes floor (ms)."""
    case = decode_case(d)
    roof = (case or {}).get("roofline") or {}
    groups = [(k, v) for k, v in roof.items() if isinstance(v, dict) and v.get("achieved_ms") is not None]
    if not groups:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(groups))
    ax.bar([x - 0.2 for x in xs], [v["achieved_ms"] for _, v in groups], 0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], [v.get("floor_ms") or 0 for _, v in groups], 0.4, label="bytes floor")
    ax.set_xticks(list(xs), [k for k, _ in groups])
    ax.set_ylabel("ms per step")
    part = (d.get("parts") or {}).get("decode") or {}
    src = {**d, **{k: part[k] for k in ("gpu", "date", "commit") if isinstance(part.get(k), str)}}
    ax.set_title(f"Batch-1 decode step (fusion) by kernel group\n{stamp(src)}", fontsize=9)
    return save(fig, ax, out, plt, grid=dict(axis="y"))


def plot_decode_chain(d: dict[str, Any], out: str, plt: Any) -> bool:
    """Per kernel of one layer of the batch-1 decode chain: its share of the step against its bytes floor (us);
    False without that breakdown."""
    per = d.get("per_kernel_us_per_layer") or (d.get("ablation") or {}).get("per_kernel_us_per_layer") or {}
    if not per:
        return False
    names = list(per)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [per[k]["us_per_layer"] for k in names], 0.4, label="share of the step")
    ax.bar([x + 0.2 for x in xs], [per[k]["bytes_floor_us"] for k in names], 0.4, label="bytes floor")
    ax.set_xticks(list(xs), [k.replace("_", " ") for k in names], fontsize=8)
    ax.set_ylabel("us per layer")
    meta = d.get("meta") or {}  # the chain script's own JSON keeps GPU, date and commit there
    src = {"gpu": d.get("gpu") or (meta.get("gpu") or {}).get("name"), "date": d.get("date") or meta.get("date_utc"),
           "commit": d.get("commit") or meta.get("git_commit")}
    ax.set_title(f"Batch-1 decode chain, one layer by kernel\n{stamp(src)}", fontsize=9)
    return save(fig, ax, out, plt, grid=dict(axis="y"))


def plot_throughput(by_gpu: dict[str, dict[str, Any]], out: str, plt: Any) -> bool:
    """Output tokens/s per GPU: fusion, nofusion, the transformers peer and the floor; False without data."""
    gpus = [g for g, d in sorted(by_gpu.items()) if d.get("output_tokens_per_s")]
    if not gpus:
        return False
    series = [("fusion", lambda d: d["output_tokens_per_s"].get("fusion")),
              ("nofusion", lambda d: d["output_tokens_per_s"].get("nofusion")),
              ("transformers (subset)", lambda d: (d.get("transformers_peer") or {}).get("output_tokens_per_s")),
              ("floor", lambda d: d.get("floor_tokens_per_s"))]
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / len(series)
    for i, (name, get) in enumerate(series):
        ax.bar([g + (i - 1.5) * w for g in range(len(gpus))], [get(by_gpu[g]) or 0 for g in gpus], w, label=name)
    ax.set_xticks(range(len(gpus)), [f"{by_gpu[g].get('gpu', g)}\n{str(by_gpu[g].get('date', ''))[:10]} "
                                     f"{str(by_gpu[g].get('commit') or '')[:8]}" for g in gpus], fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Offline throughput, 256 requests (Qwen3-0.6B shape)", fontsize=9)
    return save(fig, ax, out, plt, grid=dict(axis="y"))


def main(argv: list[str] | None = None) -> int:
    """Draw every plot whose data exists; print the files written. Returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=results_io.RESULTS_DIR, help="folder holding one subfolder per GPU kind")
    ap.add_argument("--img", default=os.path.join(provenance.REPO_ROOT, "docs", "img"), help="output folder")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.img, exist_ok=True)
    gpus = sorted(g for g in os.listdir(args.results) if os.path.isdir(os.path.join(args.results, g))) \
        if os.path.isdir(args.results) else []
    written = []
    throughput: dict[str, dict[str, Any]] = {}
    for g in gpus:
        lat = load(os.path.join(args.results, g, "latency.json"))
        if lat and plot_latency(lat, p := os.path.join(args.img, f"latency_{g}.png"), plt):
            written.append(p)
        prof = load(os.path.join(args.results, g, "profile.json"))
        if prof and plot_step_floor(prof, p := os.path.join(args.img, f"step_floor_{g}.png"), plt):
            written.append(p)
        chain = load(os.path.join(args.results, g, "decode-chain.json"))
        if chain and plot_decode_chain(chain, p := os.path.join(args.img, f"decode_chain_{g}.png"), plt):
            written.append(p)
        tp = load(os.path.join(args.results, g, "throughput.json"))
        if tp:
            throughput[g] = tp
    if plot_throughput(throughput, p := os.path.join(args.img, "throughput.png"), plt):
        written.append(p)
    print("\n".join(f"wrote {w}" for w in written) or "nothing to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
