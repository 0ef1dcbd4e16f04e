"""How often do two correct implementations agree on 16 greedy tokens of the random 0.6B-shaped checkpoint?

Issue 4 asks that our bf16 engine's first 16 greedy tokens equal transformers' (bf16) for at least 90 % of 32
prompts. With random weights the next-token logits are nearly flat (the top two are often within bf16's
rounding, 2^-7 relative), so any change of summation order can flip a token and everything after it. This
script measures that baseline without our engine: transformers in bfloat16 against transformers in float32,
and transformers bf16 "sdpa" attention against its bf16 "eager" attention (with ``--with-engine`` also our
engine in bf16 against both), on the prompts of
the engine check (``check_engine.py``: 32 prompts of 16-512 random ids, seed 1; with ``--prompts markov``, 32 walks of 16-512
tokens, seed 1, of the Markov chain in ``--model``/markov.json, for a checkpoint trained by
``scripts/train_markov_checkpoint.py``), 16 greedy tokens each.

Usage: ``python benchmarks/check.py --what bf16-agreement --model /tmp/q06 [--part-args 'bf16-agreement=--num-prompts 32
[--prompts random|markov] [--out PATH]``. Prints the agreement of each pair and writes a JSON with the run's metadata.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from . import provenance, results_io  # noqa: E402
from .check_engine import agree_prefix, model_prompts  # noqa: E402


def greedy(model_dir: str, prompts: list[list[int]], n: int, dtype: torch.dtype, attn: str, device: str
           ) -> list[list[int]]:
    """``n`` greedy tokens per prompt from transformers (one prompt at a time, no padding, EOS ignored)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(device).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    del model
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the 0.6B-shaped checkpoint (scripts/make_qwen3_06b_checkpoint.py)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON path (default: none)")
    ap.add_argument("--with-engine", action="store_true",
                    help="also run nano-vllm-coconut in bf16 on --device (enforce_eager) and compare it too")
    ap.add_argument("--prompts", default="random", choices=["random", "markov"],
                    help="uniform random ids, or walks of the chain in --model's markov.json (ValueError if absent)")
    args = ap.parse_args(argv)
    # At most 32: the first --num-prompts of check_engine.py's 32 prompts. More than 32 draws a different set
    # (all lengths are drawn before the ids), which does not contain those 32.
    prompts = model_prompts(args.prompts, args.model, max(32, args.num_prompts))[:args.num_prompts]
    runs: dict[str, list[list[int]]] = {}
    seconds: dict[str, float] = {}
    for name, dtype, attn in (("fp32_sdpa", torch.float32, "sdpa"), ("bf16_sdpa", torch.bfloat16, "sdpa"),
                              ("bf16_eager", torch.bfloat16, "eager")):
        t0 = time.perf_counter()
        runs[name] = greedy(args.model, prompts, args.tokens, dtype, attn, args.device)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {seconds[name]} s", flush=True)
    compare = [("bf16_sdpa", "fp32_sdpa"), ("bf16_sdpa", "bf16_eager"), ("bf16_eager", "fp32_sdpa")]
    if args.with_engine:
        from nanovllm import LLM, SamplingParams

        t0 = time.perf_counter()
        llm = LLM(args.model, device=args.device, dtype="bfloat16", enforce_eager=True, max_model_len=1024,
                  max_num_seqs=len(prompts))
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True),
                            use_tqdm=False)
        runs["engine_bf16"] = [o["token_ids"] for o in outs]
        seconds["engine_bf16"] = round(time.perf_counter() - t0, 1)
        print(f"engine_bf16: {seconds['engine_bf16']} s", flush=True)
        compare += [("engine_bf16", "bf16_sdpa"), ("engine_bf16", "fp32_sdpa")]
    pairs = {}
    for a, b in compare:
        equal = sum(x == y for x, y in zip(runs[a], runs[b]))
        prefix = sum(agree_prefix(x, y) for x, y in zip(runs[a], runs[b])) / len(prompts)
        pairs[f"{a}_vs_{b}"] = {"all_tokens_equal": equal, "of": len(prompts), "fraction": round(equal / len(prompts), 3),
                                "mean_agreeing_prefix": round(prefix, 2)}
        print(f"{a} vs {b}: {equal}/{len(prompts)} prompts agree on all {args.tokens} tokens "
              f"(mean agreeing prefix {prefix:.1f})", flush=True)
    result = {"benchmark": "bf16_agreement", "model": args.model, "device": args.device, "tokens": args.tokens,
              "prompts": args.prompts, "num_prompts": len(prompts),
              "pairs": pairs, "seconds": seconds, "meta": provenance.run_metadata()}
    if args.out:
        results_io.write_json(args.out, result)
    return 0

