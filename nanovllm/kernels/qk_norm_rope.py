"""Per-head RMSNorm of q and k followed by RoPE, in one Triton kernel (Qwen3's attention prologue).

Qwen3 normalizes every query and key head (RMSNorm over ``head_dim``, its own weight for q and for k) and then
rotates both by the token's position (RoPE, RoFormer: Su et al. 2021, arXiv 2104.09864; the "rotate half"
layout: ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` with ``cos, sin`` of ``pos * base^(-2i/D)``).
Compiled by Inductor these become four to six small kernels per layer (reductions for the two norms, the
normalize-and-rotate passes, copies); at decode each is a 1-2 us launch that moves a few kilobytes. Here one
program per token reads the token's q and k heads straight from the fused ``qkv`` projection output, normalizes
and rotates them in registers and writes ``q`` and ``k``. :func:`qk_norm_rope_store` is the same kernel with the
KV-cache store of the token folded in (the rotated k heads and the v heads written into the paged caches by slot,
as :mod:`nanovllm.kernels.kv_store` writes them): the engine's decode layer launches one kernel for both.

Rounding follows the PyTorch path (``nanovllm.layers.layernorm.RMSNorm`` then
``nanovllm.layers.rotary_embedding.RotaryEmbedding``): statistics and the rotation in float32, the normalized
head rounded to the model dtype before the weight multiply, the product rounded again, the rotated head rounded
once at the end.

The engine's model uses it on the GPU (docs/performance.md compares it with Inductor's compilation of the PyTorch
path); it is tested in the Triton interpreter against the PyTorch path (fp32/fp16) and in bf16
with greedy engine tokens on the GPU.

Public API: :func:`qk_norm_rope` and :func:`qk_norm_rope_store` (Triton on CUDA / ``force_triton``, reference
otherwise), :func:`qk_norm_rope_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusion_pass.launch import launch_options, next_power_of_2, use_pdl
from nanovllm.layers.layernorm import rms_norm
from nanovllm.layers.rotary_embedding import RotaryEmbedding

from .reference import store_kvcache_ref


def qk_norm_rope_ref(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos_sin: torch.Tensor,
                     positions: torch.Tensor, num_heads: int, num_kv_heads: int, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path, with the model's own functions: RMSNorm of each q / k head, then RoPE. Same contract as
    :func:`qk_norm_rope`."""
    head_dim = q_weight.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].reshape(-1, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].reshape(-1, num_kv_heads, head_dim)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, -1)
    return (RotaryEmbedding._rotate(rms_norm(q, q_weight, eps), cos, sin),
            RotaryEmbedding._rotate(rms_norm(k, k_weight, eps), cos, sin))


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, qw_ptr, kw_ptr, cs_ptr, pos_ptr, q_ptr, k_ptr, kc_ptr, vc_ptr, slot_ptr, stride_t,
                         stride_cs, eps, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, ROWS: tl.constexpr,
                         KV_ROWS: tl.constexpr, HALF: tl.constexpr, STORE: tl.constexpr = False,
                         NORM: tl.constexpr = True, USE_PDL: tl.constexpr = False):
    """One token: rows ``[0, NUM_HEADS)`` are its q heads, ``[NUM_HEADS, NUM_HEADS + NUM_KV_HEADS)`` its k heads,
    each split in two halves of ``HALF`` columns; q is written ``[T, NUM_HEADS, 2 HALF]``. Without ``STORE`` k is
    written ``[T, NUM_KV_HEADS, 2 HALF]`` (``kc_ptr``, ``vc_ptr``, ``slot_ptr`` unused); with ``STORE`` the rotated
    k heads and the token's v heads (copied from ``qkv``) go to the paged caches ``[slots, NUM_KV_HEADS, 2 HALF]``
    at ``slot_ptr[t]``, nothing where that slot is negative (padding), and ``k_ptr`` is unused. Without ``NORM``
    the heads are only rotated (Llama; ``qw_ptr``, ``kw_ptr`` unused)."""
    t = tl.program_id(0)
    if USE_PDL:  # everything below depends on the previous kernel (fusion_pass/launch.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.arange(0, ROWS)
    c = tl.arange(0, HALF)
    is_q = r < NUM_HEADS
    row_ok = r < NUM_HEADS + NUM_KV_HEADS
    D = 2 * HALF
    token_row = qkv_ptr + t.to(tl.int64) * stride_t
    base = token_row + r[:, None] * D + c[None, :]
    m = row_ok[:, None]
    x1 = tl.load(base, mask=m, other=0.0)
    x2 = tl.load(base + HALF, mask=m, other=0.0)
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    if NORM:
        inv = 1.0 / tl.sqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / D + eps)
        # the norm weight: q's for q rows, k's for k rows
        wq1 = tl.load(qw_ptr + c)
        wq2 = tl.load(qw_ptr + HALF + c)
        wk1 = tl.load(kw_ptr + c)
        wk2 = tl.load(kw_ptr + HALF + c)
        w1 = tl.where(is_q[:, None], wq1[None, :], wk1[None, :])
        w2 = tl.where(is_q[:, None], wq2[None, :], wk2[None, :])
        # rounded like the PyTorch path: normalized head in the model dtype, times the weight in the model dtype
        n1 = ((f1 * inv[:, None]).to(dt) * w1).to(dt).to(tl.float32)
        n2 = ((f2 * inv[:, None]).to(dt) * w2).to(dt).to(tl.float32)
    else:
        n1, n2 = f1, f2
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * stride_cs + c)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + c)[None, :]
    o1 = (n1 * cos - n2 * sin).to(dt)
    o2 = (n2 * cos + n1 * sin).to(dt)
    q_off = q_ptr + t.to(tl.int64) * (NUM_HEADS * D) + r[:, None] * D + c[None, :]
    tl.store(q_off, o1, mask=is_q[:, None])
    tl.store(q_off + HALF, o2, mask=is_q[:, None])
    kr = r - NUM_HEADS
    is_k = (r >= NUM_HEADS) & row_ok
    if STORE:
        # the KV-cache store of nanovllm/kernels/kv_store.py, same layout and padding rule
        slot = tl.load(slot_ptr + t).to(tl.int64)
        k_dst = kc_ptr + slot * (NUM_KV_HEADS * D) + kr[:, None] * D + c[None, :]
        k_m = is_k[:, None] & (slot >= 0)
        tl.store(k_dst, o1.to(kc_ptr.dtype.element_ty), mask=k_m)
        tl.store(k_dst + HALF, o2.to(kc_ptr.dtype.element_ty), mask=k_m)
        vr = tl.arange(0, KV_ROWS)
        v_m = (vr < NUM_KV_HEADS)[:, None] & (slot >= 0)
        v_src = token_row + (NUM_HEADS + NUM_KV_HEADS) * D + vr[:, None] * D + c[None, :]
        v_dst = vc_ptr + slot * (NUM_KV_HEADS * D) + vr[:, None] * D + c[None, :]
        tl.store(v_dst, tl.load(v_src, mask=v_m).to(vc_ptr.dtype.element_ty), mask=v_m)
        tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=v_m).to(vc_ptr.dtype.element_ty), mask=v_m)
    else:
        k_off = k_ptr + t.to(tl.int64) * (NUM_KV_HEADS * D) + kr[:, None] * D + c[None, :]
        tl.store(k_off, o1, mask=is_k[:, None])
        tl.store(k_off + HALF, o2, mask=is_k[:, None])


def _check_args(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                cos_sin: torch.Tensor, positions: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """The ValueErrors of :func:`qk_norm_rope` (``D`` from the norm weights, or from ``cos_sin`` without them)."""
    head_dim = q_weight.shape[0] if q_weight is not None else cos_sin.shape[-1]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [T, (H + 2 Hkv) D] with a contiguous last dim, got {tuple(qkv.shape)} for "
                         f"H={num_heads}, Hkv={num_kv_heads}, D={head_dim}")
    if q_weight is not None and (k_weight is None or k_weight.shape != (head_dim,)):
        raise ValueError(f"q/k norm weights must both be [D], got {tuple(q_weight.shape)} and "
                         f"{None if k_weight is None else tuple(k_weight.shape)}")
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 2, got {head_dim}")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != head_dim or cos_sin.dtype != torch.float32:
        raise ValueError(f"cos_sin must be float32 [P, {head_dim}], got {cos_sin.dtype} {tuple(cos_sin.shape)}")
    if positions.shape != (qkv.shape[0],):
        raise ValueError(f"positions must be [{qkv.shape[0]}], got {tuple(positions.shape)}")


def _launch(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, cos_sin: torch.Tensor,
            positions: torch.Tensor, num_heads: int, num_kv_heads: int, eps: float, q: torch.Tensor,
            k: torch.Tensor | None, kv_store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
    """One program per token; writes ``k`` (no store) or stores into ``kv_store = (k_cache, v_cache, slots)``;
    normalizes only with weights."""
    t = qkv.shape[0]
    if t == 0:
        return
    head_dim = cos_sin.shape[1]
    k_cache, v_cache, slots = kv_store if kv_store is not None else (q, q, positions)  # unused without the store
    cs = cos_sin.contiguous()
    norm = q_weight is not None and k_weight is not None
    qw, kw = (q_weight.contiguous(), k_weight.contiguous()) if norm else (cs, cs)  # unused without the norm
    pdl = use_pdl(qkv)
    _qk_norm_rope_kernel[(t,)](qkv, qw, kw, cs, positions, q, k if k is not None else q, k_cache, v_cache, slots,
                               qkv.stride(0), cs.stride(0), float(eps), NUM_HEADS=num_heads,
                               NUM_KV_HEADS=num_kv_heads, ROWS=next_power_of_2(num_heads + num_kv_heads),
                               KV_ROWS=next_power_of_2(num_kv_heads), HALF=head_dim // 2,
                               STORE=kv_store is not None, NORM=norm, USE_PDL=pdl, num_warps=4,
                               **launch_options(pdl))


def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos_sin: torch.Tensor,
                 positions: torch.Tensor, num_heads: int, num_kv_heads: int, eps: float,
                 force_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of every q and k head (own weights), then RoPE at each token's position.

    Args:
        qkv: ``[T, (H + 2 Hkv) D]`` (the fused projection's output: q heads, k heads, v heads), last dim
            contiguous; fp16/bf16/fp32.
        q_weight, k_weight: ``[D]`` norm weights, ``qkv``'s dtype; ``D`` a power of two >= 2.
        cos_sin: float32 ``[P, D]``, ``[cos | sin]`` of ``pos * base^(-2i/D)`` for ``i < D / 2`` (the
            ``cos_sin_cache`` of :class:`nanovllm.layers.rotary_embedding.RotaryEmbedding`).
        positions: int ``[T]``, each in ``[0, P)``.
        num_heads, num_kv_heads: ``H`` and ``Hkv``.
        eps: added to the mean square.
        force_triton: run the kernel on CPU tensors (``TRITON_INTERPRET=1`` tests).

    Returns:
        ``(q [T, H, D], k [T, Hkv, D])``, new contiguous tensors in ``qkv.dtype``.

    Raises:
        ValueError: inconsistent shapes or dtypes.
    """
    _check_args(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads)
    if not (qkv.is_cuda or force_triton):
        return qk_norm_rope_ref(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, eps)
    t, head_dim = qkv.shape[0], q_weight.shape[0]
    q = torch.empty((t, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((t, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _launch(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, eps, q, k, None)
    return q, k


def qk_norm_rope_store(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                       cos_sin: torch.Tensor, positions: torch.Tensor, num_heads: int, num_kv_heads: int,
                       eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       force_triton: bool = False) -> torch.Tensor:
    """:func:`qk_norm_rope` with the KV-cache store of its token in the same kernel: the rotated k heads and the v
    heads of ``qkv`` are written into the paged caches by slot, exactly as :func:`nanovllm.kernels.store_kvcache`
    writes them (same layout, cast to the cache dtype, a negative slot = padding, nothing stored).

    Args:
        qkv, cos_sin, positions, num_heads, num_kv_heads, eps, force_triton: as for :func:`qk_norm_rope`.
        q_weight, k_weight: ``[D]`` norm weights as for :func:`qk_norm_rope`, or both None: RoPE only, no norm
            (the Llama family; ``eps`` unused, ``D`` from ``cos_sin``); the rotation rounds like
            :class:`nanovllm.layers.rotary_embedding.RotaryEmbedding`.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, contiguous, same shape; written in place.
        slot_mapping: int ``[T]``, ``slot = block_id * block_size + offset``; negative = padding.

    Returns:
        q ``[T, H, D]``, a new contiguous tensor in ``qkv.dtype`` (k lives only in the cache).

    Raises:
        ValueError: inconsistent shapes or dtypes, or caches that are not contiguous.
    """
    _check_args(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads)
    t, head_dim = qkv.shape[0], cos_sin.shape[1]
    if (k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != (num_kv_heads, head_dim)
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        raise ValueError(f"k_cache/v_cache must be contiguous [num_blocks, block_size, {num_kv_heads}, {head_dim}] "
                         f"of one shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if slot_mapping.shape != (t,):
        raise ValueError(f"slot_mapping must be [{t}], got {tuple(slot_mapping.shape)}")
    if not (qkv.is_cuda or force_triton):
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        if q_weight is not None and k_weight is not None:
            q, k = qk_norm_rope_ref(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, eps)
        else:
            cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, -1)
            q = RotaryEmbedding._rotate(qkv[:, :q_size].reshape(t, num_heads, head_dim), cos, sin)
            k = RotaryEmbedding._rotate(qkv[:, q_size:q_size + kv_size].reshape(t, num_kv_heads, head_dim), cos, sin)
        v = qkv[:, q_size + kv_size:].reshape(t, num_kv_heads, head_dim)
        store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)
        return q
    q = torch.empty((t, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _launch(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, eps, q, None,
            (k_cache, v_cache, slot_mapping))
    return q
