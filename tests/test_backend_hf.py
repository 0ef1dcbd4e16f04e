"""The transformers recipe of docs/backend.md on the CPU: greedy `generate` with a static cache and the forward
compiled by coconut equals eager generation in float32 (tiny random Qwen3 and Llama built from transformers' own
config classes), and the decode graph fuses every norm that feeds a linear."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusion_pass  # noqa: E402

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("fresh_compile_state", "one_thread")

LAYERS = 2
KW = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
          num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**KW, tie_word_embeddings=True)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**KW, tie_word_embeddings=False)).eval()


def greedy(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=0, cache_implementation="static", **kw)


def decode_sites_ok() -> None:
    """Every decode graph fuses the 2L norms before q/k/v and gate/up (all but the first with the residual add)
    and the final norm before lm_head, read through generate's last-token slice; q_norm / k_norm feed RoPE and are
    left alone, each with its reason."""
    stats = fusion_pass.all_stats()
    assert stats, "the pass never ran"
    for s in stats:
        assert (s["sites"], s["residual_sites"], s["linears"]) == (2 * LAYERS + 1, 2 * LAYERS, 5 * LAYERS + 1), s
        assert s["candidates"] == 2 * LAYERS + 1 and s["norms_seen"] == 4 * LAYERS + 1, s
        assert len(s["skipped"]) == 2 * LAYERS and all("not a linear" in r for r in s["skipped"]), s


def test_qwen3_generate_static_cache_compile_config_equals_eager():
    """generate's own compile of the decode step (CompileConfig), with backend="coconut"."""
    model = tiny("qwen3")
    ids = torch.randint(0, KW["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(1))
    ref = greedy(model, ids)
    config = transformers.CompileConfig(backend="coconut", mode="default", fullgraph=True)
    config._compile_all_devices = True  # generate compiles on CUDA only, unless told (CPU test)
    out = greedy(model, ids, compile_config=config)
    assert torch.equal(out, ref), (out, ref)
    assert len(fusion_pass.all_stats()) == 1  # one decode graph
    decode_sites_ok()


def test_llama_generate_static_cache_compiled_forward_equals_eager():
    """model.forward replaced by its coconut compile (mode reduce-overhead: CUDA graphs on a GPU, none here)."""
    model = tiny("llama")
    ids = torch.randint(0, KW["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(2))
    ref = greedy(model, ids)
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend="coconut", mode="reduce-overhead", fullgraph=True)
    try:
        out = greedy(model, ids)
    finally:
        model.forward = eager_forward
    assert torch.equal(out, ref), (out, ref)
    stats = fusion_pass.all_stats()  # the prefill graph and the decode graph
    assert len(stats) == 2 and all(s["sites"] == 2 * LAYERS + 1 for s in stats), stats
