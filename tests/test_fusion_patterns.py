"""The coconut backend on toy modules: which sites are rewritten, and that results do not change."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusion_pass  # noqa: E402
from conftest import rel_err  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


# Every test: no FX/AOT cache hits (the pass must run to be counted), fresh Dynamo state (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_compile_state")


def llama_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The engine's / HF's plain form."""
    dt = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(dt) * w


class Norm(nn.Module):
    def __init__(self, k: int, eps: float, dtype: torch.dtype, weight_first: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.2 * torch.randn(k).to(dtype))
        self.eps, self.weight_first = eps, weight_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_first:  # HF Llama/Qwen: self.weight * hidden.to(input_dtype)
            dt = x.dtype
            xf = x.to(torch.float32)
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * xf.to(dt)
        return llama_norm(x, self.weight, self.eps)


class Toy(nn.Module):
    """norm -> (q, k, v) separate linears (multi-consumer) with optional residual, bias and 3-D input."""

    def __init__(self, k=16, ns=(8, 6, 6), dtype=torch.float32, eps=1e-6, bias=False, residual=False,
                 norm="llama") -> None:
        super().__init__()
        if norm == "llama":
            self.norm = Norm(k, eps, dtype)
        elif norm == "hf":
            self.norm = Norm(k, eps, dtype, weight_first=True)
        else:
            self.norm = nn.RMSNorm(k, eps=eps, dtype=dtype)
            with torch.no_grad():
                self.norm.weight.add_(0.2 * torch.randn(k).to(dtype))
        self.lins = nn.ModuleList(nn.Linear(k, n, bias=bias, dtype=dtype) for n in ns)
        self.residual = residual

    def forward(self, x, r):
        if self.residual:
            x = x + r
        y = self.norm(x)
        outs = [lin(y) for lin in self.lins]
        return (torch.cat(outs, -1), x * 2) if self.residual else torch.cat(outs, -1)


def run_both(mod, *args, dynamic=None, backend_ref="inductor"):
    with torch.no_grad():
        eager = mod(*args)
        fused = torch.compile(mod, backend="coconut", dynamic=dynamic)(*args)
    return eager, fused


def flat(t):
    return list(t) if isinstance(t, tuple) else [t]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["llama", "hf", "torch"])
def test_forms_and_dtypes(dtype, norm):
    torch.manual_seed(0)
    mod = Toy(dtype=dtype, norm=norm, bias=True, residual=True).eval()
    x, r = torch.randn(5, 16).to(dtype), torch.randn(5, 16).to(dtype)
    eager, fused = run_both(mod, x, r)
    st = fusion_pass.last_stats()
    assert (st["sites"], st["residual_sites"], st["linears"]) == (1, 1, 3), st
    assert fusion_pass.fused_site_count() == 1
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(flat(fused), flat(eager)):
        assert rel_err(a, b) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pow_minus_half_for_rsqrt_and_fp32_gain(dtype):
    """Gemma 3n / Gemma 4 write rsqrt(s) as pow(s, -0.5) and multiply by the gain in fp32 before the cast back."""
    torch.manual_seed(9)
    g, w = 1 + torch.randn(16) * 0.2, torch.randn(8, 16).to(dtype)

    def f(x, r):
        h = x + r
        hf = h.float()
        n = hf * torch.pow(hf.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
        return F.linear((n * g.float()).type_as(h), w), h

    x, r = torch.randn(5, 16).to(dtype), torch.randn(5, 16).to(dtype)
    with torch.no_grad():
        eager = f(x, r)
        fused = torch.compile(f, backend="coconut")(x, r)
    st = fusion_pass.last_stats()
    assert (st["sites"], st["residual_sites"], st["linears"]) == (1, 1, 1), st
    for a, b in zip(fused, eager):
        assert rel_err(a, b) <= (1e-5 if dtype == torch.float32 else 1e-2)


class Gainless(nn.Module):
    """(x + r ->) an RMSNorm without a gain -> three linears with biases: F.rms_norm with weight=None (its default
    eps, finfo(float32).eps) or torch.nn.RMSNorm(elementwise_affine=False)."""

    def __init__(self, form: str, residual: bool, k: int = 16, ns=(8, 6, 6)) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(k, eps=1e-6, elementwise_affine=False) if form == "module" else None
        self.lins = nn.ModuleList(nn.Linear(k, n) for n in ns)
        self.residual = residual

    def forward(self, x, r):
        h = x + r if self.residual else x
        y = self.norm(h) if self.norm is not None else F.rms_norm(h, (h.shape[-1],))
        out = torch.cat([lin(y) for lin in self.lins], -1)
        return (out, h * 2) if self.residual else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form,residual", [("functional", False), ("module", True)])
def test_norm_without_gain(form, residual, dtype):
    """A norm without a gain fuses like a gained one (the op gets a gain of ones): one site serving the three
    linears, the residual add taken in, the norm counted once; float16 stays within 1e-2 of the float32 module."""
    torch.manual_seed(10)
    mod = Gainless(form, residual).eval()
    x, r = torch.randn(2, 5, 16) * 0.1, torch.randn(2, 5, 16) * 0.1  # small: a wrong eps would show
    with torch.no_grad():
        ref = mod(x, r)
        fused = torch.compile(mod.to(dtype), backend="coconut")(x.to(dtype), r.to(dtype))
    st = fusion_pass.last_stats()
    assert (st["sites"], st["residual_sites"], st["linears"], st["norms_seen"]) == (1, int(residual), 3, 1), st
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(flat(fused), flat(ref)):
        assert a.dtype == dtype and a.shape == b.shape and rel_err(a, b) <= tol


def test_norm_without_gain_used_elsewhere_left_alone_exact():
    """The gainless normalized tensor is also reduced: not a site (counted, with its reason), results exact."""
    torch.manual_seed(11)
    w = torch.randn(8, 16)

    def f(x):
        y = F.rms_norm(x, (16,), eps=1e-6)
        return F.linear(y, w), y.sum(-1)

    x = torch.randn(6, 16)
    with torch.no_grad():
        ref = torch.compile(f, backend="inductor")(x)
        torch._dynamo.reset()
        out = torch.compile(f, backend="coconut")(x)
    st = fusion_pass.last_stats()
    assert (st["sites"], st["norms_seen"], st["candidates"]) == (0, 1, 1), st
    assert len(st["skipped"]) == 1 and "not a linear" in st["skipped"][0], st
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("eps", [1e-5, 3.3e-7, 0.25])
def test_any_eps_captured(eps):
    torch.manual_seed(1)
    mod = Toy(eps=eps).eval()
    x = torch.randn(4, 16) * 1e-3  # small activations make a wrong eps visible
    eager, fused = run_both(mod, x, None)
    assert fusion_pass.fused_site_count() == 1
    assert rel_err(fused, eager) <= 1e-5


def test_eps_as_unspecialized_float_input_dynamic_true():
    """dynamic=True turns the float attribute eps into a 0-d tensor graph input; the op takes it as eps_tensor."""
    torch.manual_seed(2)
    mod = Toy(eps=3e-3).eval()
    x = torch.randn(4, 16) * 0.05
    eager, fused = run_both(mod, x, None, dynamic=True)
    assert fusion_pass.fused_site_count() == 1
    assert rel_err(fused, eager) <= 1e-5


def test_3d_input_bias_and_2d_without_view():
    torch.manual_seed(3)
    mod = Toy(bias=True, residual=True).eval()
    x, r = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    eager, fused = run_both(mod, x, r)
    assert fusion_pass.fused_site_count() == 1
    for a, b in zip(flat(fused), flat(eager)):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-5


def test_mm_then_bias_add_and_addmm():
    torch.manual_seed(4)
    g, w1, w2, b = 1 + torch.randn(16) * 0.1, torch.randn(8, 16), torch.randn(5, 16), torch.randn(8)

    def f(x):
        y = llama_norm(x, g, 1e-6)
        return y @ w1.t() + b, F.linear(y, w2, b[:5])

    x = torch.randn(6, 16)
    with torch.no_grad():
        eager = f(x)
        fused = torch.compile(f, backend="coconut")(x)
    st = fusion_pass.last_stats()
    assert (st["sites"], st["linears"]) == (1, 2), st
    for a, e in zip(fused, eager):
        assert rel_err(a, e) <= 1e-5


def test_non_fusable_site_left_alone_exact():
    """The normalized tensor is also returned / reduced: the op cannot provide it, so nothing is rewritten."""
    torch.manual_seed(5)
    g, w = 1 + torch.randn(16) * 0.1, torch.randn(8, 16)

    def f(x):
        y = llama_norm(x, g, 1e-6)
        return F.linear(y, w), y.sum(-1)

    x = torch.randn(6, 16)
    with torch.no_grad():
        ref = torch.compile(f, backend="inductor")(x)
        torch._dynamo.reset()
        out = torch.compile(f, backend="coconut")(x)
    assert fusion_pass.fused_site_count() == 0
    assert fusion_pass.last_stats()["norms_seen"] == 1
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_norm_over_head_dim_feeding_elementwise_is_not_a_site():
    """q_norm / k_norm style: norm over a head dim followed by non-linear ops."""
    torch.manual_seed(6)
    g, w = 1 + torch.randn(4) * 0.1, torch.randn(16, 16)

    def f(x):
        q = F.linear(x, w).view(x.shape[0], 4, 4)
        q = llama_norm(q, g, 1e-6)
        return torch.sin(q) * 2

    x = torch.randn(3, 16)
    with torch.no_grad():
        eager = f(x)
        out = torch.compile(f, backend="coconut")(x)
    assert fusion_pass.fused_site_count() == 0
    assert rel_err(out, eager) <= 1e-6


def test_dynamic_batch_mark_dynamic_two_sizes():
    torch.manual_seed(7)
    mod = Toy(bias=True, residual=True, norm="torch").eval()
    f = torch.compile(mod, backend="coconut")
    with torch.no_grad():
        for m in (5, 9):
            x, r = torch.randn(m, 16), torch.randn(m, 16)
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(r, 0)
            out = f(x, r)
            ref = mod(x, r)
            for a, b in zip(out, ref):
                assert a.shape == b.shape and rel_err(a, b) <= 1e-5
    assert fusion_pass.fused_site_count() == 1  # one dynamic graph, compiled once


def test_rewrite_graph_on_traced_aten_graph():
    """rewrite_graph works on a make_fx graph too (no Inductor), and the rewritten module computes the same."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(8)
    g, w1, w2 = 1 + torch.randn(16) * 0.1, torch.randn(8, 16), torch.randn(4, 16)

    def f(x, r, g, w1, w2):
        h = x + r
        y = llama_norm(h, g, 1e-6)
        return F.linear(y, w1), F.linear(y, w2), h

    args = (torch.randn(3, 16), torch.randn(3, 16), g, w1, w2)
    gm = make_fx(f, tracing_mode="fake")(*args)
    st = fusion_pass.rewrite_graph(gm.graph)
    gm.recompile()
    assert (st.sites, st.residual_sites, st.linears) == (1, 1, 2)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.coconut.add_rms_norm_linear.default in targets
    assert torch.ops.aten.mm.default not in targets
    for a, b in zip(gm(*args), f(*args)):
        assert rel_err(a, b) <= 1e-5
