"""The interface between the engine and a model runner: one process (:class:`~nanovllm.engine.model_runner.
ModelRunner`) or several (:class:`~nanovllm.engine.tp_runner.TensorParallelRunner`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from nanovllm.engine.sequence import Sequence


@dataclass
class PendingRound:
    """A multi-step decode round launched on the device whose tokens the host has not read yet.

    Attributes:
        seqs: the round's sequences, in batch-row order.
        num_steps: its decode steps.
        tokens: int64 ``[num_steps, len(seqs)]``, the sampled tokens once ``done`` has completed (pinned host
            memory on the GPU).
        done: the CUDA event recorded after the copy of the tokens to the host; None on the CPU (already there).
    """
    seqs: list[Sequence]
    num_steps: int
    tokens: torch.Tensor
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

    def launch_decode_steps(self, seqs: list[Sequence], num_steps: int, after: PendingRound | None = None
                            ) -> PendingRound:
        """Launch a round like :meth:`run_decode_steps` without waiting for it; ``after``: the round in flight that
        this one continues (async scheduling). Only when :attr:`supports_multi_step`."""
        ...

    def collect_decode_steps(self, pending: PendingRound) -> list[list[int]]:
        """Wait for a launched round; the tokens of each sequence in order."""
        ...

    def reset_step_state(self) -> None:
        """Forget the per-step state a step that raised left behind (called by :meth:`LLMEngine.abort_all`)."""
        ...
