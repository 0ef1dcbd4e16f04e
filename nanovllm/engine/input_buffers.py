"""Persistent host/device buffers for the per-step inputs of decode and of the sampler.

Every decode step needs, per sequence: the newest token id, its position, its KV slot, the context length and
the block table; the sampler needs each row's temperature, top-k and top-p. Building a fresh tensor for each of
these every step costs a tensor construction, a pinned-memory allocation and a host-to-device copy apiece, while
the GPU waits.

Here they live in two flat buffers that are allocated once, filled with numpy on the host and sent to the
device with two ``copy_`` calls per step (four per multi-step round, see below):

- ``i64``: ``[input_ids | positions | top_ks]``, each ``max_rows`` long;
- ``i32``: ``[temperatures | top_ps | slot_mapping | context_lens | block_tables]``; temperatures and top_ps
  are float32 bit patterns (viewed as float32 on both sides); the block tables come last, row-major
  ``[max_rows, width]``, so a step with ``n`` rows copies one contiguous prefix.

Multi-step decode (``num_scheduler_steps`` = k > 1) adds staging rows for the later steps of a round: the
positions (``i64`` ``[k - 1, max_rows]``) and the slot mapping with the context lengths (``i32``
``[k - 1, 2 * max_rows]``), uploaded with the first step's inputs; before step ``j`` the device copies row
``j - 1`` into the static views and the tokens that step ``j - 1`` sampled into ``input_ids``.

On the GPU the host side is pinned memory and the copies are asynchronous; the device views are what the CUDA
graphs were captured with (static inputs). On the CPU host and device are the same tensors and the copies
are skipped.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.seeded_noise import SeededRows

_TOP_K_MAX = 2**62  # a larger top_k keeps every token as well, and would not fit the int64 buffer


class StepInputBuffers:
    """The decode step's and the sampler's inputs, for up to ``max_rows`` sequences.

    Args:
        max_rows: the largest batch (``max_num_seqs``).
        width: block-table width in blocks (``ceil(max_model_len / block_size)``).
        block_size: tokens per KV block.
        device: where the model runs.
        max_steps: the most decode steps of one multi-step round (``num_scheduler_steps``; 1: no staging).

    Attributes (device views, each ``[max_rows]`` unless said):
        input_ids, positions, top_ks: int64.
        slot_mapping, context_lens: int32; block_tables: int32 ``[max_rows, width]``.
        temperatures, top_ps: float32.
        step_tokens: int64 ``[max_steps, max_rows]``, the tokens sampled by each step of a round.
    """

    def __init__(self, max_rows: int, width: int, block_size: int, device: torch.device, max_steps: int = 1) -> None:
        self.max_rows, self.width, self.block_size, self.device = max_rows, width, block_size, device
        self.on_gpu = device.type == "cuda"
        n64, n32 = 3 * max_rows, 4 * max_rows + max_rows * width
        self.host64 = torch.zeros(n64, dtype=torch.int64, pin_memory=self.on_gpu)
        self.host32 = torch.zeros(n32, dtype=torch.int32, pin_memory=self.on_gpu)
        self.dev64 = torch.zeros(n64, dtype=torch.int64, device=device) if self.on_gpu else self.host64
        self.dev32 = torch.zeros(n32, dtype=torch.int32, device=device) if self.on_gpu else self.host32
        # numpy views of the host side (shared memory)
        h64, h32 = self.host64.numpy(), self.host32.numpy()
        r = max_rows
        self.np_input_ids, self.np_positions, self.np_top_ks = h64[:r], h64[r:2 * r], h64[2 * r:3 * r]
        self.np_temperatures = h32[:r].view(np.float32)
        self.np_top_ps = h32[r:2 * r].view(np.float32)
        self.np_slot_mapping, self.np_context_lens = h32[2 * r:3 * r], h32[3 * r:4 * r]
        self.np_block_tables = h32[4 * r:].reshape(r, width)
        # device views
        d64, d32 = self.dev64, self.dev32
        self.input_ids, self.positions, self.top_ks = d64[:r], d64[r:2 * r], d64[2 * r:3 * r]
        self.temperatures = d32[:r].view(torch.float32)
        self.top_ps = d32[r:2 * r].view(torch.float32)
        self.slot_mapping, self.context_lens = d32[2 * r:3 * r], d32[3 * r:4 * r]
        self.block_tables = d32[4 * r:].view(r, width)
        self.row_index = torch.arange(r, device=device)  # logits_indices of a decode step
        self._arange_width = np.arange(width)
        self._uploaded: torch.cuda.Event | None = None
        # multi-step staging: row j - 1 holds step j's positions / [slot mapping | context lengths]
        self.max_steps = max_steps
        extra = max(max_steps - 1, 0)
        self.host_step64 = torch.zeros(extra, r, dtype=torch.int64, pin_memory=self.on_gpu)
        self.host_step32 = torch.zeros(extra, 2 * r, dtype=torch.int32, pin_memory=self.on_gpu)
        self.dev_step64 = torch.zeros(extra, r, dtype=torch.int64, device=device) if self.on_gpu else self.host_step64
        self.dev_step32 = torch.zeros(extra, 2 * r, dtype=torch.int32, device=device) if self.on_gpu else self.host_step32
        self.step_tokens = torch.zeros(max_steps, r, dtype=torch.int64, device=device)
        self._step_rows = 0  # staging rows filled for the current round
        self.np_slot_mapping.fill(-1)
        self.np_block_tables.fill(-1)
        self.upload(0)

    def _wait_for_last_upload(self) -> None:
        """Do not overwrite pinned memory that an earlier asynchronous copy may still be reading."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def fill_decode(self, seqs: list[Sequence], rows: int, ahead: int = 0,
                    prev_rows: list[int] | None = None) -> None:
        """Write the decode inputs of ``seqs`` (one new token each) into rows ``[0, len(seqs))`` and padding
        into rows ``[len(seqs), rows)``: token 0, position 0, slot -1 (nothing stored), context length 0.

        Args:
            ahead: tokens each sequence gains, before this step, from a round whose tokens the host has not read
                (async scheduling): the step sits at ``len(s) + ahead - 1``.
            prev_rows: with ``ahead`` > 0, each sequence's row in that round; the input ids are then its tokens,
                gathered on the device by :meth:`feed_from_round` after the upload (rows ``[0, n)`` of
                ``input_ids`` carry these row numbers until then).

        Raises:
            ValueError: more sequences than ``rows``, ``rows`` above ``max_rows``, or a block table wider
                than ``width``.
        """
        n = len(seqs)
        if not n <= rows <= self.max_rows:
            raise ValueError(f"decode batch of {n} rows padded to {rows}; at most {self.max_rows} rows")
        self._wait_for_last_upload()
        bs = self.block_size
        # len(s) and s.last_token only: a tensor-parallel worker gets a view of each sequence without its tokens
        lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=n) + ahead
        num_blocks = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=n)
        if n and int(num_blocks.max()) > self.width:
            raise ValueError(f"a block table has {int(num_blocks.max())} blocks; the buffers hold {self.width}")
        table = self.np_block_tables[:rows]
        table.fill(-1)
        # every table into its row at once: a boolean mask over [n, width] is filled in row-major order
        flat = np.fromiter(itertools.chain.from_iterable(s.block_table for s in seqs), dtype=np.int32,
                           count=int(num_blocks.sum()))
        table[:n][self._arange_width[None, :] < num_blocks[:, None]] = flat
        pos = lens - 1
        if ahead:
            if prev_rows is None or len(prev_rows) != n:
                raise ValueError("fill_decode: ahead > 0 needs each sequence's row in the round before")
            self.np_input_ids[:n] = prev_rows
        else:
            self.np_input_ids[:n] = np.fromiter((s.last_token for s in seqs), dtype=np.int64, count=n)
        self.np_positions[:n] = pos
        self.np_context_lens[:n] = lens
        self.np_slot_mapping[:n] = table[np.arange(n), pos // bs].astype(np.int64) * bs + pos % bs
        self.np_input_ids[n:rows] = 0
        self.np_positions[n:rows] = 0
        self.np_context_lens[n:rows] = 0
        self.np_slot_mapping[n:rows] = -1

    def fill_decode_steps(self, seqs: list[Sequence], rows: int, num_steps: int) -> None:
        """After :meth:`fill_decode`, stage steps ``1 .. num_steps - 1`` of a multi-step round: step ``j`` of a
        sequence of length L (before the round) sits at position ``L - 1 + j`` with ``L + j`` tokens of context;
        padding rows get position 0, slot -1 and context 0.

        Raises:
            ValueError: ``num_steps`` above ``max_steps``, or a block table that does not cover the round (the
                scheduler reserves the blocks first: :meth:`Scheduler.extend_decode`).
        """
        if not 1 <= num_steps <= self.max_steps:
            raise ValueError(f"num_steps={num_steps}; the buffers stage 1 to {self.max_steps} steps")
        n, bs, r = len(seqs), self.block_size, self.max_rows
        self._step_rows = 0
        if num_steps == 1:
            return
        lens = self.np_context_lens[:n].astype(np.int64)  # written by fill_decode
        pos = lens[None, :] - 1 + np.arange(1, num_steps)[:, None]  # [k - 1, n]
        if n and int(pos.max()) // bs >= self.width:
            raise ValueError(f"the {num_steps} steps of the round reach past the block tables' width ({self.width})")
        blocks = self.np_block_tables[np.arange(n)[None, :], pos // bs].astype(np.int64)
        if (blocks < 0).any():
            raise ValueError(f"a block table does not cover the {num_steps} steps of the round")
        p64, p32 = self.host_step64.numpy(), self.host_step32.numpy()
        p64[:num_steps - 1, :n] = pos
        p64[:num_steps - 1, n:rows] = 0
        p32[:num_steps - 1, :n] = blocks * bs + pos % bs
        p32[:num_steps - 1, n:rows] = -1
        p32[:num_steps - 1, r:r + n] = pos + 1
        p32[:num_steps - 1, r + n:r + rows] = 0
        self._step_rows = num_steps - 1  # uploaded with the next upload()

    def reset(self) -> None:
        """Drop the staging of a round that did not run (after a failed step) and wait for the last upload."""
        self._wait_for_last_upload()
        self._step_rows = 0

    def load_step(self, j: int, n: int) -> None:
        """Before step ``j >= 1`` of a round (on the device, in stream order): the staged positions, slot
        mapping and context lengths into the static views, and the ``n`` tokens sampled by step ``j - 1`` into
        ``input_ids``."""
        r = self.max_rows
        self.positions.copy_(self.dev_step64[j - 1])
        self.dev32[2 * r:4 * r].copy_(self.dev_step32[j - 1])
        self.input_ids[:n].copy_(self.step_tokens[j - 1, :n])

    def feed_from_round(self, last_step: int, n: int) -> None:
        """After :meth:`fill_decode` with ``prev_rows`` and the upload (on the device, in stream order): replace
        the row numbers in ``input_ids[:n]`` by the tokens that step ``last_step`` of the round before sampled in
        those rows (``step_tokens[last_step]``)."""
        ids = self.input_ids[:n]
        ids.copy_(self.step_tokens[last_step].index_select(0, ids))

    def fill_sampling(self, seqs: list[Sequence], ahead: int = 0) -> dict:
        """Write each row's sampling settings; return the host-side flags of the batch. ``ahead``: as in
        :meth:`fill_decode` (the seeded rows' next positions are ``len(s) + ahead``).

        Returns:
            ``{"all_greedy": bool, "use_top_k": bool, "use_top_p": bool, "seeded": SeededRows | None}``; ``seeded``
            lists the rows with ``SamplingParams.seed`` and temperature > 0, each with its sequence's length (the
            position of the token sampled next).
        """
        n = len(seqs)
        if n > self.max_rows:
            raise ValueError(f"{n} rows to sample; at most {self.max_rows}")
        self._wait_for_last_upload()
        params = [s.sampling_params for s in seqs]
        temps = self.np_temperatures[:n]
        top_ks = self.np_top_ks[:n]
        top_ps = self.np_top_ps[:n]
        temps[:] = np.fromiter((p.temperature for p in params), dtype=np.float32, count=n)
        top_ks[:] = np.fromiter((min(p.top_k, _TOP_K_MAX) for p in params), dtype=np.int64, count=n)
        top_ps[:] = np.fromiter((p.top_p for p in params), dtype=np.float32, count=n)
        seeded = [(i, s) for i, s in enumerate(seqs) if s.sampling_params.seed is not None and temps[i] > 0]
        return {"all_greedy": not temps.any(), "use_top_k": bool((top_ks > 0).any()),
                "use_top_p": bool((top_ps < 1).any()),
                "seeded": SeededRows([i for i, _ in seeded], [s.sampling_params.seed for _, s in seeded],
                                     [len(s) + ahead for _, s in seeded]) if seeded else None}

    def upload(self, block_table_rows: int) -> None:
        """Copy the host side to the device: all of ``i64`` and the ``i32`` prefix that ends after
        ``block_table_rows`` block-table rows, and the multi-step staging rows that :meth:`fill_decode_steps`
        filled since the last upload (asynchronous on the GPU; nothing to do on the CPU)."""
        if not self.on_gpu:
            self._step_rows = 0  # host and device are the same tensors
            return
        end32 = 4 * self.max_rows + block_table_rows * self.width
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32[:end32].copy_(self.host32[:end32], non_blocking=True)
        if self._step_rows:
            k = self._step_rows
            self.dev_step64[:k].copy_(self.host_step64[:k], non_blocking=True)
            self.dev_step32[:k].copy_(self.host_step32[:k], non_blocking=True)
            self._step_rows = 0
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()

    def sampler_args(self, n: int) -> dict:
        """The sampler's per-row tensors for ``n`` rows (device views; call after :meth:`upload`)."""
        return {"temperatures": self.temperatures[:n], "top_ks": self.top_ks[:n], "top_ps": self.top_ps[:n]}
