"""Tests of nanovllm.kernels: Triton kernels (interpreter on CPU) vs PyTorch references vs dense float64 SDPA.

Every comparison is a relative error ``||out - ref|| / ||ref||`` with thresholds fp32 <= 1e-4, fp16 <= 1e-2.
Outputs are pre-filled with NaN (``out=`` argument) so an element the kernel forgets to write fails the test.
"""
from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

# tests/conftest.py (lead) sets this when CUDA is absent; keep a fallback so this module also runs alone.
# It must happen before triton is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    raise

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import run_aot_script  # noqa: E402
from nanovllm.kernels import (  # noqa: E402
    choose_num_splits,
    decode_attention,
    decode_attention_triton,
    decode_attention_ref,
    prefill_attention,
    prefill_attention_ref,
    store_kvcache,
    store_kvcache_ref,
)

# The interpreter's range() over tensor bounds triggers a NumPy scalar-conversion DeprecationWarning.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def seed_of(*parts: object) -> int:
    """A deterministic seed from the test parameters (``hash`` of str is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def make_paged(
    ctx_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    extra_blocks: int = 3,
    extra_cols: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random paged K/V caches and a block table with randomly permuted block ids, rows padded with -1.

    Returns ``(k_cache, v_cache, block_tables)``; the caches hold ``sum(blocks) + extra_blocks`` blocks
    (the unused ones are random too, so reading a wrong block changes the result).
    """
    blocks_per_seq = [(c + block_size - 1) // block_size for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(blocks_per_seq) + extra_cols
    block_tables = torch.full((len(ctx_lens), width), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    return k_cache.to(DEVICE), v_cache.to(DEVICE), block_tables.to(DEVICE)


def dense_attention_f64(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_lens: list[int],
    ctx_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Independent ground truth: gather K/V token by slot, expand GQA heads, float64 SDPA with a causal mask."""
    num_heads = q.shape[1]
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = num_heads // num_kv_heads
    k_flat = k_cache.reshape(-1, num_kv_heads, head_dim).double().cpu()
    v_flat = v_cache.reshape(-1, num_kv_heads, head_dim).double().cpu()
    bt = block_tables.cpu().long()
    outs = []
    start = 0
    for b, (q_len, ctx) in enumerate(zip(q_lens, ctx_lens)):
        pos = torch.arange(ctx)
        slots = bt[b, pos // block_size] * block_size + pos % block_size
        assert (slots >= 0).all()
        k = k_flat[slots].repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]
        v = v_flat[slots].repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[start : start + q_len].double().cpu().transpose(0, 1)  # [H, q_len, D]
        q_pos = ctx - q_len + torch.arange(q_len)
        mask = pos[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
        outs.append(o.transpose(0, 1))
        start += q_len
    return torch.cat(outs)


def cu(lens: list[int]) -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=DEVICE)


# (q_lens, ctx_lens): full prompts, block-aligned and not; cached prefixes / chunked prefill (q_len < ctx_len).
PREFILL_CASES = {
    "single_token": ([1], [1]),
    "full_prompts": ([1, 16, 33, 130], [1, 16, 33, 130]),
    "aligned": ([32, 64], [32, 64]),
    "cached_prefix": ([5, 1, 40, 100], [37, 64, 200, 100]),
    "chunked_long": ([64, 3], [300, 260]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (6, 2)], ids=lambda h: f"H{h[0]}kv{h[1]}")
@pytest.mark.parametrize("case", list(PREFILL_CASES), ids=str)
def test_prefill_attention(dtype: torch.dtype, block_size: int, heads: tuple[int, int], case: str) -> None:
    q_lens, ctx_lens = PREFILL_CASES[case]
    num_heads, num_kv_heads = heads
    head_dim = 32 if dtype == torch.float32 else 64
    gen = torch.Generator().manual_seed(seed_of(case, block_size, num_heads, dtype))
    k_cache, v_cache, bt = make_paged(ctx_lens, block_size, num_kv_heads, head_dim, dtype, gen)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    args = (q, k_cache, v_cache, cu(q_lens), cu(ctx_lens), bt, max(q_lens), max(ctx_lens), scale)

    dense = dense_attention_f64(q, k_cache, v_cache, bt, q_lens, ctx_lens, scale)
    ref = prefill_attention_ref(*args)
    assert ref.dtype == dtype and ref.shape == q.shape
    assert rel_err(ref.cpu(), dense) <= TOL[dtype]

    out = torch.full_like(q, float("nan"))
    res = prefill_attention(*args, force_triton=True, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all(), "some output element was not written"
    err = rel_err(out.cpu(), dense)
    assert err <= TOL[dtype], err
    assert rel_err(out, ref) <= TOL[dtype]


def test_prefill_small_tiles_and_multi_tile_rows() -> None:
    """Forced small tiles: many query tiles per sequence and key tiles crossing several blocks."""
    from nanovllm.kernels import prefill_attention_triton

    gen = torch.Generator().manual_seed(7)
    q_lens, ctx_lens = [70, 19], [90, 19]
    k_cache, v_cache, bt = make_paged(ctx_lens, 16, 1, 16, torch.float32, gen)
    q = torch.randn(sum(q_lens), 2, 16, generator=gen).to(DEVICE)
    args = (q, k_cache, v_cache, cu(q_lens), cu(ctx_lens), bt, max(q_lens), max(ctx_lens), 0.3)
    dense = dense_attention_f64(q, k_cache, v_cache, bt, q_lens, ctx_lens, 0.3)
    for bm, bn in [(8, 16), (16, 32), (8, 64)]:
        out = torch.full_like(q, float("nan"))
        prefill_attention_triton(*args, block_m=bm, block_n=bn, out=out)
        assert torch.isfinite(out).all()
        assert rel_err(out.cpu(), dense) <= 1e-4, (bm, bn)


DECODE_CTX = [1, 15, 16, 17, 100, 257, 300]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (8, 2)], ids=lambda h: f"H{h[0]}kv{h[1]}")
@pytest.mark.parametrize("num_splits", [None, 1, 3, 16])
def test_decode_attention(dtype: torch.dtype, block_size: int, heads: tuple[int, int], num_splits: int | None) -> None:
    num_heads, num_kv_heads = heads
    head_dim = 32 if dtype == torch.float32 else 64
    ctx_lens = DECODE_CTX
    gen = torch.Generator().manual_seed(seed_of(block_size, num_heads, dtype, num_splits))
    k_cache, v_cache, bt = make_paged(ctx_lens, block_size, num_kv_heads, head_dim, dtype, gen)
    q = torch.randn(len(ctx_lens), num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5

    dense = dense_attention_f64(q, k_cache, v_cache, bt, [1] * len(ctx_lens), ctx_lens, scale)
    ref = decode_attention_ref(q, k_cache, v_cache, bt, lens, scale)
    assert rel_err(ref.cpu(), dense) <= TOL[dtype]

    out = torch.full_like(q, float("nan"))
    decode_attention_triton(q, k_cache, v_cache, bt, lens, scale, num_splits=num_splits, out=out)
    assert torch.isfinite(out).all(), "some output element was not written"
    err = rel_err(out.cpu(), dense)
    assert err <= TOL[dtype], err
    assert rel_err(out, ref) <= TOL[dtype]


def test_decode_max_context_len_hint_and_padding_rows() -> None:
    """max_context_len bounds the split count; a row with context 0 (batch padding) yields zeros, not NaN."""
    gen = torch.Generator().manual_seed(3)
    ctx_lens = [40, 200, 129]
    k_cache, v_cache, bt = make_paged(ctx_lens, 16, 2, 32, torch.float32, gen, extra_cols=10)
    q = torch.randn(4, 4, 32, generator=gen).to(DEVICE)
    bt = torch.cat([bt, torch.full((1, bt.shape[1]), -1, dtype=torch.int32, device=DEVICE)])
    lens = torch.tensor(ctx_lens + [0], dtype=torch.int32, device=DEVICE)
    dense = dense_attention_f64(q[:3], k_cache, v_cache, bt, [1, 1, 1], ctx_lens, 0.2)
    ref = decode_attention_ref(q, k_cache, v_cache, bt, lens, 0.2)
    assert torch.equal(ref[3], torch.zeros_like(ref[3]))
    # 5 and 13 splits: more splits than a short row has tiles, and tiles dealt unevenly over the splits
    for splits, hint in [(None, 200), (4, 200), (1, None), (5, None), (13, None)]:
        out = torch.full_like(q, float("nan"))
        decode_attention_triton(q, k_cache, v_cache, bt, lens, 0.2, num_splits=splits, max_context_len=hint, out=out)
        assert torch.isfinite(out).all()
        assert rel_err(out[:3].cpu(), dense) <= 1e-4
        assert torch.equal(out[3], torch.zeros_like(out[3]))


def test_choose_num_splits() -> None:
    # Batch 1, long context: split until the SMs are busy (4 waves of 132 SMs over 8 kv heads = 66), bounded by
    # the number of 64-token tiles (64) and DECODE_MAX_SPLITS (64).
    assert choose_num_splits(1, 8, 4096, 132) == 64
    assert choose_num_splits(8, 8, 4096, 132) == 9
    # Big batch: one program per (sequence, kv head) is already several waves.
    assert choose_num_splits(256, 8, 4096, 132) == 1
    # Short context: never more splits than tiles.
    assert choose_num_splits(1, 8, 100, 132) == 2
    assert choose_num_splits(1, 8, 64, 132) == 1
    assert all(choose_num_splits(b, 8, c, 132) >= 1 for b in (1, 3, 64) for c in (1, 17, 10_000))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("use_triton", [False, True], ids=["ref", "triton"])
def test_store_kvcache(dtype: torch.dtype, use_triton: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 16, 2, 32
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    k0, v0 = k_cache.clone(), v_cache.clone()
    n = 40
    # key/value as strided views of a fused qkv-like buffer (like the model's split of qkv_proj output).
    fused = torch.randn(n, 3, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    key, value = fused[:, 1], fused[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(torch.int32)
    slots[::7] = -1  # padding tokens
    slots = slots.to(DEVICE)
    store_kvcache(key, value, k_cache, v_cache, slots, force_triton=use_triton)

    k_flat, v_flat = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    k0_flat, v0_flat = k0.view(-1, num_kv_heads, head_dim), v0.view(-1, num_kv_heads, head_dim)
    valid = slots >= 0
    written = slots[valid].long()
    assert torch.equal(k_flat[written], key[valid])
    assert torch.equal(v_flat[written], value[valid])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    assert torch.equal(k_flat[untouched], k0_flat[untouched]), "padding / unrelated slots were modified"
    assert torch.equal(v_flat[untouched], v0_flat[untouched])


def test_store_kvcache_all_padding_is_noop() -> None:
    k_cache = torch.randn(2, 16, 1, 16).to(DEVICE)
    v_cache = torch.randn(2, 16, 1, 16).to(DEVICE)
    k0, v0 = k_cache.clone(), v_cache.clone()
    kv = torch.randn(5, 1, 16).to(DEVICE)
    slots = torch.full((5,), -1, dtype=torch.int32, device=DEVICE)
    for force in (False, True):
        store_kvcache(kv, kv, k_cache, v_cache, slots, force_triton=force)
        assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0)


def test_store_then_prefill_then_decode_matches_dense() -> None:
    """The engine's sequence: store a prompt's K/V by slot, prefill it, then store + decode one more token."""
    gen = torch.Generator().manual_seed(5)
    block_size, hkv, h, d = 16, 2, 4, 32
    prompt = [23, 48]
    k_cache = torch.zeros(10, block_size, hkv, d, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    bt = torch.tensor([[7, 2, -1, -1, -1], [0, 9, 4, 5, -1]], dtype=torch.int32, device=DEVICE)

    def slots_of(b: int, positions: range) -> list[int]:
        return [int(bt[b, p // block_size]) * block_size + p % block_size for p in positions]

    n = sum(prompt)
    q = torch.randn(n, h, d, generator=gen).to(DEVICE)
    k = torch.randn(n, hkv, d, generator=gen).to(DEVICE)
    v = torch.randn(n, hkv, d, generator=gen).to(DEVICE)
    slots = torch.tensor(slots_of(0, range(23)) + slots_of(1, range(48)), dtype=torch.int32, device=DEVICE)
    store_kvcache(k, v, k_cache, v_cache, slots, force_triton=True)
    args = (q, k_cache, v_cache, cu(prompt), cu(prompt), bt, 48, 48, d**-0.5)
    out = prefill_attention(*args, force_triton=True)
    assert rel_err(out.cpu(), dense_attention_f64(q, k_cache, v_cache, bt, prompt, prompt, d**-0.5)) <= 1e-4

    qd = torch.randn(2, h, d, generator=gen).to(DEVICE)
    kd = torch.randn(2, hkv, d, generator=gen).to(DEVICE)
    store_kvcache(kd, kd, k_cache, v_cache, torch.tensor(slots_of(0, range(23, 24)) + slots_of(1, range(48, 49)), dtype=torch.int32, device=DEVICE), force_triton=True)
    lens = torch.tensor([24, 49], dtype=torch.int32, device=DEVICE)
    outd = decode_attention(qd, k_cache, v_cache, bt, lens, d**-0.5, force_triton=True, num_splits=2)
    dense = dense_attention_f64(qd, k_cache, v_cache, bt, [1, 1], [24, 49], d**-0.5)
    assert rel_err(outd.cpu(), dense) <= 1e-4


def test_shape_errors() -> None:
    k_cache = torch.zeros(2, 16, 3, 16)
    q = torch.zeros(1, 4, 16)  # 4 heads not a multiple of 3 kv heads
    bt = torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError):
        decode_attention(q, k_cache, k_cache, bt, lens, 1.0, force_triton=True)
    with pytest.raises(ValueError):
        decode_attention_ref(q, k_cache, k_cache, bt, lens, 1.0)
    with pytest.raises(ValueError):
        prefill_attention(q, k_cache, k_cache, cu([1]), cu([1]), bt, 1, 1, 1.0, force_triton=True)
    with pytest.raises(ValueError):
        store_kvcache_ref(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), k_cache, k_cache, lens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are only meaningful on a GPU")
@pytest.mark.gpu
def test_bf16_on_gpu() -> None:
    gen = torch.Generator().manual_seed(1)
    q_lens, ctx_lens = [1, 77, 300], [1, 100, 300]
    k_cache, v_cache, bt = make_paged(ctx_lens, 16, 8, 128, torch.bfloat16, gen)
    q = torch.randn(sum(q_lens), 16, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    args = (q, k_cache, v_cache, cu(q_lens), cu(ctx_lens), bt, max(q_lens), max(ctx_lens), 128**-0.5)
    assert rel_err(prefill_attention(*args), prefill_attention_ref(*args)) <= 1e-2
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    qd = q[:3].contiguous()
    assert rel_err(decode_attention(qd, k_cache, v_cache, bt, lens, 0.1), decode_attention_ref(qd, k_cache, v_cache, bt, lens, 0.1)) <= 1e-2


# Compiles the attention kernels for sm_90 the way a launch on an H100/H200 would (pointers and strides that are
# multiples of 16 marked divisible, as Triton specializes them at run time): the tensor-core (mma) path for
# 16-bit inputs, the FMA path for fp32 ("ieee") and both block-table paths (BLOCK_N > and <= block_size).
_ATTN_AOT_SCRIPT = r"""
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
pa = importlib.import_module("nanovllm.kernels.prefill_attention")
da = importlib.import_module("nanovllm.kernels.decode_attention")
INT_PTRS = {"bt_ptr", "cu_q_ptr", "cu_k_ptr", "ctx_ptr", "lock_ptr", "slot_ptr"}
F32_PTRS = {"m_part_ptr", "l_part_ptr", "acc_part_ptr"}

def compile_one(fn, ptr, consts, warps, stages, want_mma):
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in consts:
            sig[n] = "constexpr"
            continue
        if n.endswith("_ptr"):
            sig[n] = "*i32" if n in INT_PTRS else "*fp32" if n in F32_PTRS else ptr
        else:
            sig[n] = "fp32" if n == "qk_scale" else "i32"
        if n.endswith("_ptr") or (n.startswith("stride_") and n != "stride_bt"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    assert "cubin" in c.asm, fn.__name__
    assert ("mma" in c.asm["ptx"]) == want_mma, (fn.__name__, consts)

for ptr, prec, bn, mma in (("*bf16", "tf32", 64, True), ("*fp32", "ieee", 32, False)):
    for bs in (16, 256):
        compile_one(pa._prefill_kernel, ptr, dict(GROUP=2, GROUP_PAD=2, BLOCK_M=64, BLOCK_N=bn, BLOCK_SIZE=bs,
                                                  HEAD_DIM=128, DOT_PRECISION=prec), 8, 2, mma)
for bs, direct, pdl in ((16, False, False), (256, True, True), (16, False, True)):
    compile_one(da._decode_split_kernel, "*bf16", dict(NUM_HEADS=16, GROUP=2,
                ROWS=16, BLOCK_N=64, BLOCK_SIZE=bs, HEAD_DIM=128, DIRECT=direct, DOT_PRECISION="tf32",
                USE_PDL=pdl), 4, 3, True)
ks = importlib.import_module("nanovllm.kernels.kv_store")
for pdl in (False, True):
    compile_one(ks._store_kvcache_kernel, "*bf16", dict(NUM_KV_HEADS=8, HEAD_DIM=128, HEADS_PAD=8, DIM_PAD=128,
                                                        USE_PDL=pdl), 4, 1, False)
compile_one(da._decode_reduce_kernel, "*bf16", dict(NUM_HEADS=16, SPLITS_PAD=8, BLOCK_N=64,
                                                    HEAD_DIM=128), 4, 1, False)
print("AOT-OK")
"""


def test_attention_kernels_compile_for_sm90_ahead_of_time() -> None:
    """Compile the prefill / decode kernels to Hopper cubins without a GPU (subprocess without TRITON_INTERPRET):
    catches GPU-only compile errors that the interpreter hides; 16-bit dots must use mma, fp32 "ieee" must not."""
    run_aot_script(_ATTN_AOT_SCRIPT, timeout=600)


def test_decode_split_count_is_a_runtime_argument() -> None:
    """The split count follows the batch size (:func:`choose_num_splits`); as a compile-time constant it compiled
    one kernel variant per CUDA-graph size at engine start and one per new batch size with ``enforce_eager``."""
    import importlib
    import inspect

    da = importlib.import_module("nanovllm.kernels.decode_attention")  # the package re-exports a function so named
    for fn in (da._decode_split_kernel, da._decode_reduce_kernel):
        py = fn.fn  # the Python function under both @triton.jit and the interpreter
        ann = inspect.signature(py).parameters["num_splits"].annotation
        assert "constexpr" not in str(ann), fn
        assert "NUM_SPLITS" not in inspect.getsource(py), fn
    # and not specialized on its value (1, multiples of 16) either: one variant per (DIRECT, dtype, shape)
    src = inspect.getsource(da)
    for name in ("_decode_split_kernel", "_decode_reduce_kernel"):
        assert f'@triton.jit(do_not_specialize=["num_splits"])\ndef {name}(' in src, name
