"""q/k norm + RoPE with the KV-cache store folded in (nanovllm/kernels/qk_norm_rope.py ``qk_norm_rope_store``), in
the Triton interpreter on the CPU: the same q and the same whole caches as ``qk_norm_rope`` followed by
``store_kvcache``; its op takes the cache from the context and stores nothing without one; the op pair
``qk_norm_rope_store`` -> ``attention_cached`` gives the attention of ``attention``; without norm weights (Llama)
it equals RotaryEmbedding followed by the store. The engine's greedy tokens on the GPU: Qwen3 in
tests/test_qk_norm_rope.py's GPU test, the Llama family here."""
from __future__ import annotations

import pytest
import torch

from nanovllm.kernels import qk_norm_rope, qk_norm_rope_store, store_kvcache
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.utils.context import reset_context, set_context

BLOCK_SIZE = 16


def make(t: int, h: int, hkv: int, d: int, dtype: torch.dtype, seed: int, num_blocks: int = 5):  # noqa: ANN201
    """qkv [t, (h + 2 hkv) d] (a column slice of a wider buffer), norm weights, rope table, positions, random
    caches [num_blocks, 16, hkv, d] and a slot mapping of distinct slots with one padding slot (-1) when t > 1."""
    g = torch.Generator().manual_seed(seed)
    width = (h + 2 * hkv) * d
    qkv = (torch.randn(t, width + 8, generator=g) * 3).to(dtype)[:, :width]
    qw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)
    kw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)
    cos_sin = RotaryEmbedding(d, 4096, 1_000_000.0).cos_sin_cache
    positions = torch.randint(0, 4096, (t,), generator=g)
    shape = (num_blocks, BLOCK_SIZE, hkv, d)
    k_cache, v_cache = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g)[:t].to(torch.int32)
    if t > 1:
        slots[t // 2] = -1
    return qkv, qw, kw, cos_sin, positions, k_cache, v_cache, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("t, h, hkv, d", [(1, 4, 2, 128), (7, 8, 2, 64), (33, 4, 4, 64), (7, 6, 2, 128)])
def test_store_kernel_equals_rope_then_store(dtype: torch.dtype, t: int, h: int, hkv: int, d: int) -> None:
    qkv, qw, kw, cs, pos, k_cache, v_cache, slots = make(t, h, hkv, d, dtype, seed=t * 10 + h)
    # two kernels: q/k norm + RoPE, then the KV store of k and of v (a view of qkv)
    q_ref, k_ref = qk_norm_rope(qkv, qw, kw, cs, pos, h, hkv, 1e-6, force_triton=True)
    v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    store_kvcache(k_ref, v, kc_ref, vc_ref, slots, force_triton=True)
    # one kernel
    q = qk_norm_rope_store(qkv, qw, kw, cs, pos, h, hkv, 1e-6, k_cache, v_cache, slots, force_triton=True)
    assert q.shape == (t, h, d) and q.dtype == dtype
    assert torch.equal(q, q_ref)
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)  # whole caches: padding/other slots too
    # the stores did happen, and the padding token's k is nowhere in the cache
    stored = slots[slots >= 0].long()
    assert torch.equal(k_cache.view(-1, hkv, d)[stored], k_ref[slots >= 0])
    if t > 1:
        assert not (k_cache.view(-1, hkv, d) == k_ref[t // 2]).all(-1).all(-1).any()
    # the CPU path: the PyTorch references of both steps
    q_cpu_ref, k_cpu_ref = qk_norm_rope(qkv, qw, kw, cs, pos, h, hkv, 1e-6)
    kc_cpu, vc_cpu, kc0, vc0 = (torch.zeros_like(k_cache) for _ in range(4))
    store_kvcache(k_cpu_ref, v, kc0, vc0, slots)
    q_cpu = qk_norm_rope_store(qkv, qw, kw, cs, pos, h, hkv, 1e-6, kc_cpu, vc_cpu, slots)
    assert torch.equal(kc_cpu, kc0) and torch.equal(vc_cpu, vc0) and torch.equal(q_cpu, q_cpu_ref)


def test_bad_cache_arguments_raise() -> None:
    qkv, qw, kw, cs, pos, k_cache, v_cache, slots = make(3, 4, 2, 64, torch.float32, seed=4)
    with pytest.raises(ValueError, match="k_cache"):
        qk_norm_rope_store(qkv, qw, kw, cs, pos, 4, 2, 1e-6, k_cache[..., :32].contiguous(), v_cache, slots)
    with pytest.raises(ValueError, match="k_cache"):
        qk_norm_rope_store(qkv, qw, kw, cs, pos, 4, 2, 1e-6, k_cache.transpose(0, 1), v_cache.transpose(0, 1),
                           slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        qk_norm_rope_store(qkv, qw, kw, cs, pos, 4, 2, 1e-6, k_cache, v_cache, slots[:2])
    with pytest.raises(ValueError, match="qkv"):
        qk_norm_rope_store(qkv[:, :-64], qw, kw, cs, pos, 4, 2, 1e-6, k_cache, v_cache, slots)


def test_op_stores_into_the_context_cache_and_skips_without_one() -> None:
    """The op reads the layer's cache and the slot mapping from the context; with no cache for the layer (the
    profiling pass) it stores nothing and still returns q. Then attention_cached over the stored cache equals the
    storing attention op on the same step."""
    import nanovllm.layers.attention  # noqa: F401 - registers the attention ops
    import nanovllm.layers.qk_norm_rope_op  # noqa: F401 - registers the op

    h, hkv, d, t = 4, 2, 64, 5
    qkv, qw, kw, cs, pos, k_cache, v_cache, _ = make(t, h, hkv, d, torch.float32, seed=9, num_blocks=2)
    slots = torch.tensor([16, 17, 18, 19, 20], dtype=torch.int32)  # one sequence of 5 tokens in block 1
    args = (qkv, qw, kw, cs, pos, h, hkv, 1e-6)
    q_ref, k_ref = qk_norm_rope(*args)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    try:
        set_context(True, slot_mapping=slots, kv_caches=[(k_cache, v_cache)])
        q = torch.ops.nanovllm.qk_norm_rope_store(*args, 1)  # layer 1 has no cache
        assert torch.equal(q, q_ref) and torch.equal(k_cache, kc0) and torch.equal(v_cache, vc0)
        assert torch.equal(torch.ops.nanovllm.attention_cached(q, 1, d ** -0.5), torch.zeros_like(q))
        # prefill of the 5 tokens through the cache, both ways
        meta = dict(cu_seqlens_q=torch.tensor([0, t], dtype=torch.int32),
                    cu_seqlens_k=torch.tensor([0, t], dtype=torch.int32), max_seqlen_q=t, max_seqlen_k=t,
                    slot_mapping=slots, block_tables=torch.tensor([[1]], dtype=torch.int32))
        set_context(True, **meta, kv_caches=[(k_cache, v_cache)])
        q = torch.ops.nanovllm.qk_norm_rope_store(*args, 0)
        o = torch.ops.nanovllm.attention_cached(q, 0, d ** -0.5)
        assert torch.equal(q, q_ref) and not torch.equal(k_cache, kc0)
        assert torch.equal(k_cache.view(-1, hkv, d)[16:21], k_ref)
        assert torch.equal(v_cache.view(-1, hkv, d)[16:21], qkv[:, (h + hkv) * d:].reshape(t, hkv, d))
        assert torch.equal(k_cache[0], kc0[0]) and torch.equal(v_cache[0], vc0[0])  # block 0 untouched
        set_context(True, **meta, kv_caches=[(kc0, vc0)])
        o_ref = torch.ops.nanovllm.attention(q_ref, k_ref, qkv[:, (h + hkv) * d:].reshape(t, hkv, d), 0, d ** -0.5)
        assert torch.equal(o, o_ref) and o.abs().sum() > 0
    finally:
        reset_context()


def test_store_op_and_cached_attention_trace_in_one_graph() -> None:
    """Both ops' fakes keep one graph (fullgraph, dynamic token count); the compiled pair stores like eager."""
    import nanovllm.layers.attention  # noqa: F401
    import nanovllm.layers.qk_norm_rope_op  # noqa: F401

    def f(qkv, qw, kw, cs, pos):  # noqa: ANN001, ANN202
        q = torch.ops.nanovllm.qk_norm_rope_store(qkv, qw, kw, cs, pos, 4, 2, 1e-6, 0)
        return torch.ops.nanovllm.attention_cached(q, 0, 0.125).sum(-1)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    try:
        for t in (3, 6):
            qkv, qw, kw, cs, pos, k_cache, v_cache, _ = make(t, 4, 2, 64, torch.float32, seed=t, num_blocks=1)
            slots = torch.arange(t, dtype=torch.int32)
            meta = dict(cu_seqlens_q=torch.tensor([0, t], dtype=torch.int32),
                        cu_seqlens_k=torch.tensor([0, t], dtype=torch.int32), max_seqlen_q=t, max_seqlen_k=t,
                        slot_mapping=slots, block_tables=torch.tensor([[0]], dtype=torch.int32))
            kc2, vc2 = k_cache.clone(), v_cache.clone()
            set_context(True, **meta, kv_caches=[(k_cache, v_cache)])
            got = compiled(qkv, qw, kw, cs, pos)
            set_context(True, **meta, kv_caches=[(kc2, vc2)])
            want = f(qkv, qw, kw, cs, pos)
            assert torch.equal(got, want) and torch.equal(k_cache, kc2) and torch.equal(v_cache, vc2)
    finally:
        reset_context()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("t, h, hkv, d", [(1, 4, 2, 64), (7, 8, 2, 128)])
def test_rope_only_store_equals_rotary_embedding_then_store(dtype: torch.dtype, t: int, h: int, hkv: int,
                                                            d: int) -> None:
    """Without norm weights (the Llama family): the model's RotaryEmbedding, then the store; and the op."""
    import nanovllm.layers.qk_norm_rope_op  # noqa: F401

    qkv, _, _, cs, pos, k_cache, v_cache, slots = make(t, h, hkv, d, dtype, seed=t + d)
    rope = RotaryEmbedding(d, 4096, 1_000_000.0)
    q_ref, k_ref = rope(pos, qkv[:, :h * d].reshape(t, h, d), qkv[:, h * d:(h + hkv) * d].reshape(t, hkv, d))
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    store_kvcache(k_ref, qkv[:, (h + hkv) * d:].reshape(t, hkv, d), kc_ref, vc_ref, slots)
    for force in (True, False):
        kc, vc = k_cache.clone(), v_cache.clone()
        q = qk_norm_rope_store(qkv, None, None, cs, pos, h, hkv, 0.0, kc, vc, slots, force_triton=force)
        assert torch.equal(q, q_ref) and torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), force
    try:
        kc, vc = k_cache.clone(), v_cache.clone()
        set_context(False, slot_mapping=slots, kv_caches=[(kc, vc)])
        assert torch.equal(torch.ops.nanovllm.rope_store(qkv, cs, pos, h, hkv, 0), q_ref)
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
        kc, vc = k_cache.clone(), v_cache.clone()
        assert torch.equal(torch.ops.nanovllm.rope_store(qkv, cs, pos, h, hkv, 1), q_ref)  # no cache: no store
        assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)
    finally:
        reset_context()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llama_engine_tokens_on_gpu(tmp_path) -> None:  # noqa: ANN001
    """The Llama family's CUDA path (RoPE + KV store in one kernel, attention_cached), fp32 with CUDA graphs, gives
    the greedy tokens of transformers (Qwen3's is tests/test_qk_norm_rope.py::test_bf16_and_engine_tokens_on_gpu)."""
    from conftest import hf_greedy, random_prompts
    from test_models_families import make_family_checkpoint
    from transformers import AutoModelForCausalLM

    from nanovllm import LLM, SamplingParams

    ckpt = make_family_checkpoint(str(tmp_path / "llama"), "llama")
    prompts = random_prompts([5, 40, 90], seed=3)
    llm = LLM(ckpt, dtype="float32", kvcache_block_size=16, max_model_len=256, max_num_seqs=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 12) for p in prompts]
