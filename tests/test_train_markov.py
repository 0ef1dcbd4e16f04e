"""scripts/train_markov_checkpoint.py on the CPU: the Markov chain, a short training run of a tiny checkpoint
through the command line, the saved checkpoint (transformers and our engine agree on it), and the ``--prompts
markov`` wiring of benchmarks/check.py's engine and bf16-agreement parts."""
from __future__ import annotations

import json
import os
import sys
from collections import Counter

import pytest
import torch

from conftest import hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.utils.tiny_model import build_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _d in ("scripts", ""):
    if os.path.join(ROOT, _d) not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, _d))

from benchmarks.harness import check_bf16 as check_bf16_agreement  # noqa: E402
from benchmarks.harness import check_engine as check_engine_gpu  # noqa: E402
import train_markov_checkpoint as tm  # noqa: E402
from checkpoint_saving import source_dtype  # noqa: E402
from markov_chain import MarkovChain  # noqa: E402
from markov_training import lr_factor  # noqa: E402

STEPS = 60


def _transitions(chain: MarkovChain) -> dict[int, list[int]]:
    """token id -> its successors' token ids, most likely first (built from the tables, not from chain methods)."""
    return {int(t): [int(chain.tokens[s]) for s in row] for t, row in zip(chain.tokens, chain.successors)}


def test_chain_tables_and_sampling_frequencies() -> None:
    chain = MarkovChain(seed=5, states=64, vocab_size=1024)
    assert chain.tokens.shape == (64,) and chain.successors.shape == (64, 3)
    assert len(set(chain.tokens.tolist())) == 64 and 0 <= int(chain.tokens.min()) and int(chain.tokens.max()) < 1024
    assert all(len(set(row)) == 3 for row in chain.successors.tolist())  # 3 distinct successors per state
    again = MarkovChain(seed=5, states=64, vocab_size=1024)
    assert torch.equal(again.tokens, chain.tokens) and torch.equal(again.successors, chain.successors)
    assert not torch.equal(MarkovChain(seed=6, states=64, vocab_size=1024).tokens, chain.tokens)
    # empirical transition frequencies: (0.7, 0.2, 0.1) within ~5 standard deviations of 16128 draws
    walks = chain.sample(256, 64, torch.Generator().manual_seed(0))
    assert walks.shape == (256, 64) and walks.dtype == torch.long
    succ = _transitions(chain)
    rank = Counter(succ[a].index(b) for w in walks.tolist() for a, b in zip(w, w[1:]))
    n = sum(rank.values())
    assert n == 256 * 63
    for j, p in enumerate((0.7, 0.2, 0.1)):
        assert abs(rank[j] / n - p) < 0.02, (j, rank[j] / n)
    # start states are uniform over the states, not stuck on a few
    assert len(set(walks[:, 0].tolist())) > 40
    with pytest.raises(ValueError):
        MarkovChain(seed=0, states=2, vocab_size=1024)  # fewer states than successors
    with pytest.raises(ValueError):
        MarkovChain(seed=0, states=2000, vocab_size=1024)


def test_prompts_deterministic_and_legal() -> None:
    chain = MarkovChain(seed=0, states=64, vocab_size=1024)
    a = chain.prompts(12, 16, 80, seed=1)
    assert a == chain.prompts(12, 16, 80, seed=1)
    assert a != chain.prompts(12, 16, 80, seed=2)
    assert len(a) == 12 and all(16 <= len(p) <= 80 for p in a) and len({len(p) for p in a}) > 3
    succ = _transitions(chain)
    for p in a:
        assert all(x in succ and y in succ[x] for x, y in zip(p, p[1:]))
        assert chain.is_legal_walk(p)
    bad = list(a[0])
    bad[5] = next(t for t in succ if t not in succ[bad[4]])  # a state, but not a successor of bad[4]
    assert not chain.is_legal_walk(bad)
    assert not chain.is_legal_walk([next(t for t in range(1024) if t not in succ)])  # not a state at all


def test_json_round_trip_and_errors(tmp_path) -> None:  # noqa: ANN001
    chain = MarkovChain(seed=3, states=64, vocab_size=1024)
    d = chain.to_json()
    assert json.loads(json.dumps(d)) == d  # JSON-able
    assert d["probs"] == [0.7, 0.2, 0.1] and (d["seed"], d["states"], d["vocab_size"]) == (3, 64, 1024)
    path = tmp_path / "markov.json"
    path.write_text(json.dumps({**d, "training": {"steps": 1}}))
    for src in (d, str(path), str(tmp_path)):  # a dict, the file, the folder holding it
        back = MarkovChain.from_json(src)
        assert back == chain and torch.equal(back.tokens, chain.tokens) and torch.equal(back.successors, chain.successors)
    missing = tmp_path / "nowhere" / "markov.json"
    with pytest.raises(ValueError, match="nowhere"):
        MarkovChain.from_json(str(missing))
    with pytest.raises(ValueError, match="markov.json"):
        MarkovChain.from_json(str(tmp_path / "nowhere"))  # neither a file nor a folder
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        MarkovChain.from_json(str(bad))
    bad.write_text(json.dumps({"seed": 0, "states": 64}))  # no vocab_size
    with pytest.raises(ValueError, match="bad.json"):
        MarkovChain.from_json(str(bad))
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="bad.json"):
        MarkovChain.from_json(str(bad))
    bad.write_text(json.dumps({**d, "fingerprint": "0" * 16}))  # another torch drew another chain
    with pytest.raises(ValueError, match="fingerprint"):
        MarkovChain.from_json(str(bad))


def test_lr_schedule_and_source_dtype() -> None:
    f = [lr_factor(s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5) and 0 < f[99] < 1e-3
    assert all(a <= b for a, b in zip(f[:10], f[1:10])) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert source_dtype({"torch_dtype": "float16"}) == torch.float16
    assert source_dtype({"dtype": "float32"}) == torch.float32
    assert source_dtype({}) == torch.bfloat16


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(source, trained): the tiny checkpoint and its copy trained for STEPS steps through the command line."""
    src = build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-src")))
    out = str(tmp_path_factory.mktemp("tiny-markov"))
    torch.manual_seed(0)
    rc = tm.main(["--src", src, "--out", out, "--device", "cpu", "--steps", str(STEPS), "--batch", "8",
                  "--seq-len", "32", "--states", "64", "--lr", "3e-2", "--seed", "0"])
    assert rc == 0
    return src, out


def test_training_lowers_the_loss_and_peaks_predictions(trained: tuple[str, str]) -> None:
    _, out = trained
    with open(os.path.join(out, "markov.json")) as f:
        meta = json.load(f)
    t = meta["training"]
    assert t["steps"] == STEPS and t["tokens_seen"] == STEPS * 8 * 32 and t["saved_dtype"] == "float32"
    assert t["final_loss_avg10"] < 0.6 * t["initial_loss"], t
    before, after = t["heldout_before"], t["heldout_after"]
    assert after["loss"] < 0.6 * before["loss"], (before, after)
    assert after["chain_top1_acc"] > 0.7 and after["top1_prob"] > before["top1_prob"], (before, after)
    assert t["tied_check"]["lm_head_equals_embed"] and t["tied_check"]["tie_word_embeddings"]
    assert MarkovChain.from_json(out) == MarkovChain(seed=0, states=64, vocab_size=1024)


def test_saved_files(trained: tuple[str, str]) -> None:
    src, out = trained
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "markov.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files
    assert "nanovllm_stamp.json" in os.listdir(src) and "nanovllm_stamp.json" not in files
    with open(os.path.join(src, "config.json")) as f:
        src_cfg = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert {k: cfg[k] for k in src_cfg} == src_cfg  # the source's config, dtype included
    for name in ("tokenizer.json", "generation_config.json"):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read()


def test_engine_equals_transformers_on_markov_prompts(trained: tuple[str, str]) -> None:
    from transformers import AutoModelForCausalLM

    src, out = trained
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings
    assert torch.equal(hf.get_output_embeddings().weight, hf.get_input_embeddings().weight)
    hf_src = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert not torch.equal(hf.get_input_embeddings().weight, hf_src.get_input_embeddings().weight)  # trained
    chain = MarkovChain.from_json(out)
    prompts = chain.prompts(3, 8, 40, seed=1)
    ref = [hf_greedy(hf, p, 12) for p in prompts]
    llm = LLM(out, device="cpu", dtype="float32", enforce_eager=True, kvcache_block_size=16, max_model_len=512)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o["token_ids"] for o in outs] == ref
    # peaked predictions: greedy decoding mostly follows the chain's most likely transitions
    best = {t: s[0] for t, s in _transitions(chain).items()}
    steps = [(a, b) for p, r in zip(prompts, ref) for a, b in zip([p[-1]] + r, r)]
    assert sum(best.get(a) == b for a, b in steps) >= 0.75 * len(steps), steps


def test_benchmark_markov_prompts(trained: tuple[str, str], tmp_path) -> None:  # noqa: ANN001
    src, out = trained
    chain = MarkovChain.from_json(out)
    assert check_engine_gpu.model_prompts("markov", out) == chain.prompts(32, 16, 512, seed=1)
    assert check_engine_gpu.model_prompts("random", out) == check_engine_gpu.rand_prompts(32, 16, 512, 10000, 1)
    with pytest.raises(ValueError, match="markov.json"):
        check_engine_gpu.model_prompts("markov", src)  # the random checkpoint has no chain
    res = tmp_path / "agree.json"
    assert check_bf16_agreement.main(["--model", out, "--device", "cpu", "--num-prompts", "2", "--tokens", "3",
                                      "--prompts", "markov", "--out", str(res)]) == 0
    d = json.loads(res.read_text())
    assert d["prompts"] == "markov" and d["num_prompts"] == 2
    assert d["pairs"]["bf16_sdpa_vs_fp32_sdpa"]["of"] == 2
    with pytest.raises(ValueError, match="markov.json"):
        check_bf16_agreement.main(["--model", src, "--device", "cpu", "--num-prompts", "1", "--prompts", "markov"])
