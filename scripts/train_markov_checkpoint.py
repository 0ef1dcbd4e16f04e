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
import glob
import inspect
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# Running as ``python scripts/train_markov_checkpoint.py`` puts scripts/ on sys.path, not the repository root.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

MARKOV_FILE: str = "markov.json"
TRANSITION_PROBS: tuple[float, ...] = (0.7, 0.2, 0.1)
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Files of the source checkpoint that are not copied as "tokenizer files": weights, weight indexes, the model
# config (written by save_pretrained and then merged with the source's), our own chain file, and the stamp of
# nanovllm.utils.tiny_model (copying it would make build_tiny_checkpoint mistake the output for its own cache).
_NOT_COPIED_NAMES: frozenset[str] = frozenset({"config.json", MARKOV_FILE, "nanovllm_stamp.json"})
_NOT_COPIED_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                                         ".index.json")


@dataclass(frozen=True)
class MarkovChain:
    """A first-order Markov chain over ``states`` token ids of a ``vocab_size``-token vocabulary.

    Everything is derived from ``(seed, states, vocab_size)`` (and ``probs``, fixed to (0.7, 0.2, 0.1) by
    default) with a CPU ``torch.Generator``: ``tokens`` are ``states`` distinct ids, ``randperm(vocab_size)[:states]``;
    ``successors[i]`` are ``len(probs)`` distinct state indices (a state may be its own successor), the
    ``j``-th taken with probability ``probs[j]``.

    Attributes:
        seed: seed of the generator that draws the chain.
        states: number of states (distinct token ids), ``len(probs) <= states <= vocab_size``.
        vocab_size: the model's vocabulary size; every token id is in ``[0, vocab_size)``.
        probs: transition probabilities, sum 1, non-increasing (so ``successors[:, 0]`` is the most likely).
        tokens: int64 ``[states]``, the token id of each state (derived).
        successors: int64 ``[states, len(probs)]``, state indices of each state's successors (derived).

    Raises:
        ValueError: invalid sizes or probabilities.
    """

    seed: int
    states: int
    vocab_size: int
    probs: tuple[float, ...] = TRANSITION_PROBS
    tokens: torch.Tensor = field(init=False, repr=False, compare=False)
    successors: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        k = len(self.probs)
        if k < 1 or any(p <= 0 for p in self.probs) or abs(sum(self.probs) - 1.0) > 1e-6:
            raise ValueError(f"probs must be positive and sum to 1, got {self.probs}")
        if any(a < b for a, b in zip(self.probs, self.probs[1:])):
            raise ValueError(f"probs must be non-increasing, got {self.probs}")
        if not k <= self.states <= self.vocab_size:
            raise ValueError(f"need {k} <= states <= vocab_size, got states={self.states}, "
                             f"vocab_size={self.vocab_size}")
        g = torch.Generator().manual_seed(int(self.seed))
        tokens = torch.randperm(self.vocab_size, generator=g)[: self.states]
        succ = torch.randint(0, self.states, (self.states, k), generator=g)
        while True:  # redraw the rows with a repeated successor (few: P(repeat) ~ k^2 / (2 * states) per row)
            s, _ = succ.sort(dim=1)
            bad = (s[:, 1:] == s[:, :-1]).any(dim=1).nonzero().flatten()
            if bad.numel() == 0:
                break
            succ[bad] = torch.randint(0, self.states, (bad.numel(), k), generator=g)
        object.__setattr__(self, "probs", tuple(float(p) for p in self.probs))
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "successors", succ)

    # ------------------------------------------------------------------------------------------- sampling
    def sample(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """Sample ``batch`` independent walks of ``length`` tokens.

        Args:
            batch: number of walks (>= 1).
            length: tokens per walk (>= 1); the first state is uniform over the states.
            generator: a CPU ``torch.Generator`` (advanced by the call).

        Returns:
            int64 CPU tensor ``[batch, length]`` of token ids.
        """
        if batch < 1 or length < 1:
            raise ValueError(f"batch and length must be >= 1, got {batch}, {length}")
        thresholds = torch.tensor(self.probs, dtype=torch.float64).cumsum(0)[:-1]
        state = torch.randint(0, self.states, (batch,), generator=generator)
        u = torch.rand(batch, length - 1, generator=generator, dtype=torch.float64)
        choice = torch.bucketize(u, thresholds, right=True)  # [batch, length-1] in [0, len(probs))
        out = torch.empty(batch, length, dtype=torch.long)
        out[:, 0] = state
        for t in range(1, length):
            state = self.successors[state, choice[:, t - 1]]
            out[:, t] = state
        return self.tokens[out]

    def prompts(self, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
        """``n`` walks with lengths uniform in ``[lo, hi]``, deterministic for ``seed``.

        Returns:
            ``n`` lists of token ids (the lengths are drawn first, then each walk, from one generator).
        """
        if not 1 <= lo <= hi:
            raise ValueError(f"need 1 <= lo <= hi, got lo={lo}, hi={hi}")
        g = torch.Generator().manual_seed(int(seed))
        lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
        return [self.sample(1, k, g)[0].tolist() for k in lens]

    # ------------------------------------------------------------------------------------------- queries
    def state_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """State index of each token id (int64, same shape as ``token_ids``); -1 for ids that are not states."""
        lookup = torch.full((self.vocab_size,), -1, dtype=torch.long)
        lookup[self.tokens] = torch.arange(self.states)
        return lookup[token_ids.cpu().long()]

    def successor_tokens(self) -> torch.Tensor:
        """int64 ``[states, len(probs)]``: the successors' token ids, most likely first."""
        return self.tokens[self.successors]

    def is_legal_walk(self, token_ids: list[int]) -> bool:
        """True when every id is a state and every consecutive pair is a transition of the chain."""
        if not token_ids:
            return True
        st = self.state_of(torch.tensor(token_ids))
        if (st < 0).any():
            return False
        return bool((self.successors[st[:-1]] == st[1:, None]).any(dim=1).all())

    def fingerprint(self) -> str:
        """A short hash of the derived tables: detects a torch whose RNG draws a different chain from the seed."""
        import hashlib

        h = hashlib.sha256(self.tokens.numpy().tobytes())
        h.update(self.successors.numpy().tobytes())
        return h.hexdigest()[:16]

    def entropy(self) -> float:
        """Entropy of one transition in nats (the lowest reachable average loss per predicted token)."""
        return -sum(p * math.log(p) for p in self.probs)

    # ------------------------------------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        """The chain as a JSON-able dict (seed, states, vocab_size, probs, fingerprint)."""
        return {"seed": int(self.seed), "states": int(self.states), "vocab_size": int(self.vocab_size),
                "probs": list(self.probs), "fingerprint": self.fingerprint()}

    @classmethod
    def from_json(cls, src: str | os.PathLike[str] | Mapping[str, Any]) -> MarkovChain:
        """Rebuild a chain from :meth:`to_json`'s dict, a ``markov.json`` path, or a checkpoint folder holding one.

        Extra keys (e.g. the training metadata of ``markov.json``) are ignored.

        Raises:
            ValueError: the file is missing or not JSON, a key is missing or invalid, or the fingerprint does not
                match the rebuilt chain (this torch draws a different chain from the same seed); the message names
                the file.
        """
        where = "<dict>"
        if isinstance(src, Mapping):
            d: Any = src
        else:
            path = os.fspath(src)
            if os.path.isdir(path):
                path = os.path.join(path, MARKOV_FILE)
            where = path
            if not os.path.isfile(path):
                raise ValueError(f"{path}: no such file (a checkpoint from scripts/train_markov_checkpoint.py has "
                                 f"{MARKOV_FILE}; use --prompts random for other checkpoints)")
            try:
                with open(path) as f:
                    d = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from e
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        try:
            chain = cls(seed=int(d["seed"]), states=int(d["states"]), vocab_size=int(d["vocab_size"]),
                        probs=tuple(float(p) for p in d.get("probs", TRANSITION_PROBS)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a Markov chain description ({type(e).__name__}: {e})") from e
        fp = d.get("fingerprint")
        if fp is not None and fp != chain.fingerprint():
            raise ValueError(f"{where}: fingerprint {fp} != {chain.fingerprint()} of the chain rebuilt by torch "
                             f"{torch.__version__} (its RNG draws a different chain from seed {chain.seed})")
        return chain


# ----------------------------------------------------------------------------------------------- training
def lr_factor(step: int, steps: int, warmup_frac: float = 0.1) -> float:
    """Learning-rate multiplier of 0-based ``step`` of ``steps``: linear warm-up over the first ``warmup_frac``
    of the steps (from 1/warmup to 1), then cosine decay from 1 towards 0 (reached after the last step)."""
    warmup = max(1, int(round(warmup_frac * steps)))
    if step < warmup:
        return (step + 1) / warmup
    rest = max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / rest))


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, a no-op context elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def evaluate(model: Any, chain: MarkovChain, batch: int, seq_len: int, seed: int, device: torch.device
             ) -> dict[str, float]:
    """Statistics of the model's next-token predictions on a held-out batch of walks.

    Args:
        model: a causal LM (``model(input_ids).logits`` is ``[batch, seq_len, vocab]``).
        chain: the chain the walks are drawn from.
        batch, seq_len: the held-out batch's shape.
        seed: seed of the held-out batch (different from the training seed).
        device: where the model is; bf16 autocast on CUDA, as in training.

    Returns:
        loss (nats per predicted token), top1_prob (mean softmax probability of the argmax, over every position
        that has a target), margin (mean top1 - top2 logit gap, logits in float32), chain_top1_acc (fraction of
        positions whose argmax is the chain's most likely successor of the current token), margin_lt_0p1
        (fraction of positions with a gap below 0.1, where bf16 rounding could flip greedy decoding).
    """
    was_training = model.training
    model.eval()
    ids_cpu = chain.sample(batch, seq_len, torch.Generator().manual_seed(seed))
    ids = ids_cpu.to(device)
    with _autocast(device):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    logits = out.logits[:, :-1].float()  # positions with a target
    top2 = logits.topk(2, dim=-1).values
    probs_top1 = torch.softmax(logits, dim=-1).amax(dim=-1)
    margin = top2[..., 0] - top2[..., 1]
    best_next = chain.successor_tokens()[chain.state_of(ids_cpu[:, :-1]), 0].to(device)
    acc = (logits.argmax(dim=-1) == best_next).float().mean()
    model.train(was_training)
    return {"loss": float(out.loss), "top1_prob": float(probs_top1.mean()), "margin": float(margin.mean()),
            "chain_top1_acc": float(acc), "margin_lt_0p1": float((margin < 0.1).float().mean())}


def train(model: Any, chain: MarkovChain, steps: int, batch: int, seq_len: int, lr: float, seed: int,
          device: torch.device, log_every: int = 25) -> dict[str, Any]:
    """Train ``model`` in place on walks of ``chain`` with its causal-LM loss.

    AdamW (betas (0.9, 0.95), weight decay 0), :func:`lr_factor` schedule, gradient-norm clip 1.0, bf16 autocast
    on CUDA. Each step's batch is drawn on the CPU from one generator seeded with ``seed`` (the data do not
    depend on the device).

    Args:
        model: a float32 ``transformers`` causal LM on ``device``.
        chain: the corpus.
        steps: optimizer steps (>= 1).
        batch, seq_len: walks per step and tokens per walk (>= 2).
        lr: peak learning rate.
        seed: data seed.
        device: the model's device.
        log_every: print the loss every this many steps (and at the first and last step).

    Returns:
        initial_loss / final_loss (the first and last step's training loss, nats per token), final_loss_avg10
        (mean of the last 10 steps), losses (every step's loss), tokens_seen, train_seconds.

    Raises:
        ValueError: invalid sizes; FloatingPointError: a non-finite loss.
    """
    if steps < 1 or batch < 1 or seq_len < 2:
        raise ValueError(f"need steps >= 1, batch >= 1, seq_len >= 2; got {steps}, {batch}, {seq_len}")
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() lists a tied weight once
    opt_kw: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, **opt_kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        ids = chain.sample(batch, seq_len, gen).to(device, non_blocking=True)
        with _autocast(device):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        step_lr = sched.get_last_lr()[0]  # the rate of this step's update
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())  # one sync per step: negligible next to a 0.6B forward + backward
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} at step {step}")
        losses.append(value)
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}/{steps}: loss {value:.4f}  grad-norm {float(gnorm):.3f}  "
                  f"lr {step_lr:.2e}  {time.perf_counter() - t0:.1f} s", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tail = losses[-10:]
    return {"initial_loss": losses[0], "final_loss": losses[-1], "final_loss_avg10": sum(tail) / len(tail),
            "losses": losses, "tokens_seen": steps * batch * seq_len,
            "train_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------- saving
def source_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype named by a config.json dict (``torch_dtype`` or ``dtype``); bfloat16 when absent or unknown."""
    name = config.get("torch_dtype") or config.get("dtype")
    return DTYPES.get(str(name).replace("torch.", ""), torch.bfloat16)


def copy_tokenizer_files(src: str, out: str) -> list[str]:
    """Copy every plain file of ``src`` that is not weights, a weight index, config.json or markov.json
    (tokenizer files, generation_config.json, ...) into ``out``; returns the copied names, sorted."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name in _NOT_COPIED_NAMES or name.endswith(_NOT_COPIED_SUFFIXES):
            continue
        shutil.copyfile(path, os.path.join(out, name))
        copied.append(name)
    return copied


def save_checkpoint(model: Any, src: str, out: str, dtype: torch.dtype) -> list[str]:
    """Save ``model`` in ``dtype`` as safetensors into ``out`` with the source's config and tokenizer files.

    The written config.json is save_pretrained's, updated with every key of the source's config.json (so it
    keeps e.g. the top-level ``rope_theta`` of make_qwen3_06b_checkpoint.py) and with ``dtype`` (and
    ``torch_dtype`` when the source had that key) set to ``dtype``. Old ``model*.safetensors*`` files in ``out``
    are removed first. The model is converted to ``dtype`` in place.

    Returns:
        The names of the files copied from ``src`` (see :func:`copy_tokenizer_files`).
    """
    os.makedirs(out, exist_ok=True)
    for old in glob.glob(os.path.join(out, "model*.safetensors*")) + glob.glob(os.path.join(out, "pytorch_model*")):
        os.remove(old)
    model.to(dtype)
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:  # transformers 4.x/5.x
        kwargs["safe_serialization"] = True
    model.save_pretrained(out, **kwargs)
    with open(os.path.join(src, "config.json")) as f:
        src_cfg = json.load(f)
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(src_cfg)
    name = str(dtype).replace("torch.", "")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return copy_tokenizer_files(src, out)


def verify_saved(out: str, dtype: torch.dtype) -> dict[str, Any]:
    """Reload ``out`` with transformers (on the CPU, in ``dtype``) and check it.

    Returns:
        tied (lm_head shares embed_tokens' storage), lm_head_equals_embed (equal values).

    Raises:
        RuntimeError: the config asks for tied embeddings but lm_head differs from embed_tokens, or a parameter
            has another dtype than ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    emb = m.get_input_embeddings().weight
    head = m.get_output_embeddings().weight
    equal = bool(torch.equal(emb, head))
    tied_cfg = bool(getattr(m.config, "tie_word_embeddings", False))
    if tied_cfg and not equal:
        raise RuntimeError(f"{out}: tie_word_embeddings=True but lm_head.weight != embed_tokens.weight after reload")
    bad = sorted({str(p.dtype) for p in m.parameters()} - {str(dtype)})
    if bad:
        raise RuntimeError(f"{out}: parameters in {bad}, expected {dtype}")
    return {"tied": head.data_ptr() == emb.data_ptr(), "lm_head_equals_embed": equal,
            "tie_word_embeddings": tied_cfg}


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
