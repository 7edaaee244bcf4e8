"""Closed-form calibration before any gradient step, on the inputs each layer sees in the dense model.

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
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch
from .downstream import Downstream, post_fn
from .kernels import fused_kernel
from .layers import MIDLBase, fit_threshold, linalg_threads
from .log import progress_bar
from .quality import OUTPUT_KIND, output_kind, run
from .sensitivity import neuron_sensitivity


@dataclass
class LayerCalibration:
    """Relative output error of one layer on calibration rows, before and after."""

    path: str
    rows: int
    error_before: float
    error_after: float
    gate: str  # which gate candidate won


@contextlib.contextmanager
def dense_mode(model: nn.Module) -> Iterator[None]:
    """Run every MID-L layer as its original dense layer (keep = 1) for the duration."""
    layers = [m for m in model.modules() if isinstance(m, MIDLBase)]
    keeps = [m.keep for m in layers]
    for m in layers:
        m.keep = 1.0
    try:
        yield
    finally:
        for m, k in zip(layers, keeps):
            m.keep = k


@torch.no_grad()
def collect_groups(model: nn.Module, batches: Iterable[Batch], max_rows: int = 4096, seed: int = 0) -> dict[str, torch.Tensor]:
    """Each MID-L layer's input in the dense model, as mask groups (G, n, in), capped at ``max_rows`` rows."""
    layers = {p: m for p, m in model.named_modules() if isinstance(m, MIDLBase)}
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in layers}
    real: list[torch.Tensor | None] = [None]  # the current batch's attention mask

    def hook(mod: MIDLBase, inp: tuple, p: str) -> None:
        x, mask = inp[0], real[0]
        if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2] and mod.granularity == "token":
            x = x[mask.bool()]  # padding is not data: it would skew the light path and the thresholds
        seen[p].append(mod.groups_of(x).float())

    handles = [m.register_forward_pre_hook(lambda mod, inp, p=p: hook(mod, inp, p)) for p, m in layers.items()]
    try:
        with dense_mode(model):
            for batch in batches:
                real[0] = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for p, chunks in seen.items():
        if not chunks:
            continue
        n = chunks[0].shape[1]
        groups = torch.cat([c for c in chunks if c.shape[1] == n])
        cap = max(1, max_rows // n)
        if groups.shape[0] > cap:
            groups = groups[torch.randperm(groups.shape[0], generator=gen)[:cap]]
        out[p] = groups
    return out


WhitenedSVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # P, S, Q^T of W L, and L


def whitened_svd(weight: torch.Tensor, x: torch.Tensor) -> WhitenedSVD:
    """The SVD of ``W L`` (``L L^T = E[x x^T]``): every rank's whitened factors truncate it, so the
    layer budget computes it once per layer, not once per rank tried."""
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
    p, s, qh = torch.linalg.svd(weight @ chol, full_matrices=False)
    return p, s, qh, chol


def whitened_factors(
    weight: torch.Tensor, x: torch.Tensor, rank: int, svd: WhitenedSVD | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U, V`` minimising ``||W x - U V x||`` over the rows of ``x`` (N, in)."""
    p, s, qh, chol = svd if svd is not None else whitened_svd(weight, x)
    root = s[:rank].sqrt()
    u = p[:, :rank] * root
    a = root[:, None] * qh[:rank]  # V L = a
    v = torch.linalg.solve_triangular(chol.T, a.T, upper=True).T
    return u, v


def _lstsq(h: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares ``target ~ h G^T + c``; returns (G, c)."""
    feats = torch.cat([h, torch.ones(h.shape[0], 1)], dim=1)
    gram = feats.T @ feats
    gram += torch.eye(gram.shape[0]) * ridge * gram.diagonal().mean().clamp_min(1e-8)
    sol = torch.linalg.solve(gram, feats.T @ target)  # (r + 1, out)
    return sol[:-1].T.contiguous(), sol[-1].contiguous()


def _left_energy(scores: torch.Tensor, err2: torch.Tensor, k: int, adaptive: bool = False) -> float:
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
def calibrate_layer(
    layer: MIDLBase, groups: torch.Tensor, whiten: bool = True, path: str = "", svd: WhitenedSVD | None = None,
    post: Downstream | None = None, weight: torch.Tensor | None = None,
) -> LayerCalibration:
    """Fit one layer's light path and gate to its real input groups (G, n, in); ``svd`` is
    ``whitened_svd`` of this layer on these rows, when already computed. With ``post`` (the
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
        light = after(h.reshape(-1, layer.rank) @ u.T + bias)
        return h, (exact - light).reshape(*groups.shape[:2], -1)  # signed light-path error

    h, err = errors(layer.light_up.float(), layer.light_down.float())
    before = _left_energy(layer.scores(h.mean(1).to(layer.weight.dtype)).float(), err.pow(2), layer.k,
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
    g, c = _lstsq(h_mean, err.mean(1))
    candidates["signed"] = (g, c, "abs")
    g, c = _lstsq(h_mean, err2.mean(1).sqrt())
    candidates["magnitude"] = (g, c, "linear")
    best, best_energy = "svd", float("inf")
    for name, (g, c, mode) in candidates.items():
        s = h_mean @ g.T + c
        e = _left_energy(s.abs() if mode == "abs" else s, err2, layer.k, layer.adaptive)
        if e < best_energy:
            best, best_energy = name, e
    g, c, mode = candidates[best]
    layer.gate_weight.copy_(g)
    layer.gate_bias.copy_(c)
    layer.gate_mode = mode
    if layer.adaptive:
        layer.threshold = fit_threshold(layer.scores(h_mean.to(layer.weight.dtype)), layer.keep)
    if weight is not None:  # report the layer's own error, as without weights
        best_energy = _left_energy(layer.scores(h_mean.to(layer.weight.dtype)).float(), plain2, layer.k, layer.adaptive)
        best += ", weighted"
    return LayerCalibration(path, x.shape[0], (before / total) ** 0.5, (best_energy / total) ** 0.5, best)


@torch.no_grad()
def fit_thresholds(model: nn.Module, batches: Iterable[Batch], max_rows: int = 4096) -> None:
    """Refit every adaptive layer's threshold to its keep on ``batches`` (after training moved the
    gates, so the layers keep on average the share of neurons their FLOPs were counted with)."""
    layers = {p: m for p, m in model.named_modules() if isinstance(m, MIDLBase) and m.adaptive and m.keep < 1.0}
    if not layers:
        return
    was_training = model.training
    model.eval()
    try:
        for p, g in collect_groups(model, batches, max_rows).items():
            if p in layers:
                m = layers[p]
                h = F.linear(g, m.light_down).mean(1)
                m.threshold = fit_threshold(m.scores(h), m.keep)
    finally:
        model.train(was_training)


@torch.no_grad()
def cap_thresholds(model: nn.Module, example_inputs: Any) -> list[str]:
    """Raise adaptive thresholds so that no layer picks more than ``k`` neurons per mask on average
    on ``example_inputs``; returns the paths of the layers it raised.

    The layer budget counts exactly ``k`` neurons per mask on the example input, and promises the
    target ratio there. Adaptive thresholds are fitted to calibration data, and an example that
    draws more than the average (MiniLM's 16-token example sentence: 1.242x for a 1.3x target)
    would break that promise; capped, every layer costs at most what the budget counted. Layers
    are capped in the order the forward calls them, each on the input it gets once the layers
    before it are capped.
    """
    layers = {p: m for p, m in model.named_modules() if isinstance(m, MIDLBase) and m.adaptive and m.threshold is not None
              and m.keep < 1.0}
    order: list[str] = []
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(mod: MIDLBase, inp: tuple, p: str) -> None:
        if p not in order:
            order.append(p)
        seen.setdefault(p, []).append(mod.scores(F.linear(mod.groups_of(inp[0]), mod.light_down).mean(1)).float())

    def scores_of(paths: Iterable[str]) -> None:
        seen.clear()
        handles = [layers[p].register_forward_pre_hook(lambda mod, inp, p=p: hook(mod, inp, p)) for p in paths]
        try:
            run(model, Batch((example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs))
        finally:
            for h in handles:
                h.remove()

    was_training = model.training
    model.eval()
    raised = []
    try:
        scores_of(layers)
        for p in list(order):
            scores_of([p])
            m, s = layers[p], torch.cat([t.reshape(-1, layers[p].out_features) for t in seen[p]])
            allowed = m.k * s.shape[0]
            if int(m._counts(s, m.threshold).sum()) <= allowed:
                continue
            flat = s.reshape(-1).sort().values
            for above in range(allowed, 0, -1):  # ties and the one-neuron floor can need a step or two more
                threshold = float(flat[flat.numel() - above - 1])
                if int(m._counts(s, threshold).sum()) <= allowed:
                    break
            m.threshold = threshold
            raised.append(p)
    finally:
        model.train(was_training)
    return raised


def calibrate(
    model: nn.Module, batches: Iterable[Batch], whiten: bool = True, max_rows: int = 4096, kind: str | None = None,
    progress: bool = True,
) -> list[LayerCalibration]:
    """Calibrate every MID-L layer of ``model`` in closed form on ``batches`` (no gradient steps).

    With ``kind`` (the output distillation compares: "logits", "embedding", "hidden"; "auto" asks
    ``quality.output_kind``; None, the default: each layer's own error only) the gate of each
    layer with nothing elementwise after it predicts its error weighted by how far that error
    reaches the model's output (``sensitivity.py``). Layers followed by a norm or an activation
    keep predicting the error left after it, which already says what passes on. On MiniLM at
    keep 0.5 this lifts the calibrated embeddings' cosine from 0.789 to 0.826 and the distilled
    one only from 0.893 to 0.896 (``benchmarks/distill_quality.py --sensitivity``), so it is
    not the default. ``progress=False`` hides the bar (shown only on a terminal anyway).
    """
    kinds = ("auto", *sorted(set(OUTPUT_KIND.values())))
    if kind is not None and kind not in kinds:
        raise ValueError(f"kind must be None or one of {', '.join(kinds)}, got {kind!r}; e.g. kind='logits' for a classifier")
    batches = list(batches)
    was_training = model.training
    model.eval()
    try:
        groups = collect_groups(model, batches, max_rows)
        layers = dict((p, m) for p, m in model.named_modules() if isinstance(m, MIDLBase))
        posts = {p: post_fn(model, *layers[p].downstream) for p in groups}
        weights: dict[str, torch.Tensor] = {}
        plain = [p for p in groups if posts[p] is None and layers[p].rank > 0 and layers[p].keep < 1.0]
        if kind is not None and plain and batches:
            with dense_mode(model):
                kind = output_kind(model, batches[0]) if kind == "auto" else kind
                weights = {p: s.sqrt() for p, s in neuron_sensitivity(model, plain, batches, kind, probes=2).items()}
        out = []
        with progress_bar("calibrating", len(groups), progress) as advance:
            for p, g in groups.items():
                with linalg_threads(layers[p].weight.numel()):
                    out.append(calibrate_layer(layers[p], g, whiten, p, post=posts[p], weight=weights.get(p)))
                advance()
        return out
    finally:
        model.train(was_training)
