"""The engine loop: validate requests, add them, step the scheduler and the model until all are done."""
from __future__ import annotations

import gc
import numbers
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_runner import PendingRound, StepRunner
from nanovllm.layers.sampler import warm_up_sampling
from nanovllm.sampling_params import SamplingParams


@dataclass
class StepStats:
    """Counters over the engine's life (tokens, seconds), for progress bars and benchmarks."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # model steps of decode (a multi-step round counts each of its steps)
    decode_rounds: int = 0  # step() calls that decoded (a multi-step round counts once)
    steps: int = 0  # calls of LLMEngine.step (a multi-step round is one)
    # host work of the steps: scheduling before a step, the inputs of a decode step or round before its first
    # launch, the postprocess after the sampled tokens are read (seconds); the device waits for it, except where
    # async scheduling planned the next round ahead (then it overlaps the device's work)
    host_seconds: float = 0.0


@dataclass
class RequestOutput:
    """What one online request gained in one :meth:`LLMEngine.step_requests` call.

    Attributes:
        request_id: the id :meth:`LLMEngine.submit` returned.
        new_token_ids: the tokens sampled since the last output of this request, in order (several after a
            multi-step round; empty when only its state changed).
        finished: True on the request's last output.
        finish_reason: "stop", "length" or "abort" once finished, else None.
        num_prompt_tokens: the prompt's length.
        num_completion_tokens: the tokens generated so far (including ``new_token_ids``).
    """

    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_completion_tokens: int


class LLMEngine:
    """Owns the tokenizer, the scheduler (with its block manager) and the model runner(s).

    Args:
        config: a validated :class:`Config`.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.model_runner: StepRunner
        if config.tensor_parallel_size > 1:
            from nanovllm.engine.tp_runner import TensorParallelRunner
            self.model_runner = TensorParallelRunner(config)
        else:
            from nanovllm.engine.model_runner import ModelRunner
            self.model_runner = ModelRunner(config)
        self.block_manager = BlockManager(config.num_kvcache_blocks, config.kvcache_block_size)
        self.scheduler = Scheduler(config, self.block_manager)
        self.stats = StepStats()
        self.last_num_steps = 1  # model steps run by the last call of step()
        self._in_flight: PendingRound | None = None  # async scheduling: a launched decode round not yet read
        # online requests (submit / abort / step_requests): the inboxes may be filled from any thread; the rest
        # is touched only by the thread that calls step_requests
        self._inbox: deque[Sequence] = deque()
        self._abort_inbox: deque[int] = deque()
        self._online: dict[int, tuple[Sequence, int]] = {}  # request id -> (sequence, tokens already reported)
        self.last_failed_request_ids: list[int] = []  # the online requests dropped by the last failed step
        if config.device == "cuda":
            self.warm_up()
            # The build leaves a large, long-lived Python heap (compiled graphs, Triton kernels, tuning tables).
            # Freezing it keeps the cyclic GC's full collections, which a long generate() triggers, from walking
            # it during serving (suspected of ~0.1 s pauses at batch 256 on the H200). GPU engines only: frozen
            # objects are never collected, and the CPU tests build hundreds of engines in one process.
            gc.collect()
            gc.freeze()

    def warm_up(self) -> None:
        """Run a few tiny greedy requests through the whole step path and launch the sampling kernels once, so
        that the first real requests compile nothing: neither graphs of the model nor Triton kernels.

        The compiled forward is dynamic in the token count but Dynamo specializes a dimension of size 1: a prefill
        of one sequence (one logits row) or of one token needs graphs of its own, which the build's largest-prefill
        run does not compile. Triton kernels are compiled per specialization of their integer arguments (1,
        multiple of 16, other) on first launch. Three batches cover those cases: one 1-token prompt, one 17-token
        prompt, and two prompts (9 and 24 tokens), shortened to fit ``max_model_len``; greedy, two output tokens
        each, so a decode step runs too. Greedy requests never reach the sampling kernels, so on CUDA
        :func:`~nanovllm.layers.sampler.warm_up_sampling` then launches them directly on zero logits of the
        model's dtype and vocabulary (the kernels of requests with temperature > 0 and neither top-k nor top-p).

        Afterwards the engine is as built: neither step draws a random number nor moves the sampler's key or call
        counter (every later draw equals a fresh engine's), the KV pool and its prefix cache are emptied
        (:meth:`BlockManager.reset`), and the step statistics, the preemption count and the prefill graphs' replay
        count are zeroed. The seconds taken go to the runner's ``init_seconds["warm_up"]`` (where it keeps them).
        Called by the constructor on CUDA.
        """
        t0 = time.perf_counter()
        self._warm_up_requests()
        if self.config.device == "cuda":
            cfg = self.config
            vocab, tp = cfg.hf_config.vocab_size, cfg.tensor_parallel_size
            # the LM head's logits: [B, vocab], a slice of rows of -(-vocab // tp) * tp elements under TP
            warm_up_sampling("cuda", cfg.torch_dtype, vocab, cfg.max_num_seqs, -(-vocab // tp) * tp)
            torch.cuda.synchronize()
        phases = getattr(self.model_runner, "init_seconds", None)
        if isinstance(phases, dict):
            phases["warm_up"] = time.perf_counter() - t0

    def _warm_up_requests(self) -> None:
        """The greedy requests of :meth:`warm_up`, then the KV pool, prefix cache and counters reset."""
        vocab = min(self.config.hf_config.vocab_size, 1000)
        longest = self.config.max_model_len - 2  # room for the two output tokens
        if longest < 1:
            return

        def ids(n: int, salt: int) -> list[int]:
            return [(salt + 7 * i) % vocab for i in range(min(n, longest))]

        greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        for prompts in ([ids(1, 1)], [ids(17, 2)], [ids(9, 3), ids(24, 4)]):
            try:
                for i, p in enumerate(prompts):
                    self.validate(i, p, greedy)  # a pool smaller than one such request: leave it out
            except ValueError:
                continue
            self.generate(prompts, [greedy] * len(prompts), use_tqdm=False)
        self.block_manager.reset()
        self.scheduler.num_preemptions = 0
        self.stats = StepStats()
        prefill_graphs = getattr(self.model_runner, "prefill_graphs", None)
        if prefill_graphs is not None:  # its replay count is a statistic too
            prefill_graphs.replays = 0

    # ---- requests --------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        """Turn every prompt into token ids.

        Raises:
            TypeError: prompts is not a list of strings or of token-id lists (the bad index is named).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of strings or a list of token-id lists, got {type(prompts).__name__}")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append(self.tokenizer.encode(p) if p else [])
            elif isinstance(p, (list, tuple)):
                bad = next((j for j, t in enumerate(p) if isinstance(t, bool) or not isinstance(t, numbers.Integral)),
                           None)
                if bad is not None:
                    raise TypeError(f"prompt {i}: token ids must be ints, got {p[bad]!r} "
                                    f"({type(p[bad]).__name__}) at position {bad}")
                out.append([int(t) for t in p])  # numpy integers become Python ints
            else:
                raise TypeError(f"prompt {i}: expected a string or a list of int token ids, got {type(p).__name__}")
        return out

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + completion) one request can hold: ``max_model_len``, or the whole KV pool's
        tokens where that is smaller (:meth:`validate` refuses a request whose prompt + max_tokens needs more)."""
        return min(self.config.max_model_len, self.block_manager.num_blocks * self.config.kvcache_block_size)

    def validate(self, i: int, token_ids: list[int], params: SamplingParams) -> None:
        """Check one request before any work starts.

        Raises:
            ValueError: the prompt is empty, holds a token id outside the vocabulary, leaves no room to
                generate under max_model_len, or needs more KV blocks than the whole pool (message names ``i``).
        """
        cfg = self.config
        vocab = cfg.hf_config.vocab_size
        if not token_ids:
            raise ValueError(f"prompt {i} is empty")
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt {i} holds token id {bad}, outside the vocabulary [0, {vocab})")
        if len(token_ids) >= cfg.max_model_len:
            raise ValueError(f"prompt {i} has {len(token_ids)} tokens; max_model_len={cfg.max_model_len} leaves no "
                             f"room to generate (the prompt must be shorter than max_model_len)")
        total = min(len(token_ids) + params.max_tokens, cfg.max_model_len)
        if total > self.max_request_tokens:
            blocks = -(-total // cfg.kvcache_block_size)
            raise ValueError(f"prompt {i} needs {blocks} KV blocks for {total} tokens (prompt + max_tokens) but the "
                             f"whole pool has {self.block_manager.num_blocks} blocks of {cfg.kvcache_block_size}")

    def add_request(self, token_ids: list[int], params: SamplingParams) -> Sequence:
        seq = Sequence(token_ids, params, self.config.kvcache_block_size)
        self.scheduler.add(seq)
        return seq

    # ---- stepping --------------------------------------------------------------------------------------------------
    def step(self) -> tuple[list[Sequence], bool, int]:
        """Schedule and run one step: a prefill step, a decode step, or (``num_scheduler_steps`` > 1, one process)
        a round of up to that many decode steps sized by :meth:`Scheduler.extend_decode`. Returns (finished
        sequences, is_prefill, tokens processed; for a round, the tokens kept).

        With ``async_scheduling``, a decode round is launched without waiting for it; the next round is then
        planned (:meth:`Scheduler.plan_next_round`) and launched behind it before this one's tokens are read, so
        the host's scheduling, preparation and postprocessing run while the device computes. Each call still
        reports one round: the one launched earliest.
        """
        t0 = time.perf_counter()
        if self._in_flight is not None:
            return self._step_in_flight(t0)
        seqs, is_prefill = self.scheduler.schedule()
        num_steps = 1
        if not is_prefill and self.config.num_scheduler_steps > 1 and self.model_runner.supports_multi_step:
            num_steps = self.scheduler.extend_decode(seqs, self.config.num_scheduler_steps)
        if num_steps > 1 and self.config.async_scheduling:
            self.stats.host_seconds += time.perf_counter() - t0  # scheduling (the inputs: prepare_seconds below)
            self._in_flight = self._launch(seqs, num_steps, None)
            return self._step_in_flight(t0)
        prepared = getattr(self.model_runner, "prepare_seconds", 0.0)
        t1 = time.perf_counter()
        if num_steps > 1:
            before = sum(len(s) for s in seqs)
            token_ids = self.model_runner.run_decode_steps(seqs, num_steps)
            t2 = time.perf_counter()
            finished = self.scheduler.postprocess(seqs, token_ids)
            tokens = sum(len(s) for s in seqs) - before  # the tokens kept (a stop drops the rest of the round)
        else:
            tokens = sum(s.num_scheduled_tokens for s in seqs)
            token_ids = self.model_runner.run(seqs, is_prefill)
            t2 = time.perf_counter()
            finished = self.scheduler.postprocess(seqs, token_ids)
        t3 = time.perf_counter()
        self.stats.host_seconds += (t1 - t0) + (t3 - t2) + getattr(self.model_runner, "prepare_seconds", 0.0) - prepared
        self._count(is_prefill, tokens, t3 - t0, num_steps)
        return finished, is_prefill, tokens

    def _step_in_flight(self, t0: float) -> tuple[list[Sequence], bool, int]:
        """The async-scheduling part of :meth:`step`: a round is in flight. Plan and launch the next round behind
        it (when it is a plain continuation), then read the round in flight and postprocess it."""
        runner, sched = self.model_runner, self.scheduler
        current = self._in_flight
        assert current is not None
        t1 = time.perf_counter()
        plan = sched.plan_next_round(current.seqs, current.num_steps, self.config.num_scheduler_steps)
        self.stats.host_seconds += time.perf_counter() - t1
        self._in_flight = None
        if plan is not None:
            self._in_flight = self._launch(*plan, current)
        token_ids = runner.collect_decode_steps(current)
        t2 = time.perf_counter()
        live = [s for s in current.seqs if not s.is_finished]
        before = sum(len(s) for s in live)
        for s in live:
            s.num_scheduled_tokens = 1  # a planned round's sequences were scheduled before the last postprocess
        finished = sched.postprocess(current.seqs, token_ids)
        tokens = sum(len(s) for s in live) - before
        if self._in_flight is not None:
            for s in self._in_flight.seqs:
                if not s.is_finished:  # what _schedule_decode registers for a step's sequences
                    self.block_manager.commit(s, len(s))
            if all(s.is_finished for s in self._in_flight.seqs):
                runner.collect_decode_steps(self._in_flight)  # every row stopped: nothing of it is kept
                self._in_flight = None
        t3 = time.perf_counter()
        self.stats.host_seconds += t3 - t2
        self._count(False, tokens, t3 - t0, current.num_steps)
        return finished, False, tokens

    def _launch(self, seqs: list[Sequence], num_steps: int, after: PendingRound | None) -> PendingRound:
        """``launch_decode_steps``, its input preparation counted as host time (not its kernel launches)."""
        prepared = self.model_runner.prepare_seconds
        pending = self.model_runner.launch_decode_steps(seqs, num_steps, after=after)
        self.stats.host_seconds += self.model_runner.prepare_seconds - prepared
        return pending

    def _count(self, is_prefill: bool, tokens: int, seconds: float, num_steps: int) -> None:
        st = self.stats
        st.steps += 1
        if is_prefill:
            st.prefill_tokens += tokens
            st.prefill_seconds += seconds
        else:
            st.decode_tokens += tokens
            st.decode_seconds += seconds
            st.decode_steps += num_steps
            st.decode_rounds += 1
        self.last_num_steps = num_steps

    @property
    def round_in_flight(self) -> bool:
        """True while a decode round launched by async scheduling has not been read (the next :meth:`step`
        reports it)."""
        return self._in_flight is not None

    def is_finished(self) -> bool:
        """True when no request is waiting or running and no decode round is in flight."""
        return self.scheduler.is_finished() and self._in_flight is None

    def generate(self, token_ids: list[list[int]], params: list[SamplingParams], use_tqdm: bool = True
                 ) -> list[Sequence]:
        """Run requests to completion; returns their sequences in input order.

        If anything raises (KeyboardInterrupt included) while requests are added or a step runs, every request
        of the call and every pending one is dropped and the KV pool is emptied (:meth:`abort_all`), then the
        exception propagates; the engine stays usable and its next call gives a fresh engine's tokens.
        """
        seqs: list[Sequence] = []
        bar = None
        prefill_tps = decode_tps = 0.0
        try:
            for t, p in zip(token_ids, params):
                seqs.append(self.add_request(t, p))
            bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
            while not self.is_finished():
                t0 = time.perf_counter()
                finished, is_prefill, tokens = self.step()
                dt = max(time.perf_counter() - t0, 1e-9)
                if is_prefill:
                    prefill_tps = tokens / dt
                else:
                    decode_tps = tokens / dt
                bar.set_postfix(prefill=f"{prefill_tps:.0f} tok/s", decode=f"{decode_tps:.0f} tok/s", refresh=False)
                bar.update(len(finished))
        except BaseException:  # KeyboardInterrupt included: the engine must stay usable after Ctrl-C
            self.abort_all(seqs)
            raise
        finally:
            if bar is not None:
                bar.close()
        return seqs

    def abort_all(self, seqs: Iterable[Sequence] = ()) -> None:
        """Recover from an exception raised anywhere inside a step: drop every pending request (and ``seqs``,
        the failed call's own sequences, which a step may hold outside the queues), return the KV pool to its
        empty state and clear the model runner's per-step state (attention context, sampling flags, multi-step
        staging). Afterwards the engine behaves as a fresh one: no block held, nothing scheduled, no prefix
        cached (a block of the failed step may hold partly written KV)."""
        self._in_flight = None
        self.scheduler.abort_all(seqs)
        self.model_runner.reset_step_state()

    # ---- online requests (a server's loop) ---------------------------------------------------------------------
    def submit(self, token_ids: list[int], params: SamplingParams) -> int:
        """Queue a request for the next :meth:`step_requests`; returns its request id. Safe from any thread.
        The caller validates first (:meth:`validate`); the request joins the running batch at the next step."""
        seq = Sequence(token_ids, params, self.config.kvcache_block_size)
        self._inbox.append(seq)
        return seq.seq_id

    def abort(self, request_id: int) -> None:
        """Ask for a request to be dropped: at the next :meth:`step_requests` it leaves its queue, its KV blocks
        are freed and its last output says finish_reason "abort". Safe from any thread; an unknown or already
        finished id is ignored."""
        self._abort_inbox.append(request_id)

    @property
    def num_unfinished_requests(self) -> int:
        """Online requests submitted and not yet reported finished (read from any thread: an estimate)."""
        return len(self._online) + len(self._inbox)

    def step_requests(self) -> list[RequestOutput]:
        """Admit submitted requests, apply aborts, run one :meth:`step` if anything is pending, and report what
        each online request gained. Call from one thread only.

        Returns:
            One :class:`RequestOutput` per online request that gained tokens or finished in this call.

        Raises:
            Exception: whatever the step raised. Every online request is then dropped and its blocks freed; their
                ids are in ``last_failed_request_ids`` (the caller reports the error to each of them; requests
                submitted later run normally).
        """
        outputs: list[RequestOutput] = []
        while self._inbox:
            seq = self._inbox.popleft()
            self._online[seq.seq_id] = (seq, 0)
            self.scheduler.add(seq)
        while self._abort_inbox:
            entry = self._online.get(self._abort_inbox.popleft())
            if entry is not None and not entry[0].is_finished:
                self.scheduler.abort(entry[0])
        if not self.is_finished():
            try:
                self.step()
            except BaseException:
                # as in generate(): every pending request dropped, the pool and the runner's step state reset
                self.abort_all([seq for seq, _ in self._online.values()])
                self.last_failed_request_ids = list(self._online)
                self._online.clear()
                raise
        for rid, (seq, reported) in list(self._online.items()):
            n = seq.num_completion_tokens
            if n > reported or seq.is_finished:
                outputs.append(RequestOutput(rid, seq.token_ids[seq.num_prompt_tokens + reported:], seq.is_finished,
                                             seq.finish_reason, seq.num_prompt_tokens, n))
                self._online[rid] = (seq, n)
            if seq.is_finished:
                del self._online[rid]
        return outputs
