"""Closed-form calibration before any gradient step, on the inputs each layer sees in the dense model.

This module runs the model and gathers each sparse layer's real input rows; each kind fits itself
to them (``SparseLayer.calibrate_rows``; the maths is in ``fitting.py``).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .data import Batch
from .deprecation import renamed_kwargs
from .downstream import post_fn
from .fitting import LayerCalibration, fit_threshold, linalg_threads
from .log import progress_bar
from .sparse import SparseLayer, dense
from .quality import TASK_OUTPUT, output_of
from .running import run_model, watching
from .sensitivity import neuron_sensitivity


@torch.no_grad()
def collect_groups(model: nn.Module, batches: Iterable[Batch], max_rows: int = 4096, seed: int = 0) -> dict[str, torch.Tensor]:
    """Each MID-L layer's input in the dense model, as mask groups (G, n, in), capped at ``max_rows`` rows.

    Layers that read one tensor one after another (a decoder's q, k and v; gate and up) share one copy
    of its rows, and each layer's batches are joined and let go in turn: with a copy per layer, all
    joined before any was let go, SmolLM2's calibration peaked at 4.0 GB of process memory (2.9 GB now).
    """
    layers = {p: m for p, m in model.named_modules() if isinstance(m, SparseLayer)}
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in layers}
    real: list[torch.Tensor | None] = [None]  # the current batch's attention mask
    last: list[tuple | None] = [None]  # (the last input read, how it was grouped, its groups); held, so never a stale id

    def hook(p: str, mod: SparseLayer, x: torch.Tensor) -> None:
        mask = real[0]
        how = (mod.granularity, type(mod).groups_of, getattr(mod, "stride", None), getattr(mod, "padding", None))
        if last[0] is not None and last[0][0] is x and last[0][1] == how:
            seen[p].append(last[0][2])
            return
        rows = x
        if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2] and mod.granularity == "token":
            rows = x[mask.bool()]  # padding is not data: it would skew the light path and the thresholds
        last[0] = (x, how, mod.groups_of(rows).float())
        seen[p].append(last[0][2])

    try:
        with dense(model), watching(layers, hook):
            for batch in batches:
                real[0] = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
                last[0] = None
                run_model(model, batch)
    finally:
        last[0] = None
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    joined: dict[tuple[int, ...], torch.Tensor] = {}  # by the chunks' ids: alive in ``seen`` while any sharer waits
    for p in list(seen):
        chunks = seen.pop(p)
        if not chunks:
            continue
        ids = tuple(id(c) for c in chunks)
        if ids not in joined:
            n = chunks[0].shape[1]
            groups = torch.cat([c for c in chunks if c.shape[1] == n])
            cap = max(1, max_rows // n)
            if groups.shape[0] > cap:
                groups = groups[torch.randperm(groups.shape[0], generator=gen)[:cap]]
            joined[ids] = groups
        out[p] = joined[ids]
        del chunks
    return out


@torch.no_grad()
def fit_thresholds(model: nn.Module, batches: Iterable[Batch], max_rows: int = 4096) -> None:
    """Refit every adaptive layer's threshold to its keep on ``batches`` (after training moved the
    gates, so the layers keep on average the share of neurons their FLOPs were counted with)."""
    layers = {p: m for p, m in model.named_modules() if isinstance(m, SparseLayer) and m.adaptive and not m.keeps_all}
    if not layers:
        return
    was_training = model.training
    model.eval()
    try:
        for p, g in collect_groups(model, batches, max_rows).items():
            if p in layers:
                m = layers[p]
                m.threshold = fit_threshold(m.mask_scores(g), m.keep)
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
    layers = {p: m for p, m in model.named_modules() if isinstance(m, SparseLayer) and m.adaptive and m.threshold is not None
              and not m.keeps_all}
    order: list[str] = []
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(p: str, mod: SparseLayer, x: torch.Tensor) -> None:
        if p not in order:
            order.append(p)
        seen.setdefault(p, []).append(mod.mask_scores(mod.groups_of(x)).float())

    def scores_of(paths: Iterable[str]) -> None:
        seen.clear()
        with watching({p: layers[p] for p in paths}, hook):
            run_model(model, example_inputs)

    was_training = model.training
    model.eval()
    raised = []
    try:
        scores_of(layers)
        for p in list(order):
            scores_of([p])
            m, s = layers[p], torch.cat([t.reshape(-1, layers[p].width) for t in seen[p]])
            allowed = m.k * s.shape[0]
            if int(m.mask_counts(s, m.threshold).sum()) <= allowed:
                continue
            flat = s.reshape(-1).sort().values
            for above in range(allowed, 0, -1):  # ties and the one-neuron floor can need a step or two more
                threshold = float(flat[flat.numel() - above - 1])
                if int(m.mask_counts(s, threshold).sum()) <= allowed:
                    break
            m.threshold = threshold
            raised.append(p)
    finally:
        model.train(was_training)
    return raised


@renamed_kwargs(kind="output")
def calibrate(
    model: nn.Module, batches: Iterable[Batch], whiten: bool = True, max_rows: int = 4096, output: str | None = None,
    progress: bool = True,
) -> list[LayerCalibration]:
    """Calibrate every MID-L layer of ``model`` in closed form on ``batches`` (no gradient steps).

    With ``output`` (what distillation compares: "logits", "embedding", "hidden"; "auto" asks
    ``quality.output_of``; None, the default: each layer's own error only) the gate of each
    layer with nothing elementwise after it predicts its error weighted by how far that error
    reaches the model's output (``sensitivity.py``). Layers followed by a norm or an activation
    keep predicting the error left after it, which already says what passes on. On MiniLM at
    keep 0.5 this lifts the calibrated embeddings' cosine from 0.789 to 0.826 and the distilled
    one only from 0.893 to 0.896 (``benchmarks/distill_quality.py --sensitivity``), so it is
    not the default. ``progress=False`` hides the bar (shown only on a terminal anyway).
    """
    outputs = ("auto", *sorted(set(TASK_OUTPUT.values())))
    if output is not None and output not in outputs:
        raise ValueError(f"output must be None or one of {', '.join(outputs)}, got {output!r}; e.g. output='logits' for a "
                         f"classifier")
    batches = list(batches)
    was_training = model.training
    model.eval()
    try:
        groups = collect_groups(model, batches, max_rows)
        layers = dict((p, m) for p, m in model.named_modules() if isinstance(m, SparseLayer))
        posts = {p: post_fn(model, *layers[p].downstream) for p in groups}
        weights: dict[str, torch.Tensor] = {}
        plain = [p for p in groups if not layers[p].keeps_all and layers[p].takes_output_weights(posts[p])]
        if output is not None and plain and batches:
            with dense(model):
                output = output_of(model, batches[0]) if output == "auto" else output
                weights = {p: s.sqrt() for p, s in neuron_sensitivity(model, plain, batches, output, probes=2).items()}
        out = []
        with progress_bar("calibrating", len(groups), progress) as advance:
            for p, g in groups.items():
                with linalg_threads(layers[p].weight.numel()):
                    out.append(layers[p].calibrate_rows(g, whiten=whiten, path=p, post=posts[p], weight=weights.get(p)))
                advance()
        return out
    finally:
        model.train(was_training)
