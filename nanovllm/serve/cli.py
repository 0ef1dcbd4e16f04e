"""``python -m nanovllm serve``: build the engine and serve it over HTTP with uvicorn."""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's flags (``LLM(...)`` keywords, dashes for underscores; None keeps the engine's default)."""
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the main job's default model)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--kvcache-block-size", type=int, default=None)
    parser.add_argument("--num-kvcache-blocks", type=int, default=None)
    parser.add_argument("--num-scheduler-steps", type=int, default=None)
    parser.add_argument("--compile-fusion", action="store_true", help="compile with the coconut fusion backend")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible sampling)")


_ENGINE_KEYS = ("device", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                "gpu_memory_utilization", "tensor_parallel_size", "kvcache_block_size", "num_kvcache_blocks",
                "num_scheduler_steps", "compile_fusion", "enforce_eager", "seed")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``LLM(...)`` keywords given on the command line (flags left at None are left out)."""
    return {k: getattr(args, k) for k in _ENGINE_KEYS if getattr(args, k) is not None}


def default_model() -> str:
    """The main job's default model folder (built or converted on first use)."""
    try:
        from nanovllm.utils.default_model import default_model_dir
    except ImportError:  # only the embedded random-weight model is available
        from nanovllm.utils.tiny_model import build_tiny_checkpoint, default_checkpoint_dir
        return build_tiny_checkpoint(default_checkpoint_dir())
    return default_model_dir()[0]


def build_parser() -> argparse.ArgumentParser:
    """The ``serve`` subcommand's parser: server flags, then the engine's flags."""
    parser = argparse.ArgumentParser(prog="nanovllm serve", description="An OpenAI-compatible HTTP server "
                                     "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients pass (default: the model folder's name)")
    parser.add_argument("--max-waiting-requests", type=int, default=256,
                        help="requests that may wait for admission before new ones get HTTP 503")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, build the engine, serve until SIGINT / SIGTERM (then exit 0)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_waiting_requests < 1:
        parser.error(f"--max-waiting-requests must be >= 1, got {args.max_waiting_requests}")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in [1, 65535], got {args.port}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    import uvicorn

    from nanovllm import LLM
    from nanovllm.serve.app import build_app

    model = args.model or default_model()
    name = args.served_model_name or os.path.basename(os.path.normpath(model))
    t0 = time.perf_counter()
    try:  # bad flags get one line, not a traceback
        llm = LLM(model, **engine_kwargs(args))
    except (ValueError, TypeError, OSError) as e:
        parser.error(str(e))
    logging.getLogger("nanovllm.serve").info(
        "engine ready in %.1f s (device %s, %d KV blocks of %d); serving %r at http://%s:%d/v1",
        time.perf_counter() - t0, llm.config.device, llm.config.num_kvcache_blocks, llm.config.kvcache_block_size,
        name, args.host, args.port)
    app = build_app(llm.engine, name, max_waiting_requests=args.max_waiting_requests)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    finally:
        llm.shutdown()
