"""The settings of the fused kernels and of their dispatcher, shared by fusion_pass and the engine.

    from fusion_pass.settings import configure_kernels, kernel_settings
    previous = configure_kernels(pdl=False)      # returns the settings in force before the call
    ...
    configure_kernels(**previous.as_dict())      # restore

One process-wide :class:`KernelSettings`, replaced as a whole by :func:`configure_kernels` (validated field by field)
and read at each launch or dispatch decision, so a change applies to the next call. The coconut backend's options
and the engine's ``LLM(...)`` keywords map onto it; no environment variable is read here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

# Values of ``KernelSettings.variant``: "auto" measures and caches the fastest candidate per shape; the others force
# one path for every site (a forced fused variant outside its range of M falls back to "unfused").
FORCED_VARIANTS: tuple[str, ...] = ("auto", "unfused", "stream", "skinny")


@dataclass(frozen=True)
class KernelSettings:
    """What the fused kernels and the dispatcher do.

    Attributes:
        pdl: launch the decode kernels with programmatic dependent launch on GPUs of compute capability >= 9 (each
            kernel may load its weights while the previous kernel in the stream still runs; see
            :mod:`fusion_pass.launch`). Applies to coconut's kernels and to the engine's.
        autotune: measure the candidates of a shape on first use (outside CUDA-graph capture). Off: shapes never
            measured nor loaded take the unfused path.
        tuning_file: path of a JSON file of dispatch decisions (:func:`fusion_pass.kernels.save_tuning`): each new
            measurement is written there; the engine loads it before measuring. None: nothing is written.
        variant: one of :data:`FORCED_VARIANTS`; "auto" is the measured dispatch.
        poison_outputs: fill every output buffer the Triton paths allocate with NaN before the kernel runs, so an
            element a kernel forgets to write shows up as NaN (tests and GPU correctness checks).
    """

    pdl: bool = True
    autotune: bool = True
    tuning_file: Optional[str] = None
    variant: str = "auto"
    poison_outputs: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (``configure_kernels(**s.as_dict())`` restores ``s``)."""
        return dataclasses.asdict(self)


_BOOL_FIELDS = ("pdl", "autotune", "poison_outputs")
_current = KernelSettings()


def kernel_settings() -> KernelSettings:
    """The settings in force."""
    return _current


def check_value(name: str, value: Any, label: str) -> None:
    """The checks of a kernel setting's value beyond its type: ``variant`` one of :data:`FORCED_VARIANTS`, a
    ``tuning_file`` that is None or not blank.

    Raises:
        ValueError: naming ``label`` (the field as its caller spells it).
    """
    if name == "variant" and value not in FORCED_VARIANTS:
        raise ValueError(f"{label} must be one of {FORCED_VARIANTS}, got {value!r}")
    if name == "tuning_file" and value is not None and not value.strip():
        raise ValueError(f"{label} must be a non-empty path")


def configure_kernels(**changes: Any) -> KernelSettings:
    """Replace the named fields of the settings in force; returns the settings in force before the call.

    Raises:
        TypeError: an unknown field, a non-bool for ``pdl`` / ``autotune`` / ``poison_outputs``, or a
            ``tuning_file`` that is neither a str nor None.
        ValueError: a ``variant`` outside :data:`FORCED_VARIANTS`, or an empty ``tuning_file``.
    """
    global _current
    known = {f.name for f in dataclasses.fields(KernelSettings)}
    for name, value in changes.items():
        if name not in known:
            raise TypeError(f"unknown kernel setting {name!r}; expected one of {sorted(known)}")
        if name in _BOOL_FIELDS and not isinstance(value, bool):
            raise TypeError(f"kernel setting {name} must be a bool, got {value!r}")
    path = changes.get("tuning_file")
    if path is not None and not isinstance(path, str):
        raise TypeError(f"kernel setting tuning_file must be a str or None, got {path!r}")
    for name in ("variant", "tuning_file"):
        if name in changes:
            check_value(name, changes[name], f"kernel setting {name}")
    previous = _current
    _current = dataclasses.replace(_current, **changes)
    return previous
