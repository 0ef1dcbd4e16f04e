"""Tests of the small-M GEMV (nanovllm/kernels/gemv/) and the op torch.ops.nanovllm.linear_small_m
(nanovllm/layers/gemv_op.py): Triton kernel in the interpreter vs a float64 reference, NaN-poisoned outputs,
the K loop, argument errors, the op's PyTorch path, its fake implementation under torch.compile, the row-parallel
layer on the CPU, and an ahead-of-time sm_90 compile of every config (no register spills at the Qwen3 shapes).

Relative errors ``||out - ref|| / ||ref||``: fp32 < 1e-5, fp16 < 1e-2.
"""
from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py does it too)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import run_aot_script  # noqa: E402
from fusion_pass import kernels as fusion_kernels  # noqa: E402
from fusion_pass.settings import configure_kernels  # noqa: E402
from nanovllm.kernels import gemv as G  # noqa: E402
from nanovllm.layers import gemv_op  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN in ``out`` gives NaN, which fails every ``<`` check)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_case(m: int, n: int, k: int, act: str, dtype: torch.dtype, bias: bool, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x ``[m, k or 2k]``, W ``[n, k]`` (scaled by k^-1/2, so outputs are O(1)) and bias ``[n]`` or None."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if act == "silu_mul" else k, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    return x, w, b


def ref64(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str) -> torch.Tensor:
    """The float64 reference of the same (already rounded) inputs."""
    return G.gemv_ref(x.double().cpu(), w.double().cpu(), None if b is None else b.double().cpu(), act)


def nan_out(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)


# Every (M, K) pair runs four (act, dtype, bias) combinations, so each act meets each dtype and bias setting.
COMBOS = [("none", torch.float32, True), ("silu_mul", torch.float16, False),
          ("none", torch.float16, False), ("silu_mul", torch.float32, True)]


@pytest.mark.parametrize("k", [64, 1000, 3072])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
def test_gemv_matches_float64_reference(m: int, k: int) -> None:
    n = 13  # not a multiple of 4 or 8 rows per program: the last program is partly masked
    for act, dtype, bias in COMBOS:
        x, w, b = make_case(m, n, k, act, dtype, bias, zlib.crc32(repr((m, k, act, dtype)).encode()))
        out = G.gemv(x, w, b, act, force_triton=True, out=nan_out(m, n, dtype))
        assert out.shape == (m, n) and out.dtype == dtype
        err = rel_err(out, ref64(x, w, b, act))
        assert err < TOL[dtype], (m, k, act, dtype, bias, err)


@pytest.mark.parametrize("m,k,n,cfg", [
    (3, 3072, 13, G.GemvConfig(4, 1024, 4)),   # 3 full K tiles
    (7, 1000, 21, G.GemvConfig(8, 256, 4)),    # 4 tiles, the last one partial; 8 rows per program
    (1, 1000, 5, G.GemvConfig(4, 128, 8)),     # 8 tiles, N < rows per program
    (16, 300, 9, G.GemvConfig(8, 64, 4)),      # M = MAX_M
])
def test_gemv_k_loop(m: int, k: int, n: int, cfg: G.GemvConfig) -> None:
    """K longer than one tile: the loop with register double buffering (forced small block_k)."""
    assert cfg.block_k < k
    for act, dtype, bias in COMBOS[:2]:
        x, w, b = make_case(m, n, k, act, dtype, bias, zlib.crc32(repr((m, k, n, act)).encode()))
        out = G.gemv_triton(x, w, b, act, out=nan_out(m, n, dtype), config=cfg)
        assert rel_err(out, ref64(x, w, b, act)) < TOL[dtype], (m, k, n, act, cfg)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(100) = inf: intended
def test_gemv_row_stride_and_extreme_gates() -> None:
    """x with a row stride larger than its width (a column slice), and gates of +-100 (silu saturates, no NaN)."""
    m, n, k = 3, 6, 40
    big = torch.randn(m, 2 * k + 24, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    big[:, :k] *= 100.0
    x = big[:, : 2 * k]
    assert x.stride(0) == 2 * k + 24
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    out = G.gemv_triton(x, w, None, "silu_mul", out=nan_out(m, n, torch.float32))
    assert rel_err(out, ref64(x, w, None, "silu_mul")) < 1e-5


def test_choose_config_rule() -> None:
    """The rule's picks for the Qwen3-0.6B sites, and its invariants over many shapes."""
    assert G.choose_config(1, 1024, 2048) == (4, 2048, 8)   # o_proj: the whole row in one load
    assert G.choose_config(4, 1024, 2048) == (8, 2048, 8)
    assert G.choose_config(1, 1024, 3072) == (4, 4096, 8)   # down_proj: one tile (3072 of 4096 columns live)
    assert G.choose_config(16, 1024, 3072) == (4, 4096, 8)  # 8 rows would not fit one tile
    assert G.choose_config(1, 4096, 1024) == (4, 1024, 4)   # qkv: the fused GEMV's measured best
    assert G.choose_config(3, 4096, 1024) == (8, 1024, 4)
    assert G.choose_config(2, 1024, 9728) == (4, 2048, 8)   # K loop: half-size tiles, two in flight
    for m in range(1, G.MAX_M + 1):
        for k in (1, 64, 1000, 1024, 2048, 3072, 4096, 5000, 12288):
            cfg = G.choose_config(m, 1000, k)
            assert (cfg.block_n, cfg.num_warps) in G.CONFIG_CHOICES
            assert cfg.block_k & (cfg.block_k - 1) == 0
            assert cfg.block_n * cfg.block_k <= G.ELEMS_PER_THREAD * 32 * cfg.num_warps
            assert (cfg.block_k >= k) == (k <= 4096)


def test_gemv_errors_and_empty() -> None:
    x = torch.zeros(2, 8)
    w = torch.zeros(3, 8)
    cases = [
        lambda: G.gemv_triton(x, w, None, "gelu"),                                # unknown act
        lambda: G.gemv_triton(x, w, None, "silu_mul"),                            # x must be [M, 2K]
        lambda: G.gemv_triton(x[0], w),                                           # x not 2-D
        lambda: G.gemv_triton(torch.zeros(2, 7), w),                              # K mismatch
        lambda: G.gemv_triton(x, w, torch.zeros(4)),                              # bias shape
        lambda: G.gemv_triton(x.double(), w.double()),                            # unsupported dtype
        lambda: G.gemv_triton(x, w.half()),                                       # mixed dtypes
        lambda: G.gemv_triton(torch.zeros(G.MAX_M + 1, 8), w),                    # too many rows
        lambda: G.gemv_triton(x, torch.zeros(8, 3).t()),                          # non-contiguous weight
        lambda: G.gemv_triton(torch.zeros(8, 2).t(), w),                          # x columns strided
        lambda: G.gemv_triton(x, w, out=torch.zeros(2, 4)),                       # bad out
        lambda: G.gemv_triton(torch.zeros(2, 0), torch.zeros(3, 0)),              # K = 0
        lambda: G.gemv_ref(x, w, None, "silu_mul"),
        lambda: G.apply_act(torch.zeros(2, 7), "silu_mul"),
    ]
    for i, call in enumerate(cases):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} did not raise")
    assert G.gemv_triton(torch.zeros(0, 8), w).shape == (0, 3)


# --------------------------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("act", ["none", "silu_mul"])
def test_op_torch_path_equals_reference(act: str) -> None:
    """On the CPU the op is the PyTorch path: bitwise F.linear(apply_act(x)), and within fp32 rounding of the
    float64 reference; bias optional; the Triton path is never taken."""
    for m, bias in ((1, False), (3, True), (40, False)):
        x, w, b = make_case(m, 24, 48, act, torch.float32, bias, m)
        x, w, b = x.cpu(), w.cpu(), None if b is None else b.cpu()
        assert G.choose_path(x, w, b, act) == ("torch", None)
        y = torch.ops.nanovllm.linear_small_m(x, w, b, act)
        assert torch.equal(y, F.linear(G.apply_act(x, act), w, b))
        assert rel_err(y, ref64(x, w, b, act)) < 1e-5
    if act == "silu_mul":  # the same ops as the model's former SiluAndMul module
        from nanovllm.layers.activation import SiluAndMul

        assert torch.equal(G.apply_act(x, act), SiluAndMul()(x))


def test_op_dispatch_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """choose_path: the table of the GPU by name (the H200 has one; another GPU, the H100 included, none: cuBLAS until
    measured on itself); in a table,
    the GEMV up to gemv_max_m, the skinny kernel (fp16 / bf16) up to skinny_max_m with the table's launch shape,
    F.linear elsewhere and on the CPU. Bad tables are refused."""
    h200 = G.TABLES["H200"]
    assert "H100" not in G.TABLES and (h200.gemv_max_m, h200.skinny_max_m) == (2, 32)
    assert h200.skinny_config(8, "silu_mul") == G.SkinnyConfig(128, 256, 8, True)
    assert h200.skinny_config(17, "silu_mul") == G.SkinnyConfig(64, 256, 4, True)
    assert h200.skinny_config(16, "none") == G.SKINNY_DEFAULT and h200.skinny_config(32, "none").block_n == 64
    with pytest.raises(ValueError, match="gemv_max_m"):
        G.SmallMTable(G.MAX_M + 1, 32, ())
    with pytest.raises(ValueError, match="skinny_max_m"):
        G.SmallMTable(2, G.SKINNY_MAX_M + 1, ())
    w = torch.zeros(3, 8)
    assert G.choose_path(torch.zeros(1, 8), w, None, "none") == ("torch", None)  # CPU

    class FakeCuda:  # a CUDA tensor's attributes, without a GPU
        def __init__(self, m: int, dtype: torch.dtype, device: str) -> None:
            self.is_cuda, self.shape, self.dtype, self.device = True, (m, 8), dtype, torch.device(device)

    G.table_for.cache_clear()
    names = {"cuda:0": "NVIDIA H200", "cuda:1": "NVIDIA A100"}
    monkeypatch.setattr(G.dispatch, "device_name", lambda d: names[str(d)])
    monkeypatch.setattr(fusion_kernels.dispatch, "device_name", lambda d: names[str(d)])
    try:
        bf = torch.bfloat16
        for m, dtype, want in ((1, bf, "gemv"), (2, torch.float32, "gemv"), (3, bf, "skinny"), (32, bf, "skinny"),
                               (33, bf, "torch"), (3, torch.float32, "torch"), (0, bf, "torch")):
            path, cfg = G.choose_path(FakeCuda(m, dtype, "cuda:0"), w.to(dtype), None, "none")  # type: ignore[arg-type]
            assert path == want and (cfg == h200.skinny_config(m, "none") if want == "skinny" else cfg is None)
        assert G.choose_path(FakeCuda(1, bf, "cuda:0"), w, None, "none") == ("torch", None)  # type: ignore  # mixed
        # a GPU without a table: cuBLAS until measured (never while capturing, nor with autotune off); then the
        # measured choice, cached per GPU name, op and shape by the coconut op's dispatcher
        previous = configure_kernels(autotune=False)
        assert G.choose_path(FakeCuda(3, bf, "cuda:1"), w.to(bf), None, "none") == ("torch", None)  # type: ignore
        configure_kernels(autotune=True)
        calls = []

        def fake_measure(m, n, k, dtype, device, act):  # noqa: ANN001, ANN202
            calls.append((m, n, k, act))
            return fusion_kernels.Choice("skinny", (64, 256, 4, True), "measured")

        monkeypatch.setattr(G.dispatch, "measure", fake_measure)
        monkeypatch.setattr(fusion_kernels.dispatch.torch.cuda, "is_current_stream_capturing", lambda: False)
        for _ in range(2):
            path, cfg = G.choose_path(FakeCuda(3, bf, "cuda:1"), w.to(bf), None, "silu_mul")  # type: ignore
            assert (path, cfg) == ("skinny", G.SkinnyConfig(64, 256, 4, True))
        assert calls == [(3, 3, 8, "silu_mul")]  # measured once
        assert "NVIDIA A100/linear_small_m:silu_mul/M=4,N=3,K=8,bfloat16" in fusion_kernels.dispatch_table()
        assert G.choose_path(FakeCuda(33, bf, "cuda:1"), w.to(bf), None, "none") == ("torch", None)  # type: ignore
        assert [p for p, _ in G.dispatch.candidates(4, torch.bfloat16)] == ["torch", "gemv"] + ["skinny"] * 4
        assert [p for p, _ in G.dispatch.candidates(17, torch.float32)] == ["torch"]
    finally:
        G.table_for.cache_clear()
        fusion_kernels.clear_dispatch_cache()
        if "previous" in locals():
            configure_kernels(**previous.as_dict())


def test_op_skinny_path_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The skinny path of the op (its choice forced: the interpreter stands in for the GPU) equals the float64
    reference, for both activations, with the launch shape the table chose."""
    table = G.TABLES["H200"]
    monkeypatch.setattr(gemv_op, "choose_path", lambda x, w, b, act: ("skinny", table.skinny_config(x.shape[0], act)))
    calls = []
    real = gemv_op.gemv_skinny_triton
    monkeypatch.setattr(gemv_op, "gemv_skinny_triton", lambda *a, **kw: calls.append(kw["config"]) or real(*a, **kw))
    for act in G.ACTS:
        x, w, b = make_case(9, 24, 40, act, torch.float32, True, 3)
        y = gemv_op.linear_small_m(x, w, b, act)
        assert rel_err(y, ref64(x, w, b, act)) < 1e-5
    assert calls == [table.skinny_config(9, act) for act in G.ACTS]


def test_op_traces_with_symbolic_m() -> None:
    """fullgraph=True, dynamic=True: the fake implementation propagates a symbolic M; one graph serves all M."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")

    def f(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.nanovllm.linear_small_m(h * 2.0, w, None, "silu_mul") + 1.0

    fc = torch.compile(f, backend=cnt, fullgraph=True, dynamic=True)
    w = torch.randn(5, 16)
    for m in (3, 7, 12):
        h = torch.randn(m, 32)
        assert torch.allclose(fc(h, w), f(h, w), rtol=1e-6, atol=1e-6)
    assert cnt.frame_count == 1
    torch._dynamo.reset()


def test_row_parallel_layer_on_cpu_is_the_plain_path() -> None:
    """RowParallelLinear(input_act="silu_mul") on the CPU = the former SiluAndMul module + F.linear, bitwise."""
    from nanovllm.layers.activation import SiluAndMul
    from nanovllm.layers.linear import RowParallelLinear

    layer = RowParallelLinear(16, 8, bias=True, input_act="silu_mul")
    gen = torch.Generator().manual_seed(3)
    layer.weight.data.copy_(torch.randn(8, 16, generator=gen))
    layer.bias.data.copy_(torch.randn(8, generator=gen))
    x = torch.randn(5, 32, generator=gen)
    assert torch.equal(layer(x), F.linear(SiluAndMul()(x), layer.weight) + layer.bias)
    with pytest.raises(ValueError):
        RowParallelLinear(16, 8, input_act="gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_silu_mul_triton_matches_reference(dtype: torch.dtype) -> None:
    """The op's one-pass SwiGLU (large-M path on the GPU): float64 reference, K not a multiple of the block,
    rows strided inside a wider buffer, NaN never written."""
    gen = torch.Generator().manual_seed(5)
    k = 1500
    wide = (torch.randn(7, 2 * k + 8, generator=gen) * 4).to(dtype).to(DEVICE)
    x = wide[:, : 2 * k]  # row stride 2k + 8
    y = G.silu_mul_triton(x)
    x64 = x.double().cpu()
    ref = F.silu(x64[:, :k]) * x64[:, k:]
    assert y.shape == (7, k) and y.dtype == dtype and torch.isfinite(y).all()
    assert rel_err(y.double().cpu(), ref) < (1e-6 if dtype == torch.float32 else 1e-3)
    with pytest.raises(ValueError, match="silu_mul"):
        G.silu_mul_triton(torch.zeros(2, 5, dtype=dtype, device=DEVICE))
    assert G.silu_mul_triton(torch.zeros(0, 8, dtype=dtype, device=DEVICE)).shape == (0, 4)


# ---------------------------------------------------------------------------------------- split-K skinny kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 20, 48), (2, 40, 64), (5, 33, 100), (16, 17, 200), (17, 48, 96), (32, 24, 64)])
def test_skinny_matches_float64_reference(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    """M below, at and above 16 (BM = 16 / 32), K split into 1 to 7 chunks (with a ragged last one), N not a
    multiple of block_n, both activations, with and without bias; outputs NaN-poisoned before."""
    for act in G.ACTS:
        for bias in (False, True):
            x, w, b = make_case(m, n, k, act, dtype, bias, seed=m * 31 + k + bias)
            for cfg in (G.SKINNY_DEFAULT, G.SkinnyConfig(16, 32, 4), G.SkinnyConfig(32, 16, 2)):
                y = G.gemv_skinny_triton(x, w, b, act, out=nan_out(m, n, dtype), config=cfg)
                assert rel_err(y, ref64(x, w, b, act)) < TOL[dtype], (act, bias, cfg)
                # the in-kernel fixup sums the same partials in the same order as the reduction kernel
                yf = G.gemv_skinny_triton(x, w, b, act, out=nan_out(m, n, dtype), config=cfg._replace(fixup=True))
                assert torch.equal(yf, y), (act, bias, cfg)
    counters = fusion_kernels.skinny._FIXUP_BUFFERS.get(str(torch.device(DEVICE)))
    assert counters is not None and int(counters.count_nonzero()) == 0  # every tile's counter reset for the next launch


def test_skinny_errors_and_empty() -> None:
    x, w, _ = make_case(G.SKINNY_MAX_M + 1, 16, 32, "none", torch.float32, False, 0)
    with pytest.raises(ValueError, match="SKINNY_MAX_M"):
        G.gemv_skinny_triton(x, w)
    for bad in (G.SkinnyConfig(8, 32, 4), G.SkinnyConfig(16, 48, 4), G.SkinnyConfig(16, 8, 4)):
        with pytest.raises(ValueError, match="powers of two"):
            G.gemv_skinny_triton(x[:4], w, config=bad)
    for bad in (G.SkinnyConfig(16, 32, 3), G.SkinnyConfig(16, 32, 4, 2)):  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="num_warps"):
            G.gemv_skinny_triton(x[:4], w, config=bad)
    with pytest.raises(ValueError, match="shared memory"):  # K = 3072
        G.gemv_skinny_triton(*make_case(4, 16, 3072, "none", torch.float16, False, 0)[:2],
                             config=G.SkinnyConfig(64, 4096, 4))
    with pytest.raises(ValueError, match="x must be"):
        G.gemv_skinny_triton(x[:4], w, act="silu_mul")
    with pytest.raises(ValueError, match="share one dtype"):
        G.gemv_skinny_triton(x[:4], w.half())
    assert G.gemv_skinny_triton(x[:0], w).shape == (0, 16)


# ---------------------------------------------------------------------------------------- AOT compile for sm_90
# The rule's picks at bf16 for the Qwen3-0.6B shapes (and a K-loop shape), as a launch on an H200 specializes them
# (pointers, K and row strides divisible by 16): every (rows per program, num_warps) config of the rule is among
# them, and none may spill registers (ptxas -v).
_GEMV_AOT_SCRIPT = r"""
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nanovllm.kernels import gemv as G
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

def compile_one(act, bm, cfg, k):
    fn = G.rows._gemv_kernel
    consts = dict(ACT=act, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  ONE_TILE=cfg.block_k >= k)
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in consts:
            sig[n] = "constexpr"
            continue
        sig[n] = "*bf16" if n.endswith("_ptr") else "i32"
        if n.endswith("_ptr") or n in ("K", "stride_xm", "stride_ym"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps, "num_stages": 1})
    assert "cubin" in c.asm and "mma" not in c.asm["ptx"]
    assert re.search(r"ld\.global[\w:.]*\.v4\.b32", c.asm["ptx"]), "weight loads are not 16-byte vectors"
    return c

def spills(c):
    if not os.path.exists(PTXAS):
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    p = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    return int(re.search(r"(\d+) bytes spill stores", p.stderr).group(1))

seen = set()
for act, n, k in (("none", 1024, 2048), ("silu_mul", 1024, 3072), ("none", 4096, 1024), ("silu_mul", 1024, 9728)):
    for bm in ((16,) if k > 4096 else (1, 16)):
        cfg = G.choose_config(bm, n, k)
        s = spills(compile_one(act, bm, cfg, k))
        assert s == 0, (act, n, k, bm, cfg, s)
        seen.add((cfg.block_n, cfg.num_warps))
assert seen == set(G.CONFIG_CHOICES), seen  # every config of the rule is compiled at least once
for act, k in (("none", 2048), ("silu_mul", 3072)):  # the M = 1 row kernel at the Qwen3-0.6B shapes
    bn, warps = G.row_config(k)
    fn = G.rows._gemv_row_kernel
    consts = dict(K=k, ACT=act, HAS_BIAS=False, BLOCK_N=bn, BKP=triton.next_power_of_2(k), USE_PDL=act == "none")
    sig = {n: ("constexpr" if n in consts else "*bf16" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1,
                                                                  "launch_pdl": consts["USE_PDL"]})
    assert re.search(r"ld\.global[\w:.]*\.v4\.b32", c.asm["ptx"]), "weight loads are not 16-byte vectors"
    assert ("griddepcontrol.wait" in c.asm["ptx"]) == consts["USE_PDL"]
    assert spills(c) == 0, (act, k)
fn = G.skinny._gemv_skinny_kernel  # the split-K skinny kernel with the rule's configs at the Qwen3-0.6B shapes, M = 8 / 32
for act, k in (("none", 2048), ("silu_mul", 3072)):
    for m, fixup in ((8, False), (8, True), (32, False), (32, True)):
        cfg = G.TABLES["H200"].skinny_config(m, act)
        consts = dict(K=k, ACT=act, HAS_BIAS=False, SPLIT=True, IEEE=False, BM=max(16, m), BN=cfg.block_n,
                      KS=cfg.chunk_k, USE_PDL=True, FIXUP=fixup, S=triton.cdiv(k, cfg.chunk_k))
        sig = {n: ("constexpr" if n in consts else "*fp32" if n == "p_ptr" else "*i32" if n == "c_ptr"
                   else "*bf16" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n.endswith("_ptr") or n in ("N", "stride_xm", "stride_ym")}
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps, "num_stages": 1,
                                                                      "launch_pdl": True})
        assert "mma" in c.asm["ptx"] and "griddepcontrol.wait" in c.asm["ptx"]
        assert ("atom.global.gpu.acq_rel.add" in c.asm["ptx"]) == fixup  # the fixup's tile counter
        assert spills(c) == 0, (act, k, m, cfg, fixup)
fn = G.skinny._splitk_reduce_kernel
sig = {n: ("*fp32" if n == "p_ptr" else "*bf16" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
sig.update(S="constexpr", HAS_BIAS="constexpr", BLOCK="constexpr", USE_PDL="constexpr")
c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(S=8, HAS_BIAS=False, BLOCK=1024, USE_PDL=True)),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "launch_pdl": True})
assert "cubin" in c.asm
fn = G.common._silu_mul_kernel  # the op's one-pass SwiGLU for large M
sig = {n: ("*bf16" if n.endswith("_ptr") else "i32") for n in fn.arg_names if n != "BLOCK"}
sig["BLOCK"] = "constexpr"
c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK": 1024}),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
assert "cubin" in c.asm
print("AOT-OK")
"""


def test_gemv_kernel_compiles_for_sm90_ahead_of_time() -> None:
    """Compile the GEMV for Hopper without a GPU (a subprocess without TRITON_INTERPRET): catches GPU-only compile
    errors that the interpreter hides, checks 16-byte weight loads, and no register spills for the rule's picks."""
    run_aot_script(_GEMV_AOT_SCRIPT, timeout=600)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and the op's GEMV path need a GPU")
def test_bf16_and_op_on_gpu() -> None:
    for m in (1, 2, 4):
        for act, n, k in (("none", 1024, 2048), ("silu_mul", 1024, 3072)):
            x, w, _ = make_case(m, n, k, act, torch.bfloat16, False, m)
            assert (G.choose_path(x, w, None, act)[0] == "gemv") == (m <= G.table_for(x.device).gemv_max_m)
            y = torch.ops.nanovllm.linear_small_m(x, w, None, act)
            assert rel_err(y, ref64(x, w, None, act)) < 1e-2


def test_pdl_is_never_used_off_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when enabled, a CPU tensor (the Triton interpreter) gets no PDL launch option: the interpreter would
    take ``launch_pdl`` for a kernel argument."""
    from fusion_pass import launch
    from fusion_pass.settings import kernel_settings

    assert kernel_settings().pdl
    x = torch.zeros(1, 8)
    assert not launch.use_pdl(x) and launch.pdl_launch_options(x) == {}
    w = torch.randn(4, 8)
    assert torch.allclose(G.gemv(x + 1, w, force_triton=True), (x + 1) @ w.t(), atol=1e-5)


def test_m1_rows_longer_than_max_row_k_take_the_k_loop_kernel() -> None:
    """K > MAX_ROW_K at M = 1: the K-loop kernel (the row kernel's slab would exceed 128 weight elements per thread)."""
    k = G.MAX_ROW_K + 904
    x, w, b = make_case(1, 5, k, "silu_mul", torch.float32, True, 11)
    out = G.gemv(x, w, b, "silu_mul", force_triton=True, out=nan_out(1, 5, torch.float32))
    assert rel_err(out, ref64(x, w, b, "silu_mul")) < TOL[torch.float32]
