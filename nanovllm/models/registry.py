"""Architecture name -> model class, and the config checks that run before any weight is read.

A checkpoint's class is found by ``config.architectures[0]`` (e.g. ``"LlamaForCausalLM"``), or by
``config.model_type`` (e.g. ``"llama"``) when the config names no architecture.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from nanovllm.layers.rotary_embedding import check_rope
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.mistral import MistralForCausalLM
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
MODEL_TYPES: dict[str, str] = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def architecture(config: PretrainedConfig) -> str:
    """The supported architecture name the config resolves to.

    Raises:
        ValueError: the config's architecture (or, without one, its model_type) is not supported; the message
            names it and lists the supported ones.
    """
    names = getattr(config, "architectures", None) or []
    if names:
        name = names[0]
    else:
        name = MODEL_TYPES.get(getattr(config, "model_type", None) or "", "")
        if not name:
            name = f"model_type {getattr(config, 'model_type', None)!r}"
    if name not in MODEL_CLASSES:
        raise ValueError(f"model: architecture {name} is not supported (supported: {', '.join(sorted(MODEL_CLASSES))})")
    return name


def check_model_config(config: PretrainedConfig, max_model_len: int) -> None:
    """Every check of a checkpoint's config that needs no weight: the architecture, the RoPE type, and a sliding
    window (Mistral; Qwen2/Qwen3 with ``use_sliding_window``) that never takes effect.

    Args:
        config: the checkpoint's Hugging Face config.
        max_model_len: the longest sequence the engine will run (tokens).

    Raises:
        ValueError: an unsupported architecture or rope type (named), or a ``sliding_window`` shorter than
            ``max_model_len`` (sliding-window attention is not supported).
    """
    architecture(config)
    check_rope(config)
    window = getattr(config, "sliding_window", None)
    use_window = getattr(config, "use_sliding_window", True)  # Qwen configs carry a window they do not use
    if window is not None and use_window and window < max_model_len:
        raise ValueError(f"model: sliding-window attention is not supported (sliding_window={window} < "
                         f"max_model_len={max_model_len}); pass max_model_len <= {window}")


def model_class(config: PretrainedConfig) -> type[LlamaForCausalLM]:
    """The class that builds the model of ``config`` (see :func:`architecture` for the errors)."""
    return MODEL_CLASSES[architecture(config)]
