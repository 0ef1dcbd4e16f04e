"""Briefly train a random-weight checkpoint on a synthetic Markov-chain corpus, so that its predictions are peaked.

Why: the random 0.6B-shaped checkpoint of ``scripts/make_qwen3_06b_checkpoint.py`` has almost flat next-token
logits, so the top two logits are often closer than bf16 rounding (2^-7 relative) and two correct bf16
implementations disagree on greedy tokens (transformers sdpa vs transformers eager: 17/32 prompts). Real models
have peaked next-token distributions. This script makes a checkpoint of the same shapes whose greedy decisions
have clear top-1 margins: it trains the random checkpoint for a few hundred steps on walks of a first-order
Markov chain.

How: the chain (:class:`MarkovChain`) is defined only by ``(seed, states, vocab_size)``: ``states`` distinct token
ids drawn at random from the vocabulary, and for each state 3 distinct successor states with transition
probabilities (0.7, 0.2, 0.1). Its entropy is 0.80 nats per token, so a trained model's loss tends to ~0.8 and its
ideal top1-top2 logit margin is ln(0.7/0.2) = 1.25 (about 10 bf16 ulps at |logit| ~ 16). The model is loaded in
float32 with ``transformers``, trained with AdamW (betas (0.9, 0.95), no weight decay), a linear warm-up over
the first 10 % of the steps then cosine decay to 0, gradient-norm clipping at 1.0 and bf16 autocast on CUDA
(plain float32 on CPU), on the model's own causal-LM loss. It is saved in the source checkpoint's dtype with the
source's config, generation config and tokenizer files, plus ``markov.json`` (the chain and the training
metadata), from which the engine check of ``benchmarks/check.py`` (``--prompts markov``) rebuilds its prompts.
The chain is in ``markov_chain.py``, the training loop in ``markov_training.py``, saving and checking the
checkpoint in ``checkpoint_saving.py`` (beside this script).

Cost: batch 16 x 256 tokens per step (the 151936-token vocabulary makes the logits 4096 x 151936: ~2.5 GB in
float32, so keep batch * seq_len modest); ~6 * 0.6e9 * 4096 = 1.5e13 FLOP per step. Measured on one H200 (torch
2.11, transformers 5.17) from the random 0.6B-shaped checkpoint, seed 0, lr 1e-3: 0.155 s per step, ~75 s in
all for the default 1024 states x 300 steps (held-out loss 0.81 against the chain's entropy 0.80, argmax = the
chain's most likely successor at 99.9 % of positions, mean top-1 probability 0.70, mean top1-top2 logit margin
1.29). With 4096 states, 300 steps are far too few (loss 7.45, mean top-1 probability 0.004: the model only learnt
which 4096 ids occur), yet all bf16/fp32 pairs of check_bf16_agreement.py agreed on 32/32 prompts, so agreement
alone does not show a useful checkpoint; 900 steps reach loss 0.85 (2.2 min). lr 3e-3 was worse than 1e-3
for both sizes. The script warns when the held-out argmax matches the chain's best successor at < 90 % of positions.

Usage::

    python scripts/make_qwen3_06b_checkpoint.py --out /tmp/q06
    python scripts/train_markov_checkpoint.py --src /tmp/q06 --out /tmp/q06m --device cuda
    python scripts/train_markov_checkpoint.py --src /tmp/tiny --out /tmp/tiny-m --device cpu --steps 60 \\
        --batch 8 --seq-len 32 --states 64 --lr 3e-2          # tiny, CPU, for tests
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

import torch

# Running as ``python scripts/train_markov_checkpoint.py`` puts scripts/ on sys.path, not the repository root.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from checkpoint_saving import save_checkpoint, source_dtype, verify_saved  # noqa: E402
from markov_chain import MARKOV_FILE, MarkovChain  # noqa: E402
from markov_training import evaluate, train  # noqa: E402


def _device_name(device: torch.device) -> str:
    """A readable name of ``device`` (the GPU's name on CUDA, the CPU's architecture otherwise)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="source checkpoint (e.g. from scripts/make_qwen3_06b_checkpoint.py)")
    ap.add_argument("--out", required=True, help="output folder (created; old model files there are replaced)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16, help="walks per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per walk")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--states", type=int, default=1024,
                    help="states (distinct token ids) of the Markov chain (4096 needs ~900 steps at lr 1e-3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the chain and of the training data")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)
    if os.path.abspath(args.src) == os.path.abspath(args.out):
        raise ValueError("--out must differ from --src (the source weights would be overwritten)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")

    from transformers import AutoModelForCausalLM

    t_start = time.perf_counter()
    device = torch.device(args.device)
    with open(os.path.join(args.src, "config.json")) as f:
        src_cfg = json.load(f)
    out_dtype = source_dtype(src_cfg)
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32).to(device)
    vocab = int(model.config.vocab_size)
    chain = MarkovChain(seed=args.seed, states=args.states, vocab_size=vocab)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {args.src}: {n_params / 1e6:.1f} M parameters, vocab {vocab}, saving as "
          f"{str(out_dtype).replace('torch.', '')}; chain: "
          f"{chain.states} states, probs {chain.probs}, entropy {chain.entropy():.3f} nats; "
          f"load {time.perf_counter() - t_start:.1f} s", flush=True)

    eval_seed = args.seed + 1_000_003  # held-out walks: another generator stream than the training data
    eval_batch = max(1, min(args.batch, 8))
    before = evaluate(model, chain, eval_batch, args.seq_len, eval_seed, device)
    print(f"held-out before: {json.dumps({k: round(v, 4) for k, v in before.items()})}", flush=True)
    stats = train(model, chain, args.steps, args.batch, args.seq_len, args.lr, args.seed, device, args.log_every)
    after = evaluate(model, chain, eval_batch, args.seq_len, eval_seed, device)
    print(f"final loss {stats['final_loss']:.4f} (mean of last 10 steps {stats['final_loss_avg10']:.4f}, first "
          f"{stats['initial_loss']:.4f}, chain entropy {chain.entropy():.4f}); held-out: loss {after['loss']:.4f}, "
          f"mean top-1 probability {after['top1_prob']:.4f}, mean top1-top2 logit margin {after['margin']:.4f}, "
          f"argmax = chain's most likely successor {after['chain_top1_acc']:.4f}, margin < 0.1: "
          f"{after['margin_lt_0p1']:.4f}; train {stats['train_seconds']:.1f} s", flush=True)
    if after["chain_top1_acc"] < 0.9:
        print(f"WARNING: the model's argmax is the chain's most likely successor at only "
              f"{after['chain_top1_acc']:.1%} of the held-out positions: not converged (its greedy outputs may be "
              f"degenerate and agree trivially); train longer (--steps), or use fewer --states", flush=True)

    model.eval()
    copied = save_checkpoint(model, args.src, args.out, out_dtype)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    check = verify_saved(args.out, out_dtype)
    import transformers

    meta = {**chain.to_json(), "training": {
        "src": os.path.abspath(args.src), "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
        "lr": args.lr, "warmup_frac": 0.1, "schedule": "linear warm-up + cosine to 0", "betas": [0.9, 0.95],
        "weight_decay": 0.0, "grad_clip": 1.0, "autocast": "bfloat16" if device.type == "cuda" else None,
        "data_seed": args.seed, "initial_loss": stats["initial_loss"], "final_loss": stats["final_loss"],
        "final_loss_avg10": stats["final_loss_avg10"], "chain_entropy": chain.entropy(),
        "heldout_before": before, "heldout_after": after, "tokens_seen": stats["tokens_seen"],
        "train_seconds": round(stats["train_seconds"], 2), "wall_seconds": round(time.perf_counter() - t_start, 2),
        "saved_dtype": str(out_dtype).replace("torch.", ""), "tied_check": check,
        "torch": torch.__version__, "transformers": transformers.__version__, "device": _device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}}
    with open(os.path.join(args.out, MARKOV_FILE), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out} ({str(out_dtype).replace('torch.', '')}; copied {copied}; lm_head tied: {check['tied']}, "
          f"equal to embed_tokens: "
          f"{check['lm_head_equals_embed']}); total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
