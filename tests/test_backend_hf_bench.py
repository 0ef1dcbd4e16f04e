"""The transformers benchmark (benchmarks/harness/hf_decode.py) in its CPU smoke mode: the JSON it writes, and
equal greedy tokens from Inductor and coconut."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from benchmarks.harness import hf_decode  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_compile_state", "one_thread")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    hf_decode.add_arguments(parser)
    return parser.parse_args(argv)


def test_smoke_run_writes_json_and_backends_agree(tmp_path):
    out = tmp_path / "hf.json"
    args = parse(["--device", "cpu", "--tiny", "--models", "qwen3-0.6b", "--modes", "default", "--batches", "2",
                  "--replays", "2", "--pairs", "2", "--context", "8", "--prompt-len", "5", "--new-tokens", "4",
                  "--generate-runs", "1", "--out", str(out)])
    result = hf_decode.run(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {"gpu", "torch", "triton", "transformers", "date", "git_commit", "command"} <= set(result["meta"])
    step, gen = result["rows"]
    assert "error" not in step and "error" not in gen, result["rows"]
    assert (step["part"], step["model"], step["mode"], step["batch"]) == ("step", "qwen3-0.6b", "default", 2)
    assert len(step["pair_ratios"]) == 2 and step["inductor_ms"] > 0 and step["coconut_ms"] > 0
    assert step["argmax_agreement"] == 1.0
    assert step["fused_sites"] == 3  # 1 layer: qkv, gate_up, lm_head
    assert gen["tokens_equal"] is True and gen["token_agreement"] == 1.0
    assert gen["fused_sites"] == 3  # the final norm reaches lm_head through generate's last-token slice
    assert (gen["launched_sites"], gen["left_to_inductor"]) == (0, 0)  # on the CPU every site stays an op
    assert len(gen["pair_ratios"]) == 1 and gen["pair_ratios"][0] > 0
    assert gen["inductor_tok_s"] > 0 and gen["coconut_tok_s"] > 0
    summary = result["summary"]
    assert set(summary["step_worst_ratio"]) == {"qwen3-0.6b/default"} and summary["generate_tokens_equal"] is True


def test_bad_arguments_are_refused_before_any_work():
    with pytest.raises(ValueError, match="--replays must be >= 1"):
        hf_decode.run(parse(["--device", "cpu", "--replays", "0"]))
    with pytest.raises(ValueError, match="unknown model 'gpt2'"):
        hf_decode.run(parse(["--device", "cpu", "--models", "gpt2"]))
    with pytest.raises(ValueError, match="needs --smollm2-dir"):
        hf_decode.run(parse(["--device", "cpu", "--models", "smollm2"]))
