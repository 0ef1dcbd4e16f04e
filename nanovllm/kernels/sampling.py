"""One-pass token sampling for greedy and plain-temperature rows (Triton kernels + PyTorch reference + dispatch).

Math. Row ``r`` with temperature ``T > 0`` draws token ``i`` with probability ``softmax(x_r / T)_i`` by the
Gumbel-max trick (Gumbel 1954; Maddison, Tarlow & Minka 2014, "A* Sampling"; Jang, Gu & Poole 2016,
arXiv 1611.01144):

    token = argmax_i  s_i,   s_i = x_i * (1 / T) + G_i,   G_i = -log(E_i),   E_i = -log(U_i),   U_i ~ U(0, 1)

(``E_i ~ Exp(1)``, ``G_i ~ Gumbel(0, 1)``; the same draw as the exponential race ``argmax p_i / E_i``). Rows with
``T == 0`` take ``argmax_i x_i``; ties go to the lowest index, as ``torch.argmax``. Logits are read in their own
dtype (bf16/fp16/fp32) and converted to float32 in registers; no float32 copy of ``[B, V]`` is ever made.

Random numbers. Counter-based Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy
as 1, 2, 3"), Triton's ``tl.random.philox``. Token ``i`` of row ``r`` in the call numbered ``offset`` uses word
``i % 4`` of the Philox output for the counter ``(i // 4, r, offset, 0)`` under the key ``(seed, 0)``, so the noise
depends on ``(seed, offset, r, i)`` only, never on how the vocabulary is split among programs; one Philox call
serves four consecutive tokens (``tl.randint4x``'s 4 words, a quarter of ``tl.rand``'s cost). The 32-bit word
``w`` becomes ``U = ((w >> 9) + 0.5) * 2^-23`` (23 bits, so ``k + 0.5`` is exact in float32; 24 would round
``2^24 - 0.5`` up to ``U = 1``), strictly inside (0, 1) (``tl.rand`` gives ``[0, 1)``), so ``E > 0`` and ``G`` is
finite, ``-2.82 < G < 16.7``. ``E = -log U`` uses the accurate ``logf``:
small ``E`` (``U`` near 1, the large ``G`` that decide rare draws) needs a small relative error. ``log E`` only
needs a small absolute error, so on CUDA it is the hardware ``lg2.approx`` (``fast_logf``, ~1e-7; 6-25% faster
end to end); the interpreter and the reference use ``log``.

Layout. Kernel 1, grid ``(B, S)``: each program scans ``split_size`` tokens of one row (a multiple of ``BLOCK``,
in tiles of ``BLOCK`` tokens viewed as ``[BLOCK // 4, 4]`` so that the four Philox words map to four neighbouring
tokens), keeping a running (best score, its index) per element of the tile, and reduces those at the end. With
``S == 1`` it writes the token id; otherwise it writes its partial ``(score, index)`` and kernel 2, grid ``(B,)``,
picks the best of the ``S`` partials (max score, then the lowest index). ``S`` depends on ``B``, ``V`` and the SM
count only (:func:`choose_sample_splits`). Why split: the kernel is bound by arithmetic (Philox and two logs per
token, an estimated ~50 instructions), not by memory, so it needs every SM busy; one program per row leaves an H200
idle at small ``B`` (B = 1: one program takes 50-95 us for 152k tokens, 38-64 splits ~5 us); at B = 256 the
default (5 splits, 1024-token tiles) ties the best one-program-per-row setting (94 vs 95 us, 4096-token tiles and
8 warps) and beats one program per row with its own tiles (147 us). Measured on an H200 (bf16, V = 151,936, T = 0.6, GPU
time in a CUDA graph, default tuning): B = 1: 4.9 us (the torch path: 69.5 us), B = 16: 9.3 us (104), B = 64:
25.7 us (224), B = 128: 46 us (388), B = 256: 94 us (690; reading the logits once takes ~18 us). The seed and
offset are host integers, so a launch needs no device->host sync (CUDA-graph capturable).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from fusion_pass.launch import cdiv, next_power_of_2

# Tunables, from a sweep on an H200 (bf16, V = 151,936, B in 1..256; tiles of 1024..8192 tokens, 4 or 8 warps,
# 1..64 splits): small tiles with 4 warps and many programs per SM hide the Philox/log latency best.
SAMPLE_BLOCK = 1024  # tokens per tile (a power of two >= 4)
SAMPLE_NUM_WARPS = 4
SAMPLE_WAVES = 8  # aim for about this many programs per SM
SAMPLE_MAX_SPLITS = 64

PHILOX_ROUNDS = tl.constexpr(10)  # Triton's default
# Temperatures below this are raised to it (as the Sampler's torch path does with clamp_min): 1 / T stays finite
MIN_TEMPERATURE_F = 1e-5
MIN_TEMPERATURE = tl.constexpr(MIN_TEMPERATURE_F)
_NO_INDEX = tl.constexpr(2**31 - 1)  # above every token id (int32)
_INT32_MAX = 2**31 - 1


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_sample_splits(batch: int, vocab: int, sm_count: int, block: int = SAMPLE_BLOCK) -> int:
    """Programs per row for :func:`sample_tokens_triton`.

    Enough ``(row, split)`` programs to give every SM about ``SAMPLE_WAVES`` of them, at most one split per tile
    of ``block`` tokens and at most ``SAMPLE_MAX_SPLITS``.

    Args:
        batch: rows ``B``.
        vocab: ``V``, tokens per row.
        sm_count: streaming multiprocessors on the device (132 on an H200).
        block: tile size in tokens.

    Returns:
        ``S >= 1`` (1 means one program per row and no second kernel; with the defaults that takes
        ``B >= 8 * sm_count`` rows or a vocabulary of at most ``block`` tokens).
    """
    want = cdiv(SAMPLE_WAVES * sm_count, max(1, batch))
    return max(1, min(want, cdiv(max(1, vocab), block), SAMPLE_MAX_SPLITS))


# ---- Triton -----------------------------------------------------------------------------------------------------
@triton.jit
def _tile_update(best_v, best_i, x, idx, q0, row, seed, offset, inv_t, SAMPLE: tl.constexpr,
                 BLOCK_Q: tl.constexpr, FAST_LOG: tl.constexpr):
    """Fold one ``[BLOCK_Q, 4]`` tile of float32 logits ``x`` (token ids ``idx``) into the running best."""
    if SAMPLE:
        q = q0 + tl.arange(0, BLOCK_Q)  # Philox counter word 0: token // 4
        zero = tl.zeros([BLOCK_Q], dtype=tl.uint32)
        w0, w1, w2, w3 = tl.random.philox(seed, q.to(tl.uint32), zero + row.to(tl.uint32),
                                          zero + offset.to(tl.uint32), zero, PHILOX_ROUNDS)
        j = tl.arange(0, 4)[None, :]  # token % 4 picks the word
        w = tl.where(j == 0, w0[:, None], tl.where(j == 1, w1[:, None], tl.where(j == 2, w2[:, None], w3[:, None])))
        u = ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # (k + 0.5) / 2^23, exact, in (0, 1)
        e = -tl.log(u)  # Exp(1); accurate log: E near 0 (u near 1) needs it
        if FAST_LOG:  # G = -log(E) only needs a small absolute error (lg2.approx: ~1e-7)
            s = x * inv_t - libdevice.fast_logf(e)
        else:
            s = x * inv_t - tl.log(e)
    else:
        s = x
    take = s > best_v  # strict: an equal score later in the row keeps the earlier index
    return tl.where(take, s, best_v), tl.where(take, idx, best_i)


@triton.jit
def _scan_row(row_ptr, lo, hi, row, seed, offset, inv_t, SAMPLE: tl.constexpr, BLOCK_Q: tl.constexpr,
              FAST_LOG: tl.constexpr):
    """Best ``(score, token id)`` over tokens ``[lo, hi)`` of one row (``lo`` a multiple of 4, ``lo < hi``)."""
    BLOCK: tl.constexpr = BLOCK_Q * 4
    lane = tl.arange(0, BLOCK_Q)[:, None] * 4 + tl.arange(0, 4)[None, :]
    best_v = tl.full([BLOCK_Q, 4], float("-inf"), dtype=tl.float32)
    best_i = lo + lane  # a row of -inf logits still returns its first token (lane 0 = lo is always valid)
    full_end = lo + ((hi - lo) // BLOCK) * BLOCK
    for start in range(lo, full_end, BLOCK):
        idx = start + lane
        x = tl.load(row_ptr + idx).to(tl.float32)
        best_v, best_i = _tile_update(best_v, best_i, x, idx, start // 4, row, seed, offset, inv_t, SAMPLE, BLOCK_Q,
                                       FAST_LOG)
    if full_end < hi:
        idx = full_end + lane
        x = tl.load(row_ptr + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
        best_v, best_i = _tile_update(best_v, best_i, x, idx, full_end // 4, row, seed, offset, inv_t, SAMPLE,
                                      BLOCK_Q, FAST_LOG)
    m = tl.max(tl.max(best_v, 1), 0)
    i = tl.min(tl.min(tl.where(best_v == m, best_i, _NO_INDEX), 1), 0)
    return m, i


# The split count and the seed are runtime arguments (not specialized): the split count follows the batch size,
# which changes nearly every step as requests finish, and a constexpr would compile a new kernel for each value.
@triton.jit(do_not_specialize=["seed", "offset", "num_splits"])
def _sample_split_kernel(
    logits_ptr,
    temp_ptr,
    out_ptr,
    part_ptr,
    stride_lb,
    vocab,
    split_size,
    seed,
    offset,
    num_splits,
    BLOCK_Q: tl.constexpr,
    DIRECT: tl.constexpr,
    FAST_LOG: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    lo = split * split_size
    hi = tl.minimum(lo + split_size, vocab)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_lb
    t = tl.load(temp_ptr + row).to(tl.float32)
    if t > 0.0:
        # IEEE 1/T, the same float32 as the reference's; T is clamped at MIN_TEMPERATURE (as the torch path does):
        # 1/T of a tiny T overflows to inf, and inf * logits makes every score +-inf (or NaN at 0)
        inv_t = tl.math.div_rn(1.0, tl.maximum(t, MIN_TEMPERATURE))
        m, i = _scan_row(row_ptr, lo, hi, row, seed, offset, inv_t, True, BLOCK_Q, FAST_LOG)
    else:
        m, i = _scan_row(row_ptr, lo, hi, row, seed, offset, 1.0, False, BLOCK_Q, FAST_LOG)
    if DIRECT:
        tl.store(out_ptr + row, i.to(tl.int64))
    else:  # partials: float32 [B, 2, num_splits], the scores then the token ids (int32 bits)
        base = part_ptr + row * (2 * num_splits) + split
        tl.store(base, m)
        tl.store(base + num_splits, i.to(tl.float32, bitcast=True))


@triton.jit(do_not_specialize=["num_splits"])
def _sample_reduce_kernel(out_ptr, part_ptr, num_splits, SPLITS_PAD: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS_PAD)
    ok = s < num_splits
    base = part_ptr + row * (2 * num_splits) + s
    v = tl.load(base, mask=ok, other=float("-inf"))
    i = tl.load(base + num_splits, mask=ok, other=0.0).to(tl.int32, bitcast=True)
    m = tl.max(v, 0)
    tl.store(out_ptr + row, tl.min(tl.where(ok & (v == m), i, _NO_INDEX), 0).to(tl.int64))


def sample_tokens_triton(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    seed: int,
    offset: int = 0,
    num_splits: int | None = None,
    block: int | None = None,
    num_warps: int | None = None,
    fast_log: bool | None = None,
) -> torch.Tensor:
    """Triton version of :func:`sample_tokens` (same contract plus tuning overrides: ``num_splits`` programs per
    row, ``block`` tokens per tile (a power of two >= 4), ``num_warps``, and ``fast_log``: ``libdevice.fast_logf``
    for ``log E`` (default: on CUDA; the interpreter has no libdevice))."""
    _check_sample_args(logits, temperatures, seed, offset)
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if temperatures.stride(0) != 1:
        temperatures = temperatures.contiguous()
    blk = block or SAMPLE_BLOCK
    if blk < 4 or blk & (blk - 1):
        raise ValueError(f"block must be a power of two >= 4, got {blk}")
    if num_splits is None:
        sms = _sm_count(logits.device.index or 0) if logits.is_cuda else 132
        num_splits = choose_sample_splits(batch, vocab, sms, blk)
    split_size = cdiv(cdiv(vocab, max(1, int(num_splits))), blk) * blk
    num_splits = cdiv(vocab, split_size)  # every split holds at least one token
    direct = num_splits == 1
    part = out if direct else torch.empty((batch, 2, num_splits), dtype=torch.float32, device=logits.device)
    _sample_split_kernel[(batch, num_splits)](
        logits,
        temperatures,
        out,
        part,
        logits.stride(0),
        vocab,
        split_size,
        seed,
        offset,
        num_splits,
        BLOCK_Q=blk // 4,
        DIRECT=direct,
        FAST_LOG=logits.is_cuda if fast_log is None else fast_log,
        num_warps=num_warps or SAMPLE_NUM_WARPS,
    )
    if not direct:
        # SPLITS_PAD is fixed (not next_power_of_2(num_splits)) so that one compiled kernel serves every batch size
        pad = max(2, next_power_of_2(max(num_splits, SAMPLE_MAX_SPLITS)))
        _sample_reduce_kernel[(batch,)](out, part, num_splits, SPLITS_PAD=pad, num_warps=1)
    return out


# ---- PyTorch reference ------------------------------------------------------------------------------------------
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_M32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a * b) >> 32`` and ``(a * b) & 0xFFFFFFFF`` for a 32-bit constant ``a`` and int64 ``b`` in [0, 2^32),
    in int64 without overflow (``b`` split in 16-bit halves)."""
    t = a * (b & 0xFFFF)  # < 2^48
    u = a * (b >> 16)  # < 2^48
    return (u + (t >> 16)) >> 16, (((u & 0xFFFF) << 16) + t) & _M32


def philox4x32_ref(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int,
                   rounds: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 (Salmon et al. 2011) in int64 torch ops, bit-exact with ``tl.random.philox``.

    Args:
        c0, c1, c2, c3: int64 counters in [0, 2^32), broadcastable to one shape.
        k0, k1: the key's two 32-bit words.
        rounds: Philox rounds (Triton's default 10).

    Returns:
        The four int64 output words in [0, 2^32).
    """
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def sample_uniforms_ref(batch: int, vocab: int, seed: int, offset: int = 0,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernel's ``U`` for every ``(row, token)`` of one call: float32 ``[batch, vocab]`` in (0, 1)."""
    quads = cdiv(vocab, 4)
    q = torch.arange(quads, dtype=torch.int64, device=device)
    r = torch.arange(batch, dtype=torch.int64, device=device).unsqueeze(-1)
    words = philox4x32_ref(q.unsqueeze(0), r, torch.tensor(offset, device=device), torch.tensor(0, device=device),
                           seed, 0)
    w = torch.stack(words, -1).reshape(batch, quads * 4)[:, :vocab]  # token i: word i % 4 of counter i // 4
    return ((w >> 9).float() + 0.5) * 2.0**-23


def sample_tokens_ref(logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The kernel's math in torch ops for given uniforms (see the module docstring).

    Args:
        logits: ``[B, V]`` bf16/fp16/fp32.
        temperatures: ``[B]`` float (``<= 0`` = greedy).
        uniforms: float32 ``[B, V]`` in (0, 1), e.g. :func:`sample_uniforms_ref` (the kernel's stream).

    Returns:
        int64 ``[B]``: greedy rows ``logits.argmax(-1)``, the others ``argmax(x * (1 / T) - log(-log U))`` with
        ``T`` clamped at ``MIN_TEMPERATURE`` (1e-5).
    """
    greedy_ids = logits.argmax(-1)  # no float32 copy for the greedy rows
    t = temperatures.float()
    inv_t = 1.0 / torch.where(t > 0, t.clamp_min(MIN_TEMPERATURE_F), 1.0)
    scores = logits.float() * inv_t.unsqueeze(-1) - torch.log(-torch.log(uniforms))
    return torch.where(t > 0, scores.argmax(-1), greedy_ids)


# ---- dispatch -----------------------------------------------------------------------------------------------------
def _check_sample_args(logits: torch.Tensor, temperatures: torch.Tensor, seed: int, offset: int) -> None:
    """Validate :func:`sample_tokens`' arguments; raises ValueError."""
    if logits.dim() != 2 or logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"logits must be fp16/bf16/fp32 [B, V], got {logits.dtype} {tuple(logits.shape)}")
    if logits.shape[1] == 0 or logits.shape[1] > _INT32_MAX - SAMPLE_BLOCK:
        raise ValueError(f"vocab size must be in [1, 2^31 - {SAMPLE_BLOCK}), got {logits.shape[1]}")
    if temperatures.shape != (logits.shape[0],) or not temperatures.is_floating_point():
        raise ValueError(f"temperatures must be a float [B] tensor, got {temperatures.dtype} "
                         f"{tuple(temperatures.shape)}")
    if temperatures.device != logits.device:
        raise ValueError("temperatures must be on the logits' device")
    for name, v in (("seed", seed), ("offset", offset)):
        if not 0 <= int(v) <= _INT32_MAX:
            raise ValueError(f"{name} must be in [0, 2^31), got {v}")


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, seed: int, offset: int = 0,
                  force_triton: bool = False) -> torch.Tensor:
    """One token per row: greedy where ``temperatures <= 0``, else a draw from ``softmax(logits / T)`` (``T`` clamped
    at 1e-5, as the Sampler's torch path does, so that ``1 / T`` stays finite).

    No top-k / top-p (the sampler keeps its sorting path for those). On CUDA (or with ``force_triton``) one
    Triton kernel, or two at small ``B`` (split vocabulary + a tiny reduction); elsewhere the PyTorch reference on
    the same Philox stream (:func:`sample_uniforms_ref`), which makes a float32 copy and is meant for tests and
    small CPU batches.

    Args:
        logits: ``[B, V]`` fp16/bf16/fp32, any device; read in place (last dim contiguous, else copied).
        temperatures: float ``[B]`` on the logits' device; ``<= 0`` means greedy (``argmax``, lowest index on ties).
        seed: Philox key in ``[0, 2^31)``, a host integer.
        offset: the call's Philox counter in ``[0, 2^31)``, a host integer; use a new one for every call with the
            same seed, or the noise repeats.
        force_triton: run the Triton kernels on CPU tensors (``TRITON_INTERPRET=1`` tests).

    Returns:
        int64 ``[B]`` token ids on the logits' device. A token whose logit is -inf is never chosen unless the
        whole row is -inf (then token 0); NaN logits are never chosen by the Triton path (unlike ``torch.argmax``).
        At any temperature in (0, 3.4e38] the scores stay free of NaN for finite logits (``1 / T`` is finite).

    The Triton path does no device->host synchronization (CUDA-graph capturable).

    Raises:
        ValueError: on a bad shape, dtype, device, seed or offset.
    """
    if logits.is_cuda or force_triton:
        return sample_tokens_triton(logits, temperatures, seed, offset)
    _check_sample_args(logits, temperatures, seed, offset)
    uniforms = sample_uniforms_ref(logits.shape[0], logits.shape[1], int(seed), int(offset), logits.device)
    return sample_tokens_ref(logits, temperatures, uniforms)
