"""Exponential noise for requests with their own seed (``SamplingParams.seed``), independent of the batch.

A seeded row draws its token at sequence position ``p`` with the exponential race ``argmax_i p_i / E_i`` (see
:class:`nanovllm.layers.sampler.Sampler`), where ``E_i = -log U_i`` and ``U_i`` comes from counter-based
Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011) under the 64-bit key ``seed mod 2^64`` (two 32-bit words, low
first) with the counter ``(i // 4, p, 0, 0)``; token ``i`` takes word ``i % 4``. The noise therefore depends on
``(seed, p, i)`` only: not on the row the request lands in, the other requests of the batch, the step number, the
engine's generator or the device (the Philox words are computed with exact int64 torch ops, so CPU and GPU agree
bit for bit). A preempted request that recomputes its prompt draws the same noise again for the same position.

The word ``w`` becomes ``U = ((w >> 9) + 0.5) * 2^-23``, strictly inside (0, 1), as in
:mod:`nanovllm.kernels.sampling`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fusion_pass.launch import cdiv
from nanovllm.kernels.sampling import philox4x32_ref

_M32 = 0xFFFFFFFF
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class SeededRows:
    """The rows of one batch that sample with their own seed, and where their next tokens go.

    Built on the host from the requests (:meth:`StepInputBuffers.fill_sampling`). Each sampler call that receives
    it takes the positions of its tokens with :meth:`next_positions`, which advances them by one: a multi-step
    decode round reuses one ``SeededRows`` for its ``k`` steps, whose tokens sit at ``p, p + 1, ..., p + k - 1``.

    Attributes:
        rows: batch row of each seeded request (rows with temperature 0 are left out: they take the argmax).
        seeds: each row's ``SamplingParams.seed``.
        positions: sequence position of the token the next call samples for each row (the sequence's length).
    """

    rows: list[int]
    seeds: list[int]
    positions: list[int]

    def next_positions(self) -> list[int]:
        """The positions of this call's tokens; the next call gets each one plus 1."""
        current = self.positions
        self.positions = [p + 1 for p in current]
        return current


def seeded_exponentials(seeds: list[int], positions: list[int], vocab: int,
                        device: torch.device | str) -> torch.Tensor:
    """``E ~ Exp(1)`` noise for seeded rows (see the module docstring for the stream).

    Args:
        seeds: one seed per row, ints in ``[-2**63, 2**64 - 1]`` (taken mod ``2^64``).
        positions: the sequence position of each row's token, ints in ``[0, 2^32)``.
        vocab: ``V``, tokens per row.
        device: where the noise is made.

    Returns:
        float32 ``[len(seeds), V]``, every value at least float32's smallest normal number (so ``p / E`` is
        finite).
    """
    k0 = torch.tensor([(s % 2**64) & _M32 for s in seeds], dtype=torch.int64, device=device).unsqueeze(-1)
    k1 = torch.tensor([(s % 2**64) >> 32 for s in seeds], dtype=torch.int64, device=device).unsqueeze(-1)
    pos = torch.tensor(positions, dtype=torch.int64, device=device).unsqueeze(-1)
    quads = cdiv(vocab, 4)
    q = torch.arange(quads, dtype=torch.int64, device=device).unsqueeze(0)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    words = philox4x32_ref(q, pos, zero, zero, k0, k1)  # int64 [S, 1] keys broadcast like the counters
    w = torch.stack(words, -1).reshape(len(seeds), quads * 4)[:, :vocab]  # token i: word i % 4 of counter i // 4
    u = ((w >> 9).double() + 0.5) * 2.0**-23  # exact in float64 (and in float32)
    # the logarithm in float64, rounded once to float32: CUDA's and the CPU's float32 log differ in the last bit for
    # some inputs, their float64 ones agree after that rounding, so the noise is the same on every device
    return (-torch.log(u)).float().clamp_min_(_TINY)
