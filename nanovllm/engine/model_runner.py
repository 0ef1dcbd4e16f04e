"""Runs the model for one step: builds the batch tensors, owns the KV cache, runs the model, samples.

Compiling and tuning live in engine/compilation.py, the decode CUDA graphs in engine/cuda_graphs.py, the prefill
CUDA graphs (bucketed token counts, padded static inputs) in engine/prefill_graphs.py.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

import torch

from nanovllm.config import Config
from nanovllm.engine.compilation import (build_forwards, pretune_fusion, pretune_small_m,  # noqa: F401
                                         separate_prefill_compile)
from nanovllm.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from nanovllm.engine.input_buffers import StepInputBuffers
from nanovllm.engine.prefill_graphs import PREFILL_GRAPH_MAX_SEQS, PrefillGraphs, pad_prefill, prefill_buckets
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_runner import PendingRound
from nanovllm.kernels.prefill_attention import warm_up_prefill_attention
from nanovllm.layers.sampler import Sampler
from nanovllm.models.registry import model_class
from nanovllm.utils.context import reset_context, set_context
from nanovllm.utils.loader import load_model
from nanovllm.utils.parallel import tp_rank, tp_size

CPU_KV_CACHE_BYTES = 256 << 20  # the KV budget when sizing from memory on the CPU


class ModelRunner:
    """Holds the model, its KV cache and its compiled / graph-captured forward on one device (one TP rank);
    implements :class:`~nanovllm.engine.step_runner.StepRunner`.

    Args:
        config: the engine configuration (``config.num_kvcache_blocks`` is filled in when sized from memory).
        on_loaded: called once the weights are loaded, before the first collective (KV sizing, graph capture);
            the tensor-parallel start handshake (engine/tp_runner.py) uses it so a failed load never leaves
            another rank blocked in a collective.
    """

    def __init__(self, config: Config, on_loaded: Callable[[], None] | None = None) -> None:
        self.config = config
        hf = config.hf_config
        self.rank, self.world = tp_rank(), tp_size()
        self.block_size = config.kvcache_block_size
        self.dtype = config.torch_dtype
        if config.device == "cuda":
            torch.cuda.set_device(self.rank)
            self.device = torch.device("cuda", self.rank)
        else:
            self.device = torch.device("cpu")
        self.max_blocks_per_seq = math.ceil(config.max_model_len / self.block_size)
        self.init_seconds: dict[str, float] = {}  # seconds of each phase of the build (the CLI's start line)
        self.prepare_seconds = 0.0  # host time spent building step inputs before their first launch (StepStats)
        t0 = time.perf_counter()

        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(hf)(hf)
        finally:
            torch.set_default_dtype(default_dtype)
        load_model(self.model, config.model)
        self.model.eval()
        if on_loaded is not None:
            on_loaded()
        self.sampler = Sampler()
        self.generator: torch.Generator | None = None
        if config.seed is not None:
            self.generator = torch.Generator(self.device)
            self.generator.manual_seed(config.seed)

        self.init_seconds["load"] = time.perf_counter() - t0
        self.forward, self.prefill_forward = build_forwards(self.model, config, self.device)
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            sizes = graph_batch_sizes(config.max_num_seqs)
            if config.compile_fusion:
                pretune_fusion(config, self.dtype, self.device, self.world, self.rank, sizes)
            pretune_small_m(config, self.dtype, self.device, self.world, sizes)
            self.init_seconds["pretune"] = time.perf_counter() - t0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        t0 = time.perf_counter()
        self.allocate_kv_cache()  # on the GPU this runs (and compiles) the largest prefill first
        self.init_seconds["kv_cache"] = time.perf_counter() - t0
        if self.device.type == "cuda" and self.kv_caches:  # every prefill attention configuration, compiled now
            t0 = time.perf_counter()
            warm_up_prefill_attention(*self.kv_caches[0], hf.num_attention_heads // self.world, self.dtype)
            self.init_seconds["attention_warm_up"] = time.perf_counter() - t0
        # Inference tensors, like the prefill inputs that run() creates under inference mode: the compiled forward
        # guards on its inputs' dispatch keys, so mixing the two kinds doubled its graphs (and the guard checks
        # of every prefill call). All writes to the buffers happen inside run(), run_decode_steps() and the graph
        # capture, which run under inference mode (prepare_decode / prepare_sample called on their own, outside it,
        # would raise on the GPU).
        with torch.inference_mode():
            self.buffers = StepInputBuffers(config.max_num_seqs, self.max_blocks_per_seq, self.block_size,
                                            self.device,
                                            max_steps=config.num_scheduler_steps if self.supports_multi_step else 1)
        # pinned host copies of a round's tokens, two so that a round can be launched before the last one is read
        steps = self.buffers.max_steps
        self._round_tokens = [torch.empty(steps * config.max_num_seqs, dtype=torch.int64,
                                          pin_memory=self.device.type == "cuda") for _ in range(2)]
        self._round_slot = 0
        self.graphs = DecodeGraphs(config.max_num_seqs)
        if self.device.type == "cuda" and not config.enforce_eager:
            t0 = time.perf_counter()
            self.graphs.capture(self.forward, self.buffers, self.kv_caches, self.device)
            self.init_seconds["cudagraphs"] = time.perf_counter() - t0
        self.prefill_graphs: PrefillGraphs | None = None
        self._prefill_bucket: int | None = None  # the bucket of the prefill step being run (None: unpadded)
        buckets = prefill_buckets(config.prefill_cuda_graph_max_tokens, config.max_num_batched_tokens)
        if buckets and not config.enforce_eager and self.world == 1:
            with torch.inference_mode():  # inference tensors, like the decode buffers (see above)
                self.prefill_graphs = PrefillGraphs(buckets, min(config.max_num_seqs, PREFILL_GRAPH_MAX_SEQS),
                                                    self.max_blocks_per_seq, config.max_model_len, self.device)
            if self.device.type == "cuda":
                t0 = time.perf_counter()
                self.prefill_graphs.capture(self.prefill_forward, self.kv_caches, self.graphs.pool)
                self.init_seconds["prefill_cudagraphs"] = time.perf_counter() - t0

    @property
    def supports_multi_step(self) -> bool:
        """Whether :meth:`run_decode_steps` may run (one process: tensor-parallel workers step one at a time)."""
        return self.world == 1

    # ---- KV cache -------------------------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        hf = self.config.hf_config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        num_kv_heads = hf.num_key_value_heads // self.world
        return 2 * hf.num_hidden_layers * self.block_size * num_kv_heads * head_dim * self.dtype.itemsize

    def _profile_peak_bytes(self) -> int:
        """Run the largest prefill the scheduler can ask for, without a KV cache, and return the peak bytes."""
        cfg = self.config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        seq_len = min(cfg.max_model_len, cfg.max_num_batched_tokens)
        num_seqs = max(1, min(cfg.max_num_batched_tokens // seq_len, cfg.max_num_seqs))
        lens = [seq_len] * num_seqs
        rest = cfg.max_num_batched_tokens - num_seqs * seq_len
        if rest > 0 and num_seqs < cfg.max_num_seqs:
            lens.append(rest)  # the scheduler fills the whole token budget
        set_context(True, max_seqlen_q=seq_len, max_seqlen_k=seq_len)
        with torch.inference_mode():
            # inference tensors, like every step's inputs: the graph compiled here is the one prefills reuse
            input_ids = torch.zeros(sum(lens), dtype=torch.int64, device=self.device)
            positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
            logits_indices = torch.tensor(lens, device=self.device).cumsum(0) - 1
            # the compiled forward: its prefill graph is compiled here, before serving, and its memory is counted
            logits = self.prefill_forward(input_ids, positions, logits_indices)
            # the sampler on a full decode batch, with the top-k/top-p path (sorting the vocabulary)
            big = logits.new_empty(cfg.max_num_seqs, logits.shape[-1]).normal_()
            n = cfg.max_num_seqs
            self.sampler(big, torch.ones(n, device=self.device), torch.full((n,), 5, device=self.device),
                         torch.full((n,), 0.9, device=self.device), all_greedy=False, use_top_k=True, use_top_p=True)
            del logits, big
        reset_context()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def _agree(self, num_blocks: int) -> int:
        """The smallest block count over the tensor-parallel ranks (the count itself without TP)."""
        if self.world > 1 and torch.distributed.is_initialized():
            n = torch.tensor([num_blocks], device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
            return int(n.item())
        return num_blocks

    def allocate_kv_cache(self) -> None:
        """Allocate ``[2, layers, blocks, block_size, kv_heads, head_dim]`` (zero-filled) and hand each layer its K
        and V.

        On the GPU with ``num_kvcache_blocks=-1``: after a profiling pass at the largest step, the blocks fill
        ``gpu_memory_utilization * total - (memory used outside PyTorch's allocator + PyTorch's peak)``.

        On the CPU (sized from memory) the pool holds min(max_num_seqs x max_model_len tokens, 256 MiB), and never
        less than one sequence of max_model_len.

        Raises:
            ValueError: on the GPU, the memory left cannot hold one sequence of max_model_len tokens.
        """
        cfg, hf = self.config, self.config.hf_config
        block_bytes = self._block_bytes()
        if cfg.num_kvcache_blocks > 0:
            num_blocks = cfg.num_kvcache_blocks
        elif self.device.type == "cuda":
            peak = self._profile_peak_bytes()
            free, total = torch.cuda.mem_get_info()
            outside_torch = (total - free) - torch.cuda.memory_reserved()
            budget = int(total * cfg.gpu_memory_utilization) - outside_torch - peak
            # headroom for the CUDA graphs' pool and the decode step's activations
            budget -= 512 << 20
            num_blocks = self._agree(budget // block_bytes)  # every rank reaches the check below together
            if num_blocks < self.max_blocks_per_seq:
                raise ValueError(f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves room for "
                                 f"{max(num_blocks, 0)} KV blocks, fewer than one sequence of max_model_len="
                                 f"{cfg.max_model_len} needs ({self.max_blocks_per_seq}); raise "
                                 f"gpu_memory_utilization or lower max_model_len (model + activations peak at "
                                 f"{peak / 2**30:.2f} GiB)")
        else:
            tokens = min(cfg.max_num_seqs * cfg.max_model_len, CPU_KV_CACHE_BYTES // (block_bytes // self.block_size))
            # at least one sequence of max_model_len always fits
            num_blocks = self._agree(max(self.max_blocks_per_seq, -(-tokens // self.block_size)))
        cfg.num_kvcache_blocks = num_blocks
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        # Zeros, not empty: attention may read a slot that was never written (the rest of a sequence's last
        # block, or block 0 behind a -1 padding entry) with softmax weight 0, and 0 * NaN garbage is NaN.
        # Every value ever written is a finite K/V, so unwritten and stale slots then only meet weight 0.
        self.kv_cache = torch.zeros(2, hf.num_hidden_layers, num_blocks, self.block_size,
                                    hf.num_key_value_heads // self.world, head_dim, dtype=self.dtype, device=self.device)
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(hf.num_hidden_layers)]

    # ---- batch preparation ---------------------------------------------------------------------------------------
    def _to_device(self, data: list | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _block_tables(self, seqs: list[Sequence], width: int) -> torch.Tensor:
        """int32 ``[B, width]`` block tables padded with -1 (built in numpy: this runs every decode step)."""
        table = np.full((len(seqs), width), -1, dtype=np.int32)
        for i, s in enumerate(seqs):
            table[i, :len(s.block_table)] = s.block_table
        t = torch.from_numpy(table)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pack the scheduled chunk of every sequence; set the prefill context.

        Tokens whose KV is already in a cached block (a whole-prompt prefix hit, recomputed only to get the
        logits) get slot -1: a shared block is never written. A step that fits a prefill graph's bucket is padded
        into the graph's static buffers (engine/prefill_graphs.py) and the returned tensors are their views.

        Returns:
            input_ids int64 ``[T]``, positions int64 ``[T]``, logits_indices int64 ``[B]``.
        """
        ids_parts, pos_parts, slot_parts, cu_q, cu_k, lens = [], [], [], [0], [0], []
        bs = self.block_size
        for seq in seqs:  # numpy per sequence: a Python loop over the tokens cost ~0.1 ms per 512 tokens
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            pos = np.arange(start, end, dtype=np.int64)
            slot = np.asarray(seq.block_table, dtype=np.int64)[pos // bs] * bs + pos % bs
            slot[pos < seq.num_cached_tokens] = -1
            ids_parts.append(np.asarray(seq.token_ids[start:end], dtype=np.int64))
            pos_parts.append(pos)
            slot_parts.append(slot)
            cu_q.append(cu_q[-1] + end - start)
            cu_k.append(cu_k[-1] + end)
            lens.append(end)
        input_ids, positions = np.concatenate(ids_parts), np.concatenate(pos_parts)
        slots = np.concatenate(slot_parts).astype(np.int32)
        q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
        pg = self.prefill_graphs
        self._prefill_bucket = pg.bucket_for(len(input_ids), len(seqs)) if pg is not None else None
        if self._prefill_bucket is not None:
            padded = pad_prefill(input_ids, positions, slots, q_lens, lens, [s.block_table for s in seqs],
                                 self._prefill_bucket, pg.max_seqs, pg.width)
            return pg.set_step(padded, self.kv_caches)
        max_q = max(q_lens)
        width = max(len(s.block_table) for s in seqs)
        set_context(True, self._to_device(cu_q, torch.int32), self._to_device(cu_k, torch.int32), max_q, max(lens),
                    self._to_device(slots, torch.int32), self._to_device(lens, torch.int32),
                    self._block_tables(seqs, width), self.kv_caches)
        logits_indices = [c - 1 for c in cu_q[1:]]
        return (self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64),
                self._to_device(logits_indices, torch.int64))

    def prepare_decode(self, seqs: list[Sequence], num_steps: int = 1, ahead: int = 0,
                       prev_rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new token per sequence (its last); set the decode context. Returns like :meth:`prepare_prefill`.

        The inputs go through the persistent :class:`StepInputBuffers` (numpy on the host, one asynchronous copy
        per dtype, which also carries the sampling rows :meth:`prepare_sample` wrote before it), padded up to the
        CUDA graph's batch size when a graph will run the step. With ``num_steps``
        > 1 the later steps of a multi-step round are staged and uploaded too (:meth:`run_decode_steps`); the
        context then serves every step of the round (its tensors are the static views that each step refills).
        ``ahead`` and ``prev_rows``: see :meth:`StepInputBuffers.fill_decode` (a round launched after one whose
        tokens the host has not read).
        """
        n = len(seqs)
        rows = self.graphs.padded_rows(n)
        buf = self.buffers
        buf.fill_decode(seqs, rows, ahead, prev_rows)
        if num_steps > 1:
            buf.fill_decode_steps(seqs, rows, num_steps)
        buf.upload(rows)
        set_context(False, slot_mapping=buf.slot_mapping[:rows], context_lens=buf.context_lens[:rows],
                    block_tables=buf.block_tables[:rows], kv_caches=self.kv_caches)
        return buf.input_ids[:rows], buf.positions[:rows], buf.row_index[:rows]

    def prepare_sample(self, seqs: list[Sequence], upload: bool, ahead: int = 0) -> dict:
        """Write the batch's sampling settings into the step buffers and return the sampler's keyword arguments:
        per-row ``temperatures`` (float32), ``top_ks`` (int64), ``top_ps`` (float32), each ``[B]`` on the device,
        and the host-side flags ``all_greedy``, ``use_top_k``, ``use_top_p`` (so the sampler never waits for the
        GPU to learn them).

        Args:
            upload: copy the rows to the device now (a prefill step); False when the step's inputs are uploaded
                after this call (:meth:`prepare_decode` copies them with its own upload).
            ahead: tokens each sequence gains from a round the host has not read (seeded rows sample position
                ``len(s) + ahead``).
        """
        flags = self.buffers.fill_sampling(seqs, ahead)
        if upload:
            self.buffers.upload(0)
        return {**self.buffers.sampler_args(len(seqs)), **flags}

    def reset_step_state(self) -> None:
        """Forget what a step that raised left behind (:meth:`LLMEngine.abort_all`): the attention context, the
        batch's sampling flags and the multi-step staging rows; on the GPU, wait for the device work already
        queued, so that the failed step's KV writes land before its blocks are handed out again."""
        reset_context()
        self._sampling_flags = {}
        self._prefill_bucket = None
        self.buffers.reset()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- running -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor,
                  is_prefill: bool) -> torch.Tensor:
        """Logits ``[B, vocab]`` of the step whose context is set: a prefill step runs ``prefill_forward``; a decode
        step replays the CUDA graph of its padded size when there is one (its inputs are already in the graph's
        static buffers), else runs ``forward``; a prefill step padded to a bucket by :meth:`prepare_prefill`
        replays that bucket's graph."""
        rows = input_ids.shape[0]
        if is_prefill:
            if self._prefill_bucket is not None:
                return self.prefill_graphs.run(self._prefill_bucket, self.prefill_forward, input_ids, positions,
                                               logits_indices)
            return self.prefill_forward(input_ids, positions, logits_indices)
        if rows not in self.graphs:
            return self.forward(input_ids, positions, logits_indices)
        return self.graphs.replay(rows)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int | None]:
        """Run one step and sample.

        Returns:
            One token id per sequence, or None for a prefill chunk that does not end its prompt.
        """
        sample_args: dict = {}
        t0 = time.perf_counter()
        if is_prefill:
            input_ids, positions, logits_indices = self.prepare_prefill(seqs)
        else:
            if self.rank == 0:  # only rank 0 samples (a worker's sequence views carry no sampling parameters)
                sample_args = self.prepare_sample(seqs, upload=False)
            input_ids, positions, logits_indices = self.prepare_decode(seqs)
        self.prepare_seconds += time.perf_counter() - t0
        logits = self.run_model(input_ids, positions, logits_indices, is_prefill)[:len(seqs)]
        reset_context()
        if self.rank != 0:
            return []
        if is_prefill:  # staged while the GPU runs the prefill
            sample_args = self.prepare_sample(seqs, upload=True)
        token_ids = self.sampler(logits, generator=self.generator, **sample_args).tolist()
        if not is_prefill:
            return token_ids
        return [t if s.num_computed_tokens + s.num_scheduled_tokens == len(s) else None
                for s, t in zip(seqs, token_ids)]

    @torch.inference_mode()
    def run_decode_steps(self, seqs: list[Sequence], num_steps: int) -> list[list[int]]:
        """Run a multi-step decode round and read its tokens: :meth:`collect_decode_steps` of
        :meth:`launch_decode_steps`.

        Returns:
            For each sequence, the ``num_steps`` tokens sampled for it, in order (the scheduler drops those after
            a stop).

        Raises:
            RuntimeError: on a tensor-parallel rank (workers only follow single steps).
        """
        return self.collect_decode_steps(self.launch_decode_steps(seqs, num_steps))

    @torch.inference_mode()
    def launch_decode_steps(self, seqs: list[Sequence], num_steps: int, after: PendingRound | None = None
                            ) -> PendingRound:
        """Launch a multi-step decode round: ``num_steps`` decode steps back to back on the device, each step's
        sampled tokens feeding the next step's input ids, then an asynchronous copy of all the tokens to the host.
        Nothing waits for the device; :meth:`collect_decode_steps` reads the tokens.

        The scheduler reserved the KV blocks of the whole round (:meth:`Scheduler.extend_decode`). The host
        prepares all the steps' inputs in one go (positions, slot mapping, context lengths per step), so while the
        GPU runs the round the host only launches graph replays and the sampler. Each step is exactly the
        single-step computation (same graph, same sampler), so greedy tokens equal those of one step at a time.

        Args:
            after: the round launched before this one, whose tokens the host has not read (async scheduling,
                :meth:`Scheduler.plan_next_round`): every one of ``seqs`` ran in it, and this round starts
                ``after.num_steps`` tokens further, from the tokens its last step sampled (gathered on the device).

        Raises:
            RuntimeError: on a tensor-parallel rank (workers only follow single steps).
        """
        if not self.supports_multi_step:
            raise RuntimeError("multi-step decode runs only without tensor parallelism")
        n = len(seqs)
        buf = self.buffers
        t0 = time.perf_counter()
        ahead = after.num_steps if after is not None else 0
        prev_rows = None
        if after is not None:
            row_of = {id(s): i for i, s in enumerate(after.seqs)}
            prev_rows = [row_of[id(s)] for s in seqs]
        sample_args = self.prepare_sample(seqs, upload=False, ahead=ahead)
        input_ids, positions, logits_indices = self.prepare_decode(seqs, num_steps, ahead, prev_rows)
        if after is not None:
            buf.feed_from_round(after.num_steps - 1, n)
        self.prepare_seconds += time.perf_counter() - t0
        for j in range(num_steps):
            if j:
                buf.load_step(j, n)
            logits = self.run_model(input_ids, positions, logits_indices, False)[:n]
            buf.step_tokens[j, :n].copy_(self.sampler(logits, generator=self.generator, **sample_args))
        reset_context()
        tokens = buf.step_tokens[:num_steps, :n]
        if self.device.type != "cuda":
            return PendingRound(seqs, num_steps, tokens.clone(), None)
        host = self._round_tokens[self._round_slot][:num_steps * n].view(num_steps, n)
        self._round_slot ^= 1  # two rounds at most are in flight: the one read next and the one after it
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingRound(seqs, num_steps, host, done)

    def collect_decode_steps(self, pending: PendingRound) -> list[list[int]]:
        """Wait for a round of :meth:`launch_decode_steps` (its tokens only, not what was launched after it) and
        return, for each sequence, its ``num_steps`` tokens in order."""
        if pending.done is not None:
            pending.done.synchronize()
        per_step = pending.tokens.tolist()
        return [list(t) for t in zip(*per_step)]
