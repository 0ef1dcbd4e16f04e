"""StepInputBuffers: the decode inputs and sampler settings written into persistent buffers (CPU: host == device)."""
from __future__ import annotations

import pytest
import torch

from nanovllm.engine.input_buffers import StepInputBuffers
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


def make_seq(num_tokens: int, block_table: list[int], **params: float) -> Sequence:
    seq = Sequence(list(range(100, 100 + num_tokens)), SamplingParams(**params), block_size=4)
    seq.block_table = list(block_table)
    return seq


def test_fill_decode_rows_and_padding() -> None:
    buf = StepInputBuffers(max_rows=8, width=5, block_size=4, device=torch.device("cpu"))
    seqs = [make_seq(5, [7, 2]), make_seq(12, [3, 9, 4]), make_seq(1, [6])]
    buf.fill_decode(seqs, rows=4)
    buf.upload(4)
    assert buf.input_ids[:4].tolist() == [104, 111, 100, 0]
    assert buf.positions[:4].tolist() == [4, 11, 0, 0]
    assert buf.context_lens[:4].tolist() == [5, 12, 1, 0]
    # slot of the newest token = block_table[pos // 4] * 4 + pos % 4; the padding row stores nothing
    assert buf.slot_mapping[:4].tolist() == [2 * 4 + 0, 4 * 4 + 3, 6 * 4 + 0, -1]
    assert buf.block_tables[:4].tolist() == [[7, 2, -1, -1, -1], [3, 9, 4, -1, -1], [6, -1, -1, -1, -1],
                                             [-1, -1, -1, -1, -1]]
    # a second, smaller step overwrites every row it uses (no stale block ids or lengths)
    buf.fill_decode([make_seq(9, [1, 5, 8])], rows=2)
    assert buf.block_tables[:2].tolist() == [[1, 5, 8, -1, -1], [-1, -1, -1, -1, -1]]
    assert buf.context_lens[:2].tolist() == [9, 0]
    assert buf.slot_mapping[:2].tolist() == [8 * 4 + 0, -1]


def test_fill_sampling_values_and_flags() -> None:
    buf = StepInputBuffers(max_rows=4, width=2, block_size=4, device=torch.device("cpu"))
    flags = buf.fill_sampling([make_seq(2, [0], temperature=0.0), make_seq(2, [1], temperature=0.7, top_k=5)])
    assert flags == {"all_greedy": False, "use_top_k": True, "use_top_p": False, "seeded": None}
    args = buf.sampler_args(2)
    assert args["temperatures"].dtype == torch.float32 and args["top_ps"].dtype == torch.float32
    assert args["temperatures"].tolist() == pytest.approx([0.0, 0.7])
    assert args["top_ks"].tolist() == [-1, 5]
    assert args["top_ps"].tolist() == [1.0, 1.0]
    flags = buf.fill_sampling([make_seq(2, [0], temperature=0.0, top_p=0.5)])
    assert flags == {"all_greedy": True, "use_top_k": False, "use_top_p": True, "seeded": None}


def test_fill_sampling_lists_seeded_rows_that_sample() -> None:
    """Rows with a seed and temperature > 0, each with the position of its next token (the sequence's length)."""
    buf = StepInputBuffers(max_rows=4, width=2, block_size=4, device=torch.device("cpu"))
    seqs = [make_seq(3, [0], temperature=0.7, seed=5), make_seq(2, [1], temperature=0.0, seed=6),
            make_seq(6, [2], temperature=0.7), make_seq(7, [3], temperature=1.0, seed=-1)]
    seeded = buf.fill_sampling(seqs)["seeded"]
    assert (seeded.rows, seeded.seeds, seeded.positions) == ([0, 3], [5, -1], [3, 7])


def test_bad_sizes_raise() -> None:
    buf = StepInputBuffers(max_rows=2, width=2, block_size=4, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="at most 2 rows"):
        buf.fill_decode([make_seq(1, [0])] * 3, rows=3)
    with pytest.raises(ValueError, match="padded to 1"):
        buf.fill_decode([make_seq(1, [0])] * 2, rows=1)
    with pytest.raises(ValueError, match="3 blocks"):
        buf.fill_decode([make_seq(9, [0, 1, 2])], rows=1)
    with pytest.raises(ValueError, match="at most 2"):
        buf.fill_sampling([make_seq(1, [0])] * 3)
