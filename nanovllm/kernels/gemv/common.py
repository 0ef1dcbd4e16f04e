"""Shared parts of the engine's small-M linear kernels: the activation (SwiGLU), the PyTorch reference, the input
checks, the Triton helpers that load and activate an input chunk, and the one-pass SiLU-and-mul kernel.

    act = "none":      act(x) = x                                  x: [M, K]
    act = "silu_mul":  act(x)_k = silu(gate_k) * up_k              x: [M, 2K] = [gate | up]  (SwiGLU,
                       silu(g) = g / (1 + exp(-g)), in float32      Shazeer 2020, arXiv 2002.05202)

``[gate | up]`` is how the model's merged ``gate_up_proj`` lays out its output (MergedColumnParallelLinear with
``out_sizes = [I, I]``: gate rows first, then up rows, per tensor-parallel rank), so the MLP's ``down_proj`` reads
the ``gate_up`` output directly and the separate SiLU-and-mul kernel disappears.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from fusion_pass.launch import cdiv

ACTS = ("none", "silu_mul")
GEMV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def apply_act(x: torch.Tensor, act: str) -> torch.Tensor:
    """``act(x)`` in PyTorch, in x's dtype: ``"none"`` returns ``x``; ``"silu_mul"`` maps ``[..., 2K]`` laid out as
    gate | up to ``F.silu(gate) * up`` ``[..., K]`` (the same ops as :class:`nanovllm.layers.activation.SiluAndMul`).

    Raises:
        ValueError: unknown ``act``, or an odd last dim for ``"silu_mul"``.
    """
    if act == "none":
        return x
    if act == "silu_mul":
        if x.shape[-1] % 2:
            raise ValueError(f"silu_mul needs an even last dim (gate | up), got {tuple(x.shape)}")
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
    raise ValueError(f"act must be one of {ACTS}, got {act!r}")


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str = "none"
             ) -> torch.Tensor:
    """Reference of :func:`gemv`: the activation and the product in float32 (float64 inputs stay float64).

    Args:
        x: ``[M, K]`` (``act="none"``) or ``[M, 2K]`` (``"silu_mul"``), any floating dtype.
        weight: ``[N, K]``; bias: ``[N]`` or None.
        act: ``"none"`` or ``"silu_mul"``.

    Returns:
        ``[M, N]`` in ``x.dtype``.

    Raises:
        ValueError: on inconsistent shapes or an unknown ``act``.
    """
    check_shapes(x, weight, bias, act)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.linear(apply_act(x.to(ct), act), weight.to(ct), None if bias is None else bias.to(ct))
    return y.to(x.dtype)


def check_shapes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> tuple[int, int, int]:
    """(M, N, K) after checking ``act``, the ranks and the matching sizes (ValueError otherwise)."""
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x and weight must be 2-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    n, k = weight.shape
    want = 2 * k if act == "silu_mul" else k
    if x.shape[1] != want:
        raise ValueError(f"x must be [M, {want}] for weight {tuple(weight.shape)} and act={act!r}, "
                         f"got {tuple(x.shape)}")
    if k == 0:
        raise ValueError("K = 0 (empty reduction) is not supported")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    return x.shape[0], n, k



@triton.jit
def _load_x(x_ptr, off, rk, mask, K, ACT: tl.constexpr):
    """The raw ``[BLOCK_K]`` input chunk(s) of one row at element offset ``off`` (the row start plus the chunk's
    first column is ``off + rk``): (gate, up) for silu_mul, (x, x) otherwise; masked elements are 0."""
    first = tl.load(x_ptr + off + rk, mask=mask, other=0.0)
    if ACT == "silu_mul":
        second = tl.load(x_ptr + off + K + rk, mask=mask, other=0.0)
    else:
        second = first
    return first, second


@triton.jit
def _act(first, second, ACT: tl.constexpr):
    """act of a loaded chunk in float32: silu(gate) * up = gate * up / (1 + exp(-gate)) for silu_mul, else x.
    (exp(-gate) = inf for very negative gate gives -0: the limit, no NaN.)"""
    a = first.to(tl.float32)
    if ACT == "silu_mul":
        a = a / (1.0 + tl.exp(-a)) * second.to(tl.float32)
    return a



@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, K, stride_xm, BLOCK: tl.constexpr):
    """y[row, cols] = silu(gate) * up for one ``BLOCK`` of columns of one row (x = [gate | up])."""
    row = tl.program_id(0).to(tl.int64)
    rk = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = rk < K
    first, second = _load_x(x_ptr, row * stride_xm, rk, mask, K, "silu_mul")
    tl.store(y_ptr + row * K + rk, _act(first, second, "silu_mul").to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` in one pass (float32 math, one rounding to ``x.dtype``), for the op's large-M
    path on the GPU: the PyTorch ops would take two kernels and an intermediate ``[M, K]`` tensor.

    Args:
        x: ``[M, 2K]`` laid out as gate | up, columns contiguous, fp16/bf16/fp32.

    Returns:
        ``[M, K]`` contiguous, in ``x.dtype``.

    Raises:
        ValueError: not 2-D, an odd last dim, or non-contiguous columns.
    """
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_mul needs a [M, 2K] input with contiguous columns, got {tuple(x.shape)}")
    m, k = x.shape[0], x.shape[1] // 2
    y = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m and k:
        block = 1024
        _silu_mul_kernel[(m, cdiv(k, block))](x, y, k, x.stride(0), BLOCK=block, num_warps=4)
    return y


def check_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str,
                  out: torch.Tensor | None, max_m: int, too_many: str) -> tuple[int, int, int, torch.Tensor]:
    """The launchers' shared checks: shapes (:func:`check_shapes`), one supported dtype, at most ``max_m`` rows
    (``too_many`` starts the message), contiguous weight and bias, contiguous columns of x, and ``out`` (allocated
    when None). Returns (M, N, K, out). Raises ValueError."""
    m, n, k = check_shapes(x, weight, bias, act)
    if x.dtype not in GEMV_DTYPES:
        raise ValueError(f"dtype must be one of {GEMV_DTYPES}, got {x.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, weight and bias must share one dtype, got {x.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")
    if m > max_m:
        raise ValueError(f"{too_many}={max_m} rows, got M={m}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous ([N, K] row-major)")
    if x.stride(1) != 1 and m > 0:
        raise ValueError(f"x must have contiguous columns, got strides {x.stride()}")
    if bias is not None and not bias.is_contiguous():
        raise ValueError("bias must be contiguous")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    return m, n, k, out
