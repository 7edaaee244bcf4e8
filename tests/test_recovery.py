"""Recovery capacity that merges away: LoRA on W, biases, norms; what --train names; the block loss."""
import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import midl_convert as mc
from midl_convert import lora
from midl_convert.distill import DistillConfig, _BlockLoss, blocks, distill, trainable
from midl_convert.recovery import parse_train
from helpers import TinyNet, tiny_data


def layers_of_every_kind(keep: float = 0.5, rank: int = 3) -> list[tuple[nn.Module, torch.Tensor]]:
    """(layer, input) for both sides, Linear and 1x1 conv, with non-trivial gates."""
    torch.manual_seed(0)
    lin, conv = nn.Linear(24, 20), nn.Conv2d(12, 10, 1)
    made = [(mc.InputMIDLinear.from_linear(lin, keep, rank), torch.randn(5, 24)),
            (mc.OutputMIDLinear.from_linear(lin, keep, rank), torch.randn(5, 24)),
            (mc.InputMIDLConv2d.from_conv(conv, keep, rank), torch.randn(2, 12, 3, 3)),
            (mc.OutputMIDLConv2d.from_conv(conv, keep, rank), torch.randn(2, 12, 3, 3))]
    for layer, _ in made:
        for name in ("gate", "gate_bias"):
            if hasattr(layer, name):
                getattr(layer, name).data.mul_(torch.rand_like(getattr(layer, name)) + 0.5)
    return made


def trained_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer as distillation runs it: training mode, autograd recording (the reference path)."""
    layer.train()
    with torch.enable_grad():
        return layer(x).detach()


@pytest.mark.parametrize("index", range(4))
def test_lora_starts_exact_then_merges_to_the_trained_output(index):
    layer, x = layers_of_every_kind()[index]
    layer.eval()
    with torch.no_grad():
        before = layer(x)
    weight = layer.weight
    strides = weight.stride()
    (a, b) = lora.attach(layer, rank=4, alpha=8)
    assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)
    assert torch.allclose(trained_output(layer, x), before, atol=1e-6)  # B = 0: exact at the start
    with torch.no_grad():
        b.normal_(0, 0.1)  # as if trained
    trained = trained_output(layer, x)
    expected_w = weight.detach() + 2.0 * b.detach() @ a.detach()  # scale alpha / rank = 2
    assert lora.merge(layer) == 1
    assert layer.weight is weight and layer.weight.stride() == strides  # the same Parameter, the same layout
    assert torch.allclose(layer.weight, expected_w, atol=1e-6)
    assert not lora.attached(layer)
    layer.eval()
    with torch.no_grad():
        merged = layer(x)  # the deployed path (kernel or sparse GEMMs)
    assert torch.allclose(merged, trained, atol=1e-5)
    assert not torch.allclose(merged, before, atol=1e-3)


@pytest.mark.parametrize("index", range(4))
def test_gradients_reach_the_gate_and_the_delta(index):
    layer, x = layers_of_every_kind()[index]
    a, b = lora.attach(layer, rank=4)
    with torch.no_grad():
        b.normal_(0, 0.1)
    for p in layer.parameters():
        p.requires_grad_(p is a or p is b or p.dim() <= 1)
    layer.train()
    layer(x).pow(2).sum().backward()
    gate = layer.gate if hasattr(layer, "gate") else layer.gate_bias
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_parse_train_names_parts_and_refuses_others():
    assert parse_train("midl") == "midl"
    assert parse_train("lora, bias") == "lora,bias"
    assert parse_train("all") == "midl,lora,bias,norms"
    assert parse_train("gates,midl") == "midl"
    assert parse_train(["norms", "gates"]) == "gates,norms"
    for bad in ("", "lora,weights", "everything"):
        with pytest.raises(ValueError, match="gates, midl, lora, bias, norms, full, all"):
            parse_train(bad)
    with pytest.raises(ValidationError):
        DistillConfig(train="lora,nope")
    assert DistillConfig(train="bias,lora").train == "lora,bias"


class NormNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


def converted(net: nn.Module, select: str = "input"):
    torch.manual_seed(0)
    teacher = net.eval()
    student = copy.deepcopy(teacher)
    data = tiny_data()
    mc.convert(student, mc.MIDLConfig(keep=0.5, rank=2, select=select, exclude=["head"]), data.train_batch(0, 4).inputs)
    return teacher, student, data


def test_trainable_counts_each_part():
    _, student, _ = converted(NormNet())
    fc1, fc2 = student.fc1, student.fc2  # 16 -> 64, 64 -> 64, rank 2, input side
    counts = {}
    for train in ("gates", "midl", "lora", "bias", "norms", "all", "full"):
        model = copy.deepcopy(student)
        groups = trainable(model, DistillConfig(train=train, lora_rank=4))
        counts[train] = sum(p.numel() for g in groups for p in g["params"])
        assert counts[train] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    gates = fc1.in_features + fc2.in_features
    light = sum(2 * lay.rank * 0 + lay.light_up.numel() + lay.light_down.numel() for lay in (fc1, fc2))
    assert counts["gates"] == gates
    assert counts["midl"] == gates + light
    assert counts["lora"] == 4 * (16 + 64) + 4 * (64 + 64)
    assert counts["bias"] == 64 + 64
    assert counts["norms"] == 64 + 64
    assert counts["all"] == counts["midl"] + counts["lora"] + counts["bias"] + counts["norms"]
    assert counts["full"] == sum(p.numel() for p in student.parameters())


def test_distill_with_all_saves_the_same_parameters_and_improves(tmp_path):
    teacher, student, data = converted(NormNet())
    mc.calibrate(student, [data.train_batch(1_000_000 + i, 32) for i in range(2)])
    shapes = {k: (tuple(v.shape), v.stride()) for k, v in student.state_dict().items()}
    w = student.fc2.weight.detach().clone()
    result = distill(student, teacher, data, "classifier", steps=30, lr=3e-3, batch_size=32, train="all", log_every=100)
    assert result.train == "midl,lora,bias,norms"
    assert result.trainable == sum(p.numel() for p in student.parameters()) - sum(
        lay.weight.numel() for lay in (student.fc1, student.fc2)) - sum(p.numel() for p in student.head.parameters()) \
        + 8 * (16 + 64) + 8 * (64 + 64)
    assert {k: (tuple(v.shape), v.stride()) for k, v in student.state_dict().items()} == shapes  # nothing added
    assert not lora.attached(student)
    assert not torch.equal(student.fc2.weight, w)  # the delta merged into W
    assert result.after["kl"] < result.before["kl"]
    saved = tmp_path / "out"
    mc.save(student, saved)
    again = mc.load(saved, model=NormNet())
    x = data.heldout_batches(16)[0].inputs[0]
    with torch.no_grad():
        assert torch.allclose(again(x), student(x), atol=1e-6)


def test_a_failed_run_leaves_no_delta_attached():
    teacher, student, data = converted(NormNet())
    original = data.train_batch
    data.train_batch = lambda index, size: (_ for _ in ()).throw(KeyboardInterrupt()) if index == 3 else original(index, size)
    w = student.fc1.weight.detach().clone()
    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, data, "classifier", steps=10, train="lora", batch_size=8, checkpoint_every=0)
    assert not lora.attached(student) and torch.equal(student.fc1.weight, w)


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)])
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def test_block_loss_is_zero_on_the_teacher_and_positive_after_conversion():
    torch.manual_seed(0)
    teacher = Blocks().eval()
    data = tiny_data()
    batch = data.train_batch(0, 8)
    student = copy.deepcopy(teacher)
    assert blocks(student) == []  # no sparse layers yet
    mc.convert(student, mc.MIDLConfig(keep=0.5, rank=0, select="input", exclude=["head"]), batch.inputs)
    assert blocks(student) == ["layers.0", "layers.1", "layers.2"]
    assert _BlockLoss(copy.deepcopy(teacher), teacher).handles == []  # a dense copy has no blocks with sparse layers
    loss = _BlockLoss(student, teacher)
    with torch.no_grad():
        teacher(*batch.inputs)
        student(*batch.inputs)
    value = loss.pop(batch)
    assert value > 0 and len(loss.handles) == 6
    with torch.no_grad():
        teacher(*batch.inputs)
        copy.deepcopy(teacher)(*batch.inputs)  # unhooked: nothing recorded for the student side
    assert loss.pop(batch) == 0
    loss.close()
    result = distill(student, teacher, data, "classifier", steps=20, lr=3e-3, batch_size=32, train="all", block_weight=1.0,
                     log_every=100)
    assert result.after["kl"] < result.before["kl"]


def test_cli_train_option_reaches_the_recipe_and_refuses_bad_choices():
    from midl_convert.cli import OPTION_KEYS, build_recipe

    options = {k: None for k in OPTION_KEYS}
    assert build_recipe("resnet18", None, {**options, "train": "bias,lora"}, False).distill.train == "lora,bias"
    assert build_recipe("resnet18", None, options, False).distill.train == DistillConfig().train
    with pytest.raises(mc.MIDLError, match=r"^--train: Value error, train must be one or more of gates, midl, lora, bias, norms, "
                                           r"full, all .*got 'lora,bogus'$"):
        build_recipe("resnet18", None, {**options, "train": "lora,bogus"}, False)
