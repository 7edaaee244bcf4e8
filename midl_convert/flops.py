"""FLOPs formulas: the one place that says what a layer costs (2 FLOPs per multiply-add, 1 per
elementwise op or compared element).

Each kind's count follows its ``mix_rows`` term by term (``midl_flops_parts`` for the output
side, ``input_flops_parts`` for the input side), so a ratio says what
the code does, not what the paper promises; the whole-model dense count is
``torch.utils.flop_counter.FlopCounterMode``'s, and the MID-L one swaps each converted layer's dense
FLOPs for its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .sparse import SparseLayer


def dense_flops(in_features: int, out_features: int, rows: int) -> int:
    """A dense Linear or 1x1 conv applied to ``rows`` positions (tokens or pixels)."""
    return 2 * in_features * out_features * rows


def midl_flops_parts(
    in_features: int, out_features: int, keep: float, rank: int, rows: int, groups: int, k: float
) -> dict[str, int]:
    """FLOPs of each step of a MID-L layer over ``rows`` input rows split into ``groups`` masks.

    ``groups == rows`` for token/pixel granularity, the number of samples for sequence/sample.
    ``keep >= 1`` runs the dense layer, so it costs exactly that (no gate is computed).
    """
    if keep >= 1.0:
        return {"dense": dense_flops(in_features, out_features, rows)}
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


def input_flops_parts(
    in_features: int, out_features: int, keep: float, rank: int, rows: int, groups: int, k: float, centred: bool = False
) -> dict[str, int]:
    """FLOPs of each step of an input-side layer (``input_layers.py``) over ``rows`` rows in ``groups`` masks.

    The light path runs on every row's left-out inputs as a dense product (``V`` reads all of
    ``in``); the exact path reads the ``k`` selected columns of ``W``. A ``centred`` layer subtracts
    its centre from every input first (``W centre`` is folded into the bias once, not per row).
    """
    if keep >= 1.0:
        return {"dense": dense_flops(in_features, out_features, rows)}
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


def max_useful_rank(in_features: int, out_features: int, keep: float, per_sample: bool, side: str = "output") -> int:
    """The largest light-path rank at which a sparse layer (``side``) still costs fewer FLOPs per row than dense.

    Per-sample masks share one gate over a sample's rows, so the bound takes the gate as free there
    (long inputs); ``-1`` when even rank 0 saves nothing.
    """
    width = out_features if side == "output" else in_features
    k = min(width, math.ceil(keep * width - 1e-9))
    parts = midl_flops_parts if side == "output" else input_flops_parts
    rows, groups = (1, 0) if per_sample else (1, 1)
    dense = dense_flops(in_features, out_features, 1)

    def cost(r: int) -> int:
        return sum(parts(in_features, out_features, keep, r, rows, groups, k).values())

    lo, hi = -1, min(in_features, out_features)  # cost grows with the rank: bisect for the last r that saves
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) < dense else (lo, mid - 1)
    return lo


@dataclass(frozen=True)
class LayerFlops:
    """Dense and MID-L FLOPs of one converted layer, summed over its calls on one input."""

    dense: int
    midl: int
    parts: dict[str, int] = field(default_factory=dict)
    calls: tuple[tuple[int, int], ...] = ()  # (rows, groups) of each call

    @property
    def ratio(self) -> float:
        """Dense / MID-L: above 1 the layer is cheaper than the original."""
        return self.dense / self.midl if self.midl else float("nan")


def layer_flops(layer: SparseLayer, calls: list[tuple[int, int]], picked: list[float] | None = None) -> LayerFlops:
    """FLOPs of ``layer`` over calls given as ``(rows, groups)`` (see ``layer_calls``); ``picked``:
    the mean exact neurons per mask of each call, measured (adaptive masks), else ``layer.k``."""
    parts: dict[str, int] = {}
    for i, (rows, groups) in enumerate(calls):
        k = picked[i] if picked is not None and picked[i] is not None else layer.k
        step = layer.flops_parts(rows, groups, k)
        for name, value in step.items():
            parts[name] = parts.get(name, 0) + value
    dense = sum(dense_flops(layer.in_features, layer.out_features, rows) for rows, _ in calls)
    return LayerFlops(dense=dense, midl=sum(parts.values()), parts=parts, calls=tuple(calls))


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward of ``model`` on ``inputs`` as ``FlopCounterMode`` counts them (matmuls, convs, attention).

    Attention runs on SDPA's math backend here: the counter has no formula for the CPU flash
    kernel and would count its matmuls as 0 (torch 2.x).
    """
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        _forward(model, inputs)
    return int(counter.get_total_flops())


@torch.no_grad()
def layer_calls(model: nn.Module, inputs: Any, picked: dict[str, list[float | None]] | None = None,
                ) -> dict[str, list[tuple[int, int]]]:
    """``(rows, groups)`` of every call of every MID-L layer in one forward, read off ``groups_of``;
    ``picked`` (when given) is filled with each call's mean exact neurons per mask, as measured.

    Shared layers count once per call; the layers' statistics are left as they were.
    """
    layers = {path: m for path, m in model.named_modules() if isinstance(m, SparseLayer)}
    calls: dict[str, list[tuple[int, int]]] = {path: [] for path in layers}
    handles = []
    saved = {path: (m.track_stats, m.last_active_fraction, m._active_sum, m._active_calls) for path, m in layers.items()}
    for path, layer in layers.items():
        def hook(mod: SparseLayer, args: tuple, _path: str = path) -> None:
            grouped = mod.groups_of(args[0])
            calls[_path].append((grouped.shape[0] * grouped.shape[1], grouped.shape[0]))
            mod.last_active_fraction = None

        def after(mod: SparseLayer, args: tuple, out: Any, _path: str = path) -> None:
            frac = mod.last_active_fraction
            if picked is not None:
                picked.setdefault(_path, []).append(None if frac is None else frac * mod.width)
        handles.append(layer.register_forward_pre_hook(hook))
        handles.append(layer.register_forward_hook(after))
        layer.track_stats = True
    try:
        _forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for path, m in layers.items():
            m.track_stats, m.last_active_fraction, m._active_sum, m._active_calls = saved[path]
    return calls


@dataclass
class ModelFlops:
    """Whole-model FLOPs on one input: the original's dense count and the converted model's MID-L count."""

    dense: int  # FlopCounterMode on the original model
    layers: dict[str, LayerFlops]  # converted layers by path

    @property
    def converted_dense(self) -> int:
        return sum(f.dense for f in self.layers.values())

    @property
    def converted_midl(self) -> int:
        return sum(f.midl for f in self.layers.values())

    @property
    def midl(self) -> int:
        """Dense count, less the converted layers' dense FLOPs, plus their MID-L FLOPs."""
        return self.dense - self.converted_dense + self.converted_midl

    @property
    def ratio(self) -> float:
        """Whole model, dense / MID-L."""
        return self.dense / self.midl if self.midl else float("nan")

    @property
    def converted_ratio(self) -> float:
        """Converted layers alone, dense / MID-L."""
        return self.converted_dense / self.converted_midl if self.converted_midl else float("nan")


def model_flops(student: nn.Module, teacher: nn.Module, inputs: Any) -> ModelFlops:
    """FLOPs of ``teacher`` (dense, counted) and of its converted copy ``student`` (analytic) on ``inputs``."""
    picked: dict[str, list[float | None]] = {}
    calls = layer_calls(student, inputs, picked)
    layers = dict(student.named_modules())
    return ModelFlops(
        dense=count_flops(teacher, inputs),
        layers={path: layer_flops(layers[path], c, picked.get(path)) for path, c in calls.items()},
    )


def model_flops_over(student: nn.Module, teacher: nn.Module, inputs: list[Any]) -> ModelFlops:
    """``model_flops`` summed over several inputs (e.g. every held-out batch): where masks follow the
    input (adaptive thresholds), the ratio a short example input gives can be far from the one the
    model reaches on real data (SmolLM2 at keep 0.6: 1.855 on the example, 1.635 held out)."""
    dense, layers = 0, {}
    for one in inputs:
        counted = model_flops(student, teacher, one)
        dense += counted.dense
        for path, f in counted.layers.items():
            prev = layers.get(path)
            if prev is None:
                layers[path] = f
                continue
            parts = {k: prev.parts.get(k, 0) + f.parts.get(k, 0) for k in {*prev.parts, *f.parts}}
            layers[path] = LayerFlops(prev.dense + f.dense, prev.midl + f.midl, parts, prev.calls + f.calls)
    return ModelFlops(dense=dense, layers=layers)


__all__ = ["LayerFlops", "ModelFlops", "count_flops", "dense_flops", "input_flops_parts", "layer_calls", "layer_flops", "midl_flops_parts", "model_flops", "model_flops_over"]
