"""Provenance of a benchmark result: the repository root, library versions, git state and command line, and the
header every result JSON starts with (gpu, date, commit, command, versions).

Nothing here imports torch at module import time (the GPU facts come from :mod:`.accelerator`).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from .accelerator import gpu_info

REPO_ROOT: str = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_repo_to_path() -> None:
    """Put the repository root first on ``sys.path`` so ``import nanovllm`` works without installing it."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)


def _version(module: str) -> str | None:
    """``module.__version__`` or None when the module is not importable."""
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - missing or broken install: report None
        return None


def _git(*args: str) -> str | None:
    """Output of ``git <args>`` in the repository, or None when git or the repository is unavailable."""
    try:
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def run_metadata(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything needed to reproduce / interpret a result: GPU, library versions, date, command line, git.

    Args:
        argv: the script's command line (default ``sys.argv``).

    Returns:
        dict with keys gpu, torch, triton, transformers, python, date_utc (ISO 8601), command, cwd, git_commit,
        git_dirty (True/False/None), hostname.
    """
    argv = list(sys.argv if argv is None else argv)
    status = _git("status", "--porcelain")
    return {
        "gpu": gpu_info(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(argv),
        "cwd": os.getcwd(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "hostname": platform.node(),
    }


def header(argv: Sequence[str] | None = None, script: str | None = None, module: str | None = None
           ) -> dict[str, Any]:
    """The keys every result JSON starts with.

    Args:
        argv: the script's arguments after its name (default ``sys.argv[1:]``).
        script: the script path relative to the repository (default: ``sys.argv[0]`` made relative).
        module: the module run with ``python -m`` (instead of ``script``), e.g. ``benchmarks.harness.serving``.

    Returns:
        dict: gpu (full device name, "cpu" without CUDA), date (UTC, ISO 8601), commit (git HEAD, None outside a
        checkout), commit_dirty (uncommitted changes present), command ("python benchmarks/x.py ..." that
        reproduces it), versions {torch, triton, transformers, python, cuda}.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    script = script or os.path.relpath(os.path.abspath(sys.argv[0] or "?"), REPO_ROOT)
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = gpu_info()
    return {"gpu": str(info.get("name", "cpu")),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git("rev-parse", "HEAD"), "commit_dirty": None if status is None else bool(status),
            "command": "python " + shlex.join([*(["-m", module] if module else [script]), *args]),
            "versions": {"torch": _version("torch"), "triton": _version("triton"),
                         "transformers": _version("transformers"), "python": platform.python_version(),
                         "cuda": info.get("cuda")}}
