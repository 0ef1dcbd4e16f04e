"""Compiling Triton kernels in parallel in spawned worker processes (into Triton's on-disk cache) before a
benchmark times them."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def run_in_spawned_workers(fn: Any, jobs: Sequence[Any], workers: int) -> float:
    """``fn(job)`` for every job in up to ``workers`` spawned processes (each initializes CUDA on its own): used to
    compile Triton kernels in parallel into Triton's on-disk cache before a benchmark times them. ``fn`` must be
    importable by name (a module-level function). A failure of the pool is printed, not raised: the timing loop
    then compiles whatever is missing. Returns the seconds spent."""
    t0 = time.time()
    if workers > 0 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        try:
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
                list(ex.map(fn, jobs))
        except Exception as e:  # noqa: BLE001
            print(f"[precompile] workers failed ({type(e).__name__}: {e}); compiling in this process", flush=True)
    return time.time() - t0
