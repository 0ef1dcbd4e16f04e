"""Load Hugging Face safetensors checkpoints (one file or sharded with model.safetensors.index.json)."""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from torch import nn


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint folder.

    Raises:
        ValueError: the folder has no ``*.safetensors`` file, or the index names a missing shard.
    """
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise ValueError(f"model: the index names shards that are missing: {missing}")
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors file in {path!r}")
    return files


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers that old checkpoints stored beside the weights


def check_tokenizer_files(path: str) -> None:
    """Raise ValueError unless the folder holds a tokenizer (one of :data:`TOKENIZER_FILES`).

    Without this check transformers may build an empty tokenizer from ``tokenizer_config.json`` alone or fall
    back to a download, and every prompt would encode to nothing useful.
    """
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"model: no tokenizer files in {path!r} (expected one of {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer beside the weights (tokenizer.save_pretrained(folder))")


def checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the checkpoint and its shape, read from the safetensors headers (no tensor data).

    Raises:
        ValueError: a file whose header cannot be read (truncated, or not a safetensors file), named.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for file in checkpoint_files(path):
        try:
            with safe_open(file, "pt", "cpu") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except SafetensorError as e:
            raise ValueError(f"model: {file!r} is not a readable safetensors file ({e})") from e
    return shapes


def check_checkpoint(model: nn.Module, path: str) -> None:
    """Compare the checkpoint's tensors with those the model's config implies, before any weight is read.

    ``model.expected_tensors()`` gives ``(required, optional)`` dicts of Hugging Face names and full (unsharded)
    shapes; the check runs on the full shapes, so it holds under tensor parallelism too. Tensors the model does
    not know (apart from :data:`IGNORED_SUFFIXES`) are refused as well: they mean the checkpoint is of another
    architecture than its config says.

    Raises:
        ValueError: naming each tensor (up to 5) that is missing, unexpected, or whose shape in the file differs
            from the shape the config implies.
    """
    required, optional = model.expected_tensors()  # type: ignore[operator]
    found = checkpoint_shapes(path)
    problems = [f"tensor {n!r} is missing (the config implies shape {list(required[n])})"
                for n in required if n not in found]
    for name, shape in found.items():
        want = required.get(name, optional.get(name))
        if want is None:
            if not name.endswith(IGNORED_SUFFIXES):
                problems.append(f"tensor {name!r} (shape {list(shape)}) is not part of this architecture")
        elif tuple(want) != shape:
            problems.append(f"tensor {name!r} has shape {list(shape)} in the file but the config implies {list(want)}")
    if problems:
        more = f" ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(f"model: the checkpoint at {path!r} does not match its config: "
                         + "; ".join(problems[:5]) + more)


def load_model(model: nn.Module, path: str) -> None:
    """Check the checkpoint against the config (:func:`check_checkpoint`, where the model has
    ``expected_tensors``), then copy every checkpoint tensor into ``model``'s parameters, merging packed
    projections.

    The model's ``packed_modules_mapping`` maps a checkpoint name part (``q_proj``) to the merged module
    (``qkv_proj``) and a shard id; each parameter's ``weight_loader`` places (and, under tensor parallelism,
    slices) the tensor. Checkpoint tensors with no parameter (a tied ``lm_head.weight``) are skipped.

    Raises:
        ValueError: a tensor missing, unexpected or of the wrong shape (:func:`check_checkpoint`), or a parameter
            of the model that got no tensor from the checkpoint.
    """
    if hasattr(model, "expected_tensors"):
        check_checkpoint(model, path)
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for file in checkpoint_files(path):
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                target, shard_id = name, None
                for part, (merged, sid) in packed.items():
                    if f".{part}." in name:
                        target, shard_id = name.replace(f".{part}.", f".{merged}."), sid
                        break
                param = params.get(target)
                if param is None:
                    continue
                tensor = f.get_tensor(name)
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    param.data.copy_(tensor)
                else:
                    loader(param, tensor, shard_id) if shard_id is not None else loader(param, tensor)
                loaded.add(target)
    tied = {n for n, p in params.items() if any(p is q for m, q in params.items() if m in loaded)}
    missing = sorted(set(params) - loaded - tied)
    if missing:
        raise ValueError(f"model: the checkpoint at {path!r} lacks tensors for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
