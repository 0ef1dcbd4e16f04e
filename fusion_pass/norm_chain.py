"""The RMSNorm chains that the coconut pass recognizes in Inductor's post-grad ATen graph (fusion_pass.patterns
then finds their linear consumers and rewrites them).

Matched chains (x: [..., K], any rank; eps: any Python number captured from the graph, or a 0-d CPU tensor input,
which is what Dynamo makes of float attributes under dynamic=True):

    xf  = convert_element_type(x, f32)            (absent in fp32 graphs)
    s   = mean.dim(pow(xf, 2) | mul(xf, xf), [-1 | ndim-1], keepdim=True)
    r   = rsqrt(add(s, eps)) | pow(add(s, eps), -0.5)   (add.Tensor or add.Scalar, either operand order; the
                                                    pow form is Gemma 3n's and Gemma 4's spelling of rsqrt)
    n   = mul(xf, r)                              (either order)
    out = mul(convert_element_type(n, dt), g)     Llama/Qwen form (either order; no cast in fp32)
    out = convert_element_type(mul(n, g), dt)     torch.nn.RMSNorm / F.rms_norm / aten._fused_rms_norm form
    with g: [K] (any node: a parameter, or a computed gain such as 1 + w);
    out = convert_element_type(n, dt) | n         no gain (gain None): F.rms_norm(x, (K,)) with weight=None,
                                                  torch.nn.RMSNorm(K, elementwise_affine=False), NanoChat's and
                                                  HRM-text's norms; `n` alone in fp32 graphs
where dt is x's dtype. A chain without a gain is one only when no use of `out` completes a chain with a gain (the
normalized value of a gained norm is not a norm of its own).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import Node

from .fx_edit import meta_value as _val

aten = torch.ops.aten
prims = torch.ops.prims

ADDS = {aten.add.Tensor, aten.add.Scalar}
LOW = (torch.bfloat16, torch.float16)


@dataclass
class NormChain:
    """A matched RMSNorm chain: out = rms_norm(x) [* gain], the nodes from x (excluded) to out (included)."""

    x: Node
    gain: Optional[Node]  # [K]; None for a norm without a gain (the rewrite passes a gain of ones)
    eps: float
    eps_node: Optional[Node]
    weight_in_fp32: bool  # the gain multiplies the fp32 normalized value before the cast (nn.RMSNorm form)
    out: Node
    chain: list[Node]


def is_call(n: Any, targets: Any) -> bool:
    """True when n is a call_function node of `targets` (one op overload, or a set / tuple of them)."""
    if not isinstance(n, Node) or n.op != "call_function":
        return False
    return n.target in targets if isinstance(targets, (set, frozenset, tuple)) else n.target is targets


def cast_of(n: Any) -> Optional[tuple[Node, torch.dtype]]:
    """(source, dtype) when n is a dtype conversion, else None."""
    if is_call(n, prims.convert_element_type.default) and isinstance(n.args[0], Node):
        return n.args[0], n.args[1]
    if is_call(n, aten._to_copy.default) and len(n.args) == 1 and set(n.kwargs) <= {"dtype"} \
            and "dtype" in n.kwargs and isinstance(n.args[0], Node):
        return n.args[0], n.kwargs["dtype"]
    return None


def binary_args(n: Node) -> Optional[tuple[Any, Any]]:
    """The two operands of an add / mul node without an alpha other than 1, else None."""
    if len(n.args) != 2 or any(k != "alpha" for k in n.kwargs) or n.kwargs.get("alpha", 1) != 1:
        return None
    return n.args[0], n.args[1]


def _source_f32(xf: Node) -> Optional[Node]:
    """The activation that xf is the fp32 view of: x if xf = cast(x (bf16/fp16), f32), xf itself if xf is fp32."""
    c = cast_of(xf)
    if c is not None:
        src, dt = c
        v = _val(src)
        if dt is torch.float32 and isinstance(v, torch.Tensor) and v.dtype in LOW:
            return src
        return None
    v = _val(xf)
    if isinstance(v, torch.Tensor) and v.dtype is torch.float32:
        return xf
    return None


def _rsqrt_input(r: Any) -> Optional[Any]:
    """s when r = rsqrt(s) or r = pow(s, -0.5) (the same value up to rounding), else None."""
    if is_call(r, aten.rsqrt.default):
        return r.args[0]
    if is_call(r, aten.pow.Tensor_Scalar) and len(r.args) == 2 and not r.kwargs and r.args[1] == -0.5:
        return r.args[0]
    return None


def _match_normalized(n: Any) -> Optional[tuple[Node, float, Optional[Node], list[Node]]]:
    """Match n = xf * rsqrt(mean(xf^2, -1, keepdim) + eps) (or pow(., -0.5) for rsqrt); returns (x, eps,
    eps_node, chain nodes)."""
    if not is_call(n, aten.mul.Tensor) or len(n.args) != 2:
        return None
    for xf, r in (n.args, n.args[::-1]):
        s = _rsqrt_input(r)
        if not is_call(s, ADDS):
            continue
        ab = binary_args(s)
        if ab is None:
            continue
        for mean, e in (ab, ab[::-1]):
            if not is_call(mean, aten.mean.dim) or mean.kwargs.get("dtype") is not None:
                continue
            keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
            p = mean.args[0]
            xv = _val(xf)
            if not keep or not isinstance(xv, torch.Tensor) or xv.dim() < 1:
                continue
            dims = list(mean.args[1]) if isinstance(mean.args[1], (list, tuple)) else [mean.args[1]]
            if len(dims) != 1 or dims[0] not in (-1, xv.dim() - 1):
                continue
            if is_call(p, aten.pow.Tensor_Scalar) and p.args[1] == 2:
                base = p.args[0]
            elif is_call(p, aten.mul.Tensor) and len(p.args) == 2 and p.args[0] is p.args[1]:
                base = p.args[0]
            else:
                continue
            if base is not xf:
                cb, cx = cast_of(base), cast_of(xf)
                if not (cb and cx and cb[0] is cx[0] and cb[1] == cx[1]):
                    continue
            x = _source_f32(xf)
            if x is None:
                continue
            eps_val, eps_node = _match_eps(e)
            if eps_val is None and eps_node is None:
                continue
            chain = [n, r, s, mean, p] + [b for b in (base, xf) if b is not x]
            if eps_node is not None and is_call(e, prims.convert_element_type.default):
                chain.append(e)
            return x, (eps_val if eps_val is not None else 0.0), eps_node, chain
    return None


def _match_eps(e: Any) -> tuple[Optional[float], Optional[Node]]:
    """A Python number -> (eps, None); a 0-d CPU tensor node (optionally cast to f32) -> (None, node)."""
    if isinstance(e, numbers.Real) and not isinstance(e, bool):
        return float(e), None
    if isinstance(e, Node):
        src = e
        c = cast_of(e)
        if c is not None and c[1] is torch.float32:
            src = c[0]
        v = _val(src)
        if isinstance(v, torch.Tensor) and v.dim() == 0 and v.device.type == "cpu" and v.is_floating_point():
            return None, src
    return None, None


def _gain_ok(g: Any, k: int, dtypes: tuple[torch.dtype, ...]) -> bool:
    v = _val(g)
    return isinstance(g, Node) and isinstance(v, torch.Tensor) and tuple(v.shape) == (k,) and v.dtype in dtypes


def _match_gained(out: Node) -> Optional[NormChain]:
    """A chain with a gain that ends at `out` (the two gained forms of the module docstring)."""
    if is_call(out, aten.mul.Tensor) and len(out.args) == 2:  # Llama/Qwen form (or fp32 graphs)
        for c, g in (out.args, out.args[::-1]):
            if not isinstance(c, Node):
                continue
            cc = cast_of(c)
            nrm = cc[0] if cc is not None else c
            m = _match_normalized(nrm)
            if m is None:
                continue
            x, eps, eps_node, chain = m
            xv = _val(x)
            dt = xv.dtype
            if cc is not None and cc[1] != dt:
                continue
            if cc is None and dt is not torch.float32:
                continue
            if not _gain_ok(g, xv.shape[-1], (dt,)):
                continue
            return NormChain(x, g, eps, eps_node, False, out, [out] + ([c] if cc is not None else []) + chain)
    cc = cast_of(out)
    if cc is not None and is_call(cc[0], aten.mul.Tensor) and len(cc[0].args) == 2:  # nn.RMSNorm form
        mulg = cc[0]
        for nrm, g in (mulg.args, mulg.args[::-1]):
            m = _match_normalized(nrm)
            if m is None:
                continue
            x, eps, eps_node, chain = m
            xv = _val(x)
            dt = xv.dtype
            if cc[1] != dt or dt not in LOW:
                continue
            if not _gain_ok(g, xv.shape[-1], (dt, torch.float32)):
                continue
            return NormChain(x, g, eps, eps_node, True, out, [out, mulg] + chain)
    return None


def _match_gainless(out: Node) -> Optional[NormChain]:
    """A chain without a gain that ends at `out`: cast(n, dt) with x of dtype dt (bf16/fp16), or n with x fp32;
    None when a use of `out` completes a gained chain, or when K is not an integer (the gain of ones is [K])."""
    cc = cast_of(out)
    m = _match_normalized(cc[0] if cc is not None else out)
    if m is None:
        return None
    x, eps, eps_node, chain = m
    xv = _val(x)
    if cc is not None and (cc[1] != xv.dtype or xv.dtype not in LOW):
        return None
    if cc is None and xv.dtype is not torch.float32:
        return None
    if not isinstance(xv.shape[-1], int) or any(_match_gained(u) is not None for u in out.users):
        return None
    return NormChain(x, None, eps, eps_node, False, out, ([out] if cc is not None else []) + chain)


def match_norm(out: Node) -> Optional[NormChain]:
    """Match a norm chain that ends at `out` (see the module docstring): one with a gain first, else one without."""
    return _match_gained(out) or _match_gainless(out)
