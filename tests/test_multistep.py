"""Multi-step decode (``num_scheduler_steps``): rounds of decode steps chained on the device.

CPU, float32, the tiny checkpoint; the reference is transformers' greedy decoding and the engine with one step per
round. The GPU test (CUDA graphs) runs only where a GPU is present.
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
from nanovllm.engine.sequence import Sequence

EOS = 2  # <|im_end|> of the tiny checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def engine(ckpt: str, k: int, **kw) -> LLM:  # noqa: ANN003
    base = dict(device="cpu", kvcache_block_size=16, num_kvcache_blocks=14, max_num_seqs=8, max_model_len=256)
    return LLM(ckpt, num_scheduler_steps=k, **(base | kw))


# ---- end to end --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 5, 8])
def test_greedy_tokens_equal_transformers_under_preemption(tiny_ckpt: str, hf_model, k: int) -> None:  # noqa: ANN001
    """Ten prompts in a pool of 14 blocks (preemption), max_tokens 1-40 (several not multiples of k), EOS on for some rows."""
    lengths = [3, 9, 17, 24, 31, 40, 48, 64, 90, 120]
    prompts = random_prompts(lengths, seed=80)
    max_tokens = [40, 3, 17, 40, 9, 40, 1, 33, 40, 23]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=i % 2 == 0) for i, m in enumerate(max_tokens)]
    llm = engine(tiny_ckpt, k)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, sp, out in zip(prompts, params, outs):
        ref = hf_greedy(hf_model, p, sp.max_tokens, eos_token_id=None if sp.ignore_eos else EOS)
        assert out["token_ids"] == ref
        assert out["finish_reason"] == ("stop" if ref[-1] == EOS and not sp.ignore_eos else "length")
    assert llm.kv_cache_usage() == 0.0
    llm.engine.block_manager.check_invariants()
    st = llm.engine.stats
    assert st.decode_steps > st.decode_rounds  # at least one round ran several steps
    assert llm.stats()["num_preemptions"] > 0, "the pool was meant to force preemption"


def test_rounds_cut_the_number_of_engine_steps(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    prompts = random_prompts([12, 30, 7], seed=3)
    params = SamplingParams(temperature=0, max_tokens=33, ignore_eos=True)
    one = engine(tiny_ckpt, 1, num_kvcache_blocks=-1)
    eight = engine(tiny_ckpt, 8, num_kvcache_blocks=-1)
    out1 = [o["token_ids"] for o in one.generate(prompts, params, use_tqdm=False)]
    out8 = [o["token_ids"] for o in eight.generate(prompts, params, use_tqdm=False)]
    assert out1 == out8 == [hf_greedy(hf_model, p, 33) for p in prompts]
    # 1 prefill, then 32 decode steps: one per step() call, or rounds of 8 (8 + 8 + 8 + 8)
    assert one.engine.stats.steps == 33 and one.engine.stats.decode_steps == 32
    assert eight.engine.stats.steps == 5 and eight.engine.stats.decode_steps == 32
    assert eight.engine.stats.decode_tokens == one.engine.stats.decode_tokens == 3 * 32
    assert eight.stats()["decode_steps"] == 32 and eight.stats()["decode_rounds"] == 4


def test_max_model_len_caps_a_round(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    prompt = random_prompts([250], seed=11)[0]
    llm = engine(tiny_ckpt, 8, num_kvcache_blocks=16)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert len(prompt) + len(out["token_ids"]) == 256 and out["finish_reason"] == "length"
    assert out["token_ids"] == hf_greedy(hf_model, prompt, 6)
    assert llm.kv_cache_usage() == 0.0


def test_sampled_rows_are_seeded_and_greedy_rows_exact(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    prompts = random_prompts([12, 30, 7, 45], seed=90)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sampled = SamplingParams(temperature=1.3, top_p=0.8, top_k=20, max_tokens=12, ignore_eos=True)
    params = [greedy, sampled, greedy, sampled]
    runs = [[o["token_ids"] for o in engine(tiny_ckpt, 4, seed=7).generate(prompts, params, use_tqdm=False)]
            for _ in range(2)]
    assert runs[0] == runs[1]  # same seed, same tokens
    assert runs[0][0] == hf_greedy(hf_model, prompts[0], 12) and runs[0][2] == hf_greedy(hf_model, prompts[2], 12)
    assert all(len(r) == 12 for r in runs[0])


@pytest.mark.parametrize("k", [1, 8, 64])
def test_blocks_filled_inside_a_round_are_cached(tiny_ckpt: str, hf_model, k: int) -> None:  # noqa: ANN001
    """A request that stops inside a round still leaves the blocks the round filled in the prefix cache (found by
    a reviewer: they were registered only at the sequence's next decode step, which never came)."""
    prompt = random_prompts([16], seed=9)[0]
    llm = engine(tiny_ckpt, k, kvcache_block_size=4, num_kvcache_blocks=80, max_model_len=128)
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    follow = prompt + first["token_ids"][:36]  # 52 tokens: 13 full blocks whose KV the first request wrote
    out = llm.generate([follow], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert out["num_cached_tokens"] == 52
    assert out["token_ids"] == hf_greedy(hf_model, follow, 4)
    llm.engine.block_manager.check_invariants()


@pytest.mark.parametrize("value, exc", [(0, ValueError), (65, ValueError), (-1, ValueError), ("4", TypeError),
                                        (True, TypeError), (2.0, TypeError)])
def test_bad_num_scheduler_steps_is_named(tiny_ckpt: str, value: object, exc: type) -> None:
    with pytest.raises(exc, match="num_scheduler_steps"):
        LLM(tiny_ckpt, device="cpu", num_scheduler_steps=value)


def test_default_is_one_step_on_the_cpu_and_eight_on_one_gpu(tiny_ckpt: str) -> None:
    from nanovllm.config import GPU_DEFAULT_SCHEDULER_STEPS, default_num_scheduler_steps

    assert LLM(tiny_ckpt, device="cpu").config.num_scheduler_steps == 1
    assert LLM(tiny_ckpt, device="cpu", num_scheduler_steps=None).config.num_scheduler_steps == 1
    assert default_num_scheduler_steps("cuda", 1) == GPU_DEFAULT_SCHEDULER_STEPS == 8
    assert default_num_scheduler_steps("cuda", 2) == 1 and default_num_scheduler_steps("cpu", 1) == 1


# ---- scheduler and buffers ---------------------------------------------------------------------------------------
class _Cfg:
    max_num_seqs, max_num_batched_tokens, max_model_len, eos_token_ids = 8, 64, 64, frozenset({EOS})


def _decoding(bm: BlockManager, sched: Scheduler, lengths: list[int], max_tokens: int) -> list[Sequence]:
    seqs = []
    for i, n in enumerate(lengths):  # distinct prompts: no prefix-cache sharing
        s = Sequence(list(range(100 * i, 100 * i + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), bm.block_size)
        sched.add(s)
        seqs.append(s)
    batch, is_prefill = sched.schedule()
    assert is_prefill and len(batch) == len(lengths)
    sched.postprocess(batch, [5] * len(batch))
    batch, is_prefill = sched.schedule()
    assert not is_prefill
    return batch


def test_decode_batch_is_longest_first_and_queue_order_is_kept() -> None:
    bm = BlockManager(num_blocks=40, block_size=4)
    sched = Scheduler(_Cfg(), bm)
    batch = _decoding(bm, sched, [5, 12, 8, 12], max_tokens=6)  # lengths 6, 13, 9, 13 after the first token
    queued = list(sched.running)
    assert [len(s) for s in queued] == [6, 13, 9, 13]  # admission order
    assert [len(s) for s in batch] == [13, 13, 9, 6]
    assert batch[0] is queued[1] and batch[1] is queued[3]  # a tie keeps the scheduling order
    sched.postprocess(batch, [5] * len(batch))
    assert list(sched.running) == queued  # the queue (and so the preemption order) is not reordered
    assert [len(s) for s in sched.schedule()[0]] == [14, 14, 10, 7]


def test_extend_decode_caps_and_reserves() -> None:
    bm = BlockManager(num_blocks=20, block_size=4)
    sched = Scheduler(_Cfg(), bm)
    seqs = _decoding(bm, sched, [6, 10], max_tokens=6)  # lengths 7 and 11, one token generated each
    free = bm.num_free_blocks
    k = sched.extend_decode(seqs, 8)
    assert k == 5  # at most 5 more tokens for either (max_tokens 6)
    assert [len(s) for s in seqs] == [11, 7]  # the decode batch: longest first
    assert [len(s.block_table) for s in seqs] == [-(-(11 + 4) // 4), -(-(7 + 4) // 4)]  # len + k - 1 tokens
    assert bm.num_free_blocks == free - (3 - 2) - (4 - 3)
    bm.check_invariants()


def test_extend_decode_halves_when_blocks_run_short_and_respects_max_model_len() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(_Cfg(), bm)
    seqs = _decoding(bm, sched, [7, 7], max_tokens=50)  # lengths 8: 2 blocks each after append, 2 free
    assert bm.num_free_blocks == 2
    k = sched.extend_decode(seqs, 8)  # 8 steps need 3 more blocks each; 4 steps 1 each
    assert k == 4 and bm.num_free_blocks == 0
    bm2 = BlockManager(num_blocks=40, block_size=4)
    cfg = _Cfg()
    cfg.max_model_len = 12
    sched2 = Scheduler(cfg, bm2)
    seqs2 = _decoding(bm2, sched2, [9], max_tokens=50)  # length 10: 2 more tokens reach max_model_len
    assert sched2.extend_decode(seqs2, 8) == 2
    sched3 = Scheduler(cfg, BlockManager(num_blocks=40, block_size=4))
    pair = _decoding(sched3.block_manager, sched3, [9, 3], max_tokens=50)  # lengths 10 and 4
    # the short one could go 8 steps, but the long one's positions must stay below max_model_len (10 - 1 + 2)
    assert sched3.extend_decode(pair, 8) == 3
    assert sched2.extend_decode(seqs2, 1) == 1


def test_staged_steps_follow_the_block_table() -> None:
    buf = StepInputBuffers(max_rows=4, width=8, block_size=4, device=torch.device("cpu"), max_steps=4)
    s = Sequence(list(range(6)), SamplingParams(), 4)  # length 6: positions 5, 6, 7, 8 in the round
    s.block_table = [7, 2, 9]
    buf.fill_decode([s], rows=2)
    buf.fill_decode_steps([s], rows=2, num_steps=4)
    assert buf.positions[0] == 5 and buf.slot_mapping[0] == 2 * 4 + 1 and buf.context_lens[0] == 6
    pos = buf.host_step64.numpy()[:3, 0]
    slots = buf.host_step32.numpy()[:3, 0]
    ctx = buf.host_step32.numpy()[:3, 4]
    assert pos.tolist() == [6, 7, 8]
    assert slots.tolist() == [2 * 4 + 2, 2 * 4 + 3, 9 * 4 + 0]
    assert ctx.tolist() == [7, 8, 9]
    assert buf.host_step32.numpy()[:3, 1].tolist() == [-1, -1, -1]  # the padding row writes nothing
    assert buf.host_step32.numpy()[:3, 5].tolist() == [0, 0, 0]
    buf.step_tokens[0, 0] = 123
    buf.load_step(1, 1)
    assert buf.input_ids[0] == 123 and buf.positions[0] == 6 and buf.slot_mapping[0] == 10
    s.block_table = [7, 2]  # does not cover position 8
    buf.fill_decode([s], rows=1)
    with pytest.raises(ValueError, match="does not cover"):
        buf.fill_decode_steps([s], rows=1, num_steps=4)
    with pytest.raises(ValueError, match="num_steps"):
        buf.fill_decode_steps([s], rows=1, num_steps=5)
    assert np.all(buf.host_step64.numpy()[:, 1:] == 0)


# ---- GPU -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_rounds_equal_single_steps(tiny_ckpt: str) -> None:
    n = 19
    prompts = random_prompts([5 + (7 * i) % 60 for i in range(n)], seed=141)
    params = [SamplingParams(temperature=0, max_tokens=8 + i % 13, ignore_eos=i % 3 > 0) for i in range(n)]
    kw = dict(device="cuda", dtype="float32", kvcache_block_size=16, max_model_len=256, max_num_seqs=12,
              num_kvcache_blocks=200)
    outs = {}
    for k in (1, 8):
        llm = LLM(tiny_ckpt, num_scheduler_steps=k, **kw)
        outs[k] = [(o["token_ids"], o["finish_reason"]) for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.kv_cache_usage() == 0.0
        if k > 1:
            assert llm.engine.stats.decode_steps > llm.engine.stats.decode_rounds
        del llm
    assert outs[1] == outs[8]


def test_a_round_ends_where_token_by_token_appending_would() -> None:
    """Scheduler._accept_round (one pass over a round's tokens) against appending them one at a time with
    _finish_reason after each, over random rounds: EOS on or off, stop token ids, max_tokens and max_model_len
    limits inside, at the edge of and beyond the round, a stop token at the length limit's token."""
    rng = np.random.default_rng(0)
    cfg = _Cfg()
    sched = Scheduler(cfg, BlockManager(64, 4))
    checked = {"stop": 0, "length": 0, None: 0}
    for _ in range(3000):
        prompt = list(range(int(rng.integers(1, 20))))
        params = SamplingParams(max_tokens=int(rng.integers(1, 12)), ignore_eos=bool(rng.integers(2)),
                                stop_token_ids=[int(t) for t in rng.integers(3, 9, int(rng.integers(0, 3)))] or None)
        done = int(rng.integers(0, params.max_tokens))  # completion tokens already generated
        tokens = [int(t) for t in rng.integers(0, 12, int(rng.integers(1, 9)))]
        cfg.max_model_len = len(prompt) + done + int(rng.integers(1, 12))
        a, b = (Sequence(prompt, params, 4) for _ in range(2))
        for s in (a, b):
            s.token_ids += [11] * done
            s.num_computed_tokens = len(s) - 1
        sched._accept_round(a, tokens)
        for j, t in enumerate(tokens):  # the rule, token by token
            if j:
                b.num_computed_tokens += 1
            b.append_token(t)
            if sched._finish_reason(b, t) is not None:
                break
        assert (a.token_ids, a.num_computed_tokens, a.finish_reason) == \
            (b.token_ids, b.num_computed_tokens, b.finish_reason), (prompt, params, done, tokens, cfg.max_model_len)
        checked[a.finish_reason] += 1
    assert min(checked.values()) > 100, checked  # every outcome was exercised


def test_host_seconds_are_a_part_of_the_steps_time(tiny_ckpt: str) -> None:
    """StepStats.host_seconds: scheduling, the inputs before a step's first launch and the postprocess; more than
    nothing, less than the steps' whole time, and the runner's share (its input preparation) inside it."""
    llm = engine(tiny_ckpt, 4)
    llm.generate(random_prompts([5, 12, 30, 7, 19, 3], vocab=500, seed=3),
                 SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
                 use_tqdm=False)
    st = llm.stats()
    prepare = llm.engine.model_runner.prepare_seconds
    assert 0 < prepare < st["host_seconds"] < st["prefill_seconds"] + st["decode_seconds"], (prepare, st)
