"""Draw docs/img/architecture.png: the components of the engine and the backend, and the data flow of one step.

Usage: ``python scripts/draw_architecture.py [--out docs/img/architecture.png]`` (matplotlib only).
"""
from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (x, y, width, height, title, files, colour); coordinates in a 16 x 10 canvas
BOXES: dict[str, tuple[float, float, float, float, str, str, str]] = {
    "llm": (0.3, 8.2, 3.6, 1.4, "LLM / LLMEngine / server", "llm.py  engine/llm_engine.py  serve/\n"
            "generate(), or submit() + step_requests()", "#dbe9f6"),
    "sched": (4.6, 8.2, 3.6, 1.4, "Scheduler", "engine/scheduler.py\nprefill (chunked) or decode, preempt", "#dbe9f6"),
    "blocks": (8.9, 8.2, 3.4, 1.4, "BlockManager", "engine/block_manager.py\npaged blocks, prefix hashes", "#dbe9f6"),
    "runner": (4.6, 5.6, 3.6, 1.8, "ModelRunner", "engine/model_runner.py input_buffers.py\ninputs: ids, positions, slot mapping,\n"
               "block tables, context lens;\nCUDA graph replay (cuda_graphs.py)", "#e3f1dc"),
    "model": (8.9, 5.6, 3.4, 1.8, "Model", "models/  layers/\nembed, N x (norm, qkv, attention,\no_proj, "
              "norm, gate_up, down), head", "#e3f1dc"),
    "kv": (12.9, 5.6, 2.8, 1.8, "Paged KV cache", "[2, layers, blocks,\nblock_size, kv_heads,\nhead_dim]", "#fbe5d6"),
    "kernels": (8.9, 2.9, 3.4, 1.9, "Engine kernels", "kernels/  (Triton + PyTorch refs)\nKV store, paged attention,\n"
                "q/k norm + RoPE, small-M linear,\nsampling", "#fbe5d6"),
    "sampler": (4.6, 2.9, 3.6, 1.9, "Sampler", "layers/sampler.py\ntemperature, top-k, top-p;\n"
                "one Gumbel-max pass on the GPU", "#e3f1dc"),
    "post": (0.3, 5.6, 3.6, 1.8, "Scheduler.postprocess", "append tokens, stop / length,\nfree blocks", "#dbe9f6"),
    "coconut": (12.9, 2.9, 2.8, 1.9, "fusion_pass (coconut)", "backend.py  patterns.py\nops.py  kernels/\nnorm -> linear "
                "in one op", "#efe0f5"),
    "compile": (12.9, 0.3, 2.8, 1.8, "torch.compile", "Dynamo -> AOT -> post-grad\npass -> Inductor code\n"
                "calls coconut ops", "#efe0f5"),
}

# (from, to, label, side offset of the label)
FLOW: list[tuple[str, str, str]] = [
    ("llm", "sched", "1 schedule"),
    ("sched", "blocks", "2 allocate / append\n(prefix hits)"),
    ("sched", "runner", "3 run / run_decode_steps"),
    ("runner", "model", "4 forward"),
    ("model", "kv", "5 store K/V,\nattend"),
    ("model", "kernels", "Triton ops"),
    ("model", "sampler", "6 logits of last tokens"),
    ("sampler", "post", "7 token ids"),
    ("post", "llm", "8 finished outputs"),
    ("coconut", "model", "fused norm -> linear\n(compile_fusion)"),
    ("compile", "coconut", "custom graph pass"),
]


def centre(name: str) -> tuple[float, float]:
    x, y, w, h = BOXES[name][:4]
    return x + w / 2, y + h / 2


def edge_point(name: str, towards: tuple[float, float]) -> tuple[float, float]:
    """The point where the line from the box's centre to ``towards`` leaves the box."""
    x, y, w, h = BOXES[name][:4]
    cx, cy = centre(name)
    dx, dy = towards[0] - cx, towards[1] - cy
    if dx == 0 and dy == 0:
        return cx, cy
    tx = (w / 2) / abs(dx) if dx else float("inf")
    ty = (h / 2) / abs(dy) if dy else float("inf")
    t = min(tx, ty)
    return cx + dx * t, cy + dy * t


def draw(out: str) -> None:
    """Render the picture to ``out`` (PNG)."""
    fig, ax = plt.subplots(figsize=(16, 10))
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 10)
    ax.axis("off")
    for x, y, w, h, title, files, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#444444", lw=1.2))
        ax.text(x + w / 2, y + h - 0.25, title, ha="center", va="top", fontsize=12, fontweight="bold")
        ax.text(x + w / 2, y + h - 0.6, files, ha="center", va="top", fontsize=9, family="monospace")
    for a, b, label in FLOW:
        p, q = edge_point(a, centre(b)), edge_point(b, centre(a))
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=16, lw=1.4, color="#333333"))
        mx, my = (p[0] + q[0]) / 2, (p[1] + q[1]) / 2
        ax.text(mx, my, label, ha="center", va="center", fontsize=9, color="#1f4e79",
                bbox=dict(fc="white", ec="none", alpha=0.85, pad=1.0))
    ax.text(0.3, 4.6, "One engine step (numbers: the order of the data flow)\n\n"
            "nanovllm (blue: scheduling, green: running the model,\norange: memory and kernels) uses fusion_pass "
            "(purple);\nfusion_pass never imports nanovllm.", fontsize=10, va="top")
    ax.text(0.3, 1.9, "Decode on the GPU: the runner replays a CUDA graph\ncaptured over the compiled model "
            "(padded batch);\nwith num_scheduler_steps = k, one round runs k steps\nbefore the host reads "
            "the tokens back.", fontsize=10, va="top")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "architecture.png"))
    args = ap.parse_args(argv)
    draw(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
