"""The registry of fused variants: each name maps to its launch configurations and its launcher.

Adding a variant: write its kernel, config list and launcher in a file of this package, add one entry to
:data:`FUSED_VARIANTS`; :func:`fused_linear`, the dispatcher's candidates and the forced ``variant`` setting follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import Tensor

from .common import new_buffer
from .gemv import launch_stream, stream_configs
from .skinny import SKINNY_MAX_M, launch_skinny, skinny_configs

# launch(x2d, residual2d or None, norm_weight, weights, biases, ys, h_out or None, eps, config) -> None: one launch
# for a group of 1 to MAX_GROUP weights (segments.py), writing ys[i] = [M, N_i] for each.
Launcher = Callable[[Tensor, Optional[Tensor], Tensor, Sequence[Tensor], Sequence[Optional[Tensor]],
                     Sequence[Tensor], Optional[Tensor], float, tuple[int, ...]], None]


@dataclass(frozen=True)
class FusedVariant:
    """One fused kernel family.

    Attributes:
        configs: M rows -> the launch configurations the dispatcher measures (empty outside the family's range of
            M; the first one is the default of :func:`fused_linear`).
        launch: writes every y_i (and h) of a weight group in one launch; raises ValueError on a shape or
            config it cannot run.
        rows: the range of M, in words (error messages).
    """

    configs: Callable[[int], list[tuple[int, ...]]]
    launch: Launcher
    rows: str


FUSED_VARIANTS: dict[str, FusedVariant] = {
    "stream": FusedVariant(stream_configs, launch_stream, "M <= 2"),
    "skinny": FusedVariant(skinny_configs, launch_skinny, f"2 <= M <= {SKINNY_MAX_M}"),
}
# Every value of ``rms_norm_linear``'s ``variant``: the reference, the unfused Triton path and the fused variants.
VARIANTS: tuple[str, ...] = ("torch", "unfused") + tuple(FUSED_VARIANTS)


def fused_linear(x2d: Tensor, norm_weight: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                 residual2d: Optional[Tensor] = None, h_out: Optional[Tensor] = None, variant: str = "stream",
                 config: Optional[tuple[int, ...]] = None) -> Tensor:
    """Launch one fused kernel for one weight: y = rms_norm(x (+ r)) * g @ W^T (+ b) -> [M, N] of x.dtype.

    Args:
        x2d, residual2d: [M, K] contiguous, same dtype. weight: [N, K] contiguous. bias: [N] or None. g: [K].
        h_out: [M, K] buffer that receives h = x + r (only with residual2d), or None to skip writing it.
        variant: a key of :data:`FUSED_VARIANTS`. config: one of its configurations, or None for the first one
            for M rows.
    Raises:
        ValueError on an unknown variant, no config given for an M outside the variant's range, or a config or
        shape the variant's launcher refuses.
    """
    return fused_linears(x2d, norm_weight, [weight], [bias], eps, residual2d, h_out, variant, config)[0]


def fused_linears(x2d: Tensor, norm_weight: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                  eps: float, residual2d: Optional[Tensor] = None, h_out: Optional[Tensor] = None,
                  variant: str = "stream", config: Optional[tuple[int, ...]] = None) -> list[Tensor]:
    """Launch ONE fused kernel for a group of 1 to MAX_GROUP weights (segments.py):
    y_i = rms_norm(x (+ r)) * g @ W_i^T (+ b_i) -> [M, N_i] of x.dtype for each i.

    Args:
        x2d, residual2d: [M, K] contiguous, same dtype. weights: [N_i, K] contiguous, one dtype. biases: [N_i] each,
            all None or none None. g: [K]. h_out, variant, config: as :func:`fused_linear` (the config's tile
            applies to every segment).
    Raises:
        ValueError: as :func:`fused_linear`, or a group of 0 or more than MAX_GROUP weights, biases of only some
            weights, or a length mismatch.
    """
    entry = FUSED_VARIANTS.get(variant)
    if entry is None:
        raise ValueError(f"unknown fused variant {variant!r}; expected one of {tuple(FUSED_VARIANTS)}")
    if len(weights) != len(biases):
        raise ValueError(f"{len(weights)} weights but {len(biases)} biases")
    if len({b is None for b in biases}) > 1:
        raise ValueError("a weight group's linears must all have a bias or all have none")
    M = x2d.shape[0]
    ys = [new_buffer((M, w.shape[0]), x2d) for w in weights]
    live = [i for i, w in enumerate(weights) if w.shape[0] > 0]
    if M == 0 or not live:
        return ys
    if config is None:
        cfgs = entry.configs(M)
        if not cfgs:
            raise ValueError(f"{variant} variant has no configuration for M = {M} ({entry.rows}); "
                             "pass an explicit config")
        config = cfgs[0]
    entry.launch(x2d, residual2d, norm_weight, [weights[i] for i in live], [biases[i] for i in live],
                 [ys[i] for i in live], h_out, eps, tuple(config))
    return ys
