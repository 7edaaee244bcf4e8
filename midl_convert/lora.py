"""Capacity for recovery that merges away: a low-rank delta on each sparse layer's exact weights.

As PEFT's LoRA: ``W' = W + (alpha / r) B A``, ``A`` small and random, ``B`` zero, so a model with the
deltas attached computes exactly what it did before. The delta is a parametrization of the layer's
``weight`` (``torch.nn.utils.parametrize``), so every path that reads ``layer.weight`` in training
(the sparse reference forward of both sides, ``dense_forward``) reads ``W'`` and the gradient flows
through the masks as before. ``merge`` adds the delta into ``W`` in place and removes the
parametrization: the model has its original parameters, shapes, memory layout (the input side's
transposed ``W``) and speed again.

What stays as calibrated: the input side's column norms ``c`` and the light path. The gate was
trained against those ``c``; recomputing them from ``W'`` would change the selection the training
optimised, so the merged model computes exactly what the trained one did.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .sparse import SparseLayer


class LoRADelta(nn.Module):
    """The parametrization ``W -> W + scale * B A`` of an ``(out, in)`` weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, like: torch.Tensor) -> None:
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=like.device, dtype=like.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=like.device, dtype=like.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's initialisation of A

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta()


def attach(model: nn.Module, rank: int = 8, alpha: float | None = None) -> list[nn.Parameter]:
    """Give every sparse layer of ``model`` a LoRA delta of ``rank`` (capped at the layer's smaller side);
    returns the new parameters (``A`` then ``B`` per layer). ``alpha`` defaults to ``rank`` (scale 1)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    scale = (rank if alpha is None else alpha) / rank
    params = []
    for layer in model.modules():
        if isinstance(layer, SparseLayer) and not parametrize.is_parametrized(layer, "weight"):
            r = min(rank, layer.in_features, layer.out_features)
            delta = LoRADelta(layer.out_features, layer.in_features, r, scale, layer.weight)
            parametrize.register_parametrization(layer, "weight", delta)
            params += [delta.lora_A, delta.lora_B]
    return params


def attached(model: nn.Module) -> bool:
    """True when some sparse layer of ``model`` carries a LoRA delta."""
    return any(isinstance(m, SparseLayer) and parametrize.is_parametrized(m, "weight") for m in model.modules())


@torch.no_grad()
def merge(model: nn.Module, keep: bool = True) -> int:
    """Add each layer's delta into its ``W`` in place (same storage, same strides) and drop the
    parametrization; returns how many layers were merged. ``keep=False`` drops the deltas unmerged."""
    merged = 0
    for layer in model.modules():
        if isinstance(layer, SparseLayer) and parametrize.is_parametrized(layer, "weight"):
            deltas = [p.delta() for p in layer.parametrizations["weight"] if isinstance(p, LoRADelta)] if keep else []
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)  # the original Parameter back
            for d in deltas:
                layer.weight.add_(d.to(layer.weight.dtype))
            merged += 1
    return merged
