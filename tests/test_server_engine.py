"""The engine's online API (submit / abort / step_requests) that the server's loop drives, in process."""
from __future__ import annotations

import pytest

from nanovllm import LLM, SamplingParams
from conftest import random_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm(tiny_ckpt: str) -> LLM:
    return LLM(tiny_ckpt, device="cpu", max_model_len=256, num_kvcache_blocks=48, max_num_seqs=8)


def _drain(engine, outputs: dict[int, list[int]], reasons: dict[int, str], max_calls: int = 500) -> None:  # noqa: ANN001
    for _ in range(max_calls):
        if engine.num_unfinished_requests == 0:
            return
        for out in engine.step_requests():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert out.num_completion_tokens == len(outputs[out.request_id])
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    raise AssertionError("requests did not finish")


def test_requests_joining_and_leaving_a_running_batch(llm: LLM) -> None:
    engine = llm.engine
    prompts = random_prompts([7, 12, 20], seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    refs = [llm.generate([p], greedy, use_tqdm=False)[0]["token_ids"] for p in prompts[:2]]
    outputs: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    a = engine.submit(prompts[0], greedy)
    for _ in range(3):  # a is prefilled and decoding
        for out in engine.step_requests():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert 0 < len(outputs[a]) < 10
    b = engine.submit(prompts[1], greedy)  # joins while a decodes
    c = engine.submit(prompts[2], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    for _ in range(3):
        for out in engine.step_requests():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert llm.kv_cache_usage() > 0 and len(outputs[c]) >= 1
    engine.abort(c)
    engine.abort(c)  # twice: harmless
    engine.abort(10**9)  # unknown: ignored
    _drain(engine, outputs, reasons)
    assert outputs[a] == refs[0] and outputs[b] == refs[1]
    assert (reasons[a], reasons[b], reasons[c]) == ("length", "length", "abort")
    assert len(outputs[c]) < 200
    assert llm.kv_cache_usage() == 0.0 and engine.scheduler.is_finished()
    engine.abort(a)  # already finished: ignored, no output
    assert engine.step_requests() == []


def test_multi_step_rounds_report_every_token_once(llm: LLM, tiny_ckpt: str) -> None:
    """With rounds of 4 decode steps, an output carries a round's tokens together, and the tokens are those of
    one-step decoding (greedy); a request that joins mid-run waits for the round's end."""
    multi = LLM(tiny_ckpt, device="cpu", max_model_len=256, num_kvcache_blocks=48, max_num_seqs=8,
                num_scheduler_steps=4)
    engine = multi.engine
    prompts = random_prompts([5, 11], seed=7)
    greedy = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    refs = [o["token_ids"] for o in llm.generate(prompts, greedy, use_tqdm=False)]
    outputs: dict[int, list[int]] = {}
    sizes: list[int] = []
    ids = [engine.submit(prompts[0], greedy)]
    for _ in range(2):
        for out in engine.step_requests():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            sizes.append(len(out.new_token_ids))
    ids.append(engine.submit(prompts[1], greedy))
    reasons: dict[int, str] = {}
    _drain(engine, outputs, reasons)
    assert [outputs[i] for i in ids] == refs and max(sizes) == 4
    assert multi.kv_cache_usage() == 0.0


def test_a_failing_step_drops_its_requests_and_the_engine_goes_on(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    prompt = random_prompts([9], seed=5)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    ref = llm.generate([prompt], greedy, use_tqdm=False)[0]["token_ids"]
    x = engine.submit(prompt, greedy)
    engine.step_requests()  # prefilled: holds blocks
    runner = engine.model_runner

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("injected failure")

    monkeypatch.setattr(runner, "run", boom)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step_requests()
    monkeypatch.undo()
    assert engine.last_failed_request_ids == [x]
    assert llm.kv_cache_usage() == 0.0 and engine.num_unfinished_requests == 0
    outputs: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    y = engine.submit(prompt, greedy)
    _drain(engine, outputs, reasons)
    assert outputs[y] == ref and reasons[y] == "length"


def test_engine_failure_is_a_500_for_that_request_only(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app in this process (uvicorn in a thread) over an engine whose model fails once."""
    import socket
    import threading
    import time

    import openai
    import uvicorn

    from nanovllm.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(llm.engine, "m"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        runner = llm.engine.model_runner
        real_run = runner.run
        calls = []

        def fail_once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if not calls:
                calls.append(1)
                raise RuntimeError("injected failure")
            return real_run(*args, **kwargs)

        monkeypatch.setattr(runner, "run", fail_once)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="m", prompt="hi", max_tokens=3)
        assert e.value.status_code == 500 and "injected failure" in e.value.body["message"]
        out = client.completions.create(model="m", prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3 and llm.kv_cache_usage() == 0.0
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()
