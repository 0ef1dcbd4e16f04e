"""Engine settings given as numpy integers, the seed's range, and ``LLM.chat``'s argument checks.

Every refused value raises before any work (``engine.stats.steps`` unchanged) with a message that names the field,
or the conversation and message index; the engine stays usable (no KV block held) afterwards.
"""
from __future__ import annotations

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.config import SEED_MAX, SEED_MIN

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GREEDY4 = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_ckpt: str) -> LLM:
    return LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, num_kvcache_blocks=12, max_num_seqs=4,
               max_model_len=128)


# ---- numpy integers and the seed ---------------------------------------------------------------------------
def test_numpy_integer_settings_are_accepted_as_python_ints(tiny_ckpt: str, llm: LLM) -> None:
    kw = dict(kvcache_block_size=np.int64(16), num_kvcache_blocks=np.int32(12), max_num_seqs=np.uint8(4),
              max_model_len=np.int16(128), max_num_batched_tokens=np.int64(512), tensor_parallel_size=np.int64(1),
              num_scheduler_steps=np.int8(2), seed=np.uint64(2**63 + 5), gpu_memory_utilization=np.float32(0.5))
    engine = LLM(tiny_ckpt, device="cpu", **kw)
    cfg = engine.config
    for name, value in kw.items():
        got = getattr(cfg, name)
        assert type(got) is (float if name == "gpu_memory_utilization" else int), name
        assert got == value, name
    prompt = [[3, 14, 15, 92, 65]]
    # the same tokens as the engine built with Python ints
    assert engine.generate(prompt, GREEDY4, use_tqdm=False)[0]["token_ids"] == \
        llm.generate(prompt, GREEDY4, use_tqdm=False)[0]["token_ids"]


@pytest.mark.parametrize("seed", [SEED_MAX + 1, SEED_MIN - 1, 10**30, np.float64(3.0)])
def test_seed_outside_the_generators_range_is_named(tiny_ckpt: str, seed: object) -> None:
    exc = TypeError if isinstance(seed, float) else ValueError
    with pytest.raises(exc, match=r"^seed must be"):
        LLM(tiny_ckpt, device="cpu", seed=seed)


@pytest.mark.parametrize("seed", [SEED_MIN, -1, 0, SEED_MAX, np.int64(-7)])
def test_seed_at_the_ends_of_the_range_runs(tiny_ckpt: str, seed: int) -> None:
    engine = LLM(tiny_ckpt, device="cpu", seed=seed, num_kvcache_blocks=4, max_model_len=64)
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True),
                          use_tqdm=False)[0]
    assert len(out["token_ids"]) == 3 and all(0 <= t < 1024 for t in out["token_ids"])


@pytest.mark.parametrize("name, value", [("max_num_seqs", np.bool_(True)), ("max_num_seqs", np.float32(4.0)),
                                         ("kvcache_block_size", "16"), ("gpu_memory_utilization", np.bool_(True))])
def test_non_integers_still_refused(tiny_ckpt: str, name: str, value: object) -> None:
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        LLM(tiny_ckpt, device="cpu", **{name: value})


# ---- LLM.chat ----------------------------------------------------------------------------------------------
USER = {"role": "user", "content": "hello there"}


@pytest.mark.parametrize("conversations, exc, match", [
    (USER, TypeError, r"conversations must be a list .* got dict"),
    (None, TypeError, r"conversations must be a list .* got NoneType"),
    ("hello", TypeError, r"conversations must be a list .* got str"),
    ([], ValueError, r"conversations is empty"),
    ([[USER], []], ValueError, r"conversation 1 is empty"),
    ([[USER], USER], TypeError, r"conversation 1: expected a list of message dicts, got dict"),
    ([[USER], [USER, "hi"]], TypeError, r"conversation 1, message 1: expected a dict"),
    ([USER, {"content": "x"}], ValueError, r"conversation 0, message 1: missing 'role'"),
    ([[USER, USER, {"role": "user"}]], ValueError, r"conversation 0, message 2: missing 'content'"),
    ([[USER], [{}]], ValueError, r"conversation 1, message 0: missing 'role' and 'content'"),
    ([[USER], [USER, {"role": "wizard", "content": "x"}]], ValueError,
     r"conversation 1, message 1: unknown role 'wizard'"),
    ([{"role": "user", "content": None}], TypeError, r"conversation 0, message 0: content must be a string"),
])
def test_chat_refuses_malformed_conversations(llm: LLM, conversations: object, exc: type, match: str) -> None:
    steps = llm.engine.stats.steps
    with pytest.raises(exc, match=match):
        llm.chat(conversations, GREEDY4, use_tqdm=False)
    assert llm.engine.stats.steps == steps and llm.kv_cache_usage() == 0.0


def test_chat_one_conversation_or_a_list_of_them(llm: LLM) -> None:
    conv = [{"role": "system", "content": "be brief"}, USER]
    one = llm.chat(conv, GREEDY4, use_tqdm=False)
    many = llm.chat([conv, [USER]], GREEDY4, use_tqdm=False)
    prompt = llm.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    direct = llm.generate([prompt], GREEDY4, use_tqdm=False)
    assert len(one) == 1 and len(many) == 2
    assert one[0]["token_ids"] == many[0]["token_ids"] == direct[0]["token_ids"]
    assert len(many[1]["token_ids"]) == 4
