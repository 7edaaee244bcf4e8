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
from .deprecation import renamed_kwargs
from .sparse import ConvRows
from .quality import model_output, positions
from .running import watching


def _channel_last(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """The gradient with the module's output channels last: a conv's are at dim -3 ((N, C, H, W) or
    (C, H, W)); a Linear's are last, whatever comes before (tokens, or a channels-last image)."""
    return grad.movedim(-3, -1) if isinstance(module, (nn.Conv2d, ConvRows)) else grad


@renamed_kwargs(kind="output")
def neuron_sensitivity(
    model: nn.Module, paths: Sequence[str], batches: Iterable[Batch], output: str, probes: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Each module's (at ``paths``) per-output-neuron sensitivity, normalised to mean 1 per layer.

    The model runs as it is (call it in ``midl_convert.dense(model)`` for the dense model's
    sensitivities); its weights, their ``requires_grad`` flags and every module's train/eval
    mode are left as they were. A module called several times per forward counts every call.
    """
    modules = {p: model.get_submodule(p) for p in paths}
    total: dict[str, torch.Tensor] = {}
    anchor = torch.zeros((), requires_grad=True)  # gives every tapped output a graph, with the weights frozen
    current: list[Batch] = []

    def add(p: str, grad: torch.Tensor) -> None:
        g = _channel_last(modules[p], grad)
        rows = positions(g, current[0]) if g.dim() == 3 else g.reshape(-1, g.shape[-1])
        s = rows.float().pow(2).sum(0)
        total[p] = total[p] + s if p in total else s

    def tap(p: str, out: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(out, torch.Tensor):
            return None
        out = out + anchor.to(out.device, out.dtype)  # same values; gradients reach it through every later path
        out.register_hook(lambda grad: add(p, grad))  # the gradient of this value, before any in-place change
        return out

    gen = torch.Generator().manual_seed(seed)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad(), watching(modules, after=lambda p, mod, x, out: tap(p, out)):
            for batch in batches:
                current[:] = [batch]
                for _ in range(probes):
                    out = positions(model_output(model, batch, output), batch).float()
                    probe = torch.randn(out.shape, generator=gen).to(out.device)
                    (out * probe).sum().backward()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        for m, mode in zip(model.modules(), modes):
            m.training = mode
    return {p: (s / s.mean().clamp_min(1e-30)).cpu() for p, s in total.items()}
