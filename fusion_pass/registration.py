"""Defining an inference-only op of the ``coconut`` / ``nanovllm`` namespaces with a low host cost per call.

``torch.library.custom_op`` wraps every call in Python layers (an autograd kernel that redispatches, an aliasing
check of the outputs), which cost more than our ops' own Python: on our development CPU an op with the coconut
op's arguments took 19 us per call as a custom_op against 7.5 us defined with ``torch.library.Library`` and one
Python kernel (benchmarks/bench_host_overhead.py times both registrations of each op side by side; the H200
machine's figures are in benchmarks/results/host-overhead-h200.json). A prefill, which no CUDA graph replays, calls
these ops about 170 times (Qwen3-0.6B: 57 coconut, 56 linear_small_m, 28 qk_norm_rope, 28 attention).

`define_op` gives the same op as ``custom_op(qualname, mutates_args=())`` + ``register_fake``, without those layers:

- the schema is inferred from the Python signature (``torch.library.infer_schema``, as ``custom_op`` does);
- one Python kernel for every backend (``CompositeExplicitAutograd``); the fake (meta) function for tracing;
- no autograd formula: the ops are for inference (the engine runs under ``torch.inference_mode``; inside a
  compiled training graph the pass's ops run in the forward, where autograd is AOTAutograd's). A call with grad
  mode on and an input that requires grad raises RuntimeError instead of producing a silently wrong gradient.

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
    lib.define(name + schema)

    @functools.wraps(impl)
    def kernel(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and _requires_grad(args):
            raise RuntimeError(f"{qualname} has no autograd formula (an inference op): call it under "
                               "torch.no_grad() or torch.inference_mode(), or detach its inputs")
        return impl(*args, **kwargs)

    lib.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=lib)
    return getattr(getattr(torch.ops, namespace), name).default
