"""Paged KV-cache blocks with reference counts and prefix caching.

The KV cache is split into fixed-size blocks (the paging idea of vLLM, Kwon et al. 2023, arXiv 2309.06180).
A sequence owns a *block table*: the list of its blocks. A full block is identified by a chained hash,
``hash(previous block's hash, this block's token ids)`` (xxHash64), so equal hashes mean equal prefixes; a hit
still compares the token ids, so a hash collision can never hand out wrong KV.

Invariants (checked by ``check_invariants`` and the property tests):
- reference counts are >= 0; a block is free exactly when its count is 0; free + used = total;
- every entry of the hash table points at a block that holds exactly the hashed tokens;
- a block with a hash is full and is never written again while it keeps that hash.
Free blocks keep their hash (their KV stays valid) and are reused oldest-freed first, so a prefix freed
recently can still be hit.
"""
from __future__ import annotations

from array import array
from collections import OrderedDict

import xxhash

from nanovllm.engine.sequence import Sequence


def block_hash(token_ids: list[int], prev_hash: int = -1) -> int:
    """xxHash64 of a full block's token ids chained with the previous block's hash (-1: first block)."""
    h = xxhash.xxh64()
    if prev_hash != -1:
        h.update(prev_hash.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()


class Block:
    """One KV block: its reference count and, once full and computed, its hash and token ids."""

    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: list[int] = []

    def reset(self) -> None:
        self.ref_count = 1
        self.hash = -1
        self.token_ids = []


class BlockManager:
    """Hands out KV blocks to sequences, shares full blocks between equal prefixes.

    Args:
        num_blocks: the number of blocks in the KV pool (> 0).
        block_size: tokens per block.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Insertion order = the order blocks were freed: the first entry is the least recently freed.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.num_cache_hit_tokens = 0  # prompt tokens served from the prefix cache, over the manager's life

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def usage(self) -> float:
        """Fraction of blocks held by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    # ---- allocation -------------------------------------------------------------------------------------
    def _take(self, block_id: int) -> Block:
        """Move a free block to the used set."""
        block = self.blocks[block_id]
        assert block.ref_count == 0, "taking a block that is in use"
        del self.free_block_ids[block_id]
        return block

    def _take_fresh(self) -> Block:
        """Take the least recently freed block and forget what it held."""
        block_id = next(iter(self.free_block_ids))
        block = self._take(block_id)
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.reset()
        return block

    def can_allocate(self, seq: Sequence) -> bool:
        """True when enough blocks are free for the whole sequence, even without a single cache hit."""
        return self.num_free_blocks >= seq.num_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` a block table for all its tokens, reusing cached full blocks of its prefix.

        Sets ``seq.num_cached_tokens`` to the number of leading tokens whose KV is already cached.
        """
        assert not seq.block_table, "sequence already has blocks"
        prev_hash = -1
        hitting = True
        seq.num_cached_tokens = 0
        for i in range(seq.num_blocks):
            tokens = seq.block(i)
            block_id = -1
            if hitting and len(tokens) == self.block_size:
                prev_hash = block_hash(tokens, prev_hash)
                block_id = self.hash_to_block_id.get(prev_hash, -1)
                if block_id != -1 and self.blocks[block_id].token_ids != tokens:
                    block_id = -1  # a hash collision: never trust the hash alone
            if block_id == -1:
                hitting = False
                block = self._take_fresh()
            else:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    self._take(block_id)
                block.ref_count += 1
                seq.num_cached_tokens += self.block_size
            seq.block_table.append(block.block_id)
        self.num_cache_hit_tokens += seq.num_cached_tokens
        seq.num_hashed_blocks = seq.num_cached_tokens // self.block_size
        if seq.num_prefix_hit_tokens is None:
            seq.num_prefix_hit_tokens = seq.num_cached_tokens

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """Register the hashes of the full blocks among the first ``num_tokens`` tokens of ``seq``.

        The scheduler calls this for the tokens whose KV the current step writes. A sequence admitted later in
        the same step may then hit these blocks: inside every attention layer the whole batch's K/V is stored
        before any sequence attends, so the hit reads KV written in that same layer. A block beyond the step's
        chunk is never registered, so no one can hit a block whose KV is not yet computed.
        """
        num_full = min(num_tokens // self.block_size, len(seq.block_table))
        # Blocks before seq.num_hashed_blocks already carry their hash (a block keeps it while a sequence holds
        # it), so a decode step looks at one block at most instead of the whole table.
        start = seq.num_hashed_blocks
        if num_full <= start:
            return  # nothing new is full (most decode steps)
        prev_hash = self.blocks[seq.block_table[start - 1]].hash if start > 0 else -1
        for i in range(start, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash == -1:
                tokens = seq.block(i)
                block.hash = block_hash(tokens, prev_hash)
                block.token_ids = tokens
                self.hash_to_block_id[block.hash] = block.block_id
            prev_hash = block.hash
        seq.num_hashed_blocks = max(start, num_full)

    def reset(self) -> None:
        """Return to the state of a new pool: every block free (in id order), no reference, no hash. For
        recovery after a failed step (:meth:`Scheduler.abort_all`); every block table must be dropped with it."""
        for block in self.blocks:
            block.ref_count = 0
            block.hash = -1
            block.token_ids = []
        self.hash_to_block_id.clear()
        self.free_block_ids = OrderedDict((i, None) for i in range(self.num_blocks))

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (last block first, so prefix blocks stay cached longest)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, "negative reference count"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.num_hashed_blocks = 0

    # ---- decode --------------------------------------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        """True when ``seq`` can get the block its newest token needs (if it needs one)."""
        return len(seq.block_table) >= seq.num_blocks or self.num_free_blocks >= 1

    def append(self, seq: Sequence) -> None:
        """Give ``seq`` a new block if its newest token starts one."""
        if len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_fresh().block_id)

    def blocks_missing(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks ``seq`` needs to hold the KV of ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` fresh blocks until its table covers ``num_tokens`` tokens (multi-step decode writes the
        KV of tokens the host has not seen yet).

        Raises:
            RuntimeError: fewer free blocks than needed (the caller checks :meth:`blocks_missing` first).
        """
        missing = self.blocks_missing(seq, num_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"reserve: {missing} blocks needed, {self.num_free_blocks} free")
        for _ in range(missing):
            seq.block_table.append(self._take_fresh().block_id)

    # ---- checks ----------------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if a pool invariant is broken (see the module docstring)."""
        used = [b for b in self.blocks if b.ref_count > 0]
        assert all(b.ref_count >= 0 for b in self.blocks)
        assert len(used) + self.num_free_blocks == self.num_blocks
        assert all(self.blocks[i].ref_count == 0 for i in self.free_block_ids)
        for h, block_id in self.hash_to_block_id.items():
            block = self.blocks[block_id]
            assert block.hash == h and len(block.token_ids) == self.block_size
