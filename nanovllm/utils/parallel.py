"""Tensor-parallel group helpers over ``torch.distributed`` (NCCL on GPUs, gloo on the CPU).

The collectives are the functional ones (``torch.distributed._functional_collectives``): they return new
tensors instead of writing in place, so ``torch.compile`` traces them into the model's single graph.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


# torch 2.13 deprecates all_gather_tensor (FutureWarning) for all_gather_single, which older releases may lack
_all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def tp_size() -> int:
    """Number of tensor-parallel ranks (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tp_rank() -> int:
    """This process's tensor-parallel rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks (identity for one rank)."""
    if tp_size() == 1:
        return x
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension (identity for one rank).

    Args:
        x: ``[..., n]`` on every rank. Returns ``[..., n * tp_size]`` with rank r's part at ``[..., r*n:(r+1)*n]``.
    """
    if tp_size() == 1:
        return x
    gathered = _all_gather_dim0(x.contiguous(), 0, dist.group.WORLD)  # [tp * rows, ..., n]
    parts = gathered.chunk(tp_size(), dim=0)
    return torch.cat(parts, dim=-1)
