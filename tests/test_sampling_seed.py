"""Per-request seeds (``SamplingParams.seed``): a seeded request samples the same tokens alone or in any batch.

CPU, float32, the tiny checkpoint, temperature 0.8. The sampler-level tests compare exact token ids for identical
logits; the engine tests compare a seeded request run alone with the same request among unseeded and differently
seeded ones, with multi-step decode, another engine seed and preemption.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.layers.sampler import Sampler
from nanovllm.layers.seeded_noise import SeededRows, seeded_exponentials

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

T = 0.8
N_TOKENS = 8


# ---- SamplingParams.seed ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, -(2**63), 2**64 - 1, np.int64(5), np.uint64(2**64 - 1)])
def test_seed_in_generator_range_is_accepted(seed: int) -> None:
    sp = SamplingParams(seed=seed)
    assert type(sp.seed) is int and sp.seed == int(seed)


@pytest.mark.parametrize("seed,exc", [(2**64, ValueError), (-(2**63) - 1, ValueError), (True, TypeError),
                                      (np.bool_(True), TypeError), (1.0, TypeError), ("3", TypeError)])
def test_bad_seed_is_refused_naming_the_field(seed: object, exc: type) -> None:
    with pytest.raises(exc, match=r"SamplingParams\.seed"):
        SamplingParams(seed=seed)


# ---- the sampler ----------------------------------------------------------------------------------------------
def test_seeded_noise_depends_on_seed_and_position_only() -> None:
    a = seeded_exponentials([7, 9, 7], [4, 4, 5], 50, "cpu")
    b = seeded_exponentials([1, 7], [0, 4], 50, "cpu")
    assert torch.equal(a[0], b[1])  # same (seed, position), other row and other batch
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert torch.equal(seeded_exponentials([-1], [3], 50, "cpu"), seeded_exponentials([2**64 - 1], [3], 50, "cpu"))
    big = seeded_exponentials(list(range(32)), [0] * 32, 1000, "cpu")
    assert abs(big.mean().item() - 1.0) < 0.02 and (big > 0).all()  # Exp(1): mean 1 (32,000 draws, sd 0.006)


@pytest.mark.parametrize("force_triton", [False, True])
@pytest.mark.parametrize("top_k", [-1, 20])
def test_seeded_row_draws_the_same_token_alone_or_in_a_batch(force_triton: bool, top_k: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 300)
    sampler = Sampler(force_triton=force_triton)
    kw = dict(all_greedy=False, use_top_k=top_k > 0, use_top_p=False)

    def draw(rows: torch.Tensor, seeded: SeededRows, gen_seed: int) -> list[int]:
        n = rows.shape[0]
        return sampler(rows, torch.full((n,), T), torch.full((n,), top_k), torch.ones(n),
                       generator=torch.Generator().manual_seed(gen_seed), seeded=seeded, **kw).tolist()

    alone = [draw(logits[2:3], SeededRows([0], [123], [pos]), 0)[0] for pos in range(6)]
    # row 2 seeded with 123 among an unseeded row (0), a row seeded with 5 (1) and another unseeded row (3)
    batched = [draw(logits, SeededRows([1, 2], [5, 123], [pos, pos]), 99)[2] for pos in range(6)]
    assert alone == batched
    other_seed = [draw(logits[2:3], SeededRows([0], [124], [pos]), 0)[0] for pos in range(6)]
    assert other_seed != alone  # 6 draws over a flat-ish softmax of 300 tokens


def test_seeded_rows_advance_one_position_per_call() -> None:
    rows = SeededRows([0, 3], [1, 2], [10, 20])
    assert rows.next_positions() == [10, 20] and rows.next_positions() == [11, 21] and rows.positions == [12, 22]


# ---- the engine -----------------------------------------------------------------------------------------------
def make_llm(ckpt: str, **kw) -> LLM:  # noqa: ANN003
    base = dict(device="cpu", kvcache_block_size=16, num_kvcache_blocks=32, max_num_seqs=8, max_model_len=128,
                seed=1, num_scheduler_steps=1)
    return LLM(ckpt, **(base | kw))


@pytest.fixture(scope="module")
def llm(tiny_ckpt: str) -> LLM:
    return make_llm(tiny_ckpt)


def seeded(seed: int | None, **kw) -> SamplingParams:  # noqa: ANN003
    return SamplingParams(temperature=T, max_tokens=N_TOKENS, ignore_eos=True, seed=seed, **kw)


def tokens(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_engine_seeded_request_is_independent_of_its_batch(llm: LLM) -> None:
    p, q, r, s = random_prompts([11, 5, 23, 9], seed=31)
    alone = tokens(llm, [p], [seeded(42)])[0]
    assert tokens(llm, [p], [seeded(42)])[0] == alone  # again, the engine generator has moved on
    batch = tokens(llm, [q, p, r, s], [seeded(None), seeded(42), seeded(7), seeded(None, top_k=50)])
    assert batch[1] == alone
    assert tokens(llm, [p], [seeded(43)])[0] != alone  # 8 tokens of a near-uniform softmax over 1024 ids
    assert batch[2] == tokens(llm, [r], [seeded(7)])[0]
    assert llm.kv_cache_usage() == 0.0


def test_engine_seeded_request_under_multistep_preemption_and_another_engine_seed(tiny_ckpt: str,
                                                                                    llm: LLM) -> None:
    prompts = random_prompts([30, 41, 26, 37], seed=32)
    params = [seeded(1000 + i) for i in range(len(prompts))]
    ref = [tokens(llm, [p], [sp])[0] for p, sp in zip(prompts, params)]
    tight = make_llm(tiny_ckpt, num_kvcache_blocks=7, num_scheduler_steps=4, seed=2)
    assert tokens(tight, prompts, params) == ref
    assert tight.stats()["num_preemptions"] > 0, "the pool was meant to force preemption"
    assert tight.engine.stats.decode_steps > tight.engine.stats.decode_rounds  # multi-step rounds ran


# ---- on a GPU (skipped elsewhere) -------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_gpu_noise_equals_cpu_noise_and_seeded_rows_leave_the_triton_path_correct() -> None:
    seeds, positions = [3, 2**64 - 1, -7], [0, 17, 4096]
    assert torch.equal(seeded_exponentials(seeds, positions, 1001, "cuda").cpu(),
                       seeded_exponentials(seeds, positions, 1001, "cpu"))
    torch.manual_seed(1)
    logits = torch.randn(6, 5000, device="cuda", dtype=torch.bfloat16)
    temps = torch.full((6,), T, device="cuda")
    ks, ps = torch.full((6,), -1, device="cuda"), torch.ones(6, device="cuda")
    kw = dict(all_greedy=False, use_top_k=False, use_top_p=False)
    sampler = Sampler()
    alone = sampler(logits[4:5], temps[:1], ks[:1], ps[:1], seeded=SeededRows([0], [77], [9]), **kw)
    batch = sampler(logits, temps, ks, ps, generator=torch.Generator("cuda").manual_seed(0),
                    seeded=SeededRows([1, 4], [5, 77], [9, 9]), **kw)
    assert batch[4].item() == alone.item()


@needs_cuda
def test_gpu_engine_seeded_request_with_cuda_graphs_and_multistep(tiny_ckpt: str) -> None:
    """The GPU defaults: CUDA graphs and multi-step rounds (8 steps); seeded rows sample in the eager sampler."""
    gpu = LLM(tiny_ckpt, device="cuda", max_model_len=128, max_num_seqs=8, seed=1)
    assert gpu.config.num_scheduler_steps > 1
    p, q, r = random_prompts([11, 5, 23], seed=33)
    params = dict(temperature=T, max_tokens=20, ignore_eos=True)
    alone = tokens(gpu, [p], [SamplingParams(seed=42, **params)])[0]
    batch = tokens(gpu, [q, p, r], [SamplingParams(**params), SamplingParams(seed=42, **params),
                                    SamplingParams(seed=8, **params)])
    assert batch[1] == alone
    assert tokens(gpu, [p], [SamplingParams(seed=43, **params)])[0] != alone
    gpu.shutdown()
