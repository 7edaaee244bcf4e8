"""The layer budget: each layer's keep and rank (or dense), chosen from measured damage so the whole
model reaches a FLOPs ratio (``MIDLConfig(flops_ratio=1.5)``, ``--flops-ratio 1.5``) or a speed-up
measured on this machine (``MIDLConfig(speedup=1.3)``, ``--speedup 1.3``).

Three stages, a file each:

- ``budget_options.py``: the (select, keep, rank) grid each candidate layer tries, and each option's FLOPs;
- ``budget_damage.py``: each option's damage at the model's output and, under ``speedup``, its time at
  the model's real call shape, cached on disk;
- ``budget_knapsack.py``: the options that reach the target at the least summed damage.

A target the options cannot reach fails before any damage is measured.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from .budget_damage import damage_batches, judged_per_layer, measure, measure_damage
from .budget_knapsack import allocate, check_reachable, max_ratio, predicted_ratio
from .budget_options import AXES, LayerCost, Measurements, Option, grid, input_shapes, option_costs, option_flops
from .config import MIDLConfig
from .data import Batch
from .deprecation import renamed_kwargs
from .errors import MIDLError
from .surgery import Plan

TOO_SENSITIVE = "too sensitive: the budget is met with less damage elsewhere"
NO_TIME = "no time to gain: at the model's call shape every option tried ran slower than the dense layer"
NO_GAIN = "no FLOPs to gain: at every keep and rank tried, the gate and light path cost as much as the rows skipped"


@renamed_kwargs(kind="output")
def budget_plan(
    model: nn.Module, plan: Plan, config: MIDLConfig, batches: Sequence[Batch], output: str, example_inputs: Any,
    whiten: bool = True, use_cache: bool = True, progress: bool = True,
) -> Plan:
    """``plan`` with each candidate's keep and rank chosen for ``config.flops_ratio`` or ``config.speedup``
    (or dense, and why); ``output`` is what damage compares ("logits", "embedding", "hidden"). ``progress=False``
    hides the measuring bar (it shows only on a terminal anyway)."""
    if config.target is None:
        raise MIDLError("budget_plan needs MIDLConfig(flops_ratio=...) or MIDLConfig(speedup=...), e.g. flops_ratio=1.5")
    axis, target = config.target
    m = measure(model, plan, config, batches, output, example_inputs, whiten, use_cache, progress)
    choice = allocate(m, target)
    layers = []
    for lp in plan.layers:
        if lp.path not in m.layers:
            layers.append(lp)
            continue
        o = choice.get(lp.path)
        if o is None:
            reason = (NO_GAIN if axis == "flops" else NO_TIME) if not m.layers[lp.path].options else TOO_SENSITIVE
            layers.append(replace(lp, convert=False, keep=None, rank=None, granularity=None, reason=reason))
        else:
            layers.append(replace(lp, keep=o.keep, rank=o.rank, select=o.select, predicted_damage=o.damage))
    damage = sum(o.damage for o in choice.values() if o is not None)
    ratio = predicted_ratio(m, choice)
    summary = {
        "axis": axis, "target": target, "predicted_ratio": ratio, "predicted_damage": damage,
        "reachable": max_ratio(m), "dense_flops": m.dense_total, "measured_layers": len(m.layers),
        "options": sum(len(c.options) for c in m.layers.values()), "seconds": m.seconds, "cached": m.cached,
        "damage_metric": "relative logit MSE" if output == "logits" else "1 - cosine", "knapsack": "lagrangian+greedy",
    }
    if axis == "time":
        summary.update(call=m.call, threads=torch.get_num_threads(), dense_ms=m.dense_time * 1e3,
                       predicted_flops_ratio=predicted_ratio(replace(m, axis="flops"), choice))
    what = "speed-up measured at the call shape (" + str(m.call) + ")" if axis == "time" else "on the example input"
    note = (f"layer budget: target {target:g}x, predicted {ratio:.3f}x {what} (highest "
            f"reachable {summary['reachable']:.3f}x), predicted damage {damage:.4g} ({summary['damage_metric']}, summed over "
            f"layers); {summary['options']} options on {len(m.layers)} layers measured in {m.seconds:.0f}s"
            f"{' (cached)' if m.cached else ''}")
    new = Plan(layers=layers, trace=plan.trace, notes=[*plan.notes, note], budget=summary)
    if not new.converted:
        raise MIDLError(f"the layer budget left every layer dense; raise {'flops_ratio' if axis == 'flops' else 'speedup'} "
                        f"or convert more layers")
    return new


__all__ = ["AXES", "LayerCost", "Measurements", "Option", "allocate", "budget_plan", "check_reachable", "damage_batches", "grid",
           "input_shapes", "judged_per_layer", "max_ratio", "measure", "measure_damage", "option_costs", "option_flops",
           "predicted_ratio"]
