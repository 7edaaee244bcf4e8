"""TEAL (Liu et al., 2024): one magnitude threshold per projection input, and its block-wise greedy
allocation of sparsity (``teal/greedyopt.py`` at commit 5baaec8, read and rewritten here).

TEAL zeroes the entries of each projection's input below a threshold, ``x * (|x| > t)``, with ``t``
the quantile of the dense model's ``|x|`` at that projection's sparsity (TEAL keeps histograms and
reads ``icdf(0.5 + s / 2)`` of a distribution it assumes symmetric; here a table of quantiles of
``|x|`` on the calibration tokens). Its greedy step allocates sparsity inside each block, on the
dense model's own inputs to that block: from dense, it tries raising each projection's sparsity by
one step (0.05 for a projection the size of the block's first one, the query, and 0.05 / its
relative size for the others, so each step adds the same effective sparsity), and keeps the step
whose block output moves least. TEAL's error is the L2 norm over the tokens of the last quarter of
each sequence, per channel, averaged (``torch.norm(..., dim=1).mean()``); here over each sequence's
real tokens when the batch is padded. The effective sparsity is the projections' sparsities
weighted by their weight counts, so it is the share of the block's Linear FLOPs saved. Each
point of the walk is recorded; a model-wide level then takes, in every block, the recorded point
closest to it (TEAL's lookup).

The walk runs each block alone on its cached dense inputs, with the masks as plain thresholds on
the dense block's own Linears (no package layers), and a Linear reuses its committed output while
its input and threshold are unchanged, so a candidate costs the projections at and after it. The
model is then judged with the same plain masks (``thresholded``), and its FLOPs are counted as the
masks fall on the judged inputs (``teal_flops``: kept columns x out x 2 per row, plus |x| and the
compare). One difference from TEAL's evaluation: TEAL sparsifies only the second half of each
prompt's tokens (``apply_prefill``), here every token is.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from midl_convert.flops import LayerFlops, ModelFlops, count_flops
from midl_convert.replay import block_stack
from midl_convert.running import run_model

STEP = 0.05  # TEAL's base step: the sparsity a query-sized projection gains per step
LAST = 0.25  # the share of each sequence's tokens, at its end, that the block error is measured on
TABLE = 4096  # quantiles of |x| kept per projection (sparsity resolution 1 / TABLE)

Path = list[tuple[float, dict[str, float]]]  # (effective sparsity, each projection's sparsity) per point


@dataclass
class Walk:
    """TEAL's greedy walk over a model: per block its projections and recorded path, and per
    projection the quantiles of the dense model's ``|x|`` that turn a sparsity into a threshold."""

    blocks: list[list[str]]
    paths: list[Path]
    quantiles: dict[str, torch.Tensor]
    seconds: float = 0.0

    def threshold(self, path: str, sparsity: float) -> float | None:
        """The |x| below which ``sparsity`` of the dense inputs of ``path`` lie; None at sparsity 0 (dense)."""
        return threshold(self.quantiles[path], sparsity)

    def at_level(self, level: float) -> dict[str, float]:
        """Each projection's sparsity at the recorded point of its block's path closest to ``level``."""
        chosen: dict[str, float] = {}
        for path in self.paths:
            chosen.update(min(path, key=lambda point: abs(point[0] - level))[1])
        return chosen

    def uniform(self, sparsity: float) -> dict[str, float]:
        """Every projection at ``sparsity`` (TEAL's uniform setting)."""
        return {p: sparsity for block in self.blocks for p in block}


def quantile_table(values: torch.Tensor) -> torch.Tensor:
    """``TABLE + 1`` quantiles of ``|values|``, from the smallest to the largest."""
    flat = values.detach().float().abs().reshape(-1).sort().values
    at = torch.linspace(0, flat.numel() - 1, TABLE + 1).round().long()
    return flat[at]


def threshold(table: torch.Tensor, sparsity: float) -> float | None:
    """The threshold at ``sparsity`` read off a quantile table (linear between its points)."""
    if sparsity <= 0:
        return None
    pos = min(sparsity, 1.0) * TABLE
    lo = min(int(pos), TABLE - 1)
    frac = pos - lo
    return float(table[lo] * (1 - frac) + table[lo + 1] * frac)


def weights(model: nn.Module, block: Sequence[str]) -> dict[str, int]:
    return {p: model.get_submodule(p).weight.numel() for p in block}


def effective(sparsity: dict[str, float], weight: dict[str, int]) -> float:
    """TEAL's effective sparsity: the projections' sparsities weighted by their weight counts."""
    return sum(sparsity[p] * weight[p] for p in weight) / sum(weight.values())


class _Masked:
    """A Linear's forward with ``x * (|x| > t)`` in front. While ``reuse`` holds, a call whose input and
    threshold equal the committed ones (per call index) returns the committed output."""

    def __init__(self, linear: nn.Module, reuse: bool) -> None:
        self.linear, self.forward, self.reuse = linear, linear.forward, reuse
        self.t: float | None = None
        self.committed: dict[int, tuple[torch.Tensor, float | None, torch.Tensor]] = {}
        self.call, self.commit = 0, False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        i, self.call = self.call, self.call + 1
        kept = self.committed.get(i)
        if self.reuse and kept is not None and kept[1] == self.t and torch.equal(kept[0], x):
            return kept[2]
        y = self.forward(x if self.t is None else x * (x.abs() > self.t))
        if self.commit:
            self.committed[i] = (x, self.t, y)
        return y


@contextlib.contextmanager
def masked(model: nn.Module, paths: Sequence[str], reuse: bool = True) -> Iterator[dict[str, _Masked]]:
    """Inside the block, the Linears at ``paths`` threshold their inputs (``_Masked``)."""
    wrapped = {p: _Masked(model.get_submodule(p), reuse) for p in paths}
    for w in wrapped.values():
        w.linear.forward = w
    try:
        yield wrapped
    finally:
        for w in wrapped.values():
            del w.linear.forward  # the class's forward again


def _is_cache(value: Any) -> bool:
    """An HF KV cache (``transformers.Cache`` and its kinds), whatever the argument's name in this version."""
    return any(c.__name__ == "Cache" for c in type(value).__mro__)


@torch.no_grad()
def dense_block_inputs(model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence[Any]) -> list[list[tuple]]:
    """Per block, its ``(args, kwargs)`` on each batch as the dense model calls it."""
    calls: list[list[tuple]] = [[] for _ in blocks]

    def keep(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = {k: None if _is_cache(v) else v for k, v in kwargs.items()}  # replays must not grow a KV cache
            calls[i].append((tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), kwargs))
        return hook

    handles = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for batch in batches:
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return calls


def token_masks(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, measured): the batch's real tokens (its attention mask, else all), and the last ``LAST``
    of each sequence's real tokens, where TEAL measures a block's error."""
    inputs = getattr(batch, "inputs", batch)
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is None:
        ids = next(v for v in (inputs.values() if isinstance(inputs, dict) else [inputs]) if isinstance(v, torch.Tensor))
        mask = torch.ones(ids.shape[:2], dtype=torch.long)
    real = mask.bool()
    length = real.sum(1, keepdim=True)
    pos = torch.arange(real.shape[1])[None, :]
    return real, real & (pos >= length - (length * LAST).ceil().clamp_min(1))


def block_error(target: Sequence[torch.Tensor], out: Sequence[torch.Tensor], measured: Sequence[torch.Tensor]) -> float:
    """TEAL's error: per sequence and channel the L2 norm over the measured tokens, averaged."""
    errs = []
    for t, o, m in zip(target, out, measured):
        sq = ((t - o).float() ** 2 * m[..., None]).sum(1)  # (batch, channels)
        errs.append(sq.sqrt())
    return float(torch.cat(errs).mean())


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def walk_block(model: nn.Module, block: nn.Module, projections: Sequence[str], calls: Sequence[tuple],
               measured: Sequence[torch.Tensor], quantiles: dict[str, torch.Tensor], until: float,
               step: float = STEP, reuse: bool = True) -> Path:
    """TEAL's greedy path of one block, up to effective sparsity ``until``."""
    weight = weights(model, projections)
    unit = weight[projections[0]]
    steps = {p: step * unit / w for p, w in weight.items()}
    sparsity = {p: 0.0 for p in projections}
    path: Path = [(0.0, dict(sparsity))]
    with masked(model, projections, reuse) as wrapped:

        def run(commit: bool = False) -> list[torch.Tensor]:
            for w in wrapped.values():
                w.call, w.commit = 0, commit
            return [_first(block(*args, **kwargs)) for args, kwargs in calls]

        target = run(commit=True)
        while effective(sparsity, weight) < until:
            best, best_err = None, float("inf")
            for p in projections:
                if sparsity[p] + steps[p] >= 1.0:
                    continue
                wrapped[p].t = threshold(quantiles[p], sparsity[p] + steps[p])
                err = block_error(target, run(), measured)
                wrapped[p].t = threshold(quantiles[p], sparsity[p])
                if err < best_err:
                    best, best_err = p, err
            if best is None:
                break
            sparsity[best] += steps[best]
            wrapped[best].t = threshold(quantiles[best], sparsity[best])
            if reuse:
                run(commit=True)
            path.append((effective(sparsity, weight), dict(sparsity)))
    return path


@torch.no_grad()
def block_quantiles(model: nn.Module, block: nn.Module, projections: Sequence[str], calls: Sequence[tuple],
                    real: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per projection of ``block``, ``quantile_table`` of its dense inputs on the real tokens of each call."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in projections}
    current = [0]

    def hook(p: str):
        def grab(module: nn.Module, args: tuple) -> None:
            x, keep = args[0], real[current[0]]
            seen[p].append(x[keep] if x.shape[:2] == keep.shape else x.reshape(-1, x.shape[-1]))
        return grab

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p)) for p in projections]
    try:
        for i, (args, kwargs) in enumerate(calls):
            current[0] = i
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {p: quantile_table(torch.cat(v)) for p, v in seen.items()}


def greedy_walk(model: nn.Module, projections: Sequence[str], batches: Sequence[Any], until: float,
                walk: Sequence[Any] | None = None, step: float = STEP, reuse: bool = True, log: bool = True) -> Walk:
    """TEAL's walk over the dense ``model``: thresholds from ``batches``, each block's greedy path on its
    dense inputs from ``walk`` (default: the first of ``batches``), up to effective sparsity ``until``."""
    t0 = time.perf_counter()
    found = block_stack(model, list(projections))
    if found is None:
        raise ValueError("TEAL's greedy walk needs a stack of blocks (an encoder's or a decoder's layers)")
    stack, blocks = found
    grouped = [[p for p in projections if p.startswith(f"{stack}.{i}.")] for i in range(len(blocks))]
    walk = list(batches[:1] if walk is None else walk)
    calls = dense_block_inputs(model, blocks, [*batches, *walk])  # each block's inputs for the quantiles, then the walk
    real = [token_masks(b)[0] for b in batches]
    measured = [token_masks(b)[1] for b in walk]
    quantiles: dict[str, torch.Tensor] = {}
    paths = []
    for i, (block, own) in enumerate(zip(blocks, grouped)):
        t = time.perf_counter()
        quantiles.update(block_quantiles(model, block, own, calls[i][: len(batches)], real))
        paths.append(walk_block(model, block, own, calls[i][len(batches):], measured, quantiles, until, step, reuse)
                     if own else [(0.0, {})])
        if log:
            print(f"TEAL greedy: block {i + 1} of {len(blocks)}, {len(paths[-1]) - 1} steps in "
                  f"{time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return Walk(grouped, paths, quantiles, time.perf_counter() - t0)


@contextlib.contextmanager
def thresholded(model: nn.Module, walk: Walk, sparsity: dict[str, float]) -> Iterator[None]:
    """Inside the block, the Linears of ``model`` at the paths of ``sparsity`` are TEAL's: ``x * (|x| > t)``."""
    with masked(model, list(sparsity), reuse=False) as wrapped:
        for p, w in wrapped.items():
            w.t = walk.threshold(p, sparsity[p])
        yield


@torch.no_grad()
def teal_flops(model: nn.Module, walk: Walk, sparsity: dict[str, float], inputs: Sequence[Any],
               dense: int | None = None) -> ModelFlops:
    """FLOPs of ``model`` with TEAL's masks at ``sparsity`` on ``inputs``, counted as the masks fall on
    them: per row of each masked projection ``|x|`` and the compare (2 per input) and the kept columns
    of ``W`` (2 x out each); a projection at sparsity 0 stays dense. ``dense``: the dense model's
    count on ``inputs`` (``count_flops``), when already known."""
    layers: dict[str, list[int]] = {p: [0, 0] for p in sparsity}  # dense, TEAL

    def hook(p: str, t: float | None):
        def count(module: nn.Module, args: tuple) -> None:
            x, (out, inp) = args[0], module.weight.shape
            rows = x.numel() // inp
            kept = rows * inp if t is None else int((x.abs() > t).sum())
            layers[p][0] += 2 * inp * out * rows
            layers[p][1] += 2 * inp * out * rows if t is None else 2 * inp * rows + 2 * kept * out
        return count

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p, walk.threshold(p, s))) for p, s in sparsity.items()]
    try:
        with thresholded(model, walk, sparsity):
            for one in inputs:
                run_model(model, one)
    finally:
        for h in handles:
            h.remove()
    if dense is None:
        dense = sum(count_flops(model, one) for one in inputs)
    return ModelFlops(dense=dense, layers={p: LayerFlops(d, m) for p, (d, m) in layers.items()})
