"""The prefill part of benchmarks/profile.py on the CPU with a tiny checkpoint: the coconut engine's prefill runs the fused
ops (they appear in its profile), the Inductor-less plain engine's does not, and TTFTs are recorded per rep."""
from __future__ import annotations

import json
import os
import sys

from nanovllm.utils.tiny_model import build_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.harness import profile_prefill  # noqa: E402


def test_profile_prefill_on_cpu(tmp_path) -> None:  # noqa: ANN001
    ckpt = build_tiny_checkpoint(str(tmp_path / "tiny"))
    out = tmp_path / "prefill.json"
    rc = profile_prefill.main(["--model", ckpt, "--device", "cpu", "--dtype", "float32", "--prompt-len", "24",
                               "--warmup", "1", "--reps", "3", "--profiled", "1", "--top", "40", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    modes = {m["mode"]: m for m in res["modes"]}
    assert set(modes) == {"fusion", "nofusion"} and res["prompt_len"] == 24
    for m in modes.values():
        assert len(m["ttft_ms"]) == 3 and all(t > 0 for t in m["ttft_ms"])
        assert m["per_generate"]["self_cpu_ms"] > 0
    names = {mode: {r["name"] for r in m["top_self_cpu"]} for mode, m in modes.items()}
    assert any(n.startswith("coconut::") for n in names["fusion"]), names["fusion"]
    assert not any(n.startswith("coconut::") for n in names["nofusion"])


def test_prefill_steps_get_their_own_inductor_compile_only_with_fusion_on_cuda() -> None:
    """compile_fusion on CUDA: prefill steps run an Inductor-compiled model (the coconut op's host cost is not
    paid where no CUDA graph replays); one forward elsewhere."""
    from nanovllm.engine import model_runner

    assert model_runner.separate_prefill_compile(True, "cuda") is True
    assert model_runner.separate_prefill_compile(True, "cpu") is False
    assert model_runner.separate_prefill_compile(False, "cuda") is False


def test_profile_prefill_modes() -> None:
    assert profile_prefill.parse_args(["--modes", "nofusion,fusion"]).modes == ["nofusion", "fusion"]
