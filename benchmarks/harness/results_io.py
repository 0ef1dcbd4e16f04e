"""Where benchmark results go and how they are written: the per-GPU results folder, a part's default path in the
temp folder, and atomic JSON writing."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from .accelerator import gpu_slug
from .provenance import REPO_ROOT

RESULTS_DIR: str = os.path.join(REPO_ROOT, "benchmarks", "results")


def results_path(bench: str, out: str | None = None, gpu: str | None = None) -> str:
    """Where benchmark ``bench`` writes its JSON.

    ``out`` given: that path. Else, with the environment variable ``OUT`` set (the GPU machine's output folder):
    ``$OUT/<gpu>/<bench>.json``. Else on a CUDA machine ``benchmarks/results/<gpu>/<bench>.json``, and without CUDA
    a file in the temp folder (so a CPU run never overwrites committed GPU results). ``<gpu>``: :func:`gpu_slug`.
    """
    if out:
        return out
    slug = gpu or gpu_slug()
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], slug, f"{bench}.json")
    if slug == "cpu":
        return os.path.join(tempfile.gettempdir(), "nanovllm-bench-cpu", f"{bench}.json")
    return os.path.join(RESULTS_DIR, slug, f"{bench}.json")


def default_out(name: str) -> str:
    """Default JSON path of a part that a benchmark script merges into its own file: a file in the temp folder."""
    return os.path.join(tempfile.gettempdir(), "nanovllm-bench-parts", f"{name}.json")


def write_json(path: str, obj: dict[str, Any]) -> str:
    """Write ``obj`` as indented JSON (non-JSON values converted with ``str``), creating parent folders.

    Writes to ``path + '.tmp'`` then renames, so an interrupted run never leaves a truncated file.
    Returns the absolute path.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path
