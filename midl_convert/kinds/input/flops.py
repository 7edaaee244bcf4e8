"""FLOPs of an input-side layer, term by term as its ``mix_rows`` computes them, and of its op
(``midl::input_rows``) as ``FlopCounterMode`` sees it run."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ...kernels import KERNEL_MAX_ROWS, input_scores, kernel_runs, mean_picks


def input_flops_parts(
    in_features: int, out_features: int, rank: int, rows: int, groups: int, k: float, centred: bool = False
) -> dict[str, int]:
    """FLOPs of each step of an input-side layer (``layer.py``) over ``rows`` rows in ``groups`` masks (at
    keep 1 the layer runs, and costs, as the dense layer instead: ``SparseLayer.keeps_all``).

    The light path runs on every row's left-out inputs as a dense product (``V`` reads all of
    ``in``); the exact path reads the ``k`` selected columns of ``W``. A ``centred`` layer subtracts
    its centre from every input first (``W centre`` is folded into the bias once, not per row).
    """
    r, out = rank, out_features
    return {
        **({"centre": in_features * rows} if centred else {}),  # x - centre on every row
        "score": 2 * in_features * rows + in_features * groups,  # |x| (pooled over a group's rows), times g c per mask
        "topk": in_features * groups,  # one pass over the scores per mask
        "exact": round(2 * k * out * rows),  # the k selected columns of W (k a mean, for adaptive masks)
        "light_down": 2 * r * in_features * rows,  # V on the left-out inputs
        "light_up": 2 * r * out * rows,
        "blend": out * rows,  # bias (and the light path's sum)
    }


@register_flop_formula(torch.ops.midl.input_rows, get_raw=True)
def input_rows_flops(x, wt, bias, v, u, scale, k, threshold, wt_scale=None, centre=None,  # noqa: ANN001
                     out_val=None) -> int:
    """``input_flops_parts`` for the rows (the centre's subtraction included); when the masked GEMM
    ran, every input counts."""
    (in_f, out_f), rows = wt.shape, x.shape[0]
    if not kernel_runs("input_rows", x, wt, KERNEL_MAX_ROWS):
        picked = in_f
    else:
        picked = mean_picks(input_scores(x if centre is None else x - centre, scale), k, threshold)
    return sum(input_flops_parts(in_f, out_f, v.shape[0], rows, rows, picked, centre is not None).values())  # a mask per row
