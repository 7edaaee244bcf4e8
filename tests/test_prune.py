"""The static-pruning kind (``kinds/prune``): its maths against a hand-written reference, and that a kind
added as one folder reaches conversion, the budget, saving and the report through the registry alone."""
import copy

import pytest
import torch
from torch import nn

import midl_convert as mc
from midl_convert import budget
from midl_convert.surgery import LayerPlan


def test_calibration_keeps_the_wanda_columns_and_moves_the_rest_into_the_bias():
    torch.manual_seed(0)
    dense = nn.Linear(12, 5)
    x = torch.randn(300, 12) * torch.linspace(0.1, 3.0, 12) + torch.linspace(-1.0, 1.0, 12)
    model = nn.Sequential(mc.PruneLinear.from_linear(dense, keep=0.5)).eval()
    (cal,) = mc.calibrate(model, [mc.Batch((x,))])
    w = dense.weight.detach()
    score = x.abs().mean(0) * w.norm(dim=0)
    keep = score.topk(6).indices.sort().values
    rest = torch.tensor([j for j in range(12) if j not in keep.tolist()])
    assert torch.equal(model[0].kept(), keep)
    expected = x[:, keep] @ w[:, keep].T + dense.bias.detach() + w[:, rest] @ x[:, rest].mean(0)
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert cal.error_after < cal.error_before  # the mean offset and the data's columns beat column norms alone


def test_prune_refuses_a_light_path_and_adaptive_masks():
    with pytest.raises(ValueError, match="rank must be 0"):
        mc.PruneLinear(8, 4, keep=0.5, rank=2)
    lp = LayerPlan("fc", "linear", 8, 4, 0, True, keep=0.5, rank=0, granularity="token", select="prune", adaptive=True)
    with pytest.raises(ValueError, match="adaptive masks do not apply"):
        mc.build_layer(nn.Linear(8, 4), lp)


def test_select_prune_converts_saves_and_reports(tmp_path):
    """Conversion with the config's default rank (32) gives rank 0: the kind has no light path."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(4, 16)
    converted, plan = mc.convert(copy.deepcopy(model), mc.MIDLConfig(keep=0.5, select="prune", skip_head=False), (x,))
    assert [(lp.select, lp.rank) for lp in plan.converted] == [("prune", 0), ("prune", 0)]
    assert all(isinstance(converted[i], mc.PruneLinear) for i in (0, 2))
    mc.calibrate(converted, [mc.Batch((torch.randn(64, 16),))])
    mc.save(converted, tmp_path / "out")
    loaded = mc.load(tmp_path / "out", copy.deepcopy(model))
    assert isinstance(loaded[0], mc.PruneLinear) and torch.equal(loaded(x), converted.eval()(x))
    report = mc.report(converted, model, [mc.Batch((x,))], "base", example_inputs=(x,), repeats=2, progress=False)
    assert {lr.select for lr in report.layers} == {"prune"}
    report.save(tmp_path / "report")  # a kind registered by its folder passes the report's schema too
    assert {lr.select for lr in mc.Report.load(tmp_path / "report").layers} == {"prune"}
    assert report.flops["converted_ratio"] == pytest.approx(2.0, rel=0.01)


def test_the_budget_tries_a_named_kind_on_its_own_grid_and_leaves_it_out_of_auto():
    lp = LayerPlan("fc", "linear", 384, 1536, 0, True, keep=0.5, rank=0, granularity="token", select="prune")
    config = mc.MIDLConfig(flops_ratio=1.5, select="prune")
    assert {(s, r) for s, _, r in budget.grid(lp, config)} == {("prune", 0)}
    assert sorted(k for _, k, _ in budget.grid(lp, config)) == sorted(config.budget_input_keeps)
    assert {(s, r) for s, _, r in budget.grid(lp, mc.MIDLConfig(flops_ratio=1.5, select="prune", rank=8))} == {("prune", 0)}
    auto = LayerPlan("fc", "linear", 384, 1536, 0, True, keep=0.5, rank=32, granularity="token", select="auto")
    assert "prune" not in {s for s, _, _ in budget.grid(auto, mc.MIDLConfig(flops_ratio=1.5))}


@pytest.mark.parametrize("weights", ["share", "random", "empty"])
def test_build_layer_fills_tensors_as_asked(weights):
    dense = nn.Linear(16, 8)
    lp = LayerPlan("fc", "linear", 16, 8, 0, True, keep=0.5, rank=2, granularity="token", select="input")
    layer = mc.build_layer(dense, lp, weights)
    if weights == "share":  # the dense module's own storage, frozen
        assert layer.weight.data_ptr() == dense.weight.data_ptr() and not layer.weight.requires_grad
    elif weights == "random":
        assert layer.light_up.abs().sum() > 0 and not layer.training
    shell = mc.build_layer(dense, lp, "empty", device="meta")
    assert shell.weight.is_meta and shell.k == 8
    with pytest.raises(ValueError, match="weights must be one of"):
        mc.build_layer(dense, lp, "borrowed")
