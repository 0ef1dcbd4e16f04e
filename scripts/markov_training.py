"""Training a causal LM on walks of a :class:`markov_chain.MarkovChain`: the learning-rate schedule, the training
loop (AdamW, warm-up + cosine, gradient clipping, bf16 autocast on CUDA) and held-out statistics of the model's
next-token predictions (loss, top-1 probability, top1-top2 logit margin, agreement with the chain).

Used by ``scripts/train_markov_checkpoint.py`` (with scripts/ on ``sys.path``).
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from markov_chain import MarkovChain


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
