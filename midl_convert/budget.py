"""The layer budget: each layer's keep and rank (or dense), chosen from measured damage so the whole
model reaches a FLOPs ratio (``MIDLConfig(flops_ratio=1.5)``, ``--flops-ratio 1.5``) or a speed-up
measured on this machine (``MIDLConfig(speedup=1.3)``, ``--speedup 1.3``).

Measure. Every candidate layer alone, at each (side, keep, rank) of a small grid, is swapped in, fitted
to its real inputs (``SparseLayer.calibrate_rows``), and the
model's output on a few calibration batches is compared with the original's by the distillation
loss (KL on logits, 1 - cosine on embeddings and hidden states). Damage is measured at the output
because a layer's own error does not predict it: a MiniLM MLP's second layer has the smallest
own error and does some of the most damage. Damages are taken as additive across layers.

Allocate. A multiple-choice knapsack solved by Lagrangian relaxation: at a price ``lam`` per FLOP
saved each layer independently takes the option minimising ``damage - lam * saved`` (dense is the
option with both at zero); bisection on ``lam`` finds the least-damage point of the lower convex
hull that saves enough, then a greedy pass gives back savings the target does not need, where
that removes the most damage. The cost axis is FLOPs, or seconds under ``speedup``: each option's
time at the model's real call shape (``latency.py``: batch-1 decode for a causal LM), the whole
model's dense time measured end to end, the untouched parts' time held fixed. A speed-up the timed
options cannot reach fails before any damage is measured.

FLOPs are counted as the report counts them (``flops.midl_flops_parts`` on the example input's
calls, the rest of the model by ``FlopCounterMode``), gate and light path included. Measurements
are cached on disk, keyed by the weights, the calibration data and the settings, so a second run
with another target costs seconds.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .calibrate import collect_groups
from .fitting import linalg_threads, whitened_svd
from .downstream import post_fn
from .config import MIDLConfig, resolve_rank
from .data import Batch
from .errors import MIDLError
from .files import cache_dir, write_atomic
from .processes import gather, my_share
from .flops import count_flops, dense_flops
from .log import logger, progress_bar
from .running import run_model, watching
from .sparse import SparseLayer, weight_matrix
from .matching import matches
from .quality import positions, distill_loss, model_output
from .replay import BlockReplay
from .screening import own_error, pick_options
from .kinds import all_kinds, build_layer, kind_for
from .surgery import LayerPlan, Plan, set_module

CACHE_VERSION = 6  # 2: logits damage is relative squared error, not KL; 3: gates fitted after the activation; 4: sides;
# 5: options screened by own error (damage None when not judged); 6: low-rank whitened SVD
JUDGE_ALL_UP_TO, DEFAULT_JUDGE = 1000, 6  # MIDLConfig.budget_judge=None: judge a grid this small whole, else 6 per layer
SCREEN_ROWS = 1024  # input rows per layer, from the judged batches, that each option's own error is measured on
TOO_SENSITIVE = "too sensitive: the budget is met with less damage elsewhere"
NO_TIME = "no time to gain: at the model's call shape every option tried ran slower than the dense layer"
NO_GAIN = "no FLOPs to gain: at every keep and rank tried, the gate and light path cost as much as the rows skipped"


AXES = ("flops", "time")  # what the knapsack spends: FLOPs on the example input, or measured seconds


@dataclass
class Option:
    """One (side, keep, rank) setting of one layer: its FLOPs (and seconds, when timed) and measured damage."""

    keep: float
    rank: int
    flops: int
    damage: float
    side: str = "output"
    seconds: float | None = None  # per call of the model at its real call shape (``latency.py``)

    def cost(self, axis: str) -> float:
        return self.flops if axis == "flops" else self.seconds


@dataclass
class LayerCost:
    """What converting one layer costs and saves, per option."""

    path: str
    dense_flops: int
    options: list[Option]
    dense_seconds: float | None = None

    def dense(self, axis: str) -> float:
        return self.dense_flops if axis == "flops" else self.dense_seconds

    def saved(self, option: Option | None, axis: str = "flops") -> float:
        return 0 if option is None else self.dense(axis) - option.cost(axis)


@dataclass
class Measurements:
    """The budget's input: the dense model's cost and every candidate layer's options, on one axis:
    ``flops`` (``dense_total``, ``fixed_saved``) or ``time`` (``dense_time``, ``fixed_saved_time``, seconds)."""

    dense_total: int
    layers: dict[str, LayerCost]
    fixed_saved: int  # FLOPs saved by layers the user pinned with an override (not chosen by the budget)
    seconds: float
    key: str
    cached: bool = False
    axis: str = "flops"
    dense_time: float | None = None  # the whole dense model, seconds per call at its real call shape
    fixed_saved_time: float = 0.0
    call: str | None = None  # the call shape times were measured on

    @property
    def total(self) -> float:
        return self.dense_total if self.axis == "flops" else self.dense_time

    @property
    def fixed(self) -> float:
        return self.fixed_saved if self.axis == "flops" else self.fixed_saved_time

    def saved(self, choice: dict[str, Option | None]) -> float:
        """Cost saved on this axis by ``choice`` (pinned layers included)."""
        return self.fixed + sum(self.layers[p].saved(o, self.axis) for p, o in choice.items())

    def to_dict(self) -> dict[str, Any]:
        return {"dense_total": self.dense_total, "fixed_saved": self.fixed_saved, "seconds": self.seconds, "key": self.key,
                "layers": {p: {"dense_flops": c.dense_flops, "options": [asdict(o) for o in c.options]} for p, c in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Measurements":
        layers = {p: LayerCost(p, c["dense_flops"], [Option(**o) for o in c["options"]]) for p, c in d["layers"].items()}
        return cls(d["dense_total"], layers, d["fixed_saved"], d["seconds"], d["key"], cached=True)


# ----- FLOPs of a plan on the example input ---------------------------------------------------
def input_shapes(model: nn.Module, paths: Iterable[str], example_inputs: Any) -> dict[str, list[tuple[int, ...]]]:
    """The input shape of every call of each module in ``paths`` on the example input."""
    shapes: dict[str, list[tuple[int, ...]]] = {p: [] for p in paths}
    with watching({p: model.get_submodule(p) for p in shapes}, lambda p, m, x: shapes[p].append(tuple(x.shape))), \
            torch.no_grad():
        run_model(model, example_inputs)
    return shapes


def option_flops(module: nn.Module, lp: LayerPlan, shapes: Sequence[tuple[int, ...]]) -> tuple[int, int]:
    """(dense, MID-L) FLOPs of ``module`` converted as ``lp`` over calls with these input shapes."""
    shell = build_layer(module, lp, "empty", device="meta")  # shapes and k, no memory
    dense = midl = 0
    for shape in shapes:
        grouped = shell.groups_of(torch.empty(shape, device="meta"))
        rows, groups = grouped.shape[0] * grouped.shape[1], grouped.shape[0]
        dense += dense_flops(lp.in_features, lp.out_features, rows)
        midl += sum(shell.flops_parts(rows, groups).values())
    return dense, midl


# ----- measurement -----------------------------------------------------------------------------
def _pinned(lp: LayerPlan, config: MIDLConfig) -> bool:
    """An override that sets ``keep`` fixes the layer: per-pattern settings win over the budget."""
    return any(o.keep is not None and any(matches(o.match, n) for n in [lp.path, *lp.aliases]) for o in config.overrides)


def _override_rank(lp: LayerPlan, config: MIDLConfig) -> bool:
    return any(o.rank is not None and any(matches(o.match, n) for n in [lp.path, *lp.aliases]) for o in config.overrides)


def grid(lp: LayerPlan, config: MIDLConfig) -> list[tuple[str, float, int]]:
    """The (side, keep, rank) settings tried on one layer: each kind ``lp.side`` allows ("auto": every
    kind in the auto grid) with the kind's own keeps and ranks; a rank the user named
    (``config.fixed_rank``) replaces every rank grid, and an override's rank replaces that."""
    out = []
    for kind in all_kinds():
        if lp.side != kind.name and not (lp.side == "auto" and kind.in_auto):
            continue
        side, (keeps, ranks) = kind.name, kind.budget_grid(config)
        ranks = ranks if config.fixed_rank is None or not kind.light_path else [config.fixed_rank]
        ranks = [lp.rank] if _override_rank(lp, config) else [resolve_rank(r, lp.in_features, lp.out_features) for r in ranks]
        out += [(side, k, r) for k in sorted(set(keeps)) if k < 1.0 for r in sorted(set(ranks))]
    return out


def _digest(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def cache_key(model: nn.Module, todo: dict[str, list[LayerPlan]], batches: Sequence[Batch], kind: str,
              example_inputs: Any, whiten: bool, fixed: Sequence[LayerPlan], judged: int, screen: str = "") -> str:
    """Hash of what the measurements depend on: the candidates' weights, the grid, the data (the
    first ``judged`` batches measure damage, the rest fit), the settings."""
    h = hashlib.sha256(
        f"v{CACHE_VERSION}|{type(model).__qualname__}|{kind}|{whiten}|{judged}|{screen}|{torch.__version__}".encode())
    for path, options in todo.items():
        module = model.get_submodule(path)
        h.update(json.dumps([asdict(lp) for lp in options], sort_keys=True).encode())
        _digest(h, module.weight)
        if module.bias is not None:
            _digest(h, module.bias)
    h.update(json.dumps([asdict(lp) for lp in fixed], sort_keys=True).encode())
    h.update(str([tuple(t.shape) for t in _tensors(example_inputs)]).encode())  # FLOPs depend on its shapes only
    for t in [t for b in batches for t in _tensors(b.inputs)]:
        _digest(h, t)
    return h.hexdigest()[:32]


@torch.no_grad()
def measure_damage(
    model: nn.Module, todo: dict[str, list[LayerPlan]], batches: Sequence[Batch], kind: str, whiten: bool = True,
    progress: bool = True, fit_batches: Sequence[Batch] = (), saved: dict[str, list[float]] | None = None,
    judge: int | None = None, replay: bool = True,
) -> dict[str, list[float | None]]:
    """Output loss on ``batches`` against the unchanged model with each layer alone converted at each
    of its options, each fitted (``calibrate_rows``) on ``fit_batches`` (on ``batches`` when none).

    With ``judge``, a layer with more options than that has them screened first (``screening.py``):
    each is fitted and its own error measured on the judged batches' inputs, and only the ``judge``
    options ``pick_options`` keeps from (``saved[path]``, own error) are judged at the output; the
    others get None. The blocks before a layer's block are replayed, not run (``replay.py``).

    Fitting and judging on the same few samples flatters every option and ranks them wrongly: on
    MiniLM at 1.3x, 8 sentences for both predicted a damage of 0.03 where conversion lost 0.12;
    fitted on 64 other sentences the prediction (0.080) matched the loss (0.076).

    The model is restored before returning; converted layers share the original's weight tensors,
    so nothing large is copied.
    """
    originals = {p: model.get_submodule(p) for p in todo}
    aliases = {p: [p, *options[0].aliases] for p, options in todo.items()}
    was_training = model.training
    model.eval()
    damage: dict[str, list[float | None]] = {}
    replay = BlockReplay(model, [a for p in todo for a in aliases[p]] if replay else [])
    screened = judge is not None and saved is not None and any(len(o) > judge for o in todo.values())

    def judged_loss(first_block: int) -> float:
        with replay.skipping(first_block):
            loss = 0.0
            for j, (b, t) in enumerate(zip(batches, targets)):
                replay.batch = j
                loss += damage_of(model_output(model, b, kind), t, kind, b)
        return loss / len(batches)

    with _channels_last(model):
        with replay.recording():
            targets = [model_output(model, b, kind) for b in batches]
        replay.check(lambda j: model_output(model, batches[j], kind), targets)
        try:
            # Every candidate as a dense MID-L shell (keep 1 runs the original matmul), to collect its input groups.
            for p, options in todo.items():
                _install(model, aliases[p], build_layer(originals[p], replace(options[0], keep=1.0, rank=0), "share"))
            groups = collect_groups(model, fit_batches or batches)
            held = collect_groups(model, batches, max_rows=SCREEN_ROWS) if screened else {}
            for p, options in todo.items():
                for a in aliases[p]:
                    set_module(model, a, originals[p])
            mine = my_share(list(todo))  # under a launcher, each process judges its share of the layers
            total = sum(min(len(todo[p]), judge) if screened else len(todo[p]) for p in mine)
            with progress_bar("layer budget", total, progress) as advance:
                for i, (p, options) in enumerate((p, todo[p]) for p in mine):
                    x = groups[p].reshape(-1, options[0].in_features)
                    w = weight_matrix(originals[p])[0].float()
                    post = [post_fn(model, lp.norm, lp.activation) for lp in options]
                    with linalg_threads(w.numel()):
                        svd = whitened_svd(w, x) if whiten and any(o.rank and kind_for(o.side).shares_whitened_svd for o in options) else None

                    def fitted(j: int) -> SparseLayer:
                        layer = build_layer(originals[p], options[j], "share")
                        with linalg_threads(w.numel()):
                            layer.calibrate_rows(groups[p], whiten=whiten, path=p, svd=svd, post=post[j], report=False)
                        return layer

                    chosen, made = range(len(options)), {}
                    if screened and len(options) > judge:
                        made = {j: fitted(j) for j in chosen}
                        chosen = pick_options(saved[p], [own_error(made[j], held[p], post[j]) for j in chosen], judge)
                    first = min(replay.block_of(a) for a in aliases[p])
                    damage[p] = [None] * len(options)
                    for j in chosen:
                        _install(model, aliases[p], made[j] if j in made else fitted(j))
                        damage[p][j] = judged_loss(first)
                        advance()
                    _install(model, aliases[p], originals[p])
                    logger.debug("measured %d/%d layers: %s", i + 1, len(mine), p)
        finally:
            for p in todo:
                _install(model, aliases[p], originals[p])
            model.train(was_training)
    return gather(damage, list(todo))


@contextmanager
def _channels_last(model: nn.Module) -> Iterator[None]:
    """Run a CNN's convolutions in channels-last layout while measuring, then put its weights back.

    Judging the options is one forward per option (most of the budget's time); on 2 CPU cores a
    resnet50 forward is about 18% faster in this layout. Models without 4-d contiguous conv weights
    are left as they are.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.is_contiguous()]
    if not convs:
        yield
        return
    for m in convs:
        m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in convs:
            m.weight.data = m.weight.data.contiguous()


def damage_of(student: torch.Tensor, teacher: torch.Tensor, kind: str, batch: Batch) -> float:
    """How far the output moved: the logits' squared error relative to the teacher's logit spread, or
    1 - cosine for embeddings and hidden states.

    Not KL: on calibration data the teacher is unsure of (textures for an ImageNet model) a flat
    softmax hides large logit changes. Damage is only as good as the data it is measured on:
    EfficientNet-Lite0's last 1x1 conv, harmless on the built-in photos, alone cut top-1 agreement
    on unseen cat and coffee crops to 0.56; measure on data like the data the model will serve.
    """
    if kind != "logits":
        return distill_loss(student, teacher, kind, batch).item()
    s, t = positions(student, batch).float(), positions(teacher, batch).float()
    spread = (t - t.mean(-1, keepdim=True)).pow(2).sum(-1).clamp_min(1e-12)
    return ((s - t).pow(2).sum(-1) / spread).mean().item()


def _install(model: nn.Module, paths: list[str], module: nn.Module) -> None:
    for a in paths:
        set_module(model, a, module)


# Batches an image model's options are judged on when ``budget_batches`` is unset. Eight images judge
# a classifier's damage noisily: on EfficientNet-Lite0 at 1.8x, two batches raised the worst held-out
# photo from 0.767 to 0.900 (four gave the same), where four batches of sentences moved MiniLM by
# at most 0.002 (a batch of text is many token rows).
IMAGE_DAMAGE_BATCHES = 2


def takes_images(batch: Batch) -> bool:
    """True when a batch's inputs include a float tensor of images ``(N, C, H, W)``."""
    values = batch.inputs.values() if isinstance(batch.inputs, dict) else batch.inputs
    return any(isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() for t in values)


def damage_batches(config: MIDLConfig, batches: Sequence[Batch]) -> int:
    """How many of the budget's batches measure damage: ``budget_batches``, or when unset
    ``IMAGE_DAMAGE_BATCHES`` for a model that takes images and 1 otherwise."""
    if config.budget_batches is not None:
        return config.budget_batches
    return IMAGE_DAMAGE_BATCHES if batches and takes_images(batches[0]) else 1


def measure(
    model: nn.Module, plan: Plan, config: MIDLConfig, batches: Sequence[Batch], kind: str, example_inputs: Any,
    whiten: bool = True, use_cache: bool = True, progress: bool = True,
) -> Measurements:
    """FLOPs (and, under ``config.speedup``, seconds) and damage of every candidate option; damage from
    the cache when the same inputs were measured.

    The first ``damage_batches(config, batches)`` of ``batches`` measure the damage; the rest fit each
    option. A speed-up the timed options cannot reach raises before any damage is measured.
    """
    if not batches:
        raise MIDLError("the layer budget needs calibration batches to measure damage; pass a few batches of real data")
    judged = damage_batches(config, batches)
    batches, fit_batches = batches[:judged], batches[judged:]
    start = time.perf_counter()
    axis = config.target[0] if config.target else "flops"
    converted = plan.converted
    fixed = [lp for lp in converted if _pinned(lp, config)]
    candidates = [lp for lp in converted if not _pinned(lp, config)]
    shapes = input_shapes(model, [lp.path for lp in converted], example_inputs)
    trials: dict[str, list[LayerPlan]] = {}
    costs: dict[str, LayerCost] = {}
    for lp in candidates:
        module = model.get_submodule(lp.path)
        options = []
        dense, _ = option_flops(module, replace(lp, keep=1.0, side="output"), shapes[lp.path])
        for side, keep, rank in grid(lp, config):
            trial = replace(lp, keep=keep, rank=rank, side=side)
            _, midl = option_flops(module, trial, shapes[lp.path])
            if midl < dense or axis == "time":  # on the time axis the clock decides what pays
                options.append((trial, midl))
        costs[lp.path] = LayerCost(lp.path, dense, [Option(o.keep, o.rank, f, 0.0, o.side) for o, f in options])
        trials[lp.path] = [o for o, _ in options]
    fixed_saved = 0
    for lp in fixed:
        dense, midl = option_flops(model.get_submodule(lp.path), lp, shapes[lp.path])
        fixed_saved += dense - midl
    m = Measurements(count_flops(model, example_inputs), costs, fixed_saved, 0.0, "", axis=axis)
    if axis == "time":
        _time_options(model, m, trials, fixed, shapes, example_inputs, use_cache)
        check_reachable(m, config.speedup)  # before any damage is measured: an impossible target fails in seconds
    todo = {p: t for p, t in trials.items() if t}
    judge = judged_per_layer(config.budget_judge, sum(len(t) for t in todo.values()))  # None: every option
    m.key = cache_key(model, todo, [*batches, *fit_batches], kind, example_inputs, whiten, fixed, len(batches),
                      f"judge {judge} on {axis}")
    path = cache_dir() / f"{m.key}.json"
    stored = _stored(path) if use_cache else None
    if stored is not None:
        damage = {p: [o.damage for o in stored.layers[p].options] for p in todo}
    else:
        saved = {p: [costs[p].saved(o, axis) for o in costs[p].options] for p in todo}
        damage = measure_damage(model, todo, batches, kind, whiten, progress, fit_batches, saved, judge)
    for p, values in damage.items():
        for option, value in zip(costs[p].options, values):
            option.damage = value
    m.seconds, m.cached = (stored.seconds, True) if stored is not None else (time.perf_counter() - start, False)
    if use_cache and stored is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(m.to_dict()))
        except OSError:
            pass  # a read-only cache only costs the next run its measurements
    for cost in m.layers.values():  # screened out: never judged, never chosen
        cost.options = [o for o in cost.options if o.damage is not None]
    return m


def judged_per_layer(setting: int | None, options: int) -> int | None:
    """Options per layer judged at the output (None: all) for ``MIDLConfig.budget_judge`` and the
    grid's ``options`` in all. Screening pays where judging dominates: on SmolLM2's 210 layers it
    brought the budget from hours to minutes; on MiniLM's 37 it saved 7% of 81 s and cost 0.012 of
    top-10 overlap at 1.5x, so by default a grid of at most ``JUDGE_ALL_UP_TO`` options is judged whole."""
    if setting is None:
        return None if options <= JUDGE_ALL_UP_TO else DEFAULT_JUDGE
    return None if setting == 0 else setting


def _stored(path: Path) -> Measurements | None:
    """Measurements cached at ``path``, or None (a damaged file is measured again and rewritten)."""
    if not path.is_file():
        return None
    try:
        return Measurements.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None


def _time_options(
    model: nn.Module, m: Measurements, trials: dict[str, list[LayerPlan]], fixed: Sequence[LayerPlan],
    shapes: dict[str, list[tuple[int, ...]]], example_inputs: Any, use_cache: bool,
) -> None:
    """Put seconds on ``m``: each candidate's dense time and each option's, at the model's real call
    shape, keeping only options faster than the dense layer; the pinned layers' saving; the dense
    model's time end to end. Each distinct (layer shape, call shape, option set) is timed once."""
    from . import latency

    causal = latency.is_causal_lm(model)
    m.call = latency.DECODE if causal else "example input"
    memo: dict[Any, tuple[float, list[float]]] = {}
    start = time.perf_counter()
    working_set = latency.weight_bytes(model)  # the weights a call reads, at most

    def layer_seconds(lp: LayerPlan, options: Sequence[LayerPlan]) -> tuple[float, list[float]]:
        shape = latency.LayerShape.of(model.get_submodule(lp.path), lp.kind, lp.in_features, lp.out_features)
        calls = latency.decode_calls(lp.in_features) if causal else shapes[lp.path]
        dense, per = 0.0, [0.0] * len(options)
        for call in calls:
            key = (shape, call, tuple((o.side, o.keep, o.rank, o.granularity, o.adaptive) for o in options))
            if key not in memo:
                memo[key] = latency.time_options(shape, call, options, use_cache, working_set=working_set)
            dense += memo[key][0]
            per = [a + b for a, b in zip(per, memo[key][1])]
        return dense, per

    for p, options in trials.items():
        if not options:
            continue
        cost = m.layers[p]
        cost.dense_seconds, seconds = layer_seconds(options[0], options)
        for option, t in zip(cost.options, seconds):
            option.seconds = t
        keep = [i for i, o in enumerate(cost.options) if o.seconds < cost.dense_seconds]
        cost.options = [cost.options[i] for i in keep]
        trials[p] = [options[i] for i in keep]
    for lp in fixed:
        dense, (pinned,) = layer_seconds(lp, [lp])
        m.fixed_saved_time += dense - pinned
    m.dense_time = latency.model_time(model, example_inputs)
    logger.info(f"timed {len(memo)} distinct layer shapes at the call shape ({m.call}, {torch.get_num_threads()} threads) "
                f"in {time.perf_counter() - start:.0f}s; dense model {m.dense_time * 1e3:.3f} ms per call")


# ----- allocation ------------------------------------------------------------------------------
def max_ratio(m: Measurements) -> float:
    """The highest whole-model ratio (FLOPs or speed-up, by ``m.axis``) these options can reach: every
    layer at its cheapest option, or dense where no option saves."""
    best = {p: max(c.options, key=lambda o, c=c: c.saved(o, m.axis), default=None) for p, c in m.layers.items()}
    return predicted_ratio(m, {p: o if o is not None and m.layers[p].saved(o, m.axis) > 0 else None for p, o in best.items()})


def all_converted_ratio(m: Measurements) -> float:
    """The ratio with every candidate at its cheapest option, even where that costs more than dense."""
    return predicted_ratio(m, {p: max(c.options, key=lambda o, c=c: c.saved(o, m.axis), default=None)
                               for p, c in m.layers.items()})


def check_reachable(m: Measurements, target: float) -> None:
    """Raise, naming the highest reachable figure, when ``target`` is out of the options' reach."""
    reachable = max_ratio(m)
    if reachable >= target:
        return
    if m.axis == "flops":
        raise MIDLError(
            f"flops_ratio {target:g} cannot be reached: the highest whole-model ratio with these layers and settings is "
            f"{reachable:.3f}x; ask for at most that, or convert more layers (include, skip_head) or try lower keeps "
            f"(budget_keeps)"
        )
    slow = "" if reachable > 1.0 else (
        f" (no option of any layer ran faster than the dense layer there; converting every layer at its fastest option "
        f"gives {all_converted_ratio(m):.3f}x)")
    raise MIDLError(
        f"speedup {target:g} cannot be reached on this machine at the model's call shape ({m.call}, "
        f"{torch.get_num_threads()} threads): the highest reachable whole-model speed-up is {reachable:.3f}x{slow}; "
        f"ask for at most that, use flops_ratio, or convert more layers (include, skip_head)"
    )


def allocate(m: Measurements, target: float) -> dict[str, Option | None]:
    """Per layer, the option (``None`` = dense) that reaches ``target`` (a FLOPs ratio or a speed-up, by
    ``m.axis``) at the least summed damage."""
    axis = m.axis
    need = m.total * (1 - 1 / target) - m.fixed
    if need <= 0:
        return {p: None for p in m.layers}
    check_reachable(m, target)

    def pick(lam: float) -> dict[str, Option | None]:
        out: dict[str, Option | None] = {}
        for p, c in m.layers.items():
            best, score = None, 0.0
            for o in c.options:
                s = o.damage - lam * c.saved(o, axis) / m.total  # a price per share of the model's cost
                if s < score:
                    best, score = o, s
            out[p] = best
        return out

    def saved(choice: dict[str, Option | None]) -> float:
        return sum(m.layers[p].saved(o, axis) for p, o in choice.items())

    lo, hi = 0.0, 1e-12
    while saved(pick(hi)) < need:
        hi *= 4
        if hi > 1e12:  # damages so small every option is free: take the cheapest everywhere
            break
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if saved(pick(mid)) < need else (lo, mid)
    choice = pick(hi)
    if saved(choice) < need:  # pragma: no cover - guarded by check_reachable above
        choice = {p: max(c.options, key=lambda o, c=c: c.saved(o, axis), default=None) for p, c in m.layers.items()}
    return _give_back(m, choice, need)


def _give_back(m: Measurements, choice: dict[str, Option | None], need: float) -> dict[str, Option | None]:
    """Move layers to less damaging options while the savings still meet the need (greedy, best gain first)."""
    axis = m.axis
    total = sum(m.layers[p].saved(o, axis) for p, o in choice.items())
    while True:
        best = None
        for p, cur in choice.items():
            c = m.layers[p]
            cur_damage = cur.damage if cur else 0.0
            for alt in [None, *c.options]:
                gain = cur_damage - (alt.damage if alt else 0.0)
                if (gain > 1e-12 and total - c.saved(cur, axis) + c.saved(alt, axis) >= need
                        and (best is None or gain > best[0])):
                    best = (gain, p, alt)
        if best is None:
            return choice
        _, p, alt = best
        total += m.layers[p].saved(alt, axis) - m.layers[p].saved(choice[p], axis)
        choice[p] = alt


def predicted_ratio(m: Measurements, choice: dict[str, Option | None]) -> float:
    """Dense / converted cost of ``choice`` on ``m.axis``: a FLOPs ratio, or a predicted speed-up."""
    if m.axis == "flops":
        return m.dense_total / max(1, m.dense_total - m.saved(choice))
    return m.dense_time / max(1e-12, m.dense_time - m.saved(choice))


def check_flops_reachable(model: nn.Module, plan: Plan, config: MIDLConfig, example_inputs: Any) -> float:
    """The highest ratio any choice of options reaches, from FLOPs alone (every candidate at its cheapest
    grid option); raises before minutes of measuring when ``config.flops_ratio`` is above it."""
    shapes = input_shapes(model, [lp.path for lp in plan.converted], example_inputs)
    saved = 0
    for lp in plan.converted:
        module = model.get_submodule(lp.path)
        dense, _ = option_flops(module, replace(lp, keep=1.0, side="output"), shapes[lp.path])
        trials = [lp] if _pinned(lp, config) else [replace(lp, keep=k, rank=r, side=s) for s, k, r in grid(lp, config)]
        saved += max([dense - option_flops(module, t, shapes[lp.path])[1] for t in trials] + [0])
    total = count_flops(model, example_inputs)
    reachable = total / max(1, total - saved)
    if config.flops_ratio is not None and reachable < config.flops_ratio:
        fixed = "" if config.fixed_rank is None else f" at the rank you named ({config.fixed_rank:g}; drop --rank to let the budget choose)"
        raise MIDLError(f"flops_ratio {config.flops_ratio:g} cannot be reached: the highest whole-model ratio with every "
                        f"layer at its cheapest keep and rank{fixed} is {reachable:.3f}x (counted before measuring); ask for at "
                        f"most that, or convert more layers (include, skip_head) or try lower keeps (budget_keeps)")
    return reachable


def budget_plan(
    model: nn.Module, plan: Plan, config: MIDLConfig, batches: Sequence[Batch], kind: str, example_inputs: Any,
    whiten: bool = True, use_cache: bool = True, progress: bool = True,
) -> Plan:
    """``plan`` with each candidate's keep and rank chosen for ``config.flops_ratio`` or ``config.speedup``
    (or dense, and why). ``progress=False`` hides the measuring bar (it shows only on a terminal anyway)."""
    if config.target is None:
        raise MIDLError("budget_plan needs MIDLConfig(flops_ratio=...) or MIDLConfig(speedup=...), e.g. flops_ratio=1.5")
    axis, target = config.target
    check_flops_reachable(model, plan, config, example_inputs)
    m = measure(model, plan, config, batches, kind, example_inputs, whiten, use_cache, progress)
    choice = allocate(m, target)
    layers = []
    for lp in plan.layers:
        if lp.path not in m.layers:
            layers.append(lp)
            continue
        o = choice.get(lp.path)
        if o is None:
            reason = (NO_GAIN if axis == "flops" else NO_TIME) if not m.layers[lp.path].options else TOO_SENSITIVE
            layers.append(replace(lp, convert=False, keep=None, rank=None, granularity=None, reason=reason))
        else:
            layers.append(replace(lp, keep=o.keep, rank=o.rank, side=o.side, predicted_damage=o.damage))
    damage = sum(o.damage for o in choice.values() if o is not None)
    ratio = predicted_ratio(m, choice)
    summary = {
        "axis": axis, "target": target, "predicted_ratio": ratio, "predicted_damage": damage,
        "reachable": max_ratio(m), "dense_flops": m.dense_total, "measured_layers": len(m.layers),
        "options": sum(len(c.options) for c in m.layers.values()), "seconds": m.seconds, "cached": m.cached,
        "damage_metric": "relative logit MSE" if kind == "logits" else "1 - cosine", "method": "lagrangian-knapsack+greedy",
    }
    if axis == "time":
        summary.update(call=m.call, threads=torch.get_num_threads(), dense_ms=m.dense_time * 1e3,
                       predicted_flops_ratio=predicted_ratio(replace(m, axis="flops"), choice))
    what = "speed-up measured at the call shape (" + str(m.call) + ")" if axis == "time" else "on the example input"
    note = (f"layer budget: target {target:g}x, predicted {ratio:.3f}x {what} (highest "
            f"reachable {summary['reachable']:.3f}x), predicted damage {damage:.4g} ({summary['damage_metric']}, summed over "
            f"layers); {summary['options']} options on {len(m.layers)} layers measured in {m.seconds:.0f}s"
            f"{' (cached)' if m.cached else ''}")
    new = Plan(layers=layers, method=plan.method, notes=[*plan.notes, note], budget=summary)
    if not new.converted:
        raise MIDLError(f"the layer budget left every layer dense; raise {'flops_ratio' if axis == 'flops' else 'speedup'} "
                        f"or convert more layers")
    return new


__all__ = ["AXES", "LayerCost", "Measurements", "Option", "allocate", "budget_plan", "check_flops_reachable", "check_reachable", "grid",
           "max_ratio", "measure", "measure_damage", "option_flops", "predicted_ratio"]
