"""Where the time of a decode or a prefill step goes: torch.profiler over the engine's own steps.

Parts (``--what``, default ``decode,prefill``):

- ``decode``: per engine mode (fusion, nofusion) and batch size (1, 64, 256), the wall time of a decode step, the
  GPU's busy time, the host's share, and every kernel's time per step by category against its roofline;
- ``prefill``: batch-1 TTFT of a 512-token prompt and the host / device time of its prefill, per mode, with the
  ops that take the most host time.

Writes ``benchmarks/results/<gpu>/profile.json`` (``$OUT/<gpu>/`` when ``OUT`` is set).

Usage::

    python benchmarks/profile.py --model /tmp/qwen3-0.6b
    python benchmarks/profile.py --what decode --part-args 'decode=--modes fusion --batches 1'
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
    sys.path[0] = os.path.dirname(HERE)  # the repository root, not benchmarks/ (whose profile.py shadows the stdlib)
elif os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.harness import parts  # noqa: E402

BENCH, SCRIPT, DEFAULT = "profile", "benchmarks/profile.py", "decode,prefill"
PARTS: dict[str, parts.Part] = {
    "decode": parts.Part("profile_decode", "decode step per mode and batch size", needs_model=True,
                         quick_args=("--batches", "1", "--steps", "10")),
    "prefill": parts.Part("profile_prefill", "batch-1 prefill, host and device time", needs_model=True,
                          quick_args=("--reps", "3", "--profiled", "1")),
}


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; returns 0 when every part succeeded, else 1 (2 for bad flags, from argparse)."""
    return parts.main(__doc__, BENCH, SCRIPT, DEFAULT, PARTS, argv)


if __name__ == "__main__":
    sys.exit(main())
