"""Shared helpers of the benchmark scripts: the JSON header, result paths per GPU kind, the offline workload, the
bandwidth floor, engine modes, JSON writing and table printing.

Nothing here imports the engine or torch at module import time, so ``benchmarks/plot.py`` can use it on a machine
without a GPU. Every result JSON starts with :func:`header` (gpu, date, commit, command, versions).
"""
from __future__ import annotations

import datetime as _dt
import functools
import gc
import json
import math
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

REPO_ROOT: str = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_DIR: str = os.path.join(REPO_ROOT, "benchmarks", "results")

# Used where no GPU is present to measure the copy bandwidth (CPU smoke tests, plots of old results): the
# device-to-device copy bandwidth measured on an H200. On a GPU, :func:`bandwidth_bytes_per_s` measures it.
DEFAULT_BANDWIDTH_BYTES_PER_S: float = 4.3e12
# Dense bf16 matrix-multiply throughput measured on an H200 (the H100 SXM has the same GH100 compute); the compute
# side of the floor matters only for prefill and large decode batches.
PEAK_BF16_FLOP_PER_S: float = 790e12


# The engine settings each benchmark mode stands for (LLM keyword arguments). "-ms8": multi-step decode, rounds
# of 8 decode steps per scheduling step (num_scheduler_steps=8); the others run one step per round.
ENGINE_MODES: dict[str, dict[str, Any]] = {
    "fusion": {"compile_fusion": True, "enforce_eager": False, "num_scheduler_steps": 1},  # coconut + CUDA graphs
    "nofusion": {"compile_fusion": False, "enforce_eager": False, "num_scheduler_steps": 1},  # Inductor + graphs
    "eager": {"compile_fusion": False, "enforce_eager": True, "num_scheduler_steps": 1},  # no compile, no graphs
    "fusion-ms8": {"compile_fusion": True, "enforce_eager": False, "num_scheduler_steps": 8},
    "nofusion-ms8": {"compile_fusion": False, "enforce_eager": False, "num_scheduler_steps": 8},
}


def build_key(mode: str) -> tuple:
    """Modes with equal keys differ only in ``num_scheduler_steps``, a runtime setting: one engine built with the
    largest of their values serves them all (``llm.engine.config.num_scheduler_steps`` is set per mode)."""
    return tuple(sorted((k, v) for k, v in ENGINE_MODES[mode].items() if k != "num_scheduler_steps"))


def engine_kwargs(args: Any, mode: str, max_num_seqs: int) -> dict[str, Any]:
    """Keyword arguments of ``LLM(model, **kwargs)`` for one mode of :data:`ENGINE_MODES`, from a benchmark's
    parsed flags (dtype, max_model_len, max_num_batched_tokens, gpu_memory_utilization, seed; tensor_parallel_size
    and device when the script has them)."""
    kw: dict[str, Any] = dict(dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              tensor_parallel_size=getattr(args, "tensor_parallel_size", 1), seed=args.seed,
                              **ENGINE_MODES[mode])
    if getattr(args, "device", None):
        kw["device"] = args.device
    return kw


def add_repo_to_path() -> None:
    """Put the repository root first on ``sys.path`` so ``import nanovllm`` works without installing it."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)


# --------------------------------------------------------------------------------------------- metadata
def _version(module: str) -> str | None:
    """``module.__version__`` or None when the module is not importable."""
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - missing or broken install: report None
        return None


def _git(*args: str) -> str | None:
    """Output of ``git <args>`` in the repository, or None when git or the repository is unavailable."""
    try:
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def gpu_info() -> dict[str, Any]:
    """Accelerator description: name, count, memory (GiB), CUDA runtime version; ``{"name": "cpu"}`` without CUDA."""
    try:
        import torch
    except Exception:  # noqa: BLE001
        return {"name": "unknown (torch not importable)"}
    if not torch.cuda.is_available():
        return {"name": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    props = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda}


def run_metadata(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything needed to reproduce / interpret a result: GPU, library versions, date, command line, git.

    Args:
        argv: the script's command line (default ``sys.argv``).

    Returns:
        dict with keys gpu, torch, triton, transformers, python, date_utc (ISO 8601), command, cwd, git_commit,
        git_dirty (True/False/None), hostname.
    """
    argv = list(sys.argv if argv is None else argv)
    status = _git("status", "--porcelain")
    return {
        "gpu": gpu_info(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(argv),
        "cwd": os.getcwd(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "hostname": platform.node(),
    }


def gpu_name() -> str:
    """Full name of CUDA device 0 (e.g. "NVIDIA H100 80GB HBM3"), or "cpu" without CUDA."""
    info = gpu_info()
    return str(info.get("name", "cpu"))


def gpu_slug(name: str | None = None) -> str:
    """Short GPU kind used as the results folder name: "h100", "h200", "a100"... from a device name such as
    "NVIDIA H200" or "NVIDIA H100 80GB HBM3"; "cpu" without CUDA; else the name lowercased with non-alphanumerics
    replaced by "-".

    Args:
        name: a device name (default: :func:`gpu_name`).
    """
    name = gpu_name() if name is None else name
    m = re.search(r"\b([A-Z]\d{2,3})\b", name.upper())
    if name.lower() == "cpu":
        return "cpu"
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def header(argv: Sequence[str] | None = None, script: str | None = None) -> dict[str, Any]:
    """The keys every result JSON starts with.

    Args:
        argv: the script's arguments after its name (default ``sys.argv[1:]``).
        script: the script path relative to the repository (default: ``sys.argv[0]`` made relative).

    Returns:
        dict: gpu (full device name, "cpu" without CUDA), date (UTC, ISO 8601), commit (git HEAD, None outside a
        checkout), commit_dirty (uncommitted changes present), command ("python benchmarks/x.py ..." that
        reproduces it), versions {torch, triton, transformers, python, cuda}.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    script = script or os.path.relpath(os.path.abspath(sys.argv[0] or "?"), REPO_ROOT)
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = gpu_info()
    return {"gpu": str(info.get("name", "cpu")),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git("rev-parse", "HEAD"), "commit_dirty": None if status is None else bool(status),
            "command": "python " + shlex.join([script, *args]),
            "versions": {"torch": _version("torch"), "triton": _version("triton"),
                         "transformers": _version("transformers"), "python": platform.python_version(),
                         "cuda": info.get("cuda")}}


def results_path(bench: str, out: str | None = None, gpu: str | None = None) -> str:
    """Where benchmark ``bench`` writes its JSON.

    ``out`` given: that path. Else, with the environment variable ``OUT`` set (the GPU machine's output folder):
    ``$OUT/<gpu>/<bench>.json``. Else on a CUDA machine ``benchmarks/results/<gpu>/<bench>.json``, and without CUDA
    a file in the temp folder (so a CPU run never overwrites committed GPU results). ``<gpu>``: :func:`gpu_slug`.
    """
    if out:
        return out
    slug = gpu or gpu_slug()
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], slug, f"{bench}.json")
    if slug == "cpu":
        return os.path.join(tempfile.gettempdir(), "nanovllm-bench-cpu", f"{bench}.json")
    return os.path.join(RESULTS_DIR, slug, f"{bench}.json")


@functools.lru_cache(maxsize=1)
def bandwidth_bytes_per_s() -> float:
    """This GPU's device-to-device copy bandwidth in bytes/s (:func:`benchmarks.harness.timing.copy_bandwidth`,
    measured once per process), or :data:`DEFAULT_BANDWIDTH_BYTES_PER_S` without CUDA."""
    try:
        import torch
        if not torch.cuda.is_available():
            return DEFAULT_BANDWIDTH_BYTES_PER_S
    except Exception:  # noqa: BLE001
        return DEFAULT_BANDWIDTH_BYTES_PER_S
    from .timing import copy_bandwidth
    return copy_bandwidth()["bytes_per_s"]


# ------------------------------------------------------------------------------------------- workload
def nano_vllm_workload(num_seqs: int = 256, seed: int = 0, max_input_len: int = 1024, max_output_len: int = 1024,
                       min_input_len: int = 100, min_output_len: int = 100) -> tuple[list[list[int]], list[int]]:
    """nano-vLLM's throughput benchmark workload (the transformers peer draws the same requests).

    ``random.seed(seed)``; first every prompt: ``[randint(0, 10000) for _ in range(randint(100, max_input_len))]``,
    then every output length: ``randint(100, max_output_len)``. With the defaults this gives 142,827 prompt
    tokens and 133,966 output tokens (the count nano-vLLM's README reports).

    ``min_input_len`` / ``min_output_len`` replace the two 100s (for small test workloads; the defaults give the
    reference workload exactly).

    Note: this reseeds Python's global ``random`` module (as the reference benchmark does).

    Returns:
        (prompt_token_ids, max_tokens): ``num_seqs`` lists of ints in [0, 10000], and ``num_seqs`` ints.

    Raises:
        ValueError: a minimum above its maximum.
    """
    if min_input_len > max_input_len or min_output_len > max_output_len:
        raise ValueError(f"workload lengths: need min_input_len {min_input_len} <= max_input_len {max_input_len} and "
                         f"min_output_len {min_output_len} <= max_output_len {max_output_len}")
    random.seed(seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(min_input_len, max_input_len))]
               for _ in range(num_seqs)]
    max_tokens = [random.randint(min_output_len, max_output_len) for _ in range(num_seqs)]
    return prompts, max_tokens


def random_prompts(batch: int, length: int, seed: int, high: int = 10000) -> list[list[int]]:
    """``batch`` prompts of ``length`` random token ids in [0, high], from a private ``random.Random(seed)``.

    Distinct seeds give prompts that share no KV blocks, so an engine with prefix caching cannot reuse one
    repetition's prefill in the next.
    """
    rng = random.Random(seed)
    return [[rng.randint(0, high) for _ in range(length)] for _ in range(batch)]


# ------------------------------------------------------------------------------------------- floor
def qwen3_sizes(hf_config: dict[str, Any], dtype_bytes: int = 2) -> dict[str, float]:
    """Parameter count, bytes of weights read per step, KV bytes per token, FLOPs per token of a Qwen3 model.

    Args:
        hf_config: the checkpoint's config.json as a dict (hidden_size, num_hidden_layers, num_attention_heads,
            num_key_value_heads, head_dim, intermediate_size, vocab_size, tie_word_embeddings).
        dtype_bytes: bytes per weight / KV element (2 for bf16).

    Returns:
        dict: params (count, tied lm_head counted once), weight_bytes (read once per decode step: params *
        dtype_bytes), kv_bytes_per_token (K and V over all layers), flop_per_token (2 * params, the
        usual approximation: 2 * 0.596e9 for Qwen3-0.6B).
    """
    h = int(hf_config["hidden_size"])
    n_layers = int(hf_config["num_hidden_layers"])
    n_heads = int(hf_config["num_attention_heads"])
    n_kv = int(hf_config["num_key_value_heads"])
    d = int(hf_config.get("head_dim") or h // n_heads)
    inter = int(hf_config["intermediate_size"])
    vocab = int(hf_config["vocab_size"])
    tied = bool(hf_config.get("tie_word_embeddings", False))
    per_layer = (h * (n_heads + 2 * n_kv) * d  # qkv
                 + n_heads * d * h               # o
                 + 3 * h * inter                 # gate, up, down
                 + 2 * h + 2 * d)                # input/post norms, q_norm, k_norm
    params = vocab * h * (1 if tied else 2) + n_layers * per_layer + h
    return {"params": float(params), "weight_bytes": float(params * dtype_bytes),
            "kv_bytes_per_token": float(n_layers * n_kv * d * 2 * dtype_bytes), "flop_per_token": float(2 * params)}


def bandwidth_floor(prompt_lens: Sequence[int], output_lens: Sequence[int], weight_bytes: float = 1.19e9,
                    kv_bytes_per_token: float = 28 * 8 * 128 * 2 * 2, flop_per_token: float = 2 * 0.596e9,
                    bandwidth: float = DEFAULT_BANDWIDTH_BYTES_PER_S, peak_flops: float = PEAK_BF16_FLOP_PER_S,
                    ) -> dict[str, float]:
    """Lower bound on the time of a batch-generation workload, a roofline per decode step.

    Every decode step s reads all weights once plus the K and V of every live sequence (prompt + s tokens),
    unless the step's FLOPs take longer: t_s = max((W + sum(live) * KVT) / BW, n_live * F / PEAK).
    Prefill is compute bound: sum(prompt tokens) * F / PEAK. Defaults: Qwen3-0.6B in bf16; pass the measured ``bandwidth`` of the GPU.

    Args:
        prompt_lens: prompt length of each request (tokens).
        output_lens: output tokens of each request.
        weight_bytes, kv_bytes_per_token, flop_per_token: model sizes (see :func:`qwen3_sizes`).
        bandwidth: bytes/s; peak_flops: FLOP/s.

    Returns:
        dict: output_tokens, decode_floor_s, prefill_floor_s, floor_s, output_tokens_per_s (the ceiling on
        output tokens/s: output_tokens / floor_s), and the constants used.
    """
    t = 0.0
    pairs = list(zip(prompt_lens, output_lens))
    for s in range(max(output_lens, default=0)):
        live = [p + s for p, o in pairs if s < o]
        t += max((weight_bytes + sum(live) * kv_bytes_per_token) / bandwidth, len(live) * flop_per_token / peak_flops)
    pre = sum(prompt_lens) * flop_per_token / peak_flops
    total_out = int(sum(output_lens))
    return {"output_tokens": total_out, "decode_floor_s": round(t, 4), "prefill_floor_s": round(pre, 4),
            "floor_s": round(t + pre, 4),
            "output_tokens_per_s": round(total_out / (t + pre), 1) if t + pre > 0 else float("nan"),
            "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token, "flop_per_token": flop_per_token,
            "bandwidth_bytes_per_s": bandwidth, "peak_flop_per_s": peak_flops,
            "method": "per decode step max((W + live KV bytes)/BW, FLOPs/peak); "
                      "prefill = prompt tokens * FLOP/token / peak"}


def load_hf_config(model_dir: str) -> dict[str, Any]:
    """The checkpoint's config.json as a dict ({} if it cannot be read)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f)
    except Exception:  # noqa: BLE001
        return {}


# ------------------------------------------------------------------------------------------- engine
def engine_config(llm: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The engine settings to record: the keyword arguments given to ``LLM`` plus, best effort, the fields of
    the engine's resolved config object (found as ``llm.config`` / ``llm.engine.config`` / ...).

    Values that are not JSON scalars are converted with ``str``; the HF config object is skipped.
    """
    out: dict[str, Any] = {"kwargs": {k: _jsonable(v) for k, v in kwargs.items()}}
    for path in ("config", "engine.config", "llm_engine.config", "model_runner.config", "engine.model_runner.config"):
        obj: Any = llm
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is None:
            continue
        fields = getattr(obj, "__dict__", None)
        if isinstance(fields, dict):
            out["resolved"] = {k: _jsonable(v) for k, v in fields.items()
                               if not k.startswith("_") and k not in ("hf_config",)}
            out["resolved_from"] = "llm." + path
            break
    return out


def _jsonable(v: Any) -> Any:
    """``v`` if it is a JSON scalar / list / dict of those, else ``str(v)``."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def mode_engine(mode: str, model: str, part: str, build_kwargs: Any, llm: Any = None,
                engine_kwargs: dict[str, Any] | None = None, init_s: float | None = None,
                **entry: Any) -> tuple[Any, dict[str, Any], dict[str, Any], bool]:
    """The engine a benchmark part measures one mode on: built here (``llm`` None) or the caller's prebuilt one.

    Args:
        mode: a key of :data:`ENGINE_MODES`; model: the checkpoint folder; part: its name in the log line.
        build_kwargs: called without arguments for ``LLM(model, **kwargs)`` when the engine is built here.
        llm, engine_kwargs, init_s: a prebuilt engine, the keywords it was built with and its build time in
            seconds (None if unknown).
        entry: more keys of the returned result entry (e.g. ``batches={}``).

    Returns:
        (llm, kwargs, entry, own): ``entry`` holds mode, llm_kwargs, init_s (and ``prebuilt_engine: True`` for a
        prebuilt engine); ``own`` is True when the engine was built here, so the caller shuts it down
        (:func:`shutdown_engine`, then ``del`` its reference, then :func:`free_accelerator_memory`).
    """
    if llm is None:
        from nanovllm import LLM

        kw = build_kwargs()
        print(f"\n=== mode {mode}: LLM({model!r}, {kw})", flush=True)
        t0 = time.perf_counter()
        llm = LLM(model, **kw)
        built_s = time.perf_counter() - t0
        print(f"[{mode}] engine built in {built_s:.1f} s", flush=True)
        return llm, kw, {"mode": mode, "llm_kwargs": ENGINE_MODES[mode], "init_s": round(built_s, 2), **entry}, True
    print(f"\n=== mode {mode}: {part} on the prebuilt engine", flush=True)
    res = {"mode": mode, "llm_kwargs": ENGINE_MODES[mode], "init_s": None if init_s is None else round(init_s, 2),
           "prebuilt_engine": True, **entry}
    return llm, dict(engine_kwargs or {}), res, False


def shutdown_engine(llm: Any) -> None:
    """Release an ``LLM`` and its GPU memory: call its exit/shutdown method if it has one, then
    ``gc.collect()``, ``torch.cuda.empty_cache()`` and ``torch._dynamo.reset()`` (so the next engine in this
    process compiles from scratch instead of hitting dynamo's recompile limit).

    The caller must drop its own references (``del llm``) after calling this.
    """
    for name in ("exit", "shutdown", "close"):
        fn = getattr(llm, name, None)
        if callable(fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - best effort cleanup
                print(f"[cleanup] llm.{name}() raised {type(e).__name__}: {e}")
            break
    gc.collect()
    free_accelerator_memory()


def free_accelerator_memory(report: bool = False) -> None:
    """``torch._dynamo.reset()``, ``gc.collect()``, ``torch.cuda.empty_cache()`` when CUDA is present; with
    ``report``, print the GPU memory still allocated / reserved (a leak here shrinks the next engine's KV cache
    or makes it run out of memory)."""
    try:
        import torch
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            if report:
                free, total = torch.cuda.mem_get_info()
                print(f"[cleanup] GPU memory after release: allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, "
                      f"reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB, free {free / 2**30:.1f} of "
                      f"{total / 2**30:.1f} GiB", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"[cleanup] {type(e).__name__}: {e}")


def synchronize() -> None:
    """``torch.cuda.synchronize()`` when CUDA is available (so wall-clock timings include queued GPU work)."""
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run ``fn(*args, **kwargs)`` between two device synchronisations; return (result, seconds of wall clock)."""
    synchronize()
    t0 = time.perf_counter()
    r = fn(*args, **kwargs)
    synchronize()
    return r, time.perf_counter() - t0


def median(xs: Iterable[float]) -> float:
    """Median of a non-empty sequence (mean of the two middle values for an even count)."""
    s = sorted(xs)
    if not s:
        raise ValueError("median of an empty sequence")
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


# ------------------------------------------------------------------------------------------- output
def default_out(name: str) -> str:
    """Default JSON path of a part that a benchmark script merges into its own file: a file in the temp folder."""
    return os.path.join(tempfile.gettempdir(), "nanovllm-bench-parts", f"{name}.json")


def write_json(path: str, obj: dict[str, Any]) -> str:
    """Write ``obj`` as indented JSON (non-JSON values converted with ``str``), creating parent folders.

    Writes to ``path + '.tmp'`` then renames, so an interrupted run never leaves a truncated file.
    Returns the absolute path.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def fmt(v: Any, digits: int = 3) -> str:
    """Format a table cell: floats with ``digits`` significant digits (thousands separated above 1e4), None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:,.{max(digits - len(str(int(abs(v)))), 0)}f}"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A GitHub-markdown table (cells formatted with :func:`fmt`, columns padded), optionally titled."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n### {title}")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """Print :func:`format_table` and flush."""
    print(format_table(headers, rows, title), flush=True)


def run_in_spawned_workers(fn: Any, jobs: Sequence[Any], workers: int) -> float:
    """``fn(job)`` for every job in up to ``workers`` spawned processes (each initializes CUDA on its own): used to
    compile Triton kernels in parallel into Triton's on-disk cache before a benchmark times them. ``fn`` must be
    importable by name (a module-level function). A failure of the pool is printed, not raised: the timing loop
    then compiles whatever is missing. Returns the seconds spent."""
    t0 = time.time()
    if workers > 0 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        try:
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
                list(ex.map(fn, jobs))
        except Exception as e:  # noqa: BLE001
            print(f"[precompile] workers failed ({type(e).__name__}: {e}); compiling in this process", flush=True)
    return time.time() - t0
