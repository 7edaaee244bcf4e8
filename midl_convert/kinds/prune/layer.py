"""Static pruning, a peer for the input side: one fixed set of ``k`` input columns of ``W`` for every
input, chosen on calibration rows by ``E|x_j| * ||W_:,j||`` (Wanda's score, per column), and what the
dropped inputs carry on average added to the bias (``offset = W_rest E[x_rest]``).

    y = W_S x_S + b + W_R mu_R

It is what input-dependent masks must beat: the same FLOPs as the input side at rank 0, with the
choice made once instead of per token.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...fitting import LayerCalibration
from ...sparse import CONV_GRANULARITIES, LINEAR_GRANULARITIES, ConvRows, LinearRows, SparseLayer
from ...flops import dense_flops
from .flops import prune_flops_parts


class PruneBase(SparseLayer):
    """The maths of static pruning on rows ``(G, n, in)``; subclasses map their input to rows."""

    select = "prune"
    default_rank = 0

    def __init__(self, in_features: int, out_features: int, keep: float, rank: int, granularity: str,
                 allowed: tuple[str, ...], bias: bool = True, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank != 0:
            raise ValueError(f"static pruning has no light path: rank must be 0, got {rank!r}")
        self._init_settings(in_features, out_features, keep, 0, granularity, allowed, device)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_buffer("importance", torch.ones(in_features, **factory))  # the top k columns are kept
        self.offset = nn.Parameter(torch.zeros(out_features, **factory))  # W_R mu_R (zero until calibrated)

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Copy ``W, b``; until calibration the kept columns are those of largest norm."""
        self.weight.copy_(weight)
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias)
        self.importance.copy_(self.weight.float().norm(dim=0))

    def kept(self) -> torch.Tensor:
        """The indices of the ``k`` kept input columns, in order."""
        return self.importance.topk(self.k).indices.sort().values

    def mix_rows(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.kept()
        self._record(self.k)
        bias = self.offset if self.bias is None else self.bias + self.offset
        return F.linear(x.index_select(-1, idx), self.dense_weight().index_select(1, idx), bias)

    @property
    def width(self) -> int:
        return self.in_features  # the kept columns are input neurons

    def flops_parts(self, rows: int, groups: int, k: float | None = None) -> dict[str, int]:
        if self.keeps_all:
            return {"dense": dense_flops(self.in_features, self.out_features, rows)}
        return prune_flops_parts(self.in_features, self.out_features, self.rank, rows, groups,
                                 self.k if k is None else k)

    def trainable_names(self, train: str) -> tuple[str, ...]:
        return ("offset",)

    def mask_scores(self, groups: torch.Tensor) -> torch.Tensor:
        return self.importance.expand(groups.shape[0], -1)

    def configure(self, lp: Any) -> None:
        if lp.adaptive:
            raise ValueError("static pruning keeps the same columns for every input; adaptive masks do not apply to it")
        super().configure(lp)

    @torch.no_grad()
    def calibrate_rows(self, groups: torch.Tensor, path: str = "", report: bool = True, **_: Any) -> LayerCalibration:
        """Keep the columns of largest ``mean |x_j| * ||W_:,j||`` on these rows, and move the mean of the
        others into ``offset``."""
        x = groups.reshape(-1, self.in_features).float()
        w = self.dense_weight().float()
        exact = F.linear(x, w, None if self.bias is None else self.bias.float()) if report else None
        total = (exact.pow(2).sum().item() or 1.0) if report else 1.0

        def error() -> float:
            if not report:
                return float("nan")
            return (exact - self.mix_rows(groups.to(self.weight.dtype)).reshape(exact.shape).float()).pow(2).sum().item()

        before = error()
        if not self.keeps_all:
            self.importance.copy_(x.abs().mean(0) * w.norm(dim=0))
            rest = torch.ones(self.in_features, dtype=torch.bool, device=x.device)
            rest[self.kept()] = False
            self.offset.copy_(w[:, rest] @ x[:, rest].mean(0))
        return LayerCalibration(path, x.shape[0], (before / total) ** 0.5, (error() / total) ** 0.5, "magnitude, mean offset")


class PruneLinear(LinearRows, PruneBase):
    """Static pruning of an ``nn.Linear`` or HF ``Conv1D`` (granularity changes nothing: no mask at run time)."""

    def __init__(self, in_features: int, out_features: int, keep: float = 0.5, rank: int = 0, granularity: str = "token",
                 bias: bool = True, transposed: bool = False, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, keep, rank, granularity, LINEAR_GRANULARITIES, bias, device, dtype)
        self.transposed = transposed


class PruneConv2d(ConvRows, PruneBase):
    """Static pruning of a 1x1 ``nn.Conv2d``'s input channels."""

    def __init__(self, in_channels: int, out_channels: int, keep: float = 0.5, rank: int = 0, granularity: str = "pixel",
                 bias: bool = True, stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_channels, out_channels, keep, rank, granularity, CONV_GRANULARITIES, bias, device, dtype)
        self.stride, self.padding = tuple(stride), tuple(padding)
