"""Output side (MID-L, the paper's): a mask per input picks the ``k`` output neurons (rows of ``W``)
computed exactly; a rank-r light path gives the rest."""
from ..registry import Kind, register_kind
from .flops import midl_flops_parts
from .layer import OutputMIDLConv2d, OutputMIDLinear

KIND = register_kind(Kind(
    name="output", linear=OutputMIDLinear, conv=OutputMIDLConv2d, flops_parts=midl_flops_parts, picks_outputs=True,
    budget_grid=lambda config: (config.budget_keeps, config.budget_ranks), shares_whitened_svd=True,
    description="output (MID-L): a mask picks rows of W",
))

__all__ = ["KIND", "OutputMIDLConv2d", "OutputMIDLinear", "midl_flops_parts"]
