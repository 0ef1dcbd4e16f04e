"""The coconut backend's `mode` and `options`: Inductor's own, plus a few settings of its own under "coconut.*".

    torch.compile(model, backend="coconut", mode="reduce-overhead")
    torch.compile(model, backend="coconut", options={"max_autotune": True, "coconut.min_sites": 1})

`mode` is resolved with Inductor's own table (``torch._inductor.list_mode_options``), so "reduce-overhead" and
"max-autotune" patch the same Inductor settings (``triton.cudagraphs``, ``max_autotune``,
``coordinate_descent_tuning``) as ``backend="inductor"`` does. Every other option key is an Inductor config key
(``torch._inductor.list_options()``; "-" may stand for "_"), checked for existence and type as Inductor checks it.
Keys that start with "coconut." are the backend's own (see `COCONUT_OPTIONS`); five of them
(`KERNEL_OPTIONS`) set fields of the process-wide :class:`fusion_pass.settings.KernelSettings` when a graph compiles.

Errors: an unknown key, a value of the wrong type or an unknown mode raise `CoconutOptionError`, a subclass of
both RuntimeError (what Inductor raises for the same mistakes) and ValueError.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Any, Optional

from .settings import FORCED_VARIANTS, check_value

#: Values of "coconut.launch" (fusion_pass.graph_launch).
LAUNCH_MODES: tuple[str, ...] = ("auto", "op", "graph")

#: The backend's own option keys: name -> (type, default, meaning). A new setting is one entry here, one field of
#: Settings (same name after "coconut.", same default), and its use in fusion_pass.backend._compile, which
#: receives the Settings of each compile (a new kernel setting: also an entry of KERNEL_OPTIONS).
COCONUT_OPTIONS: dict[str, tuple[type, Any, str]] = {
    "coconut.enable": (bool, True, "install the fusion pass; False compiles with plain Inductor (same mode and "
                                   "options), for A/B comparisons"),
    "coconut.pretune": (bool, True, "on CUDA, time the kernel variants of every fused site of static shape while "
                                    "the graph compiles, so nothing is measured later (inside a CUDA-graph "
                                    "warm-up or capture)"),
    "coconut.min_sites": (int, 0, "raise RuntimeError from the compile when a graph fuses fewer sites (0: never; "
                                  "sites that coconut.launch 'graph' leaves to Inductor by their measured decision "
                                  "count as handled); a guard for benchmarks and CI that must not silently run "
                                  "unfused"),
    "coconut.launch": (str, "auto", "how a fused site of static shape on CUDA runs: 'op' (a coconut op call, the "
                                    "kernel picked per call, PDL launches), 'graph' (the stream kernel's launch "
                                    "written into Inductor's graph, sites measured to need another path left to "
                                    "Inductor; fusion_pass/graph_launch.py), 'auto' ('op' under Inductor's CUDA "
                                    "graphs, else 'graph')"),
    "coconut.warn_unfused": (bool, True, "log a WARNING when a graph has RMSNorm -> linear candidates and none "
                                         "was fused"),
    # Kernel settings (fusion_pass.settings.KernelSettings, same field names). None (the default): leave the
    # process-wide value as it is. Applied when a graph compiles; they are process-wide, so the last compile that
    # names a key decides its value for every compiled graph and for the engine's kernels.
    "coconut.pdl": (bool, None, "programmatic dependent launch of the decode kernels on GPUs of compute "
                                "capability >= 9"),
    "coconut.autotune": (bool, None, "measure the kernel candidates of a new shape on first use; False: unmeasured "
                                     "shapes take the unfused path"),
    "coconut.tuning_file": (str, None, "JSON file of dispatch decisions: read before measuring, written when "
                                       "something new was measured"),
    "coconut.variant": (str, None, f"one of {FORCED_VARIANTS}: 'auto' measures, the others force one path at "
                                   "every site"),
    "coconut.poison_outputs": (bool, None, "fill the Triton paths' output buffers with NaN before the kernels run "
                                           "(correctness checks)"),
}

#: The "coconut.*" keys that are kernel settings: option key -> KernelSettings field.
KERNEL_OPTIONS: dict[str, str] = {k: k.split(".", 1)[1] for k in
                                  ("coconut.pdl", "coconut.autotune", "coconut.tuning_file", "coconut.variant",
                                   "coconut.poison_outputs")}


class CoconutOptionError(RuntimeError, ValueError):
    """A bad `mode` or `options` for the coconut backend (RuntimeError like Inductor's, and ValueError)."""


@dataclass(frozen=True)
class Settings:
    """The parsed "coconut.*" options (defaults in `COCONUT_OPTIONS`); a kernel setting left None is not changed."""

    enable: bool = True
    pretune: bool = True
    min_sites: int = 0
    launch: str = "auto"
    warn_unfused: bool = True
    pdl: Optional[bool] = None
    autotune: Optional[bool] = None
    tuning_file: Optional[str] = None
    variant: Optional[str] = None
    poison_outputs: Optional[bool] = None

    def kernel_changes(self) -> dict[str, Any]:
        """The kernel settings these options set: {KernelSettings field: value}, the None ones left out."""
        return {f: getattr(self, f) for f in KERNEL_OPTIONS.values() if getattr(self, f) is not None}


def _type_name(val: Any) -> str:
    """The name of val's type, qualified when it is not a builtin (numpy's bool_ is "numpy.bool", not "bool")."""
    t = type(val)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _inductor_check(key: str, val: Any, current: dict[str, Any]) -> str:
    """Inductor's own validation of one option (torch/__init__.py, _TorchCompileInductorWrapper.apply_options)."""
    from torch._inductor import config

    name = key.replace("-", "_")
    if name not in current:
        raise CoconutOptionError(f"Unexpected optimization option {key}, known options are "
                                 f"{sorted(current) + sorted(COCONUT_OPTIONS)}")
    get_type = getattr(config, "get_type", None)
    typ = get_type(name) if get_type is not None else None
    if isinstance(typ, type) and typing.get_origin(typ) is None and not isinstance(val, typ):
        raise CoconutOptionError(f"Unexpected type of attr {key}, got {_type_name(val)} should be "
                                 f"{type(current[name]).__name__}")
    return name


def parse_options(mode: Optional[str] = None, options: Optional[dict[str, Any]] = None,
                  dynamic: Optional[bool] = None) -> tuple[dict[str, Any], Settings]:
    """Split torch.compile's `mode` / `options` into Inductor config patches and the coconut `Settings`.

    Args:
        mode: None or a mode name of ``torch._inductor.list_mode_options()`` ("default", "reduce-overhead",
            "max-autotune", "max-autotune-no-cudagraphs", ...); its patches come first, `options` override them.
        options: {key: value}; "coconut.*" keys per `COCONUT_OPTIONS`, every other key an Inductor config key.
        dynamic: torch.compile's `dynamic`, handed to ``list_mode_options`` as Inductor does.
    Returns:
        (Inductor config patches {dotted name: value}, Settings).
    Raises:
        CoconutOptionError (RuntimeError and ValueError): unknown mode, unknown key, value of the wrong type,
        `options` not a dict, a negative "coconut.min_sites", a "coconut.launch" outside LAUNCH_MODES, a "coconut.variant" outside FORCED_VARIANTS, an
        empty "coconut.tuning_file", "coconut.min_sites" > 0 with "coconut.enable" False; the message names the key.
    """
    from torch._inductor import config, list_mode_options

    patches: dict[str, Any] = {}
    if mode is not None and mode != "default":
        if not isinstance(mode, str):
            raise CoconutOptionError(f"mode must be a string, got {type(mode).__name__}")
        try:
            patches.update(list_mode_options(mode, dynamic))
        except RuntimeError as e:  # "Unrecognized mode=..., should be one of: ..."
            raise CoconutOptionError(str(e)) from None
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise CoconutOptionError(f"options must be a dict, got {type(options).__name__}")
    own: dict[str, Any] = {}
    current = config.get_config_copy() if any(not str(k).startswith("coconut.") for k in options) else {}
    for key, val in options.items():
        if not isinstance(key, str):
            raise CoconutOptionError(f"option keys must be strings, got {key!r}")
        if key.startswith("coconut."):
            if key not in COCONUT_OPTIONS:
                raise CoconutOptionError(f"Unexpected coconut option {key}, known coconut options are "
                                         f"{sorted(COCONUT_OPTIONS)}")
            typ = COCONUT_OPTIONS[key][0]
            if val is None and key in KERNEL_OPTIONS:
                continue  # leave the process-wide kernel setting as it is
            if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
                raise CoconutOptionError(f"Unexpected type of attr {key}, got {_type_name(val)} should be "
                                         f"{typ.__name__}")
            if key == "coconut.min_sites" and val < 0:
                raise CoconutOptionError(f"coconut.min_sites must be >= 0, got {val}")
            if key == "coconut.launch" and val not in LAUNCH_MODES:
                raise CoconutOptionError(f"coconut.launch must be one of {LAUNCH_MODES}, got {val!r}")
            if key in KERNEL_OPTIONS:
                try:
                    check_value(KERNEL_OPTIONS[key], val, key)
                except ValueError as e:
                    raise CoconutOptionError(str(e)) from None
            own[key.split(".", 1)[1]] = val
        else:
            patches[_inductor_check(key, val, current)] = val
    if own.get("enable") is False and own.get("min_sites", 0) > 0:
        raise CoconutOptionError(f"coconut.min_sites = {own['min_sites']} asks for fused sites, but coconut.enable "
                                 "is False (no fusion pass runs)")
    names = {f.name for f in fields(Settings)}
    return patches, Settings(**{k: v for k, v in own.items() if k in names})


def combine_options(bound_mode: Optional[str], bound_options: dict[str, Any], mode: Optional[str],
                    options: Optional[dict[str, Any]]) -> tuple[Optional[str], dict[str, Any]]:
    """The mode and options of a ``make_backend(bound_mode, bound_options)`` backend that torch.compile also passes
    a `mode` and / or `options` to: the union of both (a key may be spelled with "-" or "_").

    Raises:
        CoconutOptionError: the torch.compile ones are bad (as `parse_options` raises), or a mode or a key is
            given both ways with different values (the message names it).
    """
    parse_options(mode, options)
    if mode in (None, "default"):
        mode = bound_mode
    elif bound_mode not in (None, "default", mode):
        raise CoconutOptionError(f"mode={mode!r} given to torch.compile, but the backend from make_backend has "
                                 f"mode={bound_mode!r}")
    merged = dict(bound_options)
    names = {k.replace("-", "_"): k for k in merged}
    for key, val in (options or {}).items():
        old = names.get(key.replace("-", "_"))
        if old is not None and merged[old] is not val and merged[old] != val:
            raise CoconutOptionError(f"option {key} is {val!r} in torch.compile's options but {merged[old]!r} in "
                                     "make_backend's")
        merged[old if old is not None else key] = val
    return mode, merged
