"""Closed-form fits of a sparse layer to its real inputs, for both kinds (the maths of ``calibrate``).

Output side (``calibrate_output_layer``):

1. Light path fitted to real inputs (input-whitened SVD): with ``C = E[x x^T] = L L^T``, the
   rank-r ``U V`` minimising ``E||W x - U V x||^2`` is the truncated SVD of ``W L`` mapped back by
   ``L^-1`` (as in SVD-LLM); plain SVD minimises the weight error instead, which real inputs
   do not care about.
2. Gate fitted by least squares on ``h = V x`` to predict where the light path is wrong: either
   the signed error ``(W - U V) x`` (score ``|G h + c|``) or its magnitude (score ``G h + c``).
   Where a BatchNorm or an activation follows the layer, the error is taken after them, and the
   light path's own prediction of the value after the norm is a candidate too (an MLP's first
   layer then computes exactly the neurons GELU lets through).
   Each layer keeps whichever candidate (including the SVD start) leaves the least error energy
   on the calibration rows after Top-k.

Input side (``calibrate_input_layer``): the light path takes the inputs the mask leaves out, so it
is fitted, whitened, to those (as R-Sparse does), and the column norms of what the exact path adds
beyond it (``W - U V``) become the selection's scale; two rounds, since each depends on the other.
A centred layer first takes each input's mean or median over the rows as its centre (``fit_centre``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .kernels import fused_kernel

CENTRE_ROWS = 1024  # calibration rows on which "auto" centring compares the mean with the median


@contextlib.contextmanager
def linalg_threads(elements: int) -> Iterator[None]:
    """One CPU thread for decompositions of small matrices: LAPACK's threaded SVD on a busy
    2-core machine was measured 100x slower than one thread (256x64: 2.6 s vs 2 ms)."""
    before = torch.get_num_threads()
    if elements < (1 << 22):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_threshold(scores: torch.Tensor, keep: float) -> float:
    """The score above which ``keep`` of all neurons in ``scores`` (..., out) lie: adaptive masks then
    keep that share on average, more where the scores say the light path is wrong."""
    flat = scores.float().reshape(-1)
    below = min(flat.numel(), max(1, round(flat.numel() * (1 - keep))))
    return float(flat.kthvalue(below).values)


@dataclass
class LayerCalibration:
    """Relative output error of one layer on calibration rows, before and after."""

    path: str
    rows: int
    error_before: float
    error_after: float
    gate: str  # which gate candidate won


LOWRANK_OVERSAMPLE, LOWRANK_ITERS = 16, 4  # randomized SVD: extra directions and power iterations
WhitenedSVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # P, S, Q^T of W L, and L


def whitened_svd(weight: torch.Tensor, x: torch.Tensor, rank: int | None = None) -> WhitenedSVD:
    """The SVD of ``W L`` (``L L^T = E[x x^T]``): every rank's whitened factors truncate it, so the
    layer budget computes it once per layer, not once per rank tried. With ``rank`` well below the
    matrix's size only the leading ``rank + LOWRANK_OVERSAMPLE`` triplets are computed, by randomized
    subspace iteration (``torch.svd_lowrank``): the budget fits a layer's light path at each keep it
    tries, and a full SVD each time was a third of its time on SmolLM2."""
    cov = x.T @ x / x.shape[0]
    scale = cov.diagonal().mean().clamp_min(1e-8)
    eye = torch.eye(cov.shape[0])
    # Fewer rows than features (a few images at 7x7) or dead ReLU channels leave C singular: raise
    # the ridge until it factors; plain SVD (L = identity) is the last resort.
    chol = eye * scale.sqrt()
    for ridge in (1e-4, 1e-3, 1e-2, 1e-1):
        factor, info = torch.linalg.cholesky_ex(cov + eye * ridge * scale)
        if int(info) == 0:
            chol = factor
            break
    target = weight @ chol
    if rank and 4 * (rank + LOWRANK_OVERSAMPLE) <= min(target.shape):
        with torch.random.fork_rng():  # reproducible, and the caller's random stream untouched
            torch.manual_seed(0)
            p, s, q = torch.svd_lowrank(target, q=rank + LOWRANK_OVERSAMPLE, niter=LOWRANK_ITERS)
        return p, s, q.T, chol
    p, s, qh = torch.linalg.svd(target, full_matrices=False)
    return p, s, qh, chol


def whitened_factors(
    weight: torch.Tensor, x: torch.Tensor, rank: int, svd: WhitenedSVD | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U, V`` minimising ``||W x - U V x||`` over the rows of ``x`` (N, in)."""
    p, s, qh, chol = svd if svd is not None else whitened_svd(weight, x, rank)
    root = s[:rank].sqrt()
    u = p[:, :rank] * root
    a = root[:, None] * qh[:rank]  # V L = a
    v = torch.linalg.solve_triangular(chol.T, a.T, upper=True).T
    return u, v


def lstsq(h: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares ``target ~ h G^T + c``; returns (G, c)."""
    feats = torch.cat([h, torch.ones(h.shape[0], 1)], dim=1)
    gram = feats.T @ feats
    gram += torch.eye(gram.shape[0]) * ridge * gram.diagonal().mean().clamp_min(1e-8)
    sol = torch.linalg.solve(gram, feats.T @ target)  # (r + 1, out)
    return sol[:-1].T.contiguous(), sol[-1].contiguous()


def left_energy(scores: torch.Tensor, err2: torch.Tensor, k: int, adaptive: bool = False) -> float:
    """Error energy of the neurons Top-k leaves on the light path; scores (G, out), err2 (G, n, out).
    ``adaptive``: the neurons above the threshold that keeps ``k`` per mask on average.

    The layer budget calls this for every option it tries: the C++ selection (when built) took
    6 ms where ``torch.topk`` took 17 ms on 1000 x 1536 scores.
    """
    scores = scores.float().contiguous()
    if adaptive:
        kept = scores > fit_threshold(scores, k / scores.shape[-1])
        return (err2 * ~kept[:, None, :]).sum().item()
    kernel = fused_kernel()
    idx = kernel.top_k_rows(scores, k) if kernel is not None else scores.topk(k, dim=-1).indices
    kept = err2.gather(-1, idx[:, None, :].expand(-1, err2.shape[1], -1).long())
    return (err2.sum() - kept.sum()).item()


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
    if layer.rank == 0 or layer.keep >= 1.0:
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
    centre = fit_centre(layer, groups) if layer.centred and layer.keep < 1.0 else None
    if layer.keep < 1.0:
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
                            how + (f", {centre} centre" if centre else "") + (", weighted" if scale is not None else ""))


@torch.no_grad()
def fit_centre(layer: Any, groups: torch.Tensor) -> str:
    """Set an input-side layer's centre to each input's mean or median over the rows of ``groups``
    (G, n, in), as ``layer.centring`` says; "auto" keeps whichever leaves the lower output error on
    up to ``CENTRE_ROWS`` rows (the median resists the few huge activations of LLM residual streams,
    the mean is the least-squares centre). Returns the name of the centre taken."""
    x = groups.reshape(-1, layer.in_features).float()
    candidates = ("mean", "median") if layer.centring == "auto" else (layer.centring,)
    centres = {name: (x.mean(0) if name == "mean" else x.median(0).values) for name in candidates}
    best = candidates[0]
    if len(candidates) > 1:
        sample = groups[: max(1, CENTRE_ROWS // groups.shape[1])].to(layer.weight.dtype)
        exact = F.linear(sample, layer.weight, layer.bias).float()
        errors = {}
        for name, mu in centres.items():
            layer.centre.copy_(mu)
            errors[name] = (layer.rows_reference(sample).float() - exact).pow(2).sum().item()
        best = min(errors, key=errors.get)
    layer.centre.copy_(centres[best])
    return best
