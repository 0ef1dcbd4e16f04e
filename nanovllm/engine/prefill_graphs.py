"""CUDA graphs of the prefill step: token-count buckets, padding a step to one, static buffers, capture and replay.

A prefill of a few hundred tokens is host-bound when launched from Python (about 280 kernels, each of the engine's
ops costing tens of microseconds of host time per call). A step whose token count and sequence count fit a bucket
instead writes its inputs, padded, into static device buffers and replays a graph captured at engine start.

Padding (:func:`pad_prefill`): a step of ``T`` tokens over ``n`` sequences runs the graph of the smallest bucket
``>= T`` with room for ``max_seqs`` sequences. Padding tokens (rows ``T .. bucket - 1``) have token id 0,
position 0 and slot -1 (their K/V is never stored) and belong to no sequence (``cu_seqlens_q`` stays at ``T``
after sequence ``n``), so attention never writes or reads them and their rows are never gathered. Padding
sequences (``n .. max_seqs - 1``) have zero new tokens and zero context, block-table rows of -1, and gather row 0.

What the kernels see is fixed per bucket: ``max_seqlen_q`` is the bucket (so the prefill attention grid is
``(cdiv(bucket, BLOCK_M), max_seqs, Hkv)``; programs past a sequence's tokens return at once), ``max_seqlen_k``
is ``max_model_len``, and every per-step value (cu_seqlens, slots, block tables, context lengths) is read from
device memory. Chunked prefill and prefix-cache hits therefore replay the same graphs: a chunk's context and a hit's
cached blocks come through ``cu_seqlens_k`` and the block tables.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.engine.compilation import Forward
from nanovllm.utils.context import reset_context, set_context

MIN_BUCKET = 16  # the smallest bucket (tokens)
PREFILL_GRAPH_MAX_SEQS = 8  # the most sequences a graphed prefill step holds (bounded by max_num_seqs)


def prefill_buckets(max_tokens: int, max_num_batched_tokens: int) -> list[int]:
    """Token counts that get a prefill graph: powers of two from :data:`MIN_BUCKET` below the limit, and the
    limit ``min(max_tokens, max_num_batched_tokens)`` itself (no step is larger than the token budget).

    Returns:
        Ascending bucket sizes; empty when ``max_tokens`` is 0 (graphs off).

    Raises:
        ValueError: a negative ``max_tokens`` or a ``max_num_batched_tokens`` below 1.
    """
    if max_tokens < 0 or max_num_batched_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 0 and max_num_batched_tokens="
                         f"{max_num_batched_tokens} >= 1")
    if max_tokens == 0:
        return []
    limit = min(max_tokens, max_num_batched_tokens)
    sizes = {limit}
    b = MIN_BUCKET
    while b < limit:
        sizes.add(b)
        b *= 2
    return sorted(sizes)


def choose_bucket(num_tokens: int, num_seqs: int, buckets: list[int], max_seqs: int) -> int | None:
    """The smallest bucket ``>= num_tokens``, or None when the step does not fit (more tokens than the largest
    bucket, more sequences than ``max_seqs``, or an empty step)."""
    if num_tokens < 1 or not 1 <= num_seqs <= max_seqs:
        return None
    for b in buckets:
        if b >= num_tokens:
            return b
    return None


@dataclass
class PaddedPrefill:
    """The inputs of one prefill step padded to a bucket (numpy, host side).

    Attributes:
        input_ids, positions: int64 ``[bucket]``.
        slot_mapping: int32 ``[bucket]``; -1 for padding tokens and for tokens whose KV is already cached.
        cu_seqlens_q, cu_seqlens_k: int32 ``[max_seqs + 1]`` prefix sums of new tokens / context lengths.
        context_lens: int32 ``[max_seqs]``.
        block_tables: int32 ``[max_seqs, width]``, padded with -1.
        logits_indices: int64 ``[max_seqs]``; the packed row of each sequence's last new token (0 for padding).
    """

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    cu_seqlens_q: np.ndarray
    cu_seqlens_k: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray
    logits_indices: np.ndarray


def pad_prefill(input_ids: list[int], positions: list[int], slot_mapping: list[int], q_lens: list[int],
                context_lens: list[int], block_tables: list[list[int]], bucket: int, max_seqs: int,
                width: int) -> PaddedPrefill:
    """Pad one packed prefill step (module docstring) to ``bucket`` tokens and ``max_seqs`` sequences.

    Args:
        input_ids, positions, slot_mapping: the ``T`` packed new tokens, as the unpadded step has them.
        q_lens: new tokens of each of the ``n`` sequences (sum ``T``).
        context_lens: cached prefix + new tokens of each sequence.
        block_tables: each sequence's KV block ids (at most ``width``).
        bucket, max_seqs, width: the static shapes.

    Raises:
        ValueError: ``T > bucket``, ``n > max_seqs``, inconsistent lengths, or a block table wider than ``width``.
    """
    t, n = len(input_ids), len(q_lens)
    if len(positions) != t or len(slot_mapping) != t or sum(q_lens) != t:
        raise ValueError(f"input_ids ({t}), positions ({len(positions)}), slot_mapping ({len(slot_mapping)}) and "
                         f"sum(q_lens) ({sum(q_lens)}) must agree")
    if len(context_lens) != n or len(block_tables) != n:
        raise ValueError(f"q_lens ({n}), context_lens ({len(context_lens)}) and block_tables ({len(block_tables)}) "
                         "must have one entry per sequence")
    if t > bucket or n > max_seqs:
        raise ValueError(f"a step of {t} tokens / {n} sequences does not fit {bucket} tokens / {max_seqs} sequences")
    ids = np.zeros(bucket, dtype=np.int64)
    pos = np.zeros(bucket, dtype=np.int64)
    slots = np.full(bucket, -1, dtype=np.int32)
    ids[:t], pos[:t], slots[:t] = input_ids, positions, slot_mapping
    cu_q = np.zeros(max_seqs + 1, dtype=np.int32)
    cu_k = np.zeros(max_seqs + 1, dtype=np.int32)
    cu_q[1:n + 1] = np.cumsum(q_lens)
    cu_q[n + 1:] = t
    cu_k[1:n + 1] = np.cumsum(context_lens)
    cu_k[n + 1:] = cu_k[n]
    lens = np.zeros(max_seqs, dtype=np.int32)
    lens[:n] = context_lens
    table = np.full((max_seqs, width), -1, dtype=np.int32)
    for i, row in enumerate(block_tables):
        if len(row) > width:
            raise ValueError(f"block table {i} has {len(row)} blocks; the buffers hold {width}")
        table[i, :len(row)] = row
    gather = np.zeros(max_seqs, dtype=np.int64)
    gather[:n] = cu_q[1:n + 1].astype(np.int64) - 1
    return PaddedPrefill(ids, pos, slots, cu_q, cu_k, lens, table, gather)


class PrefillGraphs:
    """Static prefill buffers and one captured prefill step per bucket of :func:`prefill_buckets`.

    Buffers: ``i64 = [input_ids | positions | logits_indices]`` and ``i32 = [slot_mapping | cu_seqlens_q |
    cu_seqlens_k | context_lens | block_tables]`` on the host (pinned on the GPU); on the device the ``i32`` group is
    one flat buffer (read only by the attention op, through the context) and the three model inputs are separate
    tensors, each at storage offset 0 like the unpadded path's inputs (the compiled forward guards on its inputs);
    four asynchronous copies per step. Output: one static logits buffer ``[max_seqs, vocab]`` shared by every
    graph.

    Args:
        buckets: the token counts that get a graph (ascending).
        max_seqs: sequences per graphed step.
        width: block-table width in blocks (``ceil(max_model_len / block_size)``).
        max_model_len: the fixed ``max_seqlen_k`` of every graphed step.
        device: where the model runs.

    Attributes:
        force_eager_padding: run steps that fit a bucket through the padded static buffers without a graph (the
            CPU tests' way to check the padding; no effect once graphs are captured).
    """

    def __init__(self, buckets: list[int], max_seqs: int, width: int, max_model_len: int,
                 device: torch.device) -> None:
        self.buckets, self.max_seqs, self.width = list(buckets), max_seqs, width
        self.max_model_len, self.device = max_model_len, device
        self.on_gpu = device.type == "cuda"
        self.max_tokens = max(self.buckets) if self.buckets else 0
        tm, s = self.max_tokens, max_seqs
        self._n64, self._n32 = 2 * tm + s, tm + 2 * (s + 1) + s + s * width
        self.host64 = torch.zeros(self._n64, dtype=torch.int64, pin_memory=self.on_gpu)
        self.host32 = torch.zeros(self._n32, dtype=torch.int32, pin_memory=self.on_gpu)
        self.dev_inputs = {name: torch.zeros(n, dtype=torch.int64, device=device)
                           for name, n in (("input_ids", tm), ("positions", tm), ("logits_indices", s))}
        self.dev32 = torch.zeros(self._n32, dtype=torch.int32, device=device) if self.on_gpu else self.host32
        self._host_views = self._views(self.host64, self.host32)  # fixed: built once
        self._dev_views = self._views(None, self.dev32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: torch.Tensor | None = None
        self.force_eager_padding = False
        self._uploaded: torch.cuda.Event | None = None
        self.replays = 0  # graphed (or forced padded) steps run, for tests and statistics
        self._fill_padding()

    # ---- views -------------------------------------------------------------------------------------------------
    def _views(self, flat64: torch.Tensor | None, flat32: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of the flat buffers (the ``i64`` group: the device's separate input tensors when None)."""
        tm, s, w = self.max_tokens, self.max_seqs, self.width
        q_end, k_end = tm + s + 1, tm + 2 * (s + 1)  # ends of cu_seqlens_q and cu_seqlens_k
        i64 = self.dev_inputs if flat64 is None else {
            "input_ids": flat64[:tm], "positions": flat64[tm:2 * tm], "logits_indices": flat64[2 * tm:]}
        return {**i64, "slot_mapping": flat32[:tm], "cu_seqlens_q": flat32[tm:q_end],
                "cu_seqlens_k": flat32[q_end:k_end], "context_lens": flat32[k_end:k_end + s], "block_tables": flat32[k_end + s:].view(s, w)}

    def bucket_for(self, num_tokens: int, num_seqs: int) -> int | None:
        """The bucket that runs a step of ``num_tokens`` over ``num_seqs`` sequences, or None (eager path): only
        once graphs are captured, or with :attr:`force_eager_padding`."""
        if not self.graphs and not self.force_eager_padding:
            return None
        return choose_bucket(num_tokens, num_seqs, self.buckets, self.max_seqs)

    def _write_host(self, p: PaddedPrefill) -> int:
        if self._uploaded is not None:  # never overwrite pinned memory that a copy may still read
            self._uploaded.synchronize()
            self._uploaded = None
        h = self._host_views
        b = len(p.input_ids)
        h["input_ids"][:b] = torch.from_numpy(p.input_ids)
        h["positions"][:b] = torch.from_numpy(p.positions)
        h["slot_mapping"][:b] = torch.from_numpy(p.slot_mapping)
        h["logits_indices"][:] = torch.from_numpy(p.logits_indices)
        h["cu_seqlens_q"][:] = torch.from_numpy(p.cu_seqlens_q)
        h["cu_seqlens_k"][:] = torch.from_numpy(p.cu_seqlens_k)
        h["context_lens"][:] = torch.from_numpy(p.context_lens)
        h["block_tables"][:] = torch.from_numpy(p.block_tables)
        return b

    def _fill_padding(self) -> None:
        """An all-padding step (no sequence, no stored slot) for warm-up and capture."""
        empty = pad_prefill([], [], [], [], [], [], self.max_tokens, self.max_seqs, self.width)
        self._write_host(empty)
        self._upload()

    def _upload(self) -> None:
        h = self._host_views
        for name, dev in self.dev_inputs.items():
            dev.copy_(h[name], non_blocking=self.on_gpu)
        if not self.on_gpu:
            return  # the i32 group is shared by host and device
        self.dev32.copy_(self.host32, non_blocking=True)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()

    def set_step(self, padded: PaddedPrefill, kv_caches: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write ``padded`` into the static buffers, upload them and set the prefill context over their device
        views; returns ``(input_ids [bucket], positions [bucket], logits_indices [max_seqs])`` (device views)."""
        bucket = self._write_host(padded)
        self._upload()
        return self._set_context(bucket, kv_caches)

    def _set_context(self, bucket: int, kv_caches: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self._dev_views
        set_context(True, d["cu_seqlens_q"], d["cu_seqlens_k"], bucket, self.max_model_len,
                    d["slot_mapping"][:bucket], d["context_lens"], d["block_tables"], kv_caches)
        return d["input_ids"][:bucket], d["positions"][:bucket], d["logits_indices"]

    # ---- capture and replay --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, forward: Forward, kv_caches: list, pool: object | None = None) -> object | None:
        """Capture every bucket, largest first, into ``pool`` (the decode graphs' pool, shared); each bucket runs
        once outside the capture first (compilation, first-use tuning). The buffers hold an all-padding step, so
        nothing is written to the KV cache. Returns the pool."""
        self._fill_padding()
        for bucket in reversed(self.buckets):
            args = self._set_context(bucket, kv_caches)
            out = forward(*args)  # warm up outside the capture
            if self.logits is None:
                self.logits = torch.empty(self.max_seqs, out.shape[-1], dtype=out.dtype, device=self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.logits.copy_(forward(*args))
            pool = graph.pool()
            self.graphs[bucket] = graph
            torch.cuda.synchronize()
        reset_context()
        return pool

    def run(self, bucket: int, forward: Forward, input_ids: torch.Tensor, positions: torch.Tensor,
            logits_indices: torch.Tensor) -> torch.Tensor:
        """Logits ``[max_seqs, vocab]`` of the step set by :meth:`set_step`: the graph's replay, or ``forward`` on the
        padded inputs when no graph was captured (:attr:`force_eager_padding`)."""
        self.replays += 1
        graph = self.graphs.get(bucket)
        if graph is None:
            return forward(input_ids, positions, logits_indices)
        graph.replay()
        return self.logits  # type: ignore[return-value]  # set by capture(), which made the graph
