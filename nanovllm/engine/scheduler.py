"""Decides which sequences run in each step: prefill (chunked) first, then decode, preempting when blocks run out."""
from __future__ import annotations

import itertools
from collections import deque
from typing import Iterable

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


def decode_order(seqs: list[Sequence]) -> list[Sequence]:
    """The rows of a decode batch: longest sequence first (ties in scheduling order).

    The decode attention kernel starts its programs in batch order, each program's work proportional to its
    sequence's context. Longest first is longest-processing-time-first list scheduling (Graham, "Bounds on
    multiprocessing timing anomalies", 1969): the long programs start at once and the short ones fill the GPU's
    tail, where batch order leaves long programs running alone at the end. Measured in
    ``benchmarks/results/<gpu>/attention-order.json``. The order of the queues (``running``) is not changed.
    """
    return sorted(seqs, key=len, reverse=True)


class Scheduler:
    """Waiting and running queues over one :class:`BlockManager`.

    Policy (as in nano-vLLM, plus chunked prefill):
    - A step is either a *prefill* step or a *decode* step. Prefill goes first: waiting sequences are admitted
      in order while blocks, ``max_num_seqs`` and the ``max_num_batched_tokens`` budget allow; the last one
      admitted may be cut into a chunk (chunked prefill) and continues in the next prefill step.
    - A decode step computes one token for every running sequence, the longest first (:func:`decode_order`;
      :meth:`extend_decode` can turn it into a
      round of several steps: multi-step decode). If a sequence needs a block and none is
      free, the most recently admitted running sequence is preempted: its blocks are freed and it goes back
      to the front of the waiting queue to be recomputed later (preemption by recompute).
    - The scheduler never spins: every request fits the empty pool alone (checked at submission), so a step
      with nothing scheduled can always free blocks by preemption and make progress.
    """

    def __init__(self, config: Config, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos_ids = config.eos_token_ids  # config.json's eos_token_id and generation_config.json's, all of them
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # ---- scheduling ----------------------------------------------------------------------------------------
    def schedule(self) -> tuple[list[Sequence], bool]:
        """Pick the sequences of the next step.

        Returns:
            (sequences, is_prefill). In a prefill step each sequence's ``num_scheduled_tokens`` says how many
            of its tokens are computed (a chunk); in a decode step it is 1.

        Raises:
            RuntimeError: nothing can be scheduled although requests are pending (an engine bug).
        """
        for _ in range(2):
            seqs = self._schedule_prefill()
            if seqs:
                return seqs, True
            seqs = self._schedule_decode()
            if seqs:
                return seqs, False
            # Nothing fits: a partly prefilled sequence may hold blocks that the head of the queue needs.
            for seq in list(self.waiting):
                if seq.block_table:
                    self._release(seq)
        raise RuntimeError("scheduler: no request can be scheduled although some are pending")

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and budget > 0 and len(self.running) + len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                if not self.block_manager.can_allocate(seq):
                    break
                self.block_manager.allocate(seq)
                # At least the last token is computed, to get the logits of the next token.
                seq.num_computed_tokens = min(seq.num_cached_tokens, len(seq) - 1)
            remaining = len(seq) - seq.num_computed_tokens
            seq.num_scheduled_tokens = min(remaining, budget)
            budget -= seq.num_scheduled_tokens
            self.block_manager.commit(seq, seq.num_computed_tokens + seq.num_scheduled_tokens)
            scheduled.append(seq)
            if seq.num_scheduled_tokens < remaining:
                break  # a chunk: the rest of this prompt goes in the next prefill step
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        while self.running and len(scheduled) < min(self.max_num_seqs, self.max_num_batched_tokens):
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.append(seq)
                seq.num_scheduled_tokens = 1
                self.block_manager.commit(seq, len(seq))
                scheduled.append(seq)
        if self.running:
            # the budget left some sequences out: they go first next time (no sequence starves)
            self.running.extend(scheduled)
        else:
            self.running.extendleft(reversed(scheduled))  # admission order kept: the newest is preempted first
        return decode_order(scheduled)

    def extend_decode(self, seqs: list[Sequence], max_steps: int, ahead: int = 0) -> int:
        """Turn the decode step just scheduled for ``seqs`` into a round of up to ``max_steps`` steps
        (multi-step decode, ``num_scheduler_steps``).

        The round runs ``k`` steps: no more than the most tokens any of ``seqs`` may still generate, and few
        enough that no sequence passes ``max_model_len``. Every sequence gets the KV blocks for
        ``len(seq) + k - 1`` tokens (step ``j`` writes the KV of position ``len(seq) - 1 + j``); when the free
        blocks do not suffice ``k`` is halved until they do. Nothing is preempted for a longer round.

        Args:
            ahead: tokens each sequence gains, before this round, from a round whose tokens the host has not read
                (:meth:`plan_next_round`): the rule applies at ``len(seq) + ahead``.

        Returns:
            k >= 1; 1 means a plain decode step (no block was reserved).
        """
        if max_steps <= 1 or not seqs:
            return 1
        room = min(self.max_model_len - (len(s) + ahead) + 1 for s in seqs)  # positions stay below max_model_len
        k = min(max_steps, room, max(self._tokens_left(s) - ahead for s in seqs))
        bm = self.block_manager
        while k > 1 and sum(bm.blocks_missing(s, len(s) + ahead + k - 1) for s in seqs) > bm.num_free_blocks:
            k //= 2
        if k <= 1:
            return 1
        for s in seqs:
            bm.reserve(s, len(s) + ahead + k - 1)
        return k

    def _tokens_left(self, seq: Sequence) -> int:
        """The most tokens ``seq`` may still produce: up to ``max_tokens`` and to ``max_model_len``."""
        return min(seq.sampling_params.max_tokens - seq.num_completion_tokens, self.max_model_len - len(seq))

    def plan_next_round(self, seqs: list[Sequence], num_steps: int, max_steps: int) -> tuple[list[Sequence], int] | None:
        """Schedule the decode round after the one running now, before its tokens are known (async scheduling:
        the host prepares and launches the next round while the device runs the current one).

        ``seqs`` run a round of ``num_steps`` steps whose tokens the host has not read. After it, each sequence
        is ``num_steps`` tokens longer unless it stops inside the round. A stop at its length limit (``max_tokens``,
        ``max_model_len``) is known now: those sequences are left out, and so are sequences already finished (a
        stop token or an abort seen since the round was launched). A stop token inside the current round is not
        known: such a sequence stays in the next round, whose tokens for it are dropped (:meth:`postprocess` skips
        finished sequences). Otherwise the next round is what :meth:`schedule` would give once the tokens are in:
        the same sequences in the same order (longest first stays longest first) and :meth:`extend_decode`'s step
        count at the new lengths (which still counts the sequences that turn out to stop on a stop token), with the
        blocks of all its steps reserved now.

        Returns:
            (sequences, steps), or None when the next round is not planned now and is left to :meth:`schedule`
            once the tokens are in: a waiting request might be admitted after the current round (a prefill goes
            first; planning goes on while the batch is full, or the head of the queue does not fit the free blocks,
            and no sequence reaches its length limit in the current round), a running sequence is not in
            ``seqs`` (the batch limits left it out), no sequence goes on, fewer than two steps fit, or the free
            blocks do not cover the round without a preemption.
        """
        if max_steps <= 1:
            return None
        k = num_steps
        going = [s for s in seqs if not s.is_finished]
        if len(self.running) != len(going):
            return None
        live = [s for s in going if self._tokens_left(s) > k]
        if not live:
            return None
        if self.waiting:
            head = self.waiting[0]
            full = len(self.running) >= self.max_num_seqs
            if len(live) < len(going) or head.block_table or not (full or not self.block_manager.can_allocate(head)):
                return None
        steps = self.extend_decode(live, max_steps, ahead=k)
        return (live, steps) if steps > 1 else None

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_scheduled_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and put it back at the front of the waiting queue (recompute later)."""
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self._release(seq)
        self.waiting.appendleft(seq)

    # ---- after the model ran ---------------------------------------------------------------------------------
    def postprocess(self, seqs: list[Sequence], token_ids: list) -> list[Sequence]:
        """Record the step's results: advance progress, append sampled tokens, finish and free sequences.

        Args:
            seqs: the sequences of the step, as returned by :meth:`schedule`.
            token_ids: per sequence, one sampled token (int); None for a prefill chunk that did not reach the
                end of its prompt (no token is produced); or, after a multi-step round, the list of the round's
                tokens in order (the tokens after the one that finishes the sequence are dropped). A sequence
                that finished while the step ran (a stop token in the round before it, an abort: async
                scheduling) is skipped and its tokens are dropped.

        Returns:
            The sequences that finished in this step.
        """
        finished = []
        for seq, tokens in zip(seqs, token_ids):
            if seq.is_finished:
                continue  # stopped or aborted while this round ran (async scheduling): its tokens are dropped
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if tokens is None:
                continue
            if not isinstance(tokens, list):
                seq.append_token(tokens)
                self._finish_reason(seq, tokens)
            else:
                self._accept_round(seq, tokens)
                # register the blocks the round filled now: a sequence that stopped inside the round is freed
                # below (its blocks keep their hash, cached), and a prefill scheduled next may hit them
                self.block_manager.commit(seq, seq.num_computed_tokens)
            if seq.finish_reason is not None:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def _accept_round(self, seq: Sequence, tokens: list[int]) -> None:
        """Append a multi-step round's tokens to ``seq`` up to the first one that finishes it, exactly as appending
        them one by one with :meth:`_finish_reason` after each would (a stop token before the length limit, the
        stop winning at the same token), and count the KV that each later step of the round wrote (the token
        sampled by the step before it)."""
        params = seq.sampling_params
        end, reason = len(tokens), None
        stops = params.stop_token_ids
        eos = () if params.ignore_eos else self.eos_ids
        if (eos and not self.eos_ids.isdisjoint(tokens)) or (stops and not set(stops).isdisjoint(tokens)):
            for j, token_id in enumerate(tokens):
                if token_id in eos or (stops and token_id in stops):
                    end, reason = j + 1, "stop"
                    break
        # "length" once the completion reaches max_tokens or the sequence max_model_len; checked after a token
        at_length = max(1, self._tokens_left(seq))
        if at_length < end or (reason is None and at_length == end):
            end, reason = at_length, "length"
        seq.token_ids.extend(tokens[:end])
        seq.num_computed_tokens += end - 1
        if reason is not None:
            seq.finish_reason = reason

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        """Set and return ``seq.finish_reason`` after ``token_id`` was appended (None: it goes on)."""
        params = seq.sampling_params
        if ((token_id in self.eos_ids and not params.ignore_eos)
                or (params.stop_token_ids and token_id in params.stop_token_ids)):
            seq.finish_reason = "stop"
        elif seq.num_completion_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
        return seq.finish_reason

    def abort(self, seq: Sequence) -> None:
        """Drop one unfinished sequence between steps: out of its queue, its blocks freed, finish_reason "abort"."""
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
        if seq.block_table:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"

    def abort_all(self, seqs: Iterable[Sequence] = ()) -> None:
        """Drop every pending request and empty the KV pool (used after an exception inside a step).

        A step that raised may have left sequences half-scheduled: popped from ``running`` while a decode batch
        was built, allocated but still waiting, or holding blocks reserved for a multi-step round. So this does
        not free sequence by sequence: every queued sequence and every one of ``seqs`` (the failed call's) is
        marked finished with no blocks, and the block manager returns to its empty state
        (:meth:`BlockManager.reset`), which also forgets every prefix hash (blocks of the failed step may hold
        partly written KV). Only the requests of the queues and ``seqs`` may hold blocks when this is called.
        """
        for seq in itertools.chain(self.running, self.waiting, seqs):
            seq.block_table = []
            seq.num_cached_tokens = seq.num_hashed_blocks = 0
            seq.num_scheduled_tokens = 0
            if seq.status != SequenceStatus.FINISHED:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = seq.finish_reason or "abort"
        self.running.clear()
        self.waiting.clear()
        self.block_manager.reset()
