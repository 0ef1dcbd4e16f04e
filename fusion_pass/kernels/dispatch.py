"""The dispatcher: per shape, the fastest of the candidate paths, measured on the GPU it runs on and cached.

A site is an [M, K] x [N, K]^T product of one op, one dtype, on one GPU. On first use outside a CUDA-graph capture
each candidate path is timed inside a CUDA graph (weights rotated beyond L2) and the fastest is cached under (GPU
name, op, M bucket, N, K, dtype); while a capture runs, a shape never measured takes the op's fallback path. The
mechanism (:func:`cached_choice`) serves every op: the coconut op (``OP``: candidates are the unfused path, Triton
norm + cuBLAS, and every configuration of every fused variant of the registry whose range holds M) and the engine's
small-M linear (nanovllm/kernels/gemv/dispatch.py). The decisions can be measured ahead of time (:func:`pretune`),
saved and loaded (:func:`save_tuning`, :func:`load_tuning`): a file holds the decisions of each GPU by name, and
only the running GPU's are ever used. Each row also carries the versions that can change a decision
(:func:`versions_tag`: torch, Triton, the format of the candidate set); rows of other versions are skipped on load,
so an upgrade measures again. With the ``tuning_file`` setting, :func:`pretune` (inside :func:`tuning_batch`) loads
that file first (a missing, unreadable or corrupt one is skipped with one warning) and writes it once at the end
when it measured something new; a first-use measurement outside a batch writes it at once. Writes are atomic (a
temporary file renamed into place), so an interrupted write never leaves a partial file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..launch import device_name
from ..settings import kernel_settings
from .common import log, m_bucket
from .compile_ahead import first_calls_concurrently
from .norm import triton_rms_norm
from .registry import FUSED_VARIANTS, fused_linears


@dataclass(frozen=True)
class Choice:
    """A dispatch decision: "unfused" or a key of FUSED_VARIANTS, and its config tuple (() for unfused).

    times_us: the measured time per call of each candidate (microseconds), empty unless measured.
    source: "measured", "loaded", "forced" (the ``variant`` setting), "default" (not measured: the unfused path),
    or "failed" (the measurement raised or no candidate ran: the unfused path, kept and never measured again, so a
    failing measurement costs once, not on every call).
    """

    variant: str
    config: tuple[int, ...] = ()
    source: str = "default"
    times_us: tuple[tuple[str, float], ...] = ()


OP = "rms_norm_linear"  # the coconut op's name in the cache and in tuning files
Key = tuple[str, str, int, int, int, str]  # (GPU name, op, M bucket, N, K, dtype)
_CACHE: dict[Key, Choice] = {}
_DEFAULT = Choice("unfused", (), "default")
# Bump when the candidate sets change (a new variant or configuration), so that saved decisions are measured again.
TUNING_FORMAT = 1
_ROW_FIELDS = ("gpu", "op", "m_bucket", "n", "k", "dtype", "variant", "config")


class _State:
    """Process-wide bookkeeping of the tuning file: measurements so far, the depth of :func:`tuning_batch`, the paths
    loaded and the paths already warned about."""

    measured = 0
    batch_depth = 0
    loaded: set[str] = set()
    warned: set[str] = set()


def _key(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device | str, op: str = OP) -> Key:
    dev = device if isinstance(device, torch.device) else torch.device(device)
    return (device_name(dev), op, m_bucket(m), int(n), int(k), str(dtype).replace("torch.", ""))


def dispatch_table() -> dict[str, dict]:
    """The cached decisions: {"<GPU>/<op>/M=<bucket>,N=..,K=..,<dtype>": {variant, config, source, times_us}}."""
    return {f"{k[0]}/{k[1]}/M={k[2]},N={k[3]},K={k[4]},{k[5]}": {"variant": c.variant, "config": list(c.config),
                                                                 "source": c.source, "times_us": dict(c.times_us)}
            for k, c in sorted(_CACHE.items())}


def clear_dispatch_cache() -> None:
    """Forget every cached decision (measured, loaded or failed) and which tuning files were loaded."""
    _CACHE.clear()
    _State.loaded.clear()


def measurement_count() -> int:
    """How many decisions this process has measured so far (pretune and first use), for callers that write a
    tuning file only when something new was measured."""
    return _State.measured


def versions_tag() -> str:
    """The versions that can change a decision: ``"torch<version>-triton<version>-f<TUNING_FORMAT>"`` (torch's
    version includes its CUDA build, e.g. ``2.11.0+cu128``)."""
    import triton

    return f"torch{torch.__version__}-triton{triton.__version__}-f{TUNING_FORMAT}"


def save_tuning(path: str) -> None:
    """Write the measured and loaded decisions of every GPU to a JSON file (a list of rows, each with the fields
    ``gpu, op, m_bucket, n, k, dtype, variant, config, versions``).

    The file is written under a temporary name in the same folder (created if missing) and renamed into place, so
    a reader never sees a partial file and an interrupted write leaves the previous file (or none).

    Raises:
        OSError: the folder or file cannot be written.
    """
    tag = versions_tag()
    rows = [{"gpu": k[0], "op": k[1], "m_bucket": k[2], "n": k[3], "k": k[4], "dtype": k[5], "variant": c.variant,
             "config": list(c.config), "versions": tag}
            for k, c in sorted(_CACHE.items()) if c.source in ("measured", "loaded")]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # readable like a file open() makes (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _parse_row(path: str, r: Any) -> Optional[tuple[Key, Choice]]:
    """One row of a tuning file as a cache entry (None: a row of other versions); ValueError when malformed."""
    if not isinstance(r, dict):
        raise ValueError(f"{path}: a tuning row must be a JSON object, got {r!r}")
    missing = set(_ROW_FIELDS) - set(r)
    if missing:
        raise ValueError(f"{path}: a tuning row lacks {sorted(missing)}: {r}")
    if r["op"] == OP and r["variant"] not in ("unfused",) + tuple(FUSED_VARIANTS):
        raise ValueError(f"bad variant in {path}: {r['variant']}")
    if "versions" in r and r["versions"] != versions_tag():
        return None
    if not isinstance(r["config"], list) or not all(isinstance(c, (int, bool)) for c in r["config"]):
        raise ValueError(f"{path}: a tuning row's config must be a list of integers: {r}")
    try:
        key = (str(r["gpu"]), str(r["op"]), int(r["m_bucket"]), int(r["n"]), int(r["k"]), str(r["dtype"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: a tuning row has a field of the wrong type ({e}): {r}") from None
    return key, Choice(str(r["variant"]), tuple(r["config"]), "loaded")


def load_tuning(path: str) -> int:
    """Read decisions written by :func:`save_tuning`; returns the number loaded (rows of every GPU: each is used
    only on the GPU of its name). Rows whose ``versions`` differ from :func:`versions_tag` are skipped (a row
    without the field is loaded). Nothing is loaded from a file with a malformed row.

    Raises:
        OSError: the file cannot be read. ValueError: not JSON, not a list of rows, a row without a field of
        :func:`save_tuning`, of the wrong type or with an unknown variant.
    """
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a tuning file holds a JSON list of rows, got {type(rows).__name__}")
    entries = [e for e in (_parse_row(path, r) for r in rows) if e is not None]
    _CACHE.update(entries)
    _State.loaded.add(path)
    return len(entries)


def load_tuning_file(path: str) -> int:
    """:func:`load_tuning`, forgiving: a missing file loads nothing; an unreadable or corrupt one loads nothing and
    is logged once per path (the next save replaces it). Returns the number of rows loaded."""
    if not os.path.exists(path):
        _State.loaded.add(path)
        return 0
    try:
        return load_tuning(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        _State.loaded.add(path)
        if path not in _State.warned:
            _State.warned.add(path)
            log.warning("ignoring the tuning file %s (%s: %s); its decisions are measured again", path,
                        type(e).__name__, e)
        return 0


def _save_quietly(path: str) -> None:
    """:func:`save_tuning`, logging instead of raising an OSError (a read-only cache folder costs a warning)."""
    try:
        save_tuning(path)
    except OSError as e:
        log.warning("could not save the tuning file %s: %s", path, e)


@contextlib.contextmanager
def tuning_batch() -> Iterator[None]:
    """Measure many shapes with one read and one write of the ``tuning_file`` setting (when set).

    On entry the file is loaded (:func:`load_tuning_file`) unless this process loaded it already; inside, first-use
    measurements do not write it; on leaving the outermost batch (also on an exception) it is written once if
    anything new was measured. Nests.
    """
    path = kernel_settings().tuning_file
    if path and path not in _State.loaded:
        load_tuning_file(path)
    before = _State.measured
    _State.batch_depth += 1
    try:
        yield
    finally:
        _State.batch_depth -= 1
        if path and _State.batch_depth == 0 and _State.measured > before:
            _save_quietly(path)


def _forced_choice(m: int) -> Optional[Choice]:
    """The choice the ``variant`` setting forces for M rows (None for "auto"): a fused variant outside its range of
    M takes the unfused path."""
    v = kernel_settings().variant
    if v == "auto":
        return None
    if v in FUSED_VARIANTS:
        cfgs = FUSED_VARIANTS[v].configs(m)
        if cfgs:
            return Choice(v, cfgs[0], "forced")
    return Choice("unfused", (), "forced")


def time_in_graph(fn: Callable[[int], object], reps: int, iters: int = 7, warmup_calls: int = 2,
                  warmup_replays: int = 1) -> float:
    """Median time per call (us) of fn(i) for i in range(reps), captured in one CUDA graph and replayed.

    fn(0..warmup_calls-1) runs eagerly before the capture (compilation, allocator), and the graph is replayed
    warmup_replays times untimed before the `iters` timed replays. Needs a CUDA device.
    """
    g = capture_graph(fn, reps, warmup_calls, warmup_replays)
    times = [replay_ms(g) * 1e3 / reps for _ in range(iters)]
    del g
    return statistics.median(times)


def capture_graph(fn: Callable[[int], object], reps: int, warmup_calls: int = 2,
                  warmup_replays: int = 1) -> "torch.cuda.CUDAGraph":
    """fn(0..warmup_calls-1) eagerly, then one CUDA graph of fn(i) for i in range(reps), replayed warmup_replays
    times untimed (synchronized). Needs a CUDA device."""
    for i in range(warmup_calls):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    for _ in range(warmup_replays):
        g.replay()
    torch.cuda.synchronize()
    return g


def replay_ms(g: "torch.cuda.CUDAGraph") -> float:
    """Milliseconds of one replay of g, timed with CUDA events on the current stream (waits for it)."""
    a = torch.cuda.Event(enable_timing=True)
    b = torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def rotated_weights(n: int, k: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator,
                    l2_bytes: int = 120 << 20) -> list[Tensor]:
    """Enough [n, k] random weights (at most 16) to exceed ``l2_bytes`` together, so that a timing loop rotating
    over them reads them from HBM, as a model's layers do; fewer when memory runs out (at least one)."""
    copies = max(1, min(16, math.ceil(l2_bytes / max(1, n * k * torch.empty((), dtype=dtype).element_size()))))
    ws: list[Tensor] = []
    for _ in range(copies):
        try:
            ws.append(torch.randn(n, k, device=device, dtype=dtype, generator=gen) * k ** -0.5)
        except torch.cuda.OutOfMemoryError:
            if not ws:
                raise
            break  # fewer copies: L2 may then flatter every candidate alike
    return ws


def candidates(m: int) -> list[tuple[str, tuple[int, ...]]]:
    """All (variant, config) pairs the dispatcher measures for M rows (the unfused path first)."""
    out: list[tuple[str, tuple[int, ...]]] = [("unfused", ())]
    for name, entry in FUSED_VARIANTS.items():
        out += [(name, c) for c in entry.configs(m)]
    return out


def measure(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device | str = "cuda",
            reps: int = 10, l2_bytes: int = 120 << 20, widths: Optional[Sequence[int]] = None) -> Choice:
    """Time every candidate for an [m, k] x [n, k]^T site on `device` (a CUDA device) and return the fastest.

    ``widths``: the N_i of a weight group (segments.py) whose stacked rows make the [n, k] weight (sum = n): the
    unfused candidate then runs one linear per segment and the fused ones one grouped launch, as the site will.

    Weights are rotated over enough copies to exceed `l2_bytes` (2x the H200's 60 MB L2) so they come from HBM,
    as in the real model. Each candidate is timed inside a CUDA graph of `reps` calls (median of 7 replays), with
    a residual input and the h = x + r output, the form of every site of a decoder but its first (a variant can
    tie without the residual and lose with it). A candidate that fails to compile or run is skipped (logged). A
    single candidate (M beyond every fused variant) is returned unmeasured. Raises RuntimeError on a device other
    than CUDA or while the current stream is capturing a CUDA graph.
    """
    mb = m_bucket(m)
    cands = candidates(mb)
    if len(cands) == 1:
        return Choice(cands[0][0], cands[0][1], "measured")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise RuntimeError(f"coconut: measuring needs a CUDA device, got {dev}")
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("coconut: refusing to benchmark while a CUDA graph is being captured")
    segs = [int(w) for w in widths] if widths is not None and len(widths) > 1 else [n]
    if sum(segs) != n:
        raise ValueError(f"coconut: group widths {segs} do not add up to N = {n}")
    starts = [sum(segs[:i]) for i in range(len(segs))]
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(mb, k, device=dev, dtype=dtype, generator=gen)
    r = torch.randn(mb, k, device=dev, dtype=dtype, generator=gen)
    h = torch.empty_like(x)
    g = 1.0 + 0.1 * torch.randn(k, device=dev, dtype=dtype, generator=gen)
    ws = rotated_weights(n, k, dtype, dev, gen, l2_bytes)
    copies = len(ws)
    parts = [[w[a:a + sz] for a, sz in zip(starts, segs)] for w in ws]  # row slices: contiguous views
    none = [None] * len(segs)

    def call(variant: str, cfg: tuple[int, ...]) -> Callable[[int], object]:
        if variant == "unfused":
            def fn(i: int) -> object:
                a, _ = triton_rms_norm(x, g, 1e-6, residual2d=r)
                return [F.linear(a, w) for w in parts[i % copies]]
        else:
            def fn(i: int) -> object:
                return fused_linears(x, g, parts[i % copies], none, 1e-6, residual2d=r, h_out=h, variant=variant,
                                     config=cfg)
        return fn

    def failed(name: str, e: Exception) -> None:
        log.warning("coconut: candidate %s failed for M=%d N=%d K=%d: %s", name, mb, n, k, e)

    return fastest(cands, call, reps, Choice("unfused", (), "default"), failed)


Timer = Callable[[Callable[[int], object], int], float]  # (fn, reps) -> microseconds per call, as time_in_graph


def fastest(cands: Iterable[tuple[str, tuple[int, ...]]],
            call: Callable[[str, tuple[int, ...]], Callable[[int], object]], reps: int, fallback: Choice,
            on_error: Optional[Callable[[str, Exception], None]] = None, timer: Timer = time_in_graph,
            compile_ahead: Optional[bool] = None) -> Choice:
    """The fastest (variant, config) candidate: each one's ``call(variant, config)`` (a function of the call
    index) timed by ``timer`` (by default in a CUDA graph of ``reps`` calls: :func:`time_in_graph`, microseconds
    per call), one after another.

    ``compile_ahead`` (None: when CUDA is available): with more than one candidate and outside a CUDA-graph
    capture, first run every candidate's first call concurrently (:func:`first_calls_concurrently`), so that their
    kernels compile in parallel. A candidate that raises (a launch shape that does not compile, e.g. too much
    shared memory) is skipped, after ``on_error(name, exception)`` (once, from its timing). Returns a "measured"
    :class:`Choice` carrying every candidate's time, or ``fallback`` when none ran.
    """
    cands = list(cands)
    fns: list[Optional[Callable[[int], object]]] = [None] * len(cands)
    if compile_ahead is None:
        compile_ahead = torch.cuda.is_available()
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if compile_ahead and len(cands) > 1 and not capturing:
        for i, (variant, cfg) in enumerate(cands):
            with contextlib.suppress(Exception):  # raised again, and reported, by the timing below
                fns[i] = call(variant, cfg)
        first_calls_concurrently([fn for fn in fns if fn is not None])
    times: dict[str, float] = {}
    best: Optional[tuple[float, str, tuple[int, ...]]] = None
    for (variant, cfg), fn in zip(cands, fns):
        name = variant + ("" if not cfg else str(list(cfg)).replace(" ", ""))
        try:
            t = timer(fn if fn is not None else call(variant, cfg), reps)
        except Exception as e:  # noqa: BLE001 - not a candidate on this GPU
            if on_error is not None:
                on_error(name, e)
            continue
        times[name] = round(t, 3)
        if best is None or t < best[0]:
            best = (t, variant, cfg)
    if best is None:
        return fallback
    return Choice(best[1], best[2], "measured", tuple(times.items()))


def cached_choice(op: str, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
                  measure_fn: Callable[[], Choice], fallback: Choice) -> Choice:
    """The decision of one op for a shape on this GPU: the cached (measured, pre-tuned or loaded) one; else a
    measurement by ``measure_fn`` (not while a CUDA graph is being captured, nor with the ``autotune`` setting off),
    cached and written to the ``tuning_file`` setting when set (at the end of a :func:`tuning_batch` inside one;
    that file is loaded on the first miss if it was not yet); else ``fallback`` (not cached). A measurement that
    raises or finds no candidate caches ``fallback`` with source "failed", so it costs once, not on every call."""
    key = _key(m, n, k, dtype, device, op)
    c = _CACHE.get(key)
    if c is not None:
        return c
    settings = kernel_settings()
    if settings.tuning_file and settings.tuning_file not in _State.loaded:  # its rows first, and kept on save
        load_tuning_file(settings.tuning_file)
        c = _CACHE.get(key)
        if c is not None:
            return c
    if not settings.autotune or (torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return fallback
    try:
        c = measure_fn()
    except Exception as e:  # e.g. out of memory while the KV cache holds the GPU: fall back, do not crash
        log.warning("%s: measuring M<=%d N=%d K=%d failed (%s); using %s", op, key[2], n, k, e, fallback.variant)
        c = dataclasses.replace(fallback, source="failed")
    if c.source == "default":  # no candidate ran: keep the fallback instead of measuring again on every call
        c = dataclasses.replace(fallback, source="failed")
    _CACHE[key] = c
    log.info("%s: %s M<=%d N=%d K=%d %s -> %s %s %s", op, key[0], key[2], n, k, key[5], c.variant, c.config,
             c.times_us)
    if c.source == "measured":
        _State.measured += 1
        if settings.tuning_file and _State.batch_depth == 0:  # keep the decisions measured on first use too
            _save_quietly(settings.tuning_file)
    return c


def choose(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
           widths: Optional[Sequence[int]] = None) -> Choice:
    """The coconut op's decision for a CUDA site (a weight group: ``widths`` its N_i, summing to n): the forced
    ``variant`` setting, else :func:`cached_choice` with :func:`measure` (the unfused path as the fallback: a
    fused kernel is only used where it was measured to win)."""
    forced = _forced_choice(m)
    if forced is not None:
        return forced
    return cached_choice(OP, m, n, k, dtype, device, lambda: measure(m, n, k, dtype, device, widths=widths),
                         _DEFAULT)


def pretune(shapes: Iterable[tuple], dtype: torch.dtype = torch.bfloat16,
            device: torch.device | str = "cuda") -> dict[str, dict]:
    """Measure and cache the dispatch decision for each (M, N, K) or (M, N, K, widths) (M is bucketed to the next
    power of two; widths: the N_i of a weight group, see :func:`measure`).

    Call before capturing CUDA graphs (the engine does, for its batch sizes and its qkv / gate_up / lm_head
    shapes). Runs in a :func:`tuning_batch`: with the ``tuning_file`` setting, the file's decisions are loaded
    first, only shapes missing there are measured, and the file is written when something was. Returns
    `dispatch_table()`. Raises RuntimeError if called during graph capture or without CUDA.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("coconut.pretune needs CUDA")
    dev = torch.device(device)
    with tuning_batch():
        for shape in shapes:
            m, n, k = shape[:3]
            widths = shape[3] if len(shape) > 3 else None
            key = _key(m, n, k, dtype, dev)
            if key in _CACHE and _CACHE[key].source in ("measured", "loaded"):
                continue
            c = measure(key[2], n, k, dtype, dev, widths=widths)
            _CACHE[key] = c
            if c.source == "measured":
                _State.measured += 1
            log.info("coconut pretune: %s M<=%d N=%d K=%d -> %s %s", key[0], key[2], n, k, c.variant, c.config)
    return dispatch_table()
