"""What actually ran: the FLOPs each sparse layer's calls executed, and the compute route each call took.

The formulas in ``flops.py`` count what a layer's sparse maths costs; a call may take another route
(per-token masks on many rows run as dense compute plus masking). ``FlopCounterMode`` sees the
ATen ops that ran, so each call is classed by what it saw against the dense layer's FLOPs:

- ``masked``: at least the dense FLOPs (the dense product ran, the mask on top of it);
- ``kernel``: the layer says its call takes the fused kernel (``compute_route``, asked outside the
  counter: under a dispatch mode the kernel steps aside), or the counter saw nothing; counted by formula;
- ``sparse``: the rest (gathered rows or columns, fewer FLOPs than dense).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .flops import dense_flops
from .running import run_model, watching
from .sparse import SparseLayer, sparse_layers

ROUTE_WORDS = {
    "masked": "dense compute plus masking",
    "kernel": "the fused kernel",
    "sparse": "gathered sparse products",
    "dense": "the original layer (keep 1)",
}


@dataclass
class RanFlops:
    """FLOPs of one forward as run: the whole model, and per sparse layer with its calls' routes."""

    total: int
    layers: dict[str, int] = field(default_factory=dict)
    routes: dict[str, Counter] = field(default_factory=dict)
    rows: dict[str, list[int]] = field(default_factory=dict)

    def route_of(self, layer: str) -> str | None:
        """The compute route most of a layer's calls took."""
        seen = self.routes.get(layer)
        return seen.most_common(1)[0][0] if seen else None


@torch.no_grad()
def ran_flops(model: nn.Module, inputs: Any, step: Callable[[], Any] | None = None) -> RanFlops:
    """Run ``model`` on ``inputs`` (or ``step()``, e.g. a decode step) under ``FlopCounterMode`` and class
    each sparse layer call by what ran."""
    step = step or (lambda: run_model(model, inputs))
    layers = sparse_layers(model)
    counter = FlopCounterMode(display=False)
    out = RanFlops(0, {p: 0 for p in layers}, {p: Counter() for p in layers}, {p: [] for p in layers})
    extra = 0
    before: dict[str, int] = {}
    chosen = _chosen_routes(layers, step)

    def pre(p: str, m: SparseLayer, x: torch.Tensor) -> None:
        before[p] = counter.get_total_flops()

    def post(p: str, m: SparseLayer, x: torch.Tensor, y: Any) -> None:
        nonlocal extra
        seen = counter.get_total_flops() - before[p]
        grouped = m.groups_of(x)
        rows, groups = grouped.shape[0] * grouped.shape[1], grouped.shape[0]
        dense = dense_flops(m.in_features, m.out_features, rows)
        said = chosen[p].pop(0) if chosen[p] else None
        if m.exact:
            route = "dense"
        elif said == "kernel" or seen == 0:
            route = "kernel"
            extra += sum(m.flops_parts(rows, groups).values()) - seen
            seen = sum(m.flops_parts(rows, groups).values())
        elif seen >= dense:
            route = "masked"
        else:
            route = "sparse"
        out.layers[p] += seen
        out.routes[p][route] += 1
        out.rows[p].append(rows)

    with watching(layers, pre, post), sdpa_kernel(SDPBackend.MATH), counter:
        step()
    out.total = int(counter.get_total_flops()) + extra
    return out


@torch.no_grad()
def _chosen_routes(layers: dict[str, SparseLayer], step: Callable[[], Any]) -> dict[str, list[str | None]]:
    """Per layer, the route each call takes when nothing watches (layers that can say: ``compute_route``)."""
    chosen: dict[str, list[str | None]] = {p: [] for p in layers}

    def ask(p: str, m: SparseLayer, x: torch.Tensor) -> None:
        say = getattr(m, "compute_route", None)
        chosen[p].append(None if say is None or m.exact else say(m.groups_of(x)))

    with watching(layers, ask):
        step()
    return chosen


__all__ = ["ROUTE_WORDS", "RanFlops", "ran_flops"]
