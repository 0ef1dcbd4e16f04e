"""The embedded tiny model: a small random-weight Qwen3 checkpoint with a trained byte-level BPE tokenizer (the
main job's fallback where the real default model is not installed, see :mod:`nanovllm.utils.default_model`).

It needs no download: the tokenizer is trained here with ``tokenizers`` on a built-in text, and the weights are
drawn by ``transformers`` from a fixed seed, so every machine builds the same checkpoint. Tests use it (and
variants with other sizes) as the shared reference for our engine and for ``transformers``.
"""
from __future__ import annotations

import json
import os
from typing import Any

from nanovllm.utils.default_model import cache_root

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """
The quick brown fox jumps over the lazy dog. A paged KV cache splits keys and values into fixed-size blocks.
Large language models generate text one token at a time; each step reads every weight once.
Prefill processes the prompt in parallel, decode produces one token per sequence per step.
Prefix caching lets requests that share a prompt prefix reuse the same blocks of the cache.
The scheduler admits waiting requests while blocks are free and preempts running ones when they run out.
Tensor parallelism splits attention heads and the MLP across devices; an all-reduce sums the partial outputs.
RMSNorm divides a vector by the root of its mean square and scales it by a learned weight.
Once upon a time there was a small engine that wanted to be fast, correct and easy to read.
Hello world! How are you today? I am fine, thank you. What is the capital of France? Paris is.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 42. Symbols: + - * / = < > ( ) [ ] { } # @ & %.
def main(): print("hello") ; for i in range(10): x += i ; return x if x > 0 else -x
"""


def train_tokenizer(vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer on the built-in text and wrap it as a transformers fast tokenizer.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<|im_end|>`` as EOS, ``<|endoftext|>`` as padding and a
        ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, chat_template=CHAT_TEMPLATE)


def tiny_config(**overrides: Any) -> Any:
    """A small Qwen3Config (2 layers, hidden 64, GQA 4/2 heads of 16); keywords override any field.

    initializer_range 0.4 (larger than real models) gives logits with wide margins and greedy outputs that do
    not settle into repeating one token, so token-equality tests have something to compare.
    """
    from transformers import Qwen3Config

    fields: dict[str, Any] = dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, initializer_range=0.4, attention_bias=False, torch_dtype="float32",
    )
    fields.update(overrides)
    return Qwen3Config(**fields)


def build_tiny_checkpoint(path: str, seed: int = 0, tokenizer_vocab_size: int = 512, **config_overrides: Any) -> str:
    """Write a random-weight Qwen3 checkpoint (safetensors) and its tokenizer to ``path``.

    Args:
        path: the folder to write; reused as-is when it already holds a checkpoint built with the same settings.
        seed: seed of the weights.
        tokenizer_vocab_size: BPE vocabulary size (at most the model's ``vocab_size``).
        **config_overrides: Qwen3Config fields (e.g. ``num_hidden_layers=3``, ``torch_dtype="bfloat16"``).

    Returns:
        ``path``.
    """
    import torch
    from transformers import Qwen3ForCausalLM

    stamp = json.dumps({"seed": seed, "tok": tokenizer_vocab_size, **config_overrides}, sort_keys=True, default=str)
    stamp_file = os.path.join(path, "nanovllm_stamp.json")
    if os.path.exists(stamp_file):
        with open(stamp_file) as f:
            if f.read() == stamp:
                return path
    os.makedirs(path, exist_ok=True)
    tokenizer = train_tokenizer(tokenizer_vocab_size)
    config = tiny_config(**config_overrides)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.eos_token_id = eos
    config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config.bos_token_id = None
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(getattr(torch, str(config_overrides.get("torch_dtype", "float32"))))
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    with open(stamp_file, "w") as f:
        f.write(stamp)
    return path


def default_checkpoint_dir() -> str:
    """Where the embedded default model lives: ``$NANOVLLM_CACHE`` or ``~/.cache/nanovllm/tiny-qwen3``."""
    return os.path.join(cache_root(), "tiny-qwen3")
