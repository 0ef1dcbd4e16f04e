"""Launching a compiled Triton kernel again without Triton's per-call argument binding.

``kernel[grid](*args, **kwargs)`` binds the arguments to the kernel's signature, computes each one's
specialization (a tensor's dtype and whether its address is a multiple of 16 bytes; an integer equal to 1 or
divisible by 16), hashes that into the key of its cache of compiled kernels, and only then calls the compiled
kernel's C launcher. Where no CUDA graph replays the launches (a model compiled without CUDA graphs, the engine's
prefill), the fused ops pay that at every call: on an H100 host (triton 3.6) the fused launch of a decode q/k/v group
took 54.9 us of host time that way and 37.9 us with the direct launch below, output buffers included
(benchmarks/results/h100/host-overhead.json).

A launch site whose grid, constants and argument types do not change between calls (one weight group of one
compiled model at one M) can skip the binding: :class:`LaunchCache` keeps, per site key and per alignment pattern
of the tensor arguments, the compiled kernel that the first ordinary launch returned, and afterwards calls its C
launcher (``CompiledKernel.run``) with the arguments Triton's own launch passes it, no launch hooks. Everything
Triton would specialize on must be fixed by the caller's key except the tensors' alignment, which is checked at
every call; so the kernel launched is the one Triton's own lookup would pick.
"""
from __future__ import annotations

import logging
from typing import Any, Hashable, Sequence

import torch
import triton
from torch import Tensor

log = logging.getLogger("fusion_pass")

#: Sites kept per cache before it is emptied (a key per site and M: a compiled model has a few dozen).
MAX_ENTRIES = 4096


class _Site:
    """One site key's launch: the positions of the tensor arguments (fixed by the key), the grid as three counts,
    and the compiled kernel per alignment pattern of those tensors."""

    __slots__ = ("tensors", "grid", "binaries")

    def __init__(self, args: Sequence[Any], grid: tuple[int, ...]) -> None:
        self.tensors = tuple(i for i, a in enumerate(args) if isinstance(a, Tensor))
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.binaries: dict[int, Any] = {}


class LaunchCache:
    """Direct launches of one ``@triton.jit`` kernel, keyed by the caller's site key.

    Args:
        kernel: the ``@triton.jit`` function.
    The caller's contract for :meth:`launch`: ``args`` holds EVERY parameter of the kernel, positionally, in the
    order of its signature (constexprs and defaulted parameters included), and ``key`` determines everything in
    ``args`` that Triton specializes on, other than tensor alignment: the values of the constexprs and of the
    integers the kernel specializes on, which arguments are None, every tensor's dtype, and ``options``.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._sites: dict[tuple[Hashable, tuple[int, ...], int], _Site] = {}  # (key, grid, device) -> _Site
        self.direct = 0  # launches that took the direct path (tests, benchmarks)
        self.disabled = False  # set when the compiled kernel's launcher refused the call: Triton's path from then on

    def launch(self, key: Hashable, grid: tuple[int, ...], args: Sequence[Any], options: dict[str, Any]) -> None:
        """Launch ``kernel[grid](*args, **options)``, directly when this key and alignment pattern was seen before.

        Args:
            key: hashable; see the class docstring for what it must determine.
            grid: 1 to 3 program counts.
            args: every kernel parameter in signature order. Tensors must be CUDA tensors (else the ordinary
                launch runs: the Triton interpreter, CPU tensors).
            options: launch options (``num_warps``, ``num_stages``, ``launch_pdl``...); part of ``key``.
        """
        if self.disabled or not self._direct_possible(args):
            self.kernel[grid](*args, **options)  # the interpreter (CPU tensors), or a profiler's launch hooks
            return
        device = self._device()
        site = self._sites.get((key, grid, device))
        mask = _alignment_mask(args, site.tensors) if site is not None else 0
        compiled = site.binaries.get(mask) if site is not None else None
        if compiled is None:
            compiled = self.kernel[grid](*args, **options)
            if compiled is None or not hasattr(compiled, "function"):
                return  # an asynchronous compile or an unknown Triton: nothing to keep
            if site is None:
                if len(self._sites) >= MAX_ENTRIES:
                    self._sites.clear()
                site = self._sites[(key, grid, device)] = _Site(args, grid)
                mask = _alignment_mask(args, site.tensors)
            site.binaries[mask] = compiled
            return
        g = site.grid
        try:
            compiled.run(g[0], g[1], g[2], self._stream(device), compiled.function, compiled.packed_metadata, None,
                         None, None, *args)
        except (TypeError, AttributeError) as e:  # a Triton whose launcher takes other arguments: its own path
            self.disabled = True
            log.warning("fusion_pass: direct launches of %s are off (%s: %s); launching through Triton",
                        getattr(self.kernel, "__name__", self.kernel), type(e).__name__, e)
            self.kernel[grid](*args, **options)
            return
        self.direct += 1

    @staticmethod
    def _direct_possible(args: Sequence[Any]) -> bool:
        """CUDA tensors (the first argument's device) and no launch hook installed (a profiler's hooks get
        Triton's own path)."""
        first = args[0]
        hooks = triton.knobs.runtime
        return (isinstance(first, Tensor) and first.is_cuda and _no_hook(hooks.launch_enter_hook)
                and _no_hook(hooks.launch_exit_hook))

    @staticmethod
    def _device() -> int:
        """The current CUDA device's index: Triton compiles for and launches on it."""
        return torch.cuda.current_device()

    @staticmethod
    def _stream(device: int) -> int:
        """The raw handle of the current CUDA stream of `device` (where Triton's own launch would go)."""
        return torch._C._cuda_getCurrentRawStream(device)

    def clear(self) -> None:
        """Forget every compiled kernel kept (the next launch of each key goes through Triton again)."""
        self._sites.clear()


def _alignment_mask(args: Sequence[Any], tensors: tuple[int, ...]) -> int:
    """One bit per tensor argument (``tensors``: their positions in ``args``), in order: 1 where its address is a
    multiple of 16 bytes (Triton's "D" specialization of a pointer), plus a leading 1."""
    mask = 1
    for i in tensors:
        mask = (mask << 1) | ((args[i].data_ptr() & 15) == 0)
    return mask


def _no_hook(hook: Any) -> bool:
    """Whether a Triton launch hook slot holds nothing to call: None, or an empty ``triton.knobs.HookChain`` (how
    triton 3.6 initializes the slots; a profiler adds its hooks to the chain)."""
    return hook is None or getattr(hook, "calls", None) == []
