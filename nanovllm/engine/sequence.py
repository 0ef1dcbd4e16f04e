"""A request's state as it moves through the engine."""
from __future__ import annotations

from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    """Where a sequence is: waiting for (re)prefill, running, or finished."""

    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its token ids (prompt, then generated), its KV blocks and its progress.

    Attributes:
        seq_id: a unique id, increasing in submission order.
        token_ids: prompt token ids followed by the generated ones.
        num_prompt_tokens: the length of the original prompt.
        block_table: the ids of the KV blocks that hold this sequence's keys and values, in order.
        num_cached_tokens: prompt tokens whose KV came from the prefix cache at the last allocation.
        num_computed_tokens: tokens whose KV is in the cache (after the last finished step).
        num_scheduled_tokens: tokens the current step computes for this sequence.
        finish_reason: "stop" or "length" once finished; "abort" when the call that ran it raised.
    """

    _ids = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int) -> None:
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = sampling_params
        self.block_size = block_size
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.num_hashed_blocks = 0  # leading blocks of block_table that carry their prefix hash
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0
        self.finish_reason: str | None = None
        self.num_prefix_hit_tokens: int | None = None  # tokens served from the prefix cache at first admission

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_blocks(self) -> int:
        """KV blocks needed to hold every token of the sequence."""
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    def block(self, i: int) -> list[int]:
        """Token ids of logical block ``i``."""
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
