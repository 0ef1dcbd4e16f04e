"""The coconut backend combined with what a user brings along: torch.compile's own mode / options on top of a
make_backend backend, Inductor settings that turn post-grad passes off (mode "lite"), and a user's
post_grad_custom_pre_pass given as a list or as an inference-aware pass (both accepted by Inductor)."""
from __future__ import annotations

import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch._inductor import config as inductor_config  # noqa: E402
from torch._inductor import custom_graph_pass  # noqa: E402

import fusion_pass  # noqa: E402
from fusion_pass.options import CoconutOptionError  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_compile_state", "one_thread")


class NormLinear(torch.nn.Module):
    """RMSNorm -> Linear: one fusable site."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(32, eps=1e-6)
        self.up = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.norm(x))


class Recorder(custom_graph_pass.CustomGraphPass):
    """A user's post-grad pre pass: records its name (and whether coconut's op is already in the graph)."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.log.append((self.name, fused_in(graph)))

    def uuid(self) -> str:
        return self.name


# Inference-aware passes (called with is_inference) exist from torch 2.13 on; before, a plain pass stands in.
INFERENCE_AWARE = hasattr(custom_graph_pass, "CustomInferenceAwareGraphPass")
# Mode "lite" and the use_post_grad_passes switch are newer than torch 2.11.
POST_GRAD_SWITCH = hasattr(inductor_config, "use_post_grad_passes")


class InferenceAwareRecorder(getattr(custom_graph_pass, "CustomInferenceAwareGraphPass",
                                     custom_graph_pass.CustomGraphPass)):
    """An inference-aware pre pass: Inductor calls it with is_inference."""

    def __init__(self, log: list) -> None:
        self.log = log

    def __call__(self, graph: torch.fx.Graph, is_inference: bool) -> None:
        self.log.append(("aware", is_inference, fused_in(graph)))

    def uuid(self) -> str:
        return "aware"


def fused_in(graph: torch.fx.Graph) -> bool:
    return any(n.target is torch.ops.coconut.rms_norm_linear.default for n in graph.nodes)


class Watch(custom_graph_pass.CustomGraphPass):
    """A post-grad post pass that records the Inductor settings in force while the graph compiles."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.seen = {"max_autotune": inductor_config.max_autotune, "cudagraphs": inductor_config.triton.cudagraphs}

    def uuid(self) -> None:
        return None


def run(backend, x: torch.Tensor, **kw) -> tuple[torch.Tensor, dict[str, object]]:
    torch.manual_seed(0)
    model = NormLinear().eval()
    watch = Watch()
    torch._dynamo.reset()
    with inductor_config.patch(post_grad_custom_post_pass=watch), torch.no_grad():
        out = torch.compile(model, backend=backend, **kw)(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    return out, watch.seen


def test_make_backend_takes_torch_compiles_mode_and_options():
    """torch.compile hands its mode / options to the backend callable as keywords: they add to the bound ones;
    the same mode or key given both ways with different values raises, naming it."""
    x = torch.randn(3, 32)
    _, seen = run(fusion_pass.make_backend(options={"coconut.min_sites": 1}), x, mode="reduce-overhead")
    assert seen == {"max_autotune": False, "cudagraphs": True} and fusion_pass.fused_site_count() == 1
    _, seen = run(fusion_pass.make_backend("reduce-overhead"), x, options={"max-autotune": True})
    assert seen == {"max_autotune": True, "cudagraphs": True} and fusion_pass.fused_site_count() == 2
    with pytest.raises(RuntimeError, match="mode='max-autotune' given to torch.compile, but the backend from "
                                           "make_backend has mode='reduce-overhead'"):
        run(fusion_pass.make_backend("reduce-overhead"), x, mode="max-autotune")
    with pytest.raises(RuntimeError, match="option max-autotune is False in torch.compile's options but True"):
        run(fusion_pass.make_backend(options={"max_autotune": True}), x, options={"max-autotune": False})
    with pytest.raises(RuntimeError, match="Unexpected coconut option coconut.bogus"):
        run(fusion_pass.make_backend(), x, options={"coconut.bogus": 1})


@pytest.mark.skipif(not POST_GRAD_SWITCH, reason="this torch has no use_post_grad_passes (mode 'lite')")
@pytest.mark.parametrize("how", ["mode", "option"])
def test_post_grad_passes_off_warns_and_min_sites_raises(how, caplog):
    """Mode "lite" (use_post_grad_passes=False) runs no post-grad pass, coconut's included: a WARNING says so, and
    coconut.min_sites raises instead of passing silently."""
    x = torch.randn(3, 32)
    kw = {"mode": "lite"} if how == "mode" else {"options": {"use_post_grad_passes": False}}
    with caplog.at_level(logging.WARNING, logger="fusion_pass"):
        run("coconut", x, **kw)
    assert fusion_pass.all_stats() == []
    assert any("post-grad passes are off" in r.getMessage() for r in caplog.records), caplog.records
    backend = fusion_pass.make_backend(kw.get("mode"), {**kw.get("options", {}), "coconut.min_sites": 1})
    with pytest.raises(RuntimeError, match="the fusion pass does not run .* fewer than coconut.min_sites = 1"):
        run(backend, x)


@pytest.mark.skipif(not INFERENCE_AWARE, reason="this torch has no inference-aware custom passes (torch < 2.13)")
@pytest.mark.parametrize("where", ["options", "config"])
def test_user_pre_passes_as_a_list_and_inference_aware_run_before_coconut(where):
    """Inductor accepts a list of pre passes and passes that take is_inference; each runs (as Inductor calls it)
    before coconut's pass, which still fuses."""
    log: list = []
    passes = [Recorder(log, "first"), InferenceAwareRecorder(log), Recorder(log, "last")]
    x = torch.randn(3, 32)
    if where == "options":
        run("coconut", x, options={"post_grad_custom_pre_pass": passes})
    else:
        with inductor_config.patch(post_grad_custom_pre_pass=passes):
            run("coconut", x)
    assert log == [("first", False), ("aware", True, False), ("last", False)]
    assert fusion_pass.fused_site_count() == 1
    with inductor_config.patch(post_grad_custom_pre_pass=InferenceAwareRecorder(log)):
        run("coconut", x)
    assert log[-1] == ("aware", True, False) and fusion_pass.fused_site_count() == 2
