"""``torch.ops.nanovllm.linear_small_m``: a linear layer (with an optional SwiGLU on its input) that runs the
small-M Triton GEMV of :mod:`nanovllm.kernels.gemv` at decode sizes on the GPU.

    y = torch.ops.nanovllm.linear_small_m(x, weight, bias, act)      # = act(x) @ weight^T (+ bias)

Dispatch (at run time, on the concrete tensors, by :func:`nanovllm.kernels.gemv.choose_path` from the table of the
GPU it runs on):

- the CUDA-core GEMV for the table's smallest M (one kernel; the activation is computed in its prologue; no host
  sync, no allocation besides the output, so it can be captured in a CUDA graph);
- the split-K skinny kernel on the tensor cores above it, up to the table's ``skinny_max_m``, fp16 / bf16
  (:func:`nanovllm.kernels.gemv.gemv_skinny_triton`: the activation in its prologue; the splits of K summed by a
  reduction kernel or inside the kernel by the last program of each tile);
- otherwise (larger ``M``, CPU, other dtypes, a GPU without a table): ``F.linear(apply_act(x, act), weight, bias)``;
  on CUDA the ``silu_mul`` activation then runs as one Triton pass (:func:`nanovllm.kernels.gemv.silu_mul_triton`).

The op is opaque to ``torch.compile`` (a fake implementation gives the output's shape; ``M`` may be symbolic), so a
model compiled with ``fullgraph=True, dynamic=True`` keeps one graph for every batch size and the choice between
the two paths is made per call. The engine's model uses it only on the GPU (see ``RowParallelLinear``): the CPU
model keeps plain ``aten`` ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion_pass.registration import define_op
from nanovllm.kernels.gemv import GEMV_DTYPES, apply_act, check_shapes, choose_path, gemv_skinny_triton, gemv_triton
from nanovllm.kernels.gemv import silu_mul_triton


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
    check_shapes(x, weight, bias, act)
    path, config = choose_path(x, weight, bias, act)
    if path != "torch" and x.stride(1) != 1:
        x = x.contiguous()
    if path == "gemv":
        return gemv_triton(x, weight.contiguous(), None if bias is None else bias.contiguous(), act)
    if path == "skinny":
        return gemv_skinny_triton(x, weight.contiguous(), None if bias is None else bias.contiguous(), act,
                                  config=config)
    if act == "silu_mul" and x.is_cuda and x.dtype in GEMV_DTYPES and x.stride(1) == 1:
        # one pass instead of silu, then mul (Inductor fuses them when the activation is outside the op)
        return F.linear(silu_mul_triton(x), weight, bias)
    return F.linear(apply_act(x, act), weight, bias)


def _linear_small_m_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    check_shapes(x, weight, bias, act)
    return x.new_empty((x.shape[0], weight.shape[0]))


# torch.library.Library-defined (fusion_pass/registration.py: less host time per call than custom_op)
linear_small_m = define_op("nanovllm::linear_small_m", _linear_small_m, _linear_small_m_fake)
