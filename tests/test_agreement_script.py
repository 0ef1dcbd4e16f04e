"""scripts/check_real_model_agreement.py on the CPU with the tiny checkpoint: float32 runs agree fully with each
other and with the float32 reference, a bfloat16 run reports consistent counts under the new keys, and the
teacher-forced float32 gap at a divergence equals the logit difference computed directly."""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROMPTS, TOKENS = 4, 6


@pytest.fixture(scope="module")
def script() -> Any:
    """The script loaded as a module (it is not part of a package)."""
    spec = importlib.util.spec_from_file_location("check_agreement",
                                                  os.path.join(ROOT, "scripts", "check_real_model_agreement.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(script: Any, ckpt: str, tmp_path: Any, dtype: str) -> dict[str, Any]:
    out = tmp_path / f"{dtype}.json"
    assert script.main(["--model", ckpt, "--device", "cpu", "--dtype", dtype, "--num-prompts", str(NUM_PROMPTS),
                        "--tokens", str(TOKENS), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_float32_run_agrees_fully_with_the_float32_reference(script, tiny_ckpt: str, tmp_path) -> None:  # noqa: ANN001
    r = run(script, tiny_ckpt, tmp_path, "float32")
    assert r["num_prompts"] == NUM_PROMPTS and r["reference_dtype"] == "float32"
    full = {"all_tokens_equal": NUM_PROMPTS, "fraction": 1.0, "mean_common_prefix": float(TOKENS)}
    assert {k: r[k] for k in full} == full
    assert r["vs_float32"] == {"engine": full, "transformers": full}
    assert r["divergences"]["count"] == 0 and r["divergences"]["rows"] == []


def test_bfloat16_run_reports_consistent_counts(script, tiny_ckpt: str, tmp_path) -> None:  # noqa: ANN001
    r = run(script, tiny_ckpt, tmp_path, "bfloat16")
    n = r["num_prompts"]
    assert n == NUM_PROMPTS and r["dtype"] == "bfloat16"
    for part in (r, r["vs_float32"]["engine"], r["vs_float32"]["transformers"]):
        assert 0 <= part["all_tokens_equal"] <= n
        assert part["fraction"] == round(part["all_tokens_equal"] / n, 3)
        assert part["all_tokens_equal"] * TOKENS / n <= part["mean_common_prefix"] <= TOKENS
    div = r["divergences"]
    assert div["count"] == n - r["all_tokens_equal"] == len(div["rows"]) == div["with_reference_logits"]
    assert div["spacing_dtype"] == "bfloat16"
    assert (div["below_spacing"] is None) == (div["count"] == 0)


def test_divergence_gap_is_the_float32_logit_difference(script, tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    prompts = [[5, 17, 300, 41], [9, 8, 7]]
    theirs = script.hf_greedy(hf_model, prompts, 4, "cpu")
    k = 2  # the engine takes float32's second choice at position k of prompt 1, after the common prefix
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompts[1] + theirs[1][:k]])).logits[0, -1]
    top = torch.topk(logits, 2)
    assert top.indices[0].item() == theirs[1][k]
    mine = [theirs[0], theirs[1][:k] + [int(top.indices[1])] + theirs[1][k + 1:]]
    rows = script.divergence_rows(hf_model, tok, prompts, mine, theirs, "cpu", torch.bfloat16)
    assert [(r["prompt"], r["position"]) for r in rows] == [(1, k)]
    margin = (top.values[0] - top.values[1]).item()
    assert rows[0]["gap"] == pytest.approx(margin, abs=1e-4)
    assert rows[0]["top2_margin"] == pytest.approx(margin, abs=1e-4)
    assert rows[0]["reference_token"] == rows[0]["transformers_token"] == tok.decode([theirs[1][k]])
    big = max(abs(top.values[0].item()), abs(top.values[1].item()))
    assert rows[0]["spacing"] == 2.0 ** (int(torch.tensor(big).log2().floor()) - 7)
    assert rows[0]["near_tie"] == (margin < rows[0]["spacing"])
    summary = script.summarize_divergences(rows, "bfloat16")
    assert summary["count"] == 1 and summary["median_gap"] == summary["max_gap"] == rows[0]["gap"]


def test_rounding_spacing_of_bfloat16(script) -> None:  # noqa: ANN001
    assert script.rounding_spacing(25.36, torch.bfloat16) == 0.125  # 2**(4 - 7)
    assert script.rounding_spacing(-3.0, torch.bfloat16) == 2.0 ** -6
    assert script.rounding_spacing(1.0, torch.float32) == 2.0 ** -23
    # the spacing is the gap between neighbouring bfloat16 numbers at that magnitude
    x = torch.tensor(25.36, dtype=torch.bfloat16)
    assert (torch.nextafter(x, torch.tensor(100.0, dtype=torch.bfloat16)) - x).item() == 0.125
