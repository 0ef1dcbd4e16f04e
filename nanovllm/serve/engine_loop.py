"""The online loop: one thread owns the engine and steps it while requests come and go (continuous batching)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams
from nanovllm.serve.metrics import Metrics

logger = logging.getLogger("nanovllm.serve")


class QueueFullError(Exception):
    """The waiting queue holds ``max_waiting_requests`` requests already (answered with HTTP 503)."""


@dataclass
class StreamEvent:
    """What the loop sends to a request's handler after an engine step.

    Attributes:
        token_ids: the tokens sampled since the last event (the stop token that ended the request included).
        num_prompt_tokens, num_completion_tokens: token counts so far.
        finish_reason: "stop", "length" or "abort" on the last event, else None.
        error: set (with finish_reason "abort") when the engine failed while running this request.
    """

    token_ids: list[int]
    num_prompt_tokens: int
    num_completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class RequestHandle:
    """One request in flight: its id in the engine and the queue its events arrive on (read by one coroutine)."""

    request_id: int
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finish_reason: str | None = None  # set by :meth:`EngineLoop.abort` (the reason the metrics count)


class EngineLoop:
    """Runs :meth:`LLMEngine.step_requests` in a background thread for as long as requests are pending.

    Requests submitted while others decode join the running batch at the next step; each step's new tokens go to
    their request's asyncio queue at once (after a multi-step round, the round's tokens arrive together). An
    aborted request (a client that went away) leaves the batch and frees its KV blocks at the next step.

    Args:
        engine: the engine; only this loop's thread steps it once :meth:`start` ran.
        metrics: the Prometheus metrics to update after every step.
        max_waiting_requests: the most requests that may wait for admission; :meth:`submit` raises
            :class:`QueueFullError` beyond it.
    """

    def __init__(self, engine: LLMEngine, metrics: Metrics, max_waiting_requests: int) -> None:
        if max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        self.engine = engine
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self._handles: dict[int, RequestHandle] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- called from the event loop --------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine thread; events are delivered on ``loop``."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine thread after its current step (pending requests get an "abort" event)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def num_waiting(self) -> int:
        """Requests submitted and not yet admitted into the running batch."""
        return max(self.engine.num_unfinished_requests - len(self.engine.scheduler.running), 0)

    def submit(self, token_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Hand a validated request to the engine; returns its handle.

        Raises:
            QueueFullError: ``max_waiting_requests`` requests are waiting already.
            RuntimeError: the loop is stopped.
        """
        if not self.is_alive():
            raise RuntimeError("the engine loop is not running")
        if self.num_waiting() >= self.max_waiting_requests:
            raise QueueFullError(f"{self.max_waiting_requests} requests are waiting already; retry later")
        with self._lock:  # the engine thread must find the handle when the request's first output comes
            request_id = self.engine.submit(token_ids, params)
            handle = RequestHandle(request_id, asyncio.Queue())
            self._handles[request_id] = handle
        self._wake.set()
        return handle

    def abort(self, request_id: int, reason: str = "abort") -> None:
        """Drop a request at the next step (its KV blocks are freed); a finished one is ignored. ``reason`` is
        the finish reason the metrics count ("stop" when a stop string ended the text)."""
        with self._lock:
            handle = self._handles.get(request_id)
            if handle is not None and handle.finish_reason is None:  # the first reason given counts
                handle.finish_reason = reason
        self.engine.abort(request_id)
        self._wake.set()

    # ---- the engine thread -----------------------------------------------------------------------------------
    def _post(self, batch: list[tuple[RequestHandle, StreamEvent]]) -> None:
        """Deliver a step's events on the event loop's thread (one wake-up of the loop for all of them)."""
        if not batch:
            return

        def deliver() -> None:
            for handle, event in batch:
                handle.queue.put_nowait(event)

        try:
            self._loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the event loop is closed (shutdown): nobody listens any more
            pass

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            with self._lock:
                idle = not self._handles
            if idle:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = engine.step_requests()
            except Exception as e:  # noqa: BLE001 - reported to the requests of the failed step, the loop goes on
                logger.exception("engine step failed")
                failed = set(engine.last_failed_request_ids)
                with self._lock:
                    handles = [self._handles.pop(i) for i in failed if i in self._handles]
                self._post([(h, StreamEvent([], 0, 0, "abort", error=f"{type(e).__name__}: {e}")) for h in handles])
                self.metrics.update_engine(engine)
                continue
            now = time.perf_counter()
            batch = []
            with self._lock:  # once per step: the handles of this step's outputs, finished ones leave the table
                handles = [self._handles.pop(out.request_id, None) if out.finished
                           else self._handles.get(out.request_id) for out in outputs]
            for out, handle in zip(outputs, handles):
                if handle is None:
                    continue
                if out.new_token_ids and handle.first_token is None:
                    handle.first_token = now
                    self.metrics.time_to_first_token.observe(now - handle.arrival)
                self.metrics.generation_tokens.inc(len(out.new_token_ids))
                if out.finished:
                    reason = handle.finish_reason if out.finish_reason == "abort" else out.finish_reason
                    self.metrics.finish(reason, out.num_prompt_tokens, now - handle.arrival)
                batch.append((handle, StreamEvent(out.new_token_ids, out.num_prompt_tokens,
                                                  out.num_completion_tokens, out.finish_reason)))
            self._post(batch)
            self.metrics.update_engine(engine)
        # stopped: whoever still waits hears that its request ends here
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        self._post([(h, StreamEvent([], 0, 0, "abort", error="the server is shutting down")) for h in handles])
