"""Which kernel the engine's small-M linear runs for a shape, from a table of the GPU it runs on.

Each entry of :data:`TABLES` holds the choices measured on one GPU model with the kernel benchmark (the GEMV up to
``gemv_max_m`` rows, the skinny kernel up to ``skinny_max_m`` with the launch shape of its rows, cuBLAS above; see
docs/performance.md). The table is picked at run time by the name the driver reports for the tensor's device; a GPU
without a table runs every shape through ``F.linear`` (cuBLAS), the safe default until it is measured.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from fusion_pass.launch import device_name

from .common import GEMV_DTYPES
from .rows import MAX_M
from .skinny import SKINNY_MAX_M, SkinnyConfig

SKINNY_DTYPES = (torch.float16, torch.bfloat16)  # fp32 multiplies on the CUDA cores there and spills (ptxas)


@dataclass(frozen=True)
class SmallMTable:
    """The choices of one GPU model.

    Attributes:
        gemv_max_m: M <= this runs the CUDA-core GEMV (0: never; at most rows.MAX_M).
        skinny_max_m: gemv_max_m < M <= this (fp16 / bf16) runs the skinny kernel (at most skinny.SKINNY_MAX_M).
        skinny: (largest M, act, launch shape) rows, the first whose largest M holds M and whose act matches wins.
    """

    gemv_max_m: int
    skinny_max_m: int
    skinny: tuple[tuple[int, str, SkinnyConfig], ...]

    def __post_init__(self) -> None:
        if not 0 <= self.gemv_max_m <= MAX_M:
            raise ValueError(f"gemv_max_m must be in [0, {MAX_M}], got {self.gemv_max_m}")
        if not 0 <= self.skinny_max_m <= SKINNY_MAX_M:
            raise ValueError(f"skinny_max_m must be in [0, {SKINNY_MAX_M}], got {self.skinny_max_m}")

    def skinny_config(self, m: int, act: str) -> SkinnyConfig:
        """The skinny kernel's launch shape for M rows and ``act`` (ValueError when no row holds them)."""
        for max_m, row_act, cfg in self.skinny:
            if m <= max_m and act == row_act:
                return cfg
        raise ValueError(f"no skinny launch shape for M = {m}, act = {act!r}")


# Measured on the H200 (bf16, Qwen3-0.6B's o_proj and down_proj; docs/performance.md): the GEMV wins at M <= 2, the
# skinny kernel at M = 3-32. SwiGLU: wide tiles (fewer programs recompute the activation) with the in-kernel fixup.
_H200 = SmallMTable(
    gemv_max_m=2, skinny_max_m=32,
    skinny=((16, "silu_mul", SkinnyConfig(128, 256, 8, True)), (32, "silu_mul", SkinnyConfig(64, 256, 4, True)),
            (16, "none", SkinnyConfig(32, 256, 4)), (32, "none", SkinnyConfig(64, 256, 4))))
# GPU name substring -> its table (the first match in order). The H100 is not measured yet: it runs the H200's
# choices (the same sm_90 kernels) until the kernel benchmark gives its own.
TABLES: dict[str, SmallMTable] = {"H200": _H200, "H100": _H200}


@functools.lru_cache(maxsize=None)
def table_for(device: torch.device) -> Optional[SmallMTable]:
    """The table of the GPU of ``device`` (None: no table, or not a CUDA device)."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((t for key, t in TABLES.items() if key in name), None)


def choose_path(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str
                ) -> tuple[str, Optional[SkinnyConfig]]:
    """The path of ``act(x) @ weight^T (+ bias)`` for these (concrete) tensors: ("gemv", None), ("skinny", its
    launch shape) or ("torch", None) (``F.linear``: CPU, other dtypes, mixed dtypes, M out of the table's ranges,
    or a GPU without a table)."""
    table = table_for(x.device) if x.is_cuda else None
    m = x.shape[0]
    if table is None or m < 1 or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "torch", None
    if m <= table.gemv_max_m and x.dtype in GEMV_DTYPES:
        return "gemv", None
    if table.gemv_max_m < m <= table.skinny_max_m and x.dtype in SKINNY_DTYPES:
        return "skinny", table.skinny_config(m, act)
    return "torch", None
