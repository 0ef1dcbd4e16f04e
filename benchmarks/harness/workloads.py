"""The request workloads the benchmarks generate: nano-vLLM's offline throughput workload and seeded random
prompts."""
from __future__ import annotations

import random


def nano_vllm_workload(num_seqs: int = 256, seed: int = 0, max_input_len: int = 1024, max_output_len: int = 1024,
                       min_input_len: int = 100, min_output_len: int = 100) -> tuple[list[list[int]], list[int]]:
    """nano-vLLM's throughput benchmark workload (the transformers peer draws the same requests).

    ``random.seed(seed)``; first every prompt: ``[randint(0, 10000) for _ in range(randint(100, max_input_len))]``,
    then every output length: ``randint(100, max_output_len)``. With the defaults this gives 142,827 prompt
    tokens and 133,966 output tokens (the count nano-vLLM's README reports).

    ``min_input_len`` / ``min_output_len`` replace the two 100s (for small test workloads; the defaults give the
    reference workload exactly).

    Note: this reseeds Python's global ``random`` module (as the reference benchmark does).

    Returns:
        (prompt_token_ids, max_tokens): ``num_seqs`` lists of ints in [0, 10000], and ``num_seqs`` ints.

    Raises:
        ValueError: a minimum above its maximum.
    """
    if min_input_len > max_input_len or min_output_len > max_output_len:
        raise ValueError(f"workload lengths: need min_input_len {min_input_len} <= max_input_len {max_input_len} and "
                         f"min_output_len {min_output_len} <= max_output_len {max_output_len}")
    random.seed(seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(min_input_len, max_input_len))]
               for _ in range(num_seqs)]
    max_tokens = [random.randint(min_output_len, max_output_len) for _ in range(num_seqs)]
    return prompts, max_tokens


def random_prompts(batch: int, length: int, seed: int, high: int = 10000) -> list[list[int]]:
    """``batch`` prompts of ``length`` random token ids in [0, high], from a private ``random.Random(seed)``.

    Distinct seeds give prompts that share no KV blocks, so an engine with prefix caching cannot reuse one
    repetition's prefill in the next.
    """
    rng = random.Random(seed)
    return [[rng.randint(0, high) for _ in range(length)] for _ in range(batch)]


def shifted(prompts: list[list[int]], k: int, high: int) -> list[list[int]]:
    """The prompts with their first token id changed (k = 0: unchanged), so no KV block hash of one run matches
    another's and the prefix cache serves nothing; lengths are kept. ``high``: the largest token id allowed."""
    return prompts if k == 0 else [[(p[0] + 997 * k) % (high + 1)] + p[1:] for p in prompts]
