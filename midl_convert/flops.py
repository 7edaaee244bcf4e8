"""FLOPs formulas: the one place that says what a layer costs (2 FLOPs per multiply-add, 1 per
elementwise op or compared element).

Each kind's count follows its ``mix_rows`` term by term (``kinds/<kind>/flops.py``), so a ratio says what
the code does, not what the paper promises; the whole-model dense count is
``torch.utils.flop_counter.FlopCounterMode``'s, and the MID-L one swaps each converted layer's dense
FLOPs for its own.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .running import run_model, watching
from .sparse import SparseLayer


def dense_flops(in_features: int, out_features: int, rows: int) -> int:
    """A dense Linear or 1x1 conv applied to ``rows`` positions (tokens or pixels)."""
    return 2 * in_features * out_features * rows


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


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward of ``model`` on ``inputs`` as ``FlopCounterMode`` counts them (matmuls, convs, attention).

    Attention runs on SDPA's math backend here: the counter has no formula for the CPU flash
    kernel and would count its matmuls as 0 (torch 2.x).
    """
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        run_model(model, inputs)
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

    def before(path: str, mod: SparseLayer, x: torch.Tensor) -> None:
        grouped = mod.groups_of(x)
        calls[path].append((grouped.shape[0] * grouped.shape[1], grouped.shape[0]))
        mod.last_active_fraction = None

    def after(path: str, mod: SparseLayer, x: torch.Tensor, y: Any) -> None:
        frac = mod.last_active_fraction
        if picked is not None:
            picked.setdefault(path, []).append(None if frac is None else frac * mod.width)

    with contextlib.ExitStack() as stack:
        for layer in layers.values():
            stack.enter_context(layer.measuring())
        with watching(layers, before, after):
            run_model(model, inputs)
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


__all__ = ["LayerFlops", "ModelFlops", "count_flops", "dense_flops", "layer_calls", "layer_flops", "model_flops", "model_flops_over"]
