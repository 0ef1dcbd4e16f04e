"""Async scheduling: the next decode round planned and launched before the current one's tokens are read.

CPU, float32, the tiny checkpoint. The reference is the same engine with ``async_scheduling=False`` (rounds one at
a time), itself checked against transformers in tests/test_multistep.py; here also transformers directly.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import hf_greedy, random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BASE = dict(device="cpu", kvcache_block_size=8, max_num_seqs=8, max_model_len=128, num_scheduler_steps=4)


def count_launches(llm: LLM) -> dict[str, int]:
    """Wrap the runner's launch_decode_steps: count rounds launched plain and launched behind another."""
    runner = llm.engine.model_runner
    real = runner.launch_decode_steps
    counts = {"plain": 0, "after": 0}

    def launch(seqs: list[Sequence], num_steps: int, after: Any = None) -> Any:
        counts["after" if after is not None else "plain"] += 1
        return real(seqs, num_steps, after=after)

    runner.launch_decode_steps = launch
    return counts


def outputs(llm: LLM, prompts: list[list[int]], params: Any) -> list[tuple[list[int], str]]:
    return [(o["token_ids"], o["finish_reason"]) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_tokens_equal_rounds_one_at_a_time_and_transformers(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    """Eight requests, max_tokens 1-37 (several rounds end inside a sequence's last round), the KV pool roomy: most
    rounds are launched behind the one before, and the tokens are transformers' greedy tokens."""
    prompts = random_prompts([3, 9, 17, 24, 31, 40, 6, 12], seed=90)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (37, 3, 17, 30, 9, 25, 1, 22)]
    sync = LLM(tiny_ckpt, **BASE, async_scheduling=False)
    want = outputs(sync, prompts, params)
    llm = LLM(tiny_ckpt, **BASE)
    counts = count_launches(llm)
    got = outputs(llm, prompts, params)
    assert got == want
    assert [t for t, _ in got] == [hf_greedy(hf_model, p, sp.max_tokens) for p, sp in zip(prompts, params)]
    assert counts["after"] >= 3 and counts["plain"] >= 1, counts
    assert llm.kv_cache_usage() == 0.0 and not llm.engine.round_in_flight
    llm.engine.block_manager.check_invariants()
    assert llm.engine.stats.decode_tokens == sync.engine.stats.decode_tokens


def test_a_stop_token_inside_a_round_drops_the_planned_rounds_tokens(tiny_ckpt: str) -> None:
    """Stop tokens taken from the reference output, so that requests stop inside rounds that already have the next
    round launched behind them: the outputs still equal rounds one at a time, and no block is held afterwards."""
    prompts = random_prompts([5, 14, 22, 9, 30, 11], seed=91)
    free = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) for _ in prompts]
    ref = outputs(LLM(tiny_ckpt, **BASE, async_scheduling=False), prompts, free)
    # request i stops at its (6 + 3 i)-th token: inside the second to fourth round of 4 steps
    params = [SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[ref[i][0][6 + 3 * i]])
              for i in range(len(prompts))]
    want = outputs(LLM(tiny_ckpt, **BASE, async_scheduling=False), prompts, params)
    assert sum(reason == "stop" for _, reason in want) == len(prompts)
    llm = LLM(tiny_ckpt, **BASE)
    counts = count_launches(llm)
    assert outputs(llm, prompts, params) == want
    assert counts["after"] >= 2, counts
    assert llm.kv_cache_usage() == 0.0 and not llm.engine.round_in_flight
    llm.engine.block_manager.check_invariants()
    # the engine is as new for the next call
    assert outputs(llm, prompts, free) == ref


def test_rounds_after_a_stop_are_still_planned_ahead(tiny_ckpt: str) -> None:
    """Staggered stop tokens (request i stops at token 7 + 7 i): the finished sequences are left out of the next
    round instead of ending the overlap, so only the first decode round is launched plain."""
    prompts = random_prompts([8] * 16, seed=96)
    kw = BASE | dict(max_num_seqs=16, max_model_len=256)
    ref = outputs(LLM(tiny_ckpt, **kw, async_scheduling=False), prompts,
                  SamplingParams(temperature=0, max_tokens=120, ignore_eos=True))
    params = [SamplingParams(temperature=0, max_tokens=120, stop_token_ids=[ref[i][0][7 + 7 * i]])
              for i in range(len(prompts))]
    want = outputs(LLM(tiny_ckpt, **kw, async_scheduling=False), prompts, params)
    llm = LLM(tiny_ckpt, **kw)
    counts = count_launches(llm)
    assert outputs(llm, prompts, params) == want
    assert counts["plain"] <= 2 and counts["after"] >= 20, counts


def test_a_queue_that_cannot_be_admitted_does_not_stop_the_overlap(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    """16 requests, max_num_seqs 4: while the batch is full the waiting requests cannot be admitted, so rounds are
    still planned ahead; a round in which a sequence reaches max_tokens is read first (its slot admits the next
    request). Tokens equal transformers' greedy tokens."""
    prompts = random_prompts([8] * 16, seed=97)
    params = [SamplingParams(temperature=0, max_tokens=30 + i % 5, ignore_eos=True) for i in range(16)]
    llm = LLM(tiny_ckpt, **(BASE | dict(max_num_seqs=4)))
    counts = count_launches(llm)
    got = [t for t, _ in outputs(llm, prompts, params)]
    assert got == [hf_greedy(hf_model, p, sp.max_tokens) for p, sp in zip(prompts, params)]
    assert counts["after"] >= 2 * counts["plain"], counts
    assert llm.kv_cache_usage() == 0.0


def test_seeded_sampling_equals_rounds_one_at_a_time(tiny_ckpt: str) -> None:
    """Requests with their own seed sample at the positions of their tokens, whichever round planned them."""
    prompts = random_prompts([7, 19, 12, 26], seed=92)
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=21 + i, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    want = outputs(LLM(tiny_ckpt, **BASE, async_scheduling=False), prompts, params)
    llm = LLM(tiny_ckpt, **BASE)
    counts = count_launches(llm)
    assert outputs(llm, prompts, params) == want
    assert counts["after"] >= 3, counts


def test_preemption_and_a_short_pool_fall_back_to_rounds_one_at_a_time(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    """A 10-block pool for six requests that need more: requests wait and get preempted, so only some rounds are
    planned ahead; the tokens are still transformers' greedy tokens and nothing leaks."""
    prompts = random_prompts([20, 13, 9, 25, 17, 4], seed=93)
    params = SamplingParams(temperature=0, max_tokens=19, ignore_eos=True)
    llm = LLM(tiny_ckpt, **(BASE | dict(num_kvcache_blocks=10)))
    counts = count_launches(llm)
    got = [t for t, _ in outputs(llm, prompts, params)]
    assert got == [hf_greedy(hf_model, p, 19) for p in prompts]
    assert llm.stats()["num_preemptions"] > 0
    assert counts["plain"] > 1 and counts["after"] >= 1, counts
    assert llm.kv_cache_usage() == 0.0
    llm.engine.block_manager.check_invariants()


def test_an_abort_while_a_round_is_in_flight(tiny_ckpt: str) -> None:
    """The online loop (step_requests): a request aborted while the round after its current one is in flight ends
    with finish_reason "abort" and no token of that round; the other request is unchanged and nothing leaks."""
    prompts = random_prompts([10, 16], seed=94)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = outputs(LLM(tiny_ckpt, **BASE, async_scheduling=False), prompts, params)
    llm = LLM(tiny_ckpt, **BASE)
    eng = llm.engine
    ids = [eng.submit(p, params) for p in prompts]
    got: dict[int, list[int]] = {i: [] for i in ids}
    reasons: dict[int, str | None] = {}
    aborted_at = None
    for _ in range(100):
        for out in eng.step_requests():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        if aborted_at is None and eng.round_in_flight and len(got[ids[0]]) >= 5:
            aborted_at = len(got[ids[0]])
            eng.abort(ids[0])
        if len(reasons) == 2:
            break
    assert aborted_at is not None, "no round was in flight after the fifth token"
    assert reasons == {ids[0]: "abort", ids[1]: "length"}
    assert got[ids[0]] == want[0][0][:aborted_at]
    assert got[ids[1]] == want[1][0]
    assert eng.is_finished() and llm.kv_cache_usage() == 0.0
    eng.block_manager.check_invariants()


def test_async_scheduling_must_be_a_bool(tiny_ckpt: str) -> None:
    with pytest.raises(TypeError, match="async_scheduling"):
        LLM(tiny_ckpt, device="cpu", async_scheduling="yes")


# ---- the plan alone ------------------------------------------------------------------------------------------------
class _Cfg:
    max_num_seqs = 8
    max_num_batched_tokens = 64
    max_model_len = 40
    eos_token_ids = frozenset({2})


def _running(sched: Scheduler, lengths: list[int], max_tokens: list[int]) -> list[Sequence]:
    seqs = []
    for n, m in zip(lengths, max_tokens):
        s = Sequence(list(range(3, 3 + n)), SamplingParams(max_tokens=m, ignore_eos=True), 4)
        sched.block_manager.allocate(s)
        s.num_computed_tokens = n - 1
        s.status = SequenceStatus.RUNNING
        sched.running.append(s)
        seqs.append(s)
    return seqs


def test_plan_leaves_out_sequences_that_end_inside_the_round_and_reserves_blocks() -> None:
    """Three sequences in a round of 4 steps: one reaches max_tokens inside it (left out), one reaches
    max_model_len - 1 in the next round (the next round is cut to fit it), blocks for both rounds reserved."""
    sched = Scheduler(_Cfg(), BlockManager(64, 4))
    a, b, c = _running(sched, [10, 12, 33], [20, 3, 30])
    free = sched.block_manager.num_free_blocks
    plan = sched.plan_next_round([a, b, c], 4, 8)
    assert plan is not None
    seqs, steps = plan
    assert seqs == [a, c]  # b ends with its third token, inside the round
    assert steps == _Cfg.max_model_len - (33 + 4) + 1 == 4  # c's positions stay below max_model_len
    for s in (a, c):
        assert len(s.block_table) == -(-(len(s) + 4 + steps - 1) // 4)
    assert sched.block_manager.num_free_blocks < free


def test_plan_is_none_unless_the_next_round_continues_this_one() -> None:
    sched = Scheduler(_Cfg(), BlockManager(64, 4))
    a, b = _running(sched, [10, 12], [20, 20])
    assert sched.plan_next_round([a], 4, 8) is None  # a running sequence is not in the round
    assert sched.plan_next_round([a, b], 4, 1) is None  # one step per round
    sched.add(Sequence([5, 6, 7], SamplingParams(max_tokens=4), 4))
    assert sched.plan_next_round([a, b], 4, 8) is None  # a request waits and fits: a prefill goes first
    sched.waiting.clear()
    sched.add(Sequence(list(range(3, 3 + 4 * 60)), SamplingParams(max_tokens=4), 4))  # 60 blocks: does not fit
    assert sched.plan_next_round([a, b], 4, 8) is not None  # the queue's head cannot be admitted: plan on
    sched.waiting.clear()
    short = Scheduler(_Cfg(), BlockManager(6, 4))
    c, d = _running(short, [10, 11], [20, 20])  # 3 blocks each: nothing free for the next round
    assert short.plan_next_round([c, d], 4, 8) is None
    assert short.block_manager.num_free_blocks == 0


# ---- GPU -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_rounds_planned_ahead_equal_one_at_a_time(tiny_ckpt: str) -> None:
    """CUDA graphs, pinned read-back buffers and events: greedy tokens with stop tokens inside rounds equal rounds
    one at a time, and most rounds are launched behind the one before."""
    n = 12
    prompts = random_prompts([5 + (7 * i) % 60 for i in range(n)], seed=95)
    kw = dict(device="cuda", dtype="float32", kvcache_block_size=16, max_model_len=256, max_num_seqs=16,
              num_kvcache_blocks=200, num_scheduler_steps=8)
    free = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) for _ in prompts]
    sync = LLM(tiny_ckpt, **kw, async_scheduling=False)
    ref = outputs(sync, prompts, free)
    params = [SamplingParams(temperature=0, max_tokens=20 + i, stop_token_ids=[ref[i][0][5 + 2 * i]] if i % 2 else None,
                             ignore_eos=True) for i in range(n)]
    want = outputs(sync, prompts, params)
    del sync
    llm = LLM(tiny_ckpt, **kw)
    counts = count_launches(llm)
    assert outputs(llm, prompts, params) == want
    assert outputs(llm, prompts, free) == ref
    assert counts["after"] > counts["plain"], counts
    assert llm.kv_cache_usage() == 0.0 and not llm.engine.round_in_flight
