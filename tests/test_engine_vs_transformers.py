"""Issue 2, acceptance 1-3: greedy tokens equal transformers'; prefix caching and preemption change nothing."""
from __future__ import annotations

import pytest

from conftest import hf_greedy, random_prompts
from nanovllm import LLM, SamplingParams

LENGTHS = [1, 7, 16, 33, 64, 129, 200, 300]
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(LENGTHS, seed=1)


@pytest.fixture(scope="module")
def reference(hf_model, prompts) -> list[list[int]]:  # noqa: ANN001
    return [hf_greedy(hf_model, p, MAX_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def llm(tiny_ckpt: str) -> LLM:
    return LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, max_model_len=512)


def test_batch_greedy_equals_transformers(llm: LLM, prompts, reference) -> None:  # noqa: ANN001
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == reference
    assert all(o["finish_reason"] == "length" for o in outs)
    assert llm.kv_cache_usage() == 0.0


def test_each_prompt_alone_equals_batch(llm: LLM, prompts, reference) -> None:  # noqa: ANN001
    # a fresh engine, so no prefix from the batch run is reused
    for p, ref in zip(prompts, reference):
        assert llm.generate([p], GREEDY, use_tqdm=False)[0]["token_ids"] == ref


def test_chunked_prefill_equals_transformers(tiny_ckpt: str, prompts, reference) -> None:  # noqa: ANN001
    llm = LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, max_model_len=512, max_num_batched_tokens=50)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == reference
    assert llm.stats()["prefill_tokens"] >= sum(LENGTHS)


def test_string_prompts_equal_transformers(llm: LLM, hf_model) -> None:  # noqa: ANN001
    texts = ["Hello world! How are you today?", "The quick brown fox"]
    outs = llm.generate(texts, GREEDY, use_tqdm=False)
    for text, out in zip(texts, outs):
        ref = hf_greedy(hf_model, llm.tokenizer.encode(text), MAX_TOKENS)
        assert out["token_ids"] == ref
        assert out["text"] == llm.tokenizer.decode(ref, skip_special_tokens=True)


def test_prefix_cache_same_prompt_twice(tiny_ckpt: str, prompts, reference) -> None:  # noqa: ANN001
    llm = LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, max_model_len=512)
    p, ref = prompts[5], reference[5]  # 129 tokens: 8 full blocks
    first = llm.generate([p], GREEDY, use_tqdm=False)[0]
    second = llm.generate([p], GREEDY, use_tqdm=False)[0]
    assert first["token_ids"] == ref and second["token_ids"] == ref
    assert first["num_cached_tokens"] == 0
    assert second["num_cached_tokens"] == 128


def test_prefix_cache_block_aligned_shared_prefix_in_one_batch(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    prefix = random_prompts([48], seed=7)[0]  # exactly 3 blocks of 16
    tails = random_prompts([5, 20, 1], seed=8)
    batch = [prefix + t for t in tails]
    cold = [hf_greedy(hf_model, p, MAX_TOKENS) for p in batch]
    llm = LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, max_model_len=512)
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == cold
    # the first request computes the prefix; the two after it read its 3 blocks from the cache
    assert [o["num_cached_tokens"] for o in outs] == [0, 48, 48]
    assert llm.stats()["prefix_cache_hit_tokens"] == 96


def test_whole_prompt_cached_block_aligned(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    p = random_prompts([32], seed=9)[0]  # exactly two blocks
    ref = hf_greedy(hf_model, p, MAX_TOKENS)
    llm = LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, max_model_len=512)
    a = llm.generate([p], GREEDY, use_tqdm=False)[0]
    b = llm.generate([p], GREEDY, use_tqdm=False)[0]
    assert a["token_ids"] == ref and b["token_ids"] == ref
    assert b["num_cached_tokens"] == 32


def test_preemption_outputs_equal_solo_runs(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    # 8 prompts of 20-40 tokens growing by 40 tokens each, in a pool of 12 blocks of 16 (192 tokens): admitted
    # together, they run out of blocks while decoding, so some are preempted and recomputed.
    batch = random_prompts([20, 25, 30, 35, 40, 22, 28, 33], seed=11)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    solo = [hf_greedy(hf_model, p, 40) for p in batch]
    llm = LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, max_model_len=512, num_kvcache_blocks=12)
    outs = llm.generate(batch, params, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == solo
    assert llm.stats()["num_preemptions"] > 0
    assert llm.kv_cache_usage() == 0.0
    llm.engine.block_manager.check_invariants()
