"""The coconut backend honours torch.compile's mode and options as Inductor does (the Inductor config seen inside
the compile), its own "coconut.*" options, refuses unknown keys, fuses under every mode, and logs one line per
graph (a WARNING when candidates were left unfused)."""
from __future__ import annotations

import copy
import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from torch._inductor import config as inductor_config  # noqa: E402
from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: E402

import fusion_pass  # noqa: E402
from fusion_pass import backend as coconut  # noqa: E402
from fusion_pass.options import CoconutOptionError, parse_options  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_compile_state", "one_thread")

MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
WATCHED = ("triton.cudagraphs", "triton.cudagraph_trees", "max_autotune", "coordinate_descent_tuning")


class NormLinear(torch.nn.Module):
    """RMSNorm -> Linear (one fusable site) -> Linear (a plain mm)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(32, eps=1e-6)
        self.up = torch.nn.Linear(32, 16, bias=False)
        self.down = torch.nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(self.norm(x)))


class Probe(CustomGraphPass):
    """A post-grad pass that records the Inductor config in force while the graph compiles."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def __call__(self, graph: torch.fx.Graph) -> None:
        for key in WATCHED:
            obj = inductor_config
            for part in key.split("."):
                obj = getattr(obj, part)
            self.seen[key] = obj

    def uuid(self) -> None:
        return None


@pytest.fixture(scope="module")
def model() -> NormLinear:
    torch.manual_seed(0)
    m = NormLinear().eval()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
    return m


def compile_run(model: torch.nn.Module, x: torch.Tensor, **kw) -> tuple[torch.Tensor, dict[str, object]]:
    probe = Probe()
    torch._dynamo.reset()
    with inductor_config.patch(post_grad_custom_post_pass=probe), torch.no_grad():
        out = torch.compile(model, **kw)(x)
    return out, probe.seen


@pytest.mark.parametrize("mode", MODES)
def test_mode_patches_inductor_config_and_still_fuses(model, mode):
    x = torch.randn(3, 32)
    out, seen = compile_run(model, x, backend="coconut", mode=mode)
    expected = torch._inductor.list_mode_options(mode)
    for key in ("triton.cudagraphs", "max_autotune", "coordinate_descent_tuning"):
        assert seen[key] == expected.get(key, False), (mode, key, seen)
    if "cudagraphs" in expected:  # what a GPU gets: CUDA-graph trees (the CPU skips graphs at run time)
        assert seen["triton.cudagraphs"] is True and seen["triton.cudagraph_trees"] is True
    assert fusion_pass.fused_site_count() == 1, fusion_pass.all_stats()
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_options_reach_inductor_and_coconut_settings(model, monkeypatch):
    x = torch.randn(3, 32)
    _, seen = compile_run(model, x, backend="coconut", options={"max_autotune": True, "coordinate-descent-tuning": True})
    assert seen["max_autotune"] is True and seen["coordinate_descent_tuning"] is True
    assert fusion_pass.fused_site_count() == 1

    fusion_pass.reset_stats()
    out, _ = compile_run(model, x, backend="coconut", options={"coconut.enable": False})
    assert fusion_pass.fused_site_count() == 0 and fusion_pass.all_stats() == []  # the pass never ran
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)

    pretuned: list = []
    monkeypatch.setattr(coconut, "_pretune", lambda sites: pretuned.append(list(sites)))
    compile_run(model, x, backend="coconut")
    assert pretuned == [[(3, 16, 32, torch.float32, torch.device("cpu"), (16,))]]  # M, N, K of the fused linear, its widths
    compile_run(model, x, backend="coconut", options={"coconut.pretune": False})
    assert len(pretuned) == 1


class Attention3(torch.nn.Module):
    """One norm feeding q / k / v (no bias: one weight group) and one feeding a biased and an unbiased linear (two)."""

    def __init__(self) -> None:
        super().__init__()
        self.n1, self.n2 = torch.nn.RMSNorm(32, eps=1e-6), torch.nn.RMSNorm(32, eps=1e-6)
        self.q, self.k, self.v = (torch.nn.Linear(32, n, bias=False) for n in (16, 8, 8))
        self.a, self.b = torch.nn.Linear(32, 12), torch.nn.Linear(32, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        y = torch.cat([self.q(h), self.k(h), self.v(h)], -1)
        g = self.n2(y)
        return torch.cat([self.a(g), self.b(g)], -1)


def test_pretune_measures_the_weight_group_shapes(monkeypatch):
    """The backend pretunes what the dispatcher looks up: one (M, N_q + N_k + N_v, K) for the q/k/v group, and one
    shape per group where a bias on some linears only splits a site."""
    torch.manual_seed(0)
    m = Attention3().eval()
    pretuned: list = []
    monkeypatch.setattr(coconut, "_pretune", lambda sites: pretuned.append(sorted(s[:3] for s in sites)))
    x = torch.randn(5, 32)
    out, _ = compile_run(m, x, backend="coconut")
    assert fusion_pass.fused_site_count() == 2
    assert pretuned == [[(5, 4, 32), (5, 12, 32), (5, 32, 32)]]
    with torch.no_grad():
        torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-5)


def test_min_sites_raises_from_the_compile(model):
    with pytest.raises(RuntimeError, match="fewer than coconut.min_sites = 2"):
        compile_run(model, torch.randn(3, 32), backend="coconut", options={"coconut.min_sites": 2})


@pytest.mark.parametrize("options, message", [
    ({"no_such_inductor_option": 1}, "Unexpected optimization option no_such_inductor_option"),
    ({"coconut.no_such_option": 1}, "Unexpected coconut option coconut.no_such_option"),
    ({"max_autotune": "yes"}, "Unexpected type of attr max_autotune"),
    ({"coconut.min_sites": True}, "Unexpected type of attr coconut.min_sites"),
    ({"coconut.enable": np.bool_(True)}, r"got numpy\.bool_? should be bool"),  # not "got bool should be bool"
    ({"coconut.enable": False, "coconut.min_sites": 1}, "coconut.min_sites = 1 asks for fused sites, but "
                                                          "coconut.enable is False"),
])
def test_bad_option_raises_like_inductor(model, options, message):
    with pytest.raises(RuntimeError, match=message):  # at the first compile, wrapped by Dynamo
        compile_run(model, torch.randn(3, 32), backend="coconut", options=options)
    with pytest.raises(CoconutOptionError, match=message):  # at once
        fusion_pass.make_backend(options=options)
    if not next(iter(options)).startswith("coconut."):  # Inductor refuses the same key, with a RuntimeError
        with pytest.raises(RuntimeError, match=message):
            torch.compile(model, backend="inductor", options=options)


def test_bad_mode_raises_and_make_backend_combines_mode_and_options(model):
    with pytest.raises(ValueError, match="Unrecognized mode=fast"):
        parse_options("fast", None)
    patches, settings = parse_options("max-autotune", {"max_autotune": False, "coconut.min_sites": 1})
    assert patches == {"max_autotune": False, "triton.cudagraphs": True, "coordinate_descent_tuning": True}
    assert settings.min_sites == 1 and settings.enable
    _, seen = compile_run(model, torch.randn(3, 32), backend=fusion_pass.make_backend("reduce-overhead",
                                                                                       {"max_autotune": True}))
    assert seen["triton.cudagraphs"] is True and seen["max_autotune"] is True
    assert fusion_pass.fused_site_count() == 1


def test_dynamic_and_fullgraph_behave_as_with_inductor(model):
    with torch.no_grad():
        f = torch.compile(model, backend="coconut", dynamic=True)
        for rows in (3, 5):
            x = torch.randn(rows, 32)
            torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(fusion_pass.all_stats()) == 1 and fusion_pass.fused_site_count() == 1  # one dynamic graph

    def broken(x: torch.Tensor) -> torch.Tensor:
        y = model(x)
        torch._dynamo.graph_break()
        return y + 1

    errors = []
    for backend in ("inductor", "coconut"):
        torch._dynamo.reset()
        with pytest.raises(Exception) as e, torch.no_grad():
            torch.compile(broken, backend=backend, fullgraph=True)(torch.randn(3, 32))
        errors.append(type(e.value))
    assert errors[0] is errors[1] and issubclass(errors[0], torch._dynamo.exc.Unsupported)


def test_one_info_line_per_graph_and_a_warning_when_nothing_fuses(model, caplog):
    x = torch.randn(3, 32)
    with caplog.at_level(logging.INFO, logger="fusion_pass"):
        compile_run(model, x, backend="coconut")
    lines = [r for r in caplog.records if r.name == "fusion_pass" and "graph 1" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.INFO]
    assert "fused 1 of 1 RMSNorm->linear candidate site(s) (0 with the residual add, 1 without), 1 linear(s)" \
        in lines[0].getMessage()

    # Training: grad mode on, trainable weights -> the normalized activations are saved for the backward.
    torch._dynamo.reset()
    fusion_pass.reset_stats()
    caplog.clear()
    train = NormLinear().train()
    with caplog.at_level(logging.INFO, logger="fusion_pass"):
        torch.compile(train, backend="coconut")(x).sum().backward()
    stats = fusion_pass.all_stats()[0]  # the forward graph
    assert stats["sites"] == 0 and stats["candidates"] == 1, stats
    assert "an output of the graph" in stats["skipped"][0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "fusion_pass"]
    assert len(warnings) == 1 and "1 RMSNorm->linear candidate(s) and none was fused" in warnings[0]


class SlicedHead(torch.nn.Module):
    """residual add -> RMSNorm -> last-token row slice -> Linear, as generate's lm_head reads the final norm;
    with `reuse`, the sum is also used afterwards (the residual form cannot slice its inputs then)."""

    def __init__(self, reuse: bool) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(32, eps=1e-6)
        self.head = torch.nn.Linear(32, 24, bias=False)
        self.reuse = reuse

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        h = x + r
        y = self.head(self.norm(h)[:, -2:, :])
        return (y, h * 2) if self.reuse else y


@pytest.mark.parametrize("reuse", [False, True])
def test_row_slice_between_norm_and_linear_is_fused(reuse):
    torch.manual_seed(0)
    m = SlicedHead(reuse).eval()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = m(x, r)
        out = torch.compile(m, backend="coconut")(x, r)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    stats = fusion_pass.last_stats()
    assert (stats["sites"], stats["residual_sites"], stats["linears"]) == (1, 0 if reuse else 1, 1), stats


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_trees_replay_the_fused_ops(mode):
    """On a GPU: the trees record and replay the graph with the coconut ops in it (no CUDA-graph skip), and the
    replays give the eager result (bf16: relative error < 1e-2)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    m = NormLinear().cuda().to(torch.bfloat16).eval()
    ref_model = copy.deepcopy(m).float()
    counters.clear()
    f = torch.compile(m, backend="coconut", mode=mode)
    with torch.no_grad():
        for rows in (1, 1, 1, 4, 4, 4):  # warm-up, record, replay; a second shape gets its own graph
            x = torch.randn(rows, 32, device="cuda", dtype=torch.bfloat16)
            torch.compiler.cudagraph_mark_step_begin()
            out = f(x).float()
            ref = ref_model(x.float())
            assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    stats = fusion_pass.all_stats()
    assert fusion_pass.fused_site_count() >= 1 and all(s["sites"] == 1 for s in stats), stats


def test_every_coconut_option_is_a_setting_with_its_default():
    from dataclasses import fields

    from fusion_pass.options import COCONUT_OPTIONS, Settings

    assert {f"coconut.{f.name}": f.default for f in fields(Settings)} == {k: v[1] for k, v in COCONUT_OPTIONS.items()}
    _, settings = parse_options(None, {k: v[1] for k, v in COCONUT_OPTIONS.items()})
    assert settings == Settings()


# A value of each kernel-setting key other than its KernelSettings default.
KERNEL_VALUES = {"coconut.pdl": False, "coconut.autotune": False, "coconut.tuning_file": "tuning.json",
                 "coconut.variant": "unfused", "coconut.poison_outputs": True}


@pytest.fixture
def kernel_settings_restored():
    """The process-wide kernel settings and the backend's record of them as they were before the test."""
    from fusion_pass.settings import configure_kernels, kernel_settings

    before = kernel_settings()
    applied = dict(coconut._applied_by_compile)
    yield
    configure_kernels(**before.as_dict())
    coconut._applied_by_compile.clear()
    coconut._applied_by_compile.update(applied)


def test_kernel_options_reach_the_kernel_settings_when_a_graph_compiles(model, kernel_settings_restored, tmp_path):
    from fusion_pass.settings import KernelSettings, kernel_settings

    options = {**KERNEL_VALUES, "coconut.tuning_file": str(tmp_path / "t.json")}
    backend = fusion_pass.make_backend(options=options)
    assert kernel_settings() == KernelSettings()  # validated at once, applied only when a graph compiles
    x = torch.randn(3, 32)
    out, _ = compile_run(model, x, backend=backend)
    assert kernel_settings() == KernelSettings(pdl=False, autotune=False, tuning_file=str(tmp_path / "t.json"),
                                               variant="unfused", poison_outputs=True)
    assert fusion_pass.fused_site_count() == 1
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", sorted(KERNEL_VALUES))
def test_each_kernel_option_sets_its_field_only(key, kernel_settings_restored):
    from fusion_pass.settings import kernel_settings

    before = kernel_settings().as_dict()
    _, settings = parse_options(None, {key: KERNEL_VALUES[key]})
    field = key.split(".", 1)[1]
    assert settings.kernel_changes() == {field: KERNEL_VALUES[key]}
    coconut._apply_kernel_settings(settings)
    assert kernel_settings().as_dict() == {**before, field: KERNEL_VALUES[key]}


@pytest.mark.parametrize("key, value, message", [
    ("coconut.pdl", "yes", "Unexpected type of attr coconut.pdl"),
    ("coconut.autotune", 1, "Unexpected type of attr coconut.autotune"),
    ("coconut.poison_outputs", "true", "Unexpected type of attr coconut.poison_outputs"),
    ("coconut.variant", "gemv", "coconut.variant must be one of"),
    ("coconut.variant", 2, "Unexpected type of attr coconut.variant"),
    ("coconut.tuning_file", " ", "coconut.tuning_file must be a non-empty path"),
    ("coconut.tuning_file", 3, "Unexpected type of attr coconut.tuning_file"),
])
def test_bad_kernel_option_raises_naming_the_key(key, value, message, kernel_settings_restored):
    from fusion_pass.settings import kernel_settings

    before = kernel_settings()
    with pytest.raises(CoconutOptionError, match=message):
        fusion_pass.make_backend(options={key: value})
    assert kernel_settings() == before


def test_a_later_compile_with_other_kernel_values_wins_with_a_warning(kernel_settings_restored, caplog):
    from fusion_pass.settings import kernel_settings

    first = parse_options(None, {"coconut.variant": "unfused", "coconut.pdl": False})[1]
    second = parse_options(None, {"coconut.variant": "auto"})[1]
    with caplog.at_level(logging.INFO, logger="fusion_pass"):
        coconut._apply_kernel_settings(first)
        coconut._apply_kernel_settings(parse_options()[1])  # a compile naming no kernel key changes nothing
        assert (kernel_settings().variant, kernel_settings().pdl) == ("unfused", False)
        coconut._apply_kernel_settings(second)
    assert (kernel_settings().variant, kernel_settings().pdl) == ("auto", False)
    records = [(r.levelname, r.getMessage()) for r in caplog.records if "kernel settings" in r.getMessage()]
    assert [level for level, _ in records] == ["INFO", "WARNING"], records
    assert "'variant': 'auto'" in records[1][1] and "'variant': 'unfused'" in records[1][1]


def test_one_row_matmul_stays_a_matmul_under_coordinate_descent_tuning():
    """mode "max-autotune" turns on coordinate-descent tuning, under which Inductor decomposes a one-row mm on a GPU
    into multiply + sum before any post-grad pass (no linear left to fuse at batch 1); the backend's table keeps
    it, and pickles to the same bytes every time (Inductor's FX-graph cache key). Fake CUDA tensors need no GPU."""
    import pickle

    from torch._inductor import config as ic
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fusion_pass.backend import decompositions_keeping_row_mm

    mm = torch.ops.aten.mm.default
    with FakeTensorMode(allow_non_fake_inputs=True):
        w = torch.empty(32, 16, device="cuda", dtype=torch.bfloat16)
        row = torch.empty(1, 32, device="cuda", dtype=torch.bfloat16)
        rows = torch.empty(4, 32, device="cuda", dtype=torch.bfloat16)
        with ic.patch(coordinate_descent_tuning=True):
            assert select_decomp_table()[mm](row, w) is not NotImplemented  # Inductor's own: decomposed
            table = decompositions_keeping_row_mm()
            assert table[mm](row, w) is NotImplemented
            assert table[mm](rows, w) is NotImplemented and select_decomp_table()[mm](rows, w) is NotImplemented
            assert pickle.dumps(table) == pickle.dumps(decompositions_keeping_row_mm())


@pytest.mark.parametrize("cdt", [False, True])
def test_backend_passes_the_table_only_under_coordinate_descent_tuning(monkeypatch, cdt):
    """The table reaches compile_fx only while coordinate-descent tuning is on; otherwise Inductor's default path
    (and its FX-graph cache key) is untouched. The compile still fuses its site."""
    import torch._inductor.compile_fx as cfx

    from fusion_pass.backend import _RowMmDecompositions

    seen = []
    real = cfx.compile_fx

    def spy(*args, **kwargs):
        seen.append(kwargs.get("decompositions"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    f = torch.compile(NormLinear().eval(), backend="coconut", options={"coordinate_descent_tuning": cdt})
    with torch.no_grad():
        f(torch.randn(3, 32))
    assert seen  # compile_fx calls itself again with the config patches applied, the table passed on
    assert all(isinstance(d, _RowMmDecompositions) if cdt else d is None for d in seen), seen
    assert fusion_pass.last_stats()["sites"] == 1


@pytest.mark.parametrize("cdt", [False, True])
def test_a_second_compile_is_served_from_the_fx_graph_cache(monkeypatch, tmp_path, cdt):
    """The table passed under coordinate-descent tuning keeps Inductor's FX-graph cache working (torch 2.13 pickles
    it into the cache key): the same graph compiled again after a Dynamo reset is a cache hit."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as ic

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    m = NormLinear().eval()
    hits = []
    with ic.patch(fx_graph_cache=True), torch._functorch.config.patch(enable_autograd_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            counters.clear()
            f = torch.compile(m, backend="coconut", options={"coordinate_descent_tuning": cdt})
            with torch.no_grad():
                f(torch.randn(3, 32))
            hits.append(counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"])
    assert hits[0] == 0 and hits[1] >= 1, hits
