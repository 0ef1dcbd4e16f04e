"""Token sampling per request within one batch: greedy, temperature, top-k, top-p."""
from __future__ import annotations

import torch
from torch import nn


class Sampler(nn.Module):
    """Picks one token per row of logits, each row with its own settings.

    Rows with temperature 0 take the argmax. Other rows divide by their temperature, keep their top-k tokens
    and their top-p nucleus (Holtzman et al. 2019, arXiv 1904.09751), and draw from the softmax with the
    exponential-race trick: ``argmax(p / E)`` with ``E ~ Exp(1)`` is a draw from ``p``.
    """

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                generator: torch.Generator | None = None, all_greedy: bool | None = None,
                use_top_k: bool | None = None, use_top_p: bool | None = None) -> torch.Tensor:
        """
        Args:
            logits: ``[B, V]`` any float dtype.
            temperatures: float32 ``[B]`` (0 = greedy).
            top_ks: int64 ``[B]`` (-1 = off).
            top_ps: float32 ``[B]`` in (0, 1] (1 = off).
            generator: the random generator of the engine (on the logits' device), or None.
            all_greedy, use_top_k, use_top_p: what the batch needs, when the caller knows it on the host (the model
                runner does, from the requests); None reads it from the tensors, which waits for the GPU.

        Returns:
            int64 ``[B]`` token ids.
        """
        greedy = temperatures == 0
        if all_greedy is None:
            all_greedy = bool(greedy.all())
        if all_greedy:
            return logits.argmax(-1)  # no float32 copy of the logits
        logits = logits.float()
        greedy_ids = logits.argmax(-1)
        logits = logits / temperatures.clamp_min(1e-5).unsqueeze(-1)
        use_k = bool((top_ks > 0).any()) if use_top_k is None else use_top_k
        use_p = bool((top_ps < 1).any()) if use_top_p is None else use_top_p
        if use_k or use_p:
            sorted_logits, order = logits.sort(-1, descending=True)
            drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if use_k:
                ranks = torch.arange(logits.shape[-1], device=logits.device)
                k = torch.where(top_ks > 0, top_ks, logits.shape[-1])
                drop |= ranks.unsqueeze(0) >= k.unsqueeze(-1)
            if use_p:
                probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
                mass_before = probs.cumsum(-1) - probs  # the first token is always kept
                drop |= mass_before >= top_ps.unsqueeze(-1)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        probs = logits.softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        sampled = (probs / noise).argmax(-1)
        return torch.where(greedy, greedy_ids, sampled)
