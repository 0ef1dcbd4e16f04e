"""Issue 2, acceptance 4: a property-based test of the block manager (hypothesis state machine).

A model of the KV pool's *contents* (which token each slot holds) is kept beside the manager: the test writes a
slot exactly where the engine's model runner would (every scheduled token whose position is not served from
the cache), and checks that no hashed block is ever written and that each hash entry names a block holding
exactly its tokens.
"""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nanovllm.engine.block_manager import BlockManager, block_hash
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BLOCK = 4
NUM_BLOCKS = 12
PARAMS = SamplingParams()


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK)
        self.live: list[Sequence] = []
        self.content: list[list[int | None]] = [[None] * BLOCK for _ in range(NUM_BLOCKS)]

    def _write(self, seq: Sequence, start: int, end: int) -> None:
        for pos in range(start, end):
            if pos < seq.num_cached_tokens:
                continue  # served from the cache: the runner gives it slot -1
            block = self.bm.blocks[seq.block_table[pos // BLOCK]]
            assert block.hash == -1, "a hashed (shared) block is being written"
            self.content[block.block_id][pos % BLOCK] = seq.token_ids[pos]

    # a tiny alphabet makes shared prefixes (cache hits) frequent
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=4 * BLOCK + 3))
    def add(self, tokens: list[int]) -> None:
        seq = Sequence(tokens, PARAMS, BLOCK)
        if not self.bm.can_allocate(seq):
            return
        free_before = self.bm.num_free_blocks
        self.bm.allocate(seq)
        assert seq.num_cached_tokens % BLOCK == 0 and seq.num_cached_tokens <= len(seq)
        assert self.bm.num_free_blocks >= free_before - seq.num_blocks
        start = min(seq.num_cached_tokens, len(seq) - 1)
        self._write(seq, start, len(seq))
        self.bm.commit(seq, len(seq))
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data: st.DataObject, token: int) -> None:
        seq = data.draw(st.sampled_from(self.live))
        seq.append_token(token)
        if not self.bm.can_append(seq):
            seq.token_ids.pop()
            return
        self.bm.append(seq)
        assert len(seq.block_table) == seq.num_blocks
        self._write(seq, len(seq) - 1, len(seq))
        self.bm.commit(seq, len(seq))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)
        assert seq.block_table == []

    @invariant()
    def pool_is_consistent(self) -> None:
        bm = self.bm
        refs = [0] * NUM_BLOCKS
        for seq in self.live:
            for b in seq.block_table:
                refs[b] += 1
        assert [b.ref_count for b in bm.blocks] == refs  # counts match owners, never negative
        used = sum(1 for r in refs if r > 0)
        assert used + bm.num_free_blocks == NUM_BLOCKS
        assert abs(bm.usage() - used / NUM_BLOCKS) < 1e-12

    @invariant()
    def hashes_name_their_contents(self) -> None:
        for h, block_id in self.bm.hash_to_block_id.items():
            block = self.bm.blocks[block_id]
            assert block.hash == h
            assert self.content[block_id] == block.token_ids, "hash entry points at a block with other contents"

    @invariant()
    def live_hashes_chain_their_prefixes(self) -> None:
        for seq in self.live:
            prev = -1
            for i, b in enumerate(seq.block_table):
                block = self.bm.blocks[b]
                if block.hash == -1:
                    break
                assert block.token_ids == seq.block(i)
                prev = block_hash(seq.block(i), prev)
                assert block.hash == prev


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


def test_freed_blocks_are_reused_oldest_first_and_keep_their_hash() -> None:
    bm = BlockManager(4, BLOCK)
    a = Sequence([1, 1, 1, 1], PARAMS, BLOCK)
    bm.allocate(a)
    bm.commit(a, 4)
    bm.free(a)  # block 0 is free but keeps its hash
    b = Sequence([2, 2, 2, 2, 2], PARAMS, BLOCK)
    bm.allocate(b)  # takes blocks 1 and 2 (never freed, so older than block 0's release) ...
    assert b.block_table == [1, 2]
    c = Sequence([1, 1, 1, 1, 3], PARAMS, BLOCK)
    bm.allocate(c)  # ... and block 0 is still a hit
    assert c.block_table[0] == 0 and c.num_cached_tokens == 4
