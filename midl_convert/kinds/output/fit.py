"""The output side's closed-form calibration (``calibrate`` calls it through the layer's ``calibrate_rows``).

1. Light path fitted to real inputs (input-whitened SVD, ``fitting.whitened_factors``).
2. Gate fitted by least squares on ``h = V x`` to predict where the light path is wrong: either
   the signed error ``(W - U V) x`` (score ``|G h + c|``) or its magnitude (score ``G h + c``).
   Where a BatchNorm or an activation follows the layer, the error is taken after them, and the
   light path's own prediction of the value after the norm is a candidate too (an MLP's first
   layer then computes exactly the neurons GELU lets through).
   Each layer keeps whichever candidate (including the SVD start) leaves the least error energy
   on the calibration rows after Top-k.
"""
from __future__ import annotations

from typing import Any

import torch

from ...downstream import Downstream
from ...fitting import LayerCalibration, WhitenedSVD, fit_threshold, left_energy, lstsq, whitened_factors


@torch.no_grad()
def calibrate_output_layer(
    layer: Any, groups: torch.Tensor, whiten: bool = True, path: str = "", svd: WhitenedSVD | None = None,
    post: Downstream | None = None, weight: torch.Tensor | None = None, report: bool = True,
) -> LayerCalibration:
    """Fit one layer's light path and gate to its real input groups (G, n, in); ``svd`` is
    ``whitened_svd`` of this layer on these rows, when already computed (``report`` is taken so both
    kinds answer the same call; this fit needs its errors either way). With ``post`` (the
    BatchNorm and activation after the layer) the gate predicts the error left after them; with
    ``weight`` (out,) it predicts each neuron's error times its weight (``sensitivity.py``: the
    share of the error that reaches the model's output)."""
    w = layer.weight.float()
    x = groups.reshape(-1, layer.in_features)
    bias = layer.bias.float() if post is not None and layer.bias is not None else torch.zeros(layer.out_features)
    after = post if post is not None else (lambda y: y)
    exact = after(x @ w.T + bias)
    total = exact.pow(2).sum().item() or 1.0

    def errors(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = groups @ v.T  # (G, n, r)
        light = after(h.reshape(x.shape[0], layer.rank) @ u.T + bias)  # rank 0: the bias alone
        return h, (exact - light).reshape(*groups.shape[:2], -1)  # signed light-path error

    h, err = errors(layer.light_up.float(), layer.light_down.float())
    before = left_energy(layer.scores(h.mean(1).to(layer.weight.dtype)).float(), err.pow(2), layer.k,
                          layer.threshold is not None)
    if layer.rank == 0 or layer.keeps_all:
        return LayerCalibration(path, x.shape[0], (before / total) ** 0.5, (before / total) ** 0.5, "none")
    if whiten:
        u, v = whitened_factors(w, x, layer.rank, svd)
        layer.light_up.copy_(u)
        layer.light_down.copy_(v)
    u = layer.light_up.float()
    h, err = errors(u, layer.light_down.float())
    plain2 = err.pow(2)
    if weight is not None:
        if weight.shape != (layer.out_features,):
            raise ValueError(f"weight must have shape ({layer.out_features},), one per output neuron, got {tuple(weight.shape)}")
        err = err * weight.float()
    err2 = err.pow(2)
    h_mean = h.mean(1)
    candidates = {"svd": (u, torch.zeros(layer.out_features), "abs")}
    if post is not None:  # rank by the predicted value after the norm: active neurons first
        scale = post.scale if post.scale is not None else torch.ones(layer.out_features)
        shift = post.shift if post.shift is not None else torch.zeros(layer.out_features)
        candidates["activation"] = (u * scale[:, None], bias * scale + shift, "linear")
    g, c = lstsq(h_mean, err.mean(1))
    candidates["signed"] = (g, c, "abs")
    g, c = lstsq(h_mean, err2.mean(1).sqrt())
    candidates["magnitude"] = (g, c, "linear")
    best, best_energy = "svd", float("inf")
    for name, (g, c, mode) in candidates.items():
        s = h_mean @ g.T + c
        e = left_energy(s.abs() if mode == "abs" else s, err2, layer.k, layer.adaptive)
        if e < best_energy:
            best, best_energy = name, e
    g, c, mode = candidates[best]
    layer.gate_weight.copy_(g)
    layer.gate_bias.copy_(c)
    layer.gate_mode = mode
    if layer.adaptive:
        layer.threshold = fit_threshold(layer.scores(h_mean.to(layer.weight.dtype)), layer.keep)
    if weight is not None:  # report the layer's own error, as without weights
        best_energy = left_energy(layer.scores(h_mean.to(layer.weight.dtype)).float(), plain2, layer.k, layer.adaptive)
        best += ", weighted"
    return LayerCalibration(path, x.shape[0], (before / total) ** 0.5, (best_energy / total) ** 0.5, best)
