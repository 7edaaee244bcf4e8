"""Screen a layer's options by its own error before judging them at the model's output.

Judging an option costs a forward of the model; a layer's own error on its real inputs costs a
forward of that layer. The own error does not say how much damage a layer does compared with
another layer (a MiniLM MLP's second layer has the smallest own error and does some of the most
damage), but within one layer it orders the options well enough to say which could ever be
chosen. The knapsack only ever takes an option on the lower convex hull of (cost saved, damage),
so the options judged are the ones on the hull of (saved, own error), topped up with the ones
closest above it. On SmolLM2's 210 layers this is what brings the budget from hours to minutes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .downstream import Downstream
from .sparse import SparseLayer


@torch.no_grad()
def own_error(layer: SparseLayer, groups: torch.Tensor, post: Downstream | None = None) -> float:
    """Relative squared error of ``layer`` against its dense output on input ``groups`` (G, n, in),
    after the BatchNorm and activation that follow it when ``post`` is given."""
    groups = groups.float()
    dense = F.linear(groups, layer.weight.float(), None if layer.bias is None else layer.bias.float())
    out = layer.mix_rows(groups).float()
    if post is not None:
        dense, out = post(dense), post(out)
    return float((out - dense).pow(2).sum() / dense.pow(2).sum().clamp_min(1e-30))


def lower_hull(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (saved, error) that minimise ``error - lam * saved`` for some ``lam >= 0``,
    with the dense option (0, 0) in the running: the lower convex hull from the origin, in order of saved."""
    order = sorted((i for i, (s, _) in enumerate(points) if s > 0), key=lambda i: (points[i][0], -points[i][1]))  # at equal saving the lower error last
    hull: list[tuple[float, float, int]] = [(0.0, 0.0, -1)]
    for i in order:
        s, e = points[i]
        while len(hull) >= 2:
            (s1, e1, _), (s2, e2, _) = hull[-2], hull[-1]
            a, b = (s2 - s1) * (e - e1), (e2 - e1) * (s - s1)
            if a - b < -1e-9 * (abs(a) + abs(b)):  # the middle point lies above the chord (kept when on it)
                hull.pop()
            else:
                break
        hull.append((s, e, i))
    return [i for _, _, i in hull[1:]]


def _gap(points: Sequence[tuple[float, float]], hull: list[int], i: int) -> float:
    """How far point ``i`` lies above the hull at its saving (the hull ends flat past its last point)."""
    s, e = points[i]
    xs = [0.0] + [points[j][0] for j in hull]
    ys = [0.0] + [points[j][1] for j in hull]
    for k in range(1, len(xs)):
        if s <= xs[k]:
            t = (s - xs[k - 1]) / max(xs[k] - xs[k - 1], 1e-30)
            return e - (ys[k - 1] + t * (ys[k] - ys[k - 1]))
    return e - ys[-1]


def pick_options(saved: Sequence[float], errors: Sequence[float], judge: int) -> list[int]:
    """The (at most ``judge``) options worth judging at the output, as sorted indices: the hull of
    (saved, own error), thinned evenly along it when longer, else topped up with the options
    closest above it. Options that save nothing are never picked."""
    points = list(zip(saved, errors))
    useful = [i for i, s in enumerate(saved) if s > 0]
    if len(useful) <= judge:
        return useful
    hull = lower_hull(points)
    if len(hull) >= judge:
        step = (len(hull) - 1) / max(judge - 1, 1)
        return sorted({hull[round(k * step)] for k in range(judge)})
    rest = sorted((i for i in useful if i not in hull), key=lambda i: _gap(points, hull, i))
    return sorted(hull + rest[: judge - len(hull)])


__all__ = ["lower_hull", "own_error", "pick_options"]
