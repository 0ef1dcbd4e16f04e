"""The OpenAI-compatible server, driven over HTTP by the official ``openai`` client.

One real server (``python -m nanovllm serve`` as a subprocess on the CPU, tiny checkpoint) serves the module; the
last test stops it with SIGTERM.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Iterator

import pytest

openai = pytest.importorskip("openai")

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.serve.detokenizer import IncrementalDetokenizer  # noqa: E402
from nanovllm.serve.engine_loop import EngineLoop, QueueFullError  # noqa: E402
from nanovllm.serve.metrics import Metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tiny"  # --served-model-name
MAX_MODEL_LEN = 2048
ENGINE_FLAGS = dict(device="cpu", max_model_len=MAX_MODEL_LEN, num_kvcache_blocks=256, max_num_seqs=16)
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The running server: ``url``, ``port``, ``proc`` (the subprocess), ``log`` (its output)."""
    port = _free_port()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_FLAGS.items()]
    cmd = [sys.executable, "-m", "nanovllm", "serve", "--model", tiny_ckpt, "--served-model-name", MODEL,
           "--port", str(port), "--log-level", "info", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the tiny model's ops are too small for threads
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log_file = open(log_path, "w")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    log = lambda: log_path.read_text()  # noqa: E731
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not answer /health within {START_TIMEOUT_S} s:\n{log()[-3000:]}")
        time.sleep(0.2)
    yield SimpleNamespace(url=url, port=port, proc=proc, log=log)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    log_file.close()


@pytest.fixture(scope="module")
def client(server: SimpleNamespace) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(tiny_ckpt: str) -> LLM:
    """The offline engine on the same checkpoint, for reference outputs."""
    return LLM(tiny_ckpt, **ENGINE_FLAGS)


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(nanovllm_\w+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_models_and_health(server: SimpleNamespace, client: "openai.OpenAI") -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    m = _metrics(server.url)
    for name in ("nanovllm_num_requests_running", "nanovllm_num_requests_waiting", "nanovllm_kv_cache_usage_perc",
                 "nanovllm_generation_tokens_total", "nanovllm_prompt_tokens_total"):
        assert name in m, name


@pytest.mark.parametrize("prompt", ["The quick brown fox", "Prefix caching lets requests"])
def test_greedy_completion_equals_generate(client: "openai.OpenAI", llm: LLM, prompt: str) -> None:
    ref = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == ref["text"]
    assert out.choices[0].finish_reason == ref["finish_reason"]
    assert out.usage.completion_tokens == len(ref["token_ids"])
    assert out.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == ref["text"]
    assert chunks[-1].choices[0].finish_reason == ref["finish_reason"]
    # one chunk per engine step (one token per step on the CPU), also for a token that adds no text yet
    assert len(chunks) == out.usage.completion_tokens


def test_stop_strings_cut_the_text(client: "openai.OpenAI", llm: LLM) -> None:
    prompt = "Hello world! How are you today?"
    ref = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                       use_tqdm=False)[0]["text"]
    assert len(ref) >= 6, ref
    stop = ref[len(ref) // 2:len(ref) // 2 + 2]
    want = ref[:ref.find(stop)]
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=["never-generated", stop],
                  extra_body={"ignore_eos": True})
    out = client.completions.create(**kwargs)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (want, "stop")
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_streamed_chat_equals_non_streamed(client: "openai.OpenAI", llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hello world! How are you today?"}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kwargs)
    ref = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert full.choices[0].message.content == ref["text"]
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_sixteen_concurrent_clients(client: "openai.OpenAI") -> None:
    def one(i: int) -> tuple[int, str, int]:
        n = 3 + i % 6
        out = client.completions.create(model=MODEL, prompt=f"Numbers: {i} {i + 1}", max_tokens=n, temperature=0.8,
                                        top_p=0.9, extra_body={"ignore_eos": True, "top_k": 50})
        return n, out.choices[0].finish_reason, out.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16), timeout=120))
    assert [(n, "length", n) for n, _, _ in results] == results


def test_seeded_completion_is_reproducible_in_any_batch(client: "openai.OpenAI", llm: LLM) -> None:
    """temperature 0.8 with a seed: the same text twice (while other requests come and go) and LLM.generate's."""
    prompt = "A paged KV cache splits keys and values into"
    ref = llm.generate([prompt], SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True, seed=1234),
                       use_tqdm=False)[0]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0.8, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda s: client.completions.create(seed=s, **kw), [1234, None, 1234, 99]))
    assert outs[0].choices[0].text == outs[2].choices[0].text == ref["text"]
    assert outs[3].choices[0].text != ref["text"]  # 10 tokens of a random-weight model's near-flat softmax
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(seed=2**64, **kw)
    assert e.value.body["param"] == "seed" and "seed must be in" in e.value.body["message"]


def test_bad_requests_get_errors_and_server_keeps_serving(server: SimpleNamespace, client: "openai.OpenAI") -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1] * MAX_MODEL_LEN, max_tokens=4)
    assert "max_model_len" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    mistyped = {b'{"model": "tiny", "prompt": "hi", "max_tokens": "5"}': "max_tokens",
                b'{"model": "tiny", "prompt": "hi", "max_tokens": 4, "temperature": true}': "temperature"}
    for body in (b"{not json", b'{"model": "tiny"}', b'{"model": "tiny", "prompt": "hi", "max_tokens": "x"}',
                 *mistyped):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        err = json.loads(r.read())["error"]
        conn.close()
        assert r.status == 400 and err["type"] == "invalid_request_error" and err["message"], body
        if body in mistyped:
            assert err["param"] == mistyped[body], err
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=1, top_p=1,
                                    extra_body={"ignore_eos": True})  # JSON integers are valid floats
    assert out.usage.completion_tokens == 3
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3


def _wait_until_idle(url: str, failure: str, timeout_s: float = 30.0) -> dict[str, float]:
    """Poll /metrics until no request runs and no KV block is in use; returns those metrics (fails with `failure`
    and the last metrics after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = _metrics(url)
        if m["nanovllm_kv_cache_usage_perc"] == 0 and m["nanovllm_num_requests_running"] == 0:
            return m
        assert time.monotonic() < deadline, f"{failure}: {m}"
        time.sleep(0.1)


def test_disconnect_mid_stream_frees_kv_blocks(server: SimpleNamespace) -> None:
    aborted_before = _metrics(server.url).get('nanovllm_request_success_total{finish_reason="abort"}', 0.0)
    body = json.dumps({"model": MODEL, "prompt": "A paged KV cache", "max_tokens": MAX_MODEL_LEN - 16,
                       "ignore_eos": True, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    events = 0
    while events < 3:  # a few tokens arrived: the request runs and holds KV blocks
        line = r.fp.readline()
        events += line.startswith(b"data: ")
    assert _metrics(server.url)["nanovllm_kv_cache_usage_perc"] > 0
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    m = _wait_until_idle(server.url, "KV blocks still held after the client left")
    assert m['nanovllm_request_success_total{finish_reason="abort"}'] == aborted_before + 1


def test_disconnect_while_a_non_streamed_request_decodes_aborts_it(server: SimpleNamespace) -> None:
    """The client of a non-streamed request leaves while its request decodes (events arrive every step): the server
    aborts it (the "abort" count grows, "length" does not) instead of generating the rest for nobody."""
    before = _metrics(server.url)
    length_key, abort_key = (f'nanovllm_request_success_total{{finish_reason="{r}"}}' for r in ("length", "abort"))
    body = json.dumps({"model": MODEL, "prompt": "A paged KV cache", "max_tokens": MAX_MODEL_LEN - 16,
                       "ignore_eos": True})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while _metrics(server.url)["nanovllm_generation_tokens_total"] < before["nanovllm_generation_tokens_total"] + 2:
        assert time.monotonic() < deadline, "the request never started decoding"
        time.sleep(0.05)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    m = _wait_until_idle(server.url, "the request still runs after its client left")
    assert m.get(abort_key, 0.0) == before.get(abort_key, 0.0) + 1
    assert m.get(length_key, 0.0) == before.get(length_key, 0.0)


def test_detokenizer_deltas_concatenate_to_full_decode(llm: LLM) -> None:
    tok = llm.tokenizer
    text = "héllo wörld: 日本語 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    import random
    rng = random.Random(0)
    for seq in (ids, [rng.randrange(tok.vocab_size) for _ in range(200)]):
        detok = IncrementalDetokenizer(tok)
        parts = [detok.add([t]) for t in seq]
        parts.append(detok.finish())
        assert "".join(parts) == tok.decode(seq, skip_special_tokens=True)
        if seq is ids:
            assert "".join(parts[:-1]) == text and not any("\ufffd" in p for p in parts)


def test_full_waiting_queue_refuses_requests() -> None:
    """With the engine busy, the loop accepts ``max_waiting_requests`` requests and refuses the next one."""
    release = threading.Event()

    class BusyEngine:
        num_unfinished_requests = 0
        scheduler = SimpleNamespace(running=[])
        block_manager = SimpleNamespace(usage=lambda: 0.0)
        last_failed_request_ids: list[int] = []

        def submit(self, token_ids: list[int], params: SamplingParams) -> int:
            self.num_unfinished_requests += 1
            return self.num_unfinished_requests

        def step_requests(self) -> list:
            release.wait(10)
            return []

    async def main() -> None:
        loop = EngineLoop(BusyEngine(), Metrics(), max_waiting_requests=2)  # type: ignore[arg-type]
        loop.start(asyncio.get_running_loop())
        try:
            loop.submit([1], SamplingParams())
            loop.submit([2], SamplingParams())
            with pytest.raises(QueueFullError):
                loop.submit([3], SamplingParams())
        finally:
            release.set()
            loop.stop(10)

    asyncio.run(main())


def test_sigterm_shuts_down_cleanly(server: SimpleNamespace, client: "openai.OpenAI") -> None:
    """Last in the module: it stops the shared server."""
    assert client.completions.create(model=MODEL, prompt="bye", max_tokens=2).usage.completion_tokens >= 1
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not exit within 30 s of SIGTERM")
    # uvicorn shuts down (requests done, lifespan ended: the engine loop stopped), then re-raises the signal it
    # caught, so the exit status is 0 or "killed by SIGTERM"
    log = server.log()
    assert code in (0, -signal.SIGTERM), log[-3000:]
    assert "Application shutdown complete" in log and "Traceback" not in log, log[-3000:]


# ---- the serve command line (in process; no server, no model) ----------------------------------------------------
BAD_SERVE_FLAGS = [
    (["--port", "65536"], r"argument --port: must be in \[0, 65535\], got 65536"),
    (["--port", "-1"], r"argument --port: must be in \[0, 65535\], got -1"),
    (["--port", "http"], r"argument --port: expected an integer, got 'http'"),
    (["--max-waiting-requests", "0"], r"argument --max-waiting-requests: must be >= 1, got 0"),
    (["--host", " "], r"argument --host: must not be empty"),
    (["--log-level", "loud"], r"argument --log-level: invalid choice: 'loud'"),
    (["--max-num-seqs", "0"], r"argument --max-num-seqs: must be >= 1, got 0"),
    (["--kvcache-block-size", "12"], r"argument --kvcache-block-size: must be a power of two, got 12"),
    (["--seed", "1.5"], r"argument --seed: expected an integer"),
    (["--model", "/no/such/folder"], r"argument --model: checkpoint folder '/no/such/folder' does not exist"),
    (["--temperature", "1"], r"unrecognized arguments: --temperature 1"),
]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a model or finding the default one fails the test."""
    import nanovllm.serve.cli as serve_cli

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built before the flags were checked")

    monkeypatch.setattr(serve_cli, "LLM", boom)
    monkeypatch.setattr(serve_cli, "default_model", boom)


@pytest.mark.parametrize("argv, message", BAD_SERVE_FLAGS, ids=[" ".join(a)[:40] for a, _ in BAD_SERVE_FLAGS])
def test_bad_serve_flag_gives_one_stderr_line_and_exit_2(no_model: None, capsys: pytest.CaptureFixture,
                                                         argv: list[str], message: str) -> None:
    from nanovllm.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *argv])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("nanovllm serve: error: ") and re.search(message, err), err


def test_serve_help_lists_server_and_engine_flags(capsys: pytest.CaptureFixture) -> None:
    from nanovllm.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--host", "127.0.0.1"), ("--port", "8000"), ("--max-waiting-requests", "256"),
                          ("--max-model-len", "4096"), ("--dtype", "auto"), ("--seed", "0"), ("--max-num-seqs", "512"),
                          ("--num-kvcache-blocks", "-1"), ("--gpu-memory-utilization", "0.9"),
                          ("--compile-fusion", "False"), ("--enforce-eager", "False")]:
        assert re.search(rf"{flag}\b[^\n]*?\(default: {re.escape(default)}\)", text), flag
    for flag in ("--device {cuda,cpu}", "--tensor-parallel-size", "--num-scheduler-steps", "--kvcache-block-size",
                 "--max-num-batched-tokens", "--served-model-name", "--model MODEL"):
        assert flag in text, flag


def test_serve_without_model_uses_the_default_model(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """No --model: the folder of default_model_dir() reaches LLM with the parsed engine keywords."""
    import nanovllm.serve.cli as serve_cli
    import nanovllm.utils.default_model as dm

    seen = {}

    def fake_llm(model: str, **kw: object) -> None:
        seen.update(kw, model=model)
        raise ValueError("stop here")

    monkeypatch.setattr(dm, "default_model_dir", lambda: ("/cache/smollm2", True))
    monkeypatch.setattr(serve_cli, "LLM", fake_llm)
    with pytest.raises(SystemExit) as exit_info:
        serve_cli.main(["--device", "cpu", "--num-kvcache-blocks", "64", "--log-level", "warning"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "nanovllm serve: error: stop here\n"
    assert seen["model"] == "/cache/smollm2" and seen["device"] == "cpu" and seen["num_kvcache_blocks"] == 64
    assert seen["max_model_len"] == 4096 and seen["seed"] == 0
