"""Engine checks on the GPU (issue 4, acceptance 2): tokens against transformers, CUDA graphs against eager.

1. Tiny float32 checkpoint: greedy tokens of the engine (eager, compiled + CUDA graphs, coconut + CUDA graphs)
   equal transformers' float32 greedy tokens, prompt by prompt.
2. Qwen3-0.6B-shaped bf16 checkpoint (``--model``): the first 16 greedy tokens agree with transformers (bf16, sdpa)
   for at least 90 % of 32 prompts; CUDA-graph decode equals eager decode; coconut equals plain compiled.
   ``--prompts random`` (default): 32 prompts of 16-512 uniform random ids < 10000 (seed 1). ``--prompts markov``:
   32 walks of 16-512 tokens (seed 1) of the Markov chain in ``--model``/markov.json, for a checkpoint trained by
   ``scripts/train_markov_checkpoint.py`` (peaked predictions, so bf16 near-ties are rare).
Writes a JSON summary (``--out``) and exits non-zero when a check fails.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch


from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.utils.tiny_model import build_tiny_checkpoint  # noqa: E402


def hf_greedy_all(path: str, prompts: list[list[int]], n: int, dtype: torch.dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def near_tie_flips(path: str, prompts: list[list[int]], ours: list[list[int]], ref: list[list[int]]) -> list[dict]:
    """For each prompt where our tokens and the bf16 reference's differ, judge the first divergence with a
    float32 teacher-forced reference (the same weights upcast): a near-tie when the two tokens' fp32 logits are
    closer than 2 bf16 ulps of the larger one (|logit| * 2**-7), i.e. bf16 rounding alone can flip them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    verdicts = []
    with torch.no_grad():
        for p, a, b in zip(prompts, ours, ref):
            if a == b:
                continue
            j = agree_prefix(a, b)
            ids = torch.tensor([p + a[:j]], device="cuda")
            logits = model(ids).logits[0, -1].float()
            la, lb = logits[a[j]].item(), logits[b[j]].item()
            top = logits.max().item()
            verdicts.append({"step": j, "ours": a[j], "ref": b[j], "logit_ours": la, "logit_ref": lb, "fp32_max": top,
                             "near_tie": abs(la - lb) <= abs(top) * 2 ** -7})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return verdicts


def engine_tokens(path: str, prompts: list[list[int]], n: int, **kw) -> tuple[list[list[int]], float]:
    t0 = time.perf_counter()
    llm = LLM(path, **kw)
    build = time.perf_counter() - t0
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    assert llm.kv_cache_usage() == 0.0
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o["token_ids"] for o in outs], build


def rand_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]


def markov_prompts(model_dir: str, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """``n`` walks (lengths uniform in ``[lo, hi]``, deterministic for ``seed``) of the Markov chain described by
    ``model_dir``/markov.json (written by ``scripts/train_markov_checkpoint.py``).

    Raises:
        ValueError: markov.json is missing or invalid (the message names the file).
    """
    scripts = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    from markov_chain import MARKOV_FILE, MarkovChain

    return MarkovChain.from_json(os.path.join(model_dir, MARKOV_FILE)).prompts(n, lo, hi, seed=seed)


def model_prompts(kind: str, model_dir: str, n: int = 32) -> list[list[int]]:
    """The prompts of the 0.6B check: ``kind`` "random" (uniform ids < 10000) or "markov" (walks of the chain in
    ``model_dir``/markov.json); ``n`` prompts of 16-512 tokens, seed 1. ValueError for another kind or a missing
    markov.json."""
    if kind == "random":
        return rand_prompts(n, 16, 512, 10000, 1)
    if kind == "markov":
        return markov_prompts(model_dir, n, 16, 512, 1)
    raise ValueError(f"unknown prompt kind {kind!r} (random or markov)")


def agree_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="0.6B-shaped bf16 checkpoint (skipped when absent)")
    ap.add_argument("--out", default="engine-check.json")
    ap.add_argument("--skip-tiny", action="store_true", help="skip the tiny float32 checks")
    ap.add_argument("--modes", default="eager,coconut+graphs", help="engine modes for the 0.6B check")
    ap.add_argument("--prompts", default="random", choices=["random", "markov"],
                    help="0.6B prompts: uniform random ids, or walks of --model's markov.json chain")
    args = ap.parse_args(argv)
    # Read markov.json before any GPU work, so that a missing file fails at once.
    model_prompt_list = model_prompts(args.prompts, args.model) if args.model else []
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "prompts": args.prompts}
    ok = True

    tiny = build_tiny_checkpoint(os.path.join(tempfile.gettempdir(), "tiny-qwen3-gpu"))
    prompts = rand_prompts(8, 1, 300, 1024, 0)
    ref = [] if args.skip_tiny else hf_greedy_all(tiny, prompts, 24, torch.float32)
    tiny_modes = {} if args.skip_tiny else {"eager": dict(enforce_eager=True), "coconut+graphs": dict(compile_fusion=True)}
    for name, kw in tiny_modes.items():
        try:
            toks, build = engine_tokens(tiny, prompts, 24, dtype="float32", max_model_len=1024, max_num_seqs=64, **kw)
            same = sum(t == r for t, r in zip(toks, ref))
            results[f"tiny_fp32_{name}"] = {"equal_prompts": same, "of": len(ref), "build_s": round(build, 1)}
            ok &= same == len(ref)
            print(f"tiny fp32 {name}: {same}/{len(ref)} prompts equal transformers (build {build:.1f} s)", flush=True)
        except Exception as e:  # record and go on
            ok = False
            results[f"tiny_fp32_{name}"] = {"error": repr(e)[:2000]}
            print(f"tiny fp32 {name}: ERROR {e!r}", flush=True)

    if args.model:
        prompts = model_prompt_list
        ref = hf_greedy_all(args.model, prompts, 16, torch.bfloat16)
        toks_by_mode = {}
        all_modes = {"eager": dict(enforce_eager=True), "compiled+graphs": dict(),
                     "coconut+graphs": dict(compile_fusion=True)}
        for name in args.modes.split(","):
            kw = all_modes[name]
            try:
                toks, build = engine_tokens(args.model, prompts, 16, max_num_seqs=64, **kw)
                toks_by_mode[name] = toks
                full = sum(t == r for t, r in zip(toks, ref))
                mean_prefix = sum(agree_prefix(t, r) for t, r in zip(toks, ref)) / len(ref)
                verdicts = near_tie_flips(args.model, prompts, toks, ref)
                ties = sum(v["near_tie"] for v in verdicts)
                results[f"qwen06b_bf16_{name}"] = {"all16_equal": full, "of": len(ref),
                                                   "mean_agreeing_prefix": mean_prefix, "build_s": round(build, 1),
                                                   "divergences": verdicts, "near_tie_divergences": ties}
                print(f"0.6B bf16 {name}: {full}/{len(ref)} prompts agree on all 16 tokens; mean agreeing "
                      f"prefix {mean_prefix:.1f}; first divergences that are fp32 near-ties: {ties}/{len(verdicts)} "
                      f"(build {build:.1f} s)", flush=True)
            except Exception as e:
                ok = False
                results[f"qwen06b_bf16_{name}"] = {"error": repr(e)[:2000]}
                print(f"0.6B bf16 {name}: ERROR {e!r}", flush=True)
        if "eager" in toks_by_mode:
            for name in ("coconut+graphs",):
                if name in toks_by_mode:
                    same = sum(a == b for a, b in zip(toks_by_mode[name], toks_by_mode["eager"]))
                    results[f"qwen06b_{name}_vs_eager_equal"] = same
                    print(f"0.6B bf16 {name} vs eager: {same}/{len(prompts)} identical", flush=True)
    results["ok"] = bool(ok)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print("ENGINE CHECK", "OK" if ok else "FAILED")
    return 0 if ok else 1

