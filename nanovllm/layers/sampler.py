"""Token sampling per request within one batch: greedy, temperature, top-k, top-p."""
from __future__ import annotations

import bisect

import torch
from torch import nn

from nanovllm.kernels.sampling import MIN_TEMPERATURE_F, _sm_count, choose_sample_splits, sample_tokens_triton
from nanovllm.layers.seeded_noise import SeededRows, seeded_exponentials

_SEED_MOD = 2**31 - 1  # Philox keys and call counters are int32 kernel arguments
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TINY = torch.finfo(torch.float32).tiny
_FLOAT32_MAX = torch.finfo(torch.float32).max


class Sampler(nn.Module):
    """Picks one token per row of logits, each row with its own settings.

    Rows with temperature 0 take the argmax. Other rows divide by their temperature, keep their top-k tokens
    and their top-p nucleus (Holtzman et al. 2019, arXiv 1904.09751), and draw from the softmax with the
    exponential-race trick: ``argmax(p / E)`` with ``E ~ Exp(1)`` is a draw from ``p``.

    Paths (kernels per call on the GPU):

    - every row greedy: ``logits.argmax(-1)`` (1 kernel, no float32 copy);
    - CUDA logits (or ``force_triton``), no row with top-k / top-p and no seeded row: the one-pass Triton kernel of
      :mod:`nanovllm.kernels.sampling` (Gumbel-max on a Philox stream; 2 kernels, a split scan and a tiny
      reduction, below ``B = 8 * SMs`` rows, 1 above);
    - otherwise (a top-k / top-p row, a row with its own ``SamplingParams.seed``, or CPU logits): the torch path
      below (a float32 copy, softmax, the
      generator's exponential noise, and a sort for top-k / top-p; about 8 kernels without the sort).

    The Triton path takes its randomness from a host-side Philox key and call counter, so it never reads the
    GPU: the key is ``generator.initial_seed()`` folded into 31 bits when a generator is given (an engine with
    ``seed=`` is reproducible run to run), else one draw of torch's CPU generator at the first call; the counter
    counts this sampler's Triton calls. The generator's own state is neither read nor advanced by that path.

    Seeded rows (``seeded``, requests with ``SamplingParams.seed`` and temperature > 0) replace the generator's
    noise of their row by :func:`~nanovllm.layers.seeded_noise.seeded_exponentials` of ``(seed, token
    position)``, so their draws do not depend on the batch; a batch with such a row takes the torch path on every
    device, also inside a multi-step decode round (the sampler runs eagerly after each step's graph replay, never
    inside a CUDA graph; the ``SeededRows`` object advances its positions by one per call). The other rows of
    that batch keep the engine generator's noise.
    """

    def __init__(self, force_triton: bool = False) -> None:
        """``force_triton``: take the Triton path for CPU logits too (``TRITON_INTERPRET=1`` tests)."""
        super().__init__()
        self.force_triton = force_triton
        self._calls = 0  # Triton calls so far: the Philox counter of the next one
        self._own_key: int | None = None  # the key when no generator is given

    def next_philox_seed(self, generator: torch.Generator | None) -> tuple[int, int]:
        """``(key, counter)`` for the next Triton call, both in ``[0, 2^31)``; host-only (no GPU access)."""
        if generator is not None:
            key = generator.initial_seed() % _SEED_MOD
        else:
            if self._own_key is None:
                self._own_key = int(torch.randint(0, _SEED_MOD, (), device="cpu"))
            key = self._own_key
        counter = self._calls
        self._calls = (self._calls + 1) % _SEED_MOD
        return key, counter

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                generator: torch.Generator | None = None, all_greedy: bool | None = None,
                use_top_k: bool | None = None, use_top_p: bool | None = None,
                seeded: SeededRows | None = None) -> torch.Tensor:
        """
        Args:
            logits: ``[B, V]`` any float dtype.
            temperatures: float32 ``[B]`` (0 = greedy).
            top_ks: int64 ``[B]`` (-1 = off).
            top_ps: float32 ``[B]`` in (0, 1] (1 = off).
            generator: the random generator of the engine (on the logits' device), or None.
            all_greedy, use_top_k, use_top_p: what the batch needs, when the caller knows it on the host (the model
                runner does, from the requests); None reads it from the tensors, which waits for the GPU.
            seeded: the rows with their own seed and the positions of their tokens (host data), or None.

        Returns:
            int64 ``[B]`` token ids.
        """
        greedy = temperatures == 0
        if all_greedy is None:
            all_greedy = bool(greedy.all())
        if all_greedy:
            return logits.argmax(-1)  # no float32 copy of the logits
        use_k = bool((top_ks > 0).any()) if use_top_k is None else use_top_k
        use_p = bool((top_ps < 1).any()) if use_top_p is None else use_top_p
        if seeded is not None and not seeded.rows:
            seeded = None
        triton_ok = (logits.is_cuda or self.force_triton) and logits.dtype in _TRITON_DTYPES
        if not (use_k or use_p) and seeded is None and triton_ok:
            return sample_tokens_triton(logits, temperatures, *self.next_philox_seed(generator))
        logits = logits.float()
        greedy_ids = logits.argmax(-1)
        # a huge logit over a tiny temperature overflows to +inf (and softmax to NaN): the largest float32 instead
        logits = (logits / temperatures.clamp_min(MIN_TEMPERATURE_F).unsqueeze(-1)).clamp_max_(_FLOAT32_MAX)
        if use_k or use_p:
            sorted_logits, order = logits.sort(-1, descending=True)
            drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if use_k:
                ranks = torch.arange(logits.shape[-1], device=logits.device)
                k = torch.where(top_ks > 0, top_ks, logits.shape[-1])
                drop |= ranks.unsqueeze(0) >= k.unsqueeze(-1)
            if use_p:
                probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
                mass_before = probs.cumsum(-1) - probs
                drop |= mass_before >= top_ps.unsqueeze(-1)
                # the most likely token always survives, also when top_p rounds to 0 in float32 (below ~1.4e-45)
                drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        # a row of -inf only (no candidate at all) has NaN probabilities: zeros instead, so it takes token 0
        probs = logits.softmax(-1).nan_to_num_(0.0)
        # E ~ Exp(1) kept >= the smallest normal float32: p / E is then finite, and 0 (never the argmax over a row
        # with a candidate) exactly for the tokens of probability 0
        noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(_TINY)
        if seeded is not None:
            rows = torch.tensor(seeded.rows, dtype=torch.int64, device=noise.device)
            noise[rows] = seeded_exponentials(seeded.seeds, seeded.next_positions(), noise.shape[-1], noise.device)
        sampled = (probs / noise).argmax(-1)
        return torch.where(greedy, greedy_ids, sampled)


def warm_up_sampling(device: torch.device | str, dtype: torch.dtype, vocab: int, max_rows: int,
                     row_stride: int | None = None) -> list[int]:
    """Compile the Triton sampling kernels for the logits a model produces, before a first request with
    temperature > 0 would.

    Calls :func:`~nanovllm.kernels.sampling.sample_tokens_triton` itself on zero logits with temperature 1, key 0
    and counter 0, never through a :class:`Sampler`: no sampler's call counter or key moves, and no random number
    generator (torch's CPU one included) is read or advanced, so every later draw equals that of an engine that
    never warmed up.

    What selects a compiled kernel: the logits' dtype; the integer arguments ``vocab`` and the row stride (Triton
    specializes an integer on being 1 or a multiple of 16; the split size is a multiple of the tile, the key, the
    counter and the split count are not specialized); the constexpr ``DIRECT`` (one split per row, which happens
    from ``8 * SMs`` rows up, or for a vocabulary of one tile). The row count itself is only the launch grid. Rows
    launched: 1, 2 and 16 (at most ``max_rows``), and the fewest rows with one split per row when that count is at
    most ``max_rows`` and differs from 1 row's choice.

    Args:
        device: where the sampler runs (on the CPU the kernels run only under ``TRITON_INTERPRET=1``).
        dtype: the logits' dtype; other than float16 / bfloat16 / float32 (the dtypes the Sampler's Triton path
            takes) nothing runs.
        vocab: ``V``, the logits' width (the LM head's output size).
        max_rows: the most rows one sampler call gets (``max_num_seqs``), >= 1.
        row_stride: elements between two rows of the logits (default ``vocab``; larger when the LM head's output
            is a slice of a padded one, as under tensor parallelism).

    Returns:
        The row counts launched, ascending (empty for other dtypes).

    Raises:
        ValueError: ``vocab`` or ``max_rows`` below 1, or ``row_stride`` below ``vocab``.
    """
    row_stride = vocab if row_stride is None else row_stride
    if vocab < 1 or max_rows < 1 or row_stride < vocab:
        raise ValueError(f"need vocab >= 1, max_rows >= 1 and row_stride >= vocab, got vocab={vocab}, "
                         f"max_rows={max_rows}, row_stride={row_stride}")
    if dtype not in _TRITON_DTYPES:
        return []
    device = torch.device(device)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132  # sample_tokens_triton's own choice on other devices

    def direct(rows: int) -> bool:
        return choose_sample_splits(rows, vocab, sms) == 1

    rows = {r for r in (1, 2, 16) if r <= max_rows}
    if direct(max_rows) != direct(1):  # the split count falls with the rows: the first row count with one split
        rows.add(1 + bisect.bisect_left(range(1, max_rows + 1), True, key=direct))
    for n in sorted(rows):
        logits = torch.zeros(n, row_stride, dtype=dtype, device=device)[:, :vocab]
        sample_tokens_triton(logits, torch.ones(n, dtype=torch.float32, device=device), 0, 0)
    return sorted(rows)
