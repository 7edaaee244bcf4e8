"""The layer budget's measurements: each candidate option's damage at the model's output and, under
``speedup``, its time at the model's real call shape; cached on disk.

Every candidate layer alone, at each (select, keep, rank) of its grid (``budget_options.py``), is
swapped in, fitted to its real inputs (``SparseLayer.calibrate_rows``), and the model's output on a
few calibration batches is compared with the original's by the distillation loss (KL on logits,
1 - cosine on embeddings and hidden states). Damage is measured at the output because a layer's own
error does not predict it: a MiniLM MLP's second layer has the smallest own error and does some of
the most damage. Under ``accelerate launch`` each process judges its share of the layers
(``processes.py``). Measurements are cached on disk, keyed by the weights, the calibration data and
the settings, so a second run with another target costs seconds.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import latency
from .budget_knapsack import check_reachable
from .budget_options import Measurements, option_costs
from .calibrate import collect_groups
from .config import MIDLConfig
from .data import Batch
from .downstream import post_fn
from .errors import MIDLError
from .files import cache_dir, write_atomic
from .fitting import linalg_threads, whitened_svd
from .log import logger, progress_bar
from .processes import gather, my_share
from .quality import distill_loss, model_output, positions
from .replay import BlockReplay
from .screening import own_error, pick_options
from .sparse import SparseLayer, weight_matrix
from .kinds import build_layer, kind_for
from .surgery import LayerPlan, Plan, set_module

CACHE_VERSION = 7  # 2: logits damage is relative squared error, not KL; 3: gates fitted after the activation; 4: sides;
# 5: options screened by own error (damage None when not judged); 6: low-rank whitened SVD; 7: an option's kind is
# 'select', a layer's module 'module_type' (format 2, migrate.py): older entries are simply not read
JUDGE_ALL_UP_TO, DEFAULT_JUDGE = 1000, 6  # MIDLConfig.budget_judge=None: judge a grid this small whole, else 6 per layer
SCREEN_ROWS = 1024  # input rows per layer, from the judged batches, that each option's own error is measured on


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


def cache_key(model: nn.Module, todo: dict[str, list[LayerPlan]], batches: Sequence[Batch], output: str,
              example_inputs: Any, whiten: bool, fixed: Sequence[LayerPlan], judged: int, screen: str = "") -> str:
    """Hash of what the measurements depend on: the candidates' weights, the grid, the data (the
    first ``judged`` batches measure damage, the rest fit), the settings."""
    h = hashlib.sha256(
        f"v{CACHE_VERSION}|{type(model).__qualname__}|{output}|{whiten}|{judged}|{screen}|{torch.__version__}".encode())
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
    model: nn.Module, todo: dict[str, list[LayerPlan]], batches: Sequence[Batch], output: str, whiten: bool = True,
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
                loss += damage_of(model_output(model, b, output), t, output, b)
        return loss / len(batches)

    with _channels_last(model):
        with replay.recording():
            targets = [model_output(model, b, output) for b in batches]
        replay.check(lambda j: model_output(model, batches[j], output), targets)
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
                        svd = whitened_svd(w, x) if whiten and any(o.rank and kind_for(o.select).shares_whitened_svd for o in options) else None

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


def damage_of(student: torch.Tensor, teacher: torch.Tensor, output: str, batch: Batch) -> float:
    """How far the output moved: the logits' squared error relative to the teacher's logit spread, or
    1 - cosine for embeddings and hidden states.

    Not KL: on calibration data the teacher is unsure of (textures for an ImageNet model) a flat
    softmax hides large logit changes. Damage is only as good as the data it is measured on:
    EfficientNet-Lite0's last 1x1 conv, harmless on the built-in photos, alone cut top-1 agreement
    on unseen cat and coffee crops to 0.56; measure on data like the data the model will serve.
    """
    if output != "logits":
        return distill_loss(student, teacher, output, batch).item()
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
    model: nn.Module, plan: Plan, config: MIDLConfig, batches: Sequence[Batch], output: str, example_inputs: Any,
    whiten: bool = True, use_cache: bool = True, progress: bool = True,
) -> Measurements:
    """FLOPs (and, under ``config.speedup``, seconds) and damage of every candidate option; damage from
    the cache when the same inputs were measured.

    The first ``damage_batches(config, batches)`` of ``batches`` measure the damage; the rest fit each
    option. A target the options cannot reach (``max_ratio``) raises before any damage is measured: a
    FLOPs ratio as soon as the options are counted, a speed-up once they are timed.
    """
    if not batches:
        raise MIDLError("the layer budget needs calibration batches to measure damage; pass a few batches of real data")
    judged = damage_batches(config, batches)
    batches, fit_batches = batches[:judged], batches[judged:]
    start = time.perf_counter()
    axis = config.target[0] if config.target else "flops"
    m, trials, fixed, shapes = option_costs(model, plan, config, example_inputs, axis)
    if axis == "time":
        _time_options(model, m, trials, fixed, shapes, example_inputs, use_cache)
    if config.target is not None:  # before any damage is measured: an impossible target fails in seconds
        check_reachable(m, config.target[1], config.fixed_rank)
    todo = {p: t for p, t in trials.items() if t}
    judge = judged_per_layer(config.budget_judge, sum(len(t) for t in todo.values()))  # None: every option
    m.key = cache_key(model, todo, [*batches, *fit_batches], output, example_inputs, whiten, fixed, len(batches),
                      f"judge {judge} on {axis}")
    path = cache_dir() / f"{m.key}.json"
    stored = _stored(path) if use_cache else None
    if stored is not None:
        damage = {p: [o.damage for o in stored.layers[p].options] for p in todo}
    else:
        saved = {p: [m.layers[p].saved(o, axis) for o in m.layers[p].options] for p in todo}
        damage = measure_damage(model, todo, batches, output, whiten, progress, fit_batches, saved, judge)
    for p, values in damage.items():
        for option, value in zip(m.layers[p].options, values):
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
    causal = latency.is_causal_lm(model)
    m.call = latency.DECODE if causal else "example input"
    memo: dict[Any, tuple[float, list[float]]] = {}
    start = time.perf_counter()
    working_set = latency.weight_bytes(model)  # the weights a call reads, at most

    def layer_seconds(lp: LayerPlan, options: Sequence[LayerPlan]) -> tuple[float, list[float]]:
        shape = latency.LayerShape.of(model.get_submodule(lp.path), lp.module_type, lp.in_features, lp.out_features)
        calls = latency.decode_calls(lp.in_features) if causal else shapes[lp.path]
        dense, per = 0.0, [0.0] * len(options)
        for call in calls:
            key = (shape, call, tuple((o.select, o.keep, o.rank, o.granularity, o.adaptive) for o in options))
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
