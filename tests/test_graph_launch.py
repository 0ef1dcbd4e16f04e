"""coconut.launch "graph": static decode sites written out as stream-kernel launches that Inductor makes
(fusion_pass/graph_launch.py).

On the CPU the lowered graph runs eagerly (the higher-order op's own kernel launches the stream kernel in the
Triton interpreter) and must equal the op it replaced; the admission rule and the refusals are checked on graphs
traced with make_fx. On a GPU, whole compiles: Inductor's generated code launches the stream kernel itself, and
the result matches a float64 reference.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import fusion_pass  # noqa: E402
from conftest import rel_err  # noqa: E402
from fusion_pass import graph_launch, patterns  # noqa: E402
from fusion_pass.kernels import Choice  # noqa: E402
from fusion_pass.options import CoconutOptionError, parse_options  # noqa: E402

# The lowered graphs run eagerly: in the Triton interpreter on a CPU machine, on the GPU where there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HERE = (DEVICE,)  # device_types under which the sites qualify
ELSEWHERE = ("cpu",) if DEVICE == "cuda" else ("cuda",)
K = 64


def deciding(variant: str, config: tuple[int, ...] = (4, 4, 0), source: str = "measured"):  # noqa: ANN201
    """A stand-in for kernels.choose that returns one decision and records the shapes it was asked about."""
    asked: list[tuple] = []

    def decide(m, n, k, dtype, device, widths):  # noqa: ANN001, ANN202
        asked.append((m, n, k, tuple(widths)))
        return Choice(variant, config if variant == "stream" else (), source)

    decide.asked = asked  # type: ignore[attr-defined]
    return decide


def targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def launches(gm: torch.fx.GraphModule) -> int:
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional

    return sum(t is triton_kernel_wrapper_functional for t in targets(gm))


def op_inputs(widths: tuple[int, ...], bias: bool, rows: tuple[int, ...] = (1,), seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, K, generator=g)
    r = torch.randn(*rows, K, generator=g)
    nw = 1 + 0.1 * torch.randn(K, generator=g)
    ws = [torch.randn(n, K, generator=g) * K ** -0.5 for n in widths]
    bs = [torch.randn(n, generator=g) if bias else None for n in widths]
    return [t.to(DEVICE) if t is not None else None for t in (x, r, nw)] + [[w.to(DEVICE) for w in ws],
                                                                           [b if b is None else b.to(DEVICE) for b in bs]]


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("widths,bias,config", [((48, 16, 16), True, (4, 4, 0)), ((40, 40), False, (2, 2, 8)),
                                                 ((24,), False, (4, 2, 8)), ((8, 8, 8, 12), True, (4, 4, 4))])
@pytest.mark.parametrize("rows", [(1,), (1, 2)])
def test_lowered_op_equals_the_op(residual, widths, bias, config, rows):
    """Every weight group becomes one launch (q/k/v: one; four linears: groups of 3 + 1), h is written by the
    first, and the outputs equal the op's (its CPU path, the PyTorch reference) in float32, for M = 1 and 2 rows
    given as 2-D and as 3-D activations."""
    x, r, nw, ws, bs = op_inputs(widths, bias, rows)

    def f(x, r, nw, ws, bs):  # noqa: ANN001, ANN202
        if residual:
            out = torch.ops.coconut.add_rms_norm_linear(x, r, nw, ws, bs, 1e-6)
        else:
            out = torch.ops.coconut.rms_norm_linear(x, nw, ws, bs, 1e-6)
        return [o * 1 for o in out]  # uses of every output, as a graph has

    gm = make_fx(f, tracing_mode="fake")(x, r, nw, ws, bs)
    decide = deciding("stream", config)
    assert graph_launch.lower_graph(gm.graph, decide, HERE) == 1
    gm.recompile()
    groups = (len(widths) + 2) // 3
    assert launches(gm) == groups and fusion_pass.ops.add_rms_norm_linear not in targets(gm)
    m = rows[0] * (rows[1] if len(rows) > 1 else 1)
    assert [a[:2] for a in decide.asked] == [(m, sum(widths[i:i + 3])) for i in range(0, len(widths), 3)]
    got, ref = gm(x, r, nw, ws, bs), f(x, r, nw, ws, bs)
    assert len(got) == len(ref) == len(widths) + residual
    for a, b in zip(got, ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5, (a.shape, rel_err(a, b))


def fused_site(m: int = 1):  # noqa: ANN201
    """A traced residual add + RMSNorm -> two biased linears at M = m rows, and its inputs."""

    def f(x, r, g, w0, w1, b0, b1):  # noqa: ANN001, ANN202
        h = x + r
        a = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * g
        return F.linear(a, w0, b0), F.linear(a, w1, b1), h * 2

    gen = torch.Generator().manual_seed(1)
    args = (torch.randn(m, K, generator=gen), torch.randn(m, K, generator=gen), 1 + 0.1 * torch.randn(K, generator=gen),
            torch.randn(32, K, generator=gen), torch.randn(16, K, generator=gen), torch.randn(32, generator=gen),
            torch.randn(16, generator=gen))
    return f, tuple(a.to(DEVICE) for a in args)


@pytest.mark.parametrize("variant,source,fused,launched", [("stream", "measured", 1, 1), ("unfused", "measured", 0, 0),
                                                           ("skinny", "measured", 0, 0), ("skinny", "forced", 1, 0),
                                                           ("unfused", "forced", 1, 0)])
def test_admission_rule(variant, source, fused, launched):
    """Under "graph", a static site is fused only when its decision is the stream kernel (then launched by
    Inductor) or forced by the ``variant`` setting (then an op); a measured other path leaves the site to
    Inductor with its reason. The graph computes the same values either way."""
    f, args = fused_site()
    gm = make_fx(f, tracing_mode="fake")(*args)
    decide = deciding(variant, source=source)
    stats = patterns.rewrite_graph(gm.graph, graph_launch.site_admission(decide, HERE))
    assert (stats.sites, stats.candidates) == (fused, 1), stats
    if not fused:
        assert stats.skipped == [stats.skipped[0]] and "left to Inductor" in stats.skipped[0]
        assert stats.left_to_inductor == 1
        assert variant in stats.skipped[0]
    assert graph_launch.lower_graph(gm.graph, decide, HERE) == launched
    gm.recompile()
    assert launches(gm) == launched
    assert (torch.ops.coconut.add_rms_norm_linear.default in targets(gm)) == (fused and not launched)
    assert (torch.ops.aten.addmm.default in targets(gm)) == (not fused)
    for a, b in zip(gm(*args), f(*args)):
        assert rel_err(a, b) < 1e-5


def test_admission_leaves_other_devices_and_symbolic_rows_to_the_op():
    """Sites on a device outside device_types, or of symbolic M, are rewritten into ops without any decision."""
    f, args = fused_site(m=3)
    for device_types, mode in ((ELSEWHERE, "fake"), (HERE, "symbolic")):
        gm = make_fx(f, tracing_mode=mode)(*args)
        decide = deciding("unfused")
        stats = patterns.rewrite_graph(gm.graph, graph_launch.site_admission(decide, device_types))
        assert stats.sites == 1 and not decide.asked
        assert graph_launch.lower_graph(gm.graph, decide, device_types) == 0 and not decide.asked


def test_lowering_refuses_what_the_kernel_cannot_take():
    """Kept as an op: a non-contiguous activation, a tensor eps, a failing decision, another device."""
    x, r, nw, ws, bs = op_inputs((16, 8), True, (1,))

    def strided(x, r, nw, ws, bs):  # noqa: ANN001, ANN202
        xt = x.t().contiguous().t()  # [1, K] with strides (1, 1): contiguous; a column slice is not
        return torch.ops.coconut.rms_norm_linear(torch.cat([xt, xt], 1)[:, ::2], nw, ws, bs, 1e-6)

    def tensor_eps(x, r, nw, ws, bs):  # noqa: ANN001, ANN202
        return torch.ops.coconut.rms_norm_linear(x, nw, ws, bs, 1e-6, torch.tensor(1e-6))  # a 0-d CPU tensor

    def plain(x, r, nw, ws, bs):  # noqa: ANN001, ANN202
        return torch.ops.coconut.rms_norm_linear(x, nw, ws, bs, 1e-6)

    def failing(*a):  # noqa: ANN002, ANN202
        raise RuntimeError("out of memory")

    for fn, decide, devices in ((strided, deciding("stream"), HERE), (tensor_eps, deciding("stream"), HERE),
                                (plain, failing, HERE), (plain, deciding("stream"), ELSEWHERE)):
        gm = make_fx(fn, tracing_mode="fake")(x, r, nw, ws, bs)
        assert graph_launch.lower_graph(gm.graph, decide, devices) == 0, fn.__name__
        assert torch.ops.coconut.rms_norm_linear.default in targets(gm)


def test_launch_option():
    """coconut.launch: validated like the other options; "auto" means "op" under CUDA graphs, else "graph"; the
    pass's cache key differs per resolved mode (a cached graph of one mode never serves the other)."""
    assert parse_options(None, {"coconut.launch": "graph"})[1].launch == "graph"
    assert parse_options(None, {})[1].launch == "auto"
    for bad in ("inductor", 1):
        with pytest.raises(CoconutOptionError, match="coconut.launch"):
            parse_options(None, {"coconut.launch": bad})
    assert graph_launch.resolve_launch("auto", cudagraphs=True) == "op"
    assert graph_launch.resolve_launch("auto", cudagraphs=False) == "graph"
    assert graph_launch.resolve_launch("op", cudagraphs=False) == "op"
    with pytest.raises(ValueError, match="coconut.launch"):
        graph_launch.resolve_launch("fast", cudagraphs=False)
    op_pass, graph_pass = fusion_pass.CoconutFusionPass(launch="op"), fusion_pass.CoconutFusionPass(launch="graph")
    assert op_pass.uuid() != graph_pass.uuid() and op_pass.uuid().startswith("coconut-")


def test_engine_asks_for_ops():
    """The engine replays its own CUDA graphs, so its backend keeps every site an op (PDL launches)."""
    from nanovllm.engine.compilation import engine_coconut_backend

    assert engine_coconut_backend() is engine_coconut_backend()
    seen: dict = {}

    def spy(gm, example_inputs, patches, settings):  # noqa: ANN001, ANN202
        seen["launch"] = settings.launch
        return gm

    import fusion_pass.backend as backend

    original = backend._compile
    backend._compile = spy
    try:
        engine_coconut_backend()(torch.fx.symbolic_trace(torch.nn.Identity()), [])
    finally:
        backend._compile = original
    assert seen == {"launch": "op"}


@pytest.mark.parametrize("dtype,weight_in_fp32,rows,keep", [
    (torch.float16, True, (1, 1, 2), (1, 2)),      # nn.RMSNorm form (fp32 gain), 4-D, y0 unused
    (torch.float16, False, (2,), (0, 2)),          # Llama form in fp16, 2-D, y1 unused
    (torch.float32, True, (1,), (2,))])            # only h used
def test_lowered_op_low_precision_and_partial_uses(dtype, weight_in_fp32, rows, keep):
    """fp16 activations, the weight_in_fp32 form (its fp32 gain read by the stream kernel as the op's fused path
    reads it), a 4-D activation, and outputs left unused: the outputs that are used keep their shapes and dtypes
    and match a float64 reference; every new node carries its fake value."""
    x, r, nw, ws, bs = op_inputs((24, 8), True, rows, seed=3)
    x, r, ws, bs = x.to(dtype), r.to(dtype), [w.to(dtype) for w in ws], [b.to(dtype) for b in bs]
    nw = nw if weight_in_fp32 else nw.to(dtype)

    def f(x, r, nw, ws, bs):  # noqa: ANN001, ANN202
        out = torch.ops.coconut.add_rms_norm_linear(x, r, nw, ws, bs, 1e-6, None, weight_in_fp32)
        return [out[i] * 1 for i in keep]

    gm = make_fx(f, tracing_mode="fake")(x, r, nw, ws, bs)
    assert graph_launch.lower_graph(gm.graph, deciding("stream"), HERE) == 1
    gm.recompile()
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    from fusion_pass.kernels import reference_rms_norm_linear

    k = x.shape[-1]
    ys, h = reference_rms_norm_linear(x.double().reshape(-1, k), nw.double(), [w.double() for w in ws],
                                      [b.double() for b in bs], 1e-6, r.double().reshape(-1, k), weight_in_fp32)
    refs = ys + [h.reshape(x.shape)]
    got = gm(x, r, nw, ws, bs)
    for i, a in zip(keep, got):
        assert a.shape == refs[i].shape and a.dtype == dtype and rel_err(a, refs[i]) < 1e-2, (i, rel_err(a, refs[i]))


def test_poison_outputs_fills_the_lowered_buffers():
    """Under the ``poison_outputs`` kernel setting the launches write into NaN-filled buffers (as the op's Triton
    paths do), and still produce the op's values."""
    from fusion_pass.settings import configure_kernels

    x, r, nw, ws, bs = op_inputs((16, 8), False, (1,))

    def f(x, r, nw, ws, bs):  # noqa: ANN001, ANN202
        return [o * 1 for o in torch.ops.coconut.add_rms_norm_linear(x, r, nw, ws, bs, 1e-6)]

    gm = make_fx(f, tracing_mode="fake")(x, r, nw, ws, bs)
    previous = configure_kernels(poison_outputs=True)
    try:
        assert graph_launch.lower_graph(gm.graph, deciding("stream"), HERE) == 1
    finally:
        configure_kernels(**previous.as_dict())
    gm.recompile()
    assert targets(gm).count(torch.ops.aten.full.default) == 3  # y0, y1, h
    for a, b in zip(gm(x, r, nw, ws, bs), f(x, r, nw, ws, bs)):
        assert rel_err(a, b) < 1e-5


def test_cache_key_follows_what_the_graph_depends_on():
    """Inductor's FX-graph cache keys a graph before the pass runs. Under "graph" the kernel settings that decide a
    site at compile time (a forced ``variant``, ``autotune``, ``poison_outputs``) change the graph, so they are part
    of the pass's key; under "op" they are read at each call and leave the key alone. Every source file of the
    package is hashed (fx_edit.py shapes the rewrite, launch.py the grid of a lowered launch)."""
    import glob

    from fusion_pass import backend
    from fusion_pass.settings import configure_kernels

    op_pass, graph_pass = fusion_pass.CoconutFusionPass(launch="op"), fusion_pass.CoconutFusionPass(launch="graph")
    keys = {}
    previous = configure_kernels()
    try:
        for change in ({"variant": "auto"}, {"variant": "unfused"}, {"variant": "stream"}, {"autotune": False},
                       {"poison_outputs": True}):
            configure_kernels(**{**previous.as_dict(), **change})
            keys[str(change)] = (op_pass.uuid(), graph_pass.uuid())
    finally:
        configure_kernels(**previous.as_dict())
    assert len({k[0] for k in keys.values()}) == 1
    assert len({k[1] for k in keys.values()}) == len(keys)
    here = os.path.dirname(fusion_pass.__file__)
    expected = glob.glob(os.path.join(here, "*.py")) + glob.glob(os.path.join(here, "kernels", "*.py"))
    assert sorted(backend._pass_source_files()) == sorted(expected)


# ---------------------------------------------------------------------------------------------- GPU: whole compiles

@pytest.fixture
def stream_forced():  # noqa: ANN201
    """The stream kernel forced at every site of M <= 2 (the measured choice could be another path on a small
    shape); the process-wide kernel settings restored afterwards."""
    from fusion_pass.settings import configure_kernels

    previous = configure_kernels(variant="stream")
    yield
    configure_kernels(**previous.as_dict())


class Block(torch.nn.Module):
    """Residual add + RMSNorm -> q, k, v (one weight group): the decode shape of a Qwen3-0.6B layer."""

    def __init__(self, k: int = 1024, ns: tuple[int, ...] = (2048, 512, 512)) -> None:
        super().__init__()
        self.g = torch.nn.Parameter(1 + 0.1 * torch.randn(k))
        self.lins = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=False) for n in ns)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> list[torch.Tensor]:
        h = x + r
        hf = h.float()
        a = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * self.g
        return [lin(a) for lin in self.lins] + [h]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.usefixtures("fresh_compile_state", "stream_forced")
@pytest.mark.parametrize("mode,launched", [(None, True), ("max-autotune-no-cudagraphs", True),
                                           ("reduce-overhead", False)])
def test_gpu_inductor_launches_the_stream_kernel(mode, launched):
    """Batch 1, bf16: without CUDA graphs Inductor's generated code launches the stream kernel and calls no
    coconut op; under reduce-overhead the site stays an op. Either way the outputs match float64."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    mod = Block().cuda().to(torch.bfloat16).eval()
    x = torch.randn(1, 1, 1024, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, 1, 1024, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(mod, backend="coconut", mode=mode)
    with torch.no_grad():
        _, code = run_and_get_code(compiled, x, r)
        outs = [o.clone() for o in compiled(x, r)]  # again (under reduce-overhead: a replay)
        ref = Block.forward(mod.double(), x.double(), r.double())
    text = "\n".join(code)
    stats = fusion_pass.last_stats()
    assert stats["sites"] == 1 and stats["launched"] == int(launched), stats
    assert ("_fused_stream_kernel" in text) == launched and ("coconut.add_rms_norm_linear" in text) != launched
    for a, b in zip(outs, ref):
        assert rel_err(a.double(), b) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.usefixtures("fresh_compile_state", "stream_forced")
def test_gpu_graph_launch_generate_equals_eager():
    """transformers' greedy generate with a static cache, tiny Llama in float32 on the GPU: the forward compiled
    by coconut in the default mode (decode sites launched by Inductor) gives eager's tokens."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, 512, (1, 7), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def greedy() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                  pad_token_id=0, cache_implementation="static")

    ref = greedy()
    model.forward = torch.compile(model.forward, backend="coconut")
    out = greedy()
    assert torch.equal(out, ref), (out, ref)
    assert any(s["launched"] == 2 * cfg.num_hidden_layers + 1 for s in fusion_pass.all_stats()), \
        fusion_pass.all_stats()


def test_min_sites_counts_sites_left_to_inductor_by_decision(monkeypatch):
    """coconut.min_sites guards against sites that failed to match, not against a measured decision: a graph whose
    one site "graph" left to Inductor passes min_sites = 1; one with no candidate at all does not."""
    from fusion_pass.backend import CoconutFusionPass
    from fusion_pass.options import Settings

    f, args = fused_site()
    gm = make_fx(f, tracing_mode="fake")(*args)
    the_pass = CoconutFusionPass(Settings(min_sites=1), launch="graph")
    admission = graph_launch.site_admission
    monkeypatch.setattr(graph_launch, "site_admission", lambda: admission(deciding("unfused"), HERE))
    the_pass(gm.graph)
    stats = fusion_pass.last_stats()
    assert (stats["sites"], stats["left_to_inductor"], stats["launched"]) == (0, 1, 0), stats

    def plain(x):  # noqa: ANN001, ANN202 - no norm, no candidate
        return x * 2

    empty = make_fx(plain, tracing_mode="fake")(args[0])
    with pytest.raises(RuntimeError, match="min_sites"):
        the_pass(empty.graph)
