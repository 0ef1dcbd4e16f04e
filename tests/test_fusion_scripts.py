"""Logic paths of the GPU benchmarks (the fusion parts of benchmarks/check.py and benchmarks/kernels.py) exercised
on the CPU."""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.harness import check_fusion as check_fusion_gpu  # noqa: E402
from benchmarks.harness import kernel_fusion as bench_fusion_kernel  # noqa: E402
from fusion_pass import kernels  # noqa: E402,F401
from fusion_pass.settings import configure_kernels  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU logic test")
def test_check_case_on_cpu_interpreter(monkeypatch):
    monkeypatch.setattr(check_fusion_gpu, "DEVICE", "cpu")
    monkeypatch.setattr(check_fusion_gpu, "DTYPE", torch.float16)
    previous = configure_kernels(poison_outputs=True)
    try:
        rows = check_fusion_gpu.check_case(3, 37, 45, True, False, ["op", "torch", "unfused", "skinny"], 1e-2)
    finally:
        configure_kernels(**previous.as_dict())
    assert [r["variant"] for r in rows] == ["op", "torch", "unfused", "skinny"]
    assert all(r["ok"] for r in rows), rows
    # each variant only inside its range of M: stream M <= 2, skinny 2..32
    variants = ["stream", "skinny"]
    assert [r["variant"] for r in check_fusion_gpu.check_case(2, 20, 33, True, False, variants, 1e-2)] == \
        ["stream", "skinny"]
    rows = check_fusion_gpu.check_case(17, 20, 33, True, True, variants, 1e-2)
    assert [r["variant"] for r in rows] == ["skinny"] and rows[0]["ok"], rows


def test_scripts_parse_args_and_refuse_without_cuda():
    a = check_fusion_gpu.parse_args(["--out", "x.json", "--quick"])
    assert a.quick and a.tol == 1e-2
    b = bench_fusion_kernel.parse_args(["--quick", "--reps", "3"])
    assert b.reps == 3 and b.out.endswith("fusion-kernel.json")
    if not torch.cuda.is_available():
        assert check_fusion_gpu.main(["--out", "/dev/null"]) == 2
        assert bench_fusion_kernel.main(["--quick"]) == 2


def test_bench_table_prints_rows_and_errors(capsys):
    bench_fusion_kernel.print_table([
        {"site": "qkv", "M": 1, "floor_us": 1.9, "cublas_us": 4.8, "unfused_us": 6.0, "op_us": 5.0,
         "speedup": 1.2, "best_fused_variant": "gemv[16,512,4]", "best_fused_us": 5.0, "chosen": "gemv[16,512,4]",
         "rel_err": 3e-3},
        {"site": "lm_head", "M": 2048, "error": "skipped: time budget"}])
    out = capsys.readouterr().out
    assert "gemv[16,512,4]" in out and "ERROR skipped" in out


def test_paired_speedup_helpers(capsys):
    """The interleaved pairs alternate their order; the summary is median / min / max of the per-pair ratios; the
    table prints the paired median when a row has one."""
    assert [bench_fusion_kernel.pair_order(p) for p in range(4)] == [(0, 1), (1, 0), (0, 1), (1, 0)]
    st = bench_fusion_kernel.pair_stats([1.02, 0.98, 1.01, 1.5, 1.0])
    assert st == {"median": 1.01, "min": 0.98, "max": 1.5, "pairs": 5}
    with pytest.raises(ValueError):
        bench_fusion_kernel.pair_stats([])
    assert bench_fusion_kernel.parse_args([]).pairs == 21
    bench_fusion_kernel.print_table([
        {"site": "lm_head", "M": 1024, "floor_us": 146.2, "cublas_us": 487.9, "unfused_us": 513.2, "op_us": 516.5,
         "speedup": 0.994, "speedup_paired": {"median": 1.0031, "min": 0.99, "max": 1.01, "pairs": 21},
         "best_fused_variant": None, "best_fused_us": None, "chosen": "unfused", "rel_err": 1.7e-3}])
    out = capsys.readouterr().out
    assert "  1.003 " in out and "0.994" in out
