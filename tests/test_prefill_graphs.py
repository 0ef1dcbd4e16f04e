"""Prefill CUDA graphs (engine/prefill_graphs.py): buckets, padding, and the padded static-buffer path.

On the CPU the padded path runs without a graph (``PrefillGraphs.force_eager_padding``) and must give the tokens of
the unpadded path (float32, the tiny checkpoint) for one and several sequences, prefix-cache hits and chunked
prefill. The GPU test captures the graphs and compares with the eager engine.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.engine.prefill_graphs import choose_bucket, pad_prefill, prefill_buckets

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- pure functions ----------------------------------------------------------------------------------------------
def test_buckets_are_powers_of_two_up_to_the_limit() -> None:
    assert prefill_buckets(2048, 16384) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert prefill_buckets(2048, 100) == [16, 32, 64, 100]  # no step exceeds the token budget
    assert prefill_buckets(300, 16384) == [16, 32, 64, 128, 256, 300]
    assert prefill_buckets(8, 16384) == [8]
    assert prefill_buckets(0, 16384) == []
    with pytest.raises(ValueError, match="max_tokens"):
        prefill_buckets(-1, 16)


def test_choose_bucket() -> None:
    buckets = [16, 32, 64, 100]
    assert [choose_bucket(t, 1, buckets, 4) for t in (1, 16, 17, 64, 65, 100)] == [16, 16, 32, 64, 100, 100]
    assert choose_bucket(101, 1, buckets, 4) is None  # too many tokens
    assert choose_bucket(20, 5, buckets, 4) is None  # too many sequences
    assert choose_bucket(0, 0, buckets, 4) is None


def test_pad_prefill_two_sequences_with_a_cached_prefix() -> None:
    """Sequence 0: 3 new tokens; sequence 1: a chunk of 2 new tokens after 16 tokens of context (block 7 then 9)."""
    p = pad_prefill([11, 12, 13, 21, 22], [0, 1, 2, 16, 17], [80, 81, 82, 144, 145], q_lens=[3, 2],
                    context_lens=[3, 18], block_tables=[[5], [7, 9]], bucket=8, max_seqs=4, width=3)
    assert p.input_ids.tolist() == [11, 12, 13, 21, 22, 0, 0, 0]
    assert p.positions.tolist() == [0, 1, 2, 16, 17, 0, 0, 0]
    assert p.slot_mapping.tolist() == [80, 81, 82, 144, 145, -1, -1, -1]  # padding tokens store nothing
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 5, 5]  # padding sequences hold no token
    assert p.cu_seqlens_k.tolist() == [0, 3, 21, 21, 21]
    assert p.context_lens.tolist() == [3, 18, 0, 0]
    assert p.block_tables.tolist() == [[5, -1, -1], [7, 9, -1], [-1, -1, -1], [-1, -1, -1]]
    assert p.logits_indices.tolist() == [2, 4, 0, 0]
    assert (p.input_ids.dtype, p.slot_mapping.dtype, p.cu_seqlens_q.dtype, p.logits_indices.dtype) == (
        np.int64, np.int32, np.int32, np.int64)


def test_pad_prefill_rejects_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        pad_prefill([1] * 9, list(range(9)), [0] * 9, [9], [9], [[0]], bucket=8, max_seqs=4, width=2)
    with pytest.raises(ValueError, match="does not fit"):
        pad_prefill([1, 2], [0, 0], [0, 16], [1, 1], [1, 1], [[0], [1]], bucket=8, max_seqs=1, width=2)
    with pytest.raises(ValueError, match="block table 0"):
        pad_prefill([1], [0], [0], [1], [1], [[0, 1, 2]], bucket=8, max_seqs=1, width=2)
    with pytest.raises(ValueError, match="must agree"):
        pad_prefill([1, 2], [0], [0], [2], [2], [[0]], bucket=8, max_seqs=1, width=2)


def test_triton_attention_on_padded_metadata_equals_the_unpadded_reference() -> None:
    """The Triton prefill kernel (interpreter) and the KV store on a step padded as a graph sees it: bucket 32 with
    NaN in the padding rows, 4 sequence slots (2 padding), ``max_seqlen_q`` = bucket; sequence 1 is a chunk with 16
    tokens of cached context. Its real rows equal the reference on the unpadded step; padding writes no KV."""
    from nanovllm.kernels import prefill_attention, store_kvcache
    from nanovllm.kernels.reference import prefill_attention_ref

    g = torch.Generator().manual_seed(5)
    heads, kv_heads, dim, bs = 4, 2, 16, 16
    k_cache = torch.randn(6, bs, kv_heads, dim, generator=g)
    v_cache = torch.randn(6, bs, kv_heads, dim, generator=g)
    q_lens, ctx, tables = [5, 7], [5, 23], [[4], [1, 3]]
    t = sum(q_lens)
    pos0, pos1 = list(range(5)), list(range(16, 23))
    slots = [4 * bs + p for p in pos0] + [(1 if p < 16 else 3) * bs + p % bs for p in pos1]
    p = pad_prefill(list(range(t)), pos0 + pos1, slots, q_lens, ctx, tables, bucket=32, max_seqs=4, width=2)
    q = torch.randn(t, heads, dim, generator=g)
    k_new, v_new = torch.randn(t, kv_heads, dim, generator=g), torch.randn(t, kv_heads, dim, generator=g)
    nan = torch.full((32 - t, kv_heads, dim), float("nan"))
    kc, vc = k_cache.clone(), v_cache.clone()
    store_kvcache(torch.cat([k_new, nan]), torch.cat([v_new, nan]), kc, vc, torch.from_numpy(p.slot_mapping),
                  force_triton=True)
    assert not kc.isnan().any() and not vc.isnan().any()  # padding stored nothing
    out = prefill_attention(torch.cat([q, torch.full((32 - t, heads, dim), float("nan"))]), kc, vc,
                            torch.from_numpy(p.cu_seqlens_q), torch.from_numpy(p.cu_seqlens_k),
                            torch.from_numpy(p.block_tables), 32, 256, dim ** -0.5, force_triton=True)
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    store_kvcache(k_new, v_new, ref_kc, ref_vc, torch.tensor(slots, dtype=torch.int32))
    torch.testing.assert_close(kc, ref_kc, rtol=0, atol=0)
    ref = prefill_attention_ref(q, ref_kc, ref_vc, torch.tensor([0, 5, 12], dtype=torch.int32),
                                torch.tensor([0, 5, 28], dtype=torch.int32),
                                torch.tensor([[4, -1], [1, 3]], dtype=torch.int32), 7, 23, dim ** -0.5)
    torch.testing.assert_close(out[:t], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value, err", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_keyword_is_validated(tiny_ckpt: str, value: object, err: type) -> None:
    with pytest.raises(err, match="prefill_cuda_graph_max_tokens"):
        Config(tiny_ckpt, device="cpu", prefill_cuda_graph_max_tokens=value)


# ---- the padded path in the engine (CPU, no graph) ---------------------------------------------------------------
KW = dict(device="cpu", kvcache_block_size=16, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
          num_kvcache_blocks=40)


def _engines(ckpt: str) -> tuple[LLM, LLM]:
    padded = LLM(ckpt, prefill_cuda_graph_max_tokens=2048, **KW)
    pg = padded.engine.model_runner.prefill_graphs
    assert pg is not None and pg.buckets == [16, 32, 64] and pg.max_seqs == 4 and not pg.graphs
    pg.force_eager_padding = True
    plain = LLM(ckpt, prefill_cuda_graph_max_tokens=0, **KW)
    assert plain.engine.model_runner.prefill_graphs is None
    return padded, plain


def _tokens(llm: LLM, prompts: list[list[int]], max_tokens: int = 6) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]


def _prefill_steps(llm: LLM) -> int:
    st = llm.engine.stats
    return st.steps - st.decode_rounds


def test_padded_prefill_gives_the_unpadded_tokens(tiny_ckpt: str) -> None:
    """One prompt, a batch of several, a whole-prompt prefix hit, a shared-prefix hit, and a 150-token prompt cut
    into chunks of 64 (chunks 2 and 3 have a nonzero context), each through the padded path and the plain one."""
    padded, plain = _engines(tiny_ckpt)
    pg = padded.engine.model_runner.prefill_graphs
    shared = random_prompts([32], seed=41)[0]
    cases = [
        random_prompts([20], seed=40),  # 20 tokens -> bucket 32
        random_prompts([5, 9, 14, 3], seed=42),  # 4 sequences, 31 tokens, in one step
        [shared + [7, 8, 9]] * 2,  # the second run hits the first's 2 blocks
        [shared, shared],  # whole prompt cached: recomputed for its logits, slot -1
        random_prompts([150], seed=43),  # chunked: 64 + 64 + 22
    ]
    for prompts in cases:
        before = pg.replays
        assert _tokens(padded, prompts) == _tokens(plain, prompts)
        assert pg.replays > before, "the padded path did not run"
    assert pg.replays == _prefill_steps(padded)  # every step fits: 4 sequences and 64 tokens at most
    assert padded.stats()["prefix_cache_hit_tokens"] == plain.stats()["prefix_cache_hit_tokens"] > 0
    # same blocks written with the same K/V: padding tokens wrote nothing anywhere
    a, b = padded.engine.model_runner.kv_cache, plain.engine.model_runner.kv_cache
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert padded.kv_cache_usage() == 0.0


def test_steps_that_do_not_fit_take_the_unpadded_path(tiny_ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Buckets of 16 and 32 tokens for at most 2 sequences: a step of 4 sequences and a step of 50 tokens run
    unpadded; of a 80-token batch cut by the 64-token budget, the second (16-token) chunk runs padded."""
    monkeypatch.setattr("nanovllm.engine.model_runner.PREFILL_GRAPH_MAX_SEQS", 2)
    kw = KW | dict(max_num_seqs=8, prefill_cuda_graph_max_tokens=32)
    padded = LLM(tiny_ckpt, **kw)
    pg = padded.engine.model_runner.prefill_graphs
    assert (pg.buckets, pg.max_seqs) == ([16, 32], 2)
    pg.force_eager_padding = True
    plain = LLM(tiny_ckpt, **(kw | dict(prefill_cuda_graph_max_tokens=0)))
    many = random_prompts([2, 3, 4, 2, 3, 4], seed=44)  # prefill steps of 4 sequences (unpadded), then 2 (padded)
    assert _tokens(padded, many, 3) == _tokens(plain, many, 3)
    assert pg.replays == 1
    long = random_prompts([50], seed=45)
    assert _tokens(padded, long, 3) == _tokens(plain, long, 3)
    assert pg.replays == 1
    big = random_prompts([40, 40], seed=46)  # steps of 64 tokens (unpadded), then 16 (padded, context 40)
    assert _tokens(padded, big, 3) == _tokens(plain, big, 3)
    assert pg.replays == 2


# ---- GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_prefill_graphs_give_the_eager_tokens(tiny_ckpt: str) -> None:
    """Eight prompts in one step (438 tokens -> bucket 512), then each alone (several buckets), with a
    prefix-cache hit and chunks: the captured prefill graphs give the eager engine's tokens (float32)."""
    lengths = [5, 17, 33, 64, 100, 7, 12, 200]
    prompts = random_prompts(lengths, seed=150)
    kw = dict(device="cuda", dtype="float32", kvcache_block_size=16, max_model_len=512, max_num_seqs=8,
              num_kvcache_blocks=400)
    graphs = LLM(tiny_ckpt, prefill_cuda_graph_max_tokens=2048, **kw)
    pg = graphs.engine.model_runner.prefill_graphs
    assert pg is not None and sorted(pg.graphs) == pg.buckets == [16, 32, 64, 128, 256, 512, 1024, 2048]
    singles = [[p] for p in prompts] + [[prompts[7][:150] + [3, 4]]]  # the last one hits 9 cached blocks
    out_graphs = [_tokens(graphs, prompts, 12)] + [_tokens(graphs, s, 12) for s in singles]
    assert pg.replays == _prefill_steps(graphs) >= 1 + len(singles)  # every prefill step replayed a graph
    # buckets 16, 32, 64; the 200-token prompt in chunks
    chunked = LLM(tiny_ckpt, max_num_batched_tokens=64, prefill_cuda_graph_max_tokens=2048, **kw)
    out_chunked = [_tokens(chunked, prompts, 12)]
    assert chunked.engine.model_runner.prefill_graphs.replays == _prefill_steps(chunked) > 2
    del graphs, chunked
    eager = LLM(tiny_ckpt, enforce_eager=True, **kw)
    assert eager.engine.model_runner.prefill_graphs is None
    out_eager = [_tokens(eager, prompts, 12)] + [_tokens(eager, s, 12) for s in singles]
    assert out_graphs == out_eager
    assert out_chunked[0] == out_eager[0]
