"""Two FX graph edits used by the pass: running an op on the graph's fake values, and moving nodes up."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx import Node


def meta_value(n: Any) -> Any:
    """A node's ``meta["val"]`` (its fake tensor, or a list of them), None for anything else."""
    return n.meta.get("val") if isinstance(n, Node) else None


def fake_run(target: Any, args: tuple, kwargs: Optional[dict[str, Any]] = None, mode: Any = None) -> Any:
    """Run ``target`` on the meta values of ``args`` / ``kwargs`` under the graph's fake mode (``mode``, or the one
    of the tensors among them); None when there is no fake mode to run under."""
    vals = fx.node.map_arg((args, kwargs or {}), meta_value)
    if mode is None:
        flat = [v for v in torch.utils._pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
        mode = torch._guards.detect_fake_mode(flat)
    if mode is None:
        return None
    with mode:
        return target(*vals[0], **vals[1])


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
