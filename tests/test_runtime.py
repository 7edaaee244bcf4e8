"""Runtime measurement: bytes of weights counted once per storage, and rounds of interleaved calls."""
import pytest
import torch
from torch import nn

from midl_convert import latency
from midl_convert.runtime import interleaved_rounds, weight_bytes


def tied() -> nn.Module:
    """Two Linear layers sharing one weight Parameter, plus buffers that view it: 4x8 float32 weights held once."""
    model = nn.Sequential(nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False))
    model[1].weight = model[0].weight  # one tensor at two places (tied weights)
    model[1].register_buffer("view", model[0].weight.detach())  # another tensor object, the same storage
    model[1].register_buffer("rows", model[0].weight.detach()[1:3])  # part of that storage
    return model


@pytest.mark.parametrize("make,expected", [
    (tied, 4 * 8 * 4),
    (lambda: nn.Linear(8, 4), (4 * 8 + 4) * 4),
    (lambda: nn.Sequential(nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False).to(torch.bfloat16)), 4 * 8 * 4 + 4 * 8 * 2),
    (lambda: nn.BatchNorm1d(6), 6 * 4 * 4 + 8),  # weight, bias, running mean and var; an int64 count
])
def test_weight_bytes_counts_each_storage_once(make, expected):
    module = make()
    assert weight_bytes(module) == expected
    assert latency.weight_bytes is weight_bytes  # the working set of the layer timings counts the same bytes


def test_weight_bytes_of_a_strided_view_counts_its_stretch():
    """A buffer that is every other row of a fresh tensor holds the whole stretch it spans, no more."""
    module = nn.Module()
    module.register_buffer("every_other", torch.zeros(5, 3)[::2])  # rows 0, 2, 4 of a 5x3 storage
    assert weight_bytes(module) == 5 * 3 * 4
    module.register_buffer("empty", torch.zeros(0, 3))
    assert weight_bytes(module) == 5 * 3 * 4


def test_interleaved_rounds_alternate_the_order_and_report_each_round():
    order, rounds, syncs = [], [], []
    times = interleaved_rounds([lambda: order.append("a"), lambda: order.append("b"), lambda: order.append("c")], 4, calls=2,
                               sync=lambda: syncs.append(1), advance=lambda: rounds.append(len(order)))
    assert order == ["a", "a", "b", "b", "c", "c", "c", "c", "b", "b", "a", "a"] * 2
    assert rounds == [6, 12, 18, 24] and len(syncs) == 2 * 3 * 4  # a sync before and after each sample
    assert [len(t) for t in times] == [4, 4, 4] and all(s >= 0 for t in times for s in t)
