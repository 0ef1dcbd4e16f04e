"""Rotary position embedding (RoFormer, Su et al. 2021, arXiv 2104.09864), the "rotate half" layout of Qwen/Llama,
with the frequency variants a checkpoint's config may ask for (:func:`rope_inv_freq`)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any) -> dict[str, Any]:
    """The checkpoint's RoPE settings as one dict: ``rope_type`` (``"default"`` when absent), ``rope_theta`` and
    the scaling fields.

    transformers 5 keeps them in ``config.rope_parameters`` (``rope_theta`` included); older configs use
    ``config.rope_scaling`` (``"type"`` or ``"rope_type"``) beside ``config.rope_theta``. Both are read; the
    ``rope_parameters`` fields win.
    """
    merged: dict[str, Any] = {}
    for attr in ("rope_scaling", "rope_parameters"):
        value = getattr(config, attr, None)
        if isinstance(value, dict):
            merged.update(value)
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    theta = merged.get("rope_theta")
    if theta is None:
        theta = getattr(config, "rope_theta", None)
    merged["rope_type"] = rope_type
    merged["rope_theta"] = float(theta if theta is not None else 10000.0)
    return merged


def check_rope(config: Any) -> None:
    """Raise ValueError if the config's RoPE type is not one of :data:`ROPE_TYPES` (naming the type found)."""
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"model: rope_scaling type {rope_type!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")


def rope_inv_freq(head_dim: int, config: Any) -> torch.Tensor:
    """The rotation frequencies ``[head_dim / 2]`` (float32, radians per position) the config asks for.

    - default: ``theta^(-2i/d)`` (RoFormer).
    - linear: default / ``factor`` (position interpolation, Chen et al. 2023, arXiv 2306.15595).
    - llama3: Meta's Llama 3.1 rule: wavelengths ``2 pi / f`` longer than ``original_max_position_embeddings /
      low_freq_factor`` are divided by ``factor``, those shorter than ``... / high_freq_factor`` are kept, and
      those between are interpolated linearly in ``original / wavelength`` between the two.

    The arithmetic is float32 in the same order as transformers' ``modeling_rope_utils``, so the frequencies
    equal its own bit for bit.

    Raises:
        ValueError: another rope type (e.g. yarn, dynamic, longrope).
    """
    check_rope(config)
    params = rope_parameters(config)
    base = params["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        original = float(params["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inv_freq
        long_wave, short_wave = original / low, original / high
        scaled = torch.where(wavelength > long_wave, inv_freq / factor, inv_freq)
        mix = (original / wavelength - low) / (high - low)
        between = (1 - mix) * scaled / factor + mix * scaled
        in_middle = ~(wavelength < short_wave) * ~(wavelength > long_wave)
        return torch.where(in_middle, between, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position-dependent angles ``pos * inv_freq[i]``.

    Args:
        head_dim: size of one head (the whole head is rotated).
        max_position: the largest position + 1 that will be asked for.
        base: rope_theta of the checkpoint (the default frequencies ``base^(-2i/d)``).
        inv_freq: float32 ``[head_dim / 2]`` frequencies to use instead (:func:`rope_inv_freq`).
    """

    def __init__(self, head_dim: int, max_position: int, base: float = 10000.0,
                 inv_freq: torch.Tensor | None = None) -> None:
        super().__init__()
        # float32 throughout, the same arithmetic as the Hugging Face reference, so fp32 outputs match it exactly.
        if inv_freq is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        inv_freq = inv_freq.to(torch.float32)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.int64).float(), inv_freq)  # [P, d/2]
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)

    @classmethod
    def from_config(cls, config: Any, head_dim: int, max_position: int) -> "RotaryEmbedding":
        """The table for a Hugging Face config (its rope type and theta, :func:`rope_inv_freq`)."""
        return cls(head_dim, max_position, inv_freq=rope_inv_freq(head_dim, config))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int ``[T]``; q ``[T, H, D]``, k ``[T, Hkv, D]``. Returns the rotated (q, k), same dtypes."""
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, -1)  # [T, 1, D/2] each
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
