"""What the fusion pass did, per compiled graph: counters, history, and the log lines.

Counted only when the pass runs: a compile served from Inductor's FX-graph cache (or the AOT-autograd cache) runs no
pass and counts nothing. Disable those caches to count (``torch._inductor.config.patch(fx_graph_cache=False)`` and
``torch._functorch.config.patch(enable_autograd_cache=False)``), as the tests do.

Log lines (logger "fusion_pass"): one INFO line per compiled graph (sites fused, with the residual add, linears
served, and the reason for each matched RMSNorm left alone); a WARNING when a graph has RMSNorm -> linear
candidates and fuses none of them (typically training: the normalized activations are saved for the backward).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fusion_pass")

_lock = threading.Lock()
_total_sites = 0
_history: list[dict[str, Any]] = []


@dataclass
class PassStats:
    """What one run of the pass over one graph found."""

    sites: int = 0
    residual_sites: int = 0
    linears: int = 0
    norms_seen: int = 0
    candidates: int = 0  # matched norms with at least one mm/addmm use (direct or through a flatten view)
    launched: int = 0  # fused sites written out as kernel launches that Inductor makes (coconut.launch "graph")
    left_to_inductor: int = 0  # candidates left unfused by coconut.launch "graph" (their measured path is not fused)
    skipped: list[str] = field(default_factory=list)  # "<norm node>: <reason>" for each matched norm left alone

    def as_dict(self) -> dict[str, Any]:
        return {"sites": self.sites, "residual_sites": self.residual_sites, "linears": self.linears,
                "norms_seen": self.norms_seen, "candidates": self.candidates, "launched": self.launched,
                "left_to_inductor": self.left_to_inductor, "skipped": list(self.skipped)}


_EMPTY = {"sites": 0, "residual_sites": 0, "linears": 0, "norms_seen": 0, "candidates": 0, "launched": 0,
          "left_to_inductor": 0, "skipped": []}


def record(stats: dict[str, Any], warn_unfused: bool = True) -> None:
    """Add one graph's pass statistics (PassStats.as_dict()) to the counters and log them."""
    global _total_sites
    with _lock:
        _total_sites += stats["sites"]
        _history.append(dict(stats))
        n = len(_history)
    left = "; ".join(stats["skipped"]) or "none"
    log.info("coconut: graph %d: fused %d of %d RMSNorm->linear candidate site(s) (%d with the residual add, "
             "%d without), %d linear(s) served, %d launched by Inductor, %d RMSNorm(s) seen; left alone: %s", n,
             stats["sites"], stats["candidates"], stats["residual_sites"], stats["sites"] - stats["residual_sites"],
             stats["linears"], stats.get("launched", 0), stats["norms_seen"], left)
    if warn_unfused and stats["candidates"] > stats.get("left_to_inductor", 0) and stats["sites"] == 0:
        log.warning("coconut: graph %d has %d RMSNorm->linear candidate(s) and none was fused (%s). Under grad mode "
                    "with trainable weights the normalized activations are saved for the backward; run inference "
                    "under torch.no_grad() or torch.inference_mode() to fuse.", n, stats["candidates"], left)


def fused_site_count() -> int:
    """Number of sites rewritten by the pass since import or the last reset_stats(), over all graphs.

    A compile served from Inductor's FX-graph cache runs no pass and adds nothing.
    """
    return _total_sites


def last_stats() -> dict[str, Any]:
    """Statistics of the most recent pass run (one graph), a dict with keys
    sites (fused), residual_sites (of those, with the residual add), linears (served by the fused ops),
    norms_seen (RMSNorm chains matched), candidates (of those, feeding at least one linear), launched (fused
    sites written out as kernel launches that Inductor makes, coconut.launch "graph"), left_to_inductor (candidates
    that coconut.launch "graph" left unfused by their decision), skipped (list of "<node>: <reason>" for each
    matched RMSNorm left alone). All zero before any run."""
    with _lock:
        return dict(_history[-1]) if _history else dict(_EMPTY, skipped=[])


def all_stats() -> list[dict[str, Any]]:
    """Statistics of every pass run since the last reset_stats(), in compile order (see last_stats)."""
    with _lock:
        return [dict(h) for h in _history]


def reset_stats() -> None:
    """Zero fused_site_count() and clear last_stats() / all_stats()."""
    global _total_sites
    with _lock:
        _total_sites = 0
        _history.clear()
