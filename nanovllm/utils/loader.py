"""Load Hugging Face safetensors checkpoints (one file or sharded with model.safetensors.index.json)."""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
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


def load_model(model: nn.Module, path: str) -> None:
    """Copy every checkpoint tensor into ``model``'s parameters, merging packed projections.

    The model's ``packed_modules_mapping`` maps a checkpoint name part (``q_proj``) to the merged module
    (``qkv_proj``) and a shard id; each parameter's ``weight_loader`` places (and, under tensor parallelism,
    slices) the tensor. Checkpoint tensors with no parameter (a tied ``lm_head.weight``) are skipped.

    Raises:
        ValueError: a parameter of the model got no tensor from the checkpoint.
    """
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
