"""Input side: a mask per input picks the ``k`` input neurons (columns of ``W``) that the exact path
reads; a rank-r light path takes the rest (TEAL / WINA at rank 0, R-Sparse above)."""
from ..registry import Kind, register_kind
from .flops import input_flops_parts
from .layer import CENTRINGS, InputMIDLBase, InputMIDLConv2d, InputMIDLinear

KIND = register_kind(Kind(
    name="input", linear=InputMIDLinear, conv=InputMIDLConv2d, flops_parts=input_flops_parts, picks_outputs=False,
    budget_grid=lambda config: (config.budget_input_keeps, config.budget_input_ranks), centres=True,
    description="input: a mask picks columns of W",
))

__all__ = ["CENTRINGS", "KIND", "InputMIDLBase", "InputMIDLConv2d", "InputMIDLinear", "input_flops_parts"]
