"""Linear layers split across tensor-parallel ranks (Megatron-LM, Shoeybi et al. 2019, arXiv 1909.08053).

Column-parallel layers split the output features (each rank holds ``out / tp`` rows of the weight) and need no
communication; a row-parallel layer splits the input features and sums the partial outputs over the ranks.
Each weight carries a ``weight_loader(param, loaded, shard_id=None)`` that copies this rank's slice of a
checkpoint tensor into place, so the loader never needs to know the split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels.gemv import ACTS, apply_act
from nanovllm.layers import gemv_op  # noqa: F401  (registers torch.ops.nanovllm.linear_small_m)
from nanovllm.utils.parallel import all_reduce, tp_rank, tp_size


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={d}")
    return n // d


class LinearBase(nn.Module):
    """``y = x @ W^T + b`` with ``W: [out_local, in_local]``; subclasses decide the split."""

    def __init__(self, in_local: int, out_local: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(out_local, in_local), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        raise NotImplementedError


class ColumnParallelLinear(LinearBase):
    """Splits the output features: x ``[T, in]`` -> y ``[T, out / tp]`` (this rank's columns)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, _divide(out_features, tp_size(), "out_features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears over one input stored as one weight (e.g. gate and up of SwiGLU).

    ``shard_id`` is the index of the merged part in ``out_sizes``.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        n = self.out_sizes[shard_id] // self.tp_size
        offset = sum(self.out_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, self.tp_rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """The q, k and v projections as one column-parallel weight; each rank keeps its heads.

    Output per rank: ``[T, (num_heads + 2 * num_kv_heads) / tp * head_dim]`` laid out as q | k | v.
    ``shard_id`` is "q", "k" or "v".
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size(), "num_attention_heads")
        self.num_kv_heads = _divide(num_kv_heads, tp_size(), "num_key_value_heads")
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, n = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]  # type: ignore[index]
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, self.tp_rank * n, n))


class RowParallelLinear(LinearBase):
    """Splits the input features: x ``[T, in / tp]`` -> y ``[T, out]``, summed over the ranks (all-reduce).

    ``input_act="silu_mul"`` applies SwiGLU to the input first: x is then ``[T, 2 * in / tp]`` laid out as
    gate | up (the output of a MergedColumnParallelLinear with ``out_sizes = [in, in]``) and the layer computes
    ``(silu(gate) * up) @ W^T``. On CUDA the local matmul (with the activation) is the custom op
    ``torch.ops.nanovllm.linear_small_m`` (the Triton GEMV at decode sizes, cuBLAS otherwise, see
    layers/gemv_op.py); on the CPU it is the plain ``F.linear`` (after ``silu(gate) * up``), as Inductor and the
    fusion pass expect. The all-reduce and the bias (added once, after it) stay outside the op.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, input_act: str = "none") -> None:
        if input_act not in ACTS:
            raise ValueError(f"input_act must be one of {ACTS}, got {input_act!r}")
        super().__init__(_divide(in_features, tp_size(), "in_features"), out_features, bias)
        self.input_act = input_act

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # the bias is not split; it is added once, after the reduction
            param.data.copy_(loaded)
            return
        n = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # static under torch.compile: the GPU graph holds the op, the CPU graph plain aten ops
            x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            y = torch.ops.nanovllm.linear_small_m(x2d, self.weight, None, self.input_act)
            if x.dim() != 2:
                y = y.view(*x.shape[:-1], y.shape[-1])
        else:
            y = F.linear(apply_act(x, self.input_act), self.weight)
        y = all_reduce(y)
        return y + self.bias if self.bias is not None else y
