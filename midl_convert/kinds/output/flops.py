"""FLOPs of an output-side layer, term by term as its ``mix_rows`` computes them, and of its op
(``midl::output_rows``) as ``FlopCounterMode`` sees it run."""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from ...kernels import KERNEL_ROW_LIMIT, kernel_runs, mean_picks, output_scores


def midl_flops_parts(in_features: int, out_features: int, rank: int, rows: int, groups: int, k: float) -> dict[str, int]:
    """FLOPs of each step of a MID-L layer over ``rows`` input rows split into ``groups`` masks.

    ``groups == rows`` for token/pixel granularity, the number of samples for sequence/sample.
    A layer at keep 1 runs as the dense layer and costs that instead (``SparseLayer.keeps_all``).
    """
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


@register_flop_formula(torch.ops.midl.output_rows, get_raw=True)
def output_rows_flops(x, weight, bias, down, up, gate, gate_bias, gate_abs, k, threshold, kernel_rows,  # noqa: ANN001
                      out_val=None) -> int:
    """``midl_flops_parts`` for the rows; when dense compute plus masking ran, every row of W counts."""
    (out_f, in_f), rows = weight.shape, x.shape[0]
    if not kernel_runs("output_rows", x, weight, min(kernel_rows, KERNEL_ROW_LIMIT)):
        picked = out_f
    elif math.isnan(threshold):
        picked = k
    else:
        picked = mean_picks(output_scores(x, down, gate, gate_bias, gate_abs)[1], k, threshold)
    return sum(midl_flops_parts(in_f, out_f, down.shape[0], rows, rows, picked).values())  # one mask per row
