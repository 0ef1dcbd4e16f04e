"""The transformers peer of the throughput benchmark: ``model.generate`` on a subset of the offline workload."""
from __future__ import annotations

import time
from typing import Any

from .timing import wall_time

TEMPERATURE: float = 0.6


def run_peer(model_dir: str, prompts: list[list[int]], max_tokens: list[int], num_seqs: int,
             device: str | None = None) -> dict[str, Any]:
    """transformers ``generate`` on the first ``num_seqs`` requests as one left-padded batch.

    Settings: eager, ``attn_implementation="sdpa"``, bf16 on CUDA (float32 on the CPU), dynamic cache, sampling
    at temperature 0.6 with EOS ignored. Every row runs ``max(max_tokens)`` steps; only each request's own
    ``max_tokens`` count as output (the useful tokens).

    Returns:
        dict: output_tokens_per_s (useful tokens / s), num_seqs, subset (in words), settings, useful_output_tokens,
        seconds, load_s, transformers version, peak_gib on CUDA.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    n = min(num_seqs, len(prompts))
    sub_p, sub_m = prompts[:n], max_tokens[:n]
    cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    load_s = time.perf_counter() - t0
    width = max(len(p) for p in sub_p)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, p in enumerate(sub_p):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    gen = dict(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    new = max(sub_m)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad():
            model.generate(ids[:2, -32:], attention_mask=mask[:2, -32:], max_new_tokens=4, **gen)  # warm-up
            _, dt = wall_time(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new,
                                                     min_new_tokens=new, **gen))
    finally:
        del model
        if cuda:
            torch.cuda.empty_cache()
    useful = sum(sub_m)
    res: dict[str, Any] = {
        "output_tokens_per_s": round(useful / dt, 1), "num_seqs": n,
        "subset": f"the first {n} of the {len(prompts)} workload requests as one left-padded batch",
        "settings": f"transformers {transformers.__version__} generate, eager, sdpa, "
                    f"{str(dtype).replace('torch.', '')}, dynamic cache, temperature {TEMPERATURE}, EOS ignored; "
                    "every row runs max(max_tokens) steps, only each request's own max_tokens count",
        "useful_output_tokens": useful, "seconds": round(dt, 3), "load_s": round(load_s, 2),
    }
    if cuda:
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res
