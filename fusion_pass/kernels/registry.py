"""The registry of fused variants: each name maps to its launch configurations and its launcher.

Adding a variant: write its kernel, config list and launcher in a file of this package, add one entry to
:data:`FUSED_VARIANTS`; :func:`fused_linear`, the dispatcher's candidates and the forced ``variant`` setting follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from .common import new_buffer
from .gemv import launch_stream, stream_configs
from .skinny import SKINNY_MAX_M, launch_skinny, skinny_configs

# launch(x2d, residual2d or None, norm_weight, weight, bias or None, y, h_out or None, eps, config) -> None
Launcher = Callable[[Tensor, Optional[Tensor], Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor], float,
                     tuple[int, ...]], None]


@dataclass(frozen=True)
class FusedVariant:
    """One fused kernel family.

    Attributes:
        configs: M rows -> the launch configurations the dispatcher measures (empty outside the family's range of
            M; the first one is the default of :func:`fused_linear`).
        launch: writes y (and h) for one weight; raises ValueError on a shape or config it cannot run.
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
    """Launch one fused kernel: y = rms_norm(x (+ r)) * g @ W^T (+ b) -> [M, N] of x.dtype.

    Args:
        x2d, residual2d: [M, K] contiguous, same dtype. weight: [N, K] contiguous. bias: [N] or None. g: [K].
        h_out: [M, K] buffer that receives h = x + r (only with residual2d), or None to skip writing it.
        variant: a key of :data:`FUSED_VARIANTS`. config: one of its configurations, or None for the first one
            for M rows.
    Raises:
        ValueError on an unknown variant, no config given for an M outside the variant's range, or a config or
        shape the variant's launcher refuses.
    """
    entry = FUSED_VARIANTS.get(variant)
    if entry is None:
        raise ValueError(f"unknown fused variant {variant!r}; expected one of {tuple(FUSED_VARIANTS)}")
    M = x2d.shape[0]
    N = weight.shape[0]
    y = new_buffer((M, N), x2d)
    if M == 0 or N == 0:
        return y
    if config is None:
        cfgs = entry.configs(M)
        if not cfgs:
            raise ValueError(f"{variant} variant has no configuration for M = {M} ({entry.rows}); "
                             "pass an explicit config")
        config = cfgs[0]
    entry.launch(x2d, residual2d, norm_weight, weight, bias, y, h_out, eps, tuple(config))
    return y
