"""Every bad input gets a clear error before any work, nothing hangs, nothing leaks, outputs stay exact.

CPU, float32, the tiny checkpoint (tests/conftest.py) unless marked. References: greedy tokens of transformers
in float32 (``hf_greedy``), the engine's own solo runs, the softmax of known logits (sampler frequencies), and
the block manager's invariants. After every refused request the SAME engine must still give the reference
tokens and hold no KV block (``healthy``).
"""
from __future__ import annotations

import json
import math
import shutil
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from conftest import random_prompts
from nanovllm import LLM, SamplingParams
from test_scheduler_random import StepChecker, full_recompute_greedy

def hf_greedy(model, prompt: list[int], n: int, eos_token_id: int | None = None) -> list[int]:  # noqa: ANN001
    """Greedy continuation by transformers (float32), the whole sequence re-run per token, stopping after
    ``eos_token_id``.

    Not conftest.hf_greedy: ``generate(pad_token_id=0)`` infers an attention mask that hides every prompt
    token equal to 0 (the pad id), which makes the reference wrong for prompts that contain token 0.
    """
    tokens = full_recompute_greedy(model, prompt, n)
    return tokens[:tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


GREEDY8 = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
HEALTH_PROMPTS = random_prompts([5, 33], seed=100)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def llm(tiny_ckpt: str) -> LLM:
    """One engine shared by the module: 14 blocks of 16 (224 tokens), 8 sequences, 256 tokens per sequence."""
    return LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, num_kvcache_blocks=14, max_num_seqs=8,
               max_model_len=256)


@pytest.fixture(scope="module")
def health_ref(hf_model) -> list[list[int]]:  # noqa: ANN001
    return [hf_greedy(hf_model, p, 8) for p in HEALTH_PROMPTS]


@pytest.fixture
def healthy(llm: LLM, health_ref: list[list[int]]):  # noqa: ANN201
    """Call after an error: the engine holds no block, keeps its invariants and still gives exact tokens."""

    def check(engine: LLM = llm) -> None:
        assert engine.kv_cache_usage() == 0.0
        assert not engine.engine.scheduler.waiting and not engine.engine.scheduler.running
        engine.engine.block_manager.check_invariants()
        outs = engine.generate(HEALTH_PROMPTS, GREEDY8, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == health_ref
        assert engine.kv_cache_usage() == 0.0

    return check


@contextmanager
def no_work_done(engine: LLM) -> Iterator[None]:
    """Asserts that the block does not run a single engine step (errors must come before any work)."""
    steps = engine.engine.stats.steps
    yield
    assert engine.engine.stats.steps == steps, "work started before the error"


@contextmanager
def bounded(engine: LLM, max_steps: int) -> Iterator[StepChecker]:
    """Fails past ``max_steps`` engine steps (a hang) and checks the pool's invariants after every step."""
    checker = StepChecker(engine, max_steps, "bounded")
    try:
        yield checker
    finally:
        checker.close()


# ---- 1-6: bad requests and settings ------------------------------------------------------------------------
@pytest.mark.parametrize("empty", ["", []])
def test_empty_prompt_in_batch_names_its_index(llm: LLM, healthy, empty) -> None:  # noqa: ANN001
    batch = [HEALTH_PROMPTS[0], [1, 2, 3], empty, "hello"]
    with no_work_done(llm), pytest.raises(ValueError, match=r"prompt 2 is empty"):
        llm.generate(batch, GREEDY8, use_tqdm=False)
    healthy()


@pytest.mark.parametrize("length", [256, 257, 1000])
def test_prompt_without_room_under_max_model_len(llm: LLM, healthy, length: int) -> None:  # noqa: ANN001
    prompt = random_prompts([length], seed=length)[0]
    with no_work_done(llm), pytest.raises(ValueError, match=r"prompt 1 .*max_model_len=256"):
        llm.generate([[5, 6], prompt], GREEDY8, use_tqdm=False)
    healthy()


def test_prompt_one_below_max_model_len_generates_one_token(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    prompt = random_prompts([63], seed=3)[0]
    engine = LLM(tiny_ckpt, device="cpu", max_model_len=64, num_kvcache_blocks=8)
    out = engine.generate([prompt], GREEDY8, use_tqdm=False)[0]
    assert out["token_ids"] == hf_greedy(hf_model, prompt, 1) and out["finish_reason"] == "length"


def test_request_larger_than_the_pool_fails_at_once(tiny_ckpt: str, healthy) -> None:  # noqa: ANN001
    small = LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, num_kvcache_blocks=4, max_model_len=256)
    with no_work_done(small), pytest.raises(ValueError, match=r"prompt 1 needs 7 KV blocks .* 4 blocks of 16"):
        small.generate([[1, 2, 3], list(range(100))], GREEDY8, use_tqdm=False)
    # prompt + max_tokens counts too: 60 + 8 tokens need 5 blocks
    with no_work_done(small), pytest.raises(ValueError, match=r"prompt 0 needs 5 KV blocks"):
        small.generate([list(range(60))], GREEDY8, use_tqdm=False)
    # exactly the pool: 56 + 8 = 64 tokens = 4 blocks runs
    with bounded(small, 50):
        out = small.generate([list(range(56))], GREEDY8, use_tqdm=False)[0]
    assert len(out["token_ids"]) == 8
    healthy(small)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.5), ("temperature", math.nan),
    ("temperature", math.inf), ("top_p", 0.0), ("top_p", -0.1), ("top_p", 1.01), ("top_p", math.nan),
    ("top_k", 0), ("top_k", -2),
])
def test_sampling_params_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 2.0), ("max_tokens", "8"), ("max_tokens", True), ("temperature", "0.7"), ("temperature", None),
    ("top_p", [0.9]), ("top_k", 1.5), ("ignore_eos", 1), ("stop_token_ids", 5), ("stop_token_ids", "ab"),
    ("stop_token_ids", [1, 2.0]), ("stop_token_ids", [True]),
])
def test_sampling_params_wrong_type(field: str, value: object) -> None:
    with pytest.raises(TypeError, match=rf"SamplingParams\.{field}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("good", [dict(top_k=-1), dict(top_k=1), dict(top_p=1.0), dict(temperature=0),
                                  dict(max_tokens=1), dict(stop_token_ids=(3, 4)), dict(top_k=5000)])
def test_sampling_params_edge_values_accepted(good: dict) -> None:
    SamplingParams(**good)


@pytest.mark.parametrize("bad_id", [1024, 99999, -1])
def test_token_id_outside_vocab(llm: LLM, healthy, bad_id: int) -> None:  # noqa: ANN001
    with no_work_done(llm), pytest.raises(ValueError, match=rf"prompt 1 holds token id {bad_id}.*\[0, 1024\)"):
        llm.generate([[1, 2], [3, bad_id, 4]], GREEDY8, use_tqdm=False)
    healthy()


def test_unknown_llm_keyword_is_named(tiny_ckpt: str) -> None:
    with pytest.raises(TypeError, match=r"'max_num_seq'.*did you mean 'max_num_seqs'"):
        LLM(tiny_ckpt, device="cpu", max_num_seq=4)
    with pytest.raises(TypeError, match=r"'eos_token_id'"):  # derived fields are not keywords
        LLM(tiny_ckpt, device="cpu", eos_token_id=3)


@pytest.mark.parametrize("kw, exc, field", [
    (dict(max_num_seqs="8"), TypeError, "max_num_seqs"), (dict(max_num_seqs=2.0), TypeError, "max_num_seqs"),
    (dict(enforce_eager="yes"), TypeError, "enforce_eager"), (dict(seed=1.5), TypeError, "seed"),
    (dict(gpu_memory_utilization="0.9"), TypeError, "gpu_memory_utilization"),
    (dict(max_num_seqs=0), ValueError, "max_num_seqs"), (dict(max_model_len=1), ValueError, "max_model_len"),
    (dict(kvcache_block_size=12), ValueError, "kvcache_block_size"),
    (dict(num_kvcache_blocks=0), ValueError, "num_kvcache_blocks"),
    (dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization"),
    (dict(dtype="fp8"), ValueError, "dtype"), (dict(device="tpu"), ValueError, "device"),
])
def test_bad_llm_settings_name_the_field(tiny_ckpt: str, kw: dict, exc: type, field: str) -> None:
    with pytest.raises(exc, match=field):
        LLM(tiny_ckpt, **kw)


def test_missing_checkpoint(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"), device="cpu")


@pytest.mark.parametrize("prompts, match", [
    (None, "prompts must be"), (5, "prompts must be"), (torch.tensor([[1, 2]]), "prompts must be"),
    ([[1, "a"]], r"prompt 0: token ids must be ints, got 'a'"), ([[1], [2, 3.0]], r"prompt 1: .*3\.0"),
    ([[1, True]], "prompt 0: token ids must be ints"), ([b"bytes"], "prompt 0"), ([{"role": "user"}], "prompt 0"),
])
def test_wrong_prompt_types(llm: LLM, healthy, prompts, match: str) -> None:  # noqa: ANN001
    with no_work_done(llm), pytest.raises(TypeError, match=match):
        llm.generate(prompts, GREEDY8, use_tqdm=False)
    healthy()


def test_sampling_params_list_wrong_length_or_type(llm: LLM, healthy) -> None:  # noqa: ANN001
    with no_work_done(llm), pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        llm.generate([[1], [2]], [GREEDY8], use_tqdm=False)
    with no_work_done(llm), pytest.raises(ValueError, match="sampling_params has 3 entries for 2 prompts"):
        llm.generate([[1], [2]], [GREEDY8] * 3, use_tqdm=False)
    with no_work_done(llm), pytest.raises(TypeError, match=r"sampling_params\[1\] must be a SamplingParams"):
        llm.generate([[1], [2]], [GREEDY8, {"temperature": 0}], use_tqdm=False)
    with no_work_done(llm), pytest.raises(TypeError, match="sampling_params must be"):
        llm.generate([[1]], "greedy", use_tqdm=False)
    healthy()


def test_empty_batch_returns_nothing(llm: LLM) -> None:
    with no_work_done(llm):
        assert llm.generate([], GREEDY8, use_tqdm=False) == []


def test_error_inside_a_step_frees_everything(llm: LLM, healthy, monkeypatch) -> None:  # noqa: ANN001
    """A failure (or Ctrl-C) in the middle of generation: pending requests are dropped, no block leaks, and
    the prefix cache forgets blocks that may hold partly written KV."""
    runner = llm.engine.model_runner
    real_run = runner.run
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        calls = {"n": 0}

        def failing_run(seqs, is_prefill, exc=exc):  # noqa: ANN001, ANN202
            calls["n"] += 1
            if calls["n"] == 4:
                raise exc
            return real_run(seqs, is_prefill)

        monkeypatch.setattr(runner, "run", failing_run)
        with pytest.raises(type(exc)):
            llm.generate(random_prompts([40, 70, 20], seed=50), GREEDY8, use_tqdm=False)
        monkeypatch.setattr(runner, "run", real_run)
        assert llm.kv_cache_usage() == 0.0
        assert not llm.engine.block_manager.hash_to_block_id
        healthy()


def test_kv_cache_starts_zeroed(llm: LLM) -> None:
    """Attention may read never-written slots with weight 0; zeros (not garbage, maybe NaN) keep 0 * x == 0."""
    fresh = LLM(llm.config.model, device="cpu", kvcache_block_size=16, num_kvcache_blocks=5, max_model_len=64)
    assert bool((fresh.engine.model_runner.kv_cache == 0).all())


def test_unwritten_kv_slots_are_never_read(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    """Contract of the attention kernels: a slot outside a sequence's context never influences its output,
    even when it holds NaN (the state of a cache from torch.empty)."""
    engine = LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, num_kvcache_blocks=8, max_model_len=128)
    engine.engine.model_runner.kv_cache.fill_(float("nan"))
    prompts = random_prompts([9, 16, 21], seed=60)
    outs = engine.generate(prompts, GREEDY8, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == [hf_greedy(hf_model, p, 8) for p in prompts]


# ---- 7-11: exact outputs under pressure --------------------------------------------------------------------
def test_block_aligned_prompt_twice_second_from_cache(llm: LLM, hf_model) -> None:  # noqa: ANN001
    prompt = random_prompts([32], seed=70)[0]  # exactly two blocks of 16
    ref = hf_greedy(hf_model, prompt, 8)
    first = llm.generate([prompt], GREEDY8, use_tqdm=False)[0]
    second = llm.generate([prompt], GREEDY8, use_tqdm=False)[0]
    assert first["token_ids"] == ref and second["token_ids"] == ref
    assert first["num_cached_tokens"] == 0 and second["num_cached_tokens"] == 32
    assert llm.kv_cache_usage() == 0.0


def test_ten_prompts_in_a_small_pool_equal_solo_runs(llm: LLM, hf_model) -> None:  # noqa: ANN001
    lengths = [3, 9, 17, 24, 31, 40, 48, 64, 90, 120]  # 526 prompt tokens + 400 generated, in 224 slots
    prompts = random_prompts(lengths, seed=80)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    preemptions = llm.stats()["num_preemptions"]
    with bounded(llm, 1000):
        outs = llm.generate(prompts, params, use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(hf_model, p, 40) and out["finish_reason"] == "length"
    assert llm.stats()["num_preemptions"] > preemptions, "the pool was meant to force preemption"
    assert llm.kv_cache_usage() == 0.0
    # and each solo run through the engine gives the same tokens
    for p, out in zip(prompts[::3], outs[::3]):
        assert llm.generate([p], params, use_tqdm=False)[0]["token_ids"] == out["token_ids"]


def test_greedy_rows_unaffected_by_sampled_rows(llm: LLM, hf_model) -> None:  # noqa: ANN001
    prompts = random_prompts([12, 30, 7, 45, 20, 12], seed=90)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sampled = [SamplingParams(temperature=1.3, top_p=0.8, top_k=20, max_tokens=12, ignore_eos=True),
               SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True),
               SamplingParams(temperature=2.0, top_k=3, max_tokens=12, ignore_eos=True)]
    params = [greedy, sampled[0], greedy, sampled[1], sampled[2], greedy]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, sp, out in zip(prompts, params, outs):
        assert len(out["token_ids"]) == 12
        if sp is greedy:
            assert out["token_ids"] == hf_greedy(hf_model, p, 12)
    assert llm.kv_cache_usage() == 0.0


@pytest.fixture(scope="module")
def eos_case(tiny_ckpt: str, hf_model) -> tuple[list[int], list[int], int]:  # noqa: ANN001
    """A prompt, its 16 greedy tokens, and a step k whose token is new there and has visible text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    for seed in range(200, 260):
        prompt = random_prompts([10], seed=seed)[0]
        ref = hf_greedy(hf_model, prompt, 16)
        for k in range(3, 12):
            t = ref[k]
            visible = tok.decode([t]).strip() and tok.decode(ref[:k + 1]) != tok.decode(ref[:k])
            if t not in ref[:k] and t != 2 and visible:
                return prompt, ref, k
    raise AssertionError("no usable EOS candidate found")


def _variant(src: str, dst: str, config_eos: object, generation_eos: object) -> str:
    shutil.copytree(src, dst)
    for name, value in (("config.json", config_eos), ("generation_config.json", generation_eos)):
        path = f"{dst}/{name}"
        with open(path) as f:
            data = json.load(f)
        data["eos_token_id"] = value
        with open(path, "w") as f:
            json.dump(data, f)
    return dst


@pytest.mark.parametrize("where", ["both", "config_list", "generation_config_only"])
def test_eos_stops_with_stop_and_no_eos_text(tiny_ckpt: str, hf_model, eos_case, tmp_path,  # noqa: ANN001
                                             where: str) -> None:
    prompt, ref, k = eos_case
    t = ref[k]
    config_eos, generation_eos = {"both": (t, t), "config_list": ([2, t], 2),
                                  "generation_config_only": (2, [2, t])}[where]
    path = _variant(tiny_ckpt, str(tmp_path / "ckpt"), config_eos, generation_eos)
    engine = LLM(path, device="cpu", kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=16)
    assert hf_greedy(hf_model, prompt, 16, eos_token_id=t) == ref[:k + 1]  # transformers agrees

    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert out["token_ids"] == ref[:k + 1] and out["finish_reason"] == "stop"
    tok = engine.tokenizer
    assert out["text"] == tok.decode(ref[:k], skip_special_tokens=True)  # the EOS text is left out

    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    assert out["token_ids"] == ref and out["finish_reason"] == "length"
    assert engine.kv_cache_usage() == 0.0


def test_stop_token_ids_stop_with_stop(llm: LLM, eos_case) -> None:  # noqa: ANN001
    prompt, ref, k = eos_case
    for ignore_eos in (False, True):  # ignore_eos concerns EOS only, never the request's own stop tokens
        p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=ignore_eos, stop_token_ids=[ref[k], 1023])
        out = llm.generate([prompt], p, use_tqdm=False)[0]
        assert out["token_ids"] == ref[:k + 1] and out["finish_reason"] == "stop"
        assert out["text"] == llm.tokenizer.decode(ref[:k], skip_special_tokens=True)
    # a stop token that is never produced changes nothing
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[t for t in range(1024)
                                                                                         if t not in ref][:5])
    assert llm.generate([prompt], p, use_tqdm=False)[0]["token_ids"] == ref


def test_max_model_len_caps_generation(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    prompt = random_prompts([250], seed=110)[0]
    engine = LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, max_model_len=256)
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert len(prompt) + len(out["token_ids"]) == 256 and out["finish_reason"] == "length"
    assert out["token_ids"] == hf_greedy(hf_model, prompt, 6)
    assert engine.kv_cache_usage() == 0.0


# ---- sampling ----------------------------------------------------------------------------------------------
def test_degenerate_sampling_equals_greedy(llm: LLM, hf_model) -> None:  # noqa: ANN001
    prompts = random_prompts([6, 25, 40], seed=120)
    refs = [hf_greedy(hf_model, p, 12) for p in prompts]
    for sp in (SamplingParams(temperature=1.0, top_k=1, max_tokens=12, ignore_eos=True),
               SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=12, ignore_eos=True),
               SamplingParams(temperature=1e-4, max_tokens=12, ignore_eos=True)):
        outs = llm.generate(prompts, sp, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == refs, sp


def test_seeded_sampling_is_reproducible(tiny_ckpt: str) -> None:
    prompts = random_prompts([8, 30], seed=130)
    sp = SamplingParams(temperature=1.5, top_p=0.95, max_tokens=24, ignore_eos=True)

    def run(seed: int) -> list[list[int]]:
        engine = LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=8,
                     seed=seed)
        return [o["token_ids"] for o in engine.generate(prompts, sp, use_tqdm=False)]

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c  # 48 draws at temperature 1.5: equal by chance is (practically) impossible


# ---- GPU ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("max_num_seqs", [12, 100])
def test_cuda_graph_batch_not_a_multiple_of_capture_step(tiny_ckpt: str, max_num_seqs: int) -> None:
    """Full decode batches of max_num_seqs (a graph of its own), and every smaller size padded up to a captured
    one, give the tokens of eager mode."""
    n = max_num_seqs + 3  # a full batch, then a partial one
    prompts = random_prompts([5 + (7 * i) % 60 for i in range(n)], seed=140)
    params = [SamplingParams(temperature=0, max_tokens=8 + i % 9, ignore_eos=True) for i in range(n)]
    kw = dict(device="cuda", dtype="float32", kvcache_block_size=16, max_model_len=256, max_num_seqs=max_num_seqs,
              num_kvcache_blocks=2 * n * 6)
    graphs = LLM(tiny_ckpt, **kw)
    assert max_num_seqs in graphs.engine.model_runner.graphs
    out_graphs = [o["token_ids"] for o in graphs.generate(prompts, params, use_tqdm=False)]
    assert graphs.kv_cache_usage() == 0.0
    del graphs
    eager = LLM(tiny_ckpt, enforce_eager=True, **kw)
    out_eager = [o["token_ids"] for o in eager.generate(prompts, params, use_tqdm=False)]
    assert out_graphs == out_eager


# ---- settings changed after construction, numpy values, pools sized from memory, decode budgets -------------
def test_sampling_params_changed_after_construction_are_checked_again(llm: LLM, healthy) -> None:  # noqa: ANN001
    params = SamplingParams(temperature=1.0, max_tokens=4)
    params.top_p = 0.0
    with pytest.raises(ValueError, match="prompt 1.*top_p"):
        llm.generate([[5, 6, 7], [8, 9]], [GREEDY8, params], use_tqdm=False)
    params.top_p, params.max_tokens = 1.0, 0
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    healthy()


def test_numpy_integers_are_token_ids_and_sampling_values(llm: LLM, hf_model) -> None:  # noqa: ANN001
    import numpy as np

    prompt = random_prompts([12], seed=91)[0]
    out = llm.generate([np.array(prompt, dtype=np.int64).tolist(), [np.int64(t) for t in prompt]],
                       SamplingParams(temperature=np.float32(0.0), max_tokens=np.int64(8), ignore_eos=True),
                       use_tqdm=False)
    ref = hf_greedy(hf_model, prompt, 8)
    assert out[0]["token_ids"] == ref and out[1]["token_ids"] == ref


def test_pool_sized_from_memory_holds_one_sequence_of_max_model_len(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    small = LLM(tiny_ckpt, device="cpu", max_num_seqs=1, max_model_len=40, kvcache_block_size=16)
    assert small.config.num_kvcache_blocks >= 3  # ceil(40 / 16)
    prompt = random_prompts([30], seed=92)[0]
    out = small.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert out["token_ids"] == hf_greedy(hf_model, prompt, 10) and out["finish_reason"] == "length"


def test_decode_budget_smaller_than_running_set_starves_no_sequence(tiny_ckpt: str, hf_model) -> None:  # noqa: ANN001
    """max_num_batched_tokens=4 with 8 running sequences: every decode step serves 4, and each sequence is served
    at least every second decode step; outputs still equal solo runs."""
    engine_llm = LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, max_num_batched_tokens=4, max_num_seqs=8,
                     max_model_len=64)
    prompts = random_prompts([2] * 8, seed=93)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    eng = engine_llm.engine
    seqs = [eng.add_request(p, params) for p in prompts]
    last_served = {s.seq_id: 0 for s in seqs}
    decode_steps = 0
    while not eng.scheduler.is_finished():
        before = {s.seq_id: len(s) for s in seqs}
        _, is_prefill, _ = eng.step()
        if is_prefill:
            continue
        decode_steps += 1
        for s in seqs:
            if len(s) > before[s.seq_id]:
                last_served[s.seq_id] = decode_steps
            elif not s.is_finished:
                assert decode_steps - last_served[s.seq_id] < 2, f"sequence {s.seq_id} starved"
        assert decode_steps < 100
    assert [s.completion_token_ids for s in seqs] == [hf_greedy(hf_model, p, 6) for p in prompts]
    assert engine_llm.kv_cache_usage() == 0.0
