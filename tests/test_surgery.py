"""The plan and the swap: matching rules, overrides, heads, shared modules, round trip."""
import copy

import pytest
import timm
import torch
from torch import nn

import midl_convert as mc
from midl_convert.kinds.output.layer import OutputMIDLConv2d, OutputMIDLinear
from midl_convert.matching import overrides_for
from test_graph import Block, inputs


def plan_of(config: mc.MIDLConfig) -> dict[str, mc.LayerPlan]:
    plan, _ = mc.plan_conversion(Block(), config, inputs())
    return {lp.path: lp for lp in plan.layers}


PLAN_CASES = [
    # (name, config, converted paths)
    ("default_skips_head", mc.MIDLConfig(), {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "shared", "pw"}),
    ("head_included_explicitly", mc.MIDLConfig(include=["head", "mlp.fc1"]), {"head", "mlp.fc1"}),
    ("no_skip_head", mc.MIDLConfig(skip_head=False, exclude=["pw"]),
     {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "shared", "head"}),
    ("suffix", mc.MIDLConfig(include=["fc1", "fc2"]), {"mlp.fc1", "mlp.fc2"}),
    ("regex", mc.MIDLConfig(include=[r"attn\..*"]), {"attn.qkv", "attn.proj"}),
    ("all_linear", mc.MIDLConfig(include="all-linear"), {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "shared"}),
    ("exclude", mc.MIDLConfig(exclude=["attn.qkv", r"mlp\..*"]), {"attn.proj", "shared", "pw"}),
    ("min_size", mc.MIDLConfig(min_size=16 * 48), {"attn.qkv", "mlp.fc1", "mlp.fc2"}),
]


@pytest.mark.parametrize("name,config,expected", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_selects_targets(name, config, expected):
    plan = plan_of(config)
    assert {p for p, lp in plan.items() if lp.convert} == expected
    assert all(lp.reason for lp in plan.values() if not lp.convert)


def test_overrides_rank_fraction_and_granularity():
    with pytest.warns(UserWarning, match=r"rank lowered on 3 layers .*pw: 4 -> 0\)"):
        plan = plan_of(mc.MIDLConfig(
            keep=0.5, rank=0.25, granularity="sequence",
            overrides=[mc.LayerOverride(match="mlp.fc2", keep=0.75, rank=3), mc.LayerOverride(match="pw", rank=100)],
        ))
    assert (plan["mlp.fc2"].keep, plan["mlp.fc2"].rank) == (0.75, 3)
    assert (plan["mlp.fc1"].keep, plan["mlp.fc1"].rank) == (0.5, 4)  # 0.25 * min(16, 64)
    assert plan["pw"].rank == 0  # clipped to min(in, out) = 4, where the light path costs more than the 4x16 conv
    assert plan["mlp.fc1"].granularity == "sequence" and plan["pw"].granularity == "sample"
    assert plan["head"].reason.startswith("classifier")


OVERRIDES = [mc.LayerOverride(match="fc", keep=0.5), mc.LayerOverride(match=r"blocks\.[01]\.fc", rank=2),
             mc.LayerOverride(match="other", keep=0.9)]


@pytest.mark.parametrize("names,expected", [
    (["blocks.1.fc"], [0, 1]),  # dotted suffix and regex
    (["blocks.2.fc"], [0]),
    (["x.other", "blocks.0.fc"], [0, 1, 2]),  # an alias counts; the order is the overrides', so later ones win
    (["head"], []),
])
def test_overrides_for_a_layer_the_plan_and_the_budget_share(names, expected):
    """One rule picks the overrides that touch a layer: the plan's settings and the budget's pins both read it."""
    assert overrides_for(OVERRIDES, names) == [OVERRIDES[i] for i in expected]


def test_a_rank_that_costs_more_than_dense_is_lowered_with_a_warning():
    from midl_convert.flops import dense_flops
    from midl_convert.kinds.output.flops import midl_flops_parts

    with pytest.warns(UserWarning, match=r"rank lowered on .* so each still costs fewer FLOPs than dense"):
        plan, _ = mc.plan_conversion(Block(), mc.MIDLConfig(rank=10000), inputs())
    for lp in plan.converted:
        k = round(lp.keep * lp.out_features)
        assert 0 <= lp.rank < min(lp.in_features, lp.out_features)
        assert sum(midl_flops_parts(lp.in_features, lp.out_features, lp.rank, 1, 1, k).values()) < \
            dense_flops(lp.in_features, lp.out_features, 1) or lp.rank == 0
        over = sum(midl_flops_parts(lp.in_features, lp.out_features, lp.rank + 1, 1, 1, k).values())
        assert over >= dense_flops(lp.in_features, lp.out_features, 1)  # the largest rank that still saves


@pytest.mark.parametrize("config,message", [
    (mc.MIDLConfig(include=["mlp.fc3"]), r"include pattern 'mlp.fc3' matches no Linear or 1x1 conv; closest module names: mlp.fc"),
    (mc.MIDLConfig(exclude=["atn"]), r"exclude pattern 'atn' matches no"),
    (mc.MIDLConfig(overrides=[mc.LayerOverride(match="nope", keep=0.3)]), r"override pattern 'nope' matches no"),
    (mc.MIDLConfig(include=["head"], exclude=["head"]), r"no layer selected for conversion"),
])
def test_bad_plans_raise_midl_error(config, message):
    with pytest.raises(mc.MIDLError, match=message):
        mc.plan_conversion(Block(), config, inputs())


@pytest.mark.parametrize("kwargs,message", [
    ({"keep": 0}, r"keep must be in \(0, 1\]"),
    ({"keep": 1.5}, r"keep must be in \(0, 1\]"),
    ({"rank": -2}, r"rank must be an int >= 0"),
    ({"rank": 1.5}, r"a fractional rank must be in \(0, 1\)"),
    ({"rank": 1.0}, r"rank 1.0 would be a share .* write the int 1 for rank one"),  # 1 and 1.0 must not differ silently
    ({"budget_ranks": [0, 1.0]}, r"rank 1.0 would be a share"),
    ({"granularity": "row"}, r"granularity"),
    ({"kep": 0.5}, r"kep"),
])
def test_bad_config_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mc.MIDLConfig(**kwargs)


@pytest.mark.parametrize("kwargs,select", [
    ({}, "output"),
    ({"keep": 0.7}, "output"),
    ({"flops_ratio": 1.3}, "auto"),
    ({"speedup": 1.2}, "auto"),
    ({"select": None, "flops_ratio": 1.3}, "auto"),
    ({"select": "input"}, "input"),
    ({"select": "output", "flops_ratio": 1.3}, "output"),
])
def test_select_is_filled_so_each_mode_is_stated(kwargs, select):
    config = mc.MIDLConfig(**kwargs)
    assert config.select == select and config.model_dump()["select"] == select
    assert ("select" in config.model_fields_set) == (kwargs.get("select") is not None)  # filled, not set by the user


def test_auto_without_a_budget_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"select='auto' .* needs flops_ratio or speedup"):
        mc.MIDLConfig(select="auto")


def test_dry_run_leaves_model_untouched():
    model = Block()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mc.plan_conversion(model, mc.MIDLConfig(), inputs())
    assert not mc.midl_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_convert_in_place_keeps_class_and_outputs_at_keep_one():
    torch.manual_seed(0)
    model = timm.create_model("resnet26", pretrained=False, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    converted, plan = mc.convert(model, mc.MIDLConfig(keep=1.0), x)
    assert converted is model and type(model).__name__ == "ResNet"
    assert plan.trace == "export"
    assert isinstance(model.layer1[0].conv1, OutputMIDLConv2d)
    assert not isinstance(model.fc, OutputMIDLinear)  # head kept
    assert len(mc.midl_layers(model)) == len(plan.converted) > 10
    torch.testing.assert_close(model(x), ref)


def test_shared_module_converted_once_at_every_path():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(8, 2))
    x = torch.randn(3, 8)
    _, plan = mc.convert(model, mc.MIDLConfig(keep=0.5, rank=2), x)
    assert [lp.path for lp in plan.converted] == ["0", "3"] and plan.converted[0].aliases == ["2"]
    assert isinstance(model[0], OutputMIDLinear) and model[0] is model[2]
    assert torch.isfinite(model(x)).all()


def test_merge_and_unload_restores_the_original():
    torch.manual_seed(1)
    model = Block().eval()
    x = inputs()
    ref = model(*x)
    original = copy.deepcopy(model)
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=2), x)
    assert not torch.allclose(model(*x), ref)
    mc.merge_and_unload(model)
    assert not mc.midl_layers(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert torch.equal(model(*x), ref)


def test_no_targets_is_an_error():
    with pytest.raises(mc.MIDLError, match=r"no nn.Linear, HF Conv1D or 1x1 nn.Conv2d"):
        mc.convert(nn.Sequential(nn.Conv2d(3, 3, 3)), mc.MIDLConfig(), torch.randn(1, 3, 8, 8))


def test_hf_model_keeps_save_pretrained(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = BertModel(cfg).eval()
    ids = {"input_ids": torch.randint(0, 50, (1, 6))}
    ref = model(**ids).last_hidden_state
    mc.convert(model, mc.MIDLConfig(keep=1.0, rank=4), ids)
    assert type(model) is BertModel
    torch.testing.assert_close(model(**ids).last_hidden_state, ref)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()


def test_a_plan_saved_before_the_tracer_was_called_trace_still_loads():
    plan, _ = mc.plan_conversion(Block(), mc.MIDLConfig(keep=0.5), inputs())
    saved = plan.to_dict()
    assert saved["trace"] == plan.trace and "method" not in saved
    old = {("method" if k == "trace" else k): v for k, v in saved.items()}
    assert mc.Plan.from_dict(old) == plan
