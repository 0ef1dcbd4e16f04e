"""A hand-written FX matcher over Inductor's post-grad ATen graph: RMSNorm chains whose every use is a linear.

Norm chains: the forms of fusion_pass.norm_chain (x: [..., K]; eps a number or a 0-d CPU tensor input; the
Llama/Qwen and torch.nn.RMSNorm forms with a [K] gain g, and norms without a gain, which the op gets with a gain of
ones of x's dtype: one [K] `full` node per K, dtype and device at the top of the graph).

Residual form: x = add.Tensor(a, b) with a, b, x of one shape and dtype -> coconut.add_rms_norm_linear, whose h
output replaces every other use of x.

Linear consumers of `out` (every use must be one, else the site is left alone):
    mm(out2d, permute(W, [1, 0]) | t(W))          (+ an optional add(mm, b) with b: [N] as the only use of mm)
    addmm(b, out2d, permute(W, [1, 0]))           (beta = alpha = 1)
    where out2d is `out` itself (2-D) or view/reshape/_unsafe_view(out, [M, K]) (a flatten of the leading dims).
    `out` may also reach them through one row slice (slice over a non-last dim, step 1: generate's last-token
    selection before lm_head); the op then reads the same rows of x (of both residual inputs, unless the sum has
    other uses, when the plain form reads rows of the sum).
All consumers of one norm become ONE coconut call with a list of weights; each replaced node (mm, addmm or the
bias add) is replaced by the matching 2-D output of the op.

Not matched (left alone, results unchanged): norm outputs with any non-linear use (q_norm/k_norm -> RoPE, outputs
of the graph, saved activations in training graphs), weights that are not [N, K] transposes, mixed dtypes
(weight or gain dtype different from the activations, except an fp32 gain in the fp32-weight form), broadcast
residual adds (the plain form is used then), norms over several dims, and anything whose inputs are defined
after the first node that would have to use the op's outputs.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.fx import Node

from . import ops as _ops  # noqa: F401  (registers torch.ops.coconut.*)
from .fx_edit import fake_run as _fake_run, hoist_all as _hoist_all, meta_value as _val
from .norm_chain import NormChain, binary_args as _binary, is_call as _is_call, match_norm
from .stats import PassStats

log = logging.getLogger("fusion_pass")

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}

OP_PLAIN = torch.ops.coconut.rms_norm_linear.default
OP_RESIDUAL = torch.ops.coconut.add_rms_norm_linear.default


@dataclass
class Consumer:
    """One linear that reads the normalized activations. `node` is replaced by the op output (2-D [M, N])."""

    node: Node
    weight: Node
    bias: Optional[Node]
    extra: list[Node] = field(default_factory=list)  # nodes made dead by the rewrite (mm under a bias add, views)


@dataclass
class Site(NormChain):
    """A matched norm chain (fusion_pass.norm_chain.NormChain) and its linear consumers."""

    consumers: list[Consumer] = field(default_factory=list)
    residual: Optional[tuple[Node, Node]] = None
    rows: Optional[tuple[int, Any, Any]] = None  # (dim, start, end): the linears read out[rows] (a row slice)


def _weight_of(b: Any, k: int, dt: torch.dtype) -> Optional[Node]:
    """W when b = permute(W, [1, 0]) or t(W) with W: [N, k] of dtype dt."""
    if _is_call(b, aten.permute.default) and list(b.args[1]) in ([1, 0], [-1, 0], [1, -2], [-1, -2]):
        w = b.args[0]
    elif _is_call(b, aten.t.default):
        w = b.args[0]
    else:
        return None
    v = _val(w)
    if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == k and v.dtype == dt:
        return w
    return None


def _bias_ok(b: Any, n: Any, dt: torch.dtype) -> bool:
    v = _val(b)
    return isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == n and v.dtype == dt


def _as_linear(u: Node, lhs: Node, k: int, dt: torch.dtype) -> Optional[Consumer]:
    if _is_call(u, aten.mm.default) and len(u.args) == 2 and u.args[0] is lhs and u.args[1] is not lhs:
        w = _weight_of(u.args[1], k, dt)
        if w is None:
            return None
        n = _val(w).shape[0]
        if len(u.users) == 1:
            (a,) = u.users
            if _is_call(a, aten.add.Tensor) and _binary(a) is not None:
                other = a.args[1] if a.args[0] is u else a.args[0]
                if other is not u and _bias_ok(other, n, dt) and _val(a).dtype == dt:
                    return Consumer(a, w, other, [u, u.args[1]])
        return Consumer(u, w, None, [u.args[1]])
    if _is_call(u, aten.addmm.default) and len(u.args) == 3 and u.args[1] is lhs and u.args[2] is not lhs:
        if u.kwargs.get("beta", 1) != 1 or u.kwargs.get("alpha", 1) != 1:
            return None
        w = _weight_of(u.args[2], k, dt)
        if w is None or not _bias_ok(u.args[0], _val(w).shape[0], dt):
            return None
        return Consumer(u, w, u.args[0], [u.args[2]])
    return None


def _is_flatten(v: Node, k: int) -> bool:
    """True when v views its input [..., k] as [M, k] (a flatten of the leading dims)."""
    val = _val(v)
    return isinstance(val, torch.Tensor) and val.dim() == 2 and val.shape[1] == k


def _row_slice(u: Node, src: Node) -> Optional[tuple[int, Any, Any]]:
    """(dim, start, end) when u = slice(src, dim, start, end) with step 1 over a dim that is not the last."""
    v = _val(src)
    if not _is_call(u, aten.slice.Tensor) or u.args[0] is not src or not isinstance(v, torch.Tensor):
        return None
    dim, start, end, step = (list(u.args[1:]) + [0, None, None, 1][len(u.args) - 1:])[:4]
    if u.kwargs or step != 1 or not isinstance(dim, int) or dim % v.dim() == v.dim() - 1:
        return None
    if any(b is not None and not isinstance(b, int) for b in (start, end)):
        return None
    return dim % v.dim(), start, end


def find_consumers(site: Site) -> Optional[list[Consumer]]:
    """Every use of site.out as linear consumers, or None if any use is something else.

    A norm whose only use is a row slice (generate's last-token selection before lm_head) is matched through it:
    site.rows is set and the slice joins site.chain (the op then normalizes the sliced rows only).
    """
    src = site.out
    rows = _row_slice(next(iter(src.users)), src) if len(src.users) == 1 else None
    passed: list[Node] = []  # the slice, then the contiguous copy that a reshape of it makes
    if rows is not None:
        passed.append(src := next(iter(src.users)))
        c = next(iter(src.users)) if len(src.users) == 1 else None
        if c is not None and _is_call(c, aten.clone.default) and len(c.args) == 1:
            passed.append(src := c)
    xv = _val(src)
    if not isinstance(xv, torch.Tensor):
        return None
    k, dt = xv.shape[-1], xv.dtype
    out: list[Consumer] = []
    for u in src.users:
        if _is_call(u, _VIEWS) and u.args[0] is src:
            if not _is_flatten(u, k) or not u.users:
                return None
            for uu in u.users:
                c = _as_linear(uu, u, k, dt)
                if c is None:
                    return None
                c.extra.append(u)
                out.append(c)
        elif xv.dim() == 2:
            c = _as_linear(u, src, k, dt)
            if c is None:
                return None
            out.append(c)
        else:
            return None
    if out and rows is not None:
        site.rows = rows
        site.chain.extend(passed)
    return out or None


def _refusal(site: Site) -> tuple[str, bool]:
    """Why find_consumers(site) refused the site, and whether the norm feeds at least one mm/addmm (a candidate)."""
    xv = _val(site.out)
    k = xv.shape[-1] if isinstance(xv, torch.Tensor) else -1
    mms = {aten.mm.default, aten.addmm.default}
    uses: list[Node] = []
    for u in site.out.users:
        if _is_call(u, _VIEWS) and u.args[0] is site.out and _is_flatten(u, k) and u.users:
            uses.extend(u.users)
        else:
            uses.append(u)
    candidate = any(_is_call(u, mms) for u in uses)
    for u in uses:
        if u.op == "output":
            return "an output of the graph (in training: saved for the backward)", candidate
        if _is_call(u, mms):
            if _as_linear(u, site.out, k, xv.dtype) is None and all(
                    _as_linear(u, v, k, xv.dtype) is None for v in u.all_input_nodes if _is_call(v, _VIEWS)):
                return f"{u.name} is not a fusable linear (weight not an [N, K] transpose of the activation dtype, " \
                       "or an unusual bias)", candidate
            continue
        target = getattr(u.target, "__name__", str(u.target))
        return f"used by {u.name} ({target}), not a linear", candidate
    return "a use is not a linear", candidate


def _residual(x: Node) -> Optional[tuple[Node, Node]]:
    if not _is_call(x, aten.add.Tensor) or _binary(x) is None:
        return None
    a, b = x.args
    va, vb, vx = _val(a), _val(b), _val(x)
    if not all(isinstance(v, torch.Tensor) for v in (va, vb, vx)):
        return None
    if va.dtype != vx.dtype or vb.dtype != vx.dtype or va.shape != vx.shape or vb.shape != vx.shape:
        return None
    return a, b


def _ones(graph: fx.Graph, x: Node, ones: dict[tuple[Any, ...], Node]) -> Node:
    """The gain of a norm without one: full([K], 1) of x's dtype and device (the op then computes exactly the cast
    of the normalized value), one node per (K, dtype, device) in `ones`, placed before the graph's first node that
    is not an input (so before every site)."""
    xv = _val(x)
    key = (xv.shape[-1], xv.dtype, xv.device)
    if key not in ones:
        args = ([xv.shape[-1]], 1.0)
        kw = {"dtype": xv.dtype, "layout": torch.strided, "device": xv.device, "pin_memory": False}
        with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
            ones[key] = graph.call_function(aten.full.default, args, kw)
        ones[key].meta["val"] = _fake_run(aten.full.default, args, kw, torch._guards.detect_fake_mode([xv]))
    return ones[key]


def _rewrite(graph: fx.Graph, site: Site, stats: PassStats, renamed: dict[Node, Node]) -> bool:
    site.x = renamed.get(site.x, site.x)
    order = {n: i for i, n in enumerate(graph.nodes)}
    chain = set(site.chain)
    residual = _residual(site.x)
    h_users: list[Node] = []
    if residual is not None:
        h_users = [u for u in site.x.users if u not in chain]
        if site.rows is not None and h_users:  # h is needed whole: keep the add, normalize rows of its result
            residual, h_users = None, []
    targets = [c.node for c in site.consumers] + h_users
    first = min(targets, key=order.__getitem__)
    weights = [c.weight for c in site.consumers]
    biases = [c.bias for c in site.consumers]
    x_inputs = list(residual) if residual is not None else [site.x]
    inputs = x_inputs + [site.gain] + weights + [b for b in biases if b is not None] \
        + ([site.eps_node] if site.eps_node is not None else [])
    if not _hoist_all(inputs, first, order, set(targets) | chain):
        if residual is not None:  # retry without the residual form
            residual, h_users = None, []
            first = min((c.node for c in site.consumers), key=order.__getitem__)
            inputs = [site.x] + inputs[2:]
        if not _hoist_all(inputs, first, order, {c.node for c in site.consumers} | chain):
            stats.skipped.append(f"{site.out.name}: an input depends on a node that must follow the op")
            return False
    order = {n: i for i, n in enumerate(graph.nodes)}
    xs = list(residual) if residual is not None else [site.x]
    if site.rows is not None:  # the op reads the same rows of its inputs as the linears read of the norm
        sliced = []
        for n in xs:
            with graph.inserting_before(first):
                sn = graph.call_function(aten.slice.Tensor, (n, *site.rows))
            sn.meta["val"] = _fake_run(aten.slice.Tensor, (n, *site.rows))
            sliced.append(sn)
        xs = sliced
    if residual is not None:
        target = OP_RESIDUAL
        args: tuple = (xs[0], xs[1], site.gain, weights, biases, site.eps, site.eps_node, site.weight_in_fp32)
    else:
        target = OP_PLAIN
        args = (xs[0], site.gain, weights, biases, site.eps, site.eps_node, site.weight_in_fp32)
    fake = _fake_run(target, args)
    with graph.inserting_before(first):
        op_node = graph.call_function(target, args)
        if fake is not None:
            op_node.meta["val"] = fake
        items = []
        for i in range(len(site.consumers) + (1 if residual is not None else 0)):
            it = graph.call_function(operator.getitem, (op_node, i))
            if fake is not None:
                it.meta["val"] = fake[i]
            items.append(it)
    for c, it in zip(site.consumers, items):
        if "stack_trace" in c.node.meta:
            it.meta["stack_trace"] = c.node.meta["stack_trace"]
        c.node.replace_all_uses_with(it)
    if residual is not None and site.rows is None:
        h = items[-1]
        for u in h_users:
            u.replace_input_with(site.x, h)
        renamed[site.x] = h
    # Erase what became dead, users before producers.
    dead = set(site.chain) | {c.node for c in site.consumers}
    for c in site.consumers:
        dead.update(c.extra)
    if residual is not None:
        dead.add(site.x)
    for n in sorted(dead, key=lambda n: -order.get(n, -1)):
        if n.graph is graph and not n.users:
            graph.erase_node(n)
    stats.sites += 1
    stats.linears += len(site.consumers)
    stats.residual_sites += residual is not None
    return True


def rewrite_graph(graph: fx.Graph, admit: Optional[Callable[[Site], Optional[str]]] = None) -> PassStats:
    """Find every fusable norm -> linear(s) site in a post-grad graph and replace it by one coconut op call.

    ``admit``: called with each matched site before it is rewritten; a string return leaves the site alone with
    that reason, counted in ``left_to_inductor`` (fusion_pass.graph_launch.site_admission), None rewrites it.
    Mutates `graph` in place (and lints it). Returns the statistics of this run.
    """
    stats = PassStats()
    sites: list[Site] = []
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        norm = match_norm(n)
        if norm is None:
            continue
        stats.norms_seen += 1
        site = Site(**vars(norm))
        consumers = find_consumers(site)
        if consumers is None:
            reason, candidate = _refusal(site)
            stats.candidates += candidate
            stats.skipped.append(f"{n.name}: {reason}")
            continue
        stats.candidates += 1
        site.consumers = consumers
        reason = admit(site) if admit is not None else None
        if reason is not None:
            stats.skipped.append(f"{n.name}: {reason}")
            stats.left_to_inductor += 1
            continue
        sites.append(site)
    renamed: dict[Node, Node] = {}
    ones: dict[tuple[Any, ...], Node] = {}
    for site in sites:
        try:
            if site.gain is None:
                site.gain = _ones(graph, site.x, ones)
            _rewrite(graph, site, stats, renamed)
        except Exception as e:  # never break compilation: a failed rewrite is a skipped site
            log.warning("coconut: could not rewrite site at %s: %s", site.out.name, e)
            stats.skipped.append(f"{site.out.name}: {type(e).__name__}: {e}")
    for n in ones.values():
        if not n.users:
            graph.erase_node(n)
    if stats.sites:
        graph.lint()
    return stats
