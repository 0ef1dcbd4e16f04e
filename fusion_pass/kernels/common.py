"""Helpers shared by the fused kernels' launchers: output buffers and the M bucket of the dispatch."""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from ..settings import kernel_settings

log = logging.getLogger("fusion_pass")


def new_buffer(shape: tuple[int, ...], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Uninitialized buffer of ``shape`` on ``like``'s device, of ``dtype`` (default ``like.dtype``); NaN-filled
    when ``KernelSettings.poison_outputs`` is set (an element a kernel forgets to write then shows up as NaN)."""
    dtype = dtype or like.dtype
    if kernel_settings().poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def m_bucket(m: int) -> int:
    """Next power of two >= m (1 for m <= 1): the M key of the dispatch cache and of the config tables."""
    return 1 if m <= 1 else 1 << (int(m) - 1).bit_length()
