"""The "coconut" torch.compile backend: Inductor's compile_fx with the RMSNorm -> linear fusion pass installed.

Usage:
    import fusion_pass                       # registers the backend (also found via the package entry point)
    f = torch.compile(model, backend="coconut")
    fusion_pass.fused_site_count()          # sites rewritten since the last reset_stats()

The pass runs as Inductor's `post_grad_custom_pre_pass` (before Inductor's own post-grad pattern passes, which may
otherwise rewrite mm + bias or reorder the norm chain), on the functionalized, normalized ATen graph.
Its uuid() hashes the source of the pass (patterns.py, ops.py, kernels.py, this file) so Inductor's FX graph cache
is invalidated whenever the pass changes. Note: on an FX-graph-cache hit the pass does not run, so the counters
below only count graphs that were actually compiled (tests disable the cache).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import kernels, ops, patterns

log = logging.getLogger("fusion_pass")

_lock = threading.Lock()
_total_sites = 0
_history: list[dict[str, Any]] = []


def _source_hash() -> str:
    h = hashlib.sha256()
    for mod in (patterns, ops, kernels):
        with open(mod.__file__, "rb") as f:
            h.update(f.read())
    with open(__file__, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


class CoconutFusionPass(CustomGraphPass):
    """Inductor custom graph pass: rewrites (add +) RMSNorm -> linear(s) sites into torch.ops.coconut calls."""

    _uuid: Optional[str] = None

    def __call__(self, graph: fx.Graph) -> None:
        global _total_sites
        stats = patterns.rewrite_graph(graph)
        with _lock:
            _total_sites += stats.sites
            _history.append(stats.as_dict())
        log.info("coconut: rewrote %d RMSNorm->linear site(s) (%d with residual add, %d linears, %d norms seen)",
                 stats.sites, stats.residual_sites, stats.linears, stats.norms_seen)
        for s in stats.skipped:
            log.debug("coconut: skipped %s", s)

    def uuid(self) -> str:
        if CoconutFusionPass._uuid is None:
            CoconutFusionPass._uuid = "coconut-" + _source_hash()
        return CoconutFusionPass._uuid


class _ChainedPass(CustomGraphPass):
    """Runs a user's existing pre pass, then ours."""

    def __init__(self, first: Any, second: CoconutFusionPass) -> None:
        self.first, self.second = first, second

    def __call__(self, graph: fx.Graph) -> None:
        self.first(graph)
        self.second(graph)

    def uuid(self) -> Any:
        u = self.first.uuid() if hasattr(self.first, "uuid") else None
        return None if u is None else (u, self.second.uuid())


FUSION_PASS = CoconutFusionPass()


def fused_site_count() -> int:
    """Number of sites rewritten by the pass since import or the last reset_stats()."""
    return _total_sites


def last_stats() -> dict[str, Any]:
    """Stats of the most recent pass run (one graph): sites, residual_sites, linears, norms_seen, skipped."""
    return dict(_history[-1]) if _history else {"sites": 0, "residual_sites": 0, "linears": 0, "norms_seen": 0,
                                                "skipped": []}


def all_stats() -> list[dict[str, Any]]:
    """Stats of every pass run since the last reset_stats(), in order."""
    return [dict(h) for h in _history]


def reset_stats() -> None:
    """Reset the counters of fused_site_count / last_stats / all_stats."""
    global _total_sites
    with _lock:
        _total_sites = 0
        _history.clear()


def coconut_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """torch.compile backend: compile_fx with the coconut fusion pass as post_grad_custom_pre_pass.

    Set COCONUT_FUSION=0 to compile with plain Inductor (same code path, pass disabled).
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    if os.environ.get("COCONUT_FUSION", "1") == "0":
        return compile_fx(gm, example_inputs)
    existing = inductor_config.post_grad_custom_pre_pass
    the_pass: Any = FUSION_PASS if existing is None or existing is FUSION_PASS else _ChainedPass(existing,
                                                                                                  FUSION_PASS)
    return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": the_pass})


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
