"""FLOPs formulas: the one place that says what a layer costs (2 FLOPs per multiply-add)."""
from __future__ import annotations


def dense_flops(in_features: int, out_features: int, rows: int) -> int:
    """A dense Linear or 1x1 conv applied to ``rows`` positions (tokens or pixels)."""
    return 2 * in_features * out_features * rows
