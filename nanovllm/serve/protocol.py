"""Request and response shapes of the OpenAI completions and chat completions APIs (the subset served here).

Field names follow the OpenAI API reference and the ``openai`` Python package's types (``openai.types.Completion``,
``openai.types.chat.ChatCompletion`` / ``ChatCompletionChunk``). Requests accept extra fields so that a known but
unsupported one (``logprobs``, ``tools``, ...) gets a 400 naming it rather than a generic schema error; see
:func:`unsupported_fields`. Requests are validated strictly (pydantic strict mode): a field of the wrong JSON type
(``"max_tokens": "5"``, ``"temperature": true``) is a 400 rather than being coerced; a JSON integer is still a valid
number for the float fields (``"temperature": 1``), as in the OpenAI API.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# Fields of the OpenAI request bodies that this server does not implement, with the value that means "off": a
# request that sets one to anything else gets a 400 naming it.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False), "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None,), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
}
# Fields accepted and without effect here: identifiers and bookkeeping that do not change the output.
_IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}


class ErrorInfo(BaseModel):
    """The ``error`` object of an OpenAI error body."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """An OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with ``usage`` and no choices."""

    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling fields shared by both endpoints, with the engine's extras (``top_k``, ``ignore_eos``,
    ``stop_token_ids``). None means the server's default. ``stop``: a string or a list of strings that end the
    text (left out of it); the request then finishes with "stop"."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids (or a list holding one of them)."""

    prompt: Union[str, list[int], list[str], list[list[int]]]


class ChatMessage(BaseModel):
    """One message of a conversation. ``content`` is a string or a list of ``{"type": "text", "text": ...}``."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def unsupported_fields(request: BaseModel) -> list[str]:
    """Names of the fields of ``request`` that this server cannot honour: known OpenAI fields set to something
    other than their neutral value, and unknown fields."""
    bad = []
    for name, value in (request.model_extra or {}).items():
        if name in _IGNORED:
            continue
        if name not in _NEUTRAL or value not in _NEUTRAL[name]:
            bad.append(name)
    return bad


class UsageInfo(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    """A unique response id such as ``chatcmpl-<32 hex digits>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


class CompletionChoice(BaseModel):
    """One choice of a completion (also of a streamed chunk, where ``text`` is the new text only)."""

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """The body of a non-streamed completion, and (with ``usage`` None) of each streamed chunk."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class AssistantMessage(BaseModel):
    """The generated message of a chat completion."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    """The body of a non-streamed chat completion."""

    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """The part of the message a streamed chunk adds: the role in the first chunk, then content."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a streamed chat chunk."""

    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (``choices`` empty in the usage-only last chunk)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nanovllm"


class ModelList(BaseModel):
    """The body of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
