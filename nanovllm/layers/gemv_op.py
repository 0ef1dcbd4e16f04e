"""``torch.ops.nanovllm.linear_small_m``: a linear layer (with an optional SwiGLU on its input) that runs the
small-M Triton GEMV of :mod:`nanovllm.kernels.gemv` at decode sizes on the GPU.

    y = torch.ops.nanovllm.linear_small_m(x, weight, bias, act)      # = act(x) @ weight^T (+ bias)

Dispatch (at run time, on the concrete tensors):

- CUDA, ``1 <= M <= GEMV_MAX_M``, fp16/bf16/fp32 with one dtype: the Triton GEMV (one kernel; the activation is
  computed in its prologue; no host sync, no allocation besides the output, so it can be captured in a CUDA graph);
- CUDA, ``GEMV_MAX_M < M <= SKINNY_MAX_M``, fp16 / bf16: the split-K skinny kernel on the tensor cores
  (:func:`nanovllm.kernels.gemv.gemv_skinny_triton`: the activation in its prologue; the splits of K summed by a
  reduction kernel or, for SwiGLU, inside the kernel by the last program of each tile);
- otherwise (larger ``M``, CPU, other dtypes): ``F.linear(apply_act(x, act), weight, bias)``; on CUDA the
  ``silu_mul`` activation then runs as one Triton pass (:func:`nanovllm.kernels.gemv.silu_mul_triton`).

The op is opaque to ``torch.compile`` (a fake implementation gives the output's shape; ``M`` may be symbolic), so a
model compiled with ``fullgraph=True, dynamic=True`` keeps one graph for every batch size and the choice between
the two paths is made per call. The engine's model uses it only on the GPU (see ``RowParallelLinear``): the CPU
model keeps plain ``aten`` ops.

``GEMV_MAX_M`` (default 2: at M = 3-4 the skinny kernel measured faster) is read once, at import, from the
environment variable ``NANOVLLM_GEMV_MAX_M`` (an integer in ``[0, MAX_M]``; 0 disables the GEMV), so the
crossovers can be measured on the target GPU (benchmarks/bench_gemv.py --skinny). It is looked up at each call,
so tests may also patch the module attribute.
``SKINNY_MAX_M`` (default 32, the kernel's limit) likewise from ``NANOVLLM_SKINNY_MAX_M`` (``[0, 32]``; 0 disables
the skinny path: every ``M > GEMV_MAX_M`` then goes to cuBLAS).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fusion_pass.registration import define_op
from nanovllm.kernels import gemv as G
from nanovllm.kernels.gemv import GEMV_DTYPES, MAX_M, _check_shapes, apply_act, gemv_triton, silu_mul_triton

DEFAULT_GEMV_MAX_M = 2
ENV_GEMV_MAX_M = "NANOVLLM_GEMV_MAX_M"


DEFAULT_SKINNY_MAX_M = G.SKINNY_MAX_M
ENV_SKINNY_MAX_M = "NANOVLLM_SKINNY_MAX_M"


def max_m_from_env(value: str | None, name: str = ENV_GEMV_MAX_M, default: int = DEFAULT_GEMV_MAX_M,
                   limit: int = MAX_M) -> int:
    """Parse the value of the environment variable ``name`` (``NANOVLLM_GEMV_MAX_M`` by default): unset or empty
    -> ``default``.

    Raises:
        ValueError: not an integer, or outside ``[0, limit]`` (the largest M the kernel takes).
    """
    if value is None or not value.strip():
        return default
    try:
        m = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not 0 <= m <= limit:
        raise ValueError(f"{name} must be in [0, {limit}], got {m}")
    return m


GEMV_MAX_M: int = max_m_from_env(os.environ.get(ENV_GEMV_MAX_M))
SKINNY_MAX_M: int = max_m_from_env(os.environ.get(ENV_SKINNY_MAX_M), ENV_SKINNY_MAX_M, DEFAULT_SKINNY_MAX_M,
                                   G.SKINNY_MAX_M)


def uses_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`linear_small_m` runs the Triton GEMV for these (concrete) tensors."""
    return (x.is_cuda and 1 <= x.shape[0] <= GEMV_MAX_M and x.dtype in GEMV_DTYPES and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype))


SKINNY_DTYPES = (torch.float16, torch.bfloat16)  # fp32 multiplies on the CUDA cores there and spills (ptxas)


def uses_skinny(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`linear_small_m` runs the split-K skinny kernel for these (concrete) tensors: CUDA,
    ``GEMV_MAX_M < M <= SKINNY_MAX_M``, fp16 / bf16 (one dtype)."""
    return (x.is_cuda and GEMV_MAX_M < x.shape[0] <= SKINNY_MAX_M and x.dtype in SKINNY_DTYPES
            and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype))


def _linear_small_m(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """``act(x) @ weight^T (+ bias)``.

    Args:
        x: ``[M, K]`` (``act="none"``) or ``[M, 2K]`` laid out as gate | up (``act="silu_mul"``).
        weight: ``[N, K]`` (nn.Linear layout); contiguous for the GEMV path.
        bias: ``[N]`` or None.
        act: ``"none"`` or ``"silu_mul"`` (``silu(gate) * up``).

    Returns:
        ``[M, N]`` in ``x.dtype``. The GEMV path computes the activation and accumulates in float32 and rounds
        once; the PyTorch path rounds the activation to ``x.dtype`` before the matmul (as the eager model does).

    Raises:
        ValueError: inconsistent shapes or an unknown ``act``.
    """
    _check_shapes(x, weight, bias, act)
    if uses_gemv(x, weight, bias):
        if x.stride(1) != 1:
            x = x.contiguous()
        return gemv_triton(x, weight.contiguous(), None if bias is None else bias.contiguous(), act)
    if uses_skinny(x, weight, bias):
        if x.stride(1) != 1:
            x = x.contiguous()
        return G.gemv_skinny_triton(x, weight.contiguous(), None if bias is None else bias.contiguous(), act,
                                    config=G.skinny_config(x.shape[0], weight.shape[0], weight.shape[1], act))
    if act == "silu_mul" and x.is_cuda and x.dtype in GEMV_DTYPES and x.stride(1) == 1:
        # one pass instead of silu, then mul (Inductor fuses them when the activation is outside the op)
        return F.linear(silu_mul_triton(x), weight, bias)
    return F.linear(apply_act(x, act), weight, bias)


def _linear_small_m_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    _check_shapes(x, weight, bias, act)
    return x.new_empty((x.shape[0], weight.shape[0]))


# torch.library.Library-defined (fusion_pass/registration.py: less host time per call than custom_op)
linear_small_m = define_op("nanovllm::linear_small_m", _linear_small_m, _linear_small_m_fake)
