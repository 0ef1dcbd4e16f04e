"""``python -m nanovllm``: bad flags end with one stderr line and exit code 2 before any model is built, --help
documents defaults and choices, and the timing lines keep engine start out of tokens/s.

In process (``main(argv)``), with ``LLM`` and the default-model builder replaced by tripwires where a case must
stop before them; one real run on the tiny checkpoint checks the output lines.
"""
from __future__ import annotations

import argparse
import re

import pytest

import nanovllm.__main__ as cli
from nanovllm.cli_args import CliParser, add_engine_arguments, engine_kwargs
from nanovllm.config import SEED_MAX

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def tripwire(monkeypatch) -> None:  # noqa: ANN001
    """Building or converting any model fails the test."""
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built before the flags were checked")

    monkeypatch.setattr(cli, "LLM", boom)
    monkeypatch.setattr(cli, "default_model", boom)


BAD_FLAGS = [
    (["--prompt", ""], "argument --prompt: must not be empty"),
    (["--prompt", "ok", "--prompt", "   "], "argument --prompt: must not be empty"),
    (["--max-tokens", "0"], r"argument --max-tokens: must be >= 1, got 0"),
    (["--max-tokens", "ten"], r"argument --max-tokens: expected an integer, got 'ten'"),
    (["--temperature", "-1"], r"argument --temperature: must be >= 0 and finite in float32 \(at most 3.40282e\+38\), got -1"),
    (["--temperature", "nan"], r"argument --temperature: must be >= 0 and finite"),
    (["--temperature", "1e39"], r"argument --temperature: must be >= 0 and finite"),
    (["--top-p", "0"], r"argument --top-p: must be in \(0, 1\], got 0"),
    (["--top-p", "1.5"], r"argument --top-p: must be in \(0, 1\]"),
    (["--top-k", "0"], r"argument --top-k: must be >= 1 or -1, got 0"),
    (["--device", "tpu"], r"argument --device: invalid choice: 'tpu'"),
    (["--dtype", "fp8"], r"argument --dtype: invalid choice: 'fp8'"),
    (["--max-model-len", "1"], r"argument --max-model-len: must be >= 2, got 1"),
    (["--max-num-seqs", "0"], r"argument --max-num-seqs: must be >= 1"),
    (["--max-num-batched-tokens", "-5"], r"argument --max-num-batched-tokens: must be >= 1"),
    (["--tensor-parallel-size", "0"], r"argument --tensor-parallel-size: must be >= 1"),
    (["--kvcache-block-size", "12"], r"argument --kvcache-block-size: must be a power of two, got 12"),
    (["--num-kvcache-blocks", "0"], r"argument --num-kvcache-blocks: must be >= 1 or -1, got 0"),
    (["--gpu-memory-utilization", "0"], r"argument --gpu-memory-utilization: must be in \(0, 1\]"),
    (["--gpu-memory-utilization", "1.2"], r"argument --gpu-memory-utilization: must be in \(0, 1\]"),
    (["--num-scheduler-steps", "65"], r"argument --num-scheduler-steps: must be in \[1, 64\], got 65"),
    (["--seed", str(SEED_MAX + 1)], r"argument --seed: must be in \[-9223372036854775808, 18446744073709551615\]"),
    (["--seed", "1.5"], r"argument --seed: expected an integer"),
    (["--model", "/no/such/folder"], r"argument --model: checkpoint folder '/no/such/folder' does not exist"),
    (["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a)[:40] for a, _ in BAD_FLAGS])
def test_bad_flag_gives_one_stderr_line_and_exit_2(tripwire, capsys, argv: list[str],  # noqa: ANN001
                                                   message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nanovllm: error: ") and re.search(message, lines[0]), lines[0]


def test_model_folder_without_config_json(tripwire, capsys, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"nanovllm: error: argument --model: {str(tmp_path)!r} holds no config.json " \
                                      f"(not a Hugging Face checkpoint folder)\n"


def test_error_from_the_engine_is_one_line_too(capsys, tmp_path) -> None:  # noqa: ANN001
    """A checkpoint the flags cannot judge (an unsupported architecture): the engine's ValueError, one line."""
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(r"^nanovllm: error: model: architecture .* is not supported", err)


def test_help_shows_defaults_choices_and_the_cache_folder(capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrap the formatter's lines
    assert re.search(r"--max-tokens\b[^\n]*?\(default: 96 for the default model's built-in prompts, 32 otherwise\)$",
                     text.split(" --temperature")[0]), text
    for flag, default in [("--temperature", "0.0"), ("--top-p", "1.0"), ("--top-k", "-1"),
                          ("--max-model-len", "1024"), ("--dtype", "auto"), ("--seed", "0"),
                          ("--max-num-seqs", "512"), ("--kvcache-block-size", "16"), ("--num-kvcache-blocks", "-1"),
                          ("--gpu-memory-utilization", "0.9"), ("--compile-fusion", "False")]:
        assert re.search(rf"{flag}\b[^\n]*?\(default: {re.escape(default)}\)", text), flag
    assert "--dtype {auto,bfloat16,float16,float32}" in text and "--device {cuda,cpu}" in text
    assert "NANOVLLM_CACHE" in text and "max_position_embeddings" in text
    assert "python -m nanovllm serve --help" in text  # the server subcommand can be found from --help
    assert "the checkpoint's dtype on CUDA, float32 on the CPU" in text


@pytest.mark.parametrize("argv, expected", [
    ([], 96), (["--prompt", "hi"], 32), (["--max-tokens", "5"], 5), (["--model", "CKPT"], 32),
    (["--model", "CKPT", "--max-tokens", "200"], 200)])
def test_max_tokens_default_depends_on_the_prompts(tiny_ckpt: str, argv: list[str], expected: int) -> None:
    args = cli.build_parser().parse_args([tiny_ckpt if a == "CKPT" else a for a in argv])
    assert cli.max_tokens(args) == expected


def test_engine_arguments_reusable_by_another_command() -> None:
    """A subcommand (the server's) gets the same flags and LLM keywords from add_engine_arguments/engine_kwargs."""
    parser = CliParser(prog="serve")
    add_engine_arguments(parser, max_model_len=2048)
    args = parser.parse_args(["--device", "cpu", "--num-kvcache-blocks", "64", "--enforce-eager"])
    kw = engine_kwargs(args)
    assert kw["device"] == "cpu" and kw["num_kvcache_blocks"] == 64 and kw["enforce_eager"] is True
    assert kw["max_model_len"] == 2048 and kw["seed"] == 0 and "model" not in kw
    assert isinstance(parser, argparse.ArgumentParser) and args.model is None


def test_run_prints_start_and_generation_lines(tiny_ckpt: str, capsys) -> None:  # noqa: ANN001
    cli.main(["--model", tiny_ckpt, "--device", "cpu", "--max-tokens", "3", "--prompt", "hello", "--prompt",
              "a paged KV cache", "--max-model-len", "128", "--num-kvcache-blocks", "16"])
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln]
    start = next(ln for ln in lines if ln.startswith("engine ready in "))
    assert re.search(r"\(load [\d.]+ s, .*trial run [\d.]+ s; device cpu, 16 KV blocks of 16 tokens\)$", start), start
    assert "fused" not in start
    gen = lines[-1]
    assert re.fullmatch(r"generation: 2 requests, 6 output tokens in [\d.]+ s \([\d.]+ tokens/s; engine start "
                        r"excluded\)", gen), gen
    assert lines.index(start) < lines.index(gen)
    assert sum(ln.startswith("Completion (length, 3 tokens)") for ln in lines) == 2


def test_start_line_counts_fused_sites() -> None:
    class Runner:
        init_seconds = {"load": 1.0, "kv_cache": 2.0, "warm_up": 0.5}

    class Cfg:
        device, num_kvcache_blocks, kvcache_block_size = "cuda", 100, 16

    class Fake:
        config = Cfg()
        engine = type("E", (), {"model_runner": Runner()})()

    line = cli.start_line(Fake(), 10.0, 3.0, 57)  # type: ignore[arg-type]
    assert line == ("engine ready in 10.0 s (load 1.0 s, kv_cache 2.0 s, warm_up 0.5 s, trial run 3.0 s; device "
                    "cuda, 100 KV blocks of 16 tokens, 57 RMSNorm -> Linear sites fused)")
    assert "runs no pass" in cli.start_line(Fake(), 10.0, 3.0, 0)  # type: ignore[arg-type]


def test_compile_fusion_run_reports_the_pass_count(tiny_ckpt: str, capsys, monkeypatch) -> None:  # noqa: ANN001
    """The wiring of --compile-fusion: the pass's counter is reset before the build and read after the warm-up
    (the compile itself is covered by tests/test_engine_fusion.py; here the engine runs eagerly)."""
    import fusion_pass

    calls = []
    monkeypatch.setattr(fusion_pass, "reset_stats", lambda: calls.append("reset"))
    monkeypatch.setattr(fusion_pass, "fused_site_count", lambda: calls.append("count") or 7)
    real_llm = cli.LLM
    monkeypatch.setattr(cli, "LLM", lambda model, **kw: calls.append(("build", kw["compile_fusion"]))
                        or real_llm(model, **{**kw, "compile_fusion": False}))
    cli.main(["--model", tiny_ckpt, "--device", "cpu", "--max-tokens", "2", "--prompt", "x", "--compile-fusion",
              "--max-model-len", "64", "--num-kvcache-blocks", "8"])
    start = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("engine ready"))
    assert start.endswith(", 7 RMSNorm -> Linear sites fused)")
    assert calls == ["reset", ("build", True), "count"]
