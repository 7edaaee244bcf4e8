"""Centred input-side selection: the centre folds into the bias exactly, keep 1 and merging give the
original back, every path and the FLOPs count agree, the centre is saved, and calibration picks the
centre that leaves the lower error."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import midl_convert as mc
from midl_convert import kernels
from midl_convert.budget import option_flops
from midl_convert.kinds.input.fit import fit_centre
from midl_convert.kinds.input.flops import input_flops_parts
from midl_convert.kinds.input.layer import InputMIDLConv2d, InputMIDLinear

# (name, layer from a dense module, dense module, input): each target shape and granularity.
CASES = [
    ("linear-token", lambda m: InputMIDLinear.from_linear(m, keep=0.4, rank=4), lambda: nn.Linear(24, 32), (3, 5, 24)),
    ("linear-sequence", lambda m: InputMIDLinear.from_linear(m, keep=0.4, rank=4, granularity="sequence"),
     lambda: nn.Linear(24, 32), (3, 5, 24)),
    ("linear-nobias", lambda m: InputMIDLinear.from_linear(m, keep=0.4, rank=0), lambda: nn.Linear(24, 32, bias=False),
     (4, 24)),
    ("conv-pixel", lambda m: InputMIDLConv2d.from_conv(m, keep=0.4, rank=4), lambda: nn.Conv2d(24, 32, 1), (2, 24, 3, 3)),
]
IDS = [c[0] for c in CASES]


def _centred(row, keep=None):
    _, build, dense, shape = row
    torch.manual_seed(0)
    d = dense().eval()
    layer = build(copy.deepcopy(d)).eval()
    if keep is not None:
        layer.keep = keep
    layer.centring = "mean"
    with torch.no_grad():
        layer.centre.copy_(torch.randn(24) * 2)
    return d, layer, torch.randn(*shape) + 1.5


def _uncentred_formula(layer, x):
    """The uncentred layer's own definition on ``x - mu``, plus ``W mu``: what centring means."""
    plain = copy.deepcopy(layer)
    plain.centring = "none"
    groups = layer.groups_of(x) - layer.centre
    y = plain.rows_reference(groups) + F.linear(layer.centre, layer.weight)
    return y, plain


@pytest.mark.parametrize("row", CASES, ids=IDS)
def test_keep_one_is_the_original_exactly(row):
    dense, layer, x = _centred(row, keep=1.0)
    assert torch.equal(layer(x), dense(x))


@pytest.mark.parametrize("row", CASES, ids=IDS)
def test_merge_gives_the_original_module_and_bias(row):
    dense, layer, x = _centred(row)
    merged = layer.merge_and_unload()
    assert type(merged) is type(dense) and torch.equal(merged(x), dense(x))
    if dense.bias is not None:
        assert torch.equal(merged.bias, dense.bias)  # b, not b + W mu


@pytest.mark.parametrize("row", CASES, ids=IDS)
def test_centre_folded_into_the_bias_is_the_formula_on_x_minus_mu(row):
    dense, layer, x = _centred(row)
    ref, _ = _uncentred_formula(layer, x)
    with torch.no_grad():
        assert torch.allclose(layer.rows_reference(layer.groups_of(x)), ref, atol=1e-5)
        y = layer(x)  # eval's own path: sparse gathers, or the op
    expected = ref.reshape(*y.shape[:-1], -1) if row[0] != "conv-pixel" else None
    if expected is None:
        expected = ref.reshape(y.shape[0], y.shape[2], y.shape[3], -1).permute(0, 3, 1, 2)
    assert torch.allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 12])
@pytest.mark.parametrize("adaptive", [False, True])
def test_rows_through_the_op_and_the_decode_step_take_the_centre(rows, adaptive):
    """midl::input_rows (kernel for a few rows, masked GEMM for many) and the one-row decode step."""
    torch.manual_seed(1)
    layer = InputMIDLinear.from_linear(nn.Linear(64, 48), keep=0.4, rank=4).eval()
    layer.centring = "median"
    with torch.no_grad():
        layer.centre.copy_(torch.randn(64))
    x = torch.randn(rows, 64) + 2.0
    if adaptive:
        layer.threshold = float(layer.mask_scores(x[:, None, :]).detach().median())
    ref, _ = _uncentred_formula(layer, x)
    with torch.inference_mode():
        assert torch.allclose(layer(x), ref[:, 0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(layer(x[:1]), ref[:1, 0], rtol=1e-5, atol=1e-5)  # the decode step, argument memo filled
        layer.centre.add_(0.5)  # in place: the folded bias and the op's centre must follow
        ref, _ = _uncentred_formula(layer, x)
        assert torch.allclose(layer(x[:1]), ref[:1, 0], rtol=1e-5, atol=1e-5)


def test_op_reference_takes_the_centre():
    torch.manual_seed(2)
    x, wt, b = torch.randn(3, 16), torch.randn(16, 8), torch.randn(8)
    v, u, scale, mu = torch.randn(2, 16), torch.randn(8, 2), torch.rand(16), torch.randn(16)
    expected = kernels.input_rows_reference(x - mu, wt, b, v, u, scale, 5, float("nan"))
    assert torch.allclose(kernels.input_rows_reference(x, wt, b, v, u, scale, 5, float("nan"), centre=mu), expected)
    assert torch.allclose(torch.ops.midl.input_rows(x, wt, b, v, u, scale, 5, float("nan"), centre=mu), expected, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 12])
def test_flops_count_the_subtraction_and_the_op_counter_agrees(rows):
    layer = InputMIDLinear.from_linear(nn.Linear(64, 48), keep=0.5, rank=4).eval()
    plain = layer.flops_parts(rows=rows, groups=rows)
    layer.centring = "auto"
    parts = layer.flops_parts(rows=rows, groups=rows)
    assert parts == {**plain, "centre": 64 * rows}
    assert parts == input_flops_parts(64, 48, 4, rows, rows, layer.k, centred=True)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        layer(x)  # the first call folds W mu into the bias (one dense row, once): not a per-call cost
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            layer(x)
    if rows <= kernels.KERNEL_MAX_ROWS and kernels.fused_kernel() is not None:
        assert counter.get_total_flops() == sum(parts.values())  # the kernel ran: exactly the formula
    else:  # the masked GEMM ran: every input counts, the subtraction too
        assert counter.get_total_flops() == sum(input_flops_parts(64, 48, 4, rows, rows, 64, centred=True).values())


def test_budget_options_pay_for_the_centre():
    from midl_convert.surgery import LayerPlan

    lp = LayerPlan("fc", "linear", 64, 48, 0, True, keep=0.5, rank=0, granularity="token", select="input")
    module = nn.Linear(64, 48)
    _, plain = option_flops(module, lp, [(10, 64)])
    _, centred = option_flops(module, LayerPlan(**{**lp.__dict__, "centre": "auto"}), [(10, 64)])
    assert centred - plain == 64 * 10


def test_save_and_load_round_trip_the_centre(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(3, 16)
    converted, plan = mc.convert(copy.deepcopy(model), mc.MIDLConfig(keep=0.5, rank=0, select="input", skip_head=False,
                                                                     centre="median"), (x,))
    assert {lp.centre for lp in plan.converted} == {"median"}
    mc.calibrate(converted, [mc.Batch((torch.randn(64, 16) + 3.0,))])
    assert converted[0].centre.abs().sum() > 0
    mc.save(converted, tmp_path / "out")
    loaded = mc.load(tmp_path / "out", copy.deepcopy(model))
    assert loaded[0].centring == "median" and torch.equal(loaded[0].centre, converted[0].centre)
    assert torch.equal(loaded(x), converted.eval()(x))


def test_a_state_dict_saved_before_centring_loads_uncentred():
    layer = InputMIDLinear.from_linear(nn.Linear(16, 8), keep=0.5, rank=0)
    state = {k: v for k, v in layer.state_dict().items() if k != "centre"}
    fresh = InputMIDLinear(16, 8, keep=0.5, rank=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.centre, torch.zeros(16))


def _skewed(kind: str, n: int = 2048, width: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(4)
    noise = 0.05 * torch.randn(n, width, generator=gen)
    if kind == "outliers":  # each input sits near its mode, with rare huge excursions: they drag the mean
        spikes = (torch.rand(n, width, generator=gen) < 0.03) * 60.0
        return 1.0 + noise + spikes
    # two modes, 0 (51%) and 2 (49%): the median sits on one of them, the mean between (|x - mean| ~ 1 everywhere)
    return 2.0 * (torch.rand(n, width, generator=gen) < 0.49) + noise


@pytest.mark.parametrize("data,winner", [("outliers", "median"), ("bimodal", "mean")])
def test_auto_centre_picks_the_centre_with_the_lower_output_error(data, winner):
    torch.manual_seed(5)
    x = _skewed(data)
    errors, original = {}, nn.Linear(32, 24)
    for centring in ("none", "mean", "median", "auto"):
        layer = InputMIDLinear.from_linear(copy.deepcopy(original), keep=0.125, rank=0).eval()
        layer.centring = centring
        model = nn.Sequential(layer)
        (cal,) = mc.calibrate(model, [mc.Batch((x,))])
        dense = layer.merge_and_unload()
        with torch.no_grad():
            errors[centring] = (model(x) - dense(x)).pow(2).mean().item()
        if centring == "auto":
            assert f"{winner} centre" in cal.gate
    loser = "mean" if winner == "median" else "median"
    assert errors[winner] < 0.8 * errors[loser] and errors["auto"] == errors[winner], errors
    assert errors[winner] < errors["none"], errors


def test_auto_centre_keeps_no_centre_where_a_centre_only_fits_its_own_rows():
    """The rows a centre is fitted on (every other one) sit 3 away from the rows it is judged on, which
    are zero-centred: the centre lowers only the error of the rows it came from. "auto" judges on the
    other rows, takes no centre, and the layer stops paying for one. (Plain noise on few rows made
    this a coin toss: 2 of 20 weight seeds took a centre.)"""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 64, generator=gen)
    x[0::2] += 3.0
    layer = InputMIDLinear.from_linear(nn.Linear(64, 16), keep=0.25, rank=0).eval()
    layer.centring = "auto"
    before = layer.flops_parts(1, 1)
    (cal,) = mc.calibrate(nn.Sequential(layer), [mc.Batch((x[:, 0],))])
    assert cal.gate.endswith("no centre") and layer.centring == "none" and not layer.centred
    assert torch.equal(layer.centre, torch.zeros(64)) and "centre" in before and "centre" not in layer.flops_parts(1, 1)
    for centring in ("mean", "median"):  # each named centre is taken as named, on every row
        layer.centring = centring
        assert fit_centre(layer, x) == centring and layer.centred


def test_fit_centre_sets_the_mean_or_the_median():
    layer = InputMIDLinear.from_linear(nn.Linear(4, 3), keep=0.5, rank=0)
    x = torch.tensor([[0.0, 1, 2, 3], [1, 1, 2, 3], [11, 1, 2, 30]])[:, None, :]
    for centring, expected in (("mean", x[:, 0].mean(0)), ("median", x[:, 0].median(0).values)):
        layer.centring = centring
        assert fit_centre(layer, x) == centring and torch.equal(layer.centre, expected)


def test_config_checks_the_centring():
    assert mc.MIDLConfig().centre == "auto"
    with pytest.raises(ValueError, match="centre"):
        mc.MIDLConfig(centre="mode")
    with pytest.raises(ValueError, match="centring must be one of"):
        InputMIDLinear(4, 3).centring = "mode"



def test_runs_leave_adaptive_decoders_uncentred_unless_told():
    """The pipeline's default for adaptive masks on a causal LM is no centre (its measured cost on
    SmolLM2); a centre the run names, fixed-k masks and other tasks keep theirs."""
    from midl_convert.pipeline import decoder_centring
    from midl_convert.recipe import Recipe

    adaptive = Recipe.model_validate({"model": {"spec": "m"}, "midl": {"adaptive": True, "keep": 0.7}}).midl_config()
    assert adaptive.centre == "auto" and decoder_centring(adaptive, "causal-lm").centre == "none"
    assert decoder_centring(adaptive, "embedding").centre == "auto"
    named = mc.MIDLConfig(adaptive=True, centre="median")
    assert decoder_centring(named, "causal-lm").centre == "median"
    assert decoder_centring(mc.MIDLConfig(adaptive=True, centre="auto"), "causal-lm").centre == "auto"
    assert decoder_centring(mc.MIDLConfig(keep=0.7), "causal-lm").centre == "auto"
