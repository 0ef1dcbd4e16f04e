"""Faults inside a step: an exception raised at any call boundary of ``LLM.generate`` leaves the engine as new.

One engine per configuration is reused by every case. A case makes one callee of the step (scheduler, block
manager, model runner, sampler, input buffers, post-processing, request admission) raise on its n-th call, n in
the middle of a clean run's calls, either before the real call runs (RuntimeError) or after it returned
(KeyboardInterrupt, so its side effects are there). After the exception:

- no KV block is held (``kv_cache_usage() == 0.0``), every reference count is 0 and no prefix hash survives;
- both queues are empty (no sequence half-scheduled); the attention context and the multi-step staging are reset;
- the next ``generate`` gives exactly the tokens of a freshly built engine (greedy, float32, tiny checkpoint).

The configuration forces chunked prefill (``max_num_batched_tokens=24``) and preemption (a 6-block pool for
three requests that need 9), so the fault also lands inside those paths; "multi" runs rounds of up to 4 decode
steps (``num_scheduler_steps=4``) with their block reservation, each next round planned and launched before the
last one is read (async scheduling); "multi-sync" the same rounds one at a time.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

from conftest import random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.utils.context import get_context

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPTS = random_prompts([20, 13, 9], seed=180)
PARAMS = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
CONFIGS = {
    "single": dict(num_scheduler_steps=1),
    "multi": dict(num_scheduler_steps=4),
    "multi-sync": dict(num_scheduler_steps=4, async_scheduling=False),
}
BASE = dict(device="cpu", kvcache_block_size=8, num_kvcache_blocks=6, max_num_seqs=4, max_num_batched_tokens=24,
            max_model_len=64)

# (owner, attribute): the callees of one step. owner is an attribute path from the LLMEngine ("" = the engine).
COMMON_TARGETS = [
    ("", "add_request"), ("", "step"),
    ("scheduler", "schedule"), ("scheduler", "_schedule_prefill"), ("scheduler", "_schedule_decode"),
    ("scheduler", "_preempt"), ("scheduler", "postprocess"), ("scheduler", "_finish_reason"),
    ("block_manager", "can_allocate"), ("block_manager", "allocate"), ("block_manager", "_take_fresh"),
    ("block_manager", "commit"), ("block_manager", "can_append"), ("block_manager", "append"),
    ("block_manager", "free"),
    ("model_runner", "run"), ("model_runner", "prepare_prefill"), ("model_runner", "prepare_decode"),
    ("model_runner", "prepare_sample"), ("model_runner", "run_model"), ("model_runner", "sampler"),
    ("model_runner.buffers", "fill_decode"), ("model_runner.buffers", "fill_sampling"),
    ("Sequence", "append_token"),
]
MULTI_TARGETS = [
    ("scheduler", "extend_decode"), ("block_manager", "reserve"), ("model_runner", "launch_decode_steps"),
    ("model_runner", "collect_decode_steps"), ("model_runner.buffers", "fill_decode_steps"),
    ("model_runner.buffers", "load_step"),
]
ASYNC_TARGETS = [("scheduler", "plan_next_round"), ("model_runner.buffers", "feed_from_round")]
SYNC_TARGETS = [("model_runner", "run_decode_steps")]
TARGETS = {"single": COMMON_TARGETS, "multi": COMMON_TARGETS + MULTI_TARGETS + ASYNC_TARGETS,
           "multi-sync": COMMON_TARGETS + MULTI_TARGETS + SYNC_TARGETS}
FAULTS = [(RuntimeError, "before"), (KeyboardInterrupt, "after")]
CASES = [(c, *t, *f) for c, targets in TARGETS.items() for t in targets for f in FAULTS]


def _owner(llm: LLM, path: str) -> Any:
    if path == "Sequence":
        return Sequence
    obj: Any = llm.engine
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def _counting(real: Callable, counter: dict) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counter["n"] += 1
        return real(*args, **kwargs)
    return wrapper


def faulty(real: Callable, fire_at: int, exc: type[BaseException], when: str, counter: dict) -> Callable:
    """``real`` wrapped to raise ``exc`` before or after its ``fire_at``-th call (a function, so that it binds
    like a method when set on a class)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counter["n"] += 1
        fire = counter["n"] == fire_at
        if fire and when == "before":
            raise exc("injected fault")
        out = real(*args, **kwargs)
        if fire:
            raise exc("injected fault")
        return out
    return wrapper


@pytest.fixture(scope="module")
def engines(tiny_ckpt: str) -> dict[str, tuple[LLM, list[list[int]], dict]]:
    """Per configuration: the reused engine, a fresh engine's tokens, and each target's call count in a clean run."""
    out = {}
    for name, kw in CONFIGS.items():
        fresh = LLM(tiny_ckpt, **BASE, **kw)
        ref = [o["token_ids"] for o in fresh.generate(PROMPTS, PARAMS, use_tqdm=False)]
        del fresh
        llm = LLM(tiny_ckpt, **BASE, **kw)
        counts = {}
        mp = pytest.MonkeyPatch()
        for path, attr in TARGETS[name]:
            counts[path, attr] = {"n": 0}
            mp.setattr(_owner(llm, path), attr, _counting(getattr(_owner(llm, path), attr), counts[path, attr]))
        try:
            got = [o["token_ids"] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
        finally:
            mp.undo()
        assert got == ref
        assert llm.stats()["num_preemptions"] > 0, "the pool was meant to force preemption"
        out[name] = (llm, ref, {k: v["n"] for k, v in counts.items()})
    return out


def assert_as_new(llm: LLM, after_fault: bool = True) -> None:
    """The state of an engine between calls: nothing queued, no block held, no step context; after a fault also
    no prefix hash (the failed step's blocks may hold partly written KV)."""
    eng = llm.engine
    assert llm.kv_cache_usage() == 0.0
    assert not eng.scheduler.waiting and not eng.scheduler.running
    bm = eng.block_manager
    bm.check_invariants()
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not after_fault or not bm.hash_to_block_id
    ctx = get_context()
    assert ctx.slot_mapping is None and ctx.block_tables is None and not ctx.kv_caches
    assert eng.model_runner.buffers._step_rows == 0
    assert eng._in_flight is None


@pytest.mark.parametrize("config, path, attr, exc, when", CASES,
                         ids=[f"{c}-{p or 'engine'}.{a}-{e.__name__}-{w}" for c, p, a, e, w in CASES])
def test_fault_at_every_call_boundary_leaves_the_engine_as_new(engines, monkeypatch, config: str, path: str,
                                                              attr: str, exc: type[BaseException], when: str) -> None:
    llm, ref, counts = engines[config]
    n = counts[path, attr]
    assert n > 0, f"{path}.{attr} is never called by this configuration: the case tests nothing"
    calls = {"n": 0}
    fire_at = (n + 1) // 2
    monkeypatch.setattr(_owner(llm, path), attr, faulty(getattr(_owner(llm, path), attr), fire_at, exc, when, calls))
    with pytest.raises(exc, match="injected fault"):
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    monkeypatch.undo()
    assert calls["n"] == fire_at
    assert_as_new(llm)
    assert [o["token_ids"] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)] == ref
    assert_as_new(llm, after_fault=False)


def test_fault_after_a_round_reserved_blocks(engines, monkeypatch) -> None:
    """The multi-step case where the most is held beyond the sequences' tokens: blocks reserved for a round and
    its staged inputs, when the round fails before its first model call."""
    llm, ref, _ = engines["multi"]
    runner = llm.engine.model_runner
    seen = {}

    def failing_round(seqs: list[Sequence], num_steps: int, after: Any = None) -> Any:
        seen["extra"] = sum(len(s.block_table) - s.num_blocks for s in seqs)
        runner.prepare_decode(seqs, num_steps)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "launch_decode_steps", failing_round)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    monkeypatch.undo()
    assert seen["extra"] > 0  # the fault hit a round that had reserved blocks
    assert_as_new(llm)
    assert [o["token_ids"] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)] == ref


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_fault_in_an_online_step_leaves_the_engine_as_new(engines, monkeypatch, exc: type[BaseException]) -> None:
    """The server's loop (``submit`` / ``step_requests``) recovers the same way: the failed requests are named in
    ``last_failed_request_ids`` and the next requests get a fresh engine's tokens."""
    llm, ref, _ = engines["multi"]
    eng = llm.engine

    def run_online() -> dict[int, list[int]]:
        ids = [eng.submit(p, PARAMS) for p in PROMPTS]
        got: dict[int, list[int]] = {i: [] for i in ids}
        for _ in range(200):
            for out in eng.step_requests():
                got[out.request_id] += out.new_token_ids
            if not eng.num_unfinished_requests:
                return got
        raise AssertionError("online requests did not finish")

    calls = {"n": 0}
    monkeypatch.setattr(eng.model_runner, "run", faulty(eng.model_runner.run, 3, exc, "after", calls))
    with pytest.raises(exc, match="injected fault"):
        run_online()
    monkeypatch.undo()
    assert 1 <= len(eng.last_failed_request_ids) <= len(PROMPTS)  # those not finished when the step failed
    assert_as_new(llm)
    assert list(run_online().values()) == ref
    assert_as_new(llm, after_fault=False)
