"""coconut: a torch.compile backend that fuses (residual add +) RMSNorm -> Linear(s) into one custom op.

    import fusion_pass
    model = torch.compile(model, backend="coconut")

    model = torch.compile(model, backend="coconut", mode="reduce-overhead")   # Inductor's modes and options

Public API: coconut_backend, make_backend, CoconutOptionError, COCONUT_OPTIONS, fused_site_count, last_stats,
all_stats, reset_stats, rewrite_graph, pretune, dispatch_table, save_tuning, load_tuning, clear_dispatch_cache
(see backend.py, options.py, stats.py, kernels/); kernel settings in settings.py.
Ops: torch.ops.coconut.rms_norm_linear, torch.ops.coconut.add_rms_norm_linear (see ops.py).
This package never imports nanovllm.
"""
from . import ops  # noqa: F401  (registers torch.ops.coconut.*)
from .backend import (FUSION_PASS, CoconutFusionPass, all_stats, coconut_backend, fused_site_count, last_stats,
                      make_backend, reset_stats)
from .options import COCONUT_OPTIONS, CoconutOptionError
from .kernels import clear_dispatch_cache, dispatch_table, load_tuning, pretune, save_tuning
from .patterns import rewrite_graph

__all__ = ["COCONUT_OPTIONS", "FUSION_PASS", "CoconutFusionPass", "CoconutOptionError", "all_stats",
           "coconut_backend", "fused_site_count", "last_stats", "make_backend", "reset_stats",
           "clear_dispatch_cache", "dispatch_table", "load_tuning", "pretune", "save_tuning", "rewrite_graph"]
