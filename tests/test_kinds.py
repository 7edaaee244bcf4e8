"""Shared checks that every kind of sparse layer passes (as PEFT's testing_common runs on every method),
and the input side's maths against a hand-written reference."""
import copy

import pytest
import torch
from torch import nn

import midl_convert as mc
from midl_convert.kinds.input.layer import InputMIDLConv2d, InputMIDLinear
from midl_convert.kinds.output.layer import OutputMIDLinear
from midl_convert.sparse import SparseLayer

# Every registered kind on each target shape, from the registry: a newly registered kind is tested
# here without anyone adding it.
TARGETS = {"linear": (lambda: nn.Linear(24, 32), (3, 5, 24), "token"),
           "conv2d": (lambda: nn.Conv2d(24, 32, 1), (2, 24, 4, 4), "pixel")}
KINDS = [(kind, target) for kind in mc.kinds.all_kinds() for target in TARGETS]
IDS = [f"{kind.name}-{target}" for kind, target in KINDS]


def _make(row, keep=0.5, rank=4):
    kind, target = row
    dense_fn, shape, granularity = TARGETS[target]
    torch.manual_seed(0)
    d = dense_fn().eval()
    lp = mc.LayerPlan("layer", target, 24, 32, 0, True, keep=keep, rank=rank if kind.light_path else 0,
                      granularity=granularity, select=kind.name)
    return d, mc.build_layer(d, lp).eval(), torch.randn(*shape)


def test_the_registry_holds_the_built_in_kinds_and_refuses_a_second_name():
    assert {"output", "input", "prune"} <= set(mc.kind_names())
    with pytest.raises(ValueError, match="already registered"):
        mc.register_kind(mc.kind_for("input"))
    with pytest.raises(ValueError, match="no sparse-layer kind 'sideways'; registered: output, input"):
        mc.kind_for("sideways")


@pytest.mark.parametrize("row", KINDS, ids=IDS)
def test_keep_one_is_the_original_exactly(row):
    dense, layer, x = _make(row, keep=1.0)
    assert isinstance(layer, SparseLayer)
    assert torch.equal(layer(x), dense(x))


@pytest.mark.parametrize("row", KINDS, ids=IDS)
def test_merge_and_unload_gives_the_original_module(row):
    dense, layer, x = _make(row)
    merged = layer.merge_and_unload()
    assert type(merged) is type(dense) and torch.equal(merged(x), dense(x))


@pytest.mark.parametrize("row", KINDS, ids=IDS)
def test_state_dict_round_trip(row):
    dense, layer, x = _make(row)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fresh = copy.deepcopy(layer)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("row", KINDS, ids=IDS)
def test_flops_follow_the_formula_and_count_the_exact_share(row):
    dense, layer, x = _make(row)
    kind = row[0]
    parts = layer.flops_parts(rows=10, groups=10)
    assert parts == kind.flops_parts(layer.in_features, layer.out_features, layer.rank, 10, 10, layer.k)
    assert parts["exact"] == 2 * layer.k * (layer.in_features if kind.picks_outputs else layer.out_features) * 10
    assert layer.width == kind.width(layer.in_features, layer.out_features)
    layer.track_stats = True
    layer(x)
    assert layer.last_active_fraction == pytest.approx(layer.k / layer.width)


@pytest.mark.parametrize("row", KINDS, ids=IDS)
def test_dense_context_runs_the_original_and_restores(row):
    dense, layer, x = _make(row)
    model = nn.Sequential(layer)
    sparse_out = model(x)
    with mc.dense(model):
        assert torch.equal(model(x), dense(x))
    assert torch.equal(model(x), sparse_out) and not torch.equal(sparse_out, dense(x))


@pytest.mark.parametrize("row", KINDS, ids=IDS)
def test_training_gives_the_gate_a_gradient(row):
    _, layer, x = _make(row)
    layer.train()
    layer(x).pow(2).sum().backward()
    for name in layer.trainable_names("gates"):  # the gate (straight through), or what a static kind trains
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert layer.weight.grad is not None  # W's gradient flows too (frozen only by distill's choice)


def _input_side_by_hand(w, b, x, keep):
    """y = W[:, S] x_S + b with S the top-k of |x_j| * ||W_:,j||, one row at a time."""
    k = int(torch.tensor(keep * w.shape[1]).ceil())
    out = []
    for row in x.reshape(-1, w.shape[1]):
        sel = (row.abs() * w.norm(dim=0)).topk(k).indices
        out.append(w[:, sel] @ row[sel] + b)
    return torch.stack(out)


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_input_side_at_rank_zero_is_magnitude_times_column_norm_selection(granularity):
    torch.manual_seed(1)
    dense = nn.Linear(20, 12)
    layer = InputMIDLinear.from_linear(dense, keep=0.3, rank=0, granularity=granularity).eval()
    x = torch.randn(4, 6, 20)
    y = layer(x)
    if granularity == "token":
        ref = _input_side_by_hand(dense.weight.detach(), dense.bias.detach(), x, 0.3).reshape(4, 6, 12)
    else:  # one set per sample, chosen by the mean |x_j| over its tokens
        k = 6
        ref = []
        for s in x:
            sel = (s.abs().mean(0) * dense.weight.detach().norm(dim=0)).topk(k).indices
            ref.append(s[:, sel] @ dense.weight.detach()[:, sel].T + dense.bias.detach())
        ref = torch.stack(ref)
    assert torch.allclose(y, ref, atol=1e-5)


def test_input_side_light_path_takes_the_left_out_inputs():
    torch.manual_seed(2)
    dense = nn.Linear(16, 8, bias=False)
    layer = InputMIDLinear.from_linear(dense, keep=0.25, rank=8).eval()  # full rank: the light path is W itself
    x = torch.randn(5, 16)
    assert torch.allclose(layer(x), dense(x), atol=1e-4)
    assert torch.allclose(layer.column_norm, torch.zeros(16), atol=1e-3)  # nothing left for the exact path to add


def test_input_side_weight_columns_are_contiguous_and_survive_loading():
    layer = InputMIDLinear.from_linear(nn.Linear(16, 8), keep=0.5)
    assert layer.weight.shape == (8, 16) and layer.weight.T.is_contiguous()
    fresh = InputMIDLinear(16, 8, keep=0.5)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.weight.T.is_contiguous() and torch.equal(fresh.weight, layer.weight)


def test_input_side_conv_sample_matches_token_maths_on_pixels():
    torch.manual_seed(3)
    conv = nn.Conv2d(12, 10, 1)
    layer = InputMIDLConv2d.from_conv(conv, keep=0.5, rank=0, granularity="sample").eval()
    x = torch.randn(2, 12, 3, 3)
    y = layer(x)
    w = conv.weight.detach().reshape(10, 12)
    for i in range(2):
        sel = (x[i].abs().mean((1, 2)) * w.norm(dim=0)).topk(6).indices
        ref = torch.einsum("oc,chw->ohw", w[:, sel], x[i, sel]) + conv.bias.detach()[:, None, None]
        assert torch.allclose(y[i], ref, atol=1e-5)


def test_input_side_calibration_lowers_the_error_on_real_rows():
    """Correlated inputs: the light path fitted (whitened) on the left-out inputs beats plain SVD."""
    torch.manual_seed(4)
    mix = torch.randn(32, 32)
    x = torch.randn(512, 32) @ mix * torch.linspace(0.2, 2.0, 32)
    dense = nn.Linear(32, 24)
    model = nn.Sequential(InputMIDLinear.from_linear(dense, keep=0.4, rank=6)).eval()
    before = (model(x) - dense(x)).pow(2).mean().item()
    report = mc.calibrate(model, [mc.Batch((x,))])
    after = (model(x) - dense(x)).pow(2).mean().item()
    assert after < 0.8 * before and report[0].error_after < report[0].error_before


def test_input_side_adaptive_threshold_keeps_the_share_on_average():
    torch.manual_seed(5)
    dense = nn.Linear(40, 16)
    model = nn.Sequential(InputMIDLinear.from_linear(dense, keep=0.5, rank=0)).eval()
    model[0].adaptive = True
    x = torch.randn(400, 40) * torch.rand(400, 1) * 3  # rows of very different sizes
    mc.calibrate(model, [mc.Batch((x,))])
    assert model[0].threshold is not None
    model[0].track_stats = True
    model(x)
    assert model[0].last_active_fraction == pytest.approx(0.5, abs=0.03)
    counts = model[0].counts
    assert counts.min() < counts.max()  # the mask's size follows the input


def test_select_chooses_the_kind_and_overrides_pin_a_side():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    config = mc.MIDLConfig(keep=0.5, rank=0, select="input", skip_head=False,
                           overrides=[mc.LayerOverride(match="2", select="output")])
    converted, plan = mc.convert(copy.deepcopy(model), config, (torch.randn(1, 16),))
    assert isinstance(converted[0], InputMIDLinear) and isinstance(converted[2], OutputMIDLinear)
    assert [lp.select for lp in plan.converted] == ["input", "output"]
    with pytest.raises(ValueError, match="select='auto'.*flops_ratio"):
        mc.MIDLConfig(select="auto")


def test_input_side_saves_and_loads(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(3, 16)
    converted, _ = mc.convert(copy.deepcopy(model), mc.MIDLConfig(keep=0.5, rank=2, select="input", skip_head=False),
                              (x,))
    mc.calibrate(converted, [mc.Batch((torch.randn(64, 16),))])
    mc.save(converted, tmp_path / "out")
    loaded = mc.load(tmp_path / "out", copy.deepcopy(model))
    assert isinstance(loaded[0], InputMIDLinear) and torch.equal(loaded(x), converted.eval()(x))


@pytest.mark.parametrize("select", ["output", "input"])
def test_rank_zero_layers_calibrate(select):
    """Rank 0 (static rows on the output side, pure input sparsity on the input side) calibrates without error."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(16, 12))
    converted, _ = mc.convert(model, mc.MIDLConfig(keep=0.5, rank=0, select=select, skip_head=False), (torch.randn(1, 16),))
    (cal,) = mc.calibrate(converted, [mc.Batch((torch.randn(64, 16),))])
    assert cal.rows == 64 and cal.error_after <= cal.error_before + 1e-6


def test_input_side_weighted_calibration_counts_columns_by_their_reach():
    """Outputs the model scales by 100 decide which columns matter: weighted, the input side picks the
    columns that feed them and leaves less error at the model's output than unweighted."""
    torch.manual_seed(8)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8, bias=False)
            self.register_buffer("scale", torch.tensor([100.0, 100.0] + [0.01] * 6))

        def forward(self, x):
            return self.fc(x) * self.scale

    dense = Scaled()
    with torch.no_grad():
        dense.fc.weight[2:, :8] *= 50  # big columns 0..7 feed only the outputs that do not matter
    x = torch.randn(256, 16)
    errs = {}
    for output in (None, "hidden"):
        model = copy.deepcopy(dense)
        mc.convert(model, mc.MIDLConfig(keep=0.5, rank=0, select="input", skip_head=False), (x[:1],))
        mc.calibrate(model, [mc.Batch((x,))], output=output)
        errs[output] = (model(x) - dense(x)).pow(2).mean().item()
    assert errs["hidden"] < 0.2 * errs[None], errs  # 56 vs 435 when written


@pytest.mark.parametrize("rows", [1, 3, 12])
@pytest.mark.parametrize("adaptive", [False, True])
def test_input_side_eval_rows_through_the_op_equal_the_definition(rows, adaptive):
    """Eval with a mask per row goes through midl::input_rows (the fused kernel for a few rows, a masked
    GEMM for many): the same numbers as the layer's own definition."""
    torch.manual_seed(9)
    layer = InputMIDLinear.from_linear(nn.Linear(64, 48), keep=0.4, rank=4).eval()
    with torch.no_grad():
        layer.gate.mul_(torch.rand(64) + 0.5)
    x = torch.randn(rows, 64)
    if adaptive:
        layer.threshold = float(layer.mask_scores(x[:, None, :]).median())
    with torch.inference_mode():
        y = layer(x)
        ref = layer.rows_reference(x[:, None, :])[:, 0]
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode(), torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() > 0  # the op reports what it runs (its formula)


def test_input_side_decode_step_follows_every_change_to_the_layer():
    """One row in eval with gradients off (a decoding step) takes a short path with the op's arguments
    remembered; it must still see in-place edits, new settings, swapped tensors and dtype changes."""
    torch.manual_seed(3)
    layer = InputMIDLinear.from_linear(nn.Linear(64, 48), keep=0.5, rank=4).eval()
    x = torch.randn(1, 1, 64)
    calls, decode = [], layer._decode
    layer._decode = lambda rows: calls.append(1) or decode(rows)

    def step() -> torch.Tensor:
        with torch.no_grad():
            y = layer(x)
            ref = layer.rows_reference(x.reshape(1, 1, 64).to(layer.weight.dtype)).reshape(1, 1, 48)
        assert y.shape == (1, 1, 48) and torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
        return y

    outputs = [step()]
    with torch.no_grad():
        layer.gate.mul_(torch.rand(64) * 4)  # in place: the selection scale must follow
    outputs.append(step())
    layer.keep = 0.25
    outputs.append(step())
    layer.threshold = float(layer.mask_scores(x.reshape(1, 1, 64)).median())
    outputs.append(step())
    layer.weight.data = torch.randn(64, 48).T  # new storage under the same Parameter
    outputs.append(step())
    layer._parameters["light_up"] = nn.Parameter(torch.randn(48, 4))  # swapped as accelerate does
    outputs.append(step())
    assert len(calls) == len(outputs)
    assert all(not torch.allclose(a, b) for a, b in zip(outputs, outputs[1:]))
    layer.double()
    x = x.double()
    outputs.append(step())
    assert outputs[-1].dtype == torch.float64
    layer.track_stats = True  # statistics go through the general path, which counts them
    step()
    assert layer.last_active_fraction is not None and len(calls) == len(outputs)
