"""benchmarks/bench_e2e.py on the CPU with a tiny checkpoint: the driver logic behind the committed GPU results
(one engine build per group of modes that differ only in ``num_scheduler_steps``, the headline throughput mode,
the speedup keys, the token counts). Timings on the CPU mean nothing and are not checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nanovllm.utils.tiny_model import build_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wide_vocab_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with a 12,000-token vocabulary: the throughput workload draws ids up to 10,000."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-v12k")), vocab_size=12000)


def test_bench_e2e_groups_modes_and_writes_results(wide_vocab_ckpt: str, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "e2e"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_e2e.py"), "--model", wide_vocab_ckpt,
           "--device", "cpu", "--dtype", "float32", "--modes", "nofusion,nofusion-ms8", "--what", "latency,throughput",
           "--throughput-modes", "nofusion-ms8,nofusion", "--num-seqs", "5", "--min-input-len", "8",
           "--max-input-len", "24", "--min-output-len", "3", "--max-output-len", "20", "--latency-batches", "1,3",
           "--latency-max-tokens", "6", "--latency-reps", "1:1,3:1", "--latency-prompt-len", "8",
           "--max-model-len", "64", "--max-num-seqs", "4", "--out-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("engine built in") == 1  # both modes on one engine

    lat = json.loads((out / "latency-h200.json").read_text())
    assert set(lat["modes"]) == {"nofusion", "nofusion-ms8"}
    for mode in ("nofusion", "nofusion-ms8"):
        assert set(lat["modes"][mode]["batches"]) == {"1", "3"}
        assert all(r["tpot_ms"] is not None for r in lat["modes"][mode]["batches"].values())
    assert set(lat["speedups"]["nofusion_over_nofusion-ms8"]) == {"1", "3"}
    e2e = lat["meta"]["e2e"]
    assert e2e["engine_kwargs"]["nofusion-ms8"]["num_scheduler_steps"] == 8
    assert e2e["engine_kwargs"]["nofusion"]["num_scheduler_steps"] == 1
    assert e2e["build_s"]["nofusion"] == e2e["build_s"]["nofusion-ms8"]

    tp = json.loads((out / "throughput-h200.json").read_text())
    assert tp["headline_mode"] == "nofusion-ms8"  # the first of --throughput-modes, not of --modes
    want = tp["workload"]["output_tokens"]
    for mode in ("nofusion", "nofusion-ms8"):
        m = tp["modes"][mode]
        assert m["output_tokens"] == want and m["kv_cache_usage_after"] == 0.0
    assert tp["output_tokens_per_s"] == tp["modes"]["nofusion-ms8"]["output_tokens_per_s"]
