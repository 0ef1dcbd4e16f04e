"""benchmarks/bench_ab_latency.py on the CPU with a tiny checkpoint: both engines alive in one process, the
interleaved pair order, the per-pair ratios and the summary. Timings on the CPU mean nothing; only their
consistency is checked."""
from __future__ import annotations

import json
import os
import sys

import pytest

from nanovllm.utils.tiny_model import build_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_ab_latency  # noqa: E402

MODES = ("fusion-ms8", "nofusion-ms8")  # the default pair: coconut compile (~15 s on the CPU) vs eager


@pytest.fixture(scope="module")
def ab_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of bench_ab_latency.main (batches 1 and 2, 2 pairs each); returns the written JSON."""
    tmp = tmp_path_factory.mktemp("ab")
    ckpt = build_tiny_checkpoint(str(tmp / "tiny"))  # vocab 1024: prompt ids are capped at vocab_size - 1
    out = tmp / "ab.json"
    rc = bench_ab_latency.main(["--model", ckpt, "--device", "cpu", "--dtype", "float32", "--modes", ",".join(MODES),
                                "--batches", "1,2", "--prompt-len", "8", "--max-tokens", "10", "--pairs", "2",
                                "--max-model-len", "64", "--max-num-batched-tokens", "128", "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_both_engines_recorded(ab_result: dict) -> None:
    assert ab_result["modes"] == list(MODES)
    assert "error" not in ab_result
    for role, mode in zip("AB", MODES):
        eng = ab_result["engines"][role]
        assert eng["mode"] == mode and eng["num_kvcache_blocks"] > 0 and eng["build_s"] >= 0
    # A is built with half of --gpu-memory-utilization (default 0.9), B with all of it
    assert ab_result["engines"]["A"]["kwargs"]["gpu_memory_utilization"] == pytest.approx(0.45)
    assert ab_result["engines"]["B"]["kwargs"]["gpu_memory_utilization"] == pytest.approx(0.9)
    assert ab_result["engines"]["A"]["kwargs"]["compile_fusion"] is True
    assert ab_result["engines"]["B"]["kwargs"]["num_scheduler_steps"] == 8


def test_pairs_alternate_and_ratios_are_consistent(ab_result: dict) -> None:
    rows = ab_result["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        assert row["pairs"] == 2 and row["order"] == ["AB", "BA"]
        a, b = row["A"], row["B"]
        for side in (a, b):
            assert len(side["decode_step_ms"]) == 2 and all(x > 0 for x in side["decode_step_ms"])
            assert len(side["wall_s"]) == 2 and all(x > 0 for x in side["wall_s"])
            assert side["decode_step_ms_median"] == pytest.approx(sum(side["decode_step_ms"]) / 2, rel=1e-4)
        ratios = [sb / sa for sa, sb in zip(a["decode_step_ms"], b["decode_step_ms"])]
        assert row["ratios"] == pytest.approx(ratios, rel=1e-5)
        assert row["ratio_median"] == pytest.approx(sum(ratios) / 2, rel=1e-5)
        assert row["ratio_min"] == pytest.approx(min(ratios), rel=1e-5)
        assert row["ratio_max"] == pytest.approx(max(ratios), rel=1e-5)
        assert row["a_faster_pairs"] == sum(1 for x in row["ratios"] if x > 1)
        assert row["ratio_of_medians"] == pytest.approx(b["decode_step_ms_median"] / a["decode_step_ms_median"],
                                                        rel=1e-5)
        for side in (a, b):  # the engines' prefill step timers: one prefill of the batch per call
            assert len(side["prefill_ms"]) == 2 and all(x > 0 for x in side["prefill_ms"])
        prefill_ratios = [pb / pa for pa, pb in zip(a["prefill_ms"], b["prefill_ms"])]
        assert row["prefill_ratio_median"] == pytest.approx(sum(prefill_ratios) / 2, rel=1e-4)


def test_summary_matches_rows(ab_result: dict) -> None:
    s, rows = ab_result["summary"], ab_result["rows"]
    assert s["complete"] is True
    assert s["worst_ratio"] == min(r["ratio_median"] for r in rows)
    assert s["slower_than_1pct"] == [r["batch"] for r in rows if r["ratio_median"] < 0.99]
    assert s["a_within_1pct"] is (not s["slower_than_1pct"])
    assert ab_result["meta"]["command"].startswith("python ")


def test_summary_helpers() -> None:
    """batch_row / summarize on made-up timings: B/A per pair, medians, the 1 % threshold."""
    runs = {"A": [{"decode_step_ms": 2.0, "wall_s": 1.0, "prefill_ms": 10.0},
                  {"decode_step_ms": 1.0, "wall_s": 1.0, "prefill_ms": 20.0},
                  {"decode_step_ms": 1.0, "wall_s": 2.0, "prefill_ms": 10.0}],
            "B": [{"decode_step_ms": 1.0, "wall_s": 1.0, "prefill_ms": 12.0},
                  {"decode_step_ms": 1.5, "wall_s": 1.0, "prefill_ms": 10.0},
                  {"decode_step_ms": 0.985, "wall_s": 1.0, "prefill_ms": 9.0}]}
    row = bench_ab_latency.batch_row(4, ["AB", "BA", "AB"], runs)
    assert row["prefill_ratio_median"] == 0.9 and row["A"]["prefill_ms_median"] == 10.0  # ratios 1.2, 0.5, 0.9
    assert row["ratios"] == [0.5, 1.5, 0.985]
    assert (row["ratio_median"], row["ratio_min"], row["ratio_max"], row["a_faster_pairs"]) == (0.985, 0.5, 1.5, 1)
    assert row["ratio_of_medians"] == pytest.approx(1.0)
    ok = dict(row, batch=8, ratio_median=1.02)
    s = bench_ab_latency.summarize([row, ok], [4, 8, 16])
    assert s["slower_than_1pct"] == [4] and s["worst_ratio"] == 0.985 and s["worst_batch"] == 4
    assert s["a_within_1pct"] is False and s["complete"] is False


@pytest.mark.parametrize("modes, message", [
    ("eager", "exactly two modes"),
    ("eager,nofusion,fusion", "exactly two modes"),
    ("eager,warp-speed", "unknown mode"),
])
def test_bad_modes_are_rejected(modes: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_ab_latency.main(["--model", "/nonexistent", "--modes", modes])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--max-tokens", "1"), ("--pairs", "0"), ("--batches", "0,2"),
                                         ("--gpu-memory-utilization", "1.5")])
def test_bad_numbers_are_rejected(flag: str, value: str) -> None:
    with pytest.raises(SystemExit):
        bench_ab_latency.parse_args(["--modes", "eager,nofusion", flag, value])


def test_ab_plot_is_written(ab_result: dict, tmp_path) -> None:  # noqa: ANN001
    """benchmarks/plot_results.py draws the A/B result (steps and per-pair ratios); no rows -> no file."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plot_results

    out = tmp_path / "ab.png"
    assert plot_results.plot_latency_ab(ab_result, str(out), plt)
    assert out.stat().st_size > 10_000  # a 1320 x 480 figure, not an empty file
    assert not plot_results.plot_latency_ab({"rows": []}, str(tmp_path / "none.png"), plt)
    assert not (tmp_path / "none.png").exists()
