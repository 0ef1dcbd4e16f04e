"""LLMEngine.warm_up and warm_up_sampling: the build's warm-up compiles what the first requests would, and leaves the
engine as built (KV pool, prefix cache, statistics, the sampler's random state).

CPU, float32, the tiny checkpoint (tests/conftest.py); the sampling kernels in the Triton interpreter.
"""
from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.kernels.sampling import choose_sample_splits
from nanovllm.layers import sampler as sampler_module
from nanovllm.layers.sampler import Sampler, warm_up_sampling

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_warm_up_leaves_the_engine_as_built(tiny_ckpt: str) -> None:
    """LLMEngine.warm_up (run by the constructor on CUDA) empties the KV pool and its prefix cache, zeroes the
    statistics and leaves the sampler's random state alone: afterwards an engine gives the same sampled tokens, the
    same prefix-cache hits and the same block order as one that never warmed up."""
    prompts = random_prompts([7, 30], seed=5)
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    cold = LLM(tiny_ckpt, device="cpu", seed=3)
    warm = LLM(tiny_ckpt, device="cpu", seed=3)
    warm.engine.warm_up()
    bm = warm.engine.block_manager
    assert warm.kv_cache_usage() == 0.0 and not bm.hash_to_block_id
    assert list(bm.free_block_ids) == list(range(bm.num_blocks))
    assert warm.engine.stats.steps == 0 and warm.engine.stats.prefill_tokens == 0
    assert warm.stats() == cold.stats()
    ref = [o["token_ids"] for o in cold.generate(prompts, params, use_tqdm=False)]
    assert [o["token_ids"] for o in warm.generate(prompts, params, use_tqdm=False)] == ref
    assert warm.stats()["prefix_cache_hit_tokens"] == cold.stats()["prefix_cache_hit_tokens"]
    assert warm.engine.model_runner.init_seconds["warm_up"] > 0  # the build phases shown by the CLI's start line
    assert "warm_up" not in cold.engine.model_runner.init_seconds  # the CPU engine does not warm up at build


@pytest.mark.parametrize("max_model_len, blocks", [(16, 1), (3, 1), (2, 1)])
def test_warm_up_fits_small_engines(tiny_ckpt: str, max_model_len: int, blocks: int) -> None:
    """A valid engine whose context or KV pool is smaller than the warm-up prompts warms up with shorter ones (or
    none) instead of raising."""
    llm = LLM(tiny_ckpt, device="cpu", max_model_len=max_model_len, num_kvcache_blocks=blocks)
    llm.engine.warm_up()
    assert llm.kv_cache_usage() == 0.0
    out = llm.generate([[5]], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("engine_generator", [False, True])
def test_warm_up_sampling_leaves_samplers_alone(dtype: torch.dtype, engine_generator: bool) -> None:
    """warm_up_sampling (the sampling step of LLMEngine.warm_up on CUDA; here the kernels in the interpreter)
    launches the Triton sampling kernels without any Sampler and draws no random number: a Sampler built before
    it (as the engine's is) draws afterwards exactly what one that never saw a warm-up draws, with the engine's
    seeded generator and without one (its key then comes from torch's CPU generator at its first call)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab, batch = 40, 3
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(11)).to(device, dtype)
    temps, ks, ps = (torch.ones(batch, device=device), torch.full((batch,), -1, device=device),
                     torch.ones(batch, device=device))

    def draws(warm: bool) -> list[list[int]]:
        torch.manual_seed(123)
        sampler = Sampler(force_triton=True)
        gen = torch.Generator(device).manual_seed(5) if engine_generator else None
        if warm:
            cpu_rng = torch.random.get_rng_state()
            assert warm_up_sampling(device, dtype, vocab, max_rows=8, row_stride=48) == [1, 2]
            assert torch.equal(torch.random.get_rng_state(), cpu_rng)
        return [sampler(logits, temps, ks, ps, gen, all_greedy=False, use_top_k=False, use_top_p=False).tolist()
                for _ in range(3)]

    cold = draws(False)
    assert cold[0] != cold[1] != cold[2]  # the counter moves per call, so a moved counter would show
    assert draws(True) == cold


def test_warm_up_sampling_covers_the_kernel_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row counts warm_up_sampling launches: 1, 2 and 16 up to ``max_rows``, plus the fewest rows with one
    split per row (the kernel's other compiled variant) when the batch can reach it; the logits have the
    given dtype, width and row stride. Nothing runs for a dtype the Triton path does not take."""
    calls: list[tuple] = []

    def record(logits: torch.Tensor, temperatures: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
        calls.append((logits.shape, logits.stride(0), logits.dtype, temperatures.dtype, seed, offset))
        return torch.zeros(logits.shape[0], dtype=torch.int64)

    monkeypatch.setattr(sampler_module, "sample_tokens_triton", record)
    vocab = 1100  # two tiles: one split per row only from 8 * 132 rows (the SM count assumed off CUDA)
    first_direct = next(r for r in range(1, 5000) if choose_sample_splits(r, vocab, 132) == 1)
    assert warm_up_sampling("cpu", torch.float16, vocab, max_rows=5000, row_stride=1104) == [1, 2, 16, first_direct]
    assert calls == [((n, vocab), 1104, torch.float16, torch.float32, 0, 0) for n in (1, 2, 16, first_direct)]
    calls.clear()
    assert warm_up_sampling("cpu", torch.float32, vocab, max_rows=first_direct - 1) == [1, 2, 16]
    assert warm_up_sampling("cpu", torch.float32, 1000, max_rows=5000) == [1, 2, 16]  # one tile: always one split
    assert warm_up_sampling("cpu", torch.float32, vocab, max_rows=1) == [1]
    assert [c[1] for c in calls] == [vocab] * 3 + [1000] * 3 + [vocab]  # the row stride defaults to the width
    calls.clear()
    assert warm_up_sampling("cpu", torch.float64, vocab, max_rows=8) == [] and not calls
    with pytest.raises(ValueError, match="row_stride"):
        warm_up_sampling("cpu", torch.float32, vocab, max_rows=8, row_stride=vocab - 1)


@pytest.mark.parametrize("group_pad", [1, 2, 4, 8, 16])
def test_prefill_warm_up_lengths_cover_every_launch_config(group_pad: int) -> None:
    """The model runner compiles the prefill kernel at these query lengths when the KV cache is allocated: one length
    per launch configuration, and together every configuration any longest new-token count can pick."""
    from nanovllm.kernels.prefill_attention import _prefill_config, warm_up_lengths

    lengths = warm_up_lengths(group_pad)
    configs = [_prefill_config(group_pad, n) for n in lengths]
    assert len(set(configs)) == len(lengths)
    assert set(configs) == {_prefill_config(group_pad, n) for n in range(1, 20000)}


def test_prefill_warm_up_reads_the_cache_and_writes_nothing() -> None:
    """warm_up_prefill_attention launches the Triton kernel (the interpreter here) once per length, on the given
    caches, which it leaves unchanged; GQA with 4 query heads per KV head."""
    import importlib

    pa = importlib.import_module("nanovllm.kernels.prefill_attention")  # the module (the package exports the function)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(6, 16, 2, 16, generator=g)
    v = torch.randn(6, 16, 2, 16, generator=g)
    k0, v0 = k.clone(), v.clone()
    launched: list[int] = []
    original = pa.prefill_attention_triton

    def spy(q, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        launched.append(q.shape[0])
        return original(q, *args, **kwargs)

    pa.prefill_attention_triton = spy
    try:
        lengths = pa.warm_up_prefill_attention(k, v, 8, torch.float32, force_triton=True)
    finally:
        pa.prefill_attention_triton = original
    assert lengths == pa.warm_up_lengths(4) and launched == lengths
    assert torch.equal(k, k0) and torch.equal(v, v0)
