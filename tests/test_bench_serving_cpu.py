"""The serving benchmark's CPU smoke mode: a live server on the tiny model, a couple of seconds of requests."""
from __future__ import annotations

import argparse
import json
import os

import pytest

pytest.importorskip("openai")

from benchmarks.harness import serving  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_serving_benchmark_cpu_smoke(tiny_ckpt: str, tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server subprocess: the tiny model's ops are too small for threads
    parser = argparse.ArgumentParser()
    serving.add_arguments(parser)
    out = os.path.join(tmp_path, "serving.json")
    args = parser.parse_args(["--model", tiny_ckpt, "--device", "cpu", "--rates", "20,50", "--num-prompts", "3",
                              "--warmup-prompts", "2",
                              "--input-len", "6", "--output-len", "3", "--max-model-len", "64",
                              "--num-kvcache-blocks", "32", "--startup-timeout", "120", "--out", out])
    result = serving.run(args)
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    for key in ("gpu", "versions", "date", "commit", "command", "config", "rates", "offline"):
        assert key in result, key
    assert [r["rate"] for r in result["rates"]] == [20.0, 50.0]
    for r in result["rates"]:
        assert (r["completed"], r["failed"], r["total_output_tokens"]) == (3, 0, 9), r
        for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            assert set(r[name]) == {"p50", "p90", "p99", "mean"}
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] <= r["e2e_ms"]["p99"]
        assert r["output_throughput"] > 0
    assert result["offline"]["total_output_tokens"] == 9 and result["offline"]["output_throughput"] > 0
