"""How much each output neuron of a layer moves the model's output.

For the model's output ``f`` (logits, embedding or hidden states, as distillation compares them)
and a layer's output ``y``, the sensitivity of neuron ``i`` is ``E[(d <v, f> / d y_i)^2]`` over
calibration rows and random Gaussian probes ``v``: a Hutchinson estimate of the diagonal of
``J^T J``, so an error ``e`` in that layer moves the output by about ``sum_i s_i e_i^2``
(cross terms dropped). Calibration can then rank a layer's neurons by the error that reaches the
output, not by the error the layer makes: an MLP output neuron that the next LayerNorm scales
to nothing needs no exact path, however wrong its light path is.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from .data import Batch
from .quality import model_output, positions


def _per_channel(grad: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed squared gradient per output channel: dim 1 of conv maps, the last dim otherwise."""
    if grad.dim() == 4:  # (N, C, H, W)
        return grad.float().pow(2).sum(dim=(0, 2, 3))
    return positions(grad, batch).float().pow(2).sum(0)


def neuron_sensitivity(
    model: nn.Module, paths: Sequence[str], batches: Iterable[Batch], kind: str, probes: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Each module's (at ``paths``) per-output-neuron sensitivity, normalised to mean 1 per layer.

    The model runs as it is (call it in ``calibrate.dense_mode`` for the dense model's
    sensitivities); nothing in it is changed and gradients are left cleared.
    """
    modules = {p: model.get_submodule(p) for p in paths}
    outs: dict[str, torch.Tensor] = {}
    total: dict[str, torch.Tensor] = {}
    anchor = torch.zeros((), requires_grad=True)  # gives every tapped output a graph, with the weights frozen

    def tap(p: str, out: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(out, torch.Tensor):
            return None
        out = out + anchor.to(out.device, out.dtype)  # same values; gradients reach it through every later path
        out.retain_grad()
        outs[p] = out
        return out

    handles = [m.register_forward_hook(lambda mod, inp, out, p=p: tap(p, out)) for p, m in modules.items()]
    gen = torch.Generator().manual_seed(seed)
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in batches:
                for _ in range(probes):
                    outs.clear()
                    out = positions(model_output(model, batch, kind), batch).float()
                    probe = torch.randn(out.shape, generator=gen).to(out.device)
                    (out * probe).sum().backward()
                    for p, y in outs.items():
                        if y.grad is not None:
                            s = _per_channel(y.grad, batch)
                            total[p] = total[p] + s if p in total else s
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return {p: (s / s.mean().clamp_min(1e-30)).cpu() for p, s in total.items()}
