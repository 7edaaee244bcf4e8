"""Adaptive masks: a calibrated score threshold instead of exactly k per mask. Every compute path
agrees with the reference, the threshold keeps ``keep`` of the real tokens' neurons on average,
FLOPs are counted from the neurons actually picked, and the threshold survives save and load."""
import copy

import pytest
import torch
from torch import nn

import midl_convert as mc
from midl_convert.calibrate import collect_groups, fit_threshold, fit_thresholds
from midl_convert.data import Batch
from midl_convert.flops import model_flops
from midl_convert.kinds.output.layer import OutputMIDLConv2d, OutputMIDLinear


def adaptive_layer(module_type: str = "linear", granularity: str = "token") -> nn.Module:
    torch.manual_seed(0)
    if module_type == "linear":
        layer = OutputMIDLinear.from_linear(nn.Linear(24, 40), keep=0.5, rank=6, granularity=granularity)
    else:
        layer = OutputMIDLConv2d.from_conv(nn.Conv2d(24, 40, 1), keep=0.5, rank=6, granularity=granularity)
    with torch.no_grad():
        layer.gate_weight.normal_()
        layer.gate_bias.normal_()
    layer.adaptive = True
    layer.threshold = 1.0
    return layer.eval()


def test_fit_threshold_keeps_the_share():
    scores = torch.randn(100, 40)
    tau = fit_threshold(scores, 0.3)
    assert (scores > tau).float().mean().item() == pytest.approx(0.3, abs=1 / 4000 + 1e-6)


@pytest.mark.parametrize("module_type,granularity,shape", [
    ("linear", "token", (5, 24)), ("linear", "token", (1, 24)), ("linear", "sequence", (3, 7, 24)),
    ("conv", "pixel", (2, 24, 3, 3)), ("conv", "sample", (2, 24, 3, 3)),
])
def test_every_path_picks_the_neurons_above_the_threshold(module_type, granularity, shape):
    layer = adaptive_layer(module_type, granularity)
    x = torch.randn(*shape)
    with torch.no_grad():
        rows = layer.groups_of(x)
        h = rows @ layer.light_down.T
        s = layer.scores(h.mean(1, keepdim=True))  # (G, 1, out)
        mask = (s > 1.0).float()
        best = torch.zeros_like(s).scatter_(-1, s.argmax(-1, keepdim=True), 1.0)
        mask = torch.where(mask.sum(-1, keepdim=True) > 0, mask, best)  # at least one exact neuron
        dense, light = rows @ layer.weight.T + layer.bias, h @ layer.light_up.T + layer.bias
        expected = light + mask * (dense - light)
    paths = ["reference", "masked", "auto"] + (["sparse"] if granularity in ("sequence", "sample") else [])
    for path in paths:
        layer.route = path
        with torch.no_grad():
            y = layer(x)
        got = y
        ref = expected.reshape(*rows.shape[:2], -1)
        if module_type == "linear":
            torch.testing.assert_close(got.reshape(ref.shape[0] * ref.shape[1], -1), ref.reshape(-1, ref.shape[-1]),
                                       atol=1e-5, rtol=1e-5, msg=path)
        else:
            torch.testing.assert_close(got.permute(0, 2, 3, 1).reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1]),
                                       atol=1e-5, rtol=1e-5, msg=path)


def test_measured_share_and_flops_follow_the_picks():
    layer = adaptive_layer()
    x = torch.randn(64, 24)
    layer.track_stats = True
    with torch.no_grad():
        s = layer.scores(x @ layer.light_down.T)
        layer(x)
    expected = (s > 1.0).sum(-1).clamp_min(1).float().mean().item() / 40
    assert layer.active_fraction == pytest.approx(expected)
    assert abs(expected - 0.5) > 0.05  # a threshold of 1.0 is not keep 0.5: the count must come from the picks

    model, twin = nn.Sequential(copy.deepcopy(layer)), nn.Sequential(nn.Linear(24, 40))
    flops = model_flops(model, twin, (x,))
    exact = flops.layers["0"].parts["exact"]
    assert exact == round(2 * expected * 40 * 24 * 64)


def test_threshold_saved_and_loaded():
    layer = adaptive_layer()
    fresh = OutputMIDLinear(24, 40, keep=0.5, rank=6)
    assert fresh.threshold is None
    fresh.load_state_dict(layer.state_dict())
    assert fresh.threshold == 1.0
    state = {k: v for k, v in layer.state_dict().items() if k != "gate_threshold"}  # saved before adaptive masks
    older = OutputMIDLinear(24, 40, keep=0.5, rank=6)
    older.load_state_dict(state)
    assert older.threshold is None


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 32)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.emb(input_ids))


def test_calibration_skips_padding_and_keeps_the_share_on_real_tokens():
    torch.manual_seed(0)
    model = Encoder().eval()
    ids = torch.randint(1, 50, (8, 12))
    mask = torch.ones(8, 12, dtype=torch.long)
    mask[:, 6:] = 0  # half of every row is padding
    ids[mask == 0] = 0
    batch = Batch({"input_ids": ids, "attention_mask": mask})
    student, _ = mc.convert(copy.deepcopy(model), mc.MIDLConfig(keep=0.25, rank=4, adaptive=True, skip_head=False),
                            {"input_ids": ids[:1], "attention_mask": mask[:1]})
    assert student.fc.adaptive
    assert collect_groups(student, [batch])["fc"].shape[0] == 48  # real tokens only
    mc.calibrate(student, [batch])
    assert student.fc.threshold is not None
    real = student.emb(ids)[mask.bool()]
    with torch.no_grad():
        share = (student.fc.scores(real @ student.fc.light_down.T) > student.fc.threshold).float().mean().item()
    assert share == pytest.approx(0.25, abs=0.01)
    student.fc.threshold = 50.0  # training moved the gates: refit
    fit_thresholds(student, [batch])
    assert student.fc.threshold == pytest.approx(fit_threshold(
        student.fc.scores(real @ student.fc.light_down.T).detach(), 0.25))


def test_distillation_refits_the_thresholds_to_the_keep():
    from test_distill import TinyNet, tiny_data

    torch.manual_seed(0)
    teacher, data = TinyNet().eval(), tiny_data()
    student = copy.deepcopy(teacher)
    mc.convert(student, mc.MIDLConfig(keep=0.5, rank=4, adaptive=True), data.train_batch(0, 4).inputs)
    mc.calibrate(student, [data.train_batch(i, 32) for i in range(2)])
    fc1 = student.fc1
    fc1.threshold = -1e6  # as if training had pushed every score past it: every neuron exact
    mc.distill(student, teacher, data, "classifier", steps=3, lr=1e-3, batch_size=8)
    assert fc1.threshold > -1e6
    groups = collect_groups(student, [data.train_batch(1_000_000 + i, 8) for i in range(4)])["fc1"]  # what it refits on
    with torch.no_grad():
        share = (fc1.scores(groups @ fc1.light_down.T) > fc1.threshold).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.02)


def test_training_keeps_the_share_whatever_the_threshold():
    layer = adaptive_layer()
    layer.threshold = -1e6  # in eval every neuron would pass
    layer.train()
    layer.track_stats = True
    layer(torch.randn(64, 24)).sum().backward()
    assert layer.active_fraction == pytest.approx(0.5, abs=0.01)
    assert layer.gate_weight.grad is not None and layer.gate_weight.grad.abs().sum() > 0  # straight-through
    layer.eval()
    layer.reset_stats()
    with torch.no_grad():
        layer(torch.randn(64, 24))
    assert layer.active_fraction == 1.0


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(24, 40), nn.Linear(40, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.fc2(torch.relu(self.fc1(x))))


def test_capped_thresholds_keep_the_example_within_what_the_budget_counted():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    calib = [Batch((torch.randn(64, 24),))]
    example = (3 * torch.randn(16, 24),)  # louder than the calibration data: it draws more exact neurons
    exact_k, _ = mc.convert(copy.deepcopy(model), mc.MIDLConfig(keep=0.25, rank=4), example)
    student, _ = mc.convert(copy.deepcopy(model), mc.MIDLConfig(keep=0.25, rank=4, adaptive=True), example)
    mc.calibrate(exact_k, calib)
    mc.calibrate(student, calib)
    budgeted = model_flops(exact_k, model, example).ratio
    assert model_flops(student, model, example).ratio < budgeted  # uncapped: the example costs more than counted

    before = {p: student.get_submodule(p).threshold for p in ("fc1", "fc2")}
    assert mc.cap_thresholds(student, example) == ["fc1", "fc2"]
    for p in ("fc1", "fc2"):
        layer = student.get_submodule(p)
        assert layer.threshold > before[p]
    with torch.no_grad():
        layer = student.fc1
        counts = layer.mask_counts(layer.scores(example[0] @ layer.light_down.T), layer.threshold)
    assert counts.float().mean().item() <= layer.k
    assert counts.float().mean().item() >= layer.k - 1  # raised no further than needed
    assert model_flops(student, model, example).ratio >= budgeted - 1e-9
    assert mc.cap_thresholds(student, example) == []  # already within: nothing moves
