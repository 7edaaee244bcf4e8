"""Block replay and option screening: the layer budget measures the same damage with the blocks before
a layer played back, and screening keeps exactly the options the knapsack could pick."""
import random
from dataclasses import replace

import pytest
import torch
from torch import nn

from midl_convert import MIDLConfig, budget_damage, plan_conversion
from midl_convert.data import Batch
from midl_convert.replay import BlockReplay, block_stack
from midl_convert.screening import lower_hull, pick_options
from test_llm import tiny_llama


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDL_CACHE_DIR", str(tmp_path / "cache"))


def llama_batches(n: int = 3, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [Batch({"input_ids": torch.randint(0, 64, (2, 12), generator=gen)}) for _ in range(n)]


def llama_todo(model):
    plan, _ = plan_conversion(model, MIDLConfig(), {"input_ids": torch.randint(0, 64, (1, 8))})
    return {lp.path: [replace(lp, select=s, keep=k, rank=r) for s, k, r in
                      (("input", 0.5, 0), ("output", 0.5, 4), ("input", 0.7, 2))] for lp in plan.converted}


def test_replayed_blocks_give_the_same_damage_as_running_them():
    model = tiny_llama()
    todo = llama_todo(model)
    data = llama_batches()
    replay = BlockReplay(model, list(todo))
    assert replay.name == "model.layers" and len(replay.blocks) == 2
    assert replay.block_of("model.layers.1.mlp.down_proj") == 1 and replay.block_of("lm_head") == 0
    played = budget_damage.measure_damage(model, todo, data[:2], "logits", fit_batches=data[2:])
    ran = budget_damage.measure_damage(model, todo, data[:2], "logits", fit_batches=data[2:], replay=False)
    assert played.keys() == ran.keys()
    for p in ran:
        assert played[p] == pytest.approx(ran[p], rel=1e-4, abs=1e-7), p
    assert min(v for d in ran.values() for v in d) > 0


class Reversed(nn.Module):
    """Runs its blocks last to first: playing back "the blocks before" block i would be wrong."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        for block in reversed(self.blocks):
            x = x + torch.tanh(block(x))
        return x


def test_blocks_run_out_of_order_are_not_replayed():
    torch.manual_seed(0)
    model = Reversed().eval()
    replay = BlockReplay(model, ["blocks.0", "blocks.1", "blocks.2"])
    assert block_stack(model, ["blocks.0", "blocks.1"])[0] == "blocks"
    with replay.recording():
        model(torch.randn(4, 16))
    assert not replay.enabled and replay.block_of("blocks.2") == 0
    data = [Batch((torch.randn(32, 16),)) for _ in range(2)]
    plan, _ = plan_conversion(model, MIDLConfig(), (torch.randn(1, 16),))
    todo = {lp.path: [replace(lp, select="input", keep=0.5, rank=0)] for lp in plan.converted}
    played = budget_damage.measure_damage(model, todo, data[:1], "hidden", fit_batches=data[1:])
    ran = budget_damage.measure_damage(model, todo, data[:1], "hidden", fit_batches=data[1:], replay=False)
    assert played == ran


def lagrangian_picks(points, lams):
    """Every option some price lam makes the best (dense = (0, 0) included, index -1)."""
    out = set()
    for lam in lams:
        best = min([(-1, 0.0)] + [(i, e - lam * s) for i, (s, e) in enumerate(points)], key=lambda t: (t[1], t[0]))
        out.add(best[0])
    return out - {-1}


@pytest.mark.parametrize("seed", range(5))
def test_lower_hull_is_what_the_knapsack_can_pick(seed):
    rng = random.Random(seed)
    points = [(rng.uniform(0, 10), rng.uniform(0, 1) ** 2) for _ in range(15)]
    lams = [10 ** (k / 200) for k in range(-1200, 1200)]
    assert set(lower_hull(points)) == lagrangian_picks(points, lams)


def test_pick_options_keeps_the_hull_and_the_largest_saving():
    saved = [1, 2, 3, 4, 5, 6, 7, 8, 0]
    errors = [0.1, 0.05, 0.3, 0.2, 0.9, 0.35, 0.8, 1.0, 0.0]  # hull: 1 (2, 0.05), 3 (4, 0.2), 5 (6, 0.35), 7 (8, 1.0); 3 on a chord
    assert lower_hull(list(zip(saved, errors))) == [1, 3, 5, 7]
    assert pick_options(saved, errors, 4) == [1, 3, 5, 7]
    assert pick_options(saved, errors, 2) == [1, 7]  # thinned along the hull, both ends kept
    picked = pick_options(saved, errors, 6)  # topped up with the two closest above the hull
    assert picked == [0, 1, 3, 5, 6, 7], picked
    assert pick_options(saved, errors, 20) == list(range(8))  # the option that saves nothing never
    assert pick_options([3, 3, 3], [0.5, 0.1, 0.3], 1) == [1]  # at equal saving, the lowest error


def test_screened_budget_judges_at_most_judge_options_per_layer_and_meets_the_target():
    model = tiny_llama()
    data = llama_batches(4)
    example = {"input_ids": torch.randint(0, 64, (1, 12))}
    cfg = dict(flops_ratio=1.3, budget_batch_size=2, budget_fit_batches=2)
    calls = []
    real = budget_damage.measure_damage

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out)
        return out

    budget_damage.measure_damage, saved = spy, budget_damage.measure_damage
    try:
        screened, _ = plan_conversion(model, MIDLConfig(budget_judge=3, **cfg), example, data[:3], output="logits")
        full, _ = plan_conversion(model, MIDLConfig(budget_judge=0, **cfg), example, data[:3], output="logits")
    finally:
        budget_damage.measure_damage = saved
    judged = [sum(v is not None for v in d) for d in calls[0].values()]
    assert max(judged) == 3 and all(v is not None for d in calls[1].values() for v in d)
    assert len(calls[1]["lm_head" if "lm_head" in calls[1] else next(iter(calls[1]))]) > 3
    for plan in (screened, full):
        assert plan.budget["predicted_ratio"] >= 1.3


def test_default_judges_a_small_grid_whole_and_screens_a_large_one():
    assert budget_damage.judged_per_layer(None, 851) is None  # MiniLM's 37 layers x 23 options
    assert budget_damage.judged_per_layer(None, 4830) == 6  # SmolLM2's 210 x 23
    assert budget_damage.judged_per_layer(0, 4830) is None and budget_damage.judged_per_layer(4, 10) == 4
    with pytest.raises(ValueError):
        MIDLConfig(budget_judge=-1)


def test_fitting_without_the_report_fits_the_same_layer():
    import math

    from midl_convert.kinds.input.layer import InputMIDLinear

    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    groups = torch.randn(256, 1, 48) * torch.rand(48)
    a = InputMIDLinear.from_linear(linear, keep=0.5, rank=4)
    b = InputMIDLinear.from_linear(linear, keep=0.5, rank=4)
    reported = a.calibrate_rows(groups)
    silent = b.calibrate_rows(groups, report=False)
    assert reported.error_after < reported.error_before and math.isnan(silent.error_after)
    for name in ("light_up", "light_down", "column_norm"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_played_back_outputs_are_copies_of_every_container():
    from collections import namedtuple

    from midl_convert.replay import _copy

    Pair = namedtuple("Pair", "hidden extra")
    t = torch.ones(3)
    out = _copy(Pair(t, [t, (t, 1)]))
    assert isinstance(out, Pair) and torch.equal(out.hidden, t) and out.hidden is not t
    assert out.extra[1][1] == 1 and out.extra[0] is not t
