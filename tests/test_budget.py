"""The layer budget: measured damage steers keep and rank, the target is met on the example input,
unreachable targets fail with the reachable figure, and measurements come from the cache."""
import contextlib
import copy
import itertools
import json
import random
from dataclasses import replace

import pytest
import torch
from torch import nn

from midl_convert import MIDLConfig, MIDLError, apply_plan, plan_conversion
from midl_convert import budget, budget_damage
from midl_convert.budget import LayerCost, Measurements, Option, allocate, predicted_ratio
from midl_convert.data import Batch
from midl_convert.flops import model_flops


class Stack(nn.Module):
    """Four equal residual MLP blocks; block ``loud`` writes its output 30x louder into the stream."""

    def __init__(self, width: int = 32, blocks: int = 4, loud: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.gain = [30.0 if i == loud else 1.0 for i in range(blocks)]
        self.head = nn.Linear(width, 8)

    def forward(self, x):
        for block, gain in zip(self.blocks, self.gain):
            x = x + gain * torch.tanh(block(x)) / len(self.blocks)
        return self.head(x)


def batches(n: int = 2, width: int = 32, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [Batch((torch.randn(64, width, generator=gen),)) for _ in range(n)]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def plan_for(model, ratio, **cfg):
    config = MIDLConfig(flops_ratio=ratio, budget_keeps=[0.25, 0.5, 0.75], budget_ranks=[2, 4], **cfg)
    return plan_conversion(model, config, (torch.randn(1, 32),), batches())[0]


def test_sensitive_layer_gets_more_keep_or_stays_dense():
    torch.manual_seed(0)
    model = Stack()
    plan = plan_for(model, 1.3)
    by_path = {lp.path: lp for lp in plan.layers}
    loud = by_path["blocks.2"]
    quiet = [by_path[f"blocks.{i}"] for i in (0, 1, 3)]
    assert not loud.convert and loud.reason == budget.TOO_SENSITIVE, [(lp.path, lp.keep) for lp in plan.layers]
    assert any(q.convert for q in quiet)
    # with a target that needs every block, the loud one keeps the most exact rows
    plan = plan_for(model, 1.9)
    keeps = {lp.path: lp.keep for lp in plan.layers if lp.convert}
    assert keeps["blocks.2"] >= max(keeps[f"blocks.{i}"] for i in (0, 1, 3)), keeps


def test_measured_damage_is_larger_for_the_loud_block():
    torch.manual_seed(0)
    model = Stack()
    plan, _ = plan_conversion(model, MIDLConfig(), (torch.randn(1, 32),))
    todo = {lp.path: [replace(lp, keep=0.5, rank=4)] for lp in plan.converted}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    damage = budget_damage.measure_damage(model, todo, batches(), "logits")
    assert damage["blocks.2"][0] > 10 * max(damage[f"blocks.{i}"][0] for i in (0, 1, 3))
    # the model is handed back untouched: same modules, same weights
    assert all(type(m) is nn.Linear for m in model.blocks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Convs(nn.Module):
    """A small CNN: a 3x3 stem, two 1x1 convs with a BatchNorm and ReLU between, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 64, 1)
        self.bn = nn.BatchNorm2d(64)
        self.project = nn.Conv2d(64, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.project(torch.relu(self.bn(self.expand(torch.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def test_conv_damage_is_measured_in_channels_last_and_the_layout_is_restored(monkeypatch):
    torch.manual_seed(0)
    model = Convs().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    example = (torch.randn(1, 3, 8, 8),)
    plan, _ = plan_conversion(model, MIDLConfig(), example)
    assert {lp.path for lp in plan.converted} == {"expand", "project"}
    todo = {lp.path: [replace(lp, keep=0.5, rank=4)] for lp in plan.converted}
    data = [Batch((torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)),)) for i in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layouts = []
    real = budget_damage.damage_of
    monkeypatch.setattr(budget_damage, "damage_of", lambda *a: layouts.append(
        model.stem.weight.is_contiguous(memory_format=torch.channels_last)) or real(*a))
    damage = budget_damage.measure_damage(model, todo, data[:1], "logits", fit_batches=data[1:])
    assert layouts and all(layouts)  # judged in channels-last layout
    monkeypatch.setattr(budget_damage, "_channels_last", lambda m: contextlib.nullcontext())
    reference = budget_damage.measure_damage(model, todo, data[:1], "logits", fit_batches=data[1:])
    for p in todo:
        assert damage[p][0] > 0 and damage[p][0] == pytest.approx(reference[p][0], rel=1e-3)
    for name, value in model.state_dict().items():  # handed back in the layout and values it came in
        assert value.is_contiguous() and torch.equal(before[name], value), name


@pytest.mark.parametrize("ratio", [1.1, 1.3, 1.6])
def test_achieved_ratio_meets_the_target_on_the_example_input(ratio):
    torch.manual_seed(1)
    model = Stack(loud=0)
    example = (torch.randn(1, 32),)
    teacher = copy.deepcopy(model)
    plan = plan_for(model, ratio)
    student = apply_plan(model, plan)
    achieved = model_flops(student, teacher, example).ratio
    assert achieved >= ratio
    assert plan.budget["predicted_ratio"] == pytest.approx(achieved, rel=1e-9)
    assert plan.budget["target"] == ratio and any("layer budget" in n for n in plan.notes)


def test_unreachable_target_names_the_highest_reachable_ratio():
    with pytest.raises(MIDLError, match=r"flops_ratio 9 cannot be reached: the highest whole-model ratio .* is \d+\.\d+x"):
        plan_for(Stack(), 9.0)


def test_unreachable_target_fails_before_measuring(monkeypatch):
    monkeypatch.setattr(budget_damage, "measure_damage", lambda *a, **k: pytest.fail("measured an unreachable target"))
    model = Stack()
    config = MIDLConfig(flops_ratio=1.01, budget_keeps=[0.25, 0.5, 0.75], budget_ranks=[2, 4], select="output")
    plan, _ = plan_conversion(model, config.model_copy(update={"flops_ratio": None}), (torch.randn(1, 32),))
    bound = budget.max_ratio(budget.option_costs(model, plan, config, (torch.randn(1, 32),))[0])  # FLOPs alone
    with pytest.raises(MIDLError, match=rf"flops_ratio 100 cannot be reached: .* is {bound:.3f}x \(counted before measuring\)"):
        plan_for(model, 100.0, select="output")
    monkeypatch.undo()
    real = budget.measure(model, plan, config, batches(), "logits", (torch.randn(1, 32),), use_cache=False)
    assert bound == pytest.approx(budget.max_ratio(real), rel=1e-9)  # the same bound the measurements give


def test_second_run_reads_the_cache(cache, monkeypatch):
    model = Stack()
    calls = []
    real = budget_damage.measure_damage
    monkeypatch.setattr(budget_damage, "measure_damage", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = plan_for(model, 1.2)
    assert calls == [1] and not first.budget["cached"]
    files = list(cache.glob("budget/*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["layers"]
    second = plan_for(model, 1.4)
    assert calls == [1] and second.budget["cached"]
    with torch.no_grad():  # other weights: measured again
        model.blocks[0].weight.mul_(2)
    plan_for(model, 1.2)
    assert calls == [1, 1]


def test_entries_of_an_older_cache_version_are_not_read(cache, monkeypatch):
    """Format 2 renamed the keys a cached option holds (select, module_type): an older version's entry is
    measured anew, never read."""
    model = Stack()
    calls = []
    real = budget_damage.measure_damage
    monkeypatch.setattr(budget_damage, "measure_damage", lambda *a, **k: calls.append(1) or real(*a, **k))
    version = budget_damage.CACHE_VERSION
    monkeypatch.setattr(budget_damage, "CACHE_VERSION", version - 1)
    plan_for(model, 1.2)
    monkeypatch.setattr(budget_damage, "CACHE_VERSION", version)
    assert not plan_for(model, 1.2).budget["cached"] and calls == [1, 1]
    assert len(list(cache.glob("budget/*.json"))) == 2


def test_override_with_keep_wins_over_the_budget():
    from midl_convert import LayerOverride

    plan = plan_for(Stack(), 1.2, overrides=[LayerOverride(match="blocks.1", keep=0.75, rank=3)])
    pinned = next(lp for lp in plan.layers if lp.path == "blocks.1")
    assert (pinned.convert, pinned.keep, pinned.rank) == (True, 0.75, 3)


def test_budget_needs_batches():
    with pytest.raises(MIDLError, match="needs example_inputs and a few calibration batches"):
        plan_conversion(Stack(), MIDLConfig(flops_ratio=1.5), (torch.randn(1, 32),))


def random_measurements(rng: random.Random, layers: int, axis: str = "flops") -> Measurements:
    """Random options on the FLOPs axis, or on seconds (each option a share of its layer's dense time)."""
    costs = {}
    for i in range(layers):
        dense = rng.randint(50, 200)
        options = [Option(0.5, 4, rng.randint(5, dense - 1), rng.random(), seconds=rng.uniform(0.3, 0.95) * dense * 1e-6)
                   for _ in range(rng.randint(0, 3))]
        costs[f"l{i}"] = LayerCost(f"l{i}", dense, options, dense_seconds=dense * 1e-6)
    total = sum(c.dense_flops for c in costs.values()) + 100
    return Measurements(total, costs, 0, 0.0, "k", axis=axis, dense_time=total * 1e-6)


@pytest.mark.parametrize("axis", ["flops", "time"])
@pytest.mark.parametrize("seed", range(20))
def test_allocation_is_close_to_the_brute_force_optimum(seed, axis):
    rng = random.Random(seed)
    m = random_measurements(rng, 5, axis)
    target = 1 + rng.random() * (budget.max_ratio(m) - 1)
    choice = allocate(m, target)
    assert predicted_ratio(m, choice) >= target - 1e-9
    damage = sum(o.damage for o in choice.values() if o)
    best = min(
        sum(o.damage for o in combo if o)
        for combo in itertools.product(*[[None, *c.options] for c in m.layers.values()])
        if predicted_ratio(m, dict(zip(m.layers, combo))) >= target - 1e-9
    )
    # Lagrangian + give-back is exact on the convex hull; off it, within the largest single option's damage
    assert damage <= best + max((o.damage for c in m.layers.values() for o in c.options), default=0) + 1e-9


def test_cli_dry_run_prints_the_budget(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from midl_convert import models
    from midl_convert.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.hub_reachable.cache_clear()
    res = CliRunner().invoke(app, ["convert", "test_vit", "--random-init", "--flops-ratio", "1.1", "--dry-run",
                                   "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert "damage" in res.output and "layer budget: target 1.1x, predicted" in res.output
    res = CliRunner().invoke(app, ["convert", "test_vit", "--random-init", "--flops-ratio", "50", "--dry-run",
                                   "--batch-size", "2"])
    assert res.exit_code == 2 and "cannot be reached" in res.output
    res = CliRunner().invoke(app, ["convert", "test_vit", "--random-init", "--flops-ratio", "0.5", "--dry-run"])
    assert res.exit_code == 2 and "--flops-ratio" in res.output


def test_image_models_are_judged_on_two_batches_unless_set():
    """Eight images judge an option noisily, a batch of sentences is many token rows: unset, the budget
    judges damage on two batches of images and one of anything else; a setting always wins."""
    from midl_convert.pipeline import budget_data

    images, tokens = Batch((torch.randn(8, 3, 16, 16),)), Batch({"input_ids": torch.ones(8, 12, dtype=torch.long)})
    assert budget.damage_batches(MIDLConfig(flops_ratio=1.5), [images]) == 2
    assert budget.damage_batches(MIDLConfig(flops_ratio=1.5), [tokens]) == 1
    assert budget.damage_batches(MIDLConfig(flops_ratio=1.5), [Batch((torch.randn(8, 16),))]) == 1
    assert budget.damage_batches(MIDLConfig(flops_ratio=1.5, budget_batches=3), [images]) == 3

    class Stream:
        def __init__(self, make):
            self.make, self.offsets = make, []

        def train_batch(self, offset, size):
            self.offsets.append(offset)
            return self.make(size)

    for make, judged in ((lambda n: Batch((torch.randn(n, 3, 8, 8),)), 2), (lambda n: Batch((torch.randn(n, 5),)), 1)):
        stream = Stream(make)
        got = budget_data(stream, MIDLConfig(flops_ratio=1.5, budget_fit_batches=3))
        assert len(got) == judged + 3 and len(set(stream.offsets)) == judged + 3  # each a different batch


@pytest.mark.slow
def test_two_processes_share_the_damage_pass_and_agree_with_one(tmp_path):
    """Under torchrun each process judges half the layers; the gathered measurements, the cache and
    the plan are those of a single process."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "budget_worker.py"
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    subprocess.run([sys.executable, str(script), str(single), str(tmp_path / "c1")], check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    str(script), str(double), str(tmp_path / "c2")], check=True, timeout=300)
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    assert a["world"] == 1 and b["world"] == 2
    assert a["judged_here"] == [5] and b["judged_here"] == [3]  # rank 0 judged blocks 0, 2, 4; rank 1 the others
    assert a["plan"] == b["plan"] and any(row[-1] for row in a["plan"])
    assert len(a["damage"]) == len(b["damage"]) == 1 and a["damage"][0].keys() == b["damage"][0].keys()
    for path, values in a["damage"][0].items():
        assert b["damage"][0][path] == pytest.approx(values, rel=1e-5, abs=1e-9), path


def test_a_single_process_judges_every_layer_itself(monkeypatch):
    from midl_convert import processes

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert processes.rank_and_size() == (0, 1)
    assert processes.my_share(["a", "b", "c"]) == ["a", "b", "c"]
    assert processes.gather({"b": 2, "a": 1}, ["a", "b", "z"]) == {"a": 1, "b": 2}
    monkeypatch.setattr(processes, "rank_and_size", lambda: (1, 2))
    assert processes.my_share(["a", "b", "c", "d", "e"]) == ["b", "d"]


def test_a_named_rank_is_the_only_rank_the_budget_tries():
    """``--rank 0 --flops-ratio 1.5`` once chose ranks 12 and 36: a rank the user names replaces both
    sides' rank grids; left unnamed, the grids stay."""
    from midl_convert.cli import build_recipe
    from midl_convert.surgery import LayerPlan

    lp = LayerPlan("fc", "linear", 384, 1536, 0, True, keep=0.5, rank=32, granularity="token", select="auto")
    ranks = lambda config: {(select, r) for select, _, r in budget.grid(lp, config)}  # noqa: E731
    assert ranks(MIDLConfig(flops_ratio=1.5)) == {("output", 12), ("output", 24), ("output", 48), ("input", 0),
                                                  ("input", 24)}
    assert ranks(MIDLConfig(flops_ratio=1.5, rank=0)) == {("output", 0), ("input", 0)}
    for options, fixed in (({"rank": 0, "flops_ratio": 1.5}, 0), ({"flops_ratio": 1.5}, None)):
        config = build_recipe("some-model", None, options, no_distill=True).midl_config()
        assert config.fixed_rank == fixed
    plan = plan_for(Stack(), 1.3, rank=0)
    assert plan.converted and {lp.rank for lp in plan.converted} == {0}
    with pytest.raises(MIDLError, match="at the rank you named"):
        plan_for(Stack(), 9.0, rank=0)
