"""Static pruning: one fixed set of input columns for every input (a peer row, not in the "auto" grid)."""
from ..registry import Kind, register_kind
from .flops import prune_flops_parts
from .layer import PruneConv2d, PruneLinear

KIND = register_kind(Kind(
    name="prune", linear=PruneLinear, conv=PruneConv2d, flops_parts=prune_flops_parts, picks_outputs=False,
    budget_grid=lambda config: (config.budget_input_keeps, [0]), light_path=False, in_auto=False,
    description="prune: one fixed set of columns of W for every input",
))

__all__ = ["KIND", "PruneConv2d", "PruneLinear", "prune_flops_parts"]
