"""fusion_pass.registration.define_op (the ops' torch.library.Library registration) and the host-overhead
benchmark's CPU smoke run."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from fusion_pass.registration import define_op

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _scale_rows(x: torch.Tensor, ws: list[torch.Tensor], s: float) -> list[torch.Tensor]:
    return [(x @ w.t()) * s for w in ws]


def _scale_rows_fake(x: torch.Tensor, ws: list[torch.Tensor], s: float) -> list[torch.Tensor]:
    return [x.new_empty((x.shape[0], w.shape[0])) for w in ws]


OP = define_op("coconut_test::scale_rows", _scale_rows, _scale_rows_fake)


def test_schema_is_inferred_and_the_op_runs_its_kernel() -> None:
    assert str(OP._schema) == "coconut_test::scale_rows(Tensor x, Tensor[] ws, float s) -> Tensor[]"
    x, w1, w2 = torch.randn(5, 8), torch.randn(3, 8), torch.randn(6, 8)
    ys = torch.ops.coconut_test.scale_rows(x, [w1, w2], 0.5)
    assert [tuple(y.shape) for y in ys] == [(5, 3), (5, 6)]
    torch.testing.assert_close(ys[1], (x @ w2.t()) * 0.5, rtol=0, atol=0)
    meta = OP(x.to("meta"), [w1.to("meta")], 2.0)[0]  # the fake function serves meta tensors too
    assert meta.device.type == "meta" and tuple(meta.shape) == (5, 3)


def test_the_fake_function_keeps_one_graph_for_every_row_count() -> None:
    counts = {"calls": 0}

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:  # noqa: ANN001
        counts["calls"] += 1
        return gm.forward

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.coconut_test.scale_rows(x, [w], 2.0)[0] + 1

    compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
    w = torch.randn(4, 8)
    for m in (3, 5, 9):
        x = torch.randn(m, 8)
        torch.testing.assert_close(compiled(x, w), (x @ w.t()) * 2 + 1)
    assert counts["calls"] == 1


def test_inputs_that_require_grad_raise_under_grad_mode_only() -> None:
    x, w = torch.randn(2, 4, requires_grad=True), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        OP(x, [w], 1.0)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        OP(x.detach(), [w.requires_grad_()], 1.0)  # a tensor inside a list argument counts too
    with torch.no_grad():
        assert OP(x, [w], 1.0)[0].shape == (2, 3)
    with torch.inference_mode():
        assert OP(x, [w], 1.0)[0].shape == (2, 3)


def test_bad_qualname_and_duplicate_name() -> None:
    with pytest.raises(ValueError, match="namespace::name"):
        define_op("no_namespace", _scale_rows, _scale_rows_fake)
    with pytest.raises(RuntimeError):
        define_op("coconut_test::scale_rows", _scale_rows, _scale_rows_fake)


def test_project_ops_are_library_defined() -> None:
    """Every op of the engine and the pass goes through define_op (no custom_op Python layers per call)."""
    import fusion_pass  # noqa: F401
    import nanovllm.layers.attention  # noqa: F401
    import nanovllm.layers.gemv_op  # noqa: F401
    import nanovllm.layers.qk_norm_rope_op  # noqa: F401
    from torch._library.custom_ops import OPDEFS

    names = ["coconut::rms_norm_linear", "coconut::add_rms_norm_linear", "nanovllm::attention",
             "nanovllm::attention_cached", "nanovllm::linear_small_m", "nanovllm::qk_norm_rope",
             "nanovllm::qk_norm_rope_store", "nanovllm::rope_store"]
    for name in names:
        ns, op = name.split("::")
        assert hasattr(getattr(torch.ops, ns), op), name
        assert name not in OPDEFS, f"{name} is still a torch.library.custom_op"
        # no Python kernel at the Autograd key: a call under no_grad does not go through Python twice
        assert torch._C._dispatch_kernel_for_dispatch_key_is_fallthrough(name, "Autograd"), name


def test_host_overhead_benchmark_cpu_smoke(tmp_path: "os.PathLike[str]") -> None:
    """The benchmark runs on the CPU and both registrations of each op give the same outputs."""
    from benchmarks.harness import kernel_host_overhead as bench_host_overhead

    out = os.path.join(tmp_path, "host.json")
    assert bench_host_overhead.main(["--device", "cpu", "--tokens", "4", "--calls", "2", "--rounds", "2",
                                     "--out", out]) == 0
    with open(out) as f:
        data = json.load(f)
    assert set(data["twins_rel_err"]) == {"coconut add_rms_norm_linear qkv", "nanovllm linear_small_m silu_mul",
                                          "nanovllm qk_norm_rope"}
    assert all(v == 0.0 for v in data["twins_rel_err"].values()), data["twins_rel_err"]
    cases = {(r["group"], r["case"]) for r in data["rows"]}
    assert ("empty op (dispatch only)", "custom_op") in cases and all(r["host_us"] > 0 for r in data["rows"])
    assert set(data["custom_op_over_define_op"]) == {g for g, c in cases if c == "custom_op"}


def test_a_compiled_graph_that_needs_the_ops_gradient_fails_loudly() -> None:
    """Under torch.compile the Autograd-key check runs while the graph is traced: a gradient through the op is
    refused there instead of being dropped (x.grad would miss the op's part); without grad the graph compiles."""
    torch._dynamo.reset()
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(4, 8)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return OP(x, [w], 1.0)[0].sum() + (x * x).sum()

    with pytest.raises(Exception, match="no autograd formula"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    torch.testing.assert_close(got, (x @ w.t()).sum() + (x * x).sum())
    assert torch.Tag.pt2_compliant_tag in OP.tags
