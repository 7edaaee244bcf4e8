"""FLOPs of a statically pruned layer: the kept columns of ``W`` on every row, nothing else (which
columns is decided once, in calibration; the offset rides in the bias)."""
from __future__ import annotations


def prune_flops_parts(in_features: int, out_features: int, rank: int, rows: int, groups: int, k: float) -> dict[str, int]:
    """FLOPs of each step over ``rows`` rows (``groups`` and ``rank`` do not change the cost: no mask
    is chosen at run time and there is no light path)."""
    return {"exact": round(2 * k * out_features * rows)}
