"""torch.library custom ops of the "coconut" namespace: (residual add +) RMSNorm feeding one or more linears.

    torch.ops.coconut.rms_norm_linear(Tensor x, Tensor norm_weight, Tensor[] weights, Tensor?[] biases, float eps,
                                      Tensor? eps_tensor=None, bool weight_in_fp32=False) -> Tensor[]
        x: [..., K]; returns [y_0, ..., y_{n-1}] with y_i: [M, N_i], M = x.numel() // K (the 2-D shape that the
        mm/addmm of a linear produces from the flattened activations).

    torch.ops.coconut.add_rms_norm_linear(Tensor x, Tensor residual, Tensor norm_weight, Tensor[] weights,
                                          Tensor?[] biases, float eps, Tensor? eps_tensor=None,
                                          bool weight_in_fp32=False) -> Tensor[]
        h = x + residual (same shape and dtype); returns [y_0, ..., y_{n-1}, h] with h: x.shape.

Semantics (see fusion_pass.kernels.reference_rms_norm): statistics in fp32, y_i = F.linear(a, W_i, b_i) with
a = rms_norm(h).to(dtype) * g (or (rms_norm(h) * g).to(dtype) with weight_in_fp32=True, the torch.nn.RMSNorm form).
eps_tensor: when given (a 0-d CPU tensor; Dynamo turns float attributes into such inputs under dynamic=True), its
value replaces `eps`.

Implementations: one Python kernel for every device: CUDA -> fusion_pass.kernels dispatcher (fused Triton kernels or
Triton-norm + cuBLAS, whichever was measured faster); other devices -> the PyTorch reference. Plus a fake function
for tracing (symbolic M supported). Defined with fusion_pass.registration.define_op (torch.library.Library, not
custom_op: less host time per call); inference only.
"""
from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
from torch import Tensor

from . import kernels
from .registration import define_op


def _eps_value(eps: float, eps_tensor: Optional[Tensor]) -> float:
    return float(eps_tensor.item()) if eps_tensor is not None else float(eps)


def _run(x: Tensor, residual: Optional[Tensor], norm_weight: Tensor, weights: list[Tensor],
         biases: list[Optional[Tensor]], eps: float, eps_tensor: Optional[Tensor],
         weight_in_fp32: bool) -> tuple[list[Tensor], Optional[Tensor]]:
    K = x.shape[-1]
    x2d = x.reshape(-1, K)
    r2d = residual.reshape(-1, K) if residual is not None else None
    ys, h = kernels.rms_norm_linear(x2d, norm_weight, weights, list(biases), _eps_value(eps, eps_tensor),
                                    r2d, weight_in_fp32, variant="auto")
    return ys, h


def _rms_norm_linear(x: Tensor, norm_weight: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
                    eps: float, eps_tensor: Optional[Tensor] = None, weight_in_fp32: bool = False) -> list[Tensor]:
    """y_i = linear(rms_norm(x) * norm_weight, W_i, b_i) for every i; x: [..., K] -> [y_i: [M, N_i]].

    Raises ValueError on shape mismatches (from fusion_pass.kernels.rms_norm_linear).
    """
    ys, _ = _run(x, None, norm_weight, weights, biases, eps, eps_tensor, weight_in_fp32)
    return ys


def _add_rms_norm_linear(x: Tensor, residual: Tensor, norm_weight: Tensor, weights: list[Tensor],
                        biases: list[Optional[Tensor]], eps: float, eps_tensor: Optional[Tensor] = None,
                        weight_in_fp32: bool = False) -> list[Tensor]:
    """h = x + residual; y_i = linear(rms_norm(h) * norm_weight, W_i, b_i); returns [y_0..y_{n-1}, h].

    x, residual: [..., K] same dtype; y_i: [M, N_i] with M = x.numel() // K; h: x.shape.
    """
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    ys, h = _run(x, residual, norm_weight, weights, biases, eps, eps_tensor, weight_in_fp32)
    assert h is not None
    return ys + [h.reshape(x.shape)]


def _rows(x: Tensor) -> int:
    return functools.reduce(operator.mul, x.shape[:-1], 1)


def _rms_norm_linear_fake(x: Tensor, norm_weight: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
                          eps: float, eps_tensor: Optional[Tensor] = None,
                          weight_in_fp32: bool = False) -> list[Tensor]:
    m = _rows(x)
    return [x.new_empty((m, w.shape[0])) for w in weights]


def _add_rms_norm_linear_fake(x: Tensor, residual: Tensor, norm_weight: Tensor, weights: list[Tensor],
                              biases: list[Optional[Tensor]], eps: float, eps_tensor: Optional[Tensor] = None,
                              weight_in_fp32: bool = False) -> list[Tensor]:
    m = _rows(x)
    return [x.new_empty((m, w.shape[0])) for w in weights] + [x.new_empty(x.shape)]


rms_norm_linear = define_op("coconut::rms_norm_linear", _rms_norm_linear, _rms_norm_linear_fake)
add_rms_norm_linear = define_op("coconut::add_rms_norm_linear", _add_rms_norm_linear, _add_rms_norm_linear_fake)
