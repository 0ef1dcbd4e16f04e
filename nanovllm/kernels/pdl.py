"""Programmatic dependent launch (PDL) for the decode kernels: each kernel may start while the previous one in the
stream is still running, load what does not depend on it (weights), then wait for it.

Mechanism (CUDA Programming Guide, "Programmatic Dependent Launch and Synchronization"; compute capability >= 9.0):
a kernel launched with the programmatic-stream-serialization attribute (Triton: ``launch_pdl=True``) may begin once
every program of the previous kernel has called ``griddepcontrol.launch_dependents`` (or exited). Its
``griddepcontrol.wait`` (Triton: ``tl.extra.cuda.gdc_wait()``) returns when the previous kernel has completed and
its writes are visible. So a kernel that reads or writes anything another kernel touches only after the wait is
correct whatever precedes it, and one launched without the attribute is serialized as usual. Each of our kernels
follows one pattern: independent loads (the weight tile of a GEMV) -> ``gdc_wait`` -> ``gdc_launch_dependents`` ->
the rest. Triggering after the wait lets at most one kernel run ahead.

On by default (compute capability >= 9 only); ``NANOVLLM_PDL=0`` at import turns it off. Measured on the H200:
benchmarks/bench_pdl_chain.py (28 layers of the batch-1 decode chain in one CUDA graph) 0.776 -> 0.651 ms per step
(1.19x), outputs bitwise equal; in the engine (benchmarks/bench_e2e.py, docs/performance.md) the batch-1 decode step
went from 1.134 to 0.840 ms together with the other changes of session 4. CUDA graphs keep the programmatic edges
when they capture such launches.
"""
from __future__ import annotations

import functools
import os

import torch

from nanovllm.utils.env import env_flag

ENV_PDL = "NANOVLLM_PDL"


ENABLED: bool = env_flag(ENV_PDL, os.environ.get(ENV_PDL), default=True)


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def use_pdl(t: torch.Tensor) -> bool:
    """Whether a kernel launched on ``t``'s device uses PDL: :data:`ENABLED` (looked up at each call, so benchmarks
    and tests may toggle it), a CUDA tensor and compute capability >= 9. Never in the Triton interpreter (CPU)."""
    return ENABLED and t.is_cuda and _capability_major(t.device.index or 0) >= 9


def pdl_launch_options(t: torch.Tensor) -> dict[str, bool]:
    """Keyword arguments for a Triton launch on ``t``'s device: ``{"launch_pdl": True}`` when :func:`use_pdl`, else
    nothing (the Triton interpreter would take ``launch_pdl`` for a kernel argument)."""
    return launch_options(use_pdl(t))


def launch_options(enabled: bool) -> dict[str, bool]:
    """:func:`pdl_launch_options` for an already computed :func:`use_pdl` (launchers compute it once per launch:
    it also sets their kernels' ``USE_PDL``)."""
    return {"launch_pdl": True} if enabled else {}
