"""The surgery: choose targets from a config (the plan), then swap each for its MID-L layer in place.

The model keeps its class, ``forward`` and config; only the chosen submodules change, so
``save_pretrained``, timm checkpoints and user code keep working.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import migrate
from .config import PER_SAMPLE, MIDLConfig, granularity_for, resolve_rank
from .errors import MIDLError
from .graph import Target, TargetTable
from .kinds import build_layer, kind_for
from .marker import mark, unmark
from .sparse import SparseLayer, dense, sparse_layers
from .matching import ALL_LINEAR, closest, matches, matches_any, overrides_for


@dataclass
class LayerPlan:
    """What happens to one target: converted with these settings, or left dense and why."""

    path: str
    module_type: str  # the target: "linear", "conv1d" (HF Conv1D) or "conv2d" (1x1)
    in_features: int
    out_features: int
    flops: int
    convert: bool
    keep: float | None = None
    rank: int | None = None
    granularity: str | None = None
    reason: str | None = None  # why it stays dense
    role: str | None = None
    aliases: list[str] = field(default_factory=list)
    predicted_damage: float | None = None  # set by the layer budget: output loss with this layer alone converted
    norm: str | None = None  # BatchNorm right after the layer, and the activation after that: calibration fits
    activation: str | None = None  # the gate to the error that survives them (downstream.py)
    adaptive: bool = False  # a calibrated score threshold instead of exactly k per mask
    select: str = "output"  # which neurons a mask picks: a registered kind's name ("auto" until the budget decides)
    centre: str = "none"  # input side: how inputs are centred before the mask picks (kinds.input.CENTRINGS)


@dataclass
class Plan:
    """The decision for every target of a model; replaying it rebuilds the converted model."""

    layers: list[LayerPlan]
    trace: str  # how the targets were found: "export", "fx", "walk" (graph.py), or "saved"
    notes: list[str] = field(default_factory=list)
    budget: dict[str, Any] | None = None  # the layer budget's target, prediction and cost, when one chose the settings
    weight_dtype: str = "float32"  # the weights' dtype after conversion (weight_dtype.py), set again on load

    @property
    def converted(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.convert]

    def to_dict(self) -> dict[str, Any]:
        return {"trace": self.trace, "notes": self.notes, "budget": self.budget, "weight_dtype": self.weight_dtype,
                "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        data = migrate.plan(data)  # an earlier version's keys (side, kind, method) in today's names
        return cls(layers=[LayerPlan(**d) for d in data["layers"]], trace=data.get("trace"), notes=list(data.get("notes", [])),
                   budget=data.get("budget"), weight_dtype=data.get("weight_dtype", "float32"))


def _check_patterns(patterns: list[str], paths: list[str], what: str) -> None:
    for pattern in patterns:
        if not any(matches(pattern, p) for p in paths):
            raise MIDLError(
                f"{what} pattern {pattern!r} matches no Linear or 1x1 conv; closest module names: "
                f"{', '.join(closest(pattern, paths))}"
            )


def make_plan(table: TargetTable, config: MIDLConfig) -> Plan:
    """Decide, for every target, whether it is converted and with which keep, rank and granularity."""
    paths = [p for t in table.targets for p in [t.path, *t.aliases]]
    include = config.include
    if isinstance(include, list):
        _check_patterns(include, paths, "include")
    _check_patterns(config.exclude, paths, "exclude")
    _check_patterns([o.match for o in config.overrides], paths, "override")
    layers, clamped = [], []
    for t in table.targets:
        names = [t.path, *t.aliases]
        explicit = isinstance(include, list) and any(matches_any(include, n) for n in names)
        reason = None
        if include == ALL_LINEAR and t.module_type == "conv2d":
            reason = "not a linear layer (include='all-linear')"
        elif isinstance(include, list) and not explicit:
            reason = "not included"
        elif any(matches_any(config.exclude, n) for n in names):
            reason = "excluded"
        elif t.is_head and config.skip_head and not explicit:
            reason = "classifier / output head (skip_head)"
        elif t.weights < config.min_size:
            reason = f"smaller than min_size ({t.weights} < {config.min_size} weights)"
        keep, rank, gran, select, pinned = config.keep, config.rank, config.granularity, config.select, False
        for o in overrides_for(config.overrides, names):  # later overrides win
            keep = o.keep if o.keep is not None else keep
            rank = o.rank if o.rank is not None else rank
            gran = o.granularity or gran
            select = o.select or select
            pinned = pinned or o.keep is not None
        if select == "auto" and pinned:  # a keep pinned outside the budget, with no kind named: the input kind
            select = "input"
        layers.append(LayerPlan(
            path=t.path, module_type=t.module_type, in_features=t.in_features, out_features=t.out_features, flops=t.flops,
            convert=reason is None, keep=keep if reason is None else None,
            rank=_useful_rank(t, keep, rank, gran, config, clamped, select) if reason is None else None,
            granularity=granularity_for(t.module_type, gran) if reason is None else None,
            reason=reason, role=t.role, aliases=t.aliases, norm=t.norm, activation=t.activation,
            adaptive=config.adaptive and reason is None, select=select,
            centre=config.centre if reason is None and (select == "auto" or kind_for(select).centres) else "none",
        ))
    plan = Plan(layers=layers, trace=table.trace, notes=list(table.notes))
    if clamped:
        note = (f"rank lowered on {len(clamped)} layers so each still costs fewer FLOPs than dense ({', '.join(clamped[:3])}"
                f"{', ...' if len(clamped) > 3 else ''}); ask for a lower rank to silence this")
        plan.notes.append(note)
        warnings.warn(note, stacklevel=2)
    if not plan.converted:
        raise MIDLError(
            "no layer selected for conversion: every target was excluded, too small or a head; "
            "loosen include/exclude/min_size or set skip_head=False"
        )
    return plan


def _useful_rank(t: Target, keep: float, rank: int | float, granularity: str, config: MIDLConfig, clamped: list[str],
                 select: str = "output") -> int:
    """The layer's rank, lowered (and recorded in ``clamped``) when it would cost more FLOPs than dense.

    A rank the layer budget chooses is already bounded by its measured FLOPs, and keep 1 runs the
    dense layer, so only fixed ranks below keep 1 are clamped.
    """
    wanted = resolve_rank(rank, t.in_features, t.out_features)
    if select != "auto" and not kind_for(select).light_path:
        return 0
    if config.budgeted or keep >= 1.0 or select == "auto":
        return wanted
    limit = max(0, kind_for(select).max_useful_rank(t.in_features, t.out_features, keep, granularity in PER_SAMPLE))
    if wanted <= limit:
        return wanted
    clamped.append(f"{t.path}: {wanted} -> {limit}")
    return limit


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (dotted) in ``model``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def apply_plan(model: nn.Module, plan: Plan, init: bool = True) -> nn.Module:
    """Swap every planned module for its MID-L layer (shared modules once, at all their paths).

    ``init=False`` builds empty layers of the right shapes, for loading saved weights into.
    The plan is also recorded on a Hugging Face model's config, so ``save_pretrained`` keeps it.
    """
    for lp in plan.converted:
        try:
            module = model.get_submodule(lp.path)
        except AttributeError as exc:
            raise MIDLError(f"the plan names {lp.path!r}, which {type(model).__name__} does not have; "
                            f"rebuild the same architecture the plan was made for") from exc
        with torch.no_grad():
            new = build_layer(module, lp, "copy" if init else "empty")
        new.train(module.training)
        for path in [lp.path, *lp.aliases]:
            set_module(model, path, new)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        mark(config, plan.to_dict())
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Turn every MID-L layer back into its original dense module (with the current ``W, b``)."""
    done: dict[int, nn.Module] = {}
    for path, mod in list(model.named_modules(remove_duplicate=False)):
        if isinstance(mod, SparseLayer):
            original = done.setdefault(id(mod), mod.merge_and_unload())
            set_module(model, path, original)
    config = getattr(model, "config", None)
    if config is not None:
        unmark(config)
    return model


def midl_layers(model: nn.Module) -> dict[str, SparseLayer]:
    """The sparse layers (either side) of a converted model by path."""
    return sparse_layers(model)


__all__ = ["LayerPlan", "Plan", "Target", "apply_plan", "dense", "make_plan", "merge_and_unload", "midl_layers", "set_module"]
