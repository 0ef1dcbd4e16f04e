"""Parsing of the engine's on/off environment variables (``NANOVLLM_PDL``, ``NANOVLLM_FUSED_QK_NORM_ROPE``,
``NANOVLLM_DECODE_FUSED_REDUCE``), each read once when its module is imported."""
from __future__ import annotations


def env_flag(name: str, value: str | None, default: bool) -> bool:
    """The value of the 0/1 environment variable ``name`` given its raw ``value`` (``os.environ.get(name)``).

    Unset or empty (after stripping) -> ``default``; ``"0"`` -> False; ``"1"`` -> True.

    Raises:
        ValueError: any other value; the message names the variable.
    """
    v = "" if value is None else value.strip()
    if v == "":
        return default
    if v in ("0", "1"):
        return v == "1"
    raise ValueError(f"{name} must be 0 or 1, got {value!r}")
