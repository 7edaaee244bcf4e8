"""The input side's closed-form calibration: the light path takes the inputs the mask leaves out, so it
is fitted, whitened, to those (as R-Sparse does), and the column norms of what the exact path adds
beyond it (``W - U V``) become the selection's scale; two rounds, since each depends on the other.
A centred layer first takes each input's mean or median over the rows as its centre, or ("auto") whichever
of those and no centre does best on rows it was not fitted on (``fit_centre``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ...fitting import LayerCalibration, WhitenedSVD, fit_threshold, whitened_factors

CENTRE_ROWS = 1024  # calibration rows on which "auto" centring judges no centre, the mean and the median


@torch.no_grad()
def calibrate_input_layer(layer: Any, groups: torch.Tensor, path: str = "", svd: WhitenedSVD | None = None,
                          weight: torch.Tensor | None = None, rounds: int = 2, report: bool = True,
                          **_: Any) -> LayerCalibration:
    """Fit an input-side layer to its real input groups (G, n, in): light path on the left-out inputs
    (whitened), column scale from ``W - U V``, adaptive threshold. With ``weight`` (out,) both are
    measured in the output metric ``diag(weight)``: the light path fits ``diag(weight) W`` and a column
    counts by how far its error reaches the model's output (``sensitivity.py``). ``svd`` is unused (the
    left-out inputs change the whitening), accepted so both kinds take the same call."""
    w = layer.weight.float()
    x = groups.reshape(-1, layer.in_features).float()
    exact = F.linear(x, w, None if layer.bias is None else layer.bias.float()) if report else None
    total = (exact.pow(2).sum().item() or 1.0) if report else 1.0
    if weight is not None and weight.shape != (layer.out_features,):
        raise ValueError(f"weight must have shape ({layer.out_features},), one per output neuron, got {tuple(weight.shape)}")
    scale = weight.float().clamp_min(1e-6) if weight is not None else None

    def error() -> float:  # the layer's error on every row: a dense product, so only when reported
        if not report:
            return math.nan
        return (exact - layer.rows_reference(groups.to(layer.weight.dtype)).reshape(exact.shape).float()).pow(2).sum().item()

    layer.set_light_path(layer.light_up.detach().clone(), layer.light_down.detach().clone(), scale)  # c from W - U V
    before = error()
    centre = fit_centre(layer, groups) if layer.centred and not layer.keeps_all else None
    if not layer.centred:
        layer.centre.zero_()  # uncentred: no stale centre saved with it
    if not layer.keeps_all:
        centred = groups - layer.centre.float() if layer.centred else groups
        for _ in range(rounds if layer.rank > 0 else 0):
            kept = layer.selection(groups.to(layer.weight.dtype)).float()  # (G, n, in) 1 = exact
            rest = (centred * (1 - kept)).reshape(-1, layer.in_features)
            if scale is None:
                u, v = whitened_factors(w, rest, layer.rank)
            else:  # fit diag(s) W, then map the output side back
                u, v = whitened_factors(w * scale[:, None], rest, layer.rank)
                u = u / scale[:, None]
            layer.set_light_path(u, v, scale)
        if layer.adaptive:
            layer.threshold = fit_threshold(layer.mask_scores(groups.to(layer.weight.dtype)), layer.keep)
    after = error()
    how = "magnitude" if layer.rank == 0 else "magnitude, whitened light path"
    return LayerCalibration(path, x.shape[0], (before / total) ** 0.5, (after / total) ** 0.5,
                            how + ({None: "", "none": ", no centre"}.get(centre, f", {centre} centre")) + (", weighted" if scale is not None else ""))


@torch.no_grad()
def fit_centre(layer: Any, groups: torch.Tensor) -> str:
    """Set an input-side layer's centre to each input's mean or median over the rows of ``groups``
    (G, n, in), as ``layer.centring`` says. Returns the name of the centre taken.

    "auto" also weighs no centre at all, and judges each candidate on rows it was not fitted on (every
    other group, up to ``CENTRE_ROWS`` rows): a centre always lowers the error on the rows it came from.
    When no centre wins, the layer stops centring (``centring`` "none") and stops paying the
    subtraction. The median resists the few huge activations of LLM residual streams; the mean is the
    least-squares centre. Calibration rows cannot show everything: on SmolLM2 (adaptive, keep 0.7,
    rank 0) 181 of 210 layers still take a centre here, and held-out perplexity on another source is
    +9.2% so centred against +1.5% uncentred (README, "Centred selection").
    """
    x = groups.reshape(-1, layer.in_features).float()
    if layer.centring != "auto":
        layer.centre.copy_(x.mean(0) if layer.centring == "mean" else x.median(0).values)
        return layer.centring
    fit, judge = (groups[0::2], groups[1::2]) if groups.shape[0] > 1 else (groups, groups)
    fx = fit.reshape(-1, layer.in_features).float()
    judge = judge[: max(1, CENTRE_ROWS // groups.shape[1])].to(layer.weight.dtype)
    exact = F.linear(judge, layer.weight, layer.bias).float()
    errors, threshold = {}, layer.threshold
    layer.threshold = None  # exactly k per row while comparing: a threshold fitted to another centre would mislead
    for name, mu in (("none", torch.zeros_like(layer.centre)), ("mean", fx.mean(0)), ("median", fx.median(0).values)):
        layer.centring = "none" if name == "none" else "auto"
        layer.centre.copy_(mu)
        errors[name] = (layer.rows_reference(judge).float() - exact).pow(2).sum().item()
    best = min(errors, key=errors.get)
    layer.threshold = threshold
    layer.centring = "none" if best == "none" else "auto"
    layer.centre.copy_(torch.zeros_like(layer.centre) if best == "none" else
                       x.mean(0) if best == "mean" else x.median(0).values)
    return best
