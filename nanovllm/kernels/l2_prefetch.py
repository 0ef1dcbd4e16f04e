"""Prefetch weights into the GPU's L2 cache ahead of the kernels that read them (Hopper bulk prefetch).

At batch 1 a decode step is a chain of short kernels: the GEMVs stream their weights from HBM, the kernels between
them (q/k norm + RoPE, attention) read little, and every kernel spends part of its time ramping up and draining.
HBM sits idle in those gaps. One launch of :func:`prefetch_l2` asks the memory system to bring the next kernels'
weights into L2 (``cp.async.bulk.prefetch.L2.global``, PTX ISA 8.0, sm_90: an asynchronous bulk copy from global
memory into L2 with no destination; the issuing thread does not wait for it), so that HBM keeps streaming while
the small kernels run and the GEMVs that follow find their weights in L2. A prefetch is only a hint: it changes
no value, and the kernels that read the weights are correct whether it lands, lands late or is evicted.

The kernel follows the PDL pattern of :mod:`fusion_pass.launch` (independent work -> ``gdc_wait`` ->
``gdc_launch_dependents``): it issues its prefetches first, then waits for the previous kernel, so the kernel after
it is ordered after both. On a device without bulk prefetch (compute capability < 9) or on the CPU it launches
nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusion_pass.launch import capability_major, cdiv, launch_options, use_pdl

CHUNK_BYTES = 16384  # bytes per bulk prefetch instruction (a multiple of 16, as the instruction requires)
CHUNKS_PER_PROGRAM = 32  # one instruction per thread of a one-warp program
MAX_TENSORS = 4


@triton.jit
def _prefetch_chunks(base, nbytes, idx, CHUNK: tl.constexpr, LINE: tl.constexpr):
    """Issue the bulk L2 prefetch of chunks ``idx`` (a block of chunk indices) of the ``nbytes`` at ``base``;
    chunks past the end are skipped (size 0, predicated off)."""
    start = idx.to(tl.int64) * CHUNK
    if LINE:
        off = start[:, None] + (tl.arange(0, CHUNK // 128) * 128)[None, :]
        ok = (off < nbytes).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
            "=r,l,r", [base.to(tl.pointer_type(tl.int8)) + off, ok], dtype=tl.int32, is_pure=False, pack=1)
    else:
        size = tl.minimum(nbytes - start, CHUNK)
        size = tl.where(size > 0, size, 0).to(tl.int32)
        ptrs = base.to(tl.pointer_type(tl.int8)) + start
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _l2_prefetch_kernel(a_ptr, a_bytes, b_ptr, b_bytes, c_ptr, c_bytes, d_ptr, d_bytes,
                        N: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, LINE: tl.constexpr = False,
                        USE_PDL: tl.constexpr = False):
    """Program p prefetches chunks ``[p * BLOCK, (p + 1) * BLOCK)`` of each of the ``N`` (1-4) byte ranges."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _prefetch_chunks(a_ptr, a_bytes, idx, CHUNK, LINE)
    if N > 1:
        _prefetch_chunks(b_ptr, b_bytes, idx, CHUNK, LINE)
    if N > 2:
        _prefetch_chunks(c_ptr, c_bytes, idx, CHUNK, LINE)
    if N > 3:
        _prefetch_chunks(d_ptr, d_bytes, idx, CHUNK, LINE)
    if USE_PDL:  # ordered after the previous kernel, so the next kernel's wait covers both (fusion_pass/launch.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def prefetch_supported(t: torch.Tensor) -> bool:
    """Whether :func:`prefetch_l2` launches anything for tensors on ``t``'s device: CUDA, compute capability >= 9."""
    return t.is_cuda and capability_major(t.device) >= 9


def prefetch_plan(tensors: list[torch.Tensor], chunk_bytes: int = CHUNK_BYTES,
                  chunks_per_program: int = CHUNKS_PER_PROGRAM) -> tuple[list[tuple[int, int]], int]:
    """``([(data_ptr, nbytes), ...], programs)``: the byte ranges :func:`prefetch_l2` prefetches and its grid.

    Each tensor must be contiguous (its bytes one range) and start on a 16-byte boundary, and its size must be a
    multiple of 16 bytes (the bulk prefetch's alignment rule); ``ValueError`` otherwise, naming the tensor's index.
    ``TypeError`` if there are more than 4 tensors or none."""
    if not 1 <= len(tensors) <= MAX_TENSORS:
        raise TypeError(f"prefetch_l2 takes 1 to {MAX_TENSORS} tensors, got {len(tensors)}")
    ranges = []
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if not t.is_contiguous() or t.data_ptr() % 16 or nbytes % 16:
            raise ValueError(f"prefetch_l2: tensor {i} must be contiguous, 16-byte aligned and a multiple of 16 "
                             f"bytes long (shape {tuple(t.shape)}, {nbytes} bytes, address {t.data_ptr():#x})")
        ranges.append((t.data_ptr(), nbytes))
    programs = max(cdiv(cdiv(n, chunk_bytes), chunks_per_program) for _, n in ranges)
    return ranges, programs


def prefetch_l2(tensors: list[torch.Tensor], chunk_bytes: int = CHUNK_BYTES, line: bool = False) -> None:
    """Bring the bytes of 1-4 CUDA tensors (typically the weights of the next kernels) into L2, asynchronously.

    Launches one kernel of ``cdiv(cdiv(max bytes, chunk_bytes), 32)`` one-warp programs; each thread issues one
    bulk prefetch of ``chunk_bytes`` (a multiple of 16). Nothing is launched on a CPU tensor or a GPU of compute
    capability < 9. Errors as :func:`prefetch_plan`.
    """
    if not tensors or not prefetch_supported(tensors[0]):
        prefetch_plan(tensors, chunk_bytes)  # the same argument errors on every device
        return
    if chunk_bytes % 16 or chunk_bytes <= 0:
        raise ValueError(f"prefetch_l2: chunk_bytes must be a positive multiple of 16, got {chunk_bytes}")
    ranges, programs = prefetch_plan(tensors, chunk_bytes)
    padded = tensors + [tensors[0]] * (MAX_TENSORS - len(tensors))
    sizes = [n for _, n in ranges] + [0] * (MAX_TENSORS - len(ranges))
    pdl = use_pdl(tensors[0])
    _l2_prefetch_kernel[(programs,)](padded[0], sizes[0], padded[1], sizes[1], padded[2], sizes[2], padded[3],
                                     sizes[3], N=len(tensors), CHUNK=chunk_bytes, BLOCK=CHUNKS_PER_PROGRAM,
                                     LINE=line, USE_PDL=pdl, num_warps=4 if line else 1, num_stages=1, **launch_options(pdl))
