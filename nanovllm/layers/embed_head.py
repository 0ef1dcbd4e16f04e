"""Token embedding and LM head split over the vocabulary across tensor-parallel ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.parallel import all_gather_last_dim, all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    """Each rank holds ``ceil(vocab / tp)`` rows of the embedding table; lookups outside a rank's range give 0
    there, and the all-reduce assembles the full embedding.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: hidden size.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.num_embeddings = num_embeddings
        self.per_rank = (num_embeddings + self.tp_size - 1) // self.tp_size
        self.vocab_start = self.tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        part = loaded[self.vocab_start:self.vocab_start + self.per_rank]
        param.data.zero_()
        param.data[:part.shape[0]].copy_(part)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: int ``[T]`` -> ``[T, hidden]``."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.per_rank)
        y = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocabulary: each rank computes its slice, the slices are gathered on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """hidden ``[B, hidden]`` -> logits ``[B, vocab]`` (dtype of the model)."""
        logits = all_gather_last_dim(F.linear(hidden, self.weight))
        return logits[..., :self.num_embeddings] if self.tp_size > 1 else logits
