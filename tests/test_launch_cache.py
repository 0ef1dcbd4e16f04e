"""fusion_pass.launch_cache: the direct launch of a compiled Triton kernel.

On the CPU the cache's bookkeeping runs against a stand-in kernel (a CUDA launch needs a GPU): the first launch of a
key goes through ``kernel[grid](...)``, later ones call the compiled kernel's launcher with the same arguments, a
new alignment pattern or key goes through Triton again. The alignment rule is checked against Triton's own
specialization of a pointer. On the GPU the fused op's launches take the direct path and give the results of the
ordinary one.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from fusion_pass import launch_cache
from fusion_pass.launch_cache import LaunchCache


class _Compiled:
    """Stand-in for triton's CompiledKernel: records the launcher calls."""

    function = "fn-handle"
    packed_metadata = "meta"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def run(self, *a: Any) -> None:
        self.calls.append(a)


class _Kernel:
    """Stand-in for a @triton.jit function: ``kernel[grid](*args, **options)`` compiles (counted) and returns a
    new _Compiled."""

    def __init__(self) -> None:
        self.compiles: list[tuple[Any, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def launch(*args: Any, **options: Any) -> _Compiled:
            self.compiles.append((grid, args, options))
            return _Compiled()
        return launch


class _CpuCache(LaunchCache):
    """The cache with its CUDA queries answered on the CPU."""

    @staticmethod
    def _direct_possible(args: Any) -> bool:
        return True

    @staticmethod
    def _device() -> int:
        return 0

    @staticmethod
    def _stream(device: int) -> int:
        return 1234


def test_first_launch_compiles_later_launches_go_direct() -> None:
    k = _Kernel()
    cache = _CpuCache(k)
    buf = torch.zeros(64)
    x, y = buf[0:16], buf[16:32]  # both 16-byte aligned (offsets 0 and 64 bytes)
    args = (x, y, 16, 2.0, True, None)
    cache.launch(("site", 16), (4,), args, {"num_warps": 4})
    assert len(k.compiles) == 1 and k.compiles[0][0] == (4,) and k.compiles[0][2] == {"num_warps": 4}
    compiled = next(iter(next(iter(cache._sites.values())).binaries.values()))
    cache.launch(("site", 16), (4,), args, {"num_warps": 4})
    assert len(k.compiles) == 1 and cache.direct == 1
    assert compiled.calls == [(4, 1, 1, 1234, "fn-handle", "meta", None, None, None, *args)]
    # another alignment of one pointer: Triton would specialize differently, so it compiles through Triton again
    cache.launch(("site", 16), (4,), (buf[1:17], y, 16, 2.0, True, None), {"num_warps": 4})
    assert len(k.compiles) == 2 and cache.direct == 1
    # another key: through Triton
    cache.launch(("site", 32), (4,), args, {"num_warps": 4})
    assert len(k.compiles) == 3
    # both known now: direct
    cache.launch(("site", 16), (4,), (buf[1:17], y, 16, 2.0, True, None), {"num_warps": 4})
    assert len(k.compiles) == 3 and cache.direct == 2


def test_a_launcher_that_refuses_the_call_turns_direct_launches_off() -> None:
    """A Triton whose compiled-kernel launcher takes other arguments (TypeError): that launch and every later one go
    through ``kernel[grid](...)``."""

    class _Refusing(_Compiled):
        def run(self, *a: Any) -> None:
            raise TypeError("launch() takes 9 positional arguments")

    class _RefusingKernel(_Kernel):
        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            def launch(*args: Any, **options: Any) -> _Compiled:
                self.compiles.append((grid, args, options))
                return _Refusing()
            return launch

    k = _RefusingKernel()
    cache = _CpuCache(k)
    x = torch.zeros(16)
    for _ in range(3):
        cache.launch("site", (2,), (x, 5), {})
    assert cache.disabled and cache.direct == 0 and len(k.compiles) == 3


def test_cache_empties_past_max_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_cache, "MAX_ENTRIES", 3)
    k = _Kernel()
    cache = _CpuCache(k)
    x = torch.zeros(16)
    for i in range(4):
        cache.launch(("site", i), (1,), (x,), {})
    assert len(cache._sites) == 1  # emptied when the fourth arrived
    cache.launch(("site", 0), (1,), (x,), {})
    assert len(k.compiles) == 5  # the first key was forgotten


def test_cpu_tensors_take_the_ordinary_launch() -> None:
    k = _Kernel()
    cache = LaunchCache(k)
    x = torch.zeros(16)
    for _ in range(3):
        cache.launch("site", (1,), (x, 3), {})
    assert len(k.compiles) == 3 and cache.direct == 0 and not cache._sites


def test_launch_hooks_send_launches_through_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty hook chain (triton's initial state) allows the direct launch; a hook added to it (a profiler) or
    any other callable in the slot sends every launch through Triton."""
    import triton
    from triton.knobs import HookChain

    class _Cuda:  # the first argument's device check only reads is_cuda
        is_cuda = True

    monkeypatch.setattr(launch_cache, "Tensor", _Cuda)
    chain: HookChain = HookChain()
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", chain)
    monkeypatch.setattr(triton.knobs.runtime, "launch_exit_hook", None)
    assert LaunchCache._direct_possible([_Cuda()])
    chain.add(lambda *a: None)
    assert not LaunchCache._direct_possible([_Cuda()])
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", None)
    monkeypatch.setattr(triton.knobs.runtime, "launch_exit_hook", lambda *a: None)
    assert not LaunchCache._direct_possible([_Cuda()])
    assert not LaunchCache._direct_possible([torch.zeros(1)])  # a CPU tensor: the interpreter's path


def test_alignment_mask_follows_tritons_pointer_specialization() -> None:
    """A bit of the mask is 1 exactly where Triton specializes the pointer as 16-byte aligned ("D")."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    base = torch.zeros(64, dtype=torch.float16)
    for off in range(12):
        t = base[off:]
        triton_aligned = native_specialize_impl(backend, t, False, True, True)[1] == "D"
        assert launch_cache._alignment_mask([t], (0,)) == (0b10 | int(triton_aligned)), off
    masks = {launch_cache._alignment_mask([base[a:], 7, base[b:]], (0, 2)) for a in (0, 1) for b in (0, 1)}
    assert len(masks) == 4  # every pattern of two pointers has its own mask; integers do not count


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant,config,m", [("stream", (4, 4, 4), 1), ("skinny", (128, 256, 8, 0), 8),
                                              ("skinny", (64, 256, 4, 1), 8)])
def test_direct_launches_match_the_ordinary_launch_on_gpu(variant: str, config: tuple[int, ...], m: int) -> None:
    from fusion_pass.kernels import fused_linears
    from fusion_pass.kernels.gemv import _STREAM_LAUNCHES
    from fusion_pass.kernels.skinny import _SKINNY_LAUNCHES

    cache = _STREAM_LAUNCHES if variant == "stream" else _SKINNY_LAUNCHES
    g = torch.Generator(device="cuda").manual_seed(0)
    k = 1024
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    r = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    nw = 1 + 0.1 * torch.randn(k, device="cuda", dtype=torch.bfloat16, generator=g)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * k ** -0.5 for n in (512, 128, 128)]
    h = torch.empty_like(x)
    before = cache.direct
    outs = [fused_linears(x, nw, ws, [None] * 3, 1e-6, r, h, variant, config) for _ in range(3)]
    assert cache.direct >= before + 2
    hf = (x.double() + r.double())
    a = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
    # a misaligned activation view (offset by one element) gets its own compiled kernel
    xb = torch.empty(m * k + 1, device="cuda", dtype=torch.bfloat16)[1:].view(m, k)
    xb.copy_(x)
    outs.append(fused_linears(xb, nw, ws, [None] * 3, 1e-6, r, h, variant, config))
    for out in outs:
        for y, w in zip(out, ws):
            ref = a @ w.double().T
            assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


def _triton_specialization(kernel: Any, args: tuple[Any, ...], options: dict[str, Any]) -> tuple[Any, ...]:
    """What Triton's lookup of a compiled kernel depends on for ``kernel[grid](*args, **options)``, tensor alignment
    left out: each constexpr's value, each other argument's type and value specialization, and the options."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, native_specialize_impl

    fn = getattr(kernel, "fn", kernel)  # the interpreter wraps the function; JITFunction gives its parameters
    params = JITFunction(fn, do_not_specialize=getattr(kernel, "kwargs", {}).get("do_not_specialize")).params
    assert len(args) == len(params), "LaunchCache's contract: every kernel parameter, in signature order"
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    spec = []
    for p, a in zip(params, args):
        if p.is_constexpr:
            spec.append((p.name, "constexpr", a))
        else:
            ty, sp = native_specialize_impl(backend, a, False, not p.do_not_specialize, True)
            spec.append((p.name, ty, None if isinstance(a, torch.Tensor) else sp))
    return tuple(spec) + tuple(sorted(options.items()))


def test_site_keys_determine_tritons_specialization(monkeypatch: pytest.MonkeyPatch) -> None:
    """For the fused kernels' launch sites: every launch that shares a key (and grid) would be specialized by Triton
    the same way (alignment aside), so the kernel the cache launches directly is the one Triton would pick. The
    launches vary M, the group size, bias, residual, h_out (its dtype too: ``fused_linear``'s caller supplies it),
    the activation dtype and the skinny fixup."""
    from fusion_pass.kernels import gemv, skinny

    seen: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    class _Recording(LaunchCache):
        def launch(self, key: Any, grid: tuple[int, ...], args: Any, options: dict[str, Any]) -> None:
            spec = _triton_specialization(self.kernel, tuple(args), options)
            slot = (id(self.kernel), key, tuple(grid))
            assert seen.setdefault(slot, spec) == spec, f"key {key} launched with two specializations"

    for mod, name in ((gemv, "_STREAM_LAUNCHES"), (skinny, "_SKINNY_LAUNCHES"), (skinny, "_EPILOGUE_LAUNCHES")):
        monkeypatch.setattr(mod, name, _Recording(getattr(mod, name).kernel))
    k = 64
    for dt in (torch.float16, torch.float32):
        for m in (1, 2, 3):
            for g in (1, 3):
                for bias in (False, True):
                    for h_dt in (None, dt, torch.float32, torch.float16):
                        x, r, nw = torch.zeros(m, k, dtype=dt), torch.zeros(m, k, dtype=dt), torch.ones(k, dtype=dt)
                        ws = [torch.zeros(16 * (i + 1), k, dtype=dt) for i in range(g)]
                        bs = [torch.zeros(w.shape[0], dtype=dt) if bias else None for w in ws]
                        ys = [torch.empty(m, w.shape[0], dtype=dt) for w in ws]
                        h = torch.empty(m, k, dtype=h_dt) if h_dt is not None else None
                        gemv.launch_stream(x, r, nw, ws, bs, ys, h, 1e-6, (4, 4, 4))
                        gemv.launch_stream(x, None, nw, ws, bs, ys, None, 1e-6, (4, 4, 4))
                        for cfg in ((16, 32, 4, 1), (16, 32, 4, 0), (16, 64, 4, 0)):
                            skinny.launch_skinny(x, r, nw, ws, bs, ys, h, 1e-6, cfg)
    assert len(seen) > 10
