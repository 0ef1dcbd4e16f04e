"""The coconut custom ops and the fused Triton kernels (Triton interpreter on CPU) against a float64 reference."""
from __future__ import annotations

import os
import threading
from typing import Callable, Optional

import torch

if not torch.cuda.is_available():  # must happen before triton is imported (tests/conftest.py does it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusion_pass  # noqa: E402,F401
from conftest import rel_err  # noqa: E402
from fusion_pass import kernels  # noqa: E402
from fusion_pass.kernels import dispatch, gemv as fk_gemv, skinny as fk_skinny  # noqa: E402
from fusion_pass.settings import configure_kernels  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"




def ref64(x, g, ws, bs, eps, r=None):
    """Float64 reference of (add +) RMSNorm -> linears: ([y_i [M, N_i]], h)."""
    h = (x + r) if r is not None else x
    hd = h.double().reshape(-1, h.shape[-1])
    n = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * g.double()
    ys = [torch.nn.functional.linear(n, w.double(), None if b is None else b.double()) for w, b in zip(ws, bs)]
    return ys, h


def make(m, k, ns, dtype, bias=True, seed=0, lead=()):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=gen).to(DEV, dtype)
    r = torch.randn(*lead, m, k, generator=gen).to(DEV, dtype)
    g = (1 + 0.2 * torch.randn(k, generator=gen)).to(DEV, dtype)
    ws = [(torch.randn(n, k, generator=gen) / k ** 0.5).to(DEV, dtype) for n in ns]
    bs = [(0.1 * torch.randn(n, generator=gen)).to(DEV, dtype) if bias and i % 2 == 0 else None
          for i, n in enumerate(ns)]
    return x, r, g, ws, bs


@pytest.fixture(autouse=True)
def _poison():
    previous = configure_kernels(poison_outputs=True)
    yield
    configure_kernels(**previous.as_dict())


@pytest.mark.parametrize("m", [1, 3, 16, 17])
@pytest.mark.parametrize("lead", [(), (2,)])
def test_op_cpu_impl_matches_float64(m, lead):
    x, r, g, ws, bs = make(m, 24, [8, 13, 5], torch.float32, lead=lead)
    eps = 3.3e-7
    ys = torch.ops.coconut.rms_norm_linear(x, g, ws, bs, eps)
    ref, _ = ref64(x, g, ws, bs, eps)
    assert len(ys) == 3
    for y, yr in zip(ys, ref):
        assert y.shape == yr.shape == (x.numel() // 24, yr.shape[1])
        assert rel_err(y, yr) <= 1e-5
    out = torch.ops.coconut.add_rms_norm_linear(x, r, g, ws, bs, eps)
    ref, h = ref64(x, g, ws, bs, eps, r)
    assert len(out) == 4 and torch.equal(out[-1], x + r)
    for y, yr in zip(out[:-1], ref):
        assert rel_err(y, yr) <= 1e-5


def test_op_eps_tensor_and_weight_in_fp32_form():
    x, r, g, ws, bs = make(5, 16, [7], torch.bfloat16)
    eps_t = torch.tensor(1e-5, dtype=torch.float64)
    y = torch.ops.coconut.rms_norm_linear(x, g, ws, bs, 0.123, eps_t, True)[0]
    xf = x.float()
    a = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * g).to(torch.bfloat16)
    assert torch.equal(y, torch.nn.functional.linear(a, ws[0], bs[0]))
    # Llama/Qwen rounding chain: cast to bf16, then multiply by the weight in bf16
    y = torch.ops.coconut.rms_norm_linear(x, g, ws, bs, 1e-5)[0]
    a = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * g
    assert torch.equal(y, torch.nn.functional.linear(a, ws[0], bs[0]))


def test_opcheck_fake_impls():
    x, r, g, ws, bs = make(3, 16, [8, 4], torch.float32, lead=(2,))
    torch.library.opcheck(torch.ops.coconut.rms_norm_linear.default, (x, g, ws, bs, 1e-6, None, False),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.coconut.add_rms_norm_linear.default, (x, r, g, ws, bs, 1e-6, None, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_op_rejects_bad_shapes():
    x, r, g, ws, bs = make(3, 16, [8], torch.float32)
    with pytest.raises(ValueError):
        torch.ops.coconut.rms_norm_linear(x, g[:-1], ws, bs, 1e-6)
    with pytest.raises(ValueError):
        torch.ops.coconut.rms_norm_linear(x, g, [ws[0][:, :-1]], bs, 1e-6)


# ---- Triton kernels, forced (interpreter on CPU) ------------------------------------------------------------

TRITON_CASES = [(1, 37, 45), (2, 64, 64), (3, 33, 100), (16, 40, 72), (17, 29, 33), (33, 70, 50)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("m,n,k", TRITON_CASES)
def test_triton_variants_match_float64(dtype, tol, m, n, k):
    x, r, g, ws, bs = make(m, k, [n, 11], dtype, seed=m)
    eps = 1e-6
    ref, _ = ref64(x, g, ws, bs, eps)
    ref_r, _ = ref64(x + r, g, ws, bs, eps)  # h rounded to dtype, as in the model
    # the unfused path, and the default launch shape of each fused variant whose range holds M
    configs = {"unfused": [None]}
    for name, entry in kernels.FUSED_VARIANTS.items():
        if entry.configs(m):
            configs[name] = entry.configs(m)[:1]
    for variant, cfgs in configs.items():
        for cfg in cfgs:
            ys, h = kernels.rms_norm_linear(x, g, ws, bs, eps, variant=variant, config=cfg)
            assert h is None
            for y, yr in zip(ys, ref):
                assert not torch.isnan(y).any(), (variant, cfg)
                assert rel_err(y, yr) <= tol, (variant, cfg, rel_err(y, yr))
            ys, h = kernels.rms_norm_linear(x, g, ws, bs, eps, residual2d=r, variant=variant, config=cfg)
            assert torch.equal(h, x + r), (variant, cfg)
            for y, yr in zip(ys, ref_r):
                assert rel_err(y, yr) <= tol, (variant, cfg, rel_err(y, yr))


# stream (whole-row W tiles, persistent grid; M = 1-2): K a power of two and not, N not a multiple of BN; grids of one
# program per tile and fewer programs than tiles (each loops, prefetching the next tile), with and without bias.
STREAM_CASES = [(1, 13, 96), (1, 40, 1024), (2, 9, 100), (2, 33, 64)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("m,n,k", STREAM_CASES)
def test_stream_variant_matches_reference(dtype, tol, m, n, k):
    x, r, g, ws, bs = make(m, k, [n, 7], dtype, seed=3 * m + k)
    eps = 1e-6
    assert kernels.stream_configs(m)
    # on the CPU a per-SM count launches one program per tile; (bn, warps, 0) does too, so the looping grid is forced
    # through _fused_stream_kernel directly below
    for cfg in kernels.stream_configs(m)[:1] + [(1, 1, 0), (8, 2, 0)]:
        for res in (None, r):
            ys, h = kernels.rms_norm_linear(x, g, ws, bs, eps, residual2d=res, variant="stream", config=cfg)
            ref, h_ref = kernels.reference_rms_norm_linear(x, g, ws, bs, eps, res)
            assert (h is None) == (res is None)
            if res is not None:
                assert torch.equal(h, h_ref), cfg
            for y, yr in zip(ys, ref):
                assert y.shape == yr.shape and not torch.isnan(y).any(), cfg
                assert rel_err(y, yr) < tol, (cfg, res is None, rel_err(y, yr))
    # a persistent grid: 3 programs for ceil(n / 2) tiles, each looping over its tiles
    y = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    h = torch.full((m, k), float("nan"), dtype=dtype, device=DEV)
    fk_gemv._fused_stream_kernel[(3,)](x, r, g, ws[0], bs[0] if bs[0] is not None else ws[0], y, h, m, n, eps, K=k,
                                       HAS_RES=True, HAS_BIAS=bs[0] is not None, WRITE_H=True,
                                       BM=kernels.m_bucket(m), BN=2, BKP=triton_next_pow2(k))
    ref, h_ref = kernels.reference_rms_norm_linear(x, g, ws[:1], bs[:1], eps, r)
    assert torch.equal(h, h_ref)
    assert rel_err(y, ref[0]) < tol, rel_err(y, ref[0])


# skinny (tensor cores, swap-AB, split-K; M = 2-32): M below, at and above 16 (BM = 16 / 32), K a power of two and not,
# split into 1 to 7 chunks (a ragged last one), N not a multiple of BN, with and without bias and residual.
SKINNY_CASES = [(2, 40, 64), (5, 33, 100), (16, 17, 32), (17, 48, 96), (32, 20, 48)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("m,n,k", SKINNY_CASES)
def test_skinny_variant_matches_reference(dtype, tol, m, n, k):
    x, r, g, ws, bs = make(m, k, [n, 7], dtype, seed=5 * m + k)
    eps = 1e-6
    assert kernels.skinny_configs(m)
    for cfg in kernels.skinny_configs(m)[:1] + [(16, 16, 2), (32, 32, 4), (16, 1024, 4)]:
        for res in (None, r):
            ys, h = kernels.rms_norm_linear(x, g, ws, bs, eps, residual2d=res, variant="skinny", config=cfg)
            ref, _ = ref64(x, g, ws, bs, eps, res)
            assert (h is None) == (res is None)
            if res is not None:
                assert torch.equal(h, x + r), cfg  # NaN-poisoned before: every element written
            for y, yr in zip(ys, ref):
                assert y.shape == yr.shape and not torch.isnan(y).any(), cfg
                assert rel_err(y, yr) < tol, (cfg, res is None, rel_err(y, yr))
            # the in-kernel split-K fixup and the epilogue kernel sum the same partials in the same order
            for fixup in (0, 1):
                ysf, _ = kernels.rms_norm_linear(x, g, ws, bs, eps, residual2d=res, variant="skinny",
                                                 config=tuple(cfg[:3]) + (fixup,))
                assert all(torch.equal(a, b) for a, b in zip(ysf, ys)), (cfg, fixup)
    counters = fk_skinny._FIXUP_BUFFERS.get(str(x.device))
    assert counters is not None and int(counters.count_nonzero()) == 0  # every tile's counter reset for the next launch


# weight groups (segments.py): the linears of one site in ONE launch, N_i not multiples of the tile, bias on all or none
GROUP_CASES = [("stream", 1, (4, 4, 4)), ("stream", 2, (2, 2, 8)), ("stream", 1, (1, 1, 0)),
               ("skinny", 3, (16, 32, 2, 1)), ("skinny", 17, (16, 32, 4, 0)), ("skinny", 5, (32, 1024, 4, 0))]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("variant,m,cfg", GROUP_CASES)
def test_weight_group_one_launch_matches_float64(dtype, tol, variant, m, cfg, monkeypatch):
    k = 96
    launches = []
    entry = kernels.FUSED_VARIANTS[variant]

    def counted(*args):
        launches.append(len(args[3]))  # the weights of the launch
        entry.launch(*args)

    monkeypatch.setitem(kernels.FUSED_VARIANTS, variant, kernels.FusedVariant(entry.configs, counted, entry.rows))
    for ns, bias in (([40, 9, 9], True), ([33, 20], False), ([5, 3, 7, 12], False)):
        x, r, g, ws, _ = make(m, k, ns, dtype, seed=7 * m + len(ns))
        bs = [(0.1 * torch.randn(n, generator=torch.Generator().manual_seed(n))).to(DEV, dtype) if bias else None
              for n in ns]
        launches.clear()
        ys, h = kernels.rms_norm_linear(x, g, ws, bs, 1e-6, residual2d=r, variant=variant, config=cfg)
        ref, _ = ref64(x, g, ws, bs, 1e-6, r)
        assert torch.equal(h, x + r)  # NaN-poisoned before: written once, by the first launch
        assert launches == [len(grp) for grp in kernels.split_groups(ns, [bias] * len(ns))], launches
        for y, yr in zip(ys, ref):
            assert y.shape == yr.shape and not torch.isnan(y).any(), (ns, cfg)
            assert rel_err(y, yr) < tol, (ns, cfg, rel_err(y, yr))
    # mixed biases break the group: one launch per run of equal bias presence
    x, r, g, ws, bs = make(m, k, [16, 8, 8], dtype, seed=1)  # bias on 0 and 2 only
    launches.clear()
    ys, _ = kernels.rms_norm_linear(x, g, ws, bs, 1e-6, variant=variant, config=cfg)
    assert launches == [1, 1, 1]
    for y, yr in zip(ys, ref64(x, g, ws, bs, 1e-6)[0]):
        assert rel_err(y, yr) < tol


def test_split_groups():
    assert kernels.split_groups([8, 2, 2], [False] * 3) == [[0, 1, 2]]
    assert kernels.split_groups([8, 2, 2, 4, 4], [True] * 5) == [[0, 1, 2], [3, 4]]  # at most MAX_GROUP = 3
    assert kernels.split_groups([8, 2, 2], [True, False, False]) == [[0], [1, 2]]
    assert kernels.split_groups([], []) == []
    with pytest.raises(ValueError, match="bias flags"):
        kernels.split_groups([8, 2], [True])
    x, r, g, ws, bs = make(2, 32, [8, 8], torch.float32)
    with pytest.raises(ValueError, match="all have a bias or all have none"):
        kernels.fused_linears(x, g, ws, bs, 1e-6, variant="stream")  # bias on the first only
    with pytest.raises(ValueError, match="1 to 3 weights"):
        kernels.fused_linears(x, g, ws * 2, [None] * 4, 1e-6, variant="stream")
    with pytest.raises(ValueError, match="share one dtype"):
        kernels.fused_linears(x, g, [ws[0], ws[1].half()], [None, None], 1e-6, variant="stream")
    # the op's kinds: (bias?, weight dtype, bias dtype); a dtype change breaks the run
    assert kernels.split_groups([8, 8, 8], [(False, torch.float16, None), (False, torch.float32, None),
                                            (False, torch.float32, None)]) == [[0], [1, 2]]
    ys, _ = kernels.rms_norm_linear(x, g, [ws[0], ws[1].double()], [None, None], 1e-6, variant="stream")
    assert [y.shape for y in ys] == [(2, 8), (2, 8)]  # two launches instead of a refused group


@pytest.mark.parametrize("variant, m, cfg", [("stream", 1, (4, 4, 4)), ("skinny", 3, (16, 32, 2, 1))])
def test_residual_output_written_when_the_first_group_has_no_rows(variant, m, cfg):
    """h = x + r comes from the first fused launch that runs: a leading group of empty weights ([0, K]) launches
    nothing, so a later group (or the op itself) writes it; the outputs are NaN-poisoned before."""
    x, r, g, _, _ = make(m, 32, [], torch.float32)
    empty = torch.zeros(0, 32, device=DEV)
    w = torch.randn(8, 32, device=DEV) / 32 ** 0.5
    b = torch.randn(8, device=DEV)
    for weights, biases in (([empty, w], [None, b]), ([empty, empty, empty, w], [None] * 4), ([empty], [None])):
        ys, h = kernels.rms_norm_linear(x, g, weights, biases, 1e-6, residual2d=r, variant=variant, config=cfg)
        assert torch.equal(h, x + r), len(weights)
        ref, _ = ref64(x, g, weights, biases, 1e-6, r)
        assert [tuple(y.shape) for y in ys] == [tuple(y.shape) for y in ref]
        assert all(rel_err(y, yr) < 1e-5 for y, yr in zip(ys, ref) if y.numel())


def test_host_launch_arithmetic_equals_triton():
    import triton

    from fusion_pass.launch import cdiv, next_power_of_2
    for n in list(range(-3, 3000)) + [2**31 - 1, 2**31, 2**40 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    with pytest.raises(TypeError):
        next_power_of_2(2.5)


def test_skinny_variant_rejects_bad_shapes():
    x, r, g, ws, bs = make(33, 32, [16], torch.float32)
    with pytest.raises(ValueError, match="skinny"):
        kernels.fused_linear(x, g, ws[0], None, 1e-6, variant="skinny", config=(16, 256, 4))  # M > SKINNY_MAX_M
    with pytest.raises(ValueError, match="skinny"):
        kernels.fused_linear(x[:4], g, ws[0], None, 1e-6, variant="skinny", config=(8, 256, 4))  # BN < 16
    with pytest.raises(ValueError, match="skinny"):
        kernels.fused_linear(x[:4], g, ws[0], None, 1e-6, variant="skinny", config=(16, 24, 4))  # KS not 2^n
    with pytest.raises(ValueError, match="no configuration"):
        kernels.fused_linear(x[:1], g, ws[0], None, 1e-6, variant="skinny")  # M = 1: not in its range
    with pytest.raises(ValueError, match=r"\(BN, KS, num_warps\[, fixup\]\)"):
        kernels.fused_linear(x[:4], g, ws[0], None, 1e-6, variant="skinny", config=(16, 256))
    with pytest.raises(ValueError, match="shared memory"):
        kernels.fused_linear(x[:4], g, ws[0], None, 1e-6, variant="skinny", config=(4096, 256, 4))
    with pytest.raises(ValueError, match="K = 0"):
        kernels.fused_linear(x[:4, :0], g[:0], ws[0][:, :0], None, 1e-6, variant="skinny", config=(16, 256, 4))


def triton_next_pow2(v: int) -> int:
    return 1 << (int(v) - 1).bit_length()


def test_triton_norm_kernel_weight_in_fp32_form():
    x, r, g, ws, bs = make(4, 40, [8], torch.float16)
    a, h = kernels.triton_rms_norm(x, g, 1e-5, r, weight_in_fp32=True)
    ref = kernels.reference_rms_norm(x + r, g, 1e-5, weight_in_fp32=True)
    assert torch.equal(h, x + r)
    assert rel_err(a, ref) <= 1e-3
    a, _ = kernels.triton_rms_norm(x, g, 1e-5)
    assert rel_err(a, kernels.reference_rms_norm(x, g, 1e-5)) <= 1e-3


def test_dispatch_helpers():
    assert [kernels.m_bucket(m) for m in (0, 1, 2, 3, 16, 17, 8192)] == [1, 1, 2, 4, 16, 32, 8192]
    assert kernels.candidates(1)[0] == ("unfused", ())
    assert kernels.candidates(64) == [("unfused", ())]  # beyond every fused variant: nothing to measure
    assert kernels.measure(64, 8, 16, torch.float32, "cpu").variant == "unfused"
    # stream: M = 1-2 only
    assert kernels.stream_configs(3) == [] and kernels.stream_configs(1) and kernels.stream_configs(2)
    assert [c for v, c in kernels.candidates(1) if v == "stream"] == kernels.stream_configs(1)
    # skinny: M = 2..SKINNY_MAX_M only
    assert kernels.skinny_configs(1) == [] and kernels.skinny_configs(kernels.SKINNY_MAX_M + 1) == []
    for m in (2, 3, 16, 17, kernels.SKINNY_MAX_M):
        assert [c for v, c in kernels.candidates(m) if v == "skinny"] == kernels.skinny_configs(m) != []
    # the CPU path never measures: "auto" on CPU is the reference
    x, r, g, ws, bs = make(2, 16, [8], torch.float32)
    ys, _ = kernels.rms_norm_linear(x, g, ws, bs, 1e-6)
    assert rel_err(ys[0], ref64(x, g, ws, bs, 1e-6)[0][0]) <= 1e-5
    with pytest.raises(ValueError):
        kernels.rms_norm_linear(x, g, ws, bs, 1e-6, variant="nope")
    with pytest.raises(ValueError, match="unknown fused variant"):
        kernels.fused_linear(torch.zeros(2, 16), g, ws[0], None, 1e-6, variant="gemv")
    with pytest.raises(ValueError, match="no configuration"):
        kernels.fused_linear(torch.zeros(20, 16), g, ws[0], None, 1e-6, variant="stream")


def test_forced_variant_setting():
    """The ``variant`` setting forces one path: a fused variant inside its range of M with its first config, the
    unfused path outside it; bad values raise before anything changes."""
    previous = configure_kernels(variant="stream")
    try:
        dev = torch.device("cpu")
        assert kernels.choose(1, 64, 32, torch.bfloat16, dev) == kernels.Choice("stream", kernels.stream_configs(1)[0],
                                                                                  "forced")
        assert kernels.choose(8, 64, 32, torch.bfloat16, dev) == kernels.Choice("unfused", (), "forced")
        configure_kernels(variant="unfused")
        assert kernels.choose(1, 64, 32, torch.bfloat16, dev).variant == "unfused"
    finally:
        configure_kernels(**previous.as_dict())
    for bad, err in ((dict(variant="gemm"), ValueError), (dict(pdl=1), TypeError), (dict(autotune="no"), TypeError),
                     (dict(tuning_file=""), ValueError), (dict(tuning_file=3), TypeError), (dict(nope=True), TypeError)):
        with pytest.raises(err):
            configure_kernels(**bad)
    assert configure_kernels() == previous


@pytest.mark.parametrize("failure", ["raises", "no_candidate"])
def test_failed_measurement_is_cached_not_retried(failure, monkeypatch):
    """A measurement that raises (e.g. out of memory beside the KV cache) or in which no candidate ran falls back to
    the unfused path once; later calls with the same key reuse that decision instead of measuring again (which
    would cost milliseconds of host time on every forward)."""
    calls = []

    def fake_measure(m, n, k, dtype, device, widths=None):  # noqa: ANN001, ANN202
        calls.append((m, n, k))
        if failure == "raises":
            raise RuntimeError("CUDA out of memory")
        return kernels.Choice("unfused", (), "default")

    monkeypatch.setattr(dispatch, "measure", fake_measure)
    monkeypatch.setattr(dispatch.torch.cuda, "is_current_stream_capturing", lambda: False)
    kernels.clear_dispatch_cache()
    try:
        for _ in range(3):
            c = kernels.choose(5, 64, 32, torch.bfloat16, torch.device("cpu"))
            assert (c.variant, c.source) == ("unfused", "failed")
        assert calls == [(5, 64, 32)]
        assert kernels.choose(9, 64, 32, torch.bfloat16, torch.device("cpu")).source == "failed"  # another bucket
        assert len(calls) == 2
    finally:
        kernels.clear_dispatch_cache()


def _fastest_run(compile_ahead: Optional[bool], capturing: bool = False
                 ) -> tuple[kernels.Choice, list[tuple[int, str, int]], list[str], bool]:
    """:func:`dispatch.fastest` over fake candidates on the CPU: fn(i) records (i, variant, thread) and returns its
    variant ("bad" raises); the fake timer calls fn(1) and returns the variant's time. Returns the choice, the
    calls, the names reported to on_error and whether the first calls' barrier broke (they did not all overlap)."""
    calls: list[tuple[int, str, int]] = []
    errors: list[str] = []
    barrier = threading.Barrier(3, timeout=10)  # the three good candidates' first calls, all at once
    us = {"a": 3.0, "b": 1.0, "c": 2.0, "bad": 0.5}

    def call(variant: str, cfg: tuple[int, ...]) -> Callable[[int], object]:
        def fn(i: int) -> str:
            calls.append((i, variant, threading.get_ident()))
            if variant == "bad":
                raise RuntimeError("out of shared memory")
            if i == 0:
                barrier.wait()
            return variant
        return fn

    def timer(fn: Callable[[int], object], reps: int) -> float:
        return us[str(fn(1))]

    cands = [("a", ()), ("bad", ()), ("b", ()), ("c", (4, 2))]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "cpu_count", lambda: 8)
        mp.setattr(torch.cuda, "is_available", lambda: capturing)  # no CUDA: no device, streams nor sync
        mp.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        choice = dispatch.fastest(cands, call, 10, kernels.Choice("unfused"), lambda name, e: errors.append(name),
                                  timer=timer, compile_ahead=compile_ahead)
    return choice, calls, errors, barrier.broken


def test_fastest_runs_the_first_calls_concurrently_before_timing():
    """compile_ahead=True: every candidate's fn(0) runs first, concurrently, in worker threads; then the serial
    timing, which reports a candidate failing there too once and picks the fastest. compile_ahead=False, or None
    without CUDA, or during a CUDA-graph capture: no call ahead."""
    best = kernels.Choice("b", (), "measured", (("a", 3.0), ("b", 1.0), ("c[4,2]", 2.0)))
    choice, calls, errors, broken = _fastest_run(True)
    assert (choice, errors, broken) == (best, ["bad"], False)
    first_timed = next(n for n, c in enumerate(calls) if c[0] == 1)
    assert sorted(v for i, v, _ in calls[:first_timed]) == ["a", "b", "bad", "c"]
    assert all(i == 0 for i, _, _ in calls[:first_timed]) and all(i == 1 for i, _, _ in calls[first_timed:])
    ahead_threads = {t for _, _, t in calls[:first_timed]}
    assert len(ahead_threads) > 1 and threading.get_ident() not in ahead_threads
    assert {t for _, _, t in calls[first_timed:]} == {threading.get_ident()}  # the timing: serial, in the caller
    for compile_ahead, capturing in ((False, False), (None, False), (True, True)):
        choice, calls, errors, _ = _fastest_run(compile_ahead, capturing)
        assert (choice, errors) == (best, ["bad"]) and [i for i, _, _ in calls] == [1] * 4


def test_tuning_roundtrip(tmp_path):
    """A tuning file holds each GPU's decisions by name; only the running GPU's are used (here the CPU's)."""
    kernels.clear_dispatch_cache()
    try:
        path = tmp_path / "tune.json"
        path.write_text('[{"gpu": "cpu", "op": "rms_norm_linear", "m_bucket": 4, "n": 8, "k": 16, "dtype": "bfloat16", "variant": "skinny",'
                        ' "config": [64, 256, 4, 1]},'
                        ' {"gpu": "NVIDIA H200", "op": "rms_norm_linear", "m_bucket": 1, "n": 8, "k": 16, "dtype": "bfloat16",'
                        ' "variant": "stream", "config": [4, 4, 4]}]')
        assert kernels.load_tuning(str(path)) == 2
        table = kernels.dispatch_table()
        assert table["cpu/rms_norm_linear/M=4,N=8,K=16,bfloat16"]["variant"] == "skinny"
        cpu = torch.device("cpu")
        assert kernels.choose(3, 8, 16, torch.bfloat16, cpu) == kernels.Choice("skinny", (64, 256, 4, 1), "loaded")
        assert kernels.choose(1, 8, 16, torch.bfloat16, cpu).source == "failed"  # the H200's row is not the CPU's
        kernels.save_tuning(str(tmp_path / "out.json"))
        assert "NVIDIA H200" in (tmp_path / "out.json").read_text()
        (tmp_path / "old.json").write_text('[{"m_bucket": 4, "n": 8, "k": 16, "dtype": "bfloat16", '
                                           '"variant": "skinny", "config": [64, 256, 4, 1]}]')
        with pytest.raises(ValueError, match="gpu"):
            kernels.load_tuning(str(tmp_path / "old.json"))
    finally:
        kernels.clear_dispatch_cache()


def test_skinny_fixup_counters_reset_and_fallback(monkeypatch):
    """A count left behind (e.g. a launch that died mid-kernel) makes the fixup finish a tile early: the output is
    wrong until reset_fixup_counters() zeroes the buffer. More n-tiles than counters falls back to the epilogue
    kernel (same result, counters untouched). Bad fixup / num_warps values are refused."""
    x, r, g, ws, bs = make(5, 64, [40], torch.float32, seed=11)
    cfg = (16, 16, 2, 1)  # 3 n-tiles, 4 splits
    ref = kernels.fused_linear(x, g, ws[0], bs[0], 1e-6, residual2d=r, variant="skinny", config=cfg[:3] + (0,))
    counters = kernels.fixup_counters(x.device, 0)
    counters[0] = 1  # a stray arrival on tile 0
    bad = kernels.fused_linear(x, g, ws[0], bs[0], 1e-6, residual2d=r, variant="skinny", config=cfg)
    assert not torch.equal(bad[:, :16], ref[:, :16])  # tile 0 summed before its last partial arrived
    assert torch.equal(bad[:, 16:], ref[:, 16:])
    kernels.reset_fixup_counters()
    assert int(counters.count_nonzero()) == 0
    y = kernels.fused_linear(x, g, ws[0], bs[0], 1e-6, residual2d=r, variant="skinny", config=cfg)
    assert torch.equal(y, ref) and int(counters.count_nonzero()) == 0
    monkeypatch.setitem(fk_skinny._FIXUP_BUFFERS, str(x.device), torch.zeros(2, dtype=torch.int32))  # < 3 tiles
    assert kernels.fixup_counters(x.device, 3) is None
    y = kernels.fused_linear(x, g, ws[0], bs[0], 1e-6, residual2d=r, variant="skinny", config=cfg)
    assert torch.equal(y, ref) and int(fk_skinny._FIXUP_BUFFERS[str(x.device)].count_nonzero()) == 0
    for bad_cfg, match in (((16, 16, 2, 2), "fixup"), ((16, 16, 3, 1), "num_warps")):
        with pytest.raises(ValueError, match=match):
            kernels.fused_linear(x, g, ws[0], None, 1e-6, variant="skinny", config=bad_cfg)
