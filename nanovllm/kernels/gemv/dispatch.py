"""Which kernel the engine's small-M linear runs for a shape on the GPU it runs on.

Each entry of :data:`TABLES` holds the choices measured on one GPU model with the kernel benchmark (the GEMV up to
``gemv_max_m`` rows, the skinny kernel up to ``skinny_max_m`` with the launch shape of its rows, cuBLAS above; see
docs/performance.md); the table is picked at run time by the name the driver reports for the tensor's device. A GPU
without a table measures its candidates per shape on first use, with the dispatcher of the coconut op
(:func:`fusion_pass.kernels.cached_choice`: cached per GPU name and shape, saved in the same tuning file), and runs
``F.linear`` (cuBLAS) for a shape not measured yet.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fusion_pass.kernels import Choice, cached_choice, fastest, m_bucket, rotated_weights, tuning_batch
from fusion_pass.launch import device_name

from .common import GEMV_DTYPES, apply_act, silu_mul_triton
from .rows import MAX_M, gemv_triton
from .skinny import SKINNY_MAX_M, SkinnyConfig, gemv_skinny_triton

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


# The H200's choices (bf16, Qwen3-0.6B's o_proj and down_proj; the measurements are in docs/performance.md): the
# GEMV up to M = 2, the skinny kernel above. SwiGLU: wide tiles (fewer programs recompute the activation) with the
# in-kernel fixup.
_H200 = SmallMTable(
    gemv_max_m=2, skinny_max_m=32,
    skinny=((16, "silu_mul", SkinnyConfig(128, 256, 8, True)), (32, "silu_mul", SkinnyConfig(64, 256, 4, True)),
            (16, "none", SkinnyConfig(32, 256, 4)), (32, "none", SkinnyConfig(64, 256, 4))))
# GPU name substring -> its table (the first match in order). A GPU without a row (the H100 included) measures
# each shape on itself at engine start (`fusion_pass.kernels.cached_choice`): one GPU's choices never serve another.
TABLES: dict[str, SmallMTable] = {"H200": _H200}
# The skinny launch shapes a GPU without a table measures: the ones some table picks.
SKINNY_CANDIDATES: tuple[SkinnyConfig, ...] = tuple(dict.fromkeys(cfg for _, _, cfg in _H200.skinny))
_TORCH = Choice("torch", (), "default")


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
    or a GPU without a table that has not measured the shape yet)."""
    m = x.shape[0]
    if not x.is_cuda or m < 1 or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "torch", None
    table = table_for(x.device)
    if table is None:
        return _measured_path(m, weight.shape[0], weight.shape[1], x.dtype, x.device, act)
    if m <= table.gemv_max_m and x.dtype in GEMV_DTYPES:
        return "gemv", None
    if table.gemv_max_m < m <= table.skinny_max_m and x.dtype in SKINNY_DTYPES:
        return "skinny", table.skinny_config(m, act)
    return "torch", None


def candidates(m: int, dtype: torch.dtype) -> list[tuple[str, tuple]]:
    """The paths a GPU without a table measures for M rows of ``dtype``: cuBLAS first, the GEMV (M <= MAX_M), the
    skinny kernel's :data:`SKINNY_CANDIDATES` (M <= SKINNY_MAX_M, fp16 / bf16)."""
    out: list[tuple[str, tuple]] = [("torch", ())]
    if m <= MAX_M and dtype in GEMV_DTYPES:
        out.append(("gemv", ()))
    if m <= SKINNY_MAX_M and dtype in SKINNY_DTYPES:
        out += [("skinny", tuple(c)) for c in SKINNY_CANDIDATES]
    return out


def _run_path(path: str, config: tuple, x: torch.Tensor, w: torch.Tensor, act: str) -> torch.Tensor:
    if path == "gemv":
        return gemv_triton(x, w, None, act)
    if path == "skinny":
        return gemv_skinny_triton(x, w, None, act, config=SkinnyConfig(*config))
    return F.linear(silu_mul_triton(x) if act == "silu_mul" else apply_act(x, act), w)


def measure(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, act: str, reps: int = 10) -> Choice:
    """Time every candidate of an [m, k] x [n, k]^T linear (its input [m, 2k] with SwiGLU) on a CUDA device, each in
    a CUDA graph of ``reps`` calls over weights rotated beyond L2, and return the fastest (candidates that fail
    are skipped; a single candidate is returned unmeasured)."""
    mb = m_bucket(m)
    cands = candidates(mb, dtype)
    if len(cands) == 1:
        return Choice(cands[0][0], cands[0][1], "measured")
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(mb, 2 * k if act == "silu_mul" else k, device=device, dtype=dtype, generator=gen)
    ws = rotated_weights(n, k, dtype, device, gen)
    return fastest(cands, lambda p, c: lambda i: _run_path(p, c, x, ws[i % len(ws)], act), reps, _TORCH)


def _measured_path(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, act: str
                   ) -> tuple[str, Optional[SkinnyConfig]]:
    """The measured (and cached) path of a GPU without a table; cuBLAS above SKINNY_MAX_M rows or until measured."""
    if m > SKINNY_MAX_M or dtype not in GEMV_DTYPES:
        return "torch", None
    c = cached_choice(f"linear_small_m:{act}", m, n, k, dtype, device,
                      lambda: measure(m, n, k, dtype, device, act), _TORCH)
    return c.variant, (SkinnyConfig(*c.config) if c.variant == "skinny" else None)


def pretune(shapes: list[tuple[int, int, int, str]], dtype: torch.dtype, device: torch.device) -> None:
    """Measure and cache the path of each (M, N, K, act) on a GPU without a table (nothing to do on one with a
    table, or off CUDA); call before the KV cache takes the memory the timing needs. With the ``tuning_file``
    kernel setting, the file is read once before and written once after, when something was measured
    (:func:`fusion_pass.kernels.tuning_batch`)."""
    if device.type != "cuda" or table_for(device) is not None:
        return
    with tuning_batch():
        for m, n, k, act in shapes:
            _measured_path(m, n, k, dtype, device, act)
