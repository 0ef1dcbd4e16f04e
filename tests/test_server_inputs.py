"""The server's handling of awkward requests: field errors, defaults that must fit the engine, stop strings that
must not stall the event loop, clients that leave early. The app runs in this process (uvicorn in a thread) over
an engine whose KV pool (128 tokens) is smaller than its max_model_len (256)."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from nanovllm import LLM
from nanovllm.serve.detokenizer import StopStrings

pytestmark = pytest.mark.usefixtures("one_thread")

POOL_TOKENS = 8 * 16  # num_kvcache_blocks * kvcache_block_size


@pytest.fixture(scope="module")
def served(tiny_ckpt: str) -> Iterator[SimpleNamespace]:
    """``port``, ``llm`` and ``server`` (the app's :class:`Server`) of a running app."""
    import uvicorn

    from nanovllm.serve.app import build_app

    llm = LLM(tiny_ckpt, device="cpu", max_model_len=256, num_kvcache_blocks=8, max_num_seqs=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(llm.engine, "m")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield SimpleNamespace(port=port, llm=llm, server=app.state.server)
    server.should_exit = True
    thread.join(30)


def _post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_chat_without_max_tokens_fills_the_kv_pool(served: SimpleNamespace) -> None:
    """Chat's default max_tokens is the room left in a request's largest context, here the KV pool (smaller than
    max_model_len): the request runs to the pool's size instead of being refused for a max_tokens never sent."""
    status, body = _post(served.port, "/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == POOL_TOKENS
    assert served.llm.kv_cache_usage() == 0.0


def test_unknown_routes_and_methods_answer_in_the_openai_error_shape(served: SimpleNamespace) -> None:
    import http.client

    for method, path, status, allow in (("POST", "/v1/embeddings", 404, None), ("GET", "/v1/completions", 405, "POST")):
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == status, (path, r.status)
            assert body["error"]["message"].startswith(f"{method} {path}: "), body
            assert body["error"]["type"] == "invalid_request_error", body
            assert r.getheader("allow") == allow, r.getheaders()
        finally:
            conn.close()


def test_max_completion_tokens_errors_name_that_field(served: SimpleNamespace) -> None:
    for value in (0, -3):
        status, body = _post(served.port, "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": value})
        assert status == 400 and body["error"]["param"] == "max_completion_tokens", body
        assert body["error"]["message"].startswith("max_completion_tokens must be >= 1"), body


@pytest.mark.parametrize("path, field, value, param", [
    ("/v1/completions", "prompt", [1.0, 2.0], "prompt"),
    ("/v1/completions", "prompt", 5, "prompt"),
    ("/v1/completions", "stop", 5, "stop"),
    ("/v1/completions", "stop", ["a", 1], "stop"),
    ("/v1/chat/completions", "messages", [{"role": "user", "content": 5}], "messages.0.content"),
    ("/v1/chat/completions", "messages", [{"role": "user", "content": ["a"]}], "messages.0.content"),
])
def test_a_mistyped_union_field_is_named_without_pydantic_member_tags(served: SimpleNamespace, path: str, field: str,
                                                                      value: Any, param: str) -> None:
    body: dict[str, Any] = {"model": "m", "max_tokens": 2}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    body[field] = value
    status, out = _post(served.port, path, body)
    assert status == 400 and out["error"]["param"] == param, out
    assert out["error"]["message"].startswith(f"{param}: the value matches none of the accepted types ("), out


def test_client_leaving_mid_body_is_not_a_server_error(served: SimpleNamespace) -> None:
    """A body cut short by a client that left: the request is dropped as gone (no 500, nothing submitted)."""
    from nanovllm.serve.app import ClientGone, CompletionRequest
    from starlette.requests import ClientDisconnect

    class LeavingRequest:
        async def body(self) -> bytes:
            raise ClientDisconnect()

    with pytest.raises(ClientGone):
        asyncio.run(served.server.parse(LeavingRequest(), CompletionRequest))  # type: ignore[arg-type]


def test_long_stop_strings_cost_no_more_than_the_text() -> None:
    """Holding back text that may begin a stop string looks at the unshown text only: a 1M-character stop string
    (a ~1 MB request body) costs microseconds per token, not a scan of every prefix of the stop string."""
    stops = StopStrings(["x" * 1_000_000, "y" * 500_000])
    t0 = time.perf_counter()
    shown = "".join(stops.feed("some text ") for _ in range(200))
    shown += stops.feed("and xx", final=False)
    assert time.perf_counter() - t0 < 1.0
    assert shown == "some text " * 200 + "and " and not stops.stopped
    assert stops.feed("", final=True) == "xx"


def test_stop_strings_hold_back_exactly_a_possible_stop_prefix() -> None:
    stops = StopStrings(["abc", "bcd"])
    assert stops.feed("xxab") == "xx"  # "ab" may begin "abc"
    assert stops.feed("c") == "" and stops.stopped  # "abc" found: the text ends before it
    stops = StopStrings(["abc", "bcd"])
    assert stops.feed("zab") == "z" and stops.feed("x") == "abx"
    assert stops.feed("bc") == "" and stops.feed("e", final=True) == "bce"
