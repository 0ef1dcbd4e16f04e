"""The interface between the engine and a model runner: one process (:class:`~nanovllm.engine.model_runner.
ModelRunner`) or several (:class:`~nanovllm.engine.tp_runner.TensorParallelRunner`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from nanovllm.engine.sequence import Sequence


@dataclass
class LaunchedRound:
    """A multi-step decode round queued on the device whose tokens are not read yet.

    Attributes:
        seqs: its sequences, in row order.
        num_steps: its decode steps.
        parity: which of the two token buffers it writes (``StepInputBuffers.round_tokens``).
        done: the CUDA event after the copy of its tokens to the host (None on the CPU).
    """

    seqs: list[Sequence]
    num_steps: int
    parity: int
    done: torch.cuda.Event | None


@runtime_checkable
class StepRunner(Protocol):
    """What :class:`~nanovllm.engine.llm_engine.LLMEngine` calls on its runner."""

    @property
    def supports_multi_step(self) -> bool:
        """Whether :meth:`run_decode_steps` may run (rounds of several decode steps on the device)."""
        ...

    @property
    def kv_cache(self) -> torch.Tensor:
        """Rank 0's KV cache ``[2, layers, blocks, block_size, kv_heads (of the rank), head_dim]`` (tools, tests)."""
        ...

    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int | None]:
        """Run one step and sample: one token id per sequence, None for a prefill chunk that does not end its
        prompt."""
        ...

    def run_decode_steps(self, seqs: list[Sequence], num_steps: int) -> list[list[int]]:
        """Run ``num_steps`` decode steps back to back; the tokens of each sequence in order. Only when
        :attr:`supports_multi_step`."""
        ...

    def launch_decode_steps(self, seqs: list[Sequence], num_steps: int, lens: list[int] | None = None,
                            follows: LaunchedRound | None = None) -> LaunchedRound:
        """Queue a round of ``num_steps`` decode steps without waiting for it (``lens`` and ``follows``: a round
        launched ahead of reading ``follows``). Only when :attr:`supports_multi_step`."""
        ...

    def read_decode_steps(self, launched: LaunchedRound) -> list[list[int]]:
        """Wait for a launched round; the tokens of each sequence in order."""
        ...

    def reset_step_state(self) -> None:
        """Forget the per-step state a step that raised left behind (called by :meth:`LLMEngine.abort_all`)."""
        ...
