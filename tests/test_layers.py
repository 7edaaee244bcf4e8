"""The MID-L layer: exactness at keep 1, error bounds, gradients, paths, bad arguments."""
import copy

import pytest
import torch
from torch import nn

from midl_convert.kinds.output.layer import OutputMIDLBase, OutputMIDLConv2d, OutputMIDLinear


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


DENSE_CASES = [
    # (name, dense module, input shape)
    ("linear_2d", nn.Linear(24, 40), (3, 24)),
    ("linear_3d", nn.Linear(24, 40), (2, 7, 24)),
    ("linear_nobias", nn.Linear(24, 40, bias=False), (2, 7, 24)),
    ("linear_4d_channels_last", nn.Linear(16, 12), (2, 3, 3, 16)),
    ("conv", nn.Conv2d(16, 32, 1), (2, 16, 6, 6)),
    ("conv_nobias", nn.Conv2d(16, 32, 1, bias=False), (2, 16, 6, 6)),
    ("conv_stride2", nn.Conv2d(16, 32, 1, stride=2), (2, 16, 7, 7)),
    ("conv_pad1", nn.Conv2d(16, 8, 1, padding=1), (1, 16, 5, 5)),
]


def convert(dense: nn.Module, keep: float, rank: int, granularity: str | None = None) -> nn.Module:
    if isinstance(dense, nn.Conv2d):
        return OutputMIDLConv2d.from_conv(dense, keep=keep, rank=rank, granularity=granularity or "pixel")
    return OutputMIDLinear.from_linear(dense, keep=keep, rank=rank, granularity=granularity or "token")


@pytest.mark.parametrize("name,dense,shape", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
@pytest.mark.parametrize("training", [False, True])
def test_keep_one_reproduces_original(name, dense, shape, training):
    torch.manual_seed(0)
    x = torch.randn(shape)
    layer = convert(dense, keep=1.0, rank=4).train(training)
    assert rel_err(layer(x), dense(x)) <= 1e-5


def granularities(dense):
    return ("pixel", "sample") if isinstance(dense, nn.Conv2d) else ("token", "sequence")


@pytest.mark.parametrize("name,dense,shape", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_sparse_path_equals_reference(name, dense, shape):
    torch.manual_seed(1)
    x = torch.randn(shape)
    for g in granularities(dense):
        for rank in (0, 4):
            layer = convert(dense, keep=0.5, rank=rank, granularity=g).eval()
            layer.route = "reference"
            ref = layer(x)
            layer.route = "sparse"
            assert rel_err(layer(x), ref) <= 1e-5, (g, rank)
            layer.route = "auto"  # eval default is the sparse path
            assert rel_err(layer(x), ref) <= 1e-5


def structured_input(n: int, d: int) -> torch.Tensor:
    """Inputs on a low-dimensional subspace with heavy-tailed scales, like real activations."""
    basis = torch.randn(4, d)
    return (torch.randn(n, 4) @ basis) * torch.rand(n, 1).pow(3) * 5


@pytest.mark.parametrize("inputs", ["random", "structured"])
@pytest.mark.parametrize("rank", [0, 2, 8])
def test_error_no_worse_than_light_path_alone(inputs, rank):
    torch.manual_seed(2)
    dense = nn.Linear(32, 48)
    x = torch.randn(64, 32) if inputs == "random" else structured_input(64, 32)
    layer = OutputMIDLinear.from_linear(dense, keep=0.5, rank=rank).eval()
    target = dense(x)
    light_only = nn.functional.linear(x @ layer.light_down.T, layer.light_up, layer.bias)
    mixed = layer(x)
    err_mixed = (mixed - target).pow(2).sum(-1)
    err_light = (light_only - target).pow(2).sum(-1)
    assert torch.all(err_mixed <= err_light + 1e-5)
    assert err_mixed.sum() < err_light.sum()  # the exact half of the neurons does real work
    # exactly k neurons per row match the dense output
    exact = torch.isclose(mixed, target, atol=1e-5).sum(-1)
    assert torch.all(exact >= layer.k)


def test_rank_zero_unselected_neurons_output_bias():
    torch.manual_seed(3)
    dense = nn.Linear(10, 20)
    layer = OutputMIDLinear.from_linear(dense, keep=0.25, rank=0).eval()
    x = torch.randn(5, 10)
    y = layer(x)
    is_bias = torch.isclose(y, dense.bias.expand_as(y))
    is_dense = torch.isclose(y, dense(x), atol=1e-6)
    assert torch.all(is_bias | is_dense)
    assert torch.all(is_dense.sum(-1) >= layer.k)


@pytest.mark.parametrize("name,dense,shape", [DENSE_CASES[1], DENSE_CASES[4]], ids=["linear", "conv"])
def test_straight_through_gradients(name, dense, shape):
    torch.manual_seed(4)
    layer = convert(dense, keep=0.5, rank=4).train()
    x = torch.randn(shape)
    layer(x).pow(2).sum().backward()
    for pname in ("weight", "light_down", "light_up", "gate_weight", "gate_bias"):
        grad = getattr(layer, pname).grad
        assert grad is not None and grad.abs().sum() > 0, pname


@pytest.mark.parametrize("kwargs,message", [
    ({"keep": 0.0}, r"keep must be in \(0, 1\], got 0.0"),
    ({"keep": 1.5}, r"keep must be in \(0, 1\], got 1.5"),
    ({"keep": -0.1}, r"keep must be in \(0, 1\]"),
    ({"rank": -1}, r"rank must be an int in \[0, 24\]"),
    ({"rank": 25}, r"rank must be an int in \[0, 24\] \(min of in=24, out=40\), got 25"),
    ({"rank": 2.5}, r"rank must be an int"),
    ({"granularity": "pixel"}, r"granularity must be one of \('token', 'sequence'\)"),
])
def test_bad_arguments_raise(kwargs, message):
    args = {"keep": 0.5, "rank": 4, "granularity": "token"} | kwargs
    with pytest.raises(ValueError, match=message):
        OutputMIDLinear.from_linear(nn.Linear(24, 40), **args)


def test_bad_conv_arguments_raise():
    with pytest.raises(ValueError, match=r"needs a 1x1 conv with groups=1"):
        OutputMIDLConv2d.from_conv(nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"needs a 1x1 conv with groups=1"):
        OutputMIDLConv2d.from_conv(nn.Conv2d(8, 8, 1, groups=2))
    with pytest.raises(ValueError, match=r"granularity must be one of \('pixel', 'sample'\)"):
        OutputMIDLConv2d.from_conv(nn.Conv2d(8, 8, 1), rank=4, granularity="token")


def test_wrong_input_size_names_both_sizes():
    layer = OutputMIDLinear.from_linear(nn.Linear(24, 40), keep=0.5, rank=4)
    with pytest.raises(ValueError, match=r"expects 24 input features, got 25"):
        layer(torch.randn(2, 25))
    conv = OutputMIDLConv2d.from_conv(nn.Conv2d(8, 16, 1), keep=0.5, rank=4)
    with pytest.raises(ValueError, match=r"expects \(B, 8, H, W\) input, got shape \(2, 9, 4, 4\)"):
        conv(torch.randn(2, 9, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_and_grad_modes(dtype):
    torch.manual_seed(5)
    dense = nn.Linear(32, 64).to(dtype)
    layer = OutputMIDLinear.from_linear(dense, keep=0.5, rank=8).eval()
    assert layer.weight.dtype == dtype and layer.light_up.dtype == dtype
    x = torch.randn(3, 5, 32, dtype=dtype)
    y = layer(x)
    with torch.no_grad():
        y_ng = layer(x)
    with torch.inference_mode():
        y_im = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert torch.equal(y, y_ng) and torch.equal(y, y_im)
    full = OutputMIDLinear.from_linear(dense, keep=1.0, rank=8)
    assert torch.equal(full(x), dense(x))


@pytest.mark.parametrize("name,dense,shape", [DENSE_CASES[1], DENSE_CASES[6]], ids=["linear", "conv"])
def test_torch_export_matches_eager(name, dense, shape):
    torch.manual_seed(6)
    layer = convert(dense, keep=0.5, rank=4).eval()
    x = torch.randn(shape)
    exported = torch.export.export(layer, (x,))
    assert rel_err(exported.module()(x), layer(x)) <= 1e-6


def test_state_dict_round_trip_and_repr():
    torch.manual_seed(7)
    layer = OutputMIDLinear.from_linear(nn.Linear(16, 24), keep=0.5, rank=4, granularity="sequence").eval()
    fresh = OutputMIDLinear(16, 24, keep=0.5, rank=4, granularity="sequence").eval()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 16)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"weight", "bias", "light_down", "light_up", "gate_weight", "gate_bias", "gate_abs",
                                      "gate_threshold"}
    layer.gate_mode = "linear"
    fresh.load_state_dict(layer.state_dict())
    assert fresh.gate_mode == "linear" and torch.equal(fresh(x), layer(x))
    assert repr(layer) == (
        "OutputMIDLinear(in_features=16, out_features=24, select=output, keep=0.5, rank=4, granularity=sequence, bias=True)"
    )


@pytest.mark.parametrize("name,dense,shape", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_merge_and_unload_gives_back_the_dense_module(name, dense, shape):
    layer = convert(copy.deepcopy(dense), keep=0.5, rank=4)
    back = layer.merge_and_unload()
    assert type(back) is type(dense)
    x = torch.randn(shape)
    assert torch.equal(back(x), dense(x))


def test_hf_conv1d_is_a_linear_target():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(8)
    c1d = Conv1D(48, 16)  # GPT-2 style: weight (in, out)
    nn.init.normal_(c1d.bias)
    x = torch.randn(2, 5, 16)
    layer = OutputMIDLinear.from_linear(c1d, keep=1.0, rank=4)
    assert (layer.in_features, layer.out_features) == (16, 48)
    assert rel_err(layer(x), c1d(x)) <= 1e-5
    back = OutputMIDLinear.from_linear(c1d, keep=0.5, rank=4).merge_and_unload()
    assert type(back) is Conv1D and torch.equal(back(x), c1d(x))


def test_stats_record_active_fraction():
    layer = OutputMIDLConv2d.from_conv(nn.Conv2d(8, 10, 1), keep=0.3, rank=2).eval()
    assert layer.active_fraction is None
    layer.track_stats = True
    layer(torch.randn(1, 8, 3, 3))
    layer(torch.randn(1, 8, 3, 3))
    assert layer.k == 3
    assert layer.last_active_fraction == pytest.approx(0.3)
    assert layer.active_fraction == pytest.approx(0.3)
    layer.reset_stats()
    assert layer.active_fraction is None


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
@pytest.mark.parametrize("rank", [1, 8, 32])
def test_light_path_is_the_best_rank_r_fit(shape, rank):
    from midl_convert.fitting import svd_factors

    torch.manual_seed(9)
    w = torch.randn(*shape) @ torch.diag(torch.linspace(3, 0.1, shape[1]))
    u, v = svd_factors(w, rank)
    assert u.shape == (shape[0], rank) and v.shape == (rank, shape[1])
    uu, ss, vv = torch.linalg.svd(w, full_matrices=False)
    best = (uu[:, :rank] * ss[:rank]) @ vv[:rank]
    assert (u @ v - best).norm() / best.norm() < 1e-4


@pytest.mark.parametrize("where", ["midl_convert", "midl_convert.kinds.output.layer"])
@pytest.mark.parametrize("old,new", [("MIDLinear", OutputMIDLinear), ("MIDLConv2d", OutputMIDLConv2d),
                                     ("MIDLBase", OutputMIDLBase)])
def test_old_output_class_names_still_import_for_a_version_with_a_warning(where, old, new):
    """The output kind's classes were MIDLinear etc. ("MID-L" is the whole family): the old names give the
    same class and a FutureWarning naming the new one; an unknown name is still an AttributeError."""
    import importlib

    module = importlib.import_module(where)
    with pytest.warns(FutureWarning, match=rf"{where}\.{old} is deprecated .* use {new.__name__}"):
        assert getattr(module, old) is new
    with pytest.warns(FutureWarning):
        exec(f"from {where} import {old} as got", {})
    with pytest.raises(AttributeError, match="has no attribute 'MIDLinearX'"):
        getattr(module, "MIDLinearX")
