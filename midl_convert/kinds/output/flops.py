"""FLOPs of an output-side layer, term by term as its ``mix_rows`` computes them."""
from __future__ import annotations

from ...flops import dense_flops


def midl_flops_parts(
    in_features: int, out_features: int, keep: float, rank: int, rows: int, groups: int, k: float
) -> dict[str, int]:
    """FLOPs of each step of a MID-L layer over ``rows`` input rows split into ``groups`` masks.

    ``groups == rows`` for token/pixel granularity, the number of samples for sequence/sample.
    ``keep >= 1`` runs the dense layer, so it costs exactly that (no gate is computed).
    """
    if keep >= 1.0:
        return {"dense": dense_flops(in_features, out_features, rows)}
    r, out = rank, out_features
    return {
        "light_down": 2 * r * in_features * rows,  # h = V x on every row
        "pool": r * rows if rows > groups else 0,  # mean of h over each group's rows
        "gate": 2 * r * out * groups,  # scores from the (pooled) h, one per mask group
        "topk": out * groups,  # one pass over the scores per mask
        "light_up": 2 * r * out * rows,  # U h: computed on every row, selected neurons included
        "exact": round(2 * k * in_features * rows),  # the k selected rows of W (k a mean, for adaptive masks)
        "blend": out * rows,  # bias on the light path (and the scatter of exact rows)
    }
