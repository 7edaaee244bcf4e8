"""Running a model and watching its layers (``running.py``), the one helper every measurement uses."""
import pytest
import torch
from torch import nn

import midl_convert as mc
from midl_convert.running import run_model, watching


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x, scale=1.0):
        return self.b(self.a(x)) * scale


def test_run_model_takes_every_form_of_input():
    model, x = Two(), torch.randn(3, 4)
    ref = model(x, 2.0)
    assert torch.equal(run_model(model, mc.Batch((x, 2.0))), ref)
    assert torch.equal(run_model(model, {"x": x, "scale": 2.0}), ref)
    assert torch.equal(run_model(model, [x, 2.0]), ref)
    assert torch.equal(run_model(model, x), model(x))


def test_watching_sees_inputs_and_outputs_and_leaves_no_hook_even_on_error():
    model, x = Two(), torch.randn(3, 4)
    seen = []
    with watching({"a": model.a, "b": model.b}, lambda p, m, inp: seen.append((p, tuple(inp.shape))) or inp * 0,
                  lambda p, m, inp, y: y * 0 if p == "b" else None):
        out = model(x)
    # before's value is dropped (the inputs stay), after's replaces the output
    assert seen == [("a", (3, 4)), ("b", (3, 4))] and torch.equal(out, torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="boom"), watching({"a": model.a}, lambda *a: seen.append("again")):
        raise RuntimeError("boom")
    assert not model.a._forward_pre_hooks and not model.a._forward_hooks and not model.b._forward_hooks
    assert torch.equal(model(x), Two.forward(model, x))
