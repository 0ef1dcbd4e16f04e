"""The engine modes a benchmark compares (fusion, nofusion, eager, multi-step) as ``LLM`` keyword arguments, and
building, recording and releasing the engine of one mode.

``nanovllm`` is imported only when an engine is built, so importing this module needs no GPU.
"""
from __future__ import annotations

import gc
import math
import time
from typing import Any

from .accelerator import free_accelerator_memory


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
