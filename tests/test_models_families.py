"""Issue 17, acceptance 2: tiny random checkpoints written by transformers' own classes (a Llama-3-style one with
llama3 RoPE scaling, an untied head and GQA; a Qwen2-style one with non-zero q/k/v biases; a Mistral one) give the
same greedy ids as transformers for 8 prompts, and tensor parallel size 2 (gloo) gives the same ids as size 1.
The RoPE frequencies equal transformers' own for every supported type."""
from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

from conftest import hf_greedy, random_prompts
from nanovllm import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 1024
MAX_TOKENS = 10
LENGTHS = [1, 5, 16, 17, 40, 64, 100, 150]
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
KW = dict(device="cpu", kvcache_block_size=16, max_model_len=256)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}


def make_family_checkpoint(path: str, family: str, seed: int = 0, **overrides: Any) -> str:
    """Write a random checkpoint of ``family`` ("llama", "qwen2", "mistral") with transformers' classes, every
    parameter random (norm weights near 1, biases non-zero), and the tiny model's tokenizer."""
    import transformers

    from nanovllm.utils.tiny_model import train_tokenizer

    if family == "llama":
        config = transformers.LlamaConfig(**{**COMMON, "tie_word_embeddings": False, "head_dim": 16,
                                             "rope_parameters": LLAMA3_ROPE, **overrides})
        model_cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**{**COMMON, "tie_word_embeddings": True, **overrides})
        model_cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.MistralConfig(**{**COMMON, "tie_word_embeddings": False, "sliding_window": None,
                                               **overrides})
        model_cls = transformers.MistralForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    train_tokenizer().save_pretrained(path)
    return path


CASES = {
    "llama": {},  # llama3 RoPE, untied head, GQA 4/2, head_dim given
    "qwen2": {},  # q/k/v biases, tied head
    "mistral": {},
    # Llama 2 style with every optional bias on, head_dim absent (hidden / heads) and a tied head
    "llama_bias": {"attention_bias": True, "mlp_bias": True, "head_dim": None, "tie_word_embeddings": True,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def family_ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    family = request.param.split("_")[0]
    path = make_family_checkpoint(str(tmp_path_factory.mktemp(request.param)), family, **CASES[request.param])
    if "head_dim" in CASES[request.param]:  # as in Llama 2's config.json: no head_dim key at all
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        config.pop("head_dim", None)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    return request.param, path


def test_greedy_equals_transformers_and_tp2_equals_tp1(family_ckpt: tuple[str, str]) -> None:
    from transformers import AutoModelForCausalLM

    case, path = family_ckpt
    family = case.split("_")[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if case in ("qwen2", "llama_bias"):  # the biases the test relies on are really there and non-zero
        assert hf.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    if case == "llama_bias":
        layer = hf.model.layers[0]
        assert layer.mlp.down_proj.bias.abs().sum() > 0 and layer.self_attn.o_proj.bias is not None
    prompts = random_prompts(LENGTHS, vocab=VOCAB, seed=3)
    reference = [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]
    llm = LLM(path, **KW)
    assert type(llm.engine.model_runner.model).__name__.lower().startswith(family)
    assert [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference
    llm.shutdown()
    if case in ("mistral", "llama_bias"):  # the same layers as the llama case, whose TP run covers them
        return
    tp2 = LLM(path, tensor_parallel_size=2, **KW)
    try:
        assert [o["token_ids"] for o in tp2.generate(prompts, GREEDY, use_tqdm=False)] == reference
    finally:
        tp2.shutdown()


ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_inv_freq_equals_transformers(case: str) -> None:
    """Bit-equal float32 frequencies (Llama-3.2-1B's head_dim 64 and its llama3 scaling among the cases)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from nanovllm.layers.rotary_embedding import rope_inv_freq

    config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64,
                                      max_position_embeddings=131072, rope_parameters=ROPE_CASES[case])
    mine = rope_inv_freq(64, config)
    if case == "default":
        ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config).inv_freq
    else:
        ref, scale = ROPE_INIT_FUNCTIONS[case](config, torch.device("cpu"))
        assert scale == 1.0
    assert mine.dtype == ref.dtype == torch.float32
    assert torch.equal(mine, ref)


def test_rope_parameters_and_legacy_rope_scaling_agree() -> None:
    """The transformers 5 ``rope_parameters`` dict and a plain object with the older ``rope_scaling`` /
    ``rope_theta`` attributes give the same frequencies."""
    from types import SimpleNamespace

    import transformers

    from nanovllm.layers.rotary_embedding import rope_inv_freq

    new = transformers.LlamaConfig(rope_parameters=ROPE_CASES["llama3"], max_position_embeddings=131072)
    old_scaling = {k: v for k, v in ROPE_CASES["llama3"].items() if k not in ("rope_type", "rope_theta")}
    old = SimpleNamespace(rope_scaling={"type": "llama3", **old_scaling}, rope_theta=500000.0)
    assert torch.equal(rope_inv_freq(64, new), rope_inv_freq(64, old))
    assert not torch.equal(rope_inv_freq(64, new), rope_inv_freq(64, SimpleNamespace(rope_theta=500000.0)))


def test_registry_resolves_model_type_without_architectures() -> None:
    import transformers

    from nanovllm.models.registry import model_class

    config = transformers.Qwen2Config(**COMMON)
    config.architectures = None
    assert model_class(config).__name__ == "Qwen2ForCausalLM"


@pytest.mark.usefixtures("fresh_compile_state")
def test_fusion_on_biased_projections(tmp_path) -> None:  # noqa: ANN001
    """Qwen2's q/k/v bias: the input norm -> qkv site is a norm -> addmm; all 2L+1 sites fuse, tokens unchanged."""
    import fusion_pass

    path = make_family_checkpoint(str(tmp_path / "qwen2"), "qwen2")
    prompts = random_prompts([3, 17, 40], vocab=VOCAB, seed=4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ref = [o["token_ids"] for o in LLM(path, **KW).generate(prompts, params, use_tqdm=False)]
    fused = LLM(path, compile_fusion=True, **KW)
    assert [o["token_ids"] for o in fused.generate(prompts, params, use_tqdm=False)] == ref
    stats = fusion_pass.all_stats()
    assert stats and all(s["sites"] == 2 * COMMON["num_hidden_layers"] + 1 for s in stats), stats
