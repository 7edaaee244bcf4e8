"""The front door: the graph pass, the plan (a fixed keep, or the layer budget), then the swap.

Kept apart from ``surgery`` (plans and swaps) and ``budget`` (measured plans) so imports run one
way: ``conversion`` -> ``budget`` -> ``surgery``.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .budget import budget_plan
from .config import MIDLConfig
from .data import Batch
from .errors import MIDLError
from .graph import TargetTable, find_targets
from .quality import output_of
from .surgery import Plan, apply_plan, make_plan
from .weight_dtype import set_weight_dtype


def plan_conversion(
    model: nn.Module, config: MIDLConfig | None = None, example_inputs: Any = None,
    batches: Sequence[Batch] | None = None, output: str | None = None, progress: bool = True,
) -> tuple[Plan, TargetTable]:
    """The dry run: the graph pass and the plan, with the model untouched.

    With ``config.flops_ratio`` or ``config.speedup`` the layer budget (``budget.py``) measures each layer on
    ``batches`` and picks its keep and rank; ``output`` is what to compare (``logits``,
    ``embedding`` or ``hidden``), read off the model's output when not given.
    """
    config = config or MIDLConfig()
    table = find_targets(model, example_inputs)
    if not table.targets:
        raise MIDLError(f"{type(model).__name__} has no nn.Linear, HF Conv1D or 1x1 nn.Conv2d to convert")
    plan = make_plan(table, config)
    if config.budgeted:
        if not batches or example_inputs is None:
            raise MIDLError(f"{'flops_ratio' if config.target[0] == 'flops' else 'speedup'} needs example_inputs and a few calibration batches to measure each layer's damage: "
                            "convert(model, config, example_inputs, batches=[Batch(...), ...])")
        plan = budget_plan(model, plan, config, batches, output or output_of(model, batches[0]), example_inputs,
                           progress=progress)
    return plan, table


def convert(
    model: nn.Module, config: MIDLConfig | None = None, example_inputs: Any = None,
    batches: Sequence[Batch] | None = None, output: str | None = None, progress: bool = True,
) -> tuple[nn.Module, Plan]:
    """Replace the planned layers of ``model`` in place by MID-L layers; returns ``(model, plan)``.

    ``batches`` (and ``output``) are needed only for a layer budget (``config.flops_ratio`` or ``config.speedup``);
    ``progress=False`` hides its measuring bar. ``config.weight_dtype`` is applied last: to calibrate or
    distil, convert in float32 and call ``set_weight_dtype`` after (as ``midl-convert`` runs do).
    """
    plan, _ = plan_conversion(model, config, example_inputs, batches, output, progress)
    plan.weight_dtype = (config or MIDLConfig()).weight_dtype
    return set_weight_dtype(apply_plan(model, plan), plan.weight_dtype), plan


__all__ = ["convert", "plan_conversion"]
