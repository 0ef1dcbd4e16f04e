"""``rms_norm_linear``: the entry point of the coconut ops; checks its inputs and runs the dispatched path."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import new_buffer
from .dispatch import Choice, choose
from .norm import triton_rms_norm
from .reference import reference_rms_norm_linear
from .registry import VARIANTS, fused_linears
from .segments import split_groups


def rms_norm_linear(
    x2d: Tensor,
    norm_weight: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    eps: float,
    residual2d: Optional[Tensor] = None,
    weight_in_fp32: bool = False,
    variant: str = "auto",
    config: Optional[tuple[int, ...]] = None,
) -> tuple[list[Tensor], Optional[Tensor]]:
    """(residual add +) RMSNorm -> several linears. Returns ([y_i: [M, N_i]], h: [M, K] or None).

    Args:
        x2d: [M, K] activations (fp32/bf16/fp16); residual2d: [M, K] same dtype or None.
        norm_weight: [K]; weights: list of [N_i, K]; biases: list of [N_i] or None (same length as weights).
        eps: float added to mean(h^2). weight_in_fp32: see `reference_rms_norm`.
        variant: "auto" (CUDA: dispatcher; CPU: "torch") or one of VARIANTS ("torch", "unfused", "stream",
            "skinny"). A Triton variant on CPU tensors runs in the Triton interpreter
            (TRITON_INTERPRET=1 must be set before triton import).
        config: kernel config for a forced fused variant (None = first of its list).
    Raises:
        ValueError: mismatched shapes/dtypes or unknown variant.
    """
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D [M, K], got {tuple(x2d.shape)}")
    M, K = x2d.shape
    if len(weights) != len(biases):
        raise ValueError("weights and biases must have the same length")
    if norm_weight.shape != (K,):
        raise ValueError(f"norm_weight must be [{K}], got {tuple(norm_weight.shape)}")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != K:
            raise ValueError(f"weight must be [N, {K}], got {tuple(w.shape)}")
    if residual2d is not None and residual2d.shape != x2d.shape:
        raise ValueError("residual must have the shape of x")
    if variant not in ("auto",) + VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    if variant == "auto" and not x2d.is_cuda:
        variant = "torch"
    if variant == "torch":
        return reference_rms_norm_linear(x2d, norm_weight, weights, biases, eps, residual2d, weight_in_fp32)

    x2d = x2d.contiguous()
    residual2d = residual2d.contiguous() if residual2d is not None else None
    norm_weight = norm_weight.contiguous()
    # One decision and one launch per weight group (segments.py): linears of one kind (bias or not, dtypes) in
    # runs of at most MAX_GROUP, measured as the group will run and launched as one kernel when fused.
    kinds = [(b is not None, w.dtype, None if b is None else b.dtype) for w, b in zip(weights, biases)]
    groups = split_groups([w.shape[0] for w in weights], kinds)
    if variant == "auto":
        choices = [choose(M, sum(weights[i].shape[0] for i in grp), K, x2d.dtype, x2d.device,
                          [weights[i].shape[0] for i in grp]) for grp in groups]
    else:
        choices = [Choice(variant, tuple(config) if config is not None else (), "forced") for _ in groups]
    # weight_in_fp32 with a low-precision weight differs from the Llama chain only in rounding, which the fused
    # kernels do not reproduce anyway (the GEMV-shaped ones keep h*g in fp32, the tl.dot ones round it once to the
    # activation dtype); so it only matters for the unfused path.
    ys: list[Optional[Tensor]] = [None] * len(weights)
    h: Optional[Tensor] = None
    if any(c.variant == "unfused" for c in choices):
        a, h = triton_rms_norm(x2d, norm_weight, eps, residual2d, weight_in_fp32)
        for grp, c in zip(groups, choices):
            if c.variant == "unfused":
                for i in grp:
                    ys[i] = F.linear(a, weights[i], biases[i])
    h_pending = residual2d is not None and h is None  # the first fused launch that runs writes h = x + r
    if h_pending:
        h = new_buffer((M, K), x2d)
    for grp, c in zip(groups, choices):
        if c.variant != "unfused":
            out = fused_linears(x2d, norm_weight, [weights[i].contiguous() for i in grp], [biases[i] for i in grp],
                                eps, residual2d, h if h_pending else None, c.variant, c.config or None)
            for i, y in zip(grp, out):
                ys[i] = y
            if M > 0 and any(weights[i].shape[0] > 0 for i in grp):  # a group without rows launches nothing
                h_pending = False
    if h_pending and M > 0:  # every fused group was empty: h is still to be written
        assert h is not None and residual2d is not None
        torch.add(x2d, residual2d, out=h)
    return [y for y in ys if y is not None], h
