"""Sampling at the limits of float32: tiny and huge temperatures, top_p below float32's smallest value, top_k above
the vocabulary, rows of -inf logits.

The contract, for the PyTorch sampler (``Sampler``, CPU) and the Triton kernel (``sample_tokens_triton`` in the
interpreter): every token drawn is a candidate (a finite logit, among the top-k, inside the nucleus), the most
likely token always survives top-p, a row with no finite logit gives token 0, and a value that float32 cannot
carry (a temperature above 3.4e38) is refused by ``SamplingParams`` with a ValueError naming the field.
"""
from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.layers.sampler import Sampler
from nanovllm.kernels.sampling import sample_tokens_triton

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

V = 40
NEG = float("-inf")
DRAWS = 16  # each row is repeated this many times in one batch


def extreme_rows() -> torch.Tensor:
    """float32 ``[6, V]``: a random row, one finite logit (id 7), five finite logits (ids 30..34), no finite logit,
    a row of +-3e38 logits, and a row where two tokens tie for the maximum (ids 3 and 11)."""
    g = torch.Generator().manual_seed(7)
    rows = torch.full((6, V), NEG)
    rows[0] = torch.randn(V, generator=g) * 4
    rows[1, 7] = -2.5
    rows[2, 30:35] = torch.tensor([0.5, 3.0, -1.0, 2.0, 2.9])
    rows[4] = torch.where(torch.arange(V) % 2 == 0, 3e38, -3e38)
    rows[5] = torch.randn(V, generator=g)
    rows[5, 3] = rows[5, 11] = 10.0
    return rows


def candidates(row: torch.Tensor, top_k: int, top_p_tiny: bool) -> set[int]:
    """Token ids a draw may return: finite logits, cut to the top-k values (ties included), and to the most likely
    ones when the nucleus holds one token; {0} for a row without a finite logit."""
    finite = torch.isfinite(row)
    if not finite.any():
        return {0}
    keep = finite.clone()
    if top_k > 0 and top_k < int(finite.sum()):
        kth = row[finite].topk(top_k).values[-1]
        keep &= row >= kth
    if top_p_tiny:
        keep &= row == row[finite].max()
    return set(torch.nonzero(keep).flatten().tolist())


def batch_of(rows: torch.Tensor) -> torch.Tensor:
    return rows.repeat_interleave(DRAWS, 0)


# (temperature, top_k, top_p) as the engine passes them: float32 / int64 tensors
SETTINGS = [
    (1e-30, -1, 1.0), (1e30, -1, 1.0), (3.4e38, -1, 1.0), (1.0, -1, 1e-45), (1e30, -1, 1e-45), (1.0, -1, 1e-300),
    (1e-30, -1, 1e-300), (1.0, 10**6, 1.0), (1e30, 10**6, 0.5), (1.0, 3, 1e-46), (1.0, 2**62, 1.0), (0.7, 2, 0.3),
]


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_torch_sampler_draws_only_candidates(temperature: float, top_k: int, top_p: float) -> None:
    rows = extreme_rows()
    logits = batch_of(rows)
    n = logits.shape[0]
    temps = torch.full((n,), temperature, dtype=torch.float32)
    top_ks = torch.full((n,), top_k, dtype=torch.int64)
    top_ps = torch.full((n,), top_p, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    out = Sampler()(logits, temps, top_ks, top_ps, generator=gen)
    assert out.dtype == torch.int64 and out.shape == (n,)
    tiny_p = top_p < 1e-30  # the nucleus holds the most likely token(s) only
    for r, row in enumerate(rows):
        drawn = set(out[r * DRAWS:(r + 1) * DRAWS].tolist())
        allowed = candidates(row, top_k, tiny_p)
        assert drawn <= allowed, f"row {r}: drew {sorted(drawn - allowed)}, candidates {sorted(allowed)}"
    if temperature < 1e-20 or tiny_p:  # effectively greedy on rows with one maximum
        for r in (0, 1, 2, 3):
            assert set(out[r * DRAWS:(r + 1) * DRAWS].tolist()) == {int(rows[r].argmax())}


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # 3e38 / 1e-5 = inf: intended
@pytest.mark.parametrize("temperature", [1e-30, 1.0, 3.4e38])
def test_triton_kernel_draws_only_candidates(temperature: float) -> None:
    """The kernel in the interpreter (each program runs serially there: few rows, 32-token tiles)."""
    draws = 4
    rows = extreme_rows()
    logits = rows.repeat_interleave(draws, 0)
    temps = torch.full((logits.shape[0],), temperature, dtype=torch.float32)
    for splits in (1, 2):  # one program per row (a full tile and a masked tail), and two splits with the reduction
        out = sample_tokens_triton(logits, temps, seed=11, offset=splits, num_splits=splits, block=32)
        per_row = [set(out[r * draws:(r + 1) * draws].tolist()) for r in range(len(rows))]
        for r, row in enumerate(rows):
            assert per_row[r] <= candidates(row, -1, False), (r, splits, per_row[r])
        assert per_row[3] == {0}  # no finite logit: token 0
        assert per_row[1] == {7}  # the only finite logit
        if temperature < 1e-20:  # clamped at 1e-5: greedy for these logit gaps
            assert per_row[0] == {int(rows[0].argmax())} and per_row[2] == {31}


def test_sampler_triton_path_and_torch_path_agree_on_the_support() -> None:
    """``Sampler(force_triton=True)`` (no top-k/top-p) and the torch path give tokens from the same candidates."""
    draws = 8
    rows = extreme_rows()
    logits = rows.repeat_interleave(draws, 0)
    n = logits.shape[0]
    args = (torch.full((n,), 1e30), torch.full((n,), -1, dtype=torch.int64), torch.ones(n))
    for sampler in (Sampler(force_triton=True), Sampler()):
        out = sampler(logits, *args, generator=torch.Generator().manual_seed(5))
        for r, row in enumerate(rows):
            assert set(out[r * draws:(r + 1) * draws].tolist()) <= candidates(row, -1, False)
        # a huge temperature flattens the distribution: the draws of the random row spread over many tokens
        assert len(set(out[:draws].tolist())) > 3


@pytest.mark.parametrize("value", [3.5e38, 1e39, 1e300])
def test_temperature_beyond_float32_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"SamplingParams\.temperature .*float32"):
        SamplingParams(temperature=value)


@pytest.mark.parametrize("kw", [dict(temperature=3.4e38), dict(temperature=1e-300), dict(top_p=5e-324),
                                dict(top_k=10**30)])
def test_extreme_but_representable_values_are_accepted(kw: dict) -> None:
    SamplingParams(**kw)


@pytest.fixture(scope="module")
def small_llm(tiny_ckpt: str) -> LLM:
    return LLM(tiny_ckpt, device="cpu", kvcache_block_size=16, num_kvcache_blocks=8, max_num_seqs=4, max_model_len=64,
               seed=1)


def test_engine_at_the_limits_equals_greedy_or_stays_in_the_vocabulary(small_llm: LLM) -> None:
    prompts = random_prompts([9, 14], seed=190)
    greedy = [o["token_ids"] for o in small_llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)]
    for kw in (dict(temperature=1e-30), dict(temperature=1.0, top_p=1e-45), dict(temperature=1.0, top_p=1e-300),
               dict(temperature=1e30, top_p=1e-300), dict(temperature=1e-30, top_k=10**30)):
        outs = small_llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True, **kw), use_tqdm=False)
        assert [o["token_ids"] for o in outs] == greedy, kw
    for kw in (dict(temperature=3.4e38), dict(temperature=1e30, top_k=10**30, top_p=0.999)):
        outs = small_llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True, **kw), use_tqdm=False)
        assert all(len(o["token_ids"]) == 6 and all(0 <= t < 1024 for t in o["token_ids"]) for o in outs)
    assert small_llm.kv_cache_usage() == 0.0


# ---- draw frequencies against the softmax ------------------------------------------------------------------
def _empirical(sampler: Sampler, logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               n: int, seed: int) -> torch.Tensor:
    rows = logits.expand(n, -1).contiguous()
    g = torch.Generator().manual_seed(seed)
    ids = sampler(rows, torch.full((n,), temperature), torch.full((n,), top_k, dtype=torch.int64),
                  torch.full((n,), top_p), g)
    return torch.bincount(ids, minlength=logits.shape[-1]).double() / n


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, -1, 1.0), (0.5, -1, 1.0), (2.0, -1, 1.0),
                                                       (1.0, 3, 1.0), (1.0, -1, 0.6), (0.8, 4, 0.9)])
def test_sampler_frequencies_follow_softmax(temperature: float, top_k: int, top_p: float) -> None:
    """Draw frequencies vs the float64 distribution: softmax(logits / T) cut to the top-k tokens, renormalized,
    then cut to the smallest prefix of the sorted probabilities whose mass reaches top_p (Holtzman et al. 2019)
    and renormalized again (top-k before top-p, as in vLLM and transformers' warper order)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -3.0]])
    n = 40000
    freq = _empirical(Sampler(), logits, temperature, top_k, top_p, n, seed=5)
    probs = torch.softmax(logits[0].double() / temperature, -1)
    order = probs.argsort(descending=True).tolist()
    if top_k != -1:
        order = order[:top_k]
    kept_mass = float(probs[order].sum())
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for i in order:
        if mass >= top_p:
            break
        keep[i] = True
        mass += float(probs[i]) / kept_mass
    expected = torch.where(keep, probs, 0.0)
    expected /= expected.sum()
    assert bool((freq[~keep] == 0).all()), "a token outside top-k / top-p was drawn"
    tol = 4.5 * torch.sqrt(expected * (1 - expected) / n) + 1e-4  # 4.5 sigma per token
    assert bool(((freq - expected).abs() <= tol).all()), (freq, expected)


def test_sampler_rows_keep_their_own_settings() -> None:
    """One batch mixing greedy, top-k=1, top-p and plain rows: each row follows its own settings."""
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0, 0.0]).expand(8, -1).contiguous()
    temps = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 5.0, 1.0, 1.0])
    top_ks = torch.tensor([-1, 1, -1, 2, -1, -1, -1, -1])
    top_ps = torch.tensor([1.0, 1.0, 1e-6, 1.0, 0.5, 1.0, 1.0, 1.0])
    seen = [set() for _ in range(8)]
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        for row, t in enumerate(Sampler()(logits, temps, top_ks, top_ps, g).tolist()):
            seen[row].add(t)
    assert seen[0] == seen[1] == seen[2] == seen[4] == {1}  # greedy, top_k=1, tiny top_p, greedy (top_p ignored)
    assert seen[3] == {1, 2}  # top-2 only
    assert seen[5] == {0, 1, 2, 3, 4}  # a hot row reaches every token
