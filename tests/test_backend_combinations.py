"""The coconut backend combined with what a user brings along: torch.compile's own mode / options on top of a
make_backend backend."""
from __future__ import annotations

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
