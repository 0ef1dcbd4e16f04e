"""Per-request sampling settings."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from nanovllm.config import check_seed

FLOAT32_MAX = 3.4028234663852886e38  # the sampler divides by the temperature in float32


@dataclass
class SamplingParams:
    """How one request samples its tokens.

    Args:
        temperature: softmax temperature, >= 0 and at most float32's largest value (3.4e38; the sampler works in
            float32). 0 means greedy decoding (argmax, deterministic); so does a value that rounds to 0 in
            float32 (below about 7e-46); values in (0, 1e-5) act as 1e-5 (the logits are divided by it).
        top_p: nucleus sampling (Holtzman et al. 2019, arXiv 1904.09751): keep the smallest set of tokens whose
            probabilities add up to at least ``top_p``. In (0, 1]; 1 turns it off. The most likely token is
            always kept, however small ``top_p`` is (also below float32's smallest value).
        top_k: keep the ``top_k`` most likely tokens; -1 turns it off, otherwise a positive integer (a value
            above the vocabulary size keeps every token).
        max_tokens: the most tokens to generate, >= 1. A value larger than the room left under the engine's
            ``max_model_len`` is not an error: generation stops when prompt + completion reach ``max_model_len``
            tokens, with finish_reason "length".
        ignore_eos: keep generating after the end-of-sequence token (until max_tokens or max_model_len).
        stop_token_ids: extra token ids that end the request (finish_reason "stop"), like EOS.
        seed: this request's own random seed (None: the engine's generator). An int (or numpy integer) in
            ``[-2**63, 2**64 - 1]``, ``torch.Generator.manual_seed``'s range. With a seed, the noise that draws
            the token at position ``p`` depends on ``(seed, p)`` only (:mod:`nanovllm.layers.seeded_noise`), so
            the request samples the same tokens alone or in any batch, and whatever the engine's own seed.

    Raises:
        ValueError: a field is out of range; the message names the field.
        TypeError: a field has the wrong type; the message names the field.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 64
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check (and normalize to Python types) every field; ``LLM.generate`` calls it again, so a field changed
        after construction is caught too. Raises ValueError / TypeError naming the field."""
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"SamplingParams.{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("top_k", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"SamplingParams.{name} must be an int, got {value!r}")
            setattr(self, name, int(value))
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not 0.0 <= self.temperature <= FLOAT32_MAX:  # also catches NaN
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy) and finite in float32 "
                             f"(at most {FLOAT32_MAX:.7g}), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or a positive integer, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
                raise TypeError(f"SamplingParams.stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
            ids = list(self.stop_token_ids)
            if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in ids):
                raise TypeError(f"SamplingParams.stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
            if any(t < 0 for t in ids):
                raise ValueError(f"SamplingParams.stop_token_ids must be token ids >= 0, got {ids}")
            self.stop_token_ids = [int(t) for t in ids]
        self.seed = check_seed(self.seed, "SamplingParams.seed")

    @property
    def greedy(self) -> bool:
        """True when the request decodes greedily (temperature 0)."""
        return self.temperature == 0.0
