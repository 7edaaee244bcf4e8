"""The layer budget's options: the (select, keep, rank) grid each candidate layer tries, and what each
option costs in FLOPs on the example input, counted as the report counts them
(each kind's FLOPs formula on the example input's calls, the rest of the model by ``FlopCounterMode``),
gate and light path included. ``Option``, ``LayerCost`` and ``Measurements`` carry the options and
their FLOPs, seconds and damage from measuring (``budget_damage.py``) to the knapsack
(``budget_knapsack.py``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .config import MIDLConfig, resolve_rank
from .flops import count_flops, dense_flops
from .kinds import all_kinds, build_layer
from .matching import overrides_for
from .running import run_model, watching
from .surgery import LayerPlan, Plan

AXES = ("flops", "time")  # what the knapsack spends: FLOPs on the example input, or measured seconds


@dataclass
class Option:
    """One (select, keep, rank) setting of one layer: its FLOPs (and seconds, when timed) and measured damage."""

    keep: float
    rank: int
    flops: int
    damage: float
    select: str = "output"
    seconds: float | None = None  # per call of the model at its real call shape (``latency.py``)

    def cost(self, axis: str) -> float:
        return self.flops if axis == "flops" else self.seconds


@dataclass
class LayerCost:
    """What converting one layer costs and saves, per option."""

    path: str
    dense_flops: int
    options: list[Option]
    dense_seconds: float | None = None

    def dense(self, axis: str) -> float:
        return self.dense_flops if axis == "flops" else self.dense_seconds

    def saved(self, option: Option | None, axis: str = "flops") -> float:
        return 0 if option is None else self.dense(axis) - option.cost(axis)


@dataclass
class Measurements:
    """The budget's input: the dense model's cost and every candidate layer's options, on one axis:
    ``flops`` (``dense_total``, ``fixed_saved``) or ``time`` (``dense_time``, ``fixed_saved_time``, seconds)."""

    dense_total: int
    layers: dict[str, LayerCost]
    fixed_saved: int  # FLOPs saved by layers the user pinned with an override (not chosen by the budget)
    seconds: float
    key: str
    cached: bool = False
    axis: str = "flops"
    dense_time: float | None = None  # the whole dense model, seconds per call at its real call shape
    fixed_saved_time: float = 0.0
    call: str | None = None  # the call shape times were measured on

    @property
    def total(self) -> float:
        return self.dense_total if self.axis == "flops" else self.dense_time

    @property
    def fixed(self) -> float:
        return self.fixed_saved if self.axis == "flops" else self.fixed_saved_time

    def saved(self, choice: dict[str, Option | None]) -> float:
        """Cost saved on this axis by ``choice`` (pinned layers included)."""
        return self.fixed + sum(self.layers[p].saved(o, self.axis) for p, o in choice.items())

    def to_dict(self) -> dict[str, Any]:
        return {"dense_total": self.dense_total, "fixed_saved": self.fixed_saved, "seconds": self.seconds, "key": self.key,
                "layers": {p: {"dense_flops": c.dense_flops, "options": [asdict(o) for o in c.options]} for p, c in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Measurements":
        layers = {p: LayerCost(p, c["dense_flops"], [Option(**o) for o in c["options"]]) for p, c in d["layers"].items()}
        return cls(d["dense_total"], layers, d["fixed_saved"], d["seconds"], d["key"], cached=True)


# ----- FLOPs of a plan on the example input ---------------------------------------------------
def input_shapes(model: nn.Module, paths: Iterable[str], example_inputs: Any) -> dict[str, list[tuple[int, ...]]]:
    """The input shape of every call of each module in ``paths`` on the example input."""
    shapes: dict[str, list[tuple[int, ...]]] = {p: [] for p in paths}
    with watching({p: model.get_submodule(p) for p in shapes}, lambda p, m, x: shapes[p].append(tuple(x.shape))), \
            torch.no_grad():
        run_model(model, example_inputs)
    return shapes


def option_flops(module: nn.Module, lp: LayerPlan, shapes: Sequence[tuple[int, ...]]) -> tuple[int, int]:
    """(dense, MID-L) FLOPs of ``module`` converted as ``lp`` over calls with these input shapes."""
    shell = build_layer(module, lp, "empty", device="meta")  # shapes and k, no memory
    dense = midl = 0
    for shape in shapes:
        grouped = shell.groups_of(torch.empty(shape, device="meta"))
        rows, groups = grouped.shape[0] * grouped.shape[1], grouped.shape[0]
        dense += dense_flops(lp.in_features, lp.out_features, rows)
        midl += sum(shell.flops_parts(rows, groups).values())
    return dense, midl


def _pinned(lp: LayerPlan, config: MIDLConfig) -> bool:
    """An override that sets ``keep`` fixes the layer: per-pattern settings win over the budget."""
    return any(o.keep is not None for o in overrides_for(config.overrides, [lp.path, *lp.aliases]))


def _override_rank(lp: LayerPlan, config: MIDLConfig) -> bool:
    return any(o.rank is not None for o in overrides_for(config.overrides, [lp.path, *lp.aliases]))


def grid(lp: LayerPlan, config: MIDLConfig) -> list[tuple[str, float, int]]:
    """The (select, keep, rank) settings tried on one layer: each kind ``lp.select`` allows ("auto": every
    kind in the auto grid) with the kind's own keeps and ranks; a rank the user named
    (``config.fixed_rank``) replaces every rank grid of a kind with a light path, and an override's
    rank replaces that."""
    out = []
    for kind in all_kinds():
        if lp.select != kind.name and not (lp.select == "auto" and kind.in_auto):
            continue
        select, (keeps, ranks) = kind.name, kind.budget_grid(config)
        ranks = ranks if config.fixed_rank is None or not kind.light_path else [config.fixed_rank]
        ranks = [lp.rank] if _override_rank(lp, config) else [resolve_rank(r, lp.in_features, lp.out_features) for r in ranks]
        out += [(select, k, r) for k in sorted(set(keeps)) if k < 1.0 for r in sorted(set(ranks))]
    return out


def option_costs(
    model: nn.Module, plan: Plan, config: MIDLConfig, example_inputs: Any, axis: str = "flops",
) -> tuple[Measurements, dict[str, list[LayerPlan]], list[LayerPlan], dict[str, list[tuple[int, ...]]]]:
    """Every candidate's grid options with their FLOPs on the example input (damage still 0), the
    pinned layers' saving and the dense model's FLOPs, as ``Measurements`` on ``axis``; with each
    candidate's options as plans, the pinned layers and every layer's input shapes.

    On the FLOPs axis an option that saves no FLOPs is dropped; on the time axis the clock decides."""
    converted = plan.converted
    fixed = [lp for lp in converted if _pinned(lp, config)]
    candidates = [lp for lp in converted if not _pinned(lp, config)]
    shapes = input_shapes(model, [lp.path for lp in converted], example_inputs)
    trials: dict[str, list[LayerPlan]] = {}
    costs: dict[str, LayerCost] = {}
    for lp in candidates:
        module = model.get_submodule(lp.path)
        options = []
        dense, _ = option_flops(module, replace(lp, keep=1.0, select="output"), shapes[lp.path])
        for select, keep, rank in grid(lp, config):
            trial = replace(lp, keep=keep, rank=rank, select=select)
            _, midl = option_flops(module, trial, shapes[lp.path])
            if midl < dense or axis == "time":  # on the time axis the clock decides what pays
                options.append((trial, midl))
        costs[lp.path] = LayerCost(lp.path, dense, [Option(o.keep, o.rank, f, 0.0, o.select) for o, f in options])
        trials[lp.path] = [o for o, _ in options]
    fixed_saved = 0
    for lp in fixed:
        dense, midl = option_flops(model.get_submodule(lp.path), lp, shapes[lp.path])
        fixed_saved += dense - midl
    m = Measurements(count_flops(model, example_inputs), costs, fixed_saved, 0.0, "", axis=axis)
    return m, trials, fixed, shapes
