"""Fused (residual add +) RMSNorm -> Linear Triton kernels, the unfused paths, and the dispatcher.

The fused kernels use the FlashNorm folding (Graef et al. 2024, arXiv 2407.09577): because 1/rms(h) is a per-row
scalar, y = ((h * g) @ W^T) * (1/rms(h)) + b, so the sum of squares is accumulated from the same h tiles that feed
the product and 1/rms is applied in the epilogue. The normalized activations never exist in memory. (The rounding
differs slightly from the eager chain, see reference.py: h*g is kept in fp32 by the CUDA-core kernel and rounded
once to the activation dtype before the tensor-core product; both are within bf16/fp16 tolerance of it.)

Files, one job each:
  reference.py  the PyTorch reference (fp32 statistics); the CPU path ("torch").
  norm.py       the unfused path's one-pass Triton RMSNorm; with F.linear (cuBLAS) it is "unfused".
  gemv.py       "stream": M = 1-2 rows, whole-row W tiles, a persistent grid, on the CUDA cores.
  skinny.py     "skinny": M = 2-32 rows, split-K swap-AB on the tensor cores, the splits summed in the kernel
                (fixup) or by an epilogue kernel.
  segments.py   weight groups: the linears of one site (q, k, v) as segments of one launch.
  registry.py   the fused variants by name (configs and launcher); ``fused_linear(s)``, which launch one.
  dispatch.py   picks the fastest path per shape by measurement on the running GPU, caches it, saves/loads it.
  compile_ahead.py  the measurement's candidates' first calls, concurrently: their kernels compile in parallel.
  linear.py     ``rms_norm_linear``, the entry point of the custom ops.
"""
from __future__ import annotations

import os

from .common import m_bucket, new_buffer
from .dispatch import (OP, Choice, cached_choice, candidates, capture_graph, choose, clear_dispatch_cache,
                       dispatch_table, fastest, load_tuning, load_tuning_file, measure, measurement_count, pretune,
                       replay_ms, rotated_weights, save_tuning, time_in_graph, tuning_batch, versions_tag)
from .gemv import STREAM_CONFIGS, STREAM_MAX_ROWS, stream_configs
from .linear import rms_norm_linear
from .norm import triton_rms_norm
from .reference import reference_rms_norm, reference_rms_norm_linear
from .registry import FUSED_VARIANTS, VARIANTS, FusedVariant, fused_linear, fused_linears
from .segments import MAX_GROUP, split_groups
from .skinny import (FIXUP_COUNTERS, SKINNY_CONFIGS, SKINNY_MAX_M, SKINNY_MAX_SMEM, fixup_counters,
                     reset_fixup_counters, skinny_configs)


def source_files() -> list[str]:
    """Paths of this package's Python files, sorted (the backend hashes them into its cache key)."""
    here = os.path.dirname(__file__)
    return sorted(os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py"))


__all__ = ["MAX_GROUP", "OP", "Choice", "cached_choice", "FIXUP_COUNTERS", "FUSED_VARIANTS", "FusedVariant", "SKINNY_CONFIGS", "SKINNY_MAX_M",
           "SKINNY_MAX_SMEM", "STREAM_CONFIGS", "STREAM_MAX_ROWS", "VARIANTS", "candidates", "capture_graph",
           "choose", "clear_dispatch_cache", "dispatch_table", "fixup_counters", "fused_linear", "fused_linears", "load_tuning",
           "load_tuning_file", "measurement_count", "tuning_batch", "versions_tag", "fastest",
           "m_bucket", "measure", "new_buffer", "pretune", "reference_rms_norm", "reference_rms_norm_linear",
           "replay_ms", "reset_fixup_counters", "rms_norm_linear", "rotated_weights", "save_tuning",
           "skinny_configs", "source_files", "split_groups", "stream_configs", "time_in_graph", "triton_rms_norm"]
