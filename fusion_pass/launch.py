"""Launch helpers shared by every Triton kernel of fusion_pass and of the engine: device properties and
programmatic dependent launch (PDL).

PDL (CUDA Programming Guide, "Programmatic Dependent Launch and Synchronization"; compute capability >= 9.0): a
kernel launched with the programmatic-stream-serialization attribute (Triton: ``launch_pdl=True``) may begin once
every program of the previous kernel has called ``griddepcontrol.launch_dependents`` (or exited). Its
``griddepcontrol.wait`` (Triton: ``tl.extra.cuda.gdc_wait()``) returns when the previous kernel has completed and
its writes are visible. So a kernel that reads or writes anything another kernel touches only after the wait is
correct whatever precedes it, and one launched without the attribute is serialized as usual. Every kernel here
follows one pattern: independent loads (the weight tile of a GEMV) -> ``gdc_wait`` -> ``gdc_launch_dependents`` ->
the rest; triggering after the wait lets at most one kernel run ahead. CUDA graphs keep the programmatic edges when
they capture such launches. The switch is ``KernelSettings.pdl`` (:mod:`fusion_pass.settings`), one for both
packages.
"""
from __future__ import annotations

import functools
import operator

import torch

from .settings import kernel_settings


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side launch arithmetic (grids, tile counts). ``triton.cdiv`` does the same but is a
    Triton constexpr function whose every call from Python costs about 3 us of host time (triton 3.6)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as ``triton.next_power_of_2``), for host-side block sizes;
    ``triton.next_power_of_2`` without its per-call host cost (see :func:`cdiv`)."""
    n = operator.index(n)  # an int (numpy integers too); a float raises TypeError, as in Triton
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def capability_major(device: torch.device) -> int:
    """The major compute capability of a CUDA device (9 on an H100 / H200)."""
    return torch.cuda.get_device_capability(device)[0]


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM / H200)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """The CUDA device's name as the driver reports it (e.g. "NVIDIA H200"); "cpu" for other devices."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def use_pdl(t: torch.Tensor) -> bool:
    """Whether a kernel launched on ``t``'s device uses PDL: ``KernelSettings.pdl`` (looked up at each call), a CUDA
    tensor and compute capability >= 9. Never in the Triton interpreter (CPU tensors)."""
    return kernel_settings().pdl and t.is_cuda and capability_major(t.device) >= 9


def launch_options(enabled: bool) -> dict[str, bool]:
    """Keyword arguments of a Triton launch for an already computed :func:`use_pdl`: ``{"launch_pdl": True}`` or
    nothing (the Triton interpreter would take ``launch_pdl`` for a kernel argument)."""
    return {"launch_pdl": True} if enabled else {}


def pdl_launch_options(t: torch.Tensor) -> dict[str, bool]:
    """:func:`launch_options` of :func:`use_pdl` for ``t``."""
    return launch_options(use_pdl(t))
