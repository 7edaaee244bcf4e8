"""Each neuron's reach to the model's output, and calibration that weighs the light path's error by it."""
import copy

import pytest
import torch
from torch import nn

from midl_convert import MIDLConfig, calibrate, convert
from midl_convert.data import Batch
from midl_convert.sensitivity import neuron_sensitivity


class Scaled(nn.Module):
    """A layer whose output neurons reach the output through fixed, very unequal scales."""

    def __init__(self, layer: nn.Module, scale: torch.Tensor, channel_dim: int = -1):
        super().__init__()
        self.layer = layer
        shape = [1] * (4 if channel_dim == 1 else 2)
        shape[channel_dim] = -1
        self.register_buffer("scale", scale.reshape(shape))

    def forward(self, x):
        return self.layer(x) * self.scale


SCALE = torch.tensor([4.0, 0.5, 2.0, 1.0, 0.25, 3.0])


@pytest.mark.parametrize("layout", ["linear", "conv", "conv-unbatched", "linear-channels-last"])
def test_sensitivity_is_the_squared_reach_of_each_neuron(layout):
    torch.manual_seed(0)
    conv = layout.startswith("conv")
    layer = nn.Conv2d(5, 6, 1) if conv else nn.Linear(5, 6)
    model = Scaled(layer, SCALE, 1 if conv else -1)
    if layout == "conv-unbatched":
        model.scale = model.scale[0]  # (C, 1, 1)
    x = {"linear": torch.randn(64, 5), "conv": torch.randn(16, 5, 3, 3), "conv-unbatched": torch.randn(5, 4, 4),
         "linear-channels-last": torch.randn(8, 3, 3, 5)}[layout]  # the last: a ConvNeXt-style MLP on (N, H, W, C)
    model.train()
    before = [p.requires_grad for p in model.parameters()]
    sens = neuron_sensitivity(model, ["layer"], [Batch((x,))], "hidden", probes=40)["layer"]
    expected = SCALE**2 / (SCALE**2).mean()  # d <v, s * y> / d y_i = v_i s_i, and E v_i^2 = 1
    assert torch.allclose(sens, expected, rtol=0.15), (sens, expected)
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())  # no gradient left in the weights
    assert model.training and model.layer.training


def test_sensitivity_counts_every_call_before_in_place_changes():
    """A module called twice per forward counts both calls; an in-place op after it does not hide its reach."""
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x):
            first = self.layer(x)
            first.mul_(torch.tensor([10.0, 1.0, 1.0]))  # neuron 0 of the first call reaches 10x harder
            second = self.layer(x) * torch.tensor([1.0, 1.0, 10.0])  # neuron 2 of the second call
            return first + second

    sens = neuron_sensitivity(Twice(), ["layer"], [Batch((torch.randn(64, 4),))], "hidden", probes=40)["layer"]
    expected = torch.tensor([101.0, 2.0, 101.0])  # sum over both calls of the squared reach
    assert torch.allclose(sens, expected / expected.mean(), rtol=0.15), sens


def test_sensitivity_counts_real_tokens_only():
    """Padded positions are not data: neither the output there nor the layer's rows there count."""
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x, attention_mask):
            y = self.layer(x)
            out = y.clone()
            out[:, 3:, 0] = 100 * y[:, :1, 0]  # padded outputs read a real token's neuron 0, 100x
            out[:, 0, 1] = out[:, 0, 1] + 100 * y[:, 3, 1]  # a real output reads a padded token's neuron 1
            return out

    batch = Batch({"x": torch.randn(8, 5, 4), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]] * 8)})
    sens = neuron_sensitivity(Tokens(), ["layer"], [batch], "hidden", probes=40)["layer"]
    assert torch.allclose(sens, torch.ones(3), rtol=0.2), sens  # counting either, neuron 0 or 1 would dominate


def test_weighted_calibration_runs_on_a_channels_last_mlp():
    """timm ConvNeXt's MLP Linears see (N, H, W, C) maps: one weight per output channel, not per row of the map."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

        def forward(self, x):  # (N, C, H, W) in and out, the MLP on channels-last
            return self.fc2(self.fc1(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    student = convert(Block().eval(), MIDLConfig(keep=0.5, rank=2, skip_head=False), (torch.randn(1, 8, 5, 5),))[0]
    results = calibrate(student, [Batch((torch.randn(4, 8, 5, 5),))], output="hidden")
    assert all(r.gate.endswith("weighted") for r in results)


def test_weighted_calibration_spends_exact_neurons_where_the_output_feels_them():
    torch.manual_seed(0)
    scale = torch.ones(24) * 0.05
    scale[:6] = 5.0  # six neurons carry the output; the rest barely reach it
    teacher = Scaled(nn.Linear(32, 24), scale).eval()
    calib, held = torch.randn(512, 32), torch.randn(512, 32)
    cfg = MIDLConfig(keep=0.25, rank=4)
    weighted = convert(copy.deepcopy(teacher), cfg, (calib[:1],))[0].eval()
    plain = copy.deepcopy(weighted)
    results = calibrate(weighted, [Batch((calib,))], output="hidden")
    calibrate(plain, [Batch((calib,))])
    assert results[0].gate.endswith(", weighted")
    with torch.no_grad():
        ref = teacher(held)
        err_w = ((weighted(held) - ref).norm() / ref.norm()).item()
        err_p = ((plain(held) - ref).norm() / ref.norm()).item()
    assert err_w < 0.5 * err_p, (err_w, err_p)  # 0.013 vs 0.63 when written


def test_weighted_calibration_leaves_layers_followed_by_an_activation_alone():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    calib = torch.randn(256, 16)
    student = convert(copy.deepcopy(teacher), MIDLConfig(keep=0.5, rank=4, skip_head=False), (calib[:1],))[0]
    gates = {r.path: r.gate for r in calibrate(student, [Batch((calib,))], output="hidden")}
    assert not gates["0"].endswith("weighted")  # GELU follows it: its gate already sees what passes on
    assert gates["2"].endswith("weighted")


def test_calibrate_rejects_an_unknown_output_before_touching_the_model():
    torch.manual_seed(0)
    teacher = Scaled(nn.Linear(8, 6), SCALE).eval()
    student = convert(copy.deepcopy(teacher), MIDLConfig(keep=0.5, rank=2), (torch.randn(1, 8),))[0]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match="output must be None or one of auto, embedding, hidden, logits, got 'logit'"):
        calibrate(student, [Batch((torch.randn(32, 8),))], output="logit")
    for k, v in before.items():  # the threshold buffer is NaN (exactly k), so compare NaN as equal
        torch.testing.assert_close(student.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)


def test_the_old_kind_keyword_still_works_for_a_version_and_says_the_new_name():
    """``kind=`` (the output compared) was renamed ``output=``: the old keyword gives the same result and
    a FutureWarning, and passing both is refused."""
    import midl_convert as mc

    torch.manual_seed(0)
    teacher = Scaled(nn.Linear(8, 6), SCALE).eval()
    calib = [Batch((torch.randn(64, 8),))]
    new = convert(copy.deepcopy(teacher), MIDLConfig(keep=0.5, rank=2), (torch.randn(1, 8),))[0]
    old = copy.deepcopy(new)
    calibrate(new, calib, output="hidden")
    with pytest.warns(FutureWarning, match=r"calibrate\(kind=\.\.\.\) is deprecated .* use output="):
        calibrate(old, calib, kind="hidden")
    for k, v in new.state_dict().items():
        torch.testing.assert_close(old.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(TypeError, match="got both kind= and output="):
        calibrate(old, calib, kind="hidden", output="hidden")
    with pytest.warns(FutureWarning, match=r"neuron_sensitivity\(kind=\.\.\.\)"):
        got = mc.neuron_sensitivity(teacher, ["layer"], calib, kind="hidden")
    torch.testing.assert_close(got["layer"], neuron_sensitivity(teacher, ["layer"], calib, output="hidden")["layer"])
    plan, _ = mc.plan_conversion(copy.deepcopy(teacher), MIDLConfig(keep=0.5), (torch.randn(1, 8),))
    with pytest.warns(FutureWarning, match=r"budget_plan\(kind=\.\.\.\)"), pytest.raises(mc.MIDLError, match="flops_ratio"):
        mc.budget_plan(teacher, plan, MIDLConfig(keep=0.5), calib, kind="hidden", example_inputs=(torch.randn(1, 8),))
