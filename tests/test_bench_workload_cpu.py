"""The offline-workload benchmarks on the CPU with a tiny checkpoint: profile_workload's step accounting (model
steps, the K/V each step reads, the floors) and decode_order_ab's pairs. Timings on the CPU mean nothing and are
not checked."""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from benchmarks.harness import decode_order_ab, floors, profile_workload, workloads  # noqa: E402

WORKLOAD = ["--num-seqs", "4", "--max-input-len", "40", "--max-output-len", "20", "--min-input-len", "8",
            "--min-output-len", "8", "--device", "cpu"]


def test_profile_workload_counts_every_decode_step_and_its_kv(tiny_ckpt: str, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "workload-profile.json"
    assert profile_workload.main(["--model", tiny_ckpt, "--modes", "eager", *WORKLOAD, "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["command"].startswith("python -m benchmarks.harness.profile_workload --model ")
    g = d["modes"]["eager"]["groups"]
    prompts, max_tokens = workloads.nano_vllm_workload(4, 0, 40, 20, 8, 8)
    decode = [v for k, v in g.items() if k.startswith("decode ")]
    assert g["prefill"]["steps"] == 1  # every prompt fits one prefill step
    # one step per round on the CPU: the batch decodes until its longest request is done (the first token is the
    # prefill's)
    assert sum(v["model_steps"] for v in decode) == max(max_tokens) - 1
    # decode step j of a request with a p-token prompt reads the K/V of p + j tokens, its new one included
    live = sum(len(p) + j for p, m in zip(prompts, max_tokens) for j in range(1, m))
    sizes = floors.qwen3_sizes(floors.load_hf_config(tiny_ckpt))
    bw = d["copy_bandwidth_tb_s"] * 1e12
    assert g["decode"]["kv_floor_s"] == pytest.approx(live * sizes["kv_bytes_per_token"] / bw, rel=1e-3, abs=1e-4)
    assert g["decode"]["weights_floor_s"] == pytest.approx(
        (max(max_tokens) - 1) * sizes["weight_bytes"] / bw, rel=1e-3, abs=1e-4)
    assert g["decode"]["wall_s"] == pytest.approx(sum(v["wall_s"] for v in decode), abs=1e-3)


def test_decode_order_ab_pairs_and_restores_the_order(tiny_ckpt: str, tmp_path) -> None:  # noqa: ANN001
    from nanovllm.engine import scheduler

    before = scheduler.decode_order
    out = tmp_path / "decode-order.json"
    flags = WORKLOAD[:6] + ["--device", "cpu"]  # no minimum lengths here: 100, or the maximum when below
    assert decode_order_ab.main(["--model", tiny_ckpt, "--mode", "eager", *flags, "--pairs", "2",
                                 "--out", str(out)]) == 0
    assert scheduler.decode_order is before
    d = json.loads(out.read_text())
    assert len(d["pairs"]) == 2
    ratios = sorted(p["longest"]["output_tokens_per_s"] / p["batch"]["output_tokens_per_s"] for p in d["pairs"])
    assert d["ratio_longest_over_batch"]["median"] == pytest.approx(sum(ratios) / 2, rel=1e-4)
    assert d["longest_fraction_of_floor"] == pytest.approx(
        d["longest_median_tokens_per_s"] / d["floor"]["output_tokens_per_s"], abs=1e-4)
