"""What follows a layer (BatchNorm, activation) is read off the export graph, and calibration fits the
gate to the error that survives it; the layer budget fits each option on batches it does not judge."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from midl_convert import MIDLConfig, apply_plan, calibrate, convert, find_targets, plan_conversion
from midl_convert import budget
from midl_convert.data import Batch
from midl_convert.downstream import post_fn


class Mixed(nn.Module):
    """A 1x1 conv into BatchNorm and ReLU6, one into BatchNorm only, then an MLP with GELU."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.pw = nn.Conv2d(8, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.pwl = nn.Conv2d(width, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, width)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(width, 4)

    def forward(self, x):
        x = self.bn2(self.pwl(F.relu6(self.bn1(self.pw(x)))))
        return self.fc2(self.act(self.fc1(x.mean((2, 3)))))


def test_graph_records_norm_and_activation():
    model = Mixed().eval()
    table = find_targets(model, torch.randn(2, 8, 6, 6))
    assert table.trace == "export"
    after = {t.path: (t.norm, t.activation) for t in table.targets}
    assert after == {"pw": ("bn1", "hardtanh:0:6"), "pwl": ("bn2", None), "fc1": (None, "gelu_tanh"), "fc2": (None, None)}
    plan, _ = plan_conversion(model, MIDLConfig(skip_head=False), torch.randn(2, 8, 6, 6))
    assert {lp.path: (lp.norm, lp.activation) for lp in plan.layers} == after


def test_post_fn_matches_the_model_modules():
    model = Mixed().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.weight.uniform_(0.5, 2)
        model.bn1.bias.uniform_(-1, 1)
    y = torch.randn(50, 32)
    post = post_fn(model, "bn1", "hardtanh:0:6")
    expected = F.relu6(model.bn1(y[:, :, None, None]))[:, :, 0, 0]
    torch.testing.assert_close(post(y), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post_fn(model, None, "gelu_tanh")(y), F.gelu(y, approximate="tanh"))
    assert post_fn(model, None, None) is None


class GeluMLP(nn.Module):
    """An MLP whose first layer is mostly inactive after GELU (negative bias), as in trained transformers."""

    def __init__(self, d: int = 32, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        with torch.no_grad():
            self.fc1.weight.mul_(3.0)
            self.fc1.bias.fill_(-2.0)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _error_after_gelu(model: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return ((F.gelu(model.fc1(x)) - F.gelu(teacher.fc1(x))).norm() / F.gelu(teacher.fc1(x)).norm()).item()


def test_gate_fitted_after_the_activation_leaves_less_error():
    torch.manual_seed(0)
    teacher = GeluMLP().eval()
    calib, held = torch.randn(512, 32), torch.randn(512, 32)
    cfg = MIDLConfig(keep=0.25, rank=4, include=["fc1"])
    aware = convert(copy.deepcopy(teacher), cfg, (calib[:1],))[0].eval()
    assert aware.fc1.downstream == (None, "gelu")
    blind = copy.deepcopy(aware)
    blind.fc1.downstream = (None, None)
    calibrate(aware, [Batch((calib,))])
    calibrate(blind, [Batch((calib,))])
    aware_err, blind_err = _error_after_gelu(aware, teacher, held), _error_after_gelu(blind, teacher, held)
    assert aware_err < 0.8 * blind_err  # 0.62 vs 0.83 when written, (aware_err, blind_err)


def test_budget_fits_options_on_batches_it_does_not_judge(monkeypatch, tmp_path):
    monkeypatch.setenv("MIDL_CACHE_DIR", str(tmp_path))
    seen: list[int] = []
    from midl_convert.kinds.input.layer import InputMIDLBase
    from midl_convert.kinds.output.layer import OutputMIDLBase

    for cls in (OutputMIDLBase, InputMIDLBase):  # every kind's fit, on whichever side the budget tries
        def spy(layer, groups, *args, _real=cls.calibrate_rows, **kwargs):
            seen.append(groups.shape[0] * groups.shape[1])
            return _real(layer, groups, *args, **kwargs)

        monkeypatch.setattr(cls, "calibrate_rows", spy)
    gen = torch.Generator().manual_seed(0)
    data = [Batch((torch.randn(n, 32, generator=gen),)) for n in (16, 48, 48)]  # judged on 16 rows, fitted on 96
    model = GeluMLP().eval()
    config = MIDLConfig(flops_ratio=1.1, budget_keeps=[0.5], budget_ranks=[4], skip_head=False)
    plan, _ = plan_conversion(model, config, (torch.randn(1, 32),), data)
    assert seen and set(seen) == {96}
    seen.clear()
    one = MIDLConfig(flops_ratio=1.1, budget_keeps=[0.5], budget_ranks=[4], skip_head=False, budget_fit_batches=0)
    plan_conversion(model, one, (torch.randn(1, 32),), data[:1])
    assert set(seen) == {16}  # nothing held apart: fitted on what it is judged on
    apply_plan(copy.deepcopy(model), plan)


def test_config_rejects_negative_fit_batches():
    with pytest.raises(ValueError, match="budget_fit_batches"):
        MIDLConfig(flops_ratio=1.2, budget_fit_batches=-1)
