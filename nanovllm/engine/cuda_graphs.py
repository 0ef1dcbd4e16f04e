"""CUDA graphs of the decode step: which batch sizes get one, their capture, and the padding of a batch to one."""
from __future__ import annotations

import torch

from nanovllm.engine.compilation import Forward
from nanovllm.engine.input_buffers import StepInputBuffers
from nanovllm.utils.context import reset_context, set_context


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then every multiple of 16, and max_num_seqs itself."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_num_seqs} | set(range(16, max_num_seqs + 1, 16)) | {max_num_seqs}
    return sorted(sizes)


class DecodeGraphs:
    """One captured decode step per size of :func:`graph_batch_sizes` (none until :meth:`capture`).

    Static inputs: the device views of :class:`StepInputBuffers` (input ids, positions, slot mapping, context
    lengths, block tables as wide as max_model_len needs); static output: one ``[max_num_seqs, vocab]`` logits
    buffer shared by every graph. A batch of n rows runs the graph of the smallest captured size >= n, its extra
    rows padded (slot -1, context length 0).
    """

    def __init__(self, max_num_seqs: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: torch.Tensor | None = None
        self.pool: object | None = None  # the graphs' memory pool, shared with the prefill graphs
        self._size_for: list[int] = []

    def __contains__(self, rows: int) -> bool:
        return rows in self.graphs

    def padded_rows(self, n: int) -> int:
        """The rows a decode step of n sequences fills: the graph size that will run it, or n without one."""
        return self._size_for[n] if self.graphs and n <= self.max_num_seqs else n

    @torch.inference_mode()
    def capture(self, forward: Forward, buffers: StepInputBuffers, kv_caches: list, device: torch.device) -> None:
        """Capture every size, largest first, sharing one memory pool; each size is run once outside the capture
        first (compilation, allocator)."""
        # the split-K fixup counters of the skinny kernels (coconut's and the engine's GEMV), allocated here: never
        # inside a capture
        from fusion_pass.kernels import fixup_counters

        fixup_counters(device, 0)
        pool = None
        for size in reversed(graph_batch_sizes(self.max_num_seqs)):
            set_context(False, slot_mapping=buffers.slot_mapping[:size], context_lens=buffers.context_lens[:size],
                        block_tables=buffers.block_tables[:size], kv_caches=kv_caches)
            args = (buffers.input_ids[:size], buffers.positions[:size], buffers.row_index[:size])
            out = forward(*args)  # warm up (and compile) outside the capture
            if self.logits is None:  # one static output for every graph: each graph's own output is freed
                self.logits = torch.empty(self.max_num_seqs, out.shape[-1], dtype=out.dtype, device=device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.logits[:size].copy_(forward(*args))
            pool = graph.pool()
            self.graphs[size] = graph
            torch.cuda.synchronize()
        self.pool = pool
        reset_context()
        sizes = sorted(self.graphs)  # batch of n rows -> the smallest captured size >= n
        self._size_for = [0] + [next(b for b in sizes if b >= n) for n in range(1, self.max_num_seqs + 1)]

    def replay(self, rows: int) -> torch.Tensor:
        """Replay the graph of ``rows`` (a captured size; its inputs already in the static buffers); returns the
        logits ``[rows, vocab]`` (a view of the shared output buffer)."""
        self.graphs[rows].replay()
        return self.logits[:rows]  # type: ignore[index]  # set by capture(), which made the graph
