"""The interface between the engine and a model runner: one process (:class:`~nanovllm.engine.model_runner.
ModelRunner`) or several (:class:`~nanovllm.engine.tp_runner.TensorParallelRunner`)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from nanovllm.engine.sequence import Sequence


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

    def reset_step_state(self) -> None:
        """Forget the per-step state a step that raised left behind (called by :meth:`LLMEngine.abort_all`)."""
        ...
