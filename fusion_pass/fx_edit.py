"""Two FX graph edits used by the pass: running an op on the graph's fake values, and moving nodes up."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx import Node


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, Node) else None


def fake_run(target: Any, args: tuple) -> Any:
    """Run the op's fake impl on the args' meta values (under the graph's fake mode)."""
    vals = fx.node.map_arg(args, _val)
    flat = [v for v in torch.utils._pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
    mode = torch._guards.detect_fake_mode(flat)
    if mode is None:
        return None
    with mode:
        return target(*vals)


def hoist_all(inputs: list[Node], first: Node, order: dict[Node, int], forbidden: set[Node]) -> bool:
    """Make every input precede `first`, moving pure nodes (and their late dependencies) up when needed.

    Returns False, leaving the graph unchanged, when an input depends on a forbidden node (one that must follow
    the op) or on an impure node that cannot be moved.
    """
    limit = order[first]
    to_move: list[Node] = []
    seen: set[Node] = set()

    def visit(n: Node) -> bool:
        if n in seen or order.get(n, limit) < limit:
            return True
        if n in forbidden or n.op != "call_function" or n.is_impure():
            return False
        seen.add(n)
        for a in n.all_input_nodes:
            if not visit(a):
                return False
        to_move.append(n)
        return True

    if not all(visit(n) for n in inputs):
        return False
    for n in sorted(to_move, key=order.__getitem__):
        first.prepend(n)
    return True
