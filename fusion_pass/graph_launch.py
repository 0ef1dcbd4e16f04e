"""Fused sites that Inductor launches itself: static decode sites as user-defined Triton kernel calls in the graph.

Where no CUDA graph replays a compiled graph (torch.compile's mode "default" or "max-autotune-no-cudagraphs"), a
decode step costs its host time, and a coconut op is a Python kernel behind the dispatcher: about 78 us of host
time per call on the H100 host, against about 12 us for one ``F.linear`` (benchmarks/results/h100/host-overhead.json).
With the backend option ``coconut.launch`` = "graph" (what "auto" picks when Inductor's CUDA graphs are off) the pass
therefore treats the sites whose shapes are all static integers on a CUDA device differently:

- The dispatch decision is taken while the graph compiles (measured then by :func:`fusion_pass.kernels.choose`, or
  loaded from the tuning file), not at each call.
- Where every weight group of the site gets the stream kernel (decode, M <= 2 rows), the op is written out in the
  graph as its launches: empty output buffers and, per group, one ``triton_kernel_wrapper_functional`` node, the
  higher-order op through which Dynamo hands a user's ``@triton.jit`` calls to Inductor
  (torch/_higher_order_ops/triton_kernel_wrap.py). Inductor reinplaces it onto the buffers and launches the kernel
  from its generated wrapper as it launches its own kernels. No programmatic dependent launch there: Inductor's
  launch does not pass the attribute (USE_PDL = False).
- Where the decision is another path (the split-K skinny kernel, or the unfused norm + cuBLAS), the site is left
  to Inductor's own code: with no CUDA graph to replay it, an op call would cost more host time than the fused
  kernel saves on the GPU (the measured ratios are in docs/backend.md).
- A forced ``coconut.variant`` other than "stream", a symbolic M, or an ``eps`` given as a tensor keep the site a
  coconut op, as under "op"; so do non-contiguous inputs where the decision is the stream kernel (the lowering
  takes contiguous tensors only; with another decision the site is left to Inductor).

The decisions are part of the compiled graph, which Inductor's FX-graph cache keeps; the pass's cache key
(:meth:`fusion_pass.backend.CoconutFusionPass.uuid`) holds the kernel settings that steer them, not the measured
decisions.

Under CUDA graphs (mode "reduce-overhead" / "max-autotune", or a caller that captures its own, like the engine,
which asks for "op") the host time of a call is paid once at capture, and the op's PDL launches are worth more.
"""
from __future__ import annotations

import functools
import logging
import operator
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import triton
from torch.fx import Node

from . import kernels
from .fx_edit import fake_run, meta_value as _val
from .kernels.gemv import _fused_stream_kernel, stream_grid
from .kernels.segments import MAX_GROUP
from .launch import next_power_of_2
from .options import LAUNCH_MODES
from .patterns import OP_PLAIN, OP_RESIDUAL, Site
from .settings import kernel_settings

log = logging.getLogger("fusion_pass")

aten = torch.ops.aten


# decide(m, n, k, dtype, device, widths) -> Choice, as fusion_pass.kernels.choose (tests pass their own)
Decide = Callable[[int, int, int, torch.dtype, torch.device, Sequence[int]], "kernels.Choice"]

# {path}: "<variant> (<source>)" per distinct decision; source "default" / "failed": nothing was measured (the
# ``autotune`` setting off, or the measurement raised), so the op would take the unfused path too
LEFT_TO_INDUCTOR = "left to Inductor (coconut.launch 'graph': its decision is {path}, not the stream kernel)"


def resolve_launch(launch: str, cudagraphs: bool) -> str:
    """The launch mode a compile uses: "auto" is "op" when Inductor replays the graph in CUDA graphs, else
    "graph". Raises ValueError on a value outside :data:`LAUNCH_MODES`."""
    if launch not in LAUNCH_MODES:
        raise ValueError(f"coconut.launch must be one of {LAUNCH_MODES}, got {launch!r}")
    if launch == "auto":
        return "op" if cudagraphs else "graph"
    return launch


def _static(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and all(isinstance(d, int) for d in t.shape)


def _groups(widths: Sequence[int], has_bias: Sequence[bool]) -> list[list[int]]:
    return kernels.split_groups(list(widths), list(has_bias))


def decisions(m: int, widths: Sequence[int], has_bias: Sequence[bool], k: int, dtype: torch.dtype,
              device: torch.device, decide: Decide = kernels.choose) -> Optional[list["kernels.Choice"]]:
    """The dispatch decision of each weight group of a static site, measured now if never measured (outside any
    fake mode of the compile: the candidates run on real tensors). None when measuring raised (logged)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        with unset_fake_temporarily():
            return [decide(m, sum(widths[i] for i in g), k, dtype, device, [widths[i] for i in g])
                    for g in _groups(widths, has_bias)]
    except Exception as e:  # noqa: BLE001 - a failed measurement leaves the site a coconut op
        log.warning("coconut: no compile-time decision for M=%d N=%s K=%d (%s: %s); the site stays an op", m,
                    list(widths), k, type(e).__name__, e)
        return None


def _launchable(choices: Optional[list["kernels.Choice"]]) -> bool:
    return choices is not None and all(c.variant == "stream" for c in choices)


def site_admission(decide: Decide = kernels.choose, device_types: tuple[str, ...] = ("cuda",)
                   ) -> Callable[[Site], Optional[str]]:
    """The ``admit`` hook of :func:`fusion_pass.patterns.rewrite_graph` under launch mode "graph": for a matched
    site, None (rewrite it into an op, which :func:`lower_graph` may then write out as launches) or the reason it
    is left to Inductor (static shapes on a device of ``device_types`` whose decision is neither the stream kernel
    nor forced)."""

    def admit(site: Site) -> Optional[str]:
        x = _val(site.x)
        outs = [_val(c.node) for c in site.consumers]
        ws = [_val(c.weight) for c in site.consumers]
        if site.eps_node is not None or not isinstance(x, torch.Tensor) or x.device.type not in device_types:
            return None
        if not all(_static(t) for t in (x, *outs, *ws)):
            return None  # a symbolic M: the op's dispatcher decides per call
        m, k = outs[0].shape[0], ws[0].shape[1]
        choices = decisions(m, [w.shape[0] for w in ws], [c.bias is not None for c in site.consumers], k, x.dtype,
                            x.device, decide)
        if choices is None or _launchable(choices) or any(c.source == "forced" for c in choices):
            return None
        return LEFT_TO_INDUCTOR.format(path=", ".join(sorted({f"{c.variant} ({c.source})" for c in choices})))

    return admit


@functools.lru_cache(maxsize=None)
def _stream_kernel(num_warps: int) -> Any:
    """The stream kernel wrapped with one launch config (Inductor takes num_warps / num_stages of a user-defined
    kernel from its autotuner's configs; with one config it launches that one, unmeasured)."""
    return triton.autotune(configs=[triton.Config({}, num_warps=num_warps, num_stages=1)], key=[])(
        _fused_stream_kernel)


def _call(graph: fx.Graph, mode: Any, target: Any, args: tuple = (),
          kwargs: Optional[dict[str, Any]] = None) -> Node:
    """A new node ``target(*args, **kwargs)`` with its value computed under the graph's fake ``mode``."""
    n = graph.call_function(target, args, kwargs or {})
    val = fake_run(target, args, kwargs, mode)
    if val is not None:
        n.meta["val"] = val
    return n


def _empty(graph: fx.Graph, mode: Any, shape: list[int], like: torch.Tensor) -> Node:
    """An output buffer: uninitialized, or NaN-filled under the ``poison_outputs`` kernel setting (as the op's)."""
    kw = {"dtype": like.dtype, "layout": torch.strided, "device": like.device, "pin_memory": False}
    if kernel_settings().poison_outputs:
        return _call(graph, mode, aten.full.default, (shape, float("nan")), kw)
    return _call(graph, mode, aten.empty.memory_format, (shape,), kw)


def _or(bias: Optional[Node], weight: Node) -> Node:
    """A bias pointer, or (no bias: HAS_BIAS is False and it is never read) the weight's."""
    return bias if bias is not None else weight


def _contiguous(n: Any) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.is_contiguous()


def _op_arguments(op: Node) -> dict[str, Any]:
    """A coconut op node's arguments by schema name, defaults filled in."""
    schema = op.target._schema
    out = {arg.name: arg.default_value for arg in schema.arguments if arg.has_default_value()}
    out.update(zip((arg.name for arg in schema.arguments), op.args))
    out.update(op.kwargs)
    return out


def lower_node(graph: fx.Graph, op: Node, decide: Decide = kernels.choose,
               device_types: tuple[str, ...] = ("cuda",)) -> bool:
    """Replace one coconut op node by its stream-kernel launches when it qualifies (module docstring); returns
    whether it did. Qualifies: static shapes on a device of ``device_types``, ``eps`` a Python float, contiguous
    activations, weights, gain and biases, no empty dimension, and the stream kernel decided for every group."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional

    a = _op_arguments(op)
    x, r, gain, weights, biases = a["x"], a.get("residual"), a["norm_weight"], a["weights"], a["biases"]
    eps, eps_tensor = a["eps"], a["eps_tensor"]
    xv = _val(x)
    if eps_tensor is not None or not _static(xv) or xv.device.type not in device_types:
        return False
    wv = [_val(w) for w in weights]
    if not all(_static(v) for v in wv) or not all(_contiguous(t) for t in (x, r, gain, *weights, *biases)
                                                  if t is not None):
        return False
    k = xv.shape[-1]
    m = functools.reduce(operator.mul, xv.shape[:-1], 1)
    widths = [v.shape[0] for v in wv]
    if m == 0 or k == 0 or 0 in widths:
        return False
    has_bias = [b is not None for b in biases]
    groups = _groups(widths, has_bias)
    choices = decisions(m, widths, has_bias, k, xv.dtype, xv.device, decide)
    if not _launchable(choices):
        return False
    assert choices is not None
    items = {u.args[1]: u for u in op.users if u.target is operator.getitem}
    if len(items) != len(op.users):
        return False
    mode = torch._guards.detect_fake_mode([xv])
    with graph.inserting_before(op):
        x2 = x if xv.dim() == 2 else _call(graph, mode, aten.view.default, (x, [m, k]))
        r2 = None if r is None else (r if xv.dim() == 2 else _call(graph, mode, aten.view.default, (r, [m, k])))
        ys: list[Node] = [_empty(graph, mode, [m, n], xv) for n in widths]
        h: Optional[Node] = _empty(graph, mode, [m, k], xv) if r2 is not None else None
        for gi, (grp, choice) in enumerate(zip(groups, choices)):
            bn, warps, per_sm = choice.config or kernels.stream_configs(m)[0]
            g = len(grp)
            write_h = h is not None and gi == 0
            tensors: dict[str, Node] = {"x_ptr": x2, "r_ptr": r2 if r2 is not None else x2, "g_ptr": gain,
                                        "w_ptr": weights[grp[0]], "b_ptr": _or(biases[grp[0]], weights[grp[0]]),
                                        "y_ptr": ys[grp[0]], "h_ptr": h if write_h else x2}
            consts: dict[str, Any] = {"M": m, "N": widths[grp[0]], "eps": float(eps), "K": k, "HAS_RES": r2 is not None,
                                      "HAS_BIAS": has_bias[grp[0]], "WRITE_H": write_h, "BM": kernels.m_bucket(m),
                                      "BN": bn, "BKP": next_power_of_2(k), "USE_PDL": False, "G": g}
            clone = ["y_ptr"] + (["h_ptr"] if write_h else [])
            for s in range(1, MAX_GROUP):
                names = (f"w{s}_ptr", f"b{s}_ptr", f"y{s}_ptr")
                if s < g:
                    i = grp[s]
                    tensors.update(zip(names, (weights[i], _or(biases[i], weights[i]), ys[i])))
                    consts[f"N{s}"] = widths[i]
                    clone.append(f"y{s}_ptr")
                else:
                    consts.update(dict.fromkeys(names))
                    consts[f"N{s}"] = 0
            grid = stream_grid([widths[i] for i in grp], bn, per_sm, xv.device)
            launch = _call(graph, mode, triton_kernel_wrapper_functional, (), {
                "kernel_idx": kernel_side_table.add_kernel(_stream_kernel(warps)),
                "constant_args_idx": kernel_side_table.add_constant_args(consts),
                "grid": [(grid, 1, 1)], "tma_descriptor_metadata": {}, "kwargs": tensors,
                "tensors_to_clone": clone})
            for s, i in enumerate(grp):
                ys[i] = _call(graph, mode, operator.getitem, (launch, "y_ptr" if s == 0 else f"y{s}_ptr"))
            if write_h:
                h = _call(graph, mode, operator.getitem, (launch, "h_ptr"))
        results: list[Node] = list(ys)
        if h is not None:
            results.append(h if xv.dim() == 2 else _call(graph, mode, aten.view.default, (h, list(xv.shape))))
    for idx, item in items.items():
        item.replace_all_uses_with(results[idx])
        graph.erase_node(item)
    graph.erase_node(op)
    return True


def lower_graph(graph: fx.Graph, decide: Decide = kernels.choose,
                device_types: tuple[str, ...] = ("cuda",)) -> int:
    """:func:`lower_node` for every coconut op of ``graph``; returns how many were written out as launches."""
    count = 0
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in (OP_PLAIN, OP_RESIDUAL):
            count += lower_node(graph, n, decide, device_types)
    if count:
        graph.lint()
    return count
