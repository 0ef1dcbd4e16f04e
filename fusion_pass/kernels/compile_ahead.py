"""The ahead-of-time step of the dispatcher's measurement (:func:`fusion_pass.kernels.dispatch.fastest`): every
candidate's first call at once, so that their Triton kernels compile in parallel before they are timed one by one."""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from .skinny import reset_fixup_counters


def first_calls_concurrently(fns: Sequence[Callable[[int], object]], max_workers: int = 8) -> None:
    """Run every ``fn(0)`` once, concurrently, in min(len(fns), CPU count, ``max_workers``) threads; wait for all.

    Why: :func:`~fusion_pass.kernels.dispatch.fastest` does this before timing its candidates one by one. A
    candidate's first call compiles its Triton kernel; run in threads, the compiles overlap instead of queueing
    (the GIL is released while ptxas and the C launcher's build run as subprocesses; a cold engine build compiles
    about 94 kernels, 26 s one after another on an H100 host).

    With CUDA, each call runs on the caller's current device, on a side stream of its own, synchronized; the device
    is synchronized after the last one. The calls run in the caller's grad / inference mode (thread-local in
    torch). Their outputs are discarded and may race (candidates share inputs and buffers; two skinny launches on
    two streams can leave split-K fixup counts behind, so the counters are zeroed afterwards). An exception is
    swallowed: the timed calls, which run afterwards, serially, raise it again.
    """
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def first_call(fn: Callable[[int], object]) -> None:
        with contextlib.suppress(Exception), torch.inference_mode(inference), torch.set_grad_enabled(grad):
            if device is None:
                fn(0)
                return
            torch.cuda.set_device(device)
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                fn(0)
            stream.synchronize()

    if fns:
        with ThreadPoolExecutor(min(len(fns), os.cpu_count() or 1, max_workers)) as pool:
            list(pool.map(first_call, fns))
    if device is not None:
        torch.cuda.synchronize()
    reset_fixup_counters()
