"""Small models and data for fast tests."""
import torch
from torch import nn

from midl_convert.data import Batch, Data


class TinyNet(nn.Module):
    """A two-layer MLP classifier with structured (low-rank) hidden activations."""

    def __init__(self, d_in: int = 16, hidden: int = 64, classes: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_data(n: int = 256, d_in: int = 16, seed: int = 0) -> Data:
    """Inputs on a 4-dimensional subspace plus noise, like real activations; no labels."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, d_in, generator=gen)
    xs = torch.randn(n, 4, generator=gen) @ basis + 0.1 * torch.randn(n, d_in, generator=gen)
    items = list(xs)
    return Data("tiny", items[: n * 3 // 4], items[n * 3 // 4 :], lambda it, training: Batch((torch.stack(it),)), seed)
