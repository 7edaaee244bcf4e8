"""The graph pass: targets, shapes, FLOPs, roles, heads and trace fallbacks."""
import pytest
import torch
from torch import nn

from midl_convert.graph import find_targets


class Block(nn.Module):
    """A transformer-like block with a 1x1 conv branch and a shared Linear used twice."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(16, 48)
        self.attn.proj = nn.Linear(16, 16)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(16, 64)
        self.mlp.fc2 = nn.Linear(64, 16)
        self.shared = nn.Linear(16, 16)
        self.pw = nn.Conv2d(4, 8, 1, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)  # not a target
        self.unused = nn.Linear(16, 16)  # never runs
        self.head = nn.Linear(16, 3)

    def forward(self, x, img):
        q, k, v = self.attn.qkv(x).chunk(3, dim=-1)
        x = x + self.attn.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
        x = x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))
        x = self.shared(self.shared(x))
        z = self.dw(self.pw(img)).mean((2, 3))
        return self.head(x.mean(1) + z.sum(-1, keepdim=True))


def inputs():
    return torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)


@pytest.mark.parametrize("method", ["export", "walk", "auto"])
def test_targets_shapes_flops_roles(method):
    table = find_targets(Block(), inputs(), trace=method)
    assert table.trace == ("export" if method == "auto" else method)
    by = {t.path: t for t in table.targets}
    assert set(by) == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "shared", "pw", "head"}
    assert by["attn.qkv"].input_shape == (2, 5, 16)
    assert by["attn.qkv"].flops == 2 * 16 * 48 * 10
    assert by["pw"].module_type == "conv2d" and by["pw"].input_shape == (2, 4, 8, 8)
    assert by["pw"].flops == 2 * 4 * 8 * (2 * 4 * 4)  # stride 2: 4x4 output pixels
    assert by["shared"].calls == 2 and by["shared"].flops == 2 * 2 * 16 * 16 * 10
    roles = {p: t.role for p, t in by.items()}
    assert roles["attn.qkv"] == "attention.qkv" and roles["attn.proj"] == "attention.out"
    assert roles["mlp.fc1"] == "mlp.fc1" and roles["mlp.fc2"] == "mlp.fc2"
    assert by["head"].is_head and roles["head"] == "head"
    assert table.total_flops == sum(t.flops for t in table.targets)


def test_fx_fallback_is_recorded():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: export and fx both refuse it
                return self.fc(x)
            return self.fc(-x)

    table = find_targets(Untraceable(), torch.ones(1, 8))
    assert table.trace == "walk"
    assert [n.split(" ")[0] for n in table.notes] == ["export", "fx"]
    assert table.targets[0].input_shape == (1, 8)


def test_without_inputs_only_the_walk_runs():
    table = find_targets(Block())
    assert table.trace == "walk" and "no example inputs" in table.notes[0]
    assert "unused" in {t.path for t in table.targets}  # cannot know it never runs
    assert all(t.input_shape is None and t.flops == 0 for t in table.targets)


def test_shared_module_listed_once_with_aliases():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    model.append(model[0])
    table = find_targets(model, torch.randn(1, 8))
    assert [t.path for t in table.targets] == ["0"]
    assert table.targets[0].aliases == ["2"] and table.targets[0].calls == 2


def test_layers_that_transform_their_weight_are_not_targets():
    from timm.layers import ScaledStdConv2d, StdConv2d
    from timm.layers.linear import Linear as TimmLinear

    model = nn.Sequential(StdConv2d(4, 8, 1), ScaledStdConv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Flatten(), TimmLinear(8 * 9, 3))
    table = find_targets(model, torch.randn(1, 4, 3, 3))
    assert [t.path for t in table.targets] == ["2", "4"]
