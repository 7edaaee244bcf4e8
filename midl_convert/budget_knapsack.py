"""The layer budget's choice: per layer, the option (or dense) that reaches a FLOPs ratio or a speed-up
at the least summed damage, and the highest ratio the options can reach.

A multiple-choice knapsack solved by Lagrangian relaxation: at a price ``lam`` per FLOP saved each
layer independently takes the option minimising ``damage - lam * saved`` (dense is the option with
both at zero); bisection on ``lam`` finds the least-damage point of the lower convex hull that saves
enough, then a greedy pass gives back savings the target does not need, where that removes the most
damage. Damages are taken as additive across layers. The cost axis is FLOPs, or seconds under
``speedup``: each option's time at the model's real call shape (``latency.py``: batch-1 decode for a
causal LM), the whole model's dense time measured end to end, the untouched parts' time held fixed.
"""
from __future__ import annotations

import torch

from .budget_options import Measurements, Option
from .errors import MIDLError


def cheapest(m: Measurements, convert_all: bool = False) -> dict[str, Option | None]:
    """Every layer at its cheapest option on ``m.axis``, or dense where no option saves (``convert_all``:
    converted even where that costs more than dense)."""
    best = {p: max(c.options, key=lambda o, c=c: c.saved(o, m.axis), default=None) for p, c in m.layers.items()}
    if convert_all:
        return best
    return {p: o if o is not None and m.layers[p].saved(o, m.axis) > 0 else None for p, o in best.items()}


def max_ratio(m: Measurements, convert_all: bool = False) -> float:
    """The highest whole-model ratio (FLOPs or speed-up, by ``m.axis``) these options reach: the one
    place reachability is worked out (before measuring, in ``allocate`` and in the plan's summary)."""
    return predicted_ratio(m, cheapest(m, convert_all))


def check_reachable(m: Measurements, target: float, named_rank: float | None = None) -> None:
    """Raise, naming the highest reachable figure, when ``target`` is out of the options' reach;
    ``named_rank`` (``MIDLConfig.fixed_rank``) is named in the FLOPs message as a limit the user set."""
    reachable = max_ratio(m)
    if reachable >= target:
        return
    if m.axis == "flops":
        fixed = "" if named_rank is None else f" at the rank you named ({named_rank:g}; drop --rank to let the budget choose)"
        raise MIDLError(f"flops_ratio {target:g} cannot be reached: the highest whole-model ratio with every "
                        f"layer at its cheapest keep and rank{fixed} is {reachable:.3f}x (counted before measuring); ask for at "
                        f"most that, or convert more layers (include, skip_head) or try lower keeps (budget_keeps)")
    slow = "" if reachable > 1.0 else (
        f" (no option of any layer ran faster than the dense layer there; converting every layer at its fastest option "
        f"gives {max_ratio(m, convert_all=True):.3f}x)")
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
        choice = cheapest(m, convert_all=True)
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
