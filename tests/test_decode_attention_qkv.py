"""Decode attention from the qkv projection (nanovllm/kernels/decode_attention_qkv.py) in the Triton interpreter on
the CPU: its output and the caches it leaves equal q/k norm + RoPE + store (``qk_norm_rope_store``) followed by the
split-KV decode attention, for Qwen3-style (q/k norm) and Llama-style (RoPE only) heads, GQA groups 1-4, contexts
that put the new token alone in its tile, after a cached tail, or first; padding rows; every split count; and
the reference path on CPU tensors."""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from nanovllm.kernels import decode_attention, qk_norm_rope_store
from nanovllm.kernels.decode_attention_qkv import decode_attention_qkv
from nanovllm.layers.rotary_embedding import RotaryEmbedding

BLOCK_SIZE = 16


def make(h: int, hkv: int, d: int, ctx: list[int], dtype: torch.dtype, seed: int):  # noqa: ANN201
    """One decode step: qkv [B, (h + 2 hkv) d] (a column slice of a wider buffer), norm weights, rope table,
    positions ctx - 1, random caches, a block table of distinct shuffled blocks per row and the slots of the new
    tokens (-1 for a padding row, ctx 0)."""
    g = torch.Generator().manual_seed(seed)
    b = len(ctx)
    width = (h + 2 * hkv) * d
    qkv = (torch.randn(b, width + 8, generator=g) * 3).to(dtype)[:, :width]
    qw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)
    kw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)
    cos_sin = RotaryEmbedding(d, 4096, 1_000_000.0).cos_sin_cache
    width_blocks = max(1, -(-max(ctx) // BLOCK_SIZE)) + 1
    num_blocks = b * width_blocks + 2
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[:b * width_blocks].view(b, width_blocks).to(torch.int32)
    shape = (num_blocks, BLOCK_SIZE, hkv, d)
    k_cache, v_cache = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    positions = torch.tensor([max(n - 1, 0) for n in ctx])
    slots = torch.tensor([int(tables[i, (n - 1) // BLOCK_SIZE]) * BLOCK_SIZE + (n - 1) % BLOCK_SIZE if n > 0 else -1
                          for i, n in enumerate(ctx)])
    lens = torch.tensor(ctx, dtype=torch.int32)
    return qkv, qw, kw, cos_sin, positions, k_cache, v_cache, slots, tables, lens


def two_steps(qkv, qw, kw, cos_sin, positions, k_cache, v_cache, slots, tables, lens, h, hkv, d,  # noqa: ANN001
              num_splits):  # noqa: ANN001, ANN202
    """What the fused kernel replaces: the store kernel, then the split-KV kernels (Triton in the interpreter)."""
    q = qk_norm_rope_store(qkv, qw, kw, cos_sin, positions, h, hkv, 1e-6, k_cache, v_cache, slots, force_triton=True)
    return decode_attention(q, k_cache, v_cache, tables, lens, d ** -0.5, force_triton=True, num_splits=num_splits)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("h, hkv, d", [(4, 2, 16), (4, 4, 32), (8, 2, 16)])
@pytest.mark.parametrize("num_splits", [None, 1, 2, 3])
def test_equals_store_then_attention(norm: bool, h: int, hkv: int, d: int, num_splits: int | None) -> None:
    # contexts: the new token first (1), after a cached tail (20, 130), alone in its tile (65 = 64 cached), padding (0)
    ctx = [1, 20, 65, 0, 130]
    args = make(h, hkv, d, ctx, torch.float32, seed=h * 10 + d + (1 if norm else 0))
    qkv, qw, kw, cos_sin, positions, k_cache, v_cache, slots, tables, lens = args
    if not norm:
        qw = kw = None
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = two_steps(qkv, qw, kw, cos_sin, positions, k_ref, v_ref, slots, tables, lens, h, hkv, d, num_splits)
    k_out, v_out = k_cache.clone(), v_cache.clone()
    out = torch.full((len(ctx), h, d), float("nan"))
    o = decode_attention_qkv(qkv, qw, kw, cos_sin, positions, 1e-6, k_out, v_out, slots, tables, lens, h, hkv,
                             d ** -0.5, force_triton=True, num_splits=num_splits, out=out)
    assert o is out
    assert torch.allclose(o, ref, atol=2e-5, rtol=1e-5), (o - ref).abs().max()
    assert torch.equal(o[3], torch.zeros(h, d))  # the padding row
    # the new tokens' K/V landed at their slots (the same values as the store kernel's), nothing else changed
    assert torch.allclose(k_out, k_ref, atol=1e-5, rtol=1e-6) and torch.equal(v_out, v_ref)
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool).view(-1)
    written[slots[slots >= 0]] = True
    written = written.view(k_cache.shape[:2])
    assert torch.equal(k_out[~written], k_cache[~written]) and torch.equal(v_out[~written], v_cache[~written])
    assert not torch.equal(k_out[written], k_cache[written])


def test_fp16_within_tolerance() -> None:
    h, hkv, d = 8, 2, 32
    ctx = [40, 97, 3]
    qkv, qw, kw, cos_sin, positions, k_cache, v_cache, slots, tables, lens = make(h, hkv, d, ctx, torch.float16, 7)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = two_steps(qkv, qw, kw, cos_sin, positions, k_ref, v_ref, slots, tables, lens, h, hkv, d, 2)
    o = decode_attention_qkv(qkv, qw, kw, cos_sin, positions, 1e-6, k_cache, v_cache, slots, tables, lens, h, hkv,
                             d ** -0.5, force_triton=True, num_splits=2)
    assert rel_err(o.float(), ref.float()) < 1e-2
    assert rel_err(k_cache.float(), k_ref.float()) < 1e-3 and torch.equal(v_cache, v_ref)


def test_reference_path_on_cpu_tensors() -> None:
    h, hkv, d = 4, 2, 16
    ctx = [5, 33]
    qkv, qw, kw, cos_sin, positions, k_cache, v_cache, slots, tables, lens = make(h, hkv, d, ctx, torch.float32, 3)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = two_steps(qkv, qw, kw, cos_sin, positions, k_ref, v_ref, slots, tables, lens, h, hkv, d, None)
    o = decode_attention_qkv(qkv, qw, kw, cos_sin, positions, 1e-6, k_cache, v_cache, slots, tables, lens, h, hkv,
                             d ** -0.5)
    assert torch.allclose(o, ref, atol=1e-5) and torch.allclose(k_cache, k_ref, atol=1e-6)


def test_bad_arguments_raise_before_any_work() -> None:
    h, hkv, d = 4, 2, 16
    qkv, qw, kw, cos_sin, positions, k_cache, v_cache, slots, tables, lens = make(h, hkv, d, [5], torch.float32, 1)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="qkv must be"):
        decode_attention_qkv(qkv[:, :-1], qw, kw, cos_sin, positions, 1e-6, k_cache, v_cache, slots, tables, lens,
                             h, hkv, d ** -0.5, force_triton=True)
    with pytest.raises(ValueError, match="block_tables"):
        decode_attention_qkv(qkv, qw, kw, cos_sin, positions, 1e-6, k_cache, v_cache, slots, tables.long(), lens, h,
                             hkv, d ** -0.5, force_triton=True)
    with pytest.raises(ValueError, match="slot_mapping"):
        decode_attention_qkv(qkv, qw, kw, cos_sin, positions, 1e-6, k_cache, v_cache, slots[:0], tables, lens, h,
                             hkv, d ** -0.5, force_triton=True)
    assert torch.equal(k_cache, before)
