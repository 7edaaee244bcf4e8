"""Collecting each layer's real input rows: padding left out, and one copy for layers that read one tensor."""
import copy

import torch
from torch import nn

import midl_convert as mc
from midl_convert.calibrate import collect_groups


class Attention(nn.Module):
    """q, k and v read one tensor in turn, as in a decoder; o reads another."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x, attention_mask=None):
        return self.o(torch.tanh(self.q(x) + self.k(x) * self.v(x)))


def test_layers_reading_one_tensor_share_one_copy_of_its_rows():
    """SmolLM2's calibration once held a copy of every layer's rows, all joined before any was let go:
    the rows of q, k and v are now one tensor, and equal to the real rows."""
    torch.manual_seed(0)
    model = Attention()
    dense = copy.deepcopy(model)
    mc.convert(model, mc.MIDLConfig(keep=0.5, rank=0, select="input", skip_head=False), (torch.randn(1, 3, 16),))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0  # padding: not data
    batches = [mc.Batch({"x": torch.randn(2, 5, 16), "attention_mask": mask}) for _ in range(2)]
    groups = collect_groups(model, batches)
    assert groups["q"] is groups["k"] is groups["v"] and groups["o"] is not groups["q"]
    rows = torch.cat([b.inputs["x"][mask.bool()] for b in batches])
    assert torch.equal(groups["q"], rows[:, None, :])
    inner = torch.cat([torch.tanh(dense.q(x) + dense.k(x) * dense.v(x))[mask.bool()]
                       for x in (b.inputs["x"] for b in batches)])
    assert torch.allclose(groups["o"], inner[:, None, :], atol=1e-6)
