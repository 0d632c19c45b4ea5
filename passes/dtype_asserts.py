"""Drop torch.export's dtype assertions from a private copy of a graph (for autocast runs)."""
from __future__ import annotations

import torch.fx as fx

__all__ = ["drop_dtype_asserts"]


def drop_dtype_asserts(gm: fx.GraphModule) -> int:
    """Remove ``torch.export``'s ``_assert_tensor_metadata`` checks from a *private* copy of a graph.

    Export records the dtype of every ``.to()`` input; under ``torch.autocast`` (calibration and
    search in bfloat16) the inputs legitimately change dtype and the checks would fail. Returns
    how many were removed.
    """
    bad = [n for n in gm.graph.nodes
           if n.op == "call_function" and getattr(n.target, "__name__", "").startswith("_assert_tensor_metadata")]
    for n in bad:
        gm.graph.erase_node(n)
    if bad:
        gm.recompile()
    return len(bad)
