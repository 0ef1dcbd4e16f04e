"""The engine's small-M linear: ``y[M, N] = act(x) @ W^T (+ b)`` at decode sizes, with an optional SwiGLU prologue.

Files, one job each:
  common.py    the activation, the PyTorch reference (``gemv_ref``), input checks, the SiLU-and-mul kernel.
  rows.py      the CUDA-core GEMV (M <= 16; a whole-row kernel at M = 1) and ``gemv``.
  skinny.py    the split-K tensor-core kernel (M <= 32), the splits summed in the kernel (fixup) or by a second one.
  dispatch.py  which of them a shape runs on the GPU at hand (a table per GPU model; cuBLAS elsewhere).
The op that uses them is ``torch.ops.nanovllm.linear_small_m`` (nanovllm/layers/gemv_op.py).
"""
from .common import ACTS, GEMV_DTYPES, apply_act, check_launch, check_shapes, gemv_ref, silu_mul_triton
from .dispatch import SKINNY_DTYPES, TABLES, SmallMTable, choose_path, table_for
from .rows import (CONFIG_CHOICES, ELEMS_PER_THREAD, MAX_M, MAX_ROW_K, GemvConfig, block_k_for, choose_config, gemv,
                   gemv_triton, row_config)
from .skinny import (SKINNY_CHOICES, SKINNY_DEFAULT, SKINNY_MAX_M, SKINNY_MAX_SMEM, SkinnyConfig,
                     gemv_skinny_triton)

__all__ = ["ACTS", "CONFIG_CHOICES", "ELEMS_PER_THREAD", "GEMV_DTYPES", "MAX_M", "MAX_ROW_K", "SKINNY_CHOICES",
           "SKINNY_DEFAULT", "SKINNY_DTYPES", "SKINNY_MAX_M", "SKINNY_MAX_SMEM", "TABLES", "GemvConfig",
           "SkinnyConfig", "SmallMTable", "apply_act", "block_k_for", "check_launch", "check_shapes",
           "choose_config", "choose_path", "gemv", "gemv_ref", "gemv_skinny_triton", "gemv_triton", "row_config",
           "silu_mul_triton", "table_for"]
