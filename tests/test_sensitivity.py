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


@pytest.mark.parametrize("conv", [False, True])
def test_sensitivity_is_the_squared_reach_of_each_neuron(conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(5, 6, 1) if conv else nn.Linear(5, 6)
    model = Scaled(layer, SCALE, 1 if conv else -1)
    x = torch.randn(16, 5, 3, 3) if conv else torch.randn(64, 5)
    before = [p.requires_grad for p in model.parameters()]
    sens = neuron_sensitivity(model, ["layer"], [Batch((x,))], "hidden", probes=40)["layer"]
    expected = SCALE**2 / (SCALE**2).mean()  # d <v, s * y> / d y_i = v_i s_i, and E v_i^2 = 1
    assert torch.allclose(sens, expected, rtol=0.15), (sens, expected)
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())  # no gradient left in the weights


def test_sensitivity_counts_real_tokens_only():
    """Padded positions are not data: how the output would feel them there must not count."""
    torch.manual_seed(0)
    reach = torch.ones(5, 3)
    reach[3:, 0] = 100.0  # neuron 0 reaches the output 100x harder, but only at the padded positions

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x, attention_mask):
            return self.layer(x) * reach

    batch = Batch({"x": torch.randn(8, 5, 4), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]] * 8)})
    sens = neuron_sensitivity(Tokens(), ["layer"], [batch], "hidden", probes=40)["layer"]
    assert torch.allclose(sens, torch.ones(3), rtol=0.2), sens  # counted, neuron 0 would be ~10^4 x the others


def test_weighted_calibration_spends_exact_neurons_where_the_output_feels_them():
    torch.manual_seed(0)
    scale = torch.ones(24) * 0.05
    scale[:6] = 5.0  # six neurons carry the output; the rest barely reach it
    teacher = Scaled(nn.Linear(32, 24), scale).eval()
    calib, held = torch.randn(512, 32), torch.randn(512, 32)
    cfg = MIDLConfig(keep=0.25, rank=4)
    weighted = convert(copy.deepcopy(teacher), cfg, (calib[:1],))[0].eval()
    plain = copy.deepcopy(weighted)
    results = calibrate(weighted, [Batch((calib,))], kind="hidden")
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
    gates = {r.path: r.gate for r in calibrate(student, [Batch((calib,))], kind="hidden")}
    assert not gates["0"].endswith("weighted")  # GELU follows it: its gate already sees what passes on
    assert gates["2"].endswith("weighted")
