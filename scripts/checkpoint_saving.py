"""Saving a trained checkpoint beside its source: the source's dtype, config and tokenizer files, safetensors
weights, and a reload with transformers that checks the dtype and the tied embeddings.

Used by ``scripts/train_markov_checkpoint.py`` (with scripts/ on ``sys.path``).
"""
from __future__ import annotations

import glob
import inspect
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch

from markov_chain import MARKOV_FILE

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Files of the source checkpoint that are not copied as "tokenizer files": weights, weight indexes, the model
# config (written by save_pretrained and then merged with the source's), our own chain file, and the stamp of
# nanovllm.utils.tiny_model (copying it would make build_tiny_checkpoint mistake the output for its own cache).
_NOT_COPIED_NAMES: frozenset[str] = frozenset({"config.json", MARKOV_FILE, "nanovllm_stamp.json"})
_NOT_COPIED_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                                         ".index.json")


def source_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype named by a config.json dict (``torch_dtype`` or ``dtype``); bfloat16 when absent or unknown."""
    name = config.get("torch_dtype") or config.get("dtype")
    return DTYPES.get(str(name).replace("torch.", ""), torch.bfloat16)


def copy_tokenizer_files(src: str, out: str) -> list[str]:
    """Copy every plain file of ``src`` that is not weights, a weight index, config.json or markov.json
    (tokenizer files, generation_config.json, ...) into ``out``; returns the copied names, sorted."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name in _NOT_COPIED_NAMES or name.endswith(_NOT_COPIED_SUFFIXES):
            continue
        shutil.copyfile(path, os.path.join(out, name))
        copied.append(name)
    return copied


def save_checkpoint(model: Any, src: str, out: str, dtype: torch.dtype) -> list[str]:
    """Save ``model`` in ``dtype`` as safetensors into ``out`` with the source's config and tokenizer files.

    The written config.json is save_pretrained's, updated with every key of the source's config.json (so it
    keeps e.g. the top-level ``rope_theta`` of make_qwen3_06b_checkpoint.py) and with ``dtype`` (and
    ``torch_dtype`` when the source had that key) set to ``dtype``. Old ``model*.safetensors*`` files in ``out``
    are removed first. The model is converted to ``dtype`` in place.

    Returns:
        The names of the files copied from ``src`` (see :func:`copy_tokenizer_files`).
    """
    os.makedirs(out, exist_ok=True)
    for old in glob.glob(os.path.join(out, "model*.safetensors*")) + glob.glob(os.path.join(out, "pytorch_model*")):
        os.remove(old)
    model.to(dtype)
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:  # transformers 4.x/5.x
        kwargs["safe_serialization"] = True
    model.save_pretrained(out, **kwargs)
    with open(os.path.join(src, "config.json")) as f:
        src_cfg = json.load(f)
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(src_cfg)
    name = str(dtype).replace("torch.", "")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return copy_tokenizer_files(src, out)


def verify_saved(out: str, dtype: torch.dtype) -> dict[str, Any]:
    """Reload ``out`` with transformers (on the CPU, in ``dtype``) and check it.

    Returns:
        tied (lm_head shares embed_tokens' storage), lm_head_equals_embed (equal values).

    Raises:
        RuntimeError: the config asks for tied embeddings but lm_head differs from embed_tokens, or a parameter
            has another dtype than ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    emb = m.get_input_embeddings().weight
    head = m.get_output_embeddings().weight
    equal = bool(torch.equal(emb, head))
    tied_cfg = bool(getattr(m.config, "tie_word_embeddings", False))
    if tied_cfg and not equal:
        raise RuntimeError(f"{out}: tie_word_embeddings=True but lm_head.weight != embed_tokens.weight after reload")
    bad = sorted({str(p.dtype) for p in m.parameters()} - {str(dtype)})
    if bad:
        raise RuntimeError(f"{out}: parameters in {bad}, expected {dtype}")
    return {"tied": head.data_ptr() == emb.data_ptr(), "lm_head_equals_embed": equal,
            "tie_word_embeddings": tied_cfg}
