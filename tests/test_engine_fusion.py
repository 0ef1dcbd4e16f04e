"""Issue 3 on the engine itself: LLM(compile_fusion=True) compiles the whole forward as one graph with the coconut
backend; the post-grad graph (dumped by depyf) holds exactly 2L+1 coconut calls, and greedy tokens equal the
unfused engine's (float32, CPU)."""
from __future__ import annotations

import glob
import os
import re

import pytest
import torch

import fusion_pass
from conftest import random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.utils.tiny_model import build_tiny_checkpoint

LAYERS = 3


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny3")), num_hidden_layers=LAYERS)


pytestmark = pytest.mark.usefixtures("fresh_compile_state")  # a cache hit would skip the pass


def count_post_grad(dump_dir: str) -> list[dict[str, int]]:
    """Per dumped post-grad graph: coconut calls (all, and the residual form) and the mm/addmm left."""
    files = sorted(glob.glob(os.path.join(dump_dir, "**", "*AFTER_POST_GRAD*.py"), recursive=True))
    assert files, f"depyf dumped no post-grad graph into {dump_dir}"
    out = []
    for f in files:
        text = open(f).read()
        out.append({"coconut": len(re.findall(r"= torch\.ops\.coconut\.\w+\.default\(", text)),
                    "residual": len(re.findall(r"= torch\.ops\.coconut\.add_rms_norm_linear\.default\(", text)),
                    "mm": len(re.findall(r"= torch\.ops\.aten\.(?:mm|addmm)\.default\(", text)),
                    "attention": len(re.findall(r"torch\.ops\.nanovllm\.attention\.default\(", text))})
    return out


def test_engine_graph_has_2L_plus_1_fused_sites_and_same_tokens(ckpt3: str, tmp_path) -> None:  # noqa: ANN001
    import depyf

    prompts = random_prompts([1, 5, 16, 33, 64, 100, 130, 7], seed=21)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = LLM(ckpt3, device="cpu", kvcache_block_size=16, max_model_len=256)
    ref = [o["token_ids"] for o in plain.generate(prompts, params, use_tqdm=False)]

    dump = str(tmp_path / "depyf")
    with depyf.prepare_debug(dump):
        fused = LLM(ckpt3, device="cpu", kvcache_block_size=16, max_model_len=256, compile_fusion=True)
        outs = fused.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == ref
    assert fused.kv_cache_usage() == 0.0

    graphs = count_post_grad(dump)
    for g in graphs:  # every compiled graph (prefill/decode sizes share one; a 1-token batch may get its own)
        assert g["attention"] == LAYERS, g  # one graph: no graph break around attention
        assert g["coconut"] == 2 * LAYERS + 1, g  # input norm -> qkv, post-attention norm -> gate_up, norm -> lm_head
        assert g["residual"] == 2 * LAYERS, g  # every site but layer 0's input norm has a residual add
        assert g["mm"] == 2 * LAYERS, g  # only o_proj and down_proj stay plain matmuls
    assert fusion_pass.last_stats()["sites"] == 2 * LAYERS + 1


def test_prefill_steps_run_their_own_inductor_compile(ckpt3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU layout of compile_fusion forced on the CPU: prefill steps through a plain-Inductor compile of the
    model, decode steps through the coconut one. Greedy tokens equal the plain engine's, every prefill step goes
    through ``prefill_forward``, and only the decode graphs hold the 2L+1 coconut sites."""
    from nanovllm.engine import compilation

    monkeypatch.setattr(compilation, "separate_prefill_compile", lambda fusion, device_type: fusion)
    backends: list[str] = []
    compile_model = compilation.compile_model

    def spy(model: torch.nn.Module, backend):  # noqa: ANN001, ANN202 - a name or the engine's backend callable
        backends.append(getattr(backend, "__name__", backend))
        return compile_model(model, backend)

    monkeypatch.setattr(compilation, "compile_model", spy)
    prompts = random_prompts([1, 6, 40, 75], seed=5)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = LLM(ckpt3, device="cpu", kvcache_block_size=16, max_model_len=256)
    ref = [o["token_ids"] for o in plain.generate(prompts, params, use_tqdm=False)]

    fused = LLM(ckpt3, device="cpu", kvcache_block_size=16, max_model_len=256, compile_fusion=True,
                max_num_batched_tokens=64)  # the 75-token prompt takes two chunked prefill steps
    runner = fused.engine.model_runner
    assert backends == ["coconut", "inductor"] and runner.prefill_forward is not runner.forward
    prefill_calls = []
    prefill_forward = runner.prefill_forward
    runner.prefill_forward = lambda *args: prefill_calls.append(args[0].shape[0]) or prefill_forward(*args)
    outs = fused.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == ref
    assert sum(prefill_calls) == sum(len(p) for p in prompts) and max(prefill_calls) <= 64
    stats = fusion_pass.all_stats()  # the pass ran only on coconut's (decode) graphs
    assert stats and all(s["sites"] == 2 * LAYERS + 1 for s in stats), stats
    assert fused.engine.stats.prefill_tokens == sum(len(p) for p in prompts)
