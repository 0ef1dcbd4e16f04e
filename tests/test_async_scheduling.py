"""Async scheduling (``async_scheduling``): a multi-step round launched before the round before it is read.

CPU, float32, the tiny checkpoint. The references are transformers' greedy decoding and the same engine with
``async_scheduling=False``; every case also checks that rounds were launched ahead (a case that launched none
would test nothing), that no KV block is left held and that the pool's invariants hold.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import hf_greedy, random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.input_buffers import StepInputBuffers
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BASE = dict(device="cpu", kvcache_block_size=16, max_num_seqs=8, max_model_len=256)


def engine(ckpt: str, k: int, ahead: bool, **kw) -> LLM:  # noqa: ANN003
    return LLM(ckpt, num_scheduler_steps=k, async_scheduling=ahead, **(BASE | kw))


def tokens(llm: LLM, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_clean(llm: LLM) -> None:
    """Nothing held or in flight after a call."""
    assert llm.kv_cache_usage() == 0.0
    assert llm.engine._in_flight is None
    llm.engine.block_manager.check_invariants()


def stopping_params(hf_model, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list, list]:  # noqa: ANN001
    """Per prompt: SamplingParams whose stop token is the greedy continuation's token at an index that is not a
    multiple of the round size (so the stop lands inside a round), and the expected tokens (up to that stop)."""
    params, expected = [], []
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        ref = hf_greedy(hf_model, p, m)
        j = next((j for j in range(3 + i % 4, m) if ref[j] not in ref[:j]), None) if i % 3 else None
        if j is None:  # no stop: runs to max_tokens
            params.append(SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
            expected.append(ref)
        else:
            params.append(SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, stop_token_ids=[ref[j]]))
            expected.append(ref[:j + 1])
    return params, expected


@pytest.mark.parametrize("k", [2, 3, 8])
def test_greedy_tokens_equal_transformers_with_stops_inside_rounds(tiny_ckpt: str, hf_model, k: int) -> None:  # noqa: ANN001
    """Ten requests, max_tokens 5-40, stop tokens landing inside rounds: the same tokens as transformers and as
    the engine without async scheduling, with rounds launched ahead."""
    prompts = random_prompts([3, 9, 17, 24, 31, 40, 48, 64, 90, 120], seed=300)
    params, expected = stopping_params(hf_model, prompts, [40, 5, 17, 40, 9, 33, 21, 40, 13, 26])
    assert sum(p.stop_token_ids is not None for p in params) >= 4
    sync, ahead = engine(tiny_ckpt, k, False), engine(tiny_ckpt, k, True)
    assert tokens(ahead, prompts, params) == tokens(sync, prompts, params) == expected
    assert ahead.stats()["decode_rounds_ahead"] > 0 and sync.stats()["decode_rounds_ahead"] == 0
    assert ahead.stats()["decode_tokens"] == sync.stats()["decode_tokens"]
    assert_clean(ahead)


def test_preemption_and_batch_limits(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    """A pool too small for every request (preemption), more requests than max_num_seqs and a token budget that
    leaves sequences out of a decode step: the same tokens as transformers, and rounds still launched ahead."""
    prompts = random_prompts([5, 30, 12, 50, 7, 22, 40, 16, 9, 33, 3, 27], seed=301)
    params, expected = stopping_params(hf_model, prompts, [30, 12, 40, 25, 8, 40, 19, 33, 40, 6, 28, 40])
    for kw in (dict(num_kvcache_blocks=14), dict(max_num_seqs=4), dict(max_num_batched_tokens=64, max_num_seqs=5)):
        llm = engine(tiny_ckpt, 4, True, **kw)
        assert tokens(llm, prompts, params) == expected, kw
        assert llm.stats()["decode_rounds_ahead"] > 0, kw
        assert_clean(llm)
    assert llm.stats()["num_preemptions"] == 0  # (the last configuration has room for all)


def test_preemption_happens_under_a_small_pool(tiny_ckpt: str) -> None:
    prompts = random_prompts([5, 30, 12, 50, 7, 22, 40, 16], seed=302)
    llm = engine(tiny_ckpt, 4, True, num_kvcache_blocks=14)
    sync = engine(tiny_ckpt, 4, False, num_kvcache_blocks=14)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    assert tokens(llm, prompts, params) == tokens(sync, prompts, params)
    assert llm.stats()["num_preemptions"] > 0 and llm.stats()["decode_rounds_ahead"] > 0
    assert_clean(llm)


def test_seeded_sampling_is_the_same_with_and_without(tiny_ckpt: str) -> None:
    """Requests with their own seed draw noise by (seed, position): a round launched ahead samples the same
    tokens as one launched after the read, stops inside rounds included."""
    prompts = random_prompts([12, 30, 7, 45, 20], seed=303)
    params = [SamplingParams(temperature=1.1, top_p=0.9, max_tokens=m, seed=40 + i, ignore_eos=True,
                             stop_token_ids=[7, 11, 13] if i % 2 else None)
              for i, m in enumerate([30, 17, 40, 9, 25])]
    sync, ahead = engine(tiny_ckpt, 4, False, seed=1), engine(tiny_ckpt, 4, True, seed=1)
    assert tokens(ahead, prompts, params) == tokens(sync, prompts, params)
    assert ahead.stats()["decode_rounds_ahead"] > 0
    assert_clean(ahead)


def test_blocks_filled_by_rounds_launched_ahead_are_cached(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    prompt = random_prompts([16], seed=304)[0]
    llm = engine(tiny_ckpt, 4, True, kvcache_block_size=4, num_kvcache_blocks=80, max_model_len=128)
    first = tokens(llm, [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    assert llm.stats()["decode_rounds_ahead"] > 0
    follow = prompt + first[:36]  # 52 tokens: 13 full blocks whose KV the first request wrote
    out = llm.generate([follow], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert out["num_cached_tokens"] == 52
    assert out["token_ids"] == hf_greedy(hf_model, follow, 4)
    assert_clean(llm)


def test_online_requests_join_and_abort_while_a_round_is_in_flight(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    """The server's loop: a request aborted while a round launched ahead holds it, and a request submitted then,
    leave the other requests' tokens as transformers' and no block held."""
    llm = engine(tiny_ckpt, 4, True)
    eng = llm.engine
    prompts = random_prompts([10, 25, 6, 14], seed=305)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ids = [eng.submit(p, params) for p in prompts[:3]]
    got: dict[int, list[int]] = {}
    finish: dict[int, str | None] = {}
    aborted = late = None
    for _ in range(200):
        for out in eng.step_requests():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finish[out.request_id] = out.finish_reason
        if aborted is None and eng._in_flight is not None and len(got.get(ids[1], [])) >= 5:
            aborted = ids[1]
            eng.abort(aborted)
            late = eng.submit(prompts[3], params)
        if not eng.num_unfinished_requests:
            break
    assert aborted is not None, "no round was in flight to abort into"
    assert finish[aborted] == "abort" and len(got[aborted]) < 30
    assert got[aborted] == hf_greedy(hf_model, prompts[1], len(got[aborted]))
    for rid, p in ((ids[0], prompts[0]), (ids[2], prompts[2]), (late, prompts[3])):
        assert got[rid] == hf_greedy(hf_model, p, 30) and finish[rid] == "length"
    assert llm.stats()["decode_rounds_ahead"] > 0
    assert_clean(llm)


def test_async_scheduling_must_be_a_bool(tiny_ckpt: str) -> None:
    with pytest.raises(TypeError, match="async_scheduling"):
        LLM(tiny_ckpt, device="cpu", async_scheduling="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_rounds_launched_ahead_equal_rounds_read_first(tiny_ckpt: str) -> None:
    """On the GPU (CUDA graphs, pinned read-back, the device-side gather of the first input ids): 19 requests, greedy
    with EOS or stop tokens and seeded sampled ones: the same tokens and finish reasons with and without async
    scheduling, and the greedy ones as with one step per round."""
    n = 19
    prompts = random_prompts([5 + (7 * i) % 60 for i in range(n)], seed=341)
    params = [SamplingParams(temperature=0, max_tokens=8 + i % 23, ignore_eos=i % 3 > 0,
                             stop_token_ids=[3, 5, 7] if i % 4 == 1 else None) if i % 5 else
              SamplingParams(temperature=0.9, top_k=40, seed=i, max_tokens=20, ignore_eos=True) for i in range(n)]
    kw = dict(device="cuda", dtype="float32", kvcache_block_size=16, max_model_len=256, max_num_seqs=12,
              num_kvcache_blocks=200)
    outs = {}
    for k, ahead in ((1, False), (8, False), (8, True)):
        llm = LLM(tiny_ckpt, num_scheduler_steps=k, async_scheduling=ahead, **kw)
        outs[k, ahead] = [(o["token_ids"], o["finish_reason"]) for o in llm.generate(prompts, params, use_tqdm=False)]
        assert (llm.stats()["decode_rounds_ahead"] > 0) == ahead
        assert_clean(llm)
        del llm
    assert outs[8, True] == outs[8, False]
    assert [o for o, p in zip(outs[8, True], params) if p.temperature == 0] == \
        [o for o, p in zip(outs[1, False], params) if p.temperature == 0]


# ---- scheduler and buffers ---------------------------------------------------------------------------------------
class _Cfg:
    max_num_seqs, max_num_batched_tokens, max_model_len, eos_token_ids = 8, 64, 64, frozenset({2})


def _running(sched: Scheduler, bm: BlockManager, lengths: list[int], max_tokens: list[int]) -> list[Sequence]:
    """Sequences in decode: prompts of ``lengths`` (one generated token each), blocks allocated, running."""
    seqs = []
    for i, (n, m) in enumerate(zip(lengths, max_tokens)):
        s = Sequence([100 * i + j for j in range(n)], SamplingParams(max_tokens=m), bm.block_size)
        bm.allocate(s)
        s.append_token(1)
        s.status = SequenceStatus.RUNNING
        s.num_computed_tokens = n
        sched.running.append(s)
        seqs.append(s)
    return seqs


def test_schedule_ahead_plans_the_next_round_and_reserves_it() -> None:
    bm = BlockManager(40, 4)
    sched = Scheduler(_Cfg(), bm)
    seqs = _running(sched, bm, [5, 9, 3], [20, 4, 30])  # the second reaches max_tokens in a round of 4
    lens = [len(s) for s in seqs]
    nxt, nxt_lens, k = sched.schedule_ahead(seqs, lens, 4, 4)
    assert nxt == [seqs[0], seqs[2]] and nxt_lens == [lens[0] + 4, lens[2] + 4] and k == 4
    for s, n in zip(nxt, nxt_lens):  # blocks for the positions the round writes: n - 1 .. n + k - 2
        assert len(s.block_table) == -(-(n + k - 1) // 4)
    bm.check_invariants()


def test_schedule_ahead_plans_nothing_when_it_must_wait() -> None:
    bm = BlockManager(40, 4)
    sched = Scheduler(_Cfg(), bm)
    seqs = _running(sched, bm, [5, 9], [20, 20])
    lens = [len(s) for s in seqs]
    free = bm.num_free_blocks
    sched.waiting.append(Sequence([1, 2, 3], SamplingParams(), 4))  # a request waits for prefill
    assert sched.schedule_ahead(seqs, lens, 4, 4) == ([], [], 1)
    sched.waiting.clear()
    assert sched.schedule_ahead(seqs[:1], lens[:1], 4, 4) == ([], [], 1)  # a running sequence is not in the round
    assert sched.schedule_ahead(seqs, lens, 4, 1) == ([], [], 1)  # one step per round
    seqs[1].status = SequenceStatus.FINISHED  # stopped: left out, and not counted as running outside the round
    sched.running.remove(seqs[1])
    nxt, _, k = sched.schedule_ahead(seqs, lens, 4, 4)
    assert nxt == [seqs[0]] and k == 4
    assert bm.num_free_blocks < free
    small = BlockManager(4, 4)  # too few free blocks for two steps: nothing, and nothing preempted
    sched2 = Scheduler(_Cfg(), small)
    two = _running(sched2, small, [7, 7], [20, 20])
    assert sched2.schedule_ahead(two, [len(s) for s in two], 4, 4) == ([], [], 1)
    assert sched2.num_preemptions == 0 and len(sched2.running) == 2


def test_chain_input_ids_gathers_the_last_tokens_of_the_round_before() -> None:
    buf = StepInputBuffers(8, 4, 4, torch.device("cpu"), max_steps=3)
    buf.begin_round()
    prev = buf.parity
    buf.step_tokens[:3, :5] = torch.arange(15).view(3, 5)  # step 2 (the last) holds 10..14
    seqs = [Sequence(list(range(n)), SamplingParams(), 4) for n in (6, 3, 9)]
    for i, s in enumerate(seqs):
        s.block_table = [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]
    buf.stage_prev_rows([4, 0, 2])
    buf.fill_decode(seqs, 4, lens=[7, 4, 10])
    buf.upload(4)
    buf.chain_input_ids(3, prev, 3)
    assert buf.input_ids[:4].tolist() == [14, 10, 12, 0]
    assert buf.positions[:3].tolist() == [6, 3, 9] and buf.context_lens[:3].tolist() == [7, 4, 10]
    assert np.array_equal(buf.np_slot_mapping[:3], [1 * 4 + 2, 4 * 4 + 3, 10 * 4 + 1])  # block ids 1, 4, 10
    buf.begin_round()
    assert buf.parity != prev and buf.step_tokens.data_ptr() != buf.round_tokens[prev].data_ptr()
