"""The kinds of sparse layer, each registered by its own folder (as PEFT's ``register_peft_method``).

A kind says which neurons a mask picks and how: its layer classes (one for ``nn.Linear`` and HF
``Conv1D``, one for 1x1 ``nn.Conv2d``), its FLOPs formula and the grid the layer budget tries. The
rest of the package asks the registry (``kind_for``, ``build_layer``) and never names a kind's class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from ..flops import dense_flops
from ..sparse import SparseLayer, weight_matrix



class LayerSettings(Protocol):
    """What ``build_layer`` reads of a plan for one layer (``surgery.LayerPlan`` has it all)."""

    module_type: str  # the target: "linear", "conv1d" (HF Conv1D) or "conv2d"
    select: str  # the registered kind to build
    in_features: int
    out_features: int
    keep: float
    rank: int
    granularity: str
    norm: str | None
    activation: str | None
    adaptive: bool
    centre: str

# How ``build_layer`` fills a new layer's tensors:
# copy: initialised from the dense module (SVD light path and the like); empty: shapes only, for loading
# saved weights into; share: ``W, b`` are the dense module's own tensors, frozen (the budget's trials);
# random: every tensor random (timing, where the values do not change the cost).
WEIGHTS = ("copy", "empty", "share", "random")


@dataclass(frozen=True)
class Kind:
    """One kind of sparse layer, as the registry knows it."""

    name: str  # what ``MIDLConfig.select`` and ``LayerPlan.select`` call it
    linear: type[SparseLayer]  # replaces nn.Linear and HF Conv1D
    conv: type[SparseLayer]  # replaces 1x1 nn.Conv2d
    flops_parts: Callable[..., dict[str, int]]  # (in, out, rank, rows, groups, k) -> FLOPs of each step below keep 1
    picks_outputs: bool  # a mask picks output neurons (rows of W), else input neurons (columns)
    budget_grid: Callable[[Any], tuple[Sequence[float], Sequence[int | float]]]  # config -> keeps, ranks tried
    light_path: bool = True  # has a rank-r light path (without one, every rank is 0)
    in_auto: bool = True  # the budget tries it on layers whose select is "auto"
    centres: bool = False  # takes ``LayerPlan.centre`` (a per-input centre fitted in calibration)
    shares_whitened_svd: bool = False  # its fit takes a whitened SVD the budget computes once per layer
    description: str = ""

    def layer_class(self, module_type: str) -> type[SparseLayer]:
        """The class that replaces a target of ``module_type`` ("linear", "conv1d" or "conv2d")."""
        return self.conv if module_type == "conv2d" else self.linear

    def width(self, in_features: int, out_features: int) -> int:
        """Neurons a mask chooses among."""
        return out_features if self.picks_outputs else in_features

    def max_useful_rank(self, in_features: int, out_features: int, keep: float, per_sample: bool) -> int:
        """The largest light-path rank at which this kind still costs fewer FLOPs per row than dense.

        Per-sample masks share one gate over a sample's rows, so the bound takes the gate as free
        there (long inputs); ``-1`` when even rank 0 saves nothing."""
        width = self.width(in_features, out_features)
        k = min(width, math.ceil(keep * width - 1e-9))
        rows, groups = (1, 0) if per_sample else (1, 1)
        dense = dense_flops(in_features, out_features, 1)

        def cost(r: int) -> int:
            return sum(self.flops_parts(in_features, out_features, r, rows, groups, k).values())

        lo, hi = -1, min(in_features, out_features)  # cost grows with the rank: bisect for the last r that saves
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) < dense else (lo, mid - 1)
        return lo


_KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Add a kind (its folder's ``__init__`` calls this); a name is registered once."""
    if kind.name in _KINDS or kind.name == "auto":
        raise ValueError(f"a sparse-layer kind named {kind.name!r} is already registered (or reserved)")
    _KINDS[kind.name] = kind
    return kind


def kind_names() -> tuple[str, ...]:
    """Every registered kind's name, in registration order."""
    return tuple(_KINDS)


def all_kinds() -> tuple[Kind, ...]:
    return tuple(_KINDS.values())


def kind_for(name: str) -> Kind:
    """The registered kind called ``name``; a one-line error lists the others."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"no sparse-layer kind {name!r}; registered: {', '.join(_KINDS)}") from None


def build_layer(module: nn.Module, lp: LayerSettings, weights: str = "copy", device: Any = None) -> SparseLayer:
    """The sparse layer of ``lp``'s settings (kind ``lp.select``) in place of ``module``.

    ``weights`` (``WEIGHTS``) says how its tensors are filled; ``device="meta"`` with ``"empty"``
    gives a shell with no memory, for its shapes and FLOPs."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    cls = kind_for(lp.select).layer_class(lp.module_type)
    if weights == "copy":
        if lp.module_type == "conv2d":
            layer = cls.from_conv(module, keep=lp.keep, rank=lp.rank, granularity=lp.granularity)
        else:
            layer = cls.from_linear(module, keep=lp.keep, rank=lp.rank, granularity=lp.granularity)
    else:
        w = module.weight
        common = dict(keep=lp.keep, rank=lp.rank, granularity=lp.granularity, bias=module.bias is not None,
                      device=w.device if device is None else device, dtype=w.dtype)
        if lp.module_type == "conv2d":
            layer = cls(lp.in_features, lp.out_features, stride=module.stride, padding=module.padding, **common)
        else:
            layer = cls(lp.in_features, lp.out_features, transposed=lp.module_type == "conv1d", **common)
    layer.configure(lp)
    if weights == "share":
        w, b = weight_matrix(module)
        layer.weight = nn.Parameter(w.detach(), requires_grad=False)
        if b is not None:
            layer.bias = nn.Parameter(b.detach(), requires_grad=False)
        layer.eval()
    elif weights == "random":
        with torch.no_grad():
            for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
                if t.is_floating_point() and t.dim() > 0 and not name.endswith("gate_threshold"):
                    t.normal_(0, 0.02)
        layer.eval()
    return layer
