"""The HTTP routes of the OpenAI-compatible server (FastAPI).

``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream`` false: one JSON body; true: server-sent
events, one ``data: {chunk}`` per engine step that sampled tokens (per round with multi-step decode), ending with
``data: [DONE]``), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text format). Every request is checked (JSON, fields, model name,
sampling values, prompt length) before it reaches the engine; a bad one gets an OpenAI-style error body
``{"error": {"message", "type", "param", "code"}}`` with status 400 (404 for an unknown model, 503 when the waiting
queue is full, 500 when the engine fails while running it).
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams
from nanovllm.serve.detokenizer import IncrementalDetokenizer, StopStrings
from nanovllm.serve.engine_loop import EngineLoop, QueueFullError, RequestHandle, StreamEvent
from nanovllm.serve.metrics import Metrics
from nanovllm.serve.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                     ChatCompletionRequest, ChatCompletionResponse, CompletionChoice,
                                     CompletionRequest, CompletionResponse, DeltaMessage, ErrorInfo, ErrorResponse,
                                     ModelCard, ModelList, SamplingFields, UsageInfo, new_id,
                                     unsupported_fields)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI default of /v1/completions (chat defaults to the context left)
_UNION_TAGS = {"str", "int", "float", "bool", "none"}  # pydantic's names of union members in an error's location
DISCONNECT_POLL_SECONDS = 1.0  # how often a non-streamed request checks that its client is still there


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


class ClientGone(Exception):
    """The client of a non-streamed request disconnected."""


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """An OpenAI-style error body."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _field_error(errors: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(param, message) of a pydantic validation failure: the first error's field. When that field is a union
    (``prompt``, ``stop``, a message's ``content``), pydantic reports one error per member with the member's tag
    (``str``, ``list[int]``) in the location; the tags are dropped and the message lists the accepted types."""
    loc = [str(p) for p in errors[0]["loc"]]
    cut = next((i for i, p in enumerate(loc) if p in _UNION_TAGS or "[" in p), None)
    if cut is None:
        param = ".".join(loc) or None
        return param, f"{param}: {errors[0]['msg']}" if param else errors[0]["msg"]
    param = ".".join(loc[:cut]) or None
    tags = [str(e["loc"][cut]) for e in errors if [str(p) for p in e["loc"][:cut]] == loc[:cut] and len(e["loc"]) > cut]
    return param, f"{param}: the value matches none of the accepted types ({', '.join(dict.fromkeys(tags))})"


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that call ``on_close`` however the response ends: done, the client gone (Starlette
    cancels the response), or cancelled before its first chunk."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Server:
    """The routes' shared state: the engine loop, the tokenizer, the served model name and the metrics.

    Args:
        engine: a built engine (the server's loop becomes its only user).
        served_model_name: the name clients pass as ``model``.
        max_waiting_requests: the bound of the waiting queue (503 beyond it).
    """

    def __init__(self, engine: LLMEngine, served_model_name: str, max_waiting_requests: int) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = served_model_name
        self.max_model_len = engine.config.max_model_len
        self.metrics = Metrics()
        self.loop = EngineLoop(engine, self.metrics, max_waiting_requests)

    # ---- request checking ----------------------------------------------------------------------------------
    async def parse(self, request: Request, cls: type[SamplingFields]) -> Any:
        """Read and check a request body.

        Raises:
            RequestError: invalid JSON (400), a missing or mistyped field (400, ``param`` names it), an unknown
                model (404), a field this server does not implement (400).
        """
        try:
            raw = await request.body()
        except ClientDisconnect:  # the client left before sending the whole body
            raise ClientGone() from None
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        try:
            req = cls.model_validate(body)
        except pydantic.ValidationError as e:
            param, message = _field_error(e.errors())
            raise RequestError(400, message, param=param) from None
        if req.model != self.model_name:
            raise RequestError(404, f"the model {req.model!r} does not exist; this server serves "
                               f"{self.model_name!r}", param="model", code="model_not_found")
        bad = unsupported_fields(req)
        if bad:
            raise RequestError(400, f"unsupported field(s) {', '.join(bad)} (this server generates one choice "
                               f"without logprobs, penalties or tools)", param=bad[0])
        if req.stream_options is not None and not req.stream:
            raise RequestError(400, "stream_options is only allowed with stream=true", param="stream_options")
        if isinstance(req.stop, str):
            req.stop = [req.stop]
        if req.stop is not None and not all(req.stop):
            raise RequestError(400, "stop: stop strings must not be empty", param="stop")
        return req

    def sampling_params(self, req: SamplingFields, max_tokens: int | None, default_max_tokens: int,
                        max_tokens_field: str = "max_tokens") -> SamplingParams:
        """Map the request's sampling fields onto :class:`SamplingParams` (400 naming the field when bad;
        ``max_tokens_field``: the request's name of the field that gave ``max_tokens``)."""
        temperature = 1.0 if req.temperature is None else req.temperature
        try:
            return SamplingParams(temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p,
                                  top_k=-1 if req.top_k is None else req.top_k,
                                  max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                                  ignore_eos=req.ignore_eos, stop_token_ids=req.stop_token_ids, seed=req.seed)
        except (ValueError, TypeError) as e:
            m = re.search(r"SamplingParams\.(\w+)", str(e))
            message, param = str(e).replace("SamplingParams.", ""), m.group(1) if m else None
            if param == "max_tokens" and max_tokens_field != param:
                message, param = message.replace("max_tokens", max_tokens_field, 1), max_tokens_field
            raise RequestError(400, message, param=param) from None

    def tokenize(self, prompt: Any, param: str) -> list[int]:
        """Token ids of one prompt, exactly as ``LLM.generate`` makes them (400 when the prompt is bad)."""
        try:
            return self.engine.tokenize([prompt])[0]
        except (TypeError, ValueError) as e:
            raise RequestError(400, f"{param}: {e}", param=param) from None

    def check_fits(self, token_ids: list[int], params: SamplingParams, param: str) -> None:
        """The engine's own checks (empty prompt, ids outside the vocabulary, max_model_len, KV pool): 400."""
        try:
            self.engine.validate(0, token_ids, params)
        except ValueError as e:
            raise RequestError(400, str(e).replace("prompt 0", "the prompt"), param=param) from None

    def submit(self, token_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Hand the request to the engine loop (503 when the waiting queue is full or the loop is stopped)."""
        try:
            return self.loop.submit(token_ids, params)
        except QueueFullError as e:
            raise RequestError(503, str(e), type_="server_overloaded", code="queue_full") from None
        except RuntimeError as e:
            raise RequestError(503, str(e), type_="server_unavailable") from None

    # ---- generation --------------------------------------------------------------------------------------------
    async def events(self, handle: RequestHandle, request: Request | None,
                     stop: list[str] | None) -> AsyncIterator[tuple[str, StreamEvent]]:
        """Yield (new text, event) per engine event of ``handle`` until it finishes.

        The stop token that ended a request is counted but not shown (as in ``LLM.generate``); the text is
        detokenized incrementally, so the deltas concatenate to ``LLM.generate``'s text. With ``stop`` strings,
        the text ends before the first one, and the request is aborted in the engine and reported finished with
        "stop". With ``request`` (non-streamed requests), a client that went away raises :class:`ClientGone`.

        Raises:
            RequestError: the engine failed while running this request (500).
        """
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStrings(stop) if stop else None
        poll_at = time.monotonic() + DISCONNECT_POLL_SECONDS
        while True:
            if request is None:
                event = await handle.queue.get()
            else:
                try:
                    event = await asyncio.wait_for(handle.queue.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    event = None
                # checked once a second whether or not events arrive (a decoding request sends one every step)
                if event is None or time.monotonic() >= poll_at:
                    poll_at = time.monotonic() + DISCONNECT_POLL_SECONDS
                    if await request.is_disconnected():
                        raise ClientGone() from None
                if event is None:
                    continue
            if event.error is not None:
                raise RequestError(500, f"the engine failed while running this request: {event.error}",
                                   type_="internal_error")
            ids = event.token_ids[:-1] if event.finish_reason == "stop" else event.token_ids
            text = detok.add(ids) if ids else ""
            if event.finish_reason is not None:
                text += detok.finish()
            if stops is not None:
                text = stops.feed(text, final=event.finish_reason is not None)
                if stops.stopped:
                    self.loop.abort(handle.request_id, reason="stop")
                    event = StreamEvent(event.token_ids, event.num_prompt_tokens, event.num_completion_tokens, "stop")
            yield text, event
            if event.finish_reason is not None:
                return

    async def run(self, request: Request, req: SamplingFields, token_ids: list[int], params: SamplingParams,
                  chat: bool) -> Response:
        """Generate for one checked request: a JSON body, or a stream of server-sent events."""
        handle = self.submit(token_ids, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # closing an unfinished stream aborts its request (a finished one is ignored)
            return _EventStream(self._stream(handle, chat, include_usage, req.stop),
                                on_close=lambda: self.loop.abort(handle.request_id))
        parts: list[str] = []
        event: StreamEvent | None = None
        finished = False
        try:
            async for text, event in self.events(handle, request, req.stop):
                parts.append(text)
            finished = True
        finally:
            if not finished:  # the client went away (or the handler was cancelled): free the request's blocks
                self.loop.abort(handle.request_id)
        usage = UsageInfo(prompt_tokens=event.num_prompt_tokens, completion_tokens=event.num_completion_tokens,
                          total_tokens=event.num_prompt_tokens + event.num_completion_tokens)
        text = "".join(parts)
        if chat:
            body: Any = ChatCompletionResponse(model=self.model_name, usage=usage, choices=[ChatChoice(
                message=AssistantMessage(content=text), finish_reason=event.finish_reason)])
        else:
            body = CompletionResponse(model=self.model_name, usage=usage, choices=[CompletionChoice(
                text=text, finish_reason=event.finish_reason)])
        return JSONResponse(body.model_dump())

    async def _stream(self, handle: RequestHandle, chat: bool, include_usage: bool,
                      stop: list[str] | None) -> AsyncIterator[str]:
        """The server-sent events of one request (:class:`_EventStream` aborts the request when they stop early)."""
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())

        def chunk(text: str | None, finish_reason: str | None, role: str | None = None,
                  usage: UsageInfo | None = None) -> str:
            if chat:
                choices = [] if usage else [ChatChunkChoice(delta=DeltaMessage(role=role, content=text),
                                                            finish_reason=finish_reason)]
                body: Any = ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=choices,
                                                usage=usage)
            else:
                choices = [] if usage else [CompletionChoice(text=text or "", finish_reason=finish_reason)]
                body = CompletionResponse(id=rid, created=created, model=self.model_name, choices=choices,
                                          usage=usage)
            return _sse(body.model_dump_json())

        if chat:
            yield chunk("", None, role="assistant")
        event: StreamEvent | None = None
        try:
            async for text, event in self.events(handle, None, stop):
                reason = event.finish_reason
                # one chunk per engine event that sampled tokens, also when they add no text yet (an incomplete
                # UTF-8 sequence, text held back by a stop string): the client sees every step's progress
                if text or reason is not None or event.token_ids:
                    yield chunk(text, reason)
        except RequestError as e:  # the status line is sent already: the error travels as an event
            yield _sse(ErrorResponse(error=ErrorInfo(message=e.message, type=e.type)).model_dump_json())
            yield _sse("[DONE]")
            return
        if include_usage:
            yield chunk(None, None, usage=UsageInfo(
                prompt_tokens=event.num_prompt_tokens, completion_tokens=event.num_completion_tokens,
                total_tokens=event.num_prompt_tokens + event.num_completion_tokens))
        yield _sse("[DONE]")

    # ---- endpoints ------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``: one prompt (a string or token ids), one choice."""
        req: CompletionRequest = await self.parse(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise RequestError(400, f"prompt: {len(prompt)} prompts in one request are not supported; send "
                                   f"one request per prompt", param="prompt")
            prompt = prompt[0]
        token_ids = self.tokenize(prompt, "prompt")
        params = self.sampling_params(req, req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
        self.check_fits(token_ids, params, "prompt")
        return await self.run(request, req, token_ids, params, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``: the conversation goes through the tokenizer's chat template."""
        req: ChatCompletionRequest = await self.parse(request, ChatCompletionRequest)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise RequestError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content or ""
            if isinstance(content, list):
                if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                       for p in content):
                    raise RequestError(400, f"messages.{i}.content: only text parts are supported",
                                       param=f"messages.{i}.content")
                content = "".join(p["text"] for p in content)
            messages.append({"role": m.role, "content": content})
        try:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - the template's own error (jinja, a missing template) is the message
            raise RequestError(400, f"messages: the chat template failed: {e}", param="messages") from None
        token_ids = self.tokenize(prompt, "messages")
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = self.sampling_params(req, getattr(req, field), max(self.engine.max_request_tokens - len(token_ids), 1), field)
        self.check_fits(token_ids, params, "messages")
        return await self.run(request, req, token_ids, params, chat=True)


def build_app(engine: LLMEngine, served_model_name: str, max_waiting_requests: int = 256) -> FastAPI:
    """The FastAPI application over ``engine``. Its lifespan starts the engine loop and stops it at shutdown
    (uvicorn's SIGTERM / SIGINT handling ends the lifespan once the open requests are done)."""
    server = Server(engine, served_model_name, max_waiting_requests)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="nanovllm", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the request was aborted in the engine

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # routing's own errors (an unknown path: 404, a wrong method: 405 with its Allow header) in the OpenAI shape
        response = error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                  "invalid_request_error" if e.status_code < 500 else "internal_error")
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> dict:
        return ModelList(data=[ModelCard(id=server.model_name)]).model_dump()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if server.loop.is_alive() else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
