"""The "coconut" torch.compile backend: Inductor (with the caller's `mode` and `options`) plus the RMSNorm -> linear
fusion pass.

Usage:
    import fusion_pass                       # registers the backend (also found via the package entry point)
    f = torch.compile(model, backend="coconut")
    f = torch.compile(model, backend="coconut", mode="reduce-overhead")       # CUDA-graph trees, as Inductor
    f = torch.compile(model, backend="coconut", options={"max_autotune": True, "coconut.min_sites": 1})
    fusion_pass.fused_site_count()          # sites rewritten since the last reset_stats()

How `mode` and `options` reach a backend other than Inductor (torch 2.11-2.13, torch/__init__.py): torch.compile
wraps the backend in ``_TorchCompileWrapper``, which calls ``compiler_fn(gm, example_inputs, mode=..., options=...)``
(each only when given and not "default"/empty). torch.compile itself refuses `mode` and `options` together
("Either mode or options can be specified"), for every backend. Inductor validates its options when torch.compile
is called; a custom backend sees them only when the first graph compiles, so a bad key surfaces at the first call
(Dynamo wraps it in ``torch._dynamo.exc.BackendCompilerFailed``, a RuntimeError whose message carries ours).
`make_backend(mode, options)` validates at once and returns a backend callable for ``torch.compile(backend=...)``.
`dynamic=` and `fullgraph=` are Dynamo's arguments, applied before any backend runs: they behave as with Inductor.

The pass runs as Inductor's `post_grad_custom_pre_pass` (before Inductor's own post-grad pattern passes, which may
otherwise rewrite mm + bias or reorder the norm chain), on the functionalized, normalized ATen graph; a pass that
the caller installed there already (config or options) runs first. Its uuid() hashes the pass's source files, so
Inductor's FX graph cache is invalidated whenever the pass changes. On an FX-graph-cache hit the pass does not run,
so the counters (fusion_pass.stats) only count graphs that were actually compiled.

CUDA graphs (mode "reduce-overhead" / "max-autotune"): Inductor's CUDA-graph trees replay the compiled graph,
coconut ops included. The ops are safe there: no host synchronization (eps is a Python float, or a 0-d CPU
tensor), outputs allocated by the caching allocator (the trees' private pool), the one persistent buffer (the
split-K fixup counters) allocated here at compile time, outside the trees' pool, and the kernel choice measured
before any capture: at compile time for every static-shape site ("coconut.pretune"), and the dispatcher never
measures while a stream is capturing (fusion_pass.kernels.choose).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import operator
import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch._inductor import custom_graph_pass as _custom_graph_pass
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import graph_launch, kernels, ops, options as _options, patterns, settings as _kernel_settings, stats
from .options import CoconutOptionError, Settings, combine_options, parse_options
from .stats import all_stats, fused_site_count, last_stats, reset_stats

__all__ = ["CoconutFusionPass", "CoconutOptionError", "FUSION_PASS", "all_stats", "coconut_backend",
           "fused_site_count", "last_stats", "make_backend", "reset_stats"]

log = logging.getLogger("fusion_pass")

_OPS = (patterns.OP_PLAIN, patterns.OP_RESIDUAL)


def _pass_source_files() -> list[str]:
    """Every Python file of the fusion_pass package and its kernels, sorted: all of them can change what the pass
    writes into a graph (fx_edit.py the rewrite, launch.py the grid of a launch written out under "graph")."""
    here = os.path.dirname(__file__)
    return sorted(os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py")) + kernels.source_files()


def _source_hash() -> str:
    h = hashlib.sha256()
    for path in _pass_source_files():
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _static_sites(graph: fx.Graph) -> list[tuple[int, int, int, torch.dtype, torch.device, tuple[int, ...]]]:
    """(M, N, K, dtype, device) of each weight group (kernels.split_groups: the linears of a site that share one
    launch, N the sum of their rows; widths: each linear's rows) served by a coconut op of `graph` whose shapes are
    all integers: the shapes the dispatcher looks up at run time."""
    out = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in _OPS:
            continue
        x = n.args[0].meta.get("val")
        at = 3 if n.target is patterns.OP_RESIDUAL else 2
        weights, biases = n.args[at], n.args[at + 1]
        if not isinstance(x, torch.Tensor) or not all(isinstance(d, int) for d in x.shape):
            continue
        vals = [w.meta.get("val") for w in weights]
        if not all(isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape) for v in vals):
            continue
        m = functools.reduce(operator.mul, x.shape[:-1], 1)
        for grp in kernels.split_groups([v.shape[0] for v in vals], [b is not None for b in biases]):
            out.append((m, sum(vals[i].shape[0] for i in grp), vals[0].shape[1], x.dtype, x.device,
                        tuple(vals[i].shape[0] for i in grp)))
    return out


class CoconutFusionPass(CustomGraphPass):
    """Inductor custom graph pass: rewrites (add +) RMSNorm -> linear(s) sites into torch.ops.coconut calls.

    Each run records its statistics (fusion_pass.stats: one INFO log line per graph, a WARNING when candidates
    exist and none was fused) and remembers the static shapes of the fused linears (`static_sites`) for pretuning.
    Raises RuntimeError when a graph fuses fewer than `settings.min_sites` sites.
    """

    _uuid: Optional[str] = None

    def __init__(self, settings: Settings = Settings(), launch: str = "op") -> None:
        self.settings = settings
        self.launch = graph_launch.resolve_launch(launch, cudagraphs=True)  # "auto" resolved by the caller
        self.static_sites: list[tuple[int, int, int, torch.dtype, torch.device, tuple[int, ...]]] = []

    def __call__(self, graph: fx.Graph) -> None:
        if self.launch == "graph":
            result = patterns.rewrite_graph(graph, graph_launch.site_admission())
            result.launched = graph_launch.lower_graph(graph)
        else:
            result = patterns.rewrite_graph(graph)
        stats.record(result.as_dict(), warn_unfused=self.settings.warn_unfused)
        if result.sites + result.left_to_inductor < self.settings.min_sites:  # a decision is not a failed match
            raise RuntimeError(f"coconut: the graph fused {result.sites} site(s) (and left {result.left_to_inductor} "
                               f"to Inductor by their measured decision), fewer than coconut.min_sites = "
                               f"{self.settings.min_sites}; left alone: {result.skipped}")
        self.static_sites.extend(_static_sites(graph))

    def uuid(self) -> str:
        """The pass's part of Inductor's FX-graph cache key, taken before the pass runs: its source, the launch mode
        and, under "graph", the kernel settings that decide at compile time what a site becomes (``variant``,
        ``autotune``, ``poison_outputs``). Under "op" those are read at each call, so they stay out of the key."""
        if CoconutFusionPass._uuid is None:
            CoconutFusionPass._uuid = "coconut-" + _source_hash()
        key = f"{CoconutFusionPass._uuid}-{self.launch}"
        if self.launch == "graph":
            ks = _kernel_settings.kernel_settings()
            key += f"-{ks.variant}-autotune={ks.autotune}-poison={ks.poison_outputs}"
        return key


#: Inductor's interface for passes that are also told whether the graph is an inference graph (torch >= 2.13).
_InferenceAware: Optional[type] = getattr(_custom_graph_pass, "CustomInferenceAwareGraphPass", None)


class _ChainedPass(_InferenceAware or CustomGraphPass):  # type: ignore[misc]
    """Runs a user's existing pre pass (one pass, or a list or tuple of them, as Inductor accepts), then ours.

    Each of the user's passes is called as Inductor would call it: an inference-aware one (torch >= 2.13) with
    ``is_inference``, any other with the graph alone.
    """

    def __init__(self, first: Any, second: CoconutFusionPass) -> None:
        self.first: list[Any] = list(first) if isinstance(first, (list, tuple)) else [first]
        self.second = second

    def __call__(self, graph: fx.Graph, is_inference: bool = False) -> None:
        for p in self.first:
            if _InferenceAware is not None and isinstance(p, _InferenceAware):
                p(graph, is_inference=is_inference)
            else:
                p(graph)
        self.second(graph)

    def uuid(self) -> Any:
        """The passes' uuids in order; None (no caching, as Inductor does) when one of them has none."""
        uuids = [p.uuid() if hasattr(p, "uuid") else None for p in self.first]
        return None if any(u is None for u in uuids) else (*uuids, self.second.uuid())


#: The pass with default settings (for callers that install it into Inductor's config themselves).
FUSION_PASS = CoconutFusionPass()


def _pretune(sites: list[tuple[int, int, int, torch.dtype, torch.device, tuple[int, ...]]]) -> None:
    """Measure the dispatch decision of every CUDA site now, outside any CUDA-graph capture (kernels.pretune)."""
    cuda = [s for s in sites if s[4].type == "cuda"]
    if not cuda or torch.cuda.is_current_stream_capturing():
        return
    by_kind: dict[tuple[torch.dtype, torch.device], set[tuple[int, int, int, tuple[int, ...]]]] = {}
    for m, n, k, dt, dev, widths in cuda:
        by_kind.setdefault((dt, dev), set()).add((m, n, k, widths))
    for (dt, dev), shapes in by_kind.items():
        try:
            kernels.pretune(sorted(shapes), dtype=dt, device=dev)
        except Exception as e:  # e.g. out of memory: the dispatcher measures on first use or takes the safe path
            log.warning("coconut: pretuning %s on %s failed (%s: %s); measuring on first use instead",
                        sorted(shapes), dev, type(e).__name__, e)


#: Kernel settings applied by earlier compiles: field -> value (to warn when a later compile changes one).
_applied_by_compile: dict[str, Any] = {}


def _apply_kernel_settings(settings: Settings) -> None:
    """Apply the compile's "coconut.<kernel setting>" options to the process-wide KernelSettings.

    They are process-wide (fusion_pass.settings), so the last compile that names a key wins for every compiled
    graph and for the engine's kernels: an INFO line when a value changes, a WARNING when it overrides a value
    that an earlier compile set.
    """
    changes = settings.kernel_changes()
    current = _kernel_settings.kernel_settings()
    differing = {k: v for k, v in changes.items() if getattr(current, k) != v}
    if not differing:
        return
    overridden = {k: _applied_by_compile[k] for k in differing
                  if k in _applied_by_compile and _applied_by_compile[k] != differing[k]}
    _kernel_settings.configure_kernels(**differing)
    _applied_by_compile.update(changes)
    was = {k: getattr(current, k) for k in differing}
    if overridden:
        log.warning("coconut: kernel settings %s replace %s set by an earlier compile; kernel settings are "
                    "process-wide, so the last compile's values apply to every compiled graph", differing, overridden)
    else:
        log.info("coconut: kernel settings %s (were %s; process-wide)", differing, was)


class _RowMmDecompositions(dict):
    """The table of :func:`decompositions_keeping_row_mm`; it pickles as a call of that function, so Inductor's
    FX-graph cache key (torch 2.13 pickles the table into it) stays stable and the cache keeps working."""

    def __reduce__(self) -> tuple[Callable[[], dict[Any, Callable[..., Any]]], tuple[()]]:
        return decompositions_keeping_row_mm, ()


def _mm_keeping_one_row(inductor_mm: Callable[..., Any], a: torch.Tensor, b: torch.Tensor, *args: Any,
                        **kwargs: Any) -> Any:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if a.dim() == 2 and statically_known_true(a.shape[0] == 1):
        return NotImplemented  # no decomposition: the graph keeps aten.mm
    return inductor_mm(a, b, *args, **kwargs)


def decompositions_keeping_row_mm() -> dict[Any, Callable[..., Any]]:
    """Inductor's decomposition table (``select_decomp_table``, under the config in force), except that a
    one-row ``aten.mm`` stays a matmul.

    With ``coordinate_descent_tuning`` (which mode "max-autotune" turns on), Inductor decomposes an ``mm`` whose
    first input has one static row into ``(x.unsqueeze(2) * w.unsqueeze(0)).sum(1)`` on GPUs
    (torch/_inductor/decomposition.py, ``mm``), before any post-grad pass: a batch-1 graph would reach the fusion
    pass with no linear left to fuse. Keeping those matmuls lets the pass fuse them; a one-row matmul it does not
    fuse runs as Inductor's (autotuned) ``mm``. The backend passes this table to Inductor only while
    coordinate-descent tuning is on (on torch 2.12 such a compile is not stored in the FX-graph cache: that
    release wraps the table in a function that does not pickle).

    Returns:
        dict: ATen overload -> decomposition, for ``compile_fx(..., decompositions=...)``.
    """
    from torch._inductor.decomposition import select_decomp_table

    table = _RowMmDecompositions(select_decomp_table())
    mm = torch.ops.aten.mm.default
    if mm in table:
        table[mm] = functools.partial(_mm_keeping_one_row, table[mm])
    return table


def _without_post_grad_passes(settings: Settings) -> None:
    """Inductor runs no post-grad pass under ``use_post_grad_passes=False`` (which mode "lite" sets), so the fusion
    pass cannot run: log a WARNING (unless ``coconut.warn_unfused`` is False), or raise when ``coconut.min_sites``
    asks for fused sites.

    Raises:
        CoconutOptionError: ``coconut.min_sites`` > 0.
    """
    msg = ("coconut: Inductor's post-grad passes are off (use_post_grad_passes=False, which mode 'lite' sets), so "
           "the fusion pass does not run and nothing is fused")
    if settings.min_sites > 0:
        raise CoconutOptionError(f"{msg}, fewer than coconut.min_sites = {settings.min_sites}")
    if settings.warn_unfused:
        log.warning("%s; compile with another mode (or use_post_grad_passes=True) to fuse", msg)


def _compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], patches: dict[str, Any],
             settings: Settings) -> Callable:
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    if patches.get("triton.cudagraphs"):
        coconut_backend._used_cudagraphs = True  # type: ignore[attr-defined]
    _apply_kernel_settings(settings)
    if not settings.enable:
        return compile_fx(gm, example_inputs, config_patches=patches)
    for dev in {t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"}:
        # the split-K counters are global and live for the process: allocate them now, not in a CUDA-graph
        # tree's warm-up run, whose private memory pool would hold them
        kernels.fixup_counters(dev, 0)
    decompositions = None
    with inductor_config.patch(patches):
        if inductor_config.coordinate_descent_tuning:
            decompositions = decompositions_keeping_row_mm()
        cudagraphs = bool(inductor_config.triton.cudagraphs)
        post_grad = bool(getattr(inductor_config, "use_post_grad_passes", True))
    if not post_grad:
        _without_post_grad_passes(settings)
    the_pass = CoconutFusionPass(settings, graph_launch.resolve_launch(settings.launch, cudagraphs))
    existing = patches.get("post_grad_custom_pre_pass", inductor_config.post_grad_custom_pre_pass)
    chained: Any = the_pass if existing is None else _ChainedPass(existing, the_pass)
    compiled = compile_fx(gm, example_inputs, config_patches={**patches, "post_grad_custom_pre_pass": chained},
                          decompositions=decompositions)
    if settings.pretune:
        _pretune(the_pass.static_sites)
    return compiled


def coconut_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: Optional[str] = None,
                    options: Optional[dict[str, Any]] = None) -> Callable:
    """torch.compile backend: Inductor's compile_fx with `mode` / `options` applied and the fusion pass installed.

    Args:
        gm, example_inputs: from Dynamo.
        mode: torch.compile's mode ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs").
        options: Inductor config keys and "coconut.*" keys (fusion_pass.options.COCONUT_OPTIONS).
    Returns:
        The compiled callable (Inductor's, CUDA-graph trees included under reduce-overhead / max-autotune).
    Raises:
        CoconutOptionError (RuntimeError, ValueError): a bad mode or option. RuntimeError: fewer fused sites than
        "coconut.min_sites".
    """
    patches, settings = parse_options(mode, options)
    return _compile(gm, example_inputs, patches, settings)


def _reset() -> None:
    """Called by torch._dynamo.reset() (through torch.compile's wrapper): drop CUDA-graph trees, as Inductor does."""
    if getattr(coconut_backend, "_used_cudagraphs", False):
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()


coconut_backend.reset = _reset  # type: ignore[attr-defined]


def make_backend(mode: Optional[str] = None, options: Optional[dict[str, Any]] = None) -> Callable:
    """A backend callable with `mode` and `options` bound and validated now (not at the first compile).

    ``torch.compile(model, backend=fusion_pass.make_backend("reduce-overhead", {"coconut.min_sites": 1}))``:
    unlike torch.compile's own arguments, mode and options may be combined here. A `mode` or `options` given to
    torch.compile as well are added to the bound ones when the first graph compiles (``combine_options``).
    Raises CoconutOptionError (RuntimeError, ValueError) on a bad mode or option.
    """
    patches, settings = parse_options(mode, options)
    bound_mode, bound_options = mode, dict(options or {})

    def coconut(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: Optional[str] = None,
                options: Optional[dict[str, Any]] = None) -> Callable:
        if mode is None and options is None:
            return _compile(gm, example_inputs, patches, settings)
        return _compile(gm, example_inputs, *parse_options(*combine_options(bound_mode, bound_options, mode, options)))

    coconut.reset = _reset  # type: ignore[attr-defined]
    return coconut


def _register() -> None:
    """Register "coconut" with Dynamo unless the installed package's entry point will (avoids a duplicate)."""
    from torch._dynamo.backends import registry

    if "coconut" in registry._COMPILER_FNS:
        return
    try:
        from importlib.metadata import entry_points

        if any(ep.name == "coconut" for ep in entry_points(group="torch_dynamo_backends")):
            return  # lookup_backend loads and registers us through the entry point
    except Exception:  # pragma: no cover
        pass
    registry.register_backend(compiler_fn=coconut_backend, name="coconut")


_register()
