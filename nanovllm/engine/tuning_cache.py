"""The engine's on-disk tuning cache: where the dispatch decisions of this GPU are kept between runs.

The dispatchers (``fusion_pass.kernels.cached_choice``: the fused op and the small-M linear) measure each shape on
the GPU at hand. The engine keeps their decisions in a JSON file (``fusion_pass.save_tuning`` format, each row
tagged with its GPU's name and the versions of :func:`fusion_pass.kernels.versions_tag`), so a restart reuses
them and a new GPU, or a new torch / Triton, is measured once:

- ``tuning_file=None`` (the default): ``<cache folder>/tuning/<gpu>-<versions>.json``, the cache folder being
  ``$NANOVLLM_CACHE`` or ``~/.cache/nanovllm`` (:func:`nanovllm.utils.default_model.cache_root`);
- a path: that file, as given;
- ``False``: no file (every start measures again).

At engine build every rank loads the file before pretuning (a missing, unreadable or corrupt file loads nothing,
with one warning); rank 0 writes it, atomically, when something new was measured.
"""
from __future__ import annotations

import os
import re

import torch


def _slug(text: str) -> str:
    """``text`` lower-cased with every run of characters outside ``[a-z0-9.+]`` replaced by one ``-``."""
    return re.sub(r"[^a-z0-9.+]+", "-", text.lower()).strip("-")


def default_tuning_path(gpu_name: str) -> str:
    """The default tuning file of a GPU: ``<cache folder>/tuning/<gpu-name-slug>-<versions>.json``, e.g.
    ``~/.cache/nanovllm/tuning/nvidia-h100-80gb-hbm3-torch2.11.0+cu128-triton3.6.0-f1.json``."""
    from fusion_pass.kernels import versions_tag
    from nanovllm.utils.default_model import cache_root

    return os.path.join(cache_root(), "tuning", f"{_slug(gpu_name)}-{_slug(versions_tag())}.json")


def resolve_tuning_path(setting: str | bool | None, device: torch.device) -> str | None:
    """The tuning file of the engine's ``tuning_file`` keyword (validated by Config) on ``device``: the default
    file of its GPU for None, the path as given, None (no file) for False or a device other than CUDA."""
    if setting is False or device.type != "cuda":
        return None
    if setting is None:
        from fusion_pass import launch

        return default_tuning_path(launch.device_name(device))
    return str(setting)


def use_tuning_file(setting: str | bool | None, device: torch.device, rank: int) -> str | None:
    """Point the dispatchers at the engine's tuning file and load its decisions; returns the path (None: off).

    Every rank loads the file (``fusion_pass.kernels.load_tuning_file``: forgiving); only rank 0 gets it as the
    ``tuning_file`` kernel setting, so only rank 0 writes it (after a pretune that measured something, and on each
    first-use measurement later).
    """
    from fusion_pass.kernels import load_tuning_file
    from fusion_pass.settings import configure_kernels

    path = resolve_tuning_path(setting, device)
    configure_kernels(tuning_file=path if rank == 0 else None)
    if path is not None:
        load_tuning_file(path)
    return path

