"""Defining an inference-only op of the ``coconut`` / ``nanovllm`` namespaces with a low host cost per call.

``torch.library.custom_op`` wraps every call in Python layers (an autograd kernel that redispatches, an aliasing
check of the outputs). Defined with ``torch.library.Library`` instead, an op costs less host time per call
(benchmarks/kernels.py --what host-overhead times both registrations side by side; the figures are in
docs/performance.md). It matters where no CUDA graph replays the calls: a prefill calls the engine's ops 112 times
for Qwen3-0.6B (56 linear_small_m, 28 qk_norm_rope, 28 attention).

`define_op` gives the op that ``custom_op(qualname, mutates_args=())`` + ``register_fake`` would, except:

- the schema is inferred from the Python signature (``torch.library.infer_schema``, as ``custom_op`` does) and
  tagged ``pt2_compliant_tag``, as ``custom_op`` tags its ops;
- one Python kernel for every backend (``CompositeExplicitAutograd``); the fake (meta) function for tracing;
- no autograd formula: the ops are for inference (the engine runs under ``torch.inference_mode``; inside a
  compiled training graph the pass's ops run in the forward, where autograd is AOTAutograd's). The kernel and the
  fake function raise RuntimeError when grad mode is on and an input requires grad, at the call (eagerly) or when
  torch.compile traces it, where ``custom_op`` fails at backward. The Autograd key itself is a fallthrough, so a
  call under ``no_grad`` (transformers' ``generate``) costs no more host time than one under ``inference_mode``.
  No output may alias an input (``custom_op`` checks this per call; we do not).

Docs: https://pytorch.org/docs/stable/library.html (``Library.define`` / ``Library.impl``, ``register_fake``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

_LIBRARIES: dict[str, torch.library.Library] = {}


def _library(namespace: str) -> torch.library.Library:
    lib = _LIBRARIES.get(namespace)
    if lib is None:
        lib = _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return lib


def _requires_grad(args: tuple[Any, ...]) -> bool:
    for a in args:
        if isinstance(a, Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)) and any(isinstance(t, Tensor) and t.requires_grad for t in a):
            return True
    return False


def define_op(qualname: str, impl: Callable[..., Any], fake: Callable[..., Any]) -> torch._ops.OpOverload:
    """Define the functional op ``qualname`` ("namespace::name") with kernel `impl` and fake function `fake`.

    Args:
        qualname: "namespace::name"; the op becomes ``torch.ops.namespace.name``.
        impl: the kernel for every device; fully type-annotated (its signature gives the schema); it must not
            mutate its inputs nor return one of them (or a view of one).
        fake: same signature; returns empty tensors of the outputs' shapes and dtypes (symbolic sizes allowed).
    Returns:
        The op's default overload, ``torch.ops.namespace.name.default`` (callable like `impl`).
    Raises:
        ValueError: `qualname` without "::". RuntimeError (from torch): the name is already defined.
        At call time, RuntimeError: grad mode is on and a tensor input requires grad.
    """
    if "::" not in qualname:
        raise ValueError(f"qualname must be 'namespace::name', got {qualname!r}")
    namespace, name = qualname.split("::", 1)
    schema = torch.library.infer_schema(impl, mutates_args=())
    lib = _library(namespace)
    lib.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
    lib.impl(name, _refusing_grad(qualname, impl), "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, _refusing_grad(qualname, fake), lib=lib)
    # No Python kernel at the Autograd key: the dispatcher passes through it in C++ (a Python kernel there cost
    # every call made under no_grad, as transformers' generate makes them, a second trip through Python); the
    # kernels above refuse gradients themselves, eagerly and while torch.compile traces (the fake kernel).
    lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
    return getattr(getattr(torch.ops, namespace), name).default


def _refusing_grad(qualname: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` preceded by the gradient check: RuntimeError when grad mode is on and a tensor input (or a tensor in
    a list input) requires grad. Its signature is ``fn``'s (``functools.wraps``)."""

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and _requires_grad((*args, *kwargs.values())):
            raise RuntimeError(f"{qualname} has no autograd formula (an inference op): call it under "
                               "torch.no_grad() or torch.inference_mode(), or detach its inputs")
        return fn(*args, **kwargs)

    return checked
