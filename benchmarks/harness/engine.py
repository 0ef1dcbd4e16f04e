"""Engines for the benchmarks: build one per mode, drive its step loop from the benchmark side and time each step.

The engine keeps no timers for the benchmarks: :func:`run_timed` adds the requests with ``engine.add_request``
and calls ``engine.step()`` itself, timing every call between device synchronisations. A step is a prefill step
when a sequence that had no output token took part in it (the scheduler never mixes prefill and decode in one
step); every other step is a decode step (a round of up to ``num_scheduler_steps`` model steps).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from . import engine_modes, floors, workloads
from .timing import synchronize

TEMPERATURE: float = 0.6  # the offline workload's sampling temperature

# The engine settings each benchmark mode stands for (LLM keyword arguments).
MODES: dict[str, dict[str, Any]] = {
    "fusion": {"compile_fusion": True, "enforce_eager": False},     # coconut backend + CUDA graphs
    "nofusion": {"compile_fusion": False, "enforce_eager": False},  # Inductor + CUDA graphs
    "eager": {"compile_fusion": False, "enforce_eager": True},      # no compile, no graphs
}


def engine_kwargs(mode: str, *, dtype: str = "auto", max_model_len: int = 4096, max_num_seqs: int = 256,
                  max_num_batched_tokens: int = 16384, gpu_memory_utilization: float = 0.9, seed: int = 0,
                  num_scheduler_steps: int | None = None, device: str | None = None,
                  tensor_parallel_size: int = 1) -> dict[str, Any]:
    """Keyword arguments of ``LLM(model, **kwargs)`` for ``mode`` (a key of :data:`MODES`).

    ``num_scheduler_steps`` and ``device`` are passed only when given (else the engine's defaults apply).

    Raises:
        ValueError: unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    kw: dict[str, Any] = dict(dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                              tensor_parallel_size=tensor_parallel_size, **MODES[mode])
    if num_scheduler_steps is not None:
        kw["num_scheduler_steps"] = num_scheduler_steps
    if device:
        kw["device"] = device
    return kw


def build(model: str, kwargs: dict[str, Any]) -> tuple[Any, float]:
    """``LLM(model, **kwargs)``; returns (the engine, build seconds)."""
    from nanovllm import LLM

    print(f"building LLM({model!r}, {kwargs})", flush=True)
    t0 = time.perf_counter()
    llm = LLM(model, **kwargs)
    dt = time.perf_counter() - t0
    print(f"built in {dt:.1f} s", flush=True)
    return llm, dt


def release(llm: Any) -> None:
    """Shut an engine down and free its GPU memory (the caller drops its own reference afterwards)."""
    engine_modes.shutdown_engine(llm)


@dataclass
class Timed:
    """What :func:`run_timed` measured for one batch of requests (seconds unless stated)."""

    wall_s: float = 0.0
    ttft_s: float = 0.0            # from the first add_request until every request has its first token
    prefill_s: float = 0.0         # sum of the prefill steps
    decode_s: float = 0.0          # sum of the decode steps (rounds)
    decode_tokens: int = 0         # tokens produced by decode steps
    prefill_steps: int = 0
    decode_rounds: int = 0
    output_tokens: list[int] = field(default_factory=list)  # per request
    cached_tokens: int = 0         # prompt tokens served by the prefix cache
    host_s: float = 0.0            # the steps' host work (the engine's host_seconds; overlapped by async scheduling)

    def decode_step_ms(self, batch: int) -> float:
        """Mean time of one decode step of the whole batch: decode_s / (decode_tokens / batch), in ms."""
        if self.decode_tokens <= 0:
            raise RuntimeError("no decode token was produced")
        return self.decode_s / (self.decode_tokens / batch) * 1e3


def run_timed(llm: Any, prompts: list[list[int]], params: Any) -> Timed:
    """Run ``prompts`` to completion on ``llm``'s engine, timing each step from the outside.

    Args:
        llm: a ``nanovllm.LLM``.
        prompts: token-id lists.
        params: one ``SamplingParams`` or one per prompt.

    Returns:
        :class:`Timed`.

    Raises:
        RuntimeError: the engine stopped making progress (no step in 10 minutes finished anything).
    """
    eng = llm.engine
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    synchronize()
    t_start = time.perf_counter()
    seqs = [eng.add_request(list(p), sp) for p, sp in zip(prompts, params_list)]
    out = Timed()
    host0 = eng.stats.host_seconds
    first_token_done = False
    while not eng.is_finished():
        before = [s.num_completion_tokens for s in seqs]
        t0 = time.perf_counter()
        eng.step()
        if not eng.round_in_flight:  # with a round in flight, waiting for the device would undo async scheduling
            synchronize()
        dt = time.perf_counter() - t0
        gained = [s.num_completion_tokens - b for s, b in zip(seqs, before)]
        is_prefill = any(g > 0 and b == 0 for g, b in zip(gained, before)) or not any(gained)
        if is_prefill:
            out.prefill_s += dt
            out.prefill_steps += 1
        else:
            out.decode_s += dt
            out.decode_tokens += sum(gained)
            out.decode_rounds += 1
        if not first_token_done and all(s.num_completion_tokens > 0 for s in seqs):
            out.ttft_s = time.perf_counter() - t_start
            first_token_done = True
    out.wall_s = time.perf_counter() - t_start
    out.host_s = eng.stats.host_seconds - host0
    out.output_tokens = [s.num_completion_tokens for s in seqs]
    out.cached_tokens = sum(int(getattr(s, "num_cached_tokens", 0) or 0) for s in seqs)
    return out


def check_counts(t: Timed, want: list[int], label: str) -> None:
    """RuntimeError unless every request produced exactly its max_tokens (the workloads set ignore_eos)."""
    bad = [(i, g, w) for i, (g, w) in enumerate(zip(t.output_tokens, want)) if g != w]
    if bad or len(t.output_tokens) != len(want):
        raise RuntimeError(f"[{label}] wrong output token counts (index, got, want): {bad[:5]}")


def warm_up(llm: Any, prompt_lens: list[int], high: int = 10000, max_tokens: int = 4) -> float:
    """Untimed generates that compile and capture what the timed runs will use: one prompt per length in
    ``prompt_lens``, as one batch, ``max_tokens`` tokens each. Returns seconds."""
    from nanovllm import SamplingParams

    t0 = time.perf_counter()
    prompts = [workloads.random_prompts(1, n, seed=7770 + n, high=high)[0] for n in prompt_lens]
    llm.generate(prompts, SamplingParams(temperature=TEMPERATURE, max_tokens=max_tokens, ignore_eos=True),
                 use_tqdm=False)
    synchronize()
    return time.perf_counter() - t0


def prompt_id_high(model: str) -> int:
    """Largest prompt token id the workloads draw: 10,000, or ``vocab_size - 1`` of a smaller test checkpoint."""
    vocab = floors.load_hf_config(model).get("vocab_size")
    return min(10000, int(vocab) - 1) if vocab else 10000
