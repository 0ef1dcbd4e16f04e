"""Tensor parallelism across processes: rank 0 (this process) drives, ranks 1..N-1 (spawned workers) follow.

Every rank holds a full :class:`~nanovllm.engine.model_runner.ModelRunner` over its shard of the weights (the layers
split themselves by ``tp_rank()`` / ``tp_size()``, read from ``torch.distributed``'s default group). Per step, rank 0
sends the scheduled batch to every worker over a ``multiprocessing`` pipe, then all ranks run
``ModelRunner.run(seqs, is_prefill)`` together, so their collectives (inside the model) line up; only rank 0 samples.

Data plane: ``torch.distributed`` (NCCL on GPUs, rank r on ``cuda:r``; gloo on the CPU), rendezvous over
``tcp://127.0.0.1:<free port>``. Control plane: one duplex ``Pipe`` per worker (pickled :class:`_StepMsg`).

Lifecycle and failure handling (no hangs, no leaked processes):

- start: workers send ``started`` before ``init_process_group``, ``loaded`` after loading their weights (before any
  collective), then wait for ``go``; rank 0 sends ``go`` only once every rank has loaded, so a failed load anywhere is
  reported over the pipes and never leaves a rank blocked inside a collective. ``ready`` closes the handshake after
  KV-cache allocation (an all-reduce) and CUDA-graph capture. Every wait has a timeout and watches the workers'
  liveness; a worker's exception comes back as its traceback and is raised in the parent as :class:`TPWorkerError`.
- steps: a worker that raises sends its traceback and exits; rank 0's pending collective then fails (gloo: the peer
  closed its socket; NCCL: a monitor thread aborts the process group when a worker dies) and the parent raises
  :class:`TPWorkerError`. The runner is unusable afterwards (its ranks are out of step) and shuts itself down.
- shutdown (explicit, ``atexit``, ``__del__``): send ``shutdown``, destroy the process group, join each worker with
  a timeout, then terminate / kill stragglers. Workers exit on their own when the pipe closes or when their parent
  process disappears (a watchdog thread polls ``os.getppid()``), even while blocked inside a collective.

Only one tensor-parallel engine can be live per process (``torch.distributed`` has one default group); engines in
different processes on one host do not collide, each rendezvous is on its own free port.
"""
from __future__ import annotations

import atexit
import datetime
import os
import pickle
import signal
import socket
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanovllm.config import Config
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_runner import PendingRound

if TYPE_CHECKING:
    from nanovllm.engine.model_runner import ModelRunner

#: seconds shutdown() waits for a worker to exit before terminating it.
SHUTDOWN_JOIN_S = 10.0


class TPWorkerError(RuntimeError):
    """A tensor-parallel worker failed (its traceback is in the message) or died."""


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- what crosses the control plane per step ---------------------------------------------------------------------
class _TokenTail:
    """The last tokens of a sequence, indexed as if it were the whole ``token_ids`` list (``tail[start:end]``).

    A prefill chunk reads ``token_ids[num_computed_tokens:num_computed_tokens + num_scheduled_tokens]`` only, so
    rank 0 sends that slice and this view serves it at its absolute offsets.
    """

    __slots__ = ("offset", "data")

    def __init__(self, offset: int, data: list[int]) -> None:
        self.offset, self.data = offset, data

    def __getitem__(self, key: slice | int) -> Any:
        if isinstance(key, slice):
            start = self.offset if key.start is None else key.start
            stop = self.offset + len(self.data) if key.stop is None else key.stop
            if start < self.offset or key.step not in (None, 1):
                raise IndexError(f"token slice {key} reaches before the sent tail (offset {self.offset})")
            return self.data[start - self.offset:stop - self.offset]
        if key < 0:
            return self.data[key]
        return self.data[key - self.offset]


class _SeqView:
    """What ``ModelRunner.run`` reads of a :class:`Sequence` on a rank that does not sample.

    Prefill: the chunk's token ids, ``num_computed_tokens``, ``num_scheduled_tokens``, ``num_cached_tokens``, the
    length and the block table. Decode: the last token, the length and the block table.
    """

    __slots__ = ("token_ids", "num_computed_tokens", "num_scheduled_tokens", "num_cached_tokens", "block_table",
                 "length", "last_token", "sampling_params")

    def __init__(self, seq: Sequence, is_prefill: bool) -> None:
        start = seq.num_computed_tokens
        if is_prefill:
            self.token_ids: _TokenTail | None = _TokenTail(start, seq.token_ids[start:start + seq.num_scheduled_tokens])
        else:
            self.token_ids = None
        self.num_computed_tokens = start
        self.num_scheduled_tokens = seq.num_scheduled_tokens
        self.num_cached_tokens = seq.num_cached_tokens
        self.block_table = seq.block_table  # pickled at once, so no copy is needed
        self.length = len(seq)
        self.last_token = seq.token_ids[-1]
        self.sampling_params = None

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> tuple:
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state: tuple) -> None:
        for s, v in zip(self.__slots__, state):
            setattr(self, s, v)


@dataclass
class _StepMsg:
    """One command from rank 0: ``op`` is "run" (with ``seqs`` and ``is_prefill``), "go" or "shutdown"."""

    op: str
    seqs: list[_SeqView] = field(default_factory=list)
    is_prefill: bool = False


# ---- the worker process ------------------------------------------------------------------------------------------
def _watch_parent(parent_pid: int) -> None:
    """Exit this worker as soon as its parent is gone (even if the main thread is blocked in a collective)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


def _init_group(config: Config, rank: int, world: int, init_method: str, timeout_s: float) -> None:
    """Join the group: NCCL with rank r on ``cuda:r``, or gloo on the CPU; collectives time out after ``timeout_s``."""
    backend = "nccl" if config.device == "cuda" else "gloo"
    if config.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, world_size=world, rank=rank,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _worker_main(config: Config, rank: int, world: int, init_method: str, conn: Connection, parent_pid: int,
                 pg_timeout_s: float, num_threads: int) -> None:
    """Rank ``rank`` >= 1: join the group, build the runner, then run every step rank 0 sends until shutdown."""
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="tp-parent-watch").start()
    # Ctrl-C reaches the whole process group: let rank 0 handle it (its shutdown stops us), no traceback per rank
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = 0
    try:
        if config.device == "cpu" and num_threads > 0:
            torch.set_num_threads(num_threads)
        from nanovllm.engine.model_runner import ModelRunner

        conn.send(("started", rank))
        _init_group(config, rank, world, init_method, pg_timeout_s)

        def loaded() -> None:
            conn.send(("loaded", rank))
            msg = conn.recv()
            if msg.op != "go":
                raise SystemExit(0)  # rank 0 gave up (it or another worker failed to load)

        runner = ModelRunner(config, on_loaded=loaded)
        conn.send(("ready", config.num_kvcache_blocks))
        while True:
            msg = conn.recv()
            if msg.op == "run":
                runner.run(msg.seqs, msg.is_prefill)
            elif msg.op == "shutdown":
                break
    except (EOFError, BrokenPipeError, ConnectionResetError, SystemExit):
        pass  # the parent closed the pipe or told us to stop
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt, then exit
        code = 1
        try:
            conn.send(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        except (OSError, EOFError):
            pass
    finally:
        if code == 0 and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        try:
            conn.close()
        except OSError:
            pass
    if code:
        # skip interpreter teardown: a failed rank must not block on a half-finished collective's threads
        os._exit(code)
    # a clean exit runs finalizers (Inductor's compile pool releases its semaphores; os._exit would leak them)


# ---- rank 0 ------------------------------------------------------------------------------------------------------
def _shutdown_ref(ref: "weakref.ref[TensorParallelRunner]") -> None:
    runner = ref()
    if runner is not None:
        runner.shutdown()


def _monitor(ref: "weakref.ref[TensorParallelRunner]", sentinels: list[int], stopping: threading.Event,
             abort_group: bool) -> None:
    """Rank 0's watchdog: if a worker dies while the runner is live, mark the runner broken and, on NCCL, abort the
    process group so rank 0 cannot block in a collective until the timeout.

    gloo already fails a pending collective when a peer's socket closes; NCCL would wait for its timeout, so the
    group is aborted (``_abort_process_group``, torch >= 2.6; otherwise the timeout still bounds the wait).
    """
    while not stopping.is_set():
        try:
            dead = wait(sentinels, timeout=0.5)
        except (OSError, ValueError):
            return
        if not dead or stopping.is_set():
            continue
        runner = ref()
        if runner is not None:
            names = [p.name for p in runner.workers if p.sentinel in dead]
            runner._broken = runner._broken or f"tensor-parallel worker(s) {names} exited unexpectedly"
            del runner
        if abort_group:
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                try:
                    abort()
                except Exception:  # noqa: BLE001 - best effort, the pg timeout is the backstop
                    pass
        return


class TensorParallelRunner:
    """Runs one model over ``config.tensor_parallel_size`` processes; implements
    :class:`~nanovllm.engine.step_runner.StepRunner`, like ``ModelRunner``.

    Args:
        config: the engine configuration; ``num_kvcache_blocks`` is filled in (the minimum over the ranks).

    Raises:
        RuntimeError: a process group is already initialized in this process (another live TP engine).
        TPWorkerError: a worker failed or died while starting (its traceback is in the message), or a handshake
            timed out.
        Any exception rank 0's own ``ModelRunner`` raises while loading.
    """

    def __init__(self, config: Config) -> None:
        if dist.is_available() and dist.is_initialized():
            raise RuntimeError("a torch.distributed process group is already initialized in this process: only one "
                               "tensor-parallel engine can be live per process; shutdown() the other one first")
        self.config = config
        self.world = config.tensor_parallel_size
        self.rank = 0
        self.workers: list[mp.Process] = []
        self.conns: list[Connection] = []
        self.runner: ModelRunner | None = None
        self._closed = False
        self._broken: str | None = None
        self._released = False  # every rank loaded its weights and got "go"
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.pg_timeout_s = float(config.tp_timeout_s)  # a collective's wait for a peer (also bounds rendezvous)
        self.start_timeout_s = float(config.tp_start_timeout_s)  # each phase of the start-up handshake
        for key, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                           ("NVSHMEM_DISABLE_NVLS", "1")):
            os.environ.setdefault(key, value)
        self._atexit = lambda ref=weakref.ref(self): _shutdown_ref(ref)
        atexit.register(self._atexit)
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    # ---- start -------------------------------------------------------------------------------------------------
    def _start(self) -> None:
        cfg = self.config
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        threads = max(1, (os.cpu_count() or 1) // self.world) if cfg.device == "cpu" else 0
        ctx = mp.get_context("spawn")
        for rank in range(1, self.world):
            parent_end, child_end = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_worker_main, name=f"nanovllm-tp{rank}", daemon=True,
                            args=(cfg, rank, self.world, init_method, child_end, os.getpid(), self.pg_timeout_s,
                                  threads))
            p.start()
            child_end.close()
            self.workers.append(p)
            self.conns.append(parent_end)
        self._expect("started")
        _init_group(cfg, 0, self.world, init_method, self.pg_timeout_s)
        # the thread holds only a weak reference, so dropping the engine still runs __del__ -> shutdown()
        threading.Thread(target=_monitor, args=(weakref.ref(self), [p.sentinel for p in self.workers],
                                                self._stopping, cfg.device == "cuda"),
                         daemon=True, name="tp-monitor").start()
        from nanovllm.engine.model_runner import ModelRunner

        try:
            self.runner = ModelRunner(cfg, on_loaded=self._release_workers)
        except TPWorkerError:
            raise
        except BaseException as e:
            # Before the handshake rank 0 failed on its own (e.g. a bad checkpoint): re-raise its error as is.
            # After it, a worker that failed inside a collective (KV sizing, graph capture) may be the cause.
            errors = self._collect_errors() if self._released else ""
            if errors:
                raise TPWorkerError(f"tensor-parallel worker failed while starting:\n{errors}\n"
                                    f"rank 0: {type(e).__name__}: {e}") from e
            raise
        self._expect("ready")

    def _release_workers(self) -> None:
        """Rank 0 has loaded its weights: wait until every worker has too, then let all enter the collectives."""
        self._expect("loaded")
        for c in self.conns:
            c.send(_StepMsg("go"))
        self._released = True

    def _expect(self, what: str) -> list[Any]:
        """Receive message ``what`` from every worker, raising on an error report, a death or the start timeout."""
        deadline = time.monotonic() + self.start_timeout_s
        pending = dict(zip(self.conns, self.workers))
        got: list[Any] = []
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                ranks = sorted(self.conns.index(c) + 1 for c in pending)
                raise TPWorkerError(f"tensor-parallel start: no {what!r} from rank(s) {ranks} within "
                                    f"{self.start_timeout_s:.0f} s (tp_start_timeout_s)")
            ready = wait(list(pending) + [p.sentinel for p in pending.values()], timeout=min(left, 1.0))
            for c, p in list(pending.items()):
                if c in ready:
                    try:
                        kind, payload = c.recv()
                    except (EOFError, OSError):
                        kind, payload = "error", f"{p.name} closed its pipe (exit code {p.exitcode})"
                    if kind == "error":
                        raise TPWorkerError(f"tensor-parallel worker failed while starting ({what}):\n{payload}")
                    if kind != what:
                        raise TPWorkerError(f"tensor-parallel start: expected {what!r}, got {kind!r} from {p.name}")
                    got.append(payload)
                    del pending[c]
                elif p.sentinel in ready and not c.poll():
                    p.join(0.1)
                    raise TPWorkerError(f"tensor-parallel worker {p.name} died while starting ({what}), "
                                        f"exit code {p.exitcode}")
        return got

    # ---- steps -------------------------------------------------------------------------------------------------
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int | None]:
        """Broadcast the step to the workers and run it on rank 0; see ``ModelRunner.run``.

        Raises:
            TPWorkerError: a worker failed (its traceback is in the message) or died, or the runner was shut down
                or broken by an earlier failure.
        """
        if self._closed or self._broken:
            raise TPWorkerError(self._broken or "the tensor-parallel runner is shut down")
        payload = pickle.dumps(_StepMsg("run", [_SeqView(s, is_prefill) for s in seqs], is_prefill),
                               protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for c in self.conns:
                c.send_bytes(payload)
            return self.runner.run(seqs, is_prefill)
        except BaseException as e:
            msg = self._collect_errors() or self._broken or f"rank 0: {type(e).__name__}: {e}"
            self._broken = msg
            self.shutdown()
            raise TPWorkerError(f"tensor-parallel step failed; the engine must be recreated:\n{msg}") from e

    def _collect_errors(self, wait_s: float = 2.0) -> str:
        """Worker error reports that arrived (or arrive within ``wait_s``), joined; '' if none."""
        errors: list[str] = []
        deadline = time.monotonic() + wait_s
        for c, p in zip(self.conns, self.workers):
            try:
                while c.poll(max(0.0, deadline - time.monotonic())):
                    kind, payload = c.recv()
                    if kind == "error":
                        errors.append(payload)
                        break
            except (EOFError, OSError, pickle.UnpicklingError):
                if p.exitcode not in (None, 0):
                    errors.append(f"{p.name} exited with code {p.exitcode}")
        return "\n".join(errors)

    # ---- the rest of the StepRunner interface ------------------------------------------------------------------
    @property
    def supports_multi_step(self) -> bool:
        """False: the workers follow single steps, so the engine never asks for a multi-step round."""
        return False

    def run_decode_steps(self, seqs: list[Sequence], num_steps: int) -> list[list[int]]:
        """Not supported under tensor parallelism (:attr:`supports_multi_step` is False).

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError("multi-step decode runs only without tensor parallelism")

    def launch_decode_steps(self, seqs: list[Sequence], num_steps: int, after: PendingRound | None = None
                            ) -> PendingRound:
        """Not supported under tensor parallelism (:attr:`supports_multi_step` is False).

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError("multi-step decode runs only without tensor parallelism")

    def collect_decode_steps(self, pending: PendingRound) -> list[list[int]]:
        """Not supported under tensor parallelism (:attr:`supports_multi_step` is False).

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError("multi-step decode runs only without tensor parallelism")

    def reset_step_state(self) -> None:
        """Nothing to forget: a step that raises breaks the runner (:meth:`run` shuts it down and every later step
        raises :class:`TPWorkerError`), so no step runs on the state it left."""

    @property
    def kv_cache(self) -> torch.Tensor:
        """Rank 0's KV cache (its shard of the kv heads).

        Raises:
            TPWorkerError: the runner is shut down.
        """
        if self.runner is None:
            raise TPWorkerError("the tensor-parallel runner is shut down")
        return self.runner.kv_cache

    # ---- shutdown ----------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the workers and destroy the process group. Idempotent; bounded by ~``SHUTDOWN_JOIN_S`` seconds."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stopping.set()
        try:
            atexit.unregister(self._atexit)
        except Exception:  # noqa: BLE001
            pass
        for c in self.conns:
            try:
                c.send(_StepMsg("shutdown"))
            except (OSError, EOFError, ValueError):
                pass
        self.runner = None
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the group may be aborted already
                pass
        deadline = time.monotonic() + SHUTDOWN_JOIN_S
        for p in self.workers:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.workers:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass
