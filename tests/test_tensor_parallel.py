"""Issue 7: tensor parallelism across processes (gloo on the CPU).

TP=2 must give the same greedy tokens as TP=1 (eager and with the coconut fusion pass), survive preemption, start
and stop cleanly (workers gone within a bounded time after shutdown or after rank 0 dies), run engines one after
another and side by side, and turn a worker's failure into an exception in the parent instead of a hang.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.engine import tp_runner
from nanovllm.engine.tp_runner import TensorParallelRunner, TPWorkerError

LENGTHS = [1, 7, 16, 33, 64, 129]  # 6 prompts, including several chunks of 16-token blocks
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
KW = dict(device="cpu", kvcache_block_size=16, max_model_len=512)
EXIT_WITHIN_S = 15.0


def _pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait_gone(pids: list[int], within_s: float = EXIT_WITHIN_S) -> list[int]:
    """The pids still running after ``within_s`` seconds (polling)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if not _pid_gone(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if not _pid_gone(p)]


def _faulty_worker(fault: str, config, rank: int, world: int, *args) -> None:  # noqa: ANN001
    """The worker's entry point with a fault injected on the last rank ("load": right after loading its weights,
    "step": in its first step). Runs in the spawned worker process, where it wraps the ModelRunner class that
    ``_worker_main`` imports."""
    from nanovllm.engine import model_runner

    if rank == world - 1:
        base = model_runner.ModelRunner

        class Faulty(base):  # type: ignore[misc, valid-type]
            def __init__(self, config, on_loaded=None) -> None:  # noqa: ANN001
                def fail() -> None:
                    raise RuntimeError(f"injected fault: rank {rank} fails after loading its weights")

                super().__init__(config, on_loaded=fail if fault == "load" else on_loaded)

            def run(self, seqs, is_prefill):  # noqa: ANN001, ANN201
                if fault == "step":
                    raise RuntimeError(f"injected fault: rank {rank} fails in a step")
                return super().run(seqs, is_prefill)

        model_runner.ModelRunner = Faulty
    tp_runner._worker_main(config, rank, world, *args)


def _worker_pids(llm: LLM) -> list[int]:
    runner = llm.engine.model_runner
    assert isinstance(runner, TensorParallelRunner)
    return [p.pid for p in runner.workers]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(LENGTHS, seed=1)


@pytest.fixture(scope="module")
def tp1_tokens(tiny_ckpt: str, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(tiny_ckpt, **KW)
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_tp2_equals_tp1_then_second_engine(tiny_ckpt: str, prompts, tp1_tokens) -> None:  # noqa: ANN001
    """TP=2 greedy tokens equal TP=1's; after shutdown the workers exit and a second TP engine works."""
    import torch.distributed as dist

    llm = LLM(tiny_ckpt, tensor_parallel_size=2, **KW)
    pids = _worker_pids(llm)
    assert len(pids) == 1 and all(not _pid_gone(p) for p in pids)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == tp1_tokens
    assert llm.kv_cache_usage() == 0.0
    # the KV pool is split by heads: each rank holds num_kv_heads / 2 heads of every block
    assert llm.engine.model_runner.kv_cache.shape[-2] == llm.config.hf_config.num_key_value_heads // 2
    t0 = time.monotonic()
    llm.shutdown()
    assert time.monotonic() - t0 < EXIT_WITHIN_S
    assert _wait_gone(pids) == []
    assert not dist.is_initialized()
    llm.shutdown()  # idempotent

    # one after another in the same process: a fresh rendezvous on a fresh port, same tokens; multi-step decode is
    # accepted and runs one step per round under TP (the workers follow single steps)
    llm2 = LLM(tiny_ckpt, tensor_parallel_size=2, num_scheduler_steps=4, **KW)
    pids2 = _worker_pids(llm2)
    assert set(pids2).isdisjoint(pids)
    assert [o["token_ids"] for o in llm2.generate(prompts[::-1], GREEDY, use_tqdm=False)] == tp1_tokens[::-1]
    assert llm2.stats()["decode_steps"] == llm2.stats()["decode_rounds"] > 0
    del llm2  # __del__ shuts it down too
    assert _wait_gone(pids2) == []
    assert not dist.is_initialized()


def test_tp2_preemption_equals_tp1(tiny_ckpt: str) -> None:
    """A pool of 12 blocks forces preemption (recompute) under TP; tokens equal TP=1 on the same pool."""
    batch = random_prompts([20, 25, 30, 35, 40, 22, 28, 33], seed=11)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref_llm = LLM(tiny_ckpt, num_kvcache_blocks=12, **KW)
    ref = [o["token_ids"] for o in ref_llm.generate(batch, params, use_tqdm=False)]
    llm = LLM(tiny_ckpt, tensor_parallel_size=2, num_kvcache_blocks=12, **KW)
    try:
        outs = llm.generate(batch, params, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == ref
        assert llm.stats()["num_preemptions"] > 0
        assert llm.kv_cache_usage() == 0.0
        llm.engine.block_manager.check_invariants()
    finally:
        llm.shutdown()


def test_only_one_tp_engine_per_process(tiny_ckpt: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), world_size=1, rank=0)
    try:
        with pytest.raises(RuntimeError, match="only one tensor-parallel engine"):
            LLM(tiny_ckpt, tensor_parallel_size=2, **KW)
    finally:
        dist.destroy_process_group()


def test_worker_failure_at_load_raises_in_parent(tiny_ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that raises while starting: the parent gets its traceback as TPWorkerError, no hang, no leftovers."""
    import multiprocessing

    import torch.distributed as dist

    monkeypatch.setattr(tp_runner, "_worker_main", functools.partial(_faulty_worker, "load"))
    before = {p.pid for p in multiprocessing.active_children()}
    t0 = time.monotonic()
    with pytest.raises(TPWorkerError, match="injected fault: rank 1 fails after loading"):
        LLM(tiny_ckpt, tensor_parallel_size=2, **KW)
    assert time.monotonic() - t0 < 60
    assert not dist.is_initialized()
    left = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert _wait_gone([p.pid for p in left]) == []


def test_rank0_load_failure_raises_its_error(tiny_ckpt: str, tmp_path) -> None:  # noqa: ANN001
    """A checkpoint without weights: rank 0's own ValueError comes out unchanged and no worker is left behind."""
    import multiprocessing
    import shutil

    import torch.distributed as dist

    ckpt = tmp_path / "no-weights"
    shutil.copytree(tiny_ckpt, ckpt, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ValueError, match="no \\*.safetensors file"):
        LLM(str(ckpt), tensor_parallel_size=2, **KW)
    assert not dist.is_initialized()
    left = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert _wait_gone([p.pid for p in left]) == []


def test_worker_failure_in_step_raises_in_parent(tiny_ckpt: str, prompts, monkeypatch) -> None:  # noqa: ANN001
    """A worker that raises in a step: rank 0's collective fails, the parent raises TPWorkerError with the cause."""
    import torch.distributed as dist

    monkeypatch.setattr(tp_runner, "_worker_main", functools.partial(_faulty_worker, "step"))
    llm = LLM(tiny_ckpt, tensor_parallel_size=2, **KW)
    pids = _worker_pids(llm)
    t0 = time.monotonic()
    with pytest.raises(TPWorkerError, match="injected fault: rank 1 fails in a step"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert time.monotonic() - t0 < 60
    assert _wait_gone(pids) == []
    assert not dist.is_initialized()
    assert llm.kv_cache_usage() == 0.0  # the engine dropped the requests
    with pytest.raises(TPWorkerError):
        llm.generate(prompts[:1], GREEDY, use_tqdm=False)


_CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from nanovllm import LLM, SamplingParams
    if __name__ == "__main__":
        llm = LLM({ckpt!r}, tensor_parallel_size=2, device="cpu", kvcache_block_size=16, max_model_len=512)
        out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
        print("PIDS", *[p.pid for p in llm.engine.model_runner.workers], flush=True)
        print("TOKENS", *out[0]["token_ids"], flush=True)
        time.sleep(600)  # killed by the test
""")


def test_side_by_side_and_workers_exit_when_rank0_dies(tiny_ckpt: str, tmp_path) -> None:  # noqa: ANN001
    """Two TP engines live at once on one host (another process + this one, each on its own free port); killing
    the other engine's rank 0 with SIGKILL (no shutdown, no atexit) still ends its workers."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=os.path.dirname(__file__), ckpt=tiny_ckpt))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=env)
    try:
        llm = LLM(tiny_ckpt, tensor_parallel_size=2, **KW)  # while the child's engine starts / runs
        try:
            mine = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                use_tqdm=False)[0]["token_ids"]
            lines: dict[str, list[int]] = {}
            deadline = time.monotonic() + 120
            while len(lines) < 2 and time.monotonic() < deadline:
                line = child.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    break
                key, *vals = line.split()
                lines[key] = [int(v) for v in vals]
            assert "PIDS" in lines and "TOKENS" in lines, f"child engine did not start (rc={child.poll()})"
            assert lines["TOKENS"] == mine  # both engines ran at the same time on the same host
            child_workers = lines["PIDS"]
            assert all(not _pid_gone(p) for p in child_workers)
        finally:
            llm.shutdown()
        child.kill()  # SIGKILL: no shutdown(), no atexit in rank 0
        child.wait(10)
        assert _wait_gone(child_workers) == [], "workers outlived their rank 0"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


@pytest.mark.skipif(importlib.util.find_spec("fusion_pass") is None, reason="fusion_pass (coconut) not present")
def test_tp2_compile_fusion_equals_tp1(tiny_ckpt: str, prompts, tp1_tokens, monkeypatch) -> None:  # noqa: ANN001
    """compile_fusion=True under TP=2: each rank compiles its shard with the coconut backend (fullgraph, so the
    functional collectives are inside the one graph) and the greedy tokens still equal TP=1 eager."""
    backend = pytest.importorskip("fusion_pass.backend")
    import torch._inductor.config as inductor_config

    # a cache hit would skip the pass on rank 0 and hide its site count (workers inherit the variable)
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    backend.reset_stats()
    with inductor_config.patch(fx_graph_cache=False):  # not monkeypatch: pytest >= 9.2 would delattr it
        llm = LLM(tiny_ckpt, tensor_parallel_size=2, compile_fusion=True, **KW)
        try:
            outs = llm.generate(prompts, GREEDY, use_tqdm=False)
            assert [o["token_ids"] for o in outs] == tp1_tokens
            layers = llm.config.hf_config.num_hidden_layers
            stats = backend.all_stats()
            assert stats and all(s["sites"] == 2 * layers + 1 for s in stats), stats
        finally:
            llm.shutdown()
